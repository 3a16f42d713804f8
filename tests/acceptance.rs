//! The core broker's acceptance behaviours under load and abuse, with real clients.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

#[test]
fn a_thousand_connections_all_receive_a_broadcast() {
    volley::limits::raise_fd_limit();
    let broker = Broker::start();
    let mut clients: Vec<Ws> = (0..1000)
        .map(|_| {
            let (mut ws, _) = ws_connect(&broker, "/ws");
            send_json(&mut ws, &json!({"type": "subscribe", "payload": {"topics": ["all"]}}));
            ws
        })
        .collect();
    for ws in &mut clients {
        assert_eq!(recv_json(ws)["payload"]["status"], "subscribed");
    }
    let (_, _, reply) = http(&broker, "POST", "/publish?wait=1", &json!({"topic": "all", "data": "hi"}).to_string());
    assert_eq!(reply["delivered_to"], json!([1000]));
    let id = reply["message_ids"][0].as_str().unwrap().to_string();
    for ws in &mut clients {
        let event = recv_json(ws);
        assert_eq!(event["message_id"], id.as_str());
    }
}

#[test]
fn ten_thousand_events_arrive_in_order_at_three_subscribers() {
    let broker = Broker::with(|c| {
        c.rate_per_second = 1_000_000;
        c.rate_burst = 1_000_000;
    });
    let mut subscribers: Vec<Ws> = (0..3)
        .map(|_| {
            let (mut ws, _) = ws_connect(&broker, "/ws");
            subscribe(&mut ws, json!({"topics": ["seq.>"]}));
            ws
        })
        .collect();
    let (mut publisher, _) = ws_connect(&broker, "/ws");
    let mut sent = Vec::with_capacity(10_000);
    for window in 0..100 {
        for i in 0..100 {
            let data = window * 100 + i;
            let request = json!({"type": "request", "payload": {"action": "publish", "topic": "seq.n", "data": data}});
            publisher.write(Message::text(request.to_string())).unwrap();
        }
        publisher.flush().unwrap();
        for _ in 0..100 {
            let reply = recv_json(&mut publisher);
            assert_eq!(reply["type"], "response", "{reply}");
            sent.push(reply["payload"]["message_id"].as_str().unwrap().to_string());
        }
    }
    for ws in &mut subscribers {
        let events: Vec<Value> = (0..10_000).map(|_| recv_json(ws)).collect();
        let ids: Vec<&str> = events.iter().map(|e| e["message_id"].as_str().unwrap()).collect();
        assert_eq!(ids, sent, "every event once, in publish order");
        assert!(events.iter().enumerate().all(|(i, e)| e["payload"]["data"] == i), "data in order too");
    }
}

/// A raw WebSocket client that completes the handshake and then does nothing.
fn raw_ws(broker: &Broker, path: &str, recv_buffer: Option<usize>) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket.connect(&broker.addr.into()).unwrap();
    let mut s: TcpStream = socket.into();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

#[test]
fn a_reader_that_never_reads_is_closed_with_1013_while_a_fast_one_misses_nothing() {
    let broker = Broker::with(|c| c.max_outbound_bytes = 64 * 1024);
    let mut slow = raw_ws(&broker, "/ws", Some(4096));
    slow.write_all(&masked_text(&json!({"type": "subscribe", "payload": {"topics": ["big"]}}).to_string())).unwrap();
    let (mut fast, _) = ws_connect(&broker, "/ws");
    subscribe(&mut fast, json!({"topics": ["big"]}));
    std::thread::sleep(Duration::from_millis(100));
    let pad = "x".repeat(2000);
    let mut ids = Vec::new();
    let fast_reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        while got.len() < 2000 {
            got.push(recv_json(&mut fast)["message_id"].as_str().unwrap().to_string());
        }
        got
    });
    for _ in 0..20 {
        let events: Vec<Value> = (0..100).map(|_| json!({"topic": "big", "data": pad})).collect();
        ids.extend(publish(&broker, &Value::from(events)));
    }
    assert_eq!(fast_reader.join().unwrap(), ids, "the fast reader got everything, in order");
    let (_, _, stats) = http(&broker, "GET", "/stats", "");
    assert!(stats["events"]["dropped"].as_u64().unwrap() > 0, "{stats}");
    let mut scrape = TcpStream::connect(broker.addr).unwrap();
    write!(scrape, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut metrics = String::new();
    scrape.read_to_string(&mut metrics).unwrap();
    assert!(metrics.contains("volley_slow_consumer_disconnects_total 1\n"), "{metrics}");
    // Now read the slow socket: its backlog, then a close frame with 1013 (or EOF if the
    // close frame could not be written in time).
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    let _ = slow.read_to_end(&mut all);
    let close = find_close_code(&all);
    assert_eq!(close, Some(1013), "the slow reader finds a 1013 close frame after its backlog");
    assert!(all.len() < 2000 * 2100, "the slow reader did not get everything: it was cut off");
}

#[test]
fn garbage_half_heads_and_abrupt_disconnects_leave_the_broker_serving() {
    let broker = Broker::start();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut half_heads = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(broker.addr).unwrap();
        match i % 6 {
            0 => {
                let garbage: Vec<u8> = (0..(next() % 4096)).map(|_| next() as u8).collect();
                let _ = s.write_all(&garbage);
            }
            1 => {
                let _ = s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgr");
                half_heads.push(s);
                continue;
            }
            2 => {
                let _ = s.write_all(b"POST /publish HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"topic\":");
            }
            3 => {
                // A WebSocket that sends random bytes after the handshake.
                let mut ws = raw_ws(&broker, "/ws", None);
                let garbage: Vec<u8> = (0..(next() % 2048)).map(|_| next() as u8).collect();
                let _ = ws.write_all(&garbage);
            }
            4 => {
                // Half a masked frame, then gone.
                let mut ws = raw_ws(&broker, "/ws", None);
                let frame = masked_text(&json!({"type": "ping"}).to_string());
                let _ = ws.write_all(&frame[..frame.len() / 2]);
            }
            _ => {
                let head = format!("GET /{} HTTP/1.1\r\nHost: {}\r\n\r\n", next(), next());
                let _ = s.write_all(head.as_bytes());
            }
        }
        drop(s);
    }
    // The broker still serves a fresh client end to end.
    let (status, _, body) = http(&broker, "GET", "/health", "");
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["alive"]}));
    let ids = publish(&broker, &json!({"topic": "alive"}));
    assert_eq!(recv_json(&mut ws)["message_id"], ids[0].as_str());
    // (That half heads are dropped at http_header_timeout_ms is tested with a manual clock
    // in core/tests.rs.)
    drop(half_heads);
}

#[test]
fn expect_100_continue_is_answered_before_the_body() {
    let broker = Broker::start();
    let body = json!({"topic": "big", "data": "x".repeat(4000)}).to_string();
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n", body.len())
        .unwrap();
    let mut interim = [0u8; 25];
    s.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    write!(s, "{body}").unwrap();
    let mut reply = [0u8; 12];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"HTTP/1.1 200");
}
