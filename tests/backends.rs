//! Backends in the loop against a real backend process (tests/backend.py, Python's
//! threading HTTP server): the connect, subscribe, publish and rpc proxies allowing,
//! refusing, replacing, timing out, failing with 5xx and being down; a slow backend under
//! a thousand calls while other clients receive events; the limits on calls in flight;
//! examples/backend.py, the backend README shows.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::processes::{Proc, TestBackend, free_port, wait_for_port};
use common::{Broker, Ws, http, publish, recv_json, send_json, subscribe, ws_connect};
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::http::HeaderValue;
use volley::config::Config;

fn proxied(backend: &TestBackend, tweak: impl FnOnce(&mut Config)) -> Broker {
    Broker::with(|c| {
        c.proxy_rpc_url = backend.url("/rpc");
        c.proxy_publish_url = backend.url("/publish");
        c.proxy_subscribe_url = backend.url("/subscribe");
        tweak(c);
    })
}

fn request(ws: &mut Ws, id: &str, payload: Value) -> Value {
    send_json(ws, &json!({"type": "request", "message_id": id, "payload": payload}));
    let reply = recv_json(ws);
    assert_eq!(reply["correlation_id"], id, "{reply}");
    reply
}

fn rpc(ws: &mut Ws, method: &str, data: Value) -> Value {
    request(ws, method, json!({"action": "rpc", "method": method, "data": data}))
}

fn error_code(reply: &Value) -> &str {
    assert_eq!(reply["type"], "error", "{reply}");
    reply["payload"]["code"].as_str().unwrap()
}

#[test]
fn rpc_answers_refusals_failures_and_timeouts_and_the_connection_stays() {
    let backend = TestBackend::start();
    let broker = proxied(&backend, |c| c.proxy_timeout_ms = 400);
    let (mut ws, _) = ws_connect(&broker, "/ws");
    let answer = rpc(&mut ws, "echo", json!({"n": 1}));
    assert_eq!(answer["type"], "response", "{answer}");
    assert_eq!(answer["payload"], json!({"action": "rpc", "method": "echo", "data": {"echo": {"n": 1}, "user": null}}));
    let refused = rpc(&mut ws, "deny", json!(null));
    assert_eq!(error_code(&refused), "not_allowed", "the backend's own code: {refused}");
    assert_eq!(refused["payload"]["message"], "no deny");
    assert_eq!(error_code(&rpc(&mut ws, "fail", json!(null))), "backend_unavailable");
    assert_eq!(error_code(&rpc(&mut ws, "garbage", json!(null))), "backend_unavailable");
    let started = Instant::now();
    assert_eq!(error_code(&rpc(&mut ws, "hang", json!(null))), "backend_timeout");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(350) && waited < Duration::from_secs(3), "timed out after {waited:?}");
    // Nothing of that closed the connection.
    assert_eq!(rpc(&mut ws, "echo", json!(2))["payload"]["data"]["echo"], 2);
    let (status, _, stats) = http(&broker, "GET", "/stats", "");
    assert_eq!(status, 200);
    assert_eq!(stats["backend"]["calls"]["rpc"], 6, "{}", stats["backend"]);
    assert_eq!(stats["backend"]["timeouts"], 1);
    assert_eq!(stats["backend"]["refused"], 1);
    assert_eq!(stats["backend"]["unavailable"], 2);
}

#[test]
fn rpc_without_a_backend_is_an_unknown_action_and_a_backend_down_is_unavailable() {
    let broker = Broker::start();
    let (mut ws, _) = ws_connect(&broker, "/ws");
    assert_eq!(error_code(&rpc(&mut ws, "echo", json!(1))), "unknown_action");
    drop(broker);
    // Nothing listens on this port.
    let port = free_port();
    let broker = Broker::with(|c| c.proxy_rpc_url = format!("http://127.0.0.1:{port}/rpc"));
    let (mut ws, _) = ws_connect(&broker, "/ws");
    let started = Instant::now();
    assert_eq!(error_code(&rpc(&mut ws, "echo", json!(1))), "backend_unavailable");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(request(&mut ws, "p", json!({"action": "subscription_count"}))["payload"]["count"], 0);
}

