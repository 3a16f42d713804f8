//! volley.js in headless Chromium: a page on another origin imports the client from the
//! broker and must see every event exactly once and in order while the broker restarts
//! (the Redis engine keeps the ids) and while the broker drops its connection (the
//! `fault-injection` build's drop topic); it falls back to SSE and POST /publish when the WebSocket route is
//! refused; publish acknowledgements resolve; a page with a session cookie and no token gets
//! in through the connect proxy (examples/backend.py), calls rpc, and stops when the server
//! API disconnects it.

mod common;

use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use common::chromium::*;
use common::processes::*;
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// Opens the client page for `scenario` against `broker` (host:port), expecting `expect`
/// events; returns the browser (keep it alive) and the page's reports.
fn open_page(broker: &str, scenario: &str, expect: usize) -> (Browser, Receiver<(String, Value)>) {
    let page = include_str!("browser/client.html")
        .replace("BROKER", broker)
        .replace("SCENARIO", scenario)
        .replace("EXPECT", &expect.to_string());
    let (port, results) = page_server(page);
    (launch(&format!("http://127.0.0.1:{port}/"), &[]), results)
}

fn report(results: &Receiver<(String, Value)>, path: &str) -> Value {
    let (got_path, body) = results.recv_timeout(WAIT).unwrap_or_else(|_| panic!("the page reported {path}"));
    assert_eq!(got_path, path, "the page reported {body}");
    body
}

/// Each of `ids` exactly once and in order, numbered 0..n.
fn assert_exactly_once_in_order(result: &Value, ids: &[String]) {
    let got = result["got"].as_array().unwrap();
    let numbers: Vec<u64> = got.iter().map(|e| e["n"].as_u64().unwrap()).collect();
    assert_eq!(numbers, (0..ids.len() as u64).collect::<Vec<_>>(), "no gap, no duplicate, in order: {result}");
    let got_ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(got_ids, ids.iter().map(String::as_str).collect::<Vec<_>>());
}

