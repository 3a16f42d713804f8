//! HTTP on the shared listener: publish, errors, keep-alive and pipelining, limits, CORS,
//! upgrade refusals, connection admission.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Sends raw bytes, reads until the server closes (or 2 s of silence).
fn raw(broker: &Broker, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn body_of(response: &str) -> Value {
    serde_json::from_str(response.split_once("\r\n\r\n").unwrap().1).unwrap()
}

#[test]
fn publish_single_array_and_wait() {
    let broker = Broker::start();
    let (status, _, body) = http(&broker, "POST", "/publish", &json!({"topic": "a"}).to_string());
    assert_eq!((status, body["message_ids"].as_array().map(Vec::len)), (200, Some(1)));
    let subscribers: Vec<Ws> = (0..3)
        .map(|_| {
            let (mut ws, _) = ws_connect(&broker, "/ws");
            subscribe(&mut ws, json!({"topics": ["w.*"]}));
            ws
        })
        .collect();
    let (status, _, body) =
        http(&broker, "POST", "/publish?wait=1", &json!([{"topic": "w.1"}, {"topic": "nobody"}]).to_string());
    assert_eq!(status, 200);
    assert_eq!(body["delivered_to"], json!([3, 0]));
    drop(subscribers);
}

#[test]
fn invalid_events_name_the_field_and_publish_nothing() {
    let broker = Broker::start();
    let (status, _, body) = http(&broker, "POST", "/publish", "{\"topic\":");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_json")));
    assert_eq!(body["error"]["field"], Value::Null);
    let (status, _, body) = http(&broker, "POST", "/publish", &json!({"topic": "a b"}).to_string());
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("topic")));
    let bad_fourth = json!([{"topic": "x"}, {"topic": "x"}, {"topic": "x"}, {"topic": "x*"}]);
    let (status, _, body) = http(&broker, "POST", "/publish", &bad_fourth.to_string());
    assert_eq!((status, body["error"]["field"].as_str()), (400, Some("[3].topic")));
    assert!(body["error"]["message"].is_string());
    let (_, _, history) = http(&broker, "GET", "/history?topics=x", "");
    assert_eq!(history["events"], json!([]), "all or nothing: none of the array was published");
    let too_many = Value::from((0..1001).map(|_| json!({"topic": "x"})).collect::<Vec<_>>());
    assert_eq!(http(&broker, "POST", "/publish", &too_many.to_string()).0, 400);
    assert_eq!(http(&broker, "POST", "/publish", "[]").0, 400);
}

#[test]
fn size_limits() {
    let broker = Broker::with(|c| {
        c.max_body_bytes = 4096;
        c.max_message_bytes = 2048;
    });
    let (status, _, body) =
        http(&broker, "POST", "/publish", &json!({"topic": "a", "data": "x".repeat(5000)}).to_string());
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("too_large")));
    let (status, _, body) =
        http(&broker, "POST", "/publish", &json!({"topic": "a", "data": "x".repeat(3000)}).to_string());
    assert_eq!((status, body["error"]["code"].as_str()), (413, Some("too_large")), "event over max_message_bytes");
    let mut big_head = b"GET /health HTTP/1.1\r\nX-Pad: ".to_vec();
    big_head.extend(std::iter::repeat_n(b'a', 17 * 1024));
    big_head.extend_from_slice(b"\r\n\r\n");
    let response = raw(&broker, &big_head);
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    assert_eq!(body_of(&response)["error"]["code"], "head_too_large");
    let chunked = raw(&broker, b"POST /publish HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    assert!(chunked.starts_with("HTTP/1.1 411"), "{chunked}");
}