#[test]
fn the_publish_proxy_allows_replaces_and_refuses() {
    let backend = TestBackend::start();
    let broker = proxied(&backend, |_| {});
    let (mut reader, _) = ws_connect(&broker, "/ws");
    subscribe(&mut reader, json!({"topics": ["chat.room", "other.t"]}));
    let (mut writer, _) = ws_connect(&broker, "/ws");
    let ask = |ws: &mut Ws, id: &str, topic: &str, data: Value| {
        request(ws, id, json!({"action": "publish", "topic": topic, "data": data}))
    };
    let accepted = ask(&mut writer, "a", "chat.room", json!({"text": "hi", "extra": "dropped"}));
    assert_eq!(accepted["type"], "response", "{accepted}");
    let event = recv_json(&mut reader);
    assert_eq!(event["payload"]["data"], json!({"text": "hi", "checked": true}), "replaced by the backend: {event}");
    assert_eq!(event["message_id"], accepted["payload"]["message_id"]);
    let refused = ask(&mut writer, "b", "chat.room", json!("no text"));
    assert_eq!(error_code(&refused), "forbidden");
    assert_eq!(refused["payload"]["message"], "text is required");
    assert_eq!(error_code(&ask(&mut writer, "c", "deny.x", json!(1))), "forbidden");
    assert_eq!(ask(&mut writer, "d", "other.t", json!([1, 2]))["type"], "response");
    let event = recv_json(&mut reader);
    assert_eq!((event["payload"]["topic"].as_str(), &event["payload"]["data"]), (Some("other.t"), &json!([1, 2])));
    // HTTP /publish is the backend's own path: not proxied.
    publish(&broker, &json!([{"topic": "deny.y", "data": 1}]));
    assert_eq!(backend.get("/calls")["calls"]["/publish"], 4);
}

#[test]
fn the_subscribe_proxy_is_asked_only_for_topics_the_token_does_not_grant() {
    let backend = TestBackend::start();
    let secret = "backend-secret";
    let broker = proxied(&backend, |c| c.jwt_secret = secret.into());
    let token = common::token(secret, json!({"sub": "u1", "subscribe": ["granted.*"], "publish": ["granted.*"]}));
    let (mut ws, _) = ws_connect(&broker, &format!("/ws?token={token}"));
    assert_eq!(subscribe(&mut ws, json!({"subscription_id": "g", "topics": ["granted.a"]}))["status"], "subscribed");
    assert_eq!(backend.get("/calls")["calls"].get("/subscribe"), None, "a granted topic asks nobody");
    assert_eq!(subscribe(&mut ws, json!({"subscription_id": "x", "topics": ["allowed.x"]}))["status"], "subscribed");
    send_json(&mut ws, &json!({"type": "subscribe", "message_id": "y", "payload": {"topics": ["other.y"]}}));
    let refused = recv_json(&mut ws);
    assert_eq!(error_code(&refused), "forbidden");
    assert_eq!(refused["payload"]["message"], "not yours: other.y");
    assert_eq!(backend.get("/calls")["calls"]["/subscribe"], 2);
    // The proxied subscription is a subscription like any other.
    let admin = common::token(secret, json!({"sub": "backend", "publish": [">"]}));
    let (status, _, _) =
        http(&broker, "POST", &format!("/publish?token={admin}"), r#"[{"topic":"allowed.x","data":"to x"}]"#);
    assert_eq!(status, 200);
    let event = recv_json(&mut ws);
    assert_eq!(
        (event["payload"]["topic"].as_str(), event["payload"]["data"].as_str()),
        (Some("allowed.x"), Some("to x"))
    );
    let list = request(&mut ws, "l", json!({"action": "list_subscriptions"}));
    assert_eq!(list["payload"]["subscriptions"].as_array().unwrap().len(), 2);
}

/// Opens a WebSocket with `cookie`; the first message (or the close code when there is none).
fn connect_with_cookie(broker: &Broker, cookie: Option<&str>) -> (Ws, Result<Value, u16>) {
    let mut request = broker.url("/ws").into_client_request().unwrap();
    if let Some(cookie) = cookie {
        request.headers_mut().insert("Cookie", HeaderValue::from_str(cookie).unwrap());
    }
    let (mut ws, _) = tungstenite::connect(request).expect("the upgrade succeeds");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let first = first_message_or_close(&mut ws);
    (ws, first)
}

fn first_message_or_close(ws: &mut Ws) -> Result<Value, u16> {
    let mut error = None;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let message: Value = serde_json::from_str(t.as_str()).unwrap();
                if message["type"] == "error" {
                    error = Some(message);
                    continue;
                }
                return Ok(message);
            }
            Ok(Message::Close(frame)) => {
                assert!(error.is_some(), "a close after the connect proxy says why first");
                return Err(frame.map_or(1005, |f| u16::from(f.code)));
            }
            Ok(_) => continue,
            Err(e) => panic!("read: {e}"),
        }
    }
}

