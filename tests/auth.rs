//! JWT auth with real tokens over real WebSocket, SSE and HTTP clients.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::protocol::frame::coding::CloseCode;

const SECRET: &str = "test-secret";

fn token_with(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn exp_in(secs: i64) -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 + secs
}

fn token() -> String {
    token_with(SECRET, json!({"sub": "alice", "exp": exp_in(3600), "subscribe": ["chat.*"], "publish": ["chat.room1"]}))
}

fn broker() -> Broker {
    Broker::with(|c| {
        c.jwt_secret = SECRET.into();
        c.auth_timeout_ms = 400;
    })
}

/// Reads until the close frame and returns its code.
fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match ws.read() {
            Ok(Message::Close(Some(frame))) => return u16::from(frame.code),
            Ok(Message::Close(None)) => return 1005,
            Ok(_) => continue,
            Err(e) => panic!("connection ended without a close frame: {e}"),
        }
    }
}

fn raw_connect(broker: &Broker, path: &str) -> Ws {
    let (ws, _) = tungstenite::connect(broker.url(path)).expect("upgrade succeeds");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    }
    ws
}

#[test]
fn token_in_query_grants_its_patterns_only() {
    let broker = broker();
    let (mut ws, _) = ws_connect(&broker, &format!("/ws?token={}", token()));
    assert_eq!(subscribe(&mut ws, json!({"topics": ["chat.room2"]}))["status"], "subscribed");
    send_json(&mut ws, &json!({"type": "subscribe", "message_id": "m2", "payload": {"topics": ["news.>"]}}));
    let error = recv_json(&mut ws);
    assert_eq!((error["type"].as_str(), error["payload"]["code"].as_str()), (Some("error"), Some("forbidden")));
    assert_eq!(error["correlation_id"], "m2");
    send_json(
        &mut ws,
        &json!({"type": "request", "message_id": "p", "payload": {"action": "publish", "topic": "chat.room2"}}),
    );
    assert_eq!(recv_json(&mut ws)["payload"]["code"], "forbidden");
    send_json(&mut ws, &json!({"type": "ping"}));
    assert_eq!(recv_json(&mut ws)["type"], "pong", "the connection stays after forbidden");
}

#[test]
fn first_message_auth() {
    let broker = broker();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    send_json(&mut ws, &json!({"type": "subscribe", "message_id": "early", "payload": {"topics": ["chat.x"]}}));
    let error = recv_json(&mut ws);
    assert_eq!(error["payload"]["code"], "unauthorized");
    send_json(&mut ws, &json!({"type": "request", "message_id": "a", "payload": {"action": "auth", "token": token()}}));
    let response = recv_json(&mut ws);
    assert_eq!(response["type"], "response");
    assert_eq!(response["correlation_id"], "a");
    assert_eq!(response["payload"]["sub"], "alice");
    assert!(response["payload"]["client_id"].is_string());
    subscribe(&mut ws, json!({"topics": ["chat.x"]}));
}

#[test]
fn bad_tokens_close_with_4001() {
    let broker = broker();
    let expired = token_with(SECRET, json!({"sub": "a", "exp": exp_in(-60), "subscribe": [">"]}));
    let forged = token_with("wrong", json!({"sub": "a", "exp": exp_in(3600), "subscribe": [">"]}));
    let no_sub = token_with(SECRET, json!({"exp": exp_in(3600), "subscribe": [">"]}));
    for bad in [expired.as_str(), forged.as_str(), no_sub.as_str(), "garbage"] {
        let mut ws = raw_connect(&broker, &format!("/ws?token={bad}"));
        assert_eq!(close_code(&mut ws), 4001, "token {bad}");
    }
    let (mut ws, _) = ws_connect(&broker, "/ws");
    send_json(&mut ws, &json!({"type": "request", "payload": {"action": "auth", "token": forged}}));
    assert_eq!(close_code(&mut ws), 4001);
}

#[test]
fn close_code_constant_is_library_range() {
    assert_eq!(u16::from(CloseCode::from(4001)), 4001);
}

#[test]
fn http_publish_needs_a_token_that_allows_the_topic() {
    let broker = broker();
    let body = json!({"topic": "chat.room1", "data": 1}).to_string();
    let (status, head, error) = http(&broker, "POST", "/publish", &body);
    assert_eq!(status, 401, "{head}");
    assert_eq!(error["error"]["code"], "unauthorized");
    let (status, _, _) = http(&broker, "POST", &format!("/publish?token={}", token()), &body);
    assert_eq!(status, 200);
    let (status, _, error) = http(
        &broker,
        "POST",
        &format!("/publish?token={}", token()),
        &json!([{"topic": "chat.room1"}, {"topic": "chat.room2"}]).to_string(),
    );
    assert_eq!(status, 403);
    assert_eq!(error["error"]["field"], "[1].topic");
    let expired = token_with(SECRET, json!({"sub": "a", "exp": exp_in(-60), "publish": [">"]}));
    assert_eq!(http(&broker, "POST", &format!("/publish?token={expired}"), &body).0, 401);
}

#[test]
fn sse_and_history_check_read_patterns() {
    let broker = broker();
    assert_eq!(http(&broker, "GET", "/history?topics=chat.x", "").0, 401);
    assert_eq!(http(&broker, "GET", &format!("/history?topics=news.x&token={}", token()), "").0, 403);
    assert_eq!(http(&broker, "GET", &format!("/history?topics=chat.x&token={}", token()), "").0, 200);
    assert_eq!(http(&broker, "GET", "/sse?topics=chat.x", "").0, 401);
    assert_eq!(http(&broker, "GET", &format!("/sse?topics=news.x&token={}", token()), "").0, 403);
}

#[test]
fn auth_request_when_auth_is_off() {
    let broker = Broker::start();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    send_json(&mut ws, &json!({"type": "request", "payload": {"action": "auth", "token": "anything"}}));
    let response = recv_json(&mut ws);
    assert_eq!(response["type"], "response");
    assert_eq!(response["payload"]["sub"], Value::Null);
}

#[test]
fn http_publish_rate_per_ip_answers_429_with_retry_after() {
    let broker = Broker::with(|c| {
        c.publish_rate_per_ip = 1;
        c.publish_burst_per_ip = 2;
    });
    let body = json!({"topic": "a"}).to_string();
    assert_eq!(http(&broker, "POST", "/publish", &body).0, 200);
    assert_eq!(http(&broker, "POST", "/publish", &body).0, 200);
    let (status, head, error) = http(&broker, "POST", "/publish", &body);
    assert_eq!(status, 429);
    assert!(head.contains("Retry-After: 1"), "{head}");
    assert_eq!(error["error"]["code"], "rate_limited");
}
