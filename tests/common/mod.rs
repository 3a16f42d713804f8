//! Test harness: an in-process broker on a loopback port and real clients.
#![allow(dead_code)]

pub mod chromium;
pub mod processes;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;
use tungstenite::{Message, WebSocket, stream::MaybeTlsStream};
use volley::config::Config;
use volley::reactor::Server;

/// A broker running in this process; stopped on drop.
pub struct Broker {
    server: Option<Server>,
    pub addr: SocketAddr,
    /// `listen_tls`, when configured.
    pub tls_addr: Option<SocketAddr>,
    /// `admin_listen`, when configured.
    pub admin_addr: Option<SocketAddr>,
}

impl Broker {
    /// Starts a broker with defaults, two shards, on a free port.
    pub fn start() -> Self {
        Self::with(|_| {})
    }

    /// Starts a broker after `tweak` adjusts the configuration.
    pub fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config { listen: "127.0.0.1:0".parse().unwrap(), shards: 2, ..Config::default() };
        tweak(&mut config);
        let server = Server::start(config).expect("broker starts");
        let (addr, tls_addr, admin_addr) = (server.addr(), server.tls_addr(), server.admin_addr());
        Self { server: Some(server), addr, tls_addr, admin_addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Drains and waits for the shards to exit.
    pub fn drain_and_join(mut self) {
        if let Some(server) = self.server.take() {
            server.drain();
            server.join().expect("shards exit cleanly");
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
            let _ = server.join();
        }
    }
}

pub type Ws = WebSocket<MaybeTlsStream<TcpStream>>;

/// Connects a WebSocket to `path` and reads the connect `ack`.
pub fn ws_connect(broker: &Broker, path: &str) -> (Ws, Value) {
    let (mut ws, _) = tungstenite::connect(broker.url(path)).expect("websocket connects");
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let ack = recv_json(&mut ws);
    assert_eq!(ack["type"], "ack", "first message is the connect ack: {ack}");
    (ws, ack)
}

/// A client (masked) text frame, for raw-socket clients.
pub fn masked_text(payload: &str) -> Vec<u8> {
    let mut frame = Vec::new();
    volley::event::masked_text(payload.as_bytes(), &mut frame);
    frame
}

/// Sends a JSON message.
pub fn send_json(ws: &mut Ws, value: &Value) {
    ws.send(Message::text(value.to_string())).expect("send");
}

/// Reads the next text message as JSON (skipping pings).
pub fn recv_json<S: Read + Write>(ws: &mut WebSocket<S>) -> Value {
    loop {
        match ws.read().expect("read a message") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("server sends JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// Subscribes and returns the ack payload.
pub fn subscribe(ws: &mut Ws, payload: Value) -> Value {
    send_json(ws, &serde_json::json!({"type": "subscribe", "message_id": "s", "payload": payload}));
    let ack = recv_json(ws);
    assert_eq!(ack["type"], "ack", "subscribe answered with ack: {ack}");
    ack["payload"].clone()
}

/// A minimal HTTP/1.1 client: one request on a fresh connection, `Connection: close`.
pub fn http(broker: &Broker, method: &str, path: &str, body: &str) -> (u16, String, Value) {
    http_to(broker.addr, method, path, body)
}

/// The same, to any address.
pub fn http_to(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, head.to_string(), json)
}

/// Publishes over HTTP with `?wait=1` and returns the ids.
pub fn publish(broker: &Broker, events: &Value) -> Vec<String> {
    let (status, _, body) = http(broker, "POST", "/publish?wait=1", &events.to_string());
    assert_eq!(status, 200, "publish answered {status}: {body}");
    body["message_ids"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

/// The code of the first close frame in a stream of unmasked server frames.
pub fn find_close_code(mut bytes: &[u8]) -> Option<u16> {
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0f;
        let (len, header) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => (u64::from_be_bytes(bytes[2..10].try_into().unwrap()) as usize, 10),
            n if n < 126 => (n as usize, 2),
            _ => return None,
        };
        if bytes.len() < header + len {
            return None;
        }
        if opcode == 0x8 && len >= 2 {
            return Some(u16::from_be_bytes([bytes[header], bytes[header + 1]]));
        }
        bytes = &bytes[header + len..];
    }
    None
}

/// An HS256 token with `claims`, expiring in an hour unless they say otherwise.
pub fn token(secret: &str, mut claims: Value) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let in_an_hour = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    if claims.get("exp").is_none() {
        claims["exp"] = in_an_hour.into();
    }
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}
