//! SSE framing, history and gap-free resume over SSE and WebSocket, with real clients.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// An SSE client on a raw socket.
struct Sse {
    reader: BufReader<TcpStream>,
    head: String,
}

/// One SSE block: its fields.
#[derive(Debug, Default)]
struct Block {
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
    retry: Option<String>,
    comment: bool,
}

impl Sse {
    fn open(broker: &Broker, path: &str, headers: &str) -> Self {
        let mut s = TcpStream::connect(broker.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n").unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        Self { reader, head }
    }

    fn next_block(&mut self) -> Option<Block> {
        let mut block = Block::default();
        let mut any = false;
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).ok()? == 0 {
                return None;
            }
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if any {
                    return Some(block);
                }
                continue;
            }
            any = true;
            if line.starts_with(':') {
                block.comment = true;
                continue;
            }
            let (field, value) = line.split_once(": ").unwrap_or((line, ""));
            let value = Some(value.to_string());
            match field {
                "id" => block.id = value,
                "event" => block.event = value,
                "data" => block.data = value,
                "retry" => block.retry = value,
                other => panic!("unknown SSE field {other}"),
            }
        }
    }

    fn next_event(&mut self) -> Option<(String, String)> {
        loop {
            let block = self.next_block()?;
            if let (Some(id), Some(data)) = (block.id, block.data) {
                assert!(block.event.is_none(), "no event: line, so onmessage fires");
                return Some((id, data));
            }
        }
    }
}

#[test]
fn sse_headers_framing_and_bytes_identical_to_websocket() {
    let broker = Broker::start();
    let mut sse = Sse::open(&broker, "/sse?topics=chat.*&sources=api", "Origin: http://elsewhere\r\n");
    assert!(sse.head.starts_with("HTTP/1.1 200"), "{}", sse.head);
    for header in [
        "Content-Type: text/event-stream",
        "Cache-Control: no-cache",
        "X-Accel-Buffering: no",
        "Connection: keep-alive",
    ] {
        assert!(sse.head.contains(header), "{header} in {}", sse.head);
    }
    assert!(sse.head.contains("Access-Control-Allow-Origin: *"));
    assert_eq!(sse.next_block().unwrap().retry.as_deref(), Some("1000"));

    // A raw WebSocket reader, to compare exact bytes.
    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["chat.*"], "sources": ["api"]}));
    let ids = publish(
        &broker,
        &json!([{"topic": "chat.a", "source": "other"}, {"topic": "news.x", "source": "api"}, {"topic": "chat.b", "source": "api", "correlation_id": "c1", "data": {"k": [1, "é"]}}]),
    );
    let (id, data) = sse.next_event().unwrap();
    assert_eq!(id, ids[2], "filters by topic pattern and source");
    let ws_bytes = loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => break t.as_str().to_string(),
            _ => continue,
        }
    };
    assert_eq!(data, ws_bytes, "SSE data is byte-identical to the WebSocket event");
    let v: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(v["correlation_id"], "c1");
}

/// (Heartbeat `: ping` comments are tested with a manual clock in `core/tests.rs`.)
#[test]
fn sse_refuses_invalid_topics() {
    let broker = Broker::start();
    let (status, _, body) = http(&broker, "GET", "/sse?topics=a*", "");
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_topic")));
}

#[test]
fn bogus_old_and_foreign_ids_are_not_recovered() {
    let broker = Broker::with(|c| c.history_max_events = 10);
    let other = Broker::start();
    let foreign = publish(&other, &json!({"topic": "r"}))[0].clone();
    let ids = publish(&broker, &Value::from((0..30).map(|i| json!({"topic": "r", "data": i})).collect::<Vec<_>>()));
    for since in ["garbage", foreign.as_str(), ids[0].as_str()] {
        let (mut ws, _) = ws_connect(&broker, "/ws");
        let ack = subscribe(&mut ws, json!({"topics": ["r"], "since": since}));
        assert_eq!(ack["recovered"], false, "since {since}");
        let mut sse = Sse::open(&broker, "/sse?topics=r", &format!("Last-Event-ID: {since}\r\n"));
        sse.next_block().unwrap();
        let failed = sse.next_block().unwrap();
        assert_eq!((failed.event.as_deref(), failed.data.as_deref()), (Some("recovery_failed"), Some("{}")));
        let (status, _, history) = http(&broker, "GET", &format!("/history?topics=r&since={since}&limit=5"), "");
        assert_eq!((status, &history["recovered"]), (200, &json!(false)));
        let got: Vec<&str> =
            history["events"].as_array().unwrap().iter().map(|e| e["message_id"].as_str().unwrap()).collect();
        assert_eq!(got, ids[25..].iter().map(String::as_str).collect::<Vec<_>>(), "the newest events instead");
    }
    // The header wins over since=.
    let mut sse =
        Sse::open(&broker, &format!("/sse?topics=r&since={}", ids[0]), &format!("Last-Event-ID: {}\r\n", ids[28]));
    sse.next_block().unwrap();
    assert_eq!(sse.next_event().unwrap().0, ids[29]);
}

