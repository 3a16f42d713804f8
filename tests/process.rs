//! The `volley` binary as an operator runs it: configuration errors, `config --print`,
//! and a graceful drain on SIGTERM.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tungstenite::Message;

fn volley() -> Command {
    Command::new(env!("CARGO_BIN_EXE_volley"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let out =
        volley().args(["serve", "--listen", "127.0.0.1:0"]).env("VOLLEY_MAX_MESSAGE_BYTES", "lots").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_message_bytes"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("volley-process-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "heartbeat_interval_ms = -5\n").unwrap();
    let out = volley().args(["serve", "--config"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("heartbeat_interval_ms"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn config_print_shows_every_key_with_overrides() {
    let out = volley().args(["config", "--print"]).env("VOLLEY_MAX_OUTBOUND_BYTES", "131072").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let table: toml::Table = text.parse().expect("config --print is TOML");
    assert_eq!(table["max_outbound_bytes"].as_integer(), Some(131_072));
    for key in ["listen", "max_connections", "heartbeat_interval_ms", "history_max_events", "jwt_secret"] {
        assert!(table.contains_key(key), "{key} missing from {text}");
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_healthy(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("broker did not start");
}

#[test]
fn sigterm_drains_flushes_and_exits_zero() {
    let port = free_port();
    let child =
        volley().args(["serve", "--listen", &format!("127.0.0.1:{port}")]).stderr(Stdio::piped()).spawn().unwrap();
    let mut running = Running(child);
    wait_healthy(port);
    let (mut ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}/ws")).unwrap();
    let ack = ws.read().unwrap();
    assert!(ack.to_text().unwrap().contains("connected"));
    ws.send(Message::text(json!({"type": "subscribe", "payload": {"topics": ["d.*"]}}).to_string())).unwrap();
    assert!(ws.read().unwrap().to_text().unwrap().contains("subscribed"));

    // Publish 2,000 events, then SIGTERM before the subscriber has read any of them.
    let mut ids = Vec::new();
    for batch in 0..20 {
        let events: Vec<_> = (0..100).map(|i| json!({"topic": "d.x", "data": batch * 100 + i})).collect();
        let body = serde_json::Value::from(events).to_string();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        use std::io::Write;
        write!(
            s,
            "POST /publish?wait=1 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let json: serde_json::Value = serde_json::from_str(reply.split_once("\r\n\r\n").unwrap().1).unwrap();
        ids.extend(json["message_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(running.0.id() as i32, libc::SIGTERM) };

    let mut got = Vec::new();
    let close = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                got.push(v["message_id"].as_str().unwrap().to_string());
            }
            Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert_eq!(close, Some(1001));
    assert_eq!(got, ids, "every queued event is flushed before the close");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "broker did not exit after drain");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "no longer accepting");
}

/// The broker's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    kib * 1024
}

fn post(port: u16, path: &str, body: &str) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply
}

/// Finding 1 of the hostile-load review: replies were queued without a bound, so a client
/// that never reads and floods `history` requests grew the broker to 1.3 GiB.
#[test]
fn a_client_that_never_reads_and_floods_history_requests_is_closed_1013_with_memory_flat() {
    use std::io::Write;
    let port = free_port();
    let child = volley()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("VOLLEY_LOG_LEVEL", "warn")
        .spawn()
        .unwrap();
    let running = Running(child);
    wait_healthy(port);
    let data = "x".repeat(500);
    for batch in 0..10 {
        let events: Vec<_> = (0..100).map(|i| json!({"topic": "h.x", "data": format!("{batch}-{i}-{data}")})).collect();
        assert!(
            post(port, "/publish?wait=1", &serde_json::Value::from(events).to_string()).starts_with("HTTP/1.1 200")
        );
    }
    let before = rss_bytes(running.0.id());

    let (ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}/ws")).unwrap();
    let tungstenite::stream::MaybeTlsStream::Plain(mut socket) = ws.into_inner() else { panic!("plain TCP") };
    socket.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let request = common::masked_text(
        &json!({"type": "request", "payload": {"action": "history", "topics": [">"], "limit": 1000}}).to_string(),
    );
    let mut peak = before;
    for _ in 0..3000 {
        // The broker stops reading a client it is backed up on: our writes then block.
        if socket.write_all(&request).is_err() {
            break;
        }
        peak = peak.max(rss_bytes(running.0.id()));
    }
    std::thread::sleep(Duration::from_millis(200));
    peak = peak.max(rss_bytes(running.0.id()));
    assert!(peak < 64 << 20, "broker grew to {} MiB (from {} MiB)", peak >> 20, before >> 20);

    // Now read: whatever was queued, then a close frame with 1013.
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut received = Vec::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    let close = common::find_close_code(&received);
    assert_eq!(close, Some(1013), "closed as a slow consumer after {} bytes", received.len());
}

/// Finding 4: a panicking shard left a live process with a dead shard. Now the process
/// exits non-zero, so a supervisor restarts it.
#[cfg(feature = "fault-injection")]
#[test]
fn a_panicking_shard_ends_the_process_with_status_70() {
    let port = free_port();
    let child = volley()
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("VOLLEY_LOG_LEVEL", "warn")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut running = Running(child);
    wait_healthy(port);
    let reply = post(port, "/publish", &json!({"topic": volley::FAULT_PANIC_TOPIC, "data": 1}).to_string());
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the process outlived its panicked shard");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(volley::reactor::PANIC_EXIT_CODE));
    let mut stderr = String::new();
    running.0.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(stderr.contains("panicked"), "{stderr}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "nothing left listening");
}
