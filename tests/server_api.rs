//! The server API against a real broker: disconnecting a user's connections or one client,
//! taking a topic out of a user's subscriptions, paging through the topics with
//! subscribers, and the operators' rule in front of all three.

mod common;

use std::time::Duration;

use common::{Broker, Ws, http, recv_json, send_json, subscribe, ws_connect};
use serde_json::{Value, json};
use tungstenite::Message;

const SECRET: &str = "api-secret";

fn broker() -> Broker {
    Broker::with(|c| c.jwt_secret = SECRET.into())
}

fn user(broker: &Broker, name: &str) -> (Ws, Value) {
    let token = common::token(SECRET, json!({"sub": name, "subscribe": [">"], "publish": [">"]}));
    ws_connect(broker, &format!("/ws?token={token}"))
}

fn api(broker: &Broker, method: &str, path: &str, body: Value) -> (u16, Value) {
    let admin = common::token(SECRET, json!({"sub": "ops", "admin": true, "publish": [">"]}));
    let separator = if path.contains('?') { '&' } else { '?' };
    let (status, _, answer) = http(broker, method, &format!("{path}{separator}token={admin}"), &body.to_string());
    (status, answer)
}

/// The close code and reason the connection gets next (skipping other messages).
fn closed_with(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.read().expect("a close frame") {
            Message::Close(Some(frame)) => return (u16::from(frame.code), frame.reason.to_string()),
            Message::Close(None) => return (1005, String::new()),
            _ => continue,
        }
    }
}

fn still_open(ws: &mut Ws) {
    send_json(ws, &json!({"type": "ping", "message_id": "alive"}));
    assert_eq!(recv_json(ws)["type"], "pong");
}

#[test]
fn disconnect_closes_every_connection_of_a_user_or_one_client() {
    let broker = broker();
    let (mut alice1, _) = user(&broker, "alice");
    let (mut alice2, _) = user(&broker, "alice");
    let (mut bob, bob_ack) = user(&broker, "bob");
    let (status, answer) = api(&broker, "POST", "/api/disconnect", json!({"user": "alice", "reason": "banned"}));
    assert_eq!((status, &answer), (200, &json!({"disconnected": 2})));
    assert_eq!(closed_with(&mut alice1), (4003, "banned".to_string()));
    assert_eq!(closed_with(&mut alice2), (4003, "banned".to_string()));
    still_open(&mut bob);
    let client_id = bob_ack["payload"]["client_id"].as_str().unwrap();
    let (status, answer) = api(&broker, "POST", "/api/disconnect", json!({"client_id": client_id, "code": 4100}));
    assert_eq!((status, &answer), (200, &json!({"disconnected": 1})));
    assert_eq!(closed_with(&mut bob).0, 4100);
    // Nobody left to disconnect.
    assert_eq!(api(&broker, "POST", "/api/disconnect", json!({"user": "alice"})).1, json!({"disconnected": 0}));
}

