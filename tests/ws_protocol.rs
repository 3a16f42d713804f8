//! The WebSocket JSON protocol of docs/protocol.md, one behaviour per test, with a real client.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

fn request(ws: &mut Ws, message_id: &str, payload: Value) -> Value {
    send_json(ws, &json!({"type": "request", "message_id": message_id, "payload": payload}));
    recv_json(ws)
}

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["type"], "error", "{reply}");
    reply["payload"]["code"].as_str().unwrap()
}

#[test]
fn connect_ack_carries_the_session_settings() {
    let broker = Broker::start();
    let (_, ack) = ws_connect(&broker, "/ws");
    let p = &ack["payload"];
    assert_eq!(p["status"], "connected");
    assert!(p["client_id"].as_str().is_some_and(|c| !c.is_empty()));
    assert_eq!((p["heartbeat_interval_ms"].as_u64(), p["reconnect_delay_ms"].as_u64()), (Some(25_000), Some(1_000)));
    assert_eq!(p["max_message_bytes"], 65_536);
    assert!(ack["message_id"].is_string() && ack["timestamp"].is_string());
}

#[test]
fn subscriptions_ids_filters_and_one_delivery_per_event() {
    let broker = Broker::start();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    let made = subscribe(&mut ws, json!({"event_types": ["orders.*"]}));
    assert!(made["subscription_id"].as_str().is_some_and(|s| !s.is_empty()), "server makes an id");
    let mine = subscribe(&mut ws, json!({"subscription_id": "s2", "topics": ["orders.>"], "sources": ["api"]}));
    assert_eq!((mine["subscription_id"].as_str(), mine["recovered"].as_bool()), (Some("s2"), Some(true)));
    subscribe(&mut ws, json!({"subscription_id": "s3", "topics": [">"], "correlation_id": "c9"}));
    let ids = publish(
        &broker,
        &json!([
            {"topic": "orders.new", "source": "api"},
            {"topic": "orders.eu.new", "source": "web"},
            {"topic": "orders.eu.new", "source": "api"},
            {"topic": "other", "correlation_id": "c9"},
            {"topic": "other"},
        ]),
    );
    // orders.new matches all of s1/s2 once; eu.new/web matches nothing (s2 wants api);
    // eu.new/api matches s2; other/c9 matches s3; plain other matches nothing.
    for want in [&ids[0], &ids[2], &ids[3]] {
        assert_eq!(recv_json(&mut ws)["message_id"], want.as_str());
    }
    let listed = request(&mut ws, "l", json!({"action": "list_subscriptions"}));
    assert_eq!(listed["type"], "response");
    assert_eq!(listed["correlation_id"], "l");
    let subs = listed["payload"]["subscriptions"].as_array().unwrap();
    assert_eq!(subs.len(), 3);
    let s2 = subs.iter().find(|s| s["subscription_id"] == "s2").unwrap();
    assert_eq!((s2["topics"].clone(), s2["sources"].clone()), (json!(["orders.>"]), json!(["api"])));
    assert_eq!(request(&mut ws, "c", json!({"action": "subscription_count"}))["payload"]["count"], 3);
}

#[test]
fn unsubscribe_duplicates_and_unknown_ids() {
    let broker = Broker::start();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"subscription_id": "a", "topics": ["t"]}));
    send_json(
        &mut ws,
        &json!({"type": "subscribe", "message_id": "dup", "payload": {"subscription_id": "a", "topics": ["u"]}}),
    );
    let reply = recv_json(&mut ws);
    assert_eq!((error_code(&reply), reply["correlation_id"].as_str()), ("duplicate_subscription", Some("dup")));
    send_json(&mut ws, &json!({"type": "unsubscribe", "message_id": "u1", "payload": {"subscription_id": "a"}}));
    let ack = recv_json(&mut ws);
    assert_eq!((ack["type"].as_str(), ack["payload"]["status"].as_str()), (Some("ack"), Some("unsubscribed")));
    assert_eq!(ack["correlation_id"], "u1");
    send_json(&mut ws, &json!({"type": "unsubscribe", "message_id": "u2", "payload": {"subscription_id": "a"}}));
    assert_eq!(error_code(&recv_json(&mut ws)), "unknown_subscription");
    publish(&broker, &json!({"topic": "t"}));
    send_json(&mut ws, &json!({"type": "ping", "payload": {"after": "publish"}}));
    assert_eq!(recv_json(&mut ws)["type"], "pong", "nothing delivered after unsubscribing");
}

