//! Headless Chromium for tests: a server for the test's page that collects what the page
//! posts back, and the browser process, killed (and its profile removed) on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Serves the page and collects what it posts back: (path, body).
pub fn page_server(page: String) -> (u16, mpsc::Receiver<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut reader = BufReader::new(stream);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
            let mut stream = reader.into_inner();
            let (content_type, reply) =
                if path == "/" { ("text/html", page.clone()) } else { ("text/plain", String::new()) };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
            if path != "/" && path != "/favicon.ico" {
                let _ = tx.send((path, serde_json::from_slice(&body).unwrap_or(Value::Null)));
            }
        }
    });
    (port, rx)
}

pub struct Browser(Child, std::path::PathBuf, #[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// Starts headless Chromium on `url` with `args`; killed on drop. One browser runs at a
/// time: pages of concurrent tests stalled with several Chromiums on two cores.
pub fn launch(url: &str, args: &[String]) -> Browser {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    assert!(std::path::Path::new(CHROMIUM).exists(), "{CHROMIUM} missing: ./scripts/test installs Debian's chromium");
    let profile =
        std::env::temp_dir().join(format!("volley-chromium-{}-{}", std::process::id(), url.len() ^ args.len()));
    let child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .args(args)
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromium starts");
    Browser(child, profile, turn)
}
