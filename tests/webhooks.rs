//! Webhooks against a real receiver (tests/backend.py): occupied/vacated and presence
//! join/leave in order, every body's signature verified, retries after 5xx, and the
//! bounded queue dropping (and counting) what a dead receiver cannot take.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::processes::{TestBackend, free_port};
use common::{Broker, http, recv_json, send_json, subscribe, ws_connect};
use serde_json::{Value, json};

const SECRET: &str = "hook-secret";

/// The events of every post so far, each post's signature checked against its body.
pub fn posted_events(receiver: &TestBackend) -> Vec<Value> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
    let mut events = Vec::new();
    for post in receiver.get("/webhooks")["posts"].as_array().unwrap() {
        let body = post["body"].as_str().unwrap();
        let hex = post["signature"].as_str().and_then(|s| s.strip_prefix("sha256=")).expect("signed");
        let tag: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
        ring::hmac::verify(&key, body.as_bytes(), &tag).expect("the signature matches the body");
        let body: Value = serde_json::from_str(body).unwrap();
        let batch = body["events"].as_array().unwrap();
        assert!(!batch.is_empty() && batch.len() <= 100);
        events.extend(batch.iter().cloned());
    }
    events
}

/// `(type, topic, user)` of each event, once `count` have arrived.
fn wait_for(receiver: &TestBackend, count: usize) -> Vec<(String, String, String)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = posted_events(receiver);
        if events.len() >= count {
            return events
                .iter()
                .map(|e| {
                    (e["type"].as_str().unwrap().into(), e["topic"].as_str().unwrap().into(), e["user"].to_string())
                })
                .collect();
        }
        assert!(Instant::now() < deadline, "only {events:?} arrived, expected {count}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn hooked(receiver: &TestBackend, path: &str, presence: bool) -> Broker {
    Broker::with(|c| {
        c.webhook_url = receiver.url(path);
        c.webhook_secret = SECRET.into();
        c.webhook_presence = presence;
    })
}

fn event(kind: &str, topic: &str) -> (String, String, String) {
    (kind.into(), topic.into(), "null".into())
}

#[test]
fn occupied_vacated_join_and_leave_arrive_signed_and_in_order() {
    let receiver = TestBackend::start();
    let broker = hooked(&receiver, "/webhook", true);
    let (mut first, _) = ws_connect(&broker, "/ws");
    subscribe(&mut first, json!({"subscription_id": "a", "topics": ["room.1"]}));
    let (mut second, _) = ws_connect(&broker, "/ws");
    subscribe(&mut second, json!({"topics": ["room.1", "room.2"]}));
    // A pattern occupies nothing.
    subscribe(&mut second, json!({"topics": ["room.*"]}));
    send_json(&mut first, &json!({"type": "unsubscribe", "message_id": "u", "payload": {"subscription_id": "a"}}));
    assert_eq!(recv_json(&mut first)["payload"]["status"], "unsubscribed");
    drop(second);
    let events = wait_for(&receiver, 10);
    assert_eq!(
        events[..6],
        [
            event("topic_occupied", "room.1"),
            event("join", "room.1"),
            event("join", "room.1"),
            event("topic_occupied", "room.2"),
            event("join", "room.2"),
            event("leave", "room.1"),
        ]
    );
    // The closed connection leaves both topics, each leave before its vacated.
    for topic in ["room.1", "room.2"] {
        let of_topic: Vec<_> = events[6..].iter().filter(|e| e.1 == topic).cloned().collect();
        assert_eq!(of_topic, [event("leave", topic), event("topic_vacated", topic)], "{events:?}");
    }
    assert_eq!(events.len(), 10);
    let (_, _, stats) = http(&broker, "GET", "/stats", "");
    assert_eq!(stats["webhooks"]["sent"], 10);
    assert_eq!(stats["webhooks"]["dropped"], 0);
}

#[test]
fn a_receiver_answering_500_gets_the_batch_again() {
    let receiver = TestBackend::start();
    let broker = hooked(&receiver, "/webhook-flaky", false);
    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["t.1"]}));
    assert_eq!(wait_for(&receiver, 1), [event("topic_occupied", "t.1")]);
    assert_eq!(receiver.get("/calls")["calls"]["/webhook-flaky"], 3, "two 500s, then taken");
    let (_, _, stats) = http(&broker, "GET", "/stats", "");
    assert_eq!((stats["webhooks"]["failed_posts"].as_u64(), stats["webhooks"]["sent"].as_u64()), (Some(2), Some(1)));
}

#[test]
fn a_dead_receiver_costs_a_bounded_queue_and_counted_drops() {
    let broker = Broker::with(|c| {
        c.webhook_url = format!("http://127.0.0.1:{}/webhook", free_port());
        c.webhook_queue_max = 10;
        c.webhook_retry_ms = 60_000;
    });
    let (mut ws, _) = ws_connect(&broker, "/ws");
    // 200 transitions in quick succession: the first batch takes at most 100 (and then
    // retries for a minute), the queue holds 10, the rest are dropped.
    for i in 0..100 {
        let id = format!("s{i}");
        subscribe(&mut ws, json!({"subscription_id": id, "topics": [format!("t.{i}")]}));
        send_json(&mut ws, &json!({"type": "unsubscribe", "message_id": "u", "payload": {"subscription_id": id}}));
        assert_eq!(recv_json(&mut ws)["payload"]["status"], "unsubscribed");
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, _, stats) = http(&broker, "GET", "/stats", "");
    let hooks = &stats["webhooks"];
    assert!(hooks["queued"].as_u64().unwrap() <= 10, "{hooks}");
    assert!(hooks["dropped"].as_u64().unwrap() >= 90, "{hooks}");
    let mut s = std::net::TcpStream::connect(broker.addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let dropped = text.lines().find(|l| l.starts_with("volley_webhook_dropped_total ")).expect("the drop counter");
    assert!(dropped.split(' ').nth(1).unwrap().parse::<u64>().unwrap() >= 90, "{dropped}");
}