/// Every event once and in order, across a disconnection and a reconnection over
/// WebSocket that resumed (no recovery failure).
fn assert_resumed(result: &Value, ids: &[String]) {
    assert_exactly_once_in_order(result, ids);
    let states: Vec<&str> = result["states"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(
        states.contains(&"disconnected") && states.iter().filter(|s| **s == "connected:websocket").count() >= 2,
        "{states:?}"
    );
    assert_eq!(result["recoveryFailed"], 0);
}

#[test]
fn events_flow_without_gap_or_duplicate_while_the_broker_restarts() {
    let redis = RedisServer::start();
    let port = free_port();
    let start = || {
        let child = Command::new(env!("CARGO_BIN_EXE_volley"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--engine", &redis.url()])
            .env("VOLLEY_LOG_LEVEL", "warn")
            .env("VOLLEY_DRAIN_TIMEOUT_MS", "1000")
            .spawn()
            .unwrap();
        wait_for_port(port, "volley");
        Proc(child)
    };
    let mut broker = Some(start());
    let (_browser, results) = open_page(&format!("127.0.0.1:{port}"), "restart", 60);
    let ready = report(&results, "/ready");
    assert_eq!(ready["published"].as_array().unwrap().len(), 3, "publish acknowledgements resolved: {ready}");
    let mut ids = Vec::new();
    for n in 0..60u64 {
        if n == 30 {
            // A graceful restart: the drain closes the WebSocket (1001), the page reconnects
            // with backoff and resumes every subscription from its last event.
            let mut old = broker.take().unwrap();
            assert!(Command::new("kill").args(["-TERM", &old.0.id().to_string()]).status().unwrap().success());
            let _ = old.0.wait();
            broker = Some(start());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let id = loop {
            let (status, _, body) = http_to(
                format!("127.0.0.1:{port}").parse().unwrap(),
                "POST",
                "/publish?wait=1",
                &json!({"topic": "seq.a", "data": {"n": n}}).to_string(),
            );
            if status == 200 {
                break body["message_ids"][0].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "publish {n}: {status} {body}");
            std::thread::sleep(Duration::from_millis(50));
        };
        ids.push(id);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_resumed(&report(&results, "/result"), &ids);
}

#[test]
#[cfg(feature = "fault-injection")]
fn events_flow_without_gap_when_the_broker_drops_the_connection() {
    let broker = Broker::start();
    let (_browser, results) = open_page(&broker.addr.to_string(), "dropped", 60);
    report(&results, "/ready");
    let mut ids = Vec::new();
    for n in 0..60 {
        if n == 30 {
            // Every WebSocket dropped by the broker at once, without a close frame.
            publish(&broker, &json!({"topic": volley::FAULT_DROP_TOPIC, "data": null}));
        }
        ids.extend(publish(&broker, &json!({"topic": "seq.b", "data": {"n": n}})));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_resumed(&report(&results, "/result"), &ids);
}

#[test]
fn falls_back_to_sse_and_post_publish_when_websockets_are_refused() {
    let broker = Broker::start();
    let (_browser, results) = open_page(&broker.addr.to_string(), "fallback", 5);
    let ready = report(&results, "/ready");
    assert_eq!(ready["published"].as_array().unwrap().len(), 3, "POST /publish acknowledgements: {ready}");
    assert!(ready["states"].as_array().unwrap().iter().any(|s| s == "connected:sse"), "{ready}");
    let events: Vec<Value> = (0..5).map(|n| json!({"topic": "seq.c", "data": {"n": n}})).collect();
    let ids = publish(&broker, &json!(events));
    assert_exactly_once_in_order(&report(&results, "/result"), &ids);
}

#[test]
fn the_page_hears_a_join_and_a_leave() {
    let broker = Broker::start();
    let (_browser, results) = open_page(&broker.addr.to_string(), "presence", 0);
    report(&results, "/ready");
    let (mut member, ack) = ws_connect(&broker, "/ws");
    let member_id = ack["payload"]["client_id"].as_str().unwrap().to_string();
    subscribe(&mut member, json!({"topics": ["room.x"]}));
    drop(member);
    let notices = report(&results, "/presence")["notices"].clone();
    let seen: Vec<(&str, &str)> = notices
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["action"].as_str().unwrap(), n["client_id"].as_str().unwrap()))
        .collect();
    assert_eq!(seen, [("join", member_id.as_str()), ("leave", member_id.as_str())], "{notices}");
}

#[test]
fn a_page_with_a_session_cookie_and_no_token_connects_publishes_and_calls_rpc_through_the_backend() {
    let backend_port = free_port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/backend.py");
    let _backend =
        Proc(Command::new("python3").arg(script).arg(backend_port.to_string()).stderr(Stdio::null()).spawn().unwrap());
    wait_for_port(backend_port, "examples/backend.py");
    let url = |path: &str| format!("http://127.0.0.1:{backend_port}{path}");
    // Auth on: without the connect proxy a page with no token could not get in.
    let broker = Broker::with(|c| {
        c.jwt_secret = "only-the-backend-knows".into();
        c.proxy_connect_url = url("/connect");
        c.proxy_publish_url = url("/publish");
        c.proxy_rpc_url = url("/rpc");
    });
    let page = include_str!("browser/backend.html").replace("BROKER", &broker.addr.to_string());
    let (port, results) = page_server(page);
    let _browser = launch(&format!("http://127.0.0.1:{port}/"), &[]);
    let result = report(&results, "/result");
    assert_eq!(result["transport"], "websocket");
    assert_eq!(result["event"], json!({"text": "hello from the page", "from": "alice"}), "{result}");
    assert_eq!(result["sum"], 6);
    assert_eq!(result["refused"], json!({"code": "unknown_method", "message": "reboot"}));
    // The server API disconnects her: the page is told why and does not reconnect.
    let admin = common::token("only-the-backend-knows", json!({"sub": "ops", "admin": true}));
    let (status, _, answer) =
        http(&broker, "POST", &format!("/api/disconnect?token={admin}"), r#"{"user":"alice","reason":"banned"}"#);
    assert_eq!((status, answer), (200, json!({"disconnected": 1})));
    let disconnected = report(&results, "/disconnected");
    assert_eq!(disconnected["closed"], json!({"code": 4003, "reason": "banned", "final": true}), "{disconnected}");
    assert_eq!(disconnected["states"], json!(["disconnected"]), "no reconnect after a final close");
}