#[test]
fn the_connect_proxy_turns_a_cookie_into_a_grant_and_refuses_without_one() {
    let backend = TestBackend::start();
    let secret = "connect-secret";
    let broker = Broker::with(|c| {
        c.jwt_secret = secret.into();
        c.proxy_connect_url = backend.url("/connect");
        c.proxy_rpc_url = backend.url("/rpc");
    });
    let (mut ws, first) = connect_with_cookie(&broker, Some("theme=dark; session=alice"));
    let ack = first.expect("connected");
    assert_eq!(ack["payload"]["status"], "connected", "{ack}");
    // The answer's grants hold like a token's, and rpc knows the user.
    assert_eq!(subscribe(&mut ws, json!({"topics": ["chat.a"]}))["status"], "subscribed");
    assert_eq!(rpc(&mut ws, "echo", json!(0))["payload"]["data"]["user"], "alice");
    let presence = request(&mut ws, "pr", json!({"action": "presence", "topic": "chat.a"}));
    let members = presence["payload"]["entries"].as_array().unwrap();
    assert_eq!(members[0]["user"], "alice", "{presence}");
    assert_eq!(members[0]["info"], json!({"name": "Alice"}));
    assert_eq!(
        error_code(&request(&mut ws, "pub", json!({"action": "publish", "topic": "room.x", "data": 1}))),
        "forbidden"
    );
    // Refused by the backend, or no session at all: 4001.
    assert_eq!(connect_with_cookie(&broker, Some("session=deny")).1.unwrap_err(), 4001);
    assert_eq!(connect_with_cookie(&broker, None).1.unwrap_err(), 4001);
    // A valid token is not asked about.
    let before = backend.get("/calls")["calls"]["/connect"].as_u64().unwrap();
    let token = common::token(secret, json!({"sub": "t1", "subscribe": [">"]}));
    ws_connect(&broker, &format!("/ws?token={token}"));
    assert_eq!(backend.get("/calls")["calls"]["/connect"].as_u64().unwrap(), before);
}

#[test]
fn a_connect_proxy_that_is_down_closes_with_1011_and_expire_at_closes_with_4001() {
    let backend = TestBackend::start();
    let broker = Broker::with(|c| c.proxy_connect_url = format!("http://127.0.0.1:{}/connect", free_port()));
    assert_eq!(connect_with_cookie(&broker, Some("session=alice")).1.unwrap_err(), 1011);
    drop(broker);
    let broker = Broker::with(|c| c.proxy_connect_url = backend.url("/connect"));
    let (mut ws, first) = connect_with_cookie(&broker, Some("session=expired:1"));
    first.expect("connected");
    let started = Instant::now();
    assert_eq!(first_message_or_close(&mut ws).unwrap_err(), 4001);
    let after = started.elapsed();
    assert!(after < Duration::from_secs(3), "closed {after:?} after connecting, expire_at was 1-2 s away");
}