#[test]
fn routes_methods_and_malformed_requests() {
    let broker = Broker::start();
    let (status, _, body) = http(&broker, "GET", "/nope", "");
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
    let (status, head, body) = http(&broker, "DELETE", "/publish", "");
    assert_eq!((status, body["error"]["code"].as_str()), (405, Some("method_not_allowed")));
    assert!(head.contains("Allow: POST"), "{head}");
    assert_eq!(http(&broker, "POST", "/health", "").0, 405);
    let response = raw(&broker, b"\x16\x03\x01 definitely not http\r\n\r\n");
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("Connection: close"), "malformed requests close the connection");
    let (status, _, body) = http(&broker, "GET", "/health", "");
    assert_eq!((status, body), (200, json!({"status": "ok"})));
}

#[test]
fn keep_alive_pipelining_and_split_heads() {
    let broker = Broker::start();
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let body = json!({"topic": "k"}).to_string();
    let pipelined = format!(
        "POST /publish?wait=1 HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET /nope HTTP/1.1\r\n\r\nGET /health HTTP/1.1\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // Byte by byte: heads split across many reads.
    for byte in pipelined.as_bytes() {
        s.write_all(&[*byte]).unwrap();
    }
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let statuses: Vec<&str> = all.match_indices("HTTP/1.1 ").map(|(i, _)| &all[i + 9..i + 12]).collect();
    assert_eq!(statuses, vec!["200", "404", "200"], "answered in order on one connection: {all}");
}

#[test]
fn cors_preflight_and_allow_list() {
    let broker = Broker::with(|c| c.allowed_origins = vec!["http://good".into()]);
    let preflight = raw(&broker, b"OPTIONS /publish HTTP/1.1\r\nOrigin: http://good\r\nAccess-Control-Request-Method: POST\r\nConnection: close\r\n\r\n");
    assert!(preflight.starts_with("HTTP/1.1 204"), "{preflight}");
    for header in [
        "Access-Control-Allow-Origin: http://good",
        "Access-Control-Allow-Methods: GET, POST, OPTIONS",
        "Access-Control-Allow-Headers: Content-Type, Authorization, Last-Event-ID",
    ] {
        assert!(preflight.contains(header), "{header} in {preflight}");
    }
    let allowed = raw(&broker, b"GET /history HTTP/1.1\r\nOrigin: http://good\r\nConnection: close\r\n\r\n");
    assert!(allowed.contains("Access-Control-Allow-Origin: http://good"));
    let refused = raw(&broker, b"GET /history HTTP/1.1\r\nOrigin: http://evil\r\nConnection: close\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 200") && !refused.contains("Access-Control"), "{refused}");
    let upgrade = raw(&broker, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://evil\r\n\r\n");
    assert!(upgrade.starts_with("HTTP/1.1 403"), "{upgrade}");
}

#[test]
fn upgrade_refusals() {
    let broker = Broker::start();
    let plain = raw(&broker, b"GET /ws HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 426"), "{plain}");
    let old = raw(&broker, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n");
    assert!(old.starts_with("HTTP/1.1 426") && old.contains("Sec-WebSocket-Version: 13"), "{old}");
    let no_key = raw(
        &broker,
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n",
    );
    assert!(no_key.starts_with("HTTP/1.1 400"), "{no_key}");
    let echo = raw(&broker, b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(echo.starts_with("HTTP/1.1 404"), "the echo route is off by default: {echo}");
}

#[test]
fn connection_admission_503_then_429() {
    let broker = Broker::with(|c| {
        c.max_connections = 2;
        c.max_connections_per_ip = 1;
    });
    let first = TcpStream::connect(broker.addr).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let per_ip = raw(&broker, b"GET /health HTTP/1.1\r\n\r\n");
    assert!(per_ip.starts_with("HTTP/1.1 429"), "{per_ip}");
    assert_eq!(body_of(&per_ip)["error"]["code"], "too_many_connections");
    // A second address fills the broker; a third connection is refused before per-IP.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&"127.0.0.2:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    socket.connect(&broker.addr.into()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let full = raw(&broker, b"GET /health HTTP/1.1\r\n\r\n");
    assert!(full.starts_with("HTTP/1.1 503") && full.contains("Retry-After: 1"), "{full}");
    drop((first, socket));
}