#[test]
fn bad_calls_are_refused_and_the_operators_rule_holds() {
    let broker = broker();
    for body in
        [json!({}), json!({"user": "a", "client_id": "b"}), json!({"user": "a", "code": 1000}), json!({"usr": "a"})]
    {
        let (status, answer) = api(&broker, "POST", "/api/disconnect", body.clone());
        assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    }
    let (status, answer) = api(&broker, "POST", "/api/unsubscribe", json!({"user": "a", "topic": "chat.*"}));
    assert_eq!((status, answer["error"]["code"].as_str()), (400, Some("invalid_topic")));
    assert_eq!(api(&broker, "GET", "/api/topics?limit=0", json!(null)).0, 400);
    assert_eq!(api(&broker, "GET", "/api/disconnect", json!(null)).0, 405);
    // Without a token, or with one lacking the admin claim.
    let (status, _, _) = http(&broker, "POST", "/api/disconnect", r#"{"user":"a"}"#);
    assert_eq!(status, 401);
    let plain = common::token(SECRET, json!({"sub": "someone"}));
    let (status, _, _) = http(&broker, "POST", &format!("/api/disconnect?token={plain}"), r#"{"user":"a"}"#);
    assert_eq!(status, 403);
    // With an admin listener the routes live there only.
    let admin_port = common::processes::free_port();
    let split = Broker::with(|c| c.admin_listen = format!("127.0.0.1:{admin_port}"));
    let (status, _, _) = http(&split, "GET", "/api/topics", "");
    assert_eq!(status, 404);
    let (status, _, answer) = common::http_to(split.admin_addr.unwrap(), "GET", "/api/topics", "");
    assert_eq!((status, answer), (200, json!({"topics": [], "cursor": null})));
}

#[test]
fn unsubscribe_takes_a_topic_out_of_a_users_subscriptions_and_tells_the_client() {
    let broker = broker();
    let (mut alice, _) = user(&broker, "alice");
    subscribe(&mut alice, json!({"subscription_id": "both", "topics": ["chat.a", "chat.b"]}));
    subscribe(&mut alice, json!({"subscription_id": "only-a", "topics": ["chat.a"]}));
    let (mut bob, _) = user(&broker, "bob");
    subscribe(&mut bob, json!({"topics": ["chat.a"]}));
    let (status, answer) = api(&broker, "POST", "/api/unsubscribe", json!({"user": "alice", "topic": "chat.a"}));
    assert_eq!((status, &answer), (200, &json!({"unsubscribed": 1})));
    let told = recv_json(&mut alice);
    assert_eq!((told["type"].as_str(), &told["payload"]), (Some("unsubscribed"), &json!({"topic": "chat.a"})));
    let events = json!([{"topic": "chat.a", "data": "a"}, {"topic": "chat.b", "data": "b"}]);
    assert_eq!(api(&broker, "POST", "/publish?wait=1", events).0, 200);
    // Bob still hears chat.a; Alice hears only chat.b.
    assert_eq!(recv_json(&mut bob)["payload"]["data"], "a");
    assert_eq!(recv_json(&mut alice)["payload"]["data"], "b");
    send_json(&mut alice, &json!({"type": "request", "message_id": "l", "payload": {"action": "list_subscriptions"}}));
    let list = recv_json(&mut alice);
    assert_eq!(
        list["payload"]["subscriptions"],
        json!([{"subscription_id": "both", "topics": ["chat.b"], "sources": [], "correlation_id": null}])
    );
    // Presence forgot her on chat.a.
    let (_, _, members) = http(
        &broker,
        "GET",
        &format!(
            "/presence/stats?topic=chat.a&token={}",
            common::token(SECRET, json!({"sub": "x", "subscribe": [">"]}))
        ),
        "",
    );
    assert_eq!(members["connections"], 1);
}

#[test]
fn topics_are_paged_in_order_with_their_subscriber_counts() {
    let broker = broker();
    let mut clients = Vec::new();
    for (name, topics) in [("a", vec!["chat.1", "chat.2"]), ("b", vec!["chat.2", "chat.3"]), ("c", vec!["news.1"])] {
        let (mut ws, _) = user(&broker, name);
        subscribe(&mut ws, json!({"topics": topics}));
        clients.push(ws);
    }
    let (status, page) = api(&broker, "GET", "/api/topics?prefix=chat.&limit=2", json!(null));
    assert_eq!(status, 200);
    assert_eq!(
        page,
        json!({"topics": [{"topic": "chat.1", "subscribers": 1}, {"topic": "chat.2", "subscribers": 2}], "cursor": "chat.2"})
    );
    let (_, next) = api(&broker, "GET", "/api/topics?prefix=chat.&limit=2&cursor=chat.2", json!(null));
    assert_eq!(next, json!({"topics": [{"topic": "chat.3", "subscribers": 1}], "cursor": null}));
    let (_, all) = api(&broker, "GET", "/api/topics", json!(null));
    assert_eq!(all["topics"].as_array().unwrap().len(), 4);
    // A closed connection's topics go with it.
    drop(clients.pop());
    std::thread::sleep(Duration::from_millis(200));
    let (_, after) = api(&broker, "GET", "/api/topics?prefix=news.", json!(null));
    assert_eq!(after, json!({"topics": [], "cursor": null}));
}

#[test]
fn a_connection_is_found_by_the_user_its_latest_token_names() {
    let broker = broker();
    // Connected without a token, then authenticated as alice, then as bob.
    let (mut ws, _) = ws_connect(&broker, "/ws");
    for name in ["alice", "bob"] {
        let token = common::token(SECRET, json!({"sub": name, "subscribe": [">"]}));
        send_json(
            &mut ws,
            &json!({"type": "request", "message_id": name, "payload": {"action": "auth", "token": token}}),
        );
        assert_eq!(recv_json(&mut ws)["payload"]["sub"], name);
    }
    assert_eq!(api(&broker, "POST", "/api/disconnect", json!({"user": "alice"})).1, json!({"disconnected": 0}));
    still_open(&mut ws);
    assert_eq!(api(&broker, "POST", "/api/disconnect", json!({"user": "bob"})).1, json!({"disconnected": 1}));
    assert_eq!(closed_with(&mut ws).0, 4003);
}

#[test]
fn disconnect_ends_a_users_sse_streams_with_a_disconnect_event() {
    use std::io::{BufRead, BufReader, Write};
    let broker = broker();
    let token = common::token(SECRET, json!({"sub": "alice", "subscribe": [">"]}));
    let mut stream = std::net::TcpStream::connect(broker.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /sse?topics=chat.a&token={token} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    while !head.ends_with("\r\n\r\n") {
        assert!(reader.read_line(&mut head).unwrap() > 0, "the stream starts: {head}");
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (status, answer) =
        api(&broker, "POST", "/api/disconnect", json!({"user": "alice", "code": 4100, "reason": "bye"}));
    assert_eq!((status, answer), (200, json!({"disconnected": 1})));
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut reader, &mut rest);
    assert!(rest.contains("event: disconnect\ndata: {\"code\":4100,\"reason\":\"bye\"}\n\n"), "{rest:?}");
}