#[test]
fn calls_in_flight_are_bounded_per_connection_and_per_process() {
    let backend = TestBackend::start();
    let broker = proxied(&backend, |c| {
        c.proxy_max_in_flight = 20;
        c.proxy_max_in_flight_per_connection = 16;
    });
    let (mut first, _) = ws_connect(&broker, "/ws");
    for i in 0..17 {
        send_json(
            &mut first,
            &json!({"type": "request", "message_id": format!("c{i}"),
            "payload": {"action": "rpc", "method": "slow", "data": {"ms": 600}}}),
        );
    }
    let overloaded = recv_json(&mut first);
    assert_eq!((error_code(&overloaded), overloaded["correlation_id"].as_str()), ("overloaded", Some("c16")));
    let (mut second, _) = ws_connect(&broker, "/ws");
    for i in 0..5 {
        send_json(
            &mut second,
            &json!({"type": "request", "message_id": format!("d{i}"),
            "payload": {"action": "rpc", "method": "slow", "data": {"ms": 600}}}),
        );
    }
    // 16 + 4 fill the process's 20; the fifth is refused.
    let refused = recv_json(&mut second);
    assert_eq!((error_code(&refused), refused["correlation_id"].as_str()), ("overloaded", Some("d4")));
    let mut answered = 0;
    for ws in [&mut first, &mut second] {
        let expected = if answered == 0 { 16 } else { 4 };
        for _ in 0..expected {
            assert_eq!(recv_json(ws)["type"], "response");
            answered += 1;
        }
    }
    assert_eq!(answered, 20);
    // Every slot came back.
    assert_eq!(rpc(&mut second, "echo", json!(1))["type"], "response");
}

#[test]
fn a_thousand_calls_to_a_slow_backend_do_not_slow_other_connections_events() {
    let backend = TestBackend::start();
    let broker = proxied(&backend, |_| {});
    let (mut listener, _) = ws_connect(&broker, "/ws");
    subscribe(&mut listener, json!({"topics": ["tick"]}));
    // 1,000 clients, each calling a backend that takes 2 s, all at once (2 s rather than
    // the bench's 500 ms: this test shares the cores with the others running beside it).
    let mut callers: Vec<Ws> = (0..1000).map(|_| ws_connect(&broker, "/ws").0).collect();
    let started = Instant::now();
    for (c, ws) in callers.iter_mut().enumerate() {
        let call = json!({"type": "request", "message_id": c.to_string(),
            "payload": {"action": "rpc", "method": "slow", "data": {"ms": 2000}}});
        ws.send(Message::text(call.to_string())).unwrap();
    }
    // While they wait, events flow: each arrives before any call could be answered.
    for n in 0..5 {
        publish(&broker, &json!([{"topic": "tick", "data": n}]));
        let event = recv_json(&mut listener);
        assert_eq!(event["payload"]["data"], n);
    }
    let events_done = started.elapsed();
    assert!(events_done < Duration::from_millis(1500), "five events took {events_done:?} beside the calls");
    let mut answered = 0;
    for (c, ws) in callers.iter_mut().enumerate() {
        let reply = recv_json(ws);
        assert_eq!(
            (reply["type"].as_str(), reply["correlation_id"].as_str()),
            (Some("response"), Some(&*c.to_string()))
        );
        answered += 1;
    }
    assert_eq!(answered, 1000);
    let took = started.elapsed();
    let at_once = backend.get("/calls")["max_at_once"].as_u64().unwrap();
    // Threads start one after another (about 1 ms each on a busy machine), so the first
    // calls may end before the last begin; one at a time would take 2,000 s.
    assert!(at_once >= 250, "the backend saw at most {at_once} calls at once");
    assert!(took < Duration::from_secs(10), "1,000 calls of 2 s took {took:?}");
}

