//! Connections leaving every way a client can leave, and the gauges that count them. In a
//! test binary of its own: it opens and closes many connections at once, which would add
//! noise to the latency test in `observability.rs`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Finding 2 of the hostile-load review: clients that closed with a close frame left
/// `volley_subscriptions` up for good (the closing state overwrote what removal counts).
#[test]
fn subscription_and_connection_gauges_return_to_zero_however_clients_leave() {
    let broker = Broker::start();
    let stats = |broker: &Broker| http(broker, "GET", "/stats", "").2;
    let mut clients = Vec::new();
    for i in 0..30 {
        let (mut ws, _) = ws_connect(&broker, "/ws");
        subscribe(&mut ws, json!({"topics": [format!("g.{i}"), "g.*"]}));
        clients.push(ws);
    }
    let mut sse = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(broker.addr).unwrap();
        write!(s, "GET /sse?topics=g.x HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        sse.push(s);
    }
    let wait_for = |want: (i64, i64, i64)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = stats(&broker);
            let got = (
                s["subscriptions"].as_i64().unwrap(),
                s["connections"]["websocket"].as_i64().unwrap(),
                s["connections"]["sse"].as_i64().unwrap(),
            );
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "gauges stuck at {got:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for((35, 30, 5));
    // Twenty leave with a close handshake, ten abort, the SSE streams hang up.
    for mut ws in clients.drain(..20) {
        ws.close(None).unwrap();
        while ws.read().is_ok() {}
    }
    for ws in clients.drain(..) {
        let tungstenite::stream::MaybeTlsStream::Plain(socket) = ws.into_inner() else { panic!("plain") };
        socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO)).unwrap();
    }
    sse.clear();
    wait_for((0, 0, 0));
    let mut scrape = TcpStream::connect(broker.addr).unwrap();
    write!(scrape, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut metrics = String::new();
    scrape.read_to_string(&mut metrics).unwrap();
    assert!(metrics.contains("\nvolley_subscriptions 0\n"), "{metrics}");
}