#[test]
fn history_limits_and_order() {
    let broker = Broker::start();
    let ids = publish(
        &broker,
        &Value::from(
            (0..50)
                .map(|i| json!({"topic": if i % 2 == 0 { "h.even" } else { "h.odd" }, "data": i}))
                .collect::<Vec<_>>(),
        ),
    );
    let ids_of = |v: &Value| -> Vec<String> {
        v["events"].as_array().unwrap().iter().map(|e| e["message_id"].as_str().unwrap().to_string()).collect()
    };
    let (_, _, newest) = http(&broker, "GET", "/history?topics=h.even&limit=3", "");
    assert_eq!(ids_of(&newest), vec![ids[44].clone(), ids[46].clone(), ids[48].clone()]);
    let (_, _, after) = http(&broker, "GET", &format!("/history?topics=h.>&since={}&limit=2", ids[10]), "");
    assert_eq!(ids_of(&after), vec![ids[11].clone(), ids[12].clone()]);
    assert_eq!(after["recovered"], true);
    let (_, _, capped) = http(&broker, "GET", "/history?limit=5000", "");
    assert_eq!(ids_of(&capped).len(), 50);
    for bad in ["0", "-1", "1.5", "x"] {
        assert_eq!(http(&broker, "GET", &format!("/history?limit={bad}"), "").0, 400, "limit {bad}");
    }
    let (mut ws, _) = ws_connect(&broker, "/ws");
    send_json(
        &mut ws,
        &json!({"type": "request", "message_id": "h", "payload": {"action": "history", "topics": ["h.even"], "limit": 3}}),
    );
    let reply = recv_json(&mut ws);
    assert_eq!(reply["payload"], newest, "the WebSocket history action returns the same document");
}

/// Publishes 20,000 events in arrays of 50 from another thread; returns all ids in order.
fn publish_in_background(broker: &Broker) -> std::thread::JoinHandle<Vec<String>> {
    let addr = broker.addr;
    std::thread::spawn(move || {
        let mut ids = Vec::with_capacity(20_000);
        for batch in 0..400 {
            let events: Vec<Value> = (0..50).map(|i| json!({"topic": "live.x", "data": batch * 50 + i})).collect();
            let body = Value::from(events).to_string();
            let mut s = TcpStream::connect(addr).unwrap();
            write!(
                s,
                "POST /publish HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut reply = String::new();
            std::io::Read::read_to_string(&mut s, &mut reply).unwrap();
            let v: Value = serde_json::from_str(reply.split_once("\r\n\r\n").unwrap().1).unwrap();
            ids.extend(v["message_ids"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()));
        }
        ids
    })
}

/// Reconnect points: after how many received events each of the five reconnects happens.
fn reconnect_points(seed: u64) -> Vec<usize> {
    let mut x = seed;
    let mut points: Vec<usize> = (0..5)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            1 + (x % 19_000) as usize
        })
        .collect();
    points.sort();
    points
}

#[test]
fn websocket_resume_under_load_is_exactly_once_in_order() {
    let broker = Broker::start();
    let points = reconnect_points(0x9e37_79b9_7f4a_7c15);
    let mut received: Vec<String> = Vec::new();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["live.*"]}));
    let publisher = publish_in_background(&broker);
    let mut next_point = 0;
    while received.len() < 20_000 {
        if next_point < points.len() && received.len() == points[next_point] {
            next_point += 1;
            drop(ws);
            let (fresh, _) = ws_connect(&broker, "/ws");
            ws = fresh;
            let ack = subscribe(&mut ws, json!({"topics": ["live.*"], "since": received.last()}));
            assert_eq!(ack["recovered"], true);
        }
        let event = recv_json(&mut ws);
        assert_eq!(event["type"], "event", "{event}");
        received.push(event["message_id"].as_str().unwrap().to_string());
    }
    assert_eq!(received, publisher.join().unwrap(), "every event exactly once, in order");
}

#[test]
fn sse_resume_under_load_is_exactly_once_in_order() {
    let broker = Broker::start();
    let points = reconnect_points(0x0123_4567_89ab_cdef);
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut sse = Sse::open(&broker, "/sse?topics=live.>", "");
    let publisher = publish_in_background(&broker);
    let mut next_point = 0;
    let mut got = received.lock().unwrap();
    while got.len() < 20_000 {
        if next_point < points.len() && got.len() == points[next_point] {
            next_point += 1;
            let last = got.last().unwrap().clone();
            sse = Sse::open(&broker, "/sse?topics=live.>", &format!("Last-Event-ID: {last}\r\n"));
        }
        let (id, _) = sse.next_event().expect("stream continues");
        got.push(id);
    }
    assert_eq!(*got, publisher.join().unwrap(), "every event exactly once, in order");
}

#[test]
fn history_memory_stays_flat_while_a_million_events_pass() {
    let broker = Broker::with(|c| {
        c.history_max_events = 10_000;
        c.publish_rate_per_ip = 1_000_000;
        c.publish_burst_per_ip = 1_000_000;
    });
    let batch: Value = Value::from((0..1000).map(|i| json!({"topic": "flat", "data": i})).collect::<Vec<_>>());
    let body = batch.to_string();
    let mut bytes_at = Vec::new();
    for round in 0..1000 {
        let (status, _, _) = http(&broker, "POST", "/publish", &body);
        assert_eq!(status, 200);
        if round == 99 || round == 999 {
            let (_, _, stats) = http(&broker, "GET", "/stats", "");
            assert_eq!(stats["history"]["events"], 10_000);
            bytes_at.push(stats["history"]["bytes"].as_u64().unwrap());
        }
    }
    let (after_100k, after_1m) = (bytes_at[0] as f64, bytes_at[1] as f64);
    assert!((after_1m - after_100k).abs() / after_100k < 0.10, "{after_100k} vs {after_1m}");
    let (_, _, stats) = http(&broker, "GET", "/stats", "");
    assert_eq!(stats["events"]["published"], 1_000_000);
}
