//! The Redis engine against a Redis that stops answering (issue #21, item 5): a real
//! redis-server, SIGSTOPped under publish load, and a broker on it. Publishes are answered
//! within their deadline, `/health` keeps answering and tells the engine is down, and
//! once Redis continues nothing acknowledged is lost.
//!
//! The broker runs in this process (the same server the binary runs, on real sockets),
//! so the test shares the harness's HTTP and WebSocket helpers.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::processes::RedisServer;
use common::*;
use serde_json::{Value, json};
use tungstenite::Message;
use tungstenite::stream::MaybeTlsStream;

const REQUEST_TIMEOUT_MS: u64 = 2000;
/// Answers may come this much after the request deadline on a busy two-core machine.
const SLACK: Duration = Duration::from_millis(1000);
const PAUSE: Duration = Duration::from_secs(10);

/// One publish and how it was answered.
struct Answer {
    status: u16,
    code: String,
    took: Duration,
    ids: Vec<String>,
    at: Instant,
}

/// `/health`'s engine field, and how long the answer took.
struct Health {
    engine: String,
    took: Duration,
    at: Instant,
}

fn key(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').expect("a stream id");
    (a.parse().unwrap(), b.parse().unwrap())
}

fn engine_state(broker: &Broker) -> String {
    let (_, _, body) = http(broker, "GET", "/health", "");
    body["engine"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_paused_redis_neither_hangs_the_broker_nor_loses_acknowledged_events() {
    let redis = RedisServer::start();
    let broker = Arc::new(Broker::with(|c| {
        c.engine = redis.url();
        c.http_request_timeout_ms = REQUEST_TIMEOUT_MS;
    }));
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine_state(&broker) != "up" {
        assert!(Instant::now() < deadline, "engine did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }

    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["stall.*"]}));
    if let MaybeTlsStream::Plain(s) = ws.get_ref() {
        // Longer than the pause: the subscriber hears nothing while Redis is stopped.
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    }
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let received = received.clone();
        std::thread::spawn(move || {
            while let Ok(message) = ws.read() {
                let Message::Text(text) = message else { continue };
                let value: Value = serde_json::from_str(text.as_str()).unwrap();
                if value["type"] == "event" {
                    received.lock().unwrap().push(value["message_id"].as_str().unwrap().to_string());
                }
            }
        });
    }

    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let publishers: Vec<_> = (0..3)
        .map(|thread| {
            let (broker, stop, answers) = (broker.clone(), stop.clone(), answers.clone());
            std::thread::spawn(move || {
                // One publisher waits for delivery (`?wait=1`): its tickets cross the outage too.
                let path = if thread == 0 { "/publish?wait=1" } else { "/publish" };
                let mut n = 0;
                while !stop.load(Ordering::Acquire) {
                    let started = Instant::now();
                    let body = json!({"topic": format!("stall.{thread}"), "data": n}).to_string();
                    let (status, _, body) = http(&broker, "POST", path, &body);
                    let ids = body["message_ids"]
                        .as_array()
                        .map_or_else(Vec::new, |ids| ids.iter().map(|id| id.as_str().unwrap().to_string()).collect());
                    let code = body["error"]["code"].as_str().unwrap_or_default().to_string();
                    answers.lock().unwrap().push(Answer {
                        status,
                        code,
                        took: started.elapsed(),
                        ids,
                        at: Instant::now(),
                    });
                    n += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    let healths = Arc::new(Mutex::new(Vec::<Health>::new()));
    let health = {
        let (broker, stop, healths) = (broker.clone(), stop.clone(), healths.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                let started = Instant::now();
                let (status, _, body) = http(&broker, "GET", "/health", "");
                assert_eq!(status, 200, "{body}");
                let engine = body["engine"].as_str().unwrap_or_default().to_string();
                healths.lock().unwrap().push(Health { engine, took: started.elapsed(), at: Instant::now() });
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    std::thread::sleep(Duration::from_secs(2));
    let paused_at = Instant::now();
    redis.pause();
    std::thread::sleep(PAUSE);
    redis.resume();
    let resumed_at = Instant::now();
    // Health comes back, and publishes succeed again.
    let deadline = resumed_at + Duration::from_secs(10);
    loop {
        let back = engine_state(&broker) == "up"
            && answers.lock().unwrap().iter().any(|a| a.at > resumed_at + SLACK && a.status == 200);
        if back {
            break;
        }
        assert!(Instant::now() < deadline, "engine not back: {}", engine_state(&broker));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    for publisher in publishers {
        publisher.join().unwrap();
    }
    health.join().unwrap();

    let answers = std::mem::take(&mut *answers.lock().unwrap());
    let limit = Duration::from_millis(REQUEST_TIMEOUT_MS) + SLACK;
    for answer in &answers {
        let expected =
            matches!((answer.status, answer.code.as_str()), (200, "") | (503, "engine_unavailable") | (504, "timeout"));
        assert!(expected, "publish answered {} {}", answer.status, answer.code);
        assert!(answer.took <= limit, "a publish took {:?}", answer.took);
    }
    let refused = answers.iter().filter(|a| a.status != 200).count();
    assert!(refused > 0, "the pause was noticed");
    let during = answers.iter().filter(|a| a.at > paused_at + limit && a.at < resumed_at).count();
    assert!(during > 0, "publishes kept being answered during the pause");

    let healths = std::mem::take(&mut *healths.lock().unwrap());
    assert!(healths.iter().all(|h| h.took <= Duration::from_secs(1)), "every /health answered within 1 s");
    let paused = |h: &&Health| h.at > paused_at && h.at < resumed_at;
    assert!(healths.iter().filter(paused).count() > 20, "/health answered throughout the pause");
    let detected = paused_at + Duration::from_millis(REQUEST_TIMEOUT_MS) + SLACK * 2;
    let after_detection: Vec<&Health> = healths.iter().filter(paused).filter(|h| h.at > detected).collect();
    assert!(!after_detection.is_empty());
    assert!(after_detection.iter().all(|h| h.engine == "down"), "the engine is down while Redis is stopped");

    // Every acknowledged event arrives, once, in stream order.
    let mut acknowledged: Vec<String> =
        answers.iter().filter(|a| a.status == 200).flat_map(|a| a.ids.clone()).collect();
    acknowledged.sort_by_key(|id| key(id));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received = received.lock().unwrap().clone();
        assert!(received.windows(2).all(|w| key(&w[0]) < key(&w[1])), "in order, no duplicates");
        let mut missing = acknowledged.iter().filter(|id| received.binary_search_by_key(&key(id), |r| key(r)).is_err());
        let Some(first_missing) = missing.next() else { break };
        assert!(Instant::now() < deadline, "acknowledged {first_missing} never arrived ({} received)", received.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}
