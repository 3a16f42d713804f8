//! Presence against a real broker: join and leave as connections subscribe, unsubscribe,
//! close, abort and are dropped as slow consumers; WebSocket and SSE members; counts after
//! each step; auth rules; truncation; patterns are not members.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

fn request(ws: &mut Ws, action: &str, topic: &str) -> Value {
    send_json(ws, &json!({"type": "request", "message_id": "r", "payload": {"action": action, "topic": topic}}));
    loop {
        let reply = recv_json(ws);
        if reply["correlation_id"] == "r" {
            return reply;
        }
    }
}

/// The next `presence` notice (skipping anything else).
fn notice(ws: &mut Ws) -> Value {
    loop {
        let m = recv_json(ws);
        if m["type"] == "presence" {
            return m["payload"].clone();
        }
    }
}

fn stats(broker: &Broker, topic: &str) -> (u64, u64) {
    let (status, _, body) = http(broker, "GET", &format!("/presence/stats?topic={topic}"), "");
    assert_eq!(status, 200, "{body}");
    (body["connections"].as_u64().unwrap(), body["users"].as_u64().unwrap())
}

/// Waits until `topic` has `connections` members (leaves on other shards arrive by inbox).
fn wait_for(broker: &Broker, topic: &str, connections: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats(broker, topic).0 != connections {
        assert!(Instant::now() < deadline, "{topic}: {:?}, want {connections}", stats(broker, topic));
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn member(broker: &Broker, topic: &str) -> (Ws, String) {
    let (mut ws, ack) = ws_connect(broker, "/ws");
    subscribe(&mut ws, json!({"topics": [topic]}));
    (ws, ack["payload"]["client_id"].as_str().unwrap().to_string())
}

#[test]
fn join_and_leave_by_unsubscribe_close_abort_and_slow_consumer() {
    let broker = Broker::with(|c| c.max_outbound_bytes = 64 * 1024);
    let (mut watcher, watcher_id) = ws_connect(&broker, "/ws");
    let watcher_id = watcher_id["payload"]["client_id"].as_str().unwrap().to_string();
    subscribe(&mut watcher, json!({"topics": ["room"], "presence": true, "presence_info": {"name": "watcher"}}));
    let own = notice(&mut watcher);
    assert_eq!((own["action"].as_str(), own["entry"]["client_id"].as_str()), (Some("join"), Some(watcher_id.as_str())));
    assert_eq!(own["entry"]["info"], json!({"name": "watcher"}));
    assert_eq!(stats(&broker, "room"), (1, 0), "auth off: connections, no users");

    // By unsubscribe.
    let (mut a, a_id) = member(&broker, "room");
    let joined = notice(&mut watcher);
    assert_eq!((joined["action"].as_str(), joined["entry"]["client_id"].as_str()), (Some("join"), Some(a_id.as_str())));
    assert_eq!(joined["entry"]["transport"], "websocket");
    assert_eq!(stats(&broker, "room"), (2, 0));
    send_json(&mut a, &json!({"type": "unsubscribe", "payload": {"subscription_id": "sub-1"}}));
    let left = notice(&mut watcher);
    assert_eq!((left["action"].as_str(), left["entry"]["client_id"].as_str()), (Some("leave"), Some(a_id.as_str())));
    assert_eq!(stats(&broker, "room"), (1, 0));

    // By a close frame.
    let (mut b, b_id) = member(&broker, "room");
    assert_eq!(notice(&mut watcher)["entry"]["client_id"], b_id.as_str());
    b.close(None).unwrap();
    let left = notice(&mut watcher);
    assert_eq!((left["action"].as_str(), left["entry"]["client_id"].as_str()), (Some("leave"), Some(b_id.as_str())));
    wait_for(&broker, "room", 1);

    // By an abort (the TCP connection just goes).
    let (c, c_id) = member(&broker, "room");
    assert_eq!(notice(&mut watcher)["entry"]["client_id"], c_id.as_str());
    drop(c);
    let left = notice(&mut watcher);
    assert_eq!((left["action"].as_str(), left["entry"]["client_id"].as_str()), (Some("leave"), Some(c_id.as_str())));
    wait_for(&broker, "room", 1);

    // By the slow-consumer drop: a member that stops reading while 8 MiB are published to it.
    let (mut slow, slow_id) = member(&broker, "room");
    assert_eq!(notice(&mut watcher)["entry"]["client_id"], slow_id.as_str());
    subscribe(&mut slow, json!({"topics": ["firehose"]}));
    for _ in 0..256 {
        publish(&broker, &json!({"topic": "firehose", "data": "y".repeat(32 * 1024)}));
    }
    let left = notice(&mut watcher);
    assert_eq!((left["action"].as_str(), left["entry"]["client_id"].as_str()), (Some("leave"), Some(slow_id.as_str())));
    wait_for(&broker, "room", 1);
}

#[test]
fn sse_members_and_notices() {
    let broker = Broker::start();
    let mut sse = TcpStream::connect(broker.addr).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(sse, "GET /sse?topics=lobby,other.*&presence=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut lines = BufReader::new(sse.try_clone().unwrap());
    let mut next_presence = || -> Value {
        let mut named = false;
        loop {
            let mut line = String::new();
            lines.read_line(&mut line).unwrap();
            if line == "event: presence\n" {
                named = true;
            } else if let Some(data) = line.strip_prefix("data: ").filter(|_| named) {
                return serde_json::from_str(data.trim_end()).unwrap();
            }
        }
    };
    let own = next_presence();
    assert_eq!((own["action"].as_str(), own["entry"]["transport"].as_str()), (Some("join"), Some("sse")));
    let (mut ws, ws_id) = member(&broker, "lobby");
    let joined = next_presence();
    assert_eq!(joined["entry"]["client_id"], ws_id.as_str());
    // The pattern `other.*` makes no membership.
    assert_eq!(stats(&broker, "lobby"), (2, 0));
    let listed = request(&mut ws, "presence", "lobby");
    let mut transports: Vec<&str> =
        listed["payload"]["entries"].as_array().unwrap().iter().map(|e| e["transport"].as_str().unwrap()).collect();
    transports.sort();
    assert_eq!(transports, ["sse", "websocket"]);
    drop(ws);
    assert_eq!(next_presence()["action"], "leave");
    drop((sse, lines));
    wait_for(&broker, "lobby", 0);
}

#[test]
fn reading_presence_lists_truncates_and_refuses_patterns() {
    let broker = Broker::with(|c| c.presence_max_entries = 2);
    let members: Vec<_> = (0..3).map(|_| member(&broker, "big")).collect();
    let (mut reader, _) = ws_connect(&broker, "/ws");
    let listed = request(&mut reader, "presence", "big");
    assert_eq!(listed["type"], "response", "{listed}");
    assert_eq!(listed["payload"]["entries"].as_array().unwrap().len(), 2);
    assert_eq!(listed["payload"]["truncated"], true);
    assert_eq!(request(&mut reader, "presence_stats", "big")["payload"]["connections"], 3);
    let refused = request(&mut reader, "presence", "big.*");
    assert_eq!((refused["type"].as_str(), refused["payload"]["code"].as_str()), (Some("error"), Some("invalid_topic")));
    let (status, _, body) = http(&broker, "GET", "/presence?topic=big", "");
    assert_eq!((status, body["entries"].as_array().unwrap().len(), &body["truncated"]), (200, 2, &json!(true)));
    let (status, _, _) = http(&broker, "GET", "/presence", "");
    assert_eq!(status, 400, "topic is required");
    drop(members);
    wait_for(&broker, "big", 0);
}

#[test]
fn auth_users_info_and_grants() {
    const SECRET: &str = "presence-secret";
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let token = |sub: &str, subscribe: &[&str]| {
        let claims = json!({"sub": sub, "exp": exp, "subscribe": subscribe, "info": {"name": sub}});
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
            .unwrap()
    };
    let broker = Broker::with(|c| c.jwt_secret = SECRET.into());
    let connect = |t: &str| {
        let (mut ws, _) = ws_connect(&broker, &format!("/ws?token={t}"));
        subscribe(&mut ws, json!({"topics": ["chat.room"]}));
        ws
    };
    let ann = token("ann", &["chat.*"]);
    let (_a1, _a2, _bob) = (connect(&ann), connect(&ann), connect(&token("bob", &["chat.*"])));
    let (status, _, body) = http(&broker, "GET", &format!("/presence/stats?topic=chat.room&token={ann}"), "");
    assert_eq!((status, &body["connections"], &body["users"]), (200, &json!(3), &json!(2)), "{body}");
    let (status, _, body) = http(&broker, "GET", &format!("/presence?topic=chat.room&token={ann}"), "");
    assert_eq!(status, 200);
    let mut names: Vec<&str> =
        body["entries"].as_array().unwrap().iter().map(|e| e["info"]["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["ann", "ann", "bob"], "the token's info claim");
    assert_eq!(http(&broker, "GET", "/presence?topic=chat.room", "").0, 401, "no token");
    let outsider = token("eve", &["news.*"]);
    assert_eq!(http(&broker, "GET", &format!("/presence?topic=chat.room&token={outsider}"), "").0, 403);
    let (mut eve, _) = ws_connect(&broker, &format!("/ws?token={outsider}"));
    let refused = request(&mut eve, "presence_stats", "chat.room");
    assert_eq!(refused["payload"]["code"], "forbidden", "{refused}");
}

#[test]
fn one_subscription_names_at_most_64_topics() {
    let broker = Broker::start();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    let topics: Vec<String> = (0..65).map(|i| format!("many.t{i}")).collect();
    send_json(&mut ws, &json!({"type": "subscribe", "message_id": "m", "payload": {"topics": topics}}));
    let reply = recv_json(&mut ws);
    assert_eq!(
        (reply["type"].as_str(), reply["payload"]["code"].as_str()),
        (Some("error"), Some("invalid_topic")),
        "{reply}"
    );
    assert_eq!(stats(&broker, "many.t0"), (0, 0), "nothing joined");
    subscribe(&mut ws, json!({"topics": &topics[..64]}));
    assert_eq!(stats(&broker, "many.t63"), (1, 0));
}
