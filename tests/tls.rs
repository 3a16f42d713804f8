//! TLS against real brokers: a test CA and certificates made at test time (rcgen), a
//! tungstenite client over rustls, curl, garbage instead of a ClientHello, the handshake
//! under the header timeout, bad files at start, and a SIGHUP reload of a real process.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde_json::{Value, json};
use tungstenite::Message;
use volley::bench::Pki;

fn pki(name: &str) -> Pki {
    Pki::new(name).unwrap()
}

fn client_config(pki: &Pki) -> Arc<ClientConfig> {
    pki.client_config().unwrap()
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

fn tls_connect(addr: SocketAddr, config: Arc<ClientConfig>) -> Tls {
    let socket = TcpStream::connect(addr).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    StreamOwned::new(ClientConnection::new(config, name).unwrap(), socket)
}

/// The leaf certificate the server presented (the handshake completes, or this panics).
fn peer_leaf(tls: &mut Tls) -> Vec<u8> {
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

fn tls_broker(pki: &Pki) -> Broker {
    Broker::with(|c| {
        c.tls_cert = pki.cert.display().to_string();
        c.tls_key = pki.key.display().to_string();
        c.listen_tls = "127.0.0.1:0".into();
    })
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "10"]).args(args).output().expect("curl runs");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn wss_and_https_with_real_clients() {
    let pki = pki("clients");
    let broker = tls_broker(&pki);
    let tls_addr = broker.tls_addr.expect("listen_tls bound");
    // tungstenite over rustls, next to a plain client on `listen`.
    let stream = tls_connect(tls_addr, client_config(&pki));
    let (mut secure, _) = tungstenite::client(format!("wss://localhost:{}/ws", tls_addr.port()), stream).unwrap();
    assert_eq!(recv_json(&mut secure)["type"], "ack");
    let (mut plain, _) = ws_connect(&broker, "/ws");
    subscribe(&mut plain, json!({"topics": ["t"]}));
    secure.send(Message::text(json!({"type": "subscribe", "payload": {"topics": ["t"]}}).to_string())).unwrap();
    assert_eq!(recv_json(&mut secure)["type"], "ack");
    // curl follows SSE over https, and publishes over https.
    let cacert = pki.ca_file();
    let base = format!("https://localhost:{}", tls_addr.port());
    let sse = Command::new("curl")
        .args(["-sSN", "--max-time", "3", "--cacert", cacert.to_str().unwrap(), &format!("{base}/sse?topics=t")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(&broker, "GET", "/stats", "").2["connections"]["sse"] != 1 {
        assert!(Instant::now() < deadline, "curl's SSE stream connected");
        std::thread::sleep(Duration::from_millis(20));
    }
    let published: Value = serde_json::from_str(&curl(&[
        "--cacert",
        cacert.to_str().unwrap(),
        "-X",
        "POST",
        "--data",
        r#"{"topic":"t","data":{"n":1}}"#,
        &format!("{base}/publish?wait=1"),
    ]))
    .unwrap();
    let id = published["message_ids"][0].as_str().unwrap().to_string();
    let event = recv_json(&mut secure);
    assert_eq!((event["message_id"].as_str(), &event["payload"]["data"]), (Some(id.as_str()), &json!({"n": 1})));
    assert_eq!(recv_json(&mut plain)["message_id"].as_str(), Some(id.as_str()));
    let sse = String::from_utf8(sse.wait_with_output().unwrap().stdout).unwrap();
    assert!(sse.contains(&format!("id: {id}")), "{sse}");
}

#[test]
fn garbage_instead_of_a_client_hello_is_closed_and_counted() {
    let pki = pki("garbage");
    let broker = tls_broker(&pki);
    let tls_addr = broker.tls_addr.unwrap();
    let mut good = tls_connect(tls_addr, client_config(&pki));
    write!(good, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut bad = TcpStream::connect(tls_addr).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    // At most an alert record (content type 21), never an HTTP answer.
    assert!(rest.is_empty() || rest[0] == 21, "{rest:?}");
    let mut head = [0u8; 15];
    good.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK", "the good client is served");
    let (_, _, stats) = http(&broker, "GET", "/stats", "");
    assert_eq!(stats["tls_handshake_failures"]["protocol"], 1, "{stats}");
}

#[test]
fn the_header_timeout_covers_the_tls_handshake() {
    let pki = pki("slow");
    let broker = Broker::with(|c| {
        c.tls_cert = pki.cert.display().to_string();
        c.tls_key = pki.key.display().to_string();
        c.http_header_timeout_ms = 300;
    });
    // `listen` itself speaks TLS here; a client that never says hello is dropped.
    let mut silent = TcpStream::connect(broker.addr).unwrap();
    silent.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!(silent.read(&mut buf).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(3), "dropped at the header timeout");
    // A client that completes its handshake and stops mid-head is dropped too.
    let mut half = tls_connect(broker.addr, client_config(&pki));
    write!(half, "GET /health HTTP/1.1\r\nHo").unwrap();
    let started = Instant::now();
    assert_eq!(half.read(&mut buf).unwrap_or(0), 0);
    assert!(started.elapsed() < Duration::from_secs(3));
}

fn volley_process(args: &[(&str, &Path)]) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_volley"));
    command.args(["serve", "--listen", "127.0.0.1:0"]).stdout(Stdio::null()).stderr(Stdio::piped());
    for (key, path) in args {
        command.env(format!("VOLLEY_{}", key.to_ascii_uppercase()), path);
    }
    command.spawn().unwrap()
}

#[test]
fn bad_files_stop_the_broker_with_exit_2_naming_key_and_file() {
    let pki = pki("bad");
    let missing = pki.dir.join("missing.pem");
    let not_a_key = pki.dir.join("not-a-key.pem");
    std::fs::write(&not_a_key, "hello").unwrap();
    for (args, key, file) in [
        (vec![("tls_cert", missing.as_path()), ("tls_key", pki.key.as_path())], "tls_cert", &missing),
        (vec![("tls_cert", pki.cert.as_path()), ("tls_key", not_a_key.as_path())], "tls_key", &not_a_key),
    ] {
        let out = volley_process(&args).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(key) && stderr.contains(&file.display().to_string()), "{stderr}");
    }
}

#[test]
fn sighup_reloads_the_pair_without_dropping_connections() {
    let pki = pki("reload");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["serve", "--listen", &addr.to_string()])
        .env("VOLLEY_TLS_CERT", &pki.cert)
        .env("VOLLEY_TLS_KEY", &pki.key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "volley listens");
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = client_config(&pki);
    let mut before = tls_connect(addr, config);
    let first_leaf = peer_leaf(&mut before);
    // A new pair from another CA over the same files, then SIGHUP.
    let pki2 = Pki::new("reload-second").unwrap();
    std::fs::copy(&pki2.cert, &pki.cert).unwrap();
    std::fs::copy(&pki2.key, &pki.key).unwrap();
    let hup = |child: &std::process::Child| {
        assert!(Command::new("kill").args(["-HUP", &child.id().to_string()]).status().unwrap().success());
        std::thread::sleep(Duration::from_millis(300));
    };
    hup(&child);
    // Only the new CA is trusted: the handshake itself proves the new pair is served.
    let mut after = tls_connect(addr, client_config(&pki2));
    assert_ne!(peer_leaf(&mut after), first_leaf, "new handshakes get the new pair");
    // The connection made before the reload still works.
    write!(before, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = [0u8; 15];
    before.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK");
    // A failed reload keeps the pair that works.
    std::fs::write(&pki.key, "not a key").unwrap();
    hup(&child);
    let mut still = tls_connect(addr, client_config(&pki2));
    write!(still, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    still.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200 OK", "the old pair serves after a failed reload");
    let _ = child.kill();
    let _ = child.wait();
}