#[test]
fn every_bad_message_gets_its_error_and_the_connection_stays() {
    let broker = Broker::start();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    let cases: Vec<(&str, &str)> = vec![
        ("{not json", "invalid_json"),
        (r#"{"type":"dance","message_id":"m1"}"#, "unknown_type"),
        (r#"{"type":"request","message_id":"m2","payload":{"action":"dance"}}"#, "unknown_action"),
        (r#"{"type":"subscribe","message_id":"m3","payload":{"topics":["a*"]}}"#, "invalid_topic"),
        (r#"{"type":"subscribe","message_id":"m4","payload":{"topics":["a..b"]}}"#, "invalid_topic"),
        (r#"{"type":"request","message_id":"m5","payload":{"action":"publish","topic":"a.>"}}"#, "invalid_topic"),
        (r#"{"type":"unsubscribe","message_id":"m6","payload":{}}"#, "invalid_message"),
        (r#"[1,2]"#, "invalid_message"),
    ];
    for (text, code) in cases {
        ws.send(Message::text(text)).unwrap();
        let reply = recv_json(&mut ws);
        assert_eq!(error_code(&reply), code, "{text}");
        let wanted = serde_json::from_str::<Value>(text).ok().and_then(|v| v["message_id"].as_str().map(String::from));
        assert_eq!(reply["correlation_id"].as_str(), wanted.as_deref(), "{text}");
    }
    ws.send(Message::binary(vec![1, 2, 3])).unwrap();
    assert_eq!(error_code(&recv_json(&mut ws)), "invalid_message");
    send_json(&mut ws, &json!({"type": "ping", "message_id": "p", "payload": {"still": "here"}}));
    let pong = recv_json(&mut ws);
    assert_eq!((pong["type"].as_str(), pong["correlation_id"].as_str()), (Some("pong"), Some("p")));
    assert_eq!(pong["payload"], json!({"still": "here"}));
}

#[test]
fn publish_request_and_client_ack() {
    let broker = Broker::start();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["p.*"]}));
    let reply = request(
        &mut ws,
        "m7",
        json!({"action": "publish", "topic": "p.x", "source": "s", "correlation_id": "k", "data": [1]}),
    );
    assert_eq!((reply["type"].as_str(), reply["correlation_id"].as_str()), (Some("response"), Some("m7")));
    let id = reply["payload"]["message_id"].as_str().unwrap().to_string();
    let event = recv_json(&mut ws);
    assert_eq!(event["message_id"], id.as_str());
    assert_eq!(event["correlation_id"], "k");
    assert_eq!(event["payload"], json!({"topic": "p.x", "source": "s", "data": [1]}));
    send_json(&mut ws, &json!({"type": "ack", "payload": {"message_id": id}}));
    send_json(&mut ws, &json!({"type": "ping"}));
    assert_eq!(recv_json(&mut ws)["type"], "pong", "an ack gets no reply");
}

#[test]
fn too_many_subscriptions() {
    let broker = Broker::with(|c| c.max_subscriptions_per_connection = 2);
    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["a"]}));
    subscribe(&mut ws, json!({"topics": ["b"]}));
    send_json(&mut ws, &json!({"type": "subscribe", "payload": {"topics": ["c"]}}));
    assert_eq!(error_code(&recv_json(&mut ws)), "too_many_subscriptions");
}

fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match ws.read() {
            Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

#[test]
fn sustained_flooding_is_limited_then_closed_with_1008() {
    let broker = Broker::with(|c| {
        c.rate_per_second = 5;
        c.rate_burst = 5;
        c.rate_limit_close_after_ms = 500;
    });
    let (mut ws, _) = ws_connect(&broker, "/ws");
    let mut limited = 0;
    for _ in 0..200 {
        if ws.send(Message::text(json!({"type": "ping"}).to_string())).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let code = loop {
        match ws.read() {
            Ok(Message::Text(t)) if t.as_str().contains("rate_limited") => limited += 1,
            Ok(Message::Close(frame)) => break frame.map(|f| u16::from(f.code)),
            Ok(_) => {}
            Err(e) => panic!("no close frame: {e}"),
        }
    };
    assert!(limited > 0, "rate_limited errors came first");
    assert_eq!(code, Some(1008));
}

#[test]
fn oversized_message_closes_with_1009() {
    let broker = Broker::with(|c| c.max_message_bytes = 1024);
    let (mut ws, _) = ws_connect(&broker, "/ws");
    ws.send(Message::text("x".repeat(2000))).unwrap();
    assert_eq!(close_code(&mut ws), Some(1009));
}

/// A raw socket after a completed upgrade.
fn raw_upgraded(broker: &Broker) -> TcpStream {
    let mut s = TcpStream::connect(broker.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s
}

/// Reads server frames until a close frame; its code.
fn raw_close_code(s: &mut TcpStream) -> Option<u16> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut at = 0;
        while all.len() >= at + 2 {
            let len = (all[at + 1] & 0x7f) as usize;
            let (len, header) = if len == 126 && all.len() >= at + 4 {
                (u16::from_be_bytes([all[at + 2], all[at + 3]]) as usize, 4)
            } else {
                (len, 2)
            };
            if all.len() < at + header + len {
                break;
            }
            if all[at] & 0x0f == 0x8 {
                return Some(u16::from_be_bytes([all[at + header], all[at + header + 1]]));
            }
            at += header + len;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => all.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn framing_violations_close_with_their_codes() {
    let broker = Broker::start();
    // Unmasked client frame: 1002.
    let mut s = raw_upgraded(&broker);
    s.write_all(&[0x81, 0x02, b'h', b'i']).unwrap();
    assert_eq!(raw_close_code(&mut s), Some(1002));
    // Text that is not UTF-8: 1007.
    let mut s = raw_upgraded(&broker);
    s.write_all(&[0x81, 0x82, 0, 0, 0, 0, 0xff, 0xfe]).unwrap();
    assert_eq!(raw_close_code(&mut s), Some(1007));
    // A client close is echoed: 1000.
    let mut s = raw_upgraded(&broker);
    s.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]).unwrap();
    assert_eq!(raw_close_code(&mut s), Some(1000));
}

#[test]
fn batch_mode_wraps_events_byte_identically() {
    let broker = Broker::start();
    let (mut plain, _) = ws_connect(&broker, "/ws");
    subscribe(&mut plain, json!({"topics": ["b"]}));
    let (mut batched, _) = ws_connect(&broker, "/ws?batch=1");
    subscribe(&mut batched, json!({"topics": ["b"]}));
    publish(&broker, &json!([{"topic": "b", "data": 1}, {"topic": "b", "data": 2}, {"topic": "b", "data": 3}]));
    let mut singles = Vec::new();
    for _ in 0..3 {
        match plain.read().unwrap() {
            Message::Text(t) => singles.push(t.as_str().to_string()),
            other => panic!("{other:?}"),
        }
    }
    let mut from_batches = Vec::new();
    while from_batches.len() < 3 {
        let Message::Text(t) = batched.read().unwrap() else { continue };
        let text = t.as_str();
        let v: Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["type"], "batch");
        // Slice the raw elements out of the raw text to compare bytes, not values.
        let start = text.find("\"events\":[").unwrap() + 10;
        let inner = &text[start..text.rfind("]}").unwrap()];
        let count = v["payload"]["events"].as_array().unwrap().len();
        let mut depth = 0;
        let mut begin = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => {
                    if depth == 0 {
                        begin = i;
                    }
                    depth += 1;
                }
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        from_batches.push(inner[begin..=i].to_string());
                    }
                }
                _ => {}
            }
        }
        assert!(count >= 1);
    }
    assert_eq!(from_batches, singles, "batch elements are the event messages, byte for byte");
}

#[test]
fn a_coalescing_window_never_holds_a_closed_loop_publishers_events() {
    // With a long window, events that have no company coming (the inbox is empty) are
    // written at once: a publisher waiting for each delivery never waits for the window.
    let window = Duration::from_millis(300);
    let broker = Broker::with(|c| {
        c.write_coalescing_min_ms = 300;
        c.write_coalescing_max_ms = 300;
    });
    let (mut subscriber, _) = ws_connect(&broker, "/ws");
    subscribe(&mut subscriber, json!({"topics": ["c"]}));
    let (mut publisher, _) = ws_connect(&broker, "/ws");
    let sent = std::time::Instant::now();
    for i in 0..3 {
        let request = json!({"type": "request", "message_id": format!("p{i}"),
            "payload": {"action": "publish", "topic": "c", "data": i}});
        send_json(&mut publisher, &request);
        let reply = recv_json(&mut publisher);
        assert_eq!(
            (reply["type"].as_str(), reply["correlation_id"].as_str()),
            (Some("response"), Some(&*format!("p{i}")))
        );
        assert_eq!(recv_json(&mut subscriber)["payload"]["data"], i, "delivered before the next publish");
    }
    assert!(sent.elapsed() < window, "three round trips took {:?}", sent.elapsed());
}