#[test]
fn the_example_backend_runs_a_chat_with_cookie_sessions() {
    let port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/backend.py");
    let _backend = Proc(
        Command::new("python3").arg(script).arg(port.to_string()).stderr(Stdio::null()).spawn().expect("python3 runs"),
    );
    wait_for_port(port, "examples/backend.py");
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let broker = Broker::with(|c| {
        c.proxy_connect_url = url("/connect");
        c.proxy_subscribe_url = url("/subscribe");
        c.proxy_publish_url = url("/publish");
        c.proxy_rpc_url = url("/rpc");
    });
    assert_eq!(connect_with_cookie(&broker, Some("session=forged")).1.unwrap_err(), 4001);
    let (mut alice, first) = connect_with_cookie(&broker, Some("session=s3cr3t-alice"));
    first.expect("alice connects");
    subscribe(&mut alice, json!({"topics": ["chat.lobby", "private.alice"]}));
    send_json(&mut alice, &json!({"type": "subscribe", "message_id": "b", "payload": {"topics": ["private.bob"]}}));
    assert_eq!(error_code(&recv_json(&mut alice)), "forbidden");
    let (mut bob, _) = connect_with_cookie(&broker, Some("session=s3cr3t-bob"));
    let sent = request(&mut bob, "m", json!({"action": "publish", "topic": "chat.lobby", "data": {"text": "hello"}}));
    assert_eq!(sent["type"], "response", "{sent}");
    let event = recv_json(&mut alice);
    assert_eq!(event["payload"]["data"], json!({"text": "hello", "from": "bob"}));
    assert_eq!(rpc(&mut bob, "add", json!([1, 2, 3]))["payload"]["data"], 6);
}

/// Opens `GET /sse?topics=chat.a` with `cookie`; the status and the reader positioned after
/// the head.
fn sse_with_cookie(broker: &Broker, cookie: &str) -> (u16, std::io::BufReader<std::net::TcpStream>) {
    use std::io::{BufRead, Write};
    let mut stream = std::net::TcpStream::connect(broker.addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /sse?topics=chat.a HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\n\r\n").unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    (status, reader)
}

#[test]
fn the_connect_proxy_decides_an_sse_start_too() {
    use std::io::BufRead;
    let backend = TestBackend::start();
    let secret = "sse-secret";
    let broker = Broker::with(|c| {
        c.jwt_secret = secret.into();
        c.proxy_connect_url = backend.url("/connect");
    });
    let (status, mut stream) = sse_with_cookie(&broker, "session=carol");
    assert_eq!(status, 200, "the answer's grant (chat.>) covers chat.a");
    let admin = common::token(secret, json!({"sub": "ops", "publish": [">"]}));
    let (published, _, _) =
        http(&broker, "POST", &format!("/publish?token={admin}"), r#"{"topic":"chat.a","data":"hi"}"#);
    assert_eq!(published, 200);
    let data = loop {
        let mut line = String::new();
        stream.read_line(&mut line).unwrap();
        if let Some(data) = line.strip_prefix("data: ") {
            break serde_json::from_str::<Value>(data).unwrap();
        }
    };
    assert_eq!(data["payload"]["data"], "hi");
    // Presence shows the answer's user.
    let reader = common::token(secret, json!({"sub": "r", "subscribe": [">"]}));
    let (_, _, members) = http(&broker, "GET", &format!("/presence?topic=chat.a&token={reader}"), "");
    assert_eq!(members["entries"][0]["user"], "carol", "{members}");
    assert_eq!(sse_with_cookie(&broker, "session=deny").0, 401);
    drop(broker);
    let broker = Broker::with(|c| c.proxy_connect_url = format!("http://127.0.0.1:{}/connect", free_port()));
    assert_eq!(sse_with_cookie(&broker, "session=carol").0, 502);
}

#[test]
fn calls_in_flight_count_against_the_connections_state_budget() {
    let backend = TestBackend::start();
    let broker = proxied(&backend, |c| c.max_connection_state_bytes = 8 * 1024);
    let (mut ws, _) = ws_connect(&broker, "/ws");
    let big = "x".repeat(3000);
    let call = |id: &str| {
        json!({"type": "request", "message_id": id,
            "payload": {"action": "rpc", "method": "slow", "data": {"ms": 300, "pad": big}}})
    };
    for id in ["a", "b", "c"] {
        send_json(&mut ws, &call(id));
    }
    // Two calls of about 3 KiB fit in 8 KiB; the third is refused, and nothing was kept.
    let refused = recv_json(&mut ws);
    assert_eq!((error_code(&refused), refused["correlation_id"].as_str()), ("limit_exceeded", Some("c")));
    for _ in 0..2 {
        assert_eq!(recv_json(&mut ws)["type"], "response");
    }
    // Answered calls give their bytes back.
    assert_eq!(rpc(&mut ws, "slow", json!({"ms": 1, "pad": big}))["type"], "response");
}
