//! `/stats`, `/metrics` (parsed as Prometheus text) and the latency of a client next to a
//! flooding one.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Parses the text exposition format strictly enough to catch malformed output:
/// returns sample name+labels -> value, and checks HELP/TYPE precede every family.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let name = parts.next().unwrap();
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment {line}");
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line}"));
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "bad name {name}");
        let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(typed.contains(name) || typed.contains(family), "{name} without # TYPE");
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(labels.starts_with('{') && labels.ends_with('}'), "bad labels {labels}");
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').expect("label k=v");
                assert!(!k.is_empty() && v.starts_with('"') && v.ends_with('"'), "bad label {pair}");
            }
        }
        assert!(samples.insert(series.to_string(), value).is_none(), "duplicate series {series}");
    }
    samples
}

fn metrics(broker: &Broker) -> HashMap<String, f64> {
    let mut s = TcpStream::connect(broker.addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    parse_prometheus(body)
}

#[test]
fn stats_and_metrics_count_what_happened() {
    let broker = Broker::start();
    let (_, _, empty) = http(&broker, "GET", "/stats", "");
    assert_eq!(empty["latency_us"]["publish_to_write"]["p99"], 0, "empty histograms read 0");

    let (mut ws, _) = ws_connect(&broker, "/ws");
    subscribe(&mut ws, json!({"topics": ["m.*"]}));
    let ids = publish(&broker, &json!([{"topic": "m.a"}, {"topic": "m.b"}, {"topic": "other"}]));
    for id in &ids[..2] {
        let event = recv_json(&mut ws);
        assert_eq!(event["message_id"], id.as_str());
        send_json(&mut ws, &json!({"type": "ack", "payload": {"message_id": id}}));
    }
    send_json(&mut ws, &json!({"type": "request", "message_id": "st", "payload": {"action": "stats"}}));
    let stats = recv_json(&mut ws);
    assert_eq!((stats["type"].as_str(), stats["correlation_id"].as_str()), (Some("response"), Some("st")));
    let stats = &stats["payload"];
    assert_eq!(stats["events"]["published"], 3);
    assert_eq!(stats["events"]["delivered"], 2);
    assert_eq!(stats["connections"]["websocket"], 1);
    assert_eq!(stats["subscriptions"], 1);
    assert_eq!(stats["history"]["events"], 3);
    assert_eq!(stats["shards"].as_array().unwrap().len(), 2);
    assert_eq!(stats["latency_us"]["publish_to_write"]["count"], 2);
    assert_eq!(stats["latency_us"]["publish_to_ack"]["count"], 2);
    for p in ["p50", "p90", "p99", "p999", "max"] {
        assert!(stats["latency_us"]["publish_to_write"][p].as_u64().unwrap() > 0, "{p}");
    }

    let m = metrics(&broker);
    assert_eq!(m["volley_connections{transport=\"websocket\"}"], 1.0);
    assert!(m["volley_connections{transport=\"http\"}"] >= 1.0, "the scrape itself counts");
    assert_eq!(m["volley_events_published_total"], 3.0);
    assert_eq!(m["volley_deliveries_total"], 2.0);
    assert_eq!(m["volley_slow_consumer_disconnects_total"], 0.0);
    assert_eq!(m["volley_dropped_total{reason=\"slow_consumer\"}"], 0.0);
    assert_eq!(m["volley_publish_to_write_seconds_count"], 2.0);
    assert_eq!(m["volley_publish_to_write_seconds_bucket{le=\"+Inf\"}"], 2.0);
    assert!(m["volley_publish_to_write_seconds_sum"] > 0.0);
    let mut buckets: Vec<(f64, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix("volley_publish_to_write_seconds_bucket{le=\"")?.strip_suffix("\"}")?;
            Some((if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() }, *v))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "buckets are cumulative: {buckets:?}");
}

fn ping_rtts(ws: &mut Ws, count: usize) -> Vec<Duration> {
    let mut rtts = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        send_json(ws, &json!({"type": "ping", "payload": {"i": i}}));
        loop {
            let reply = recv_json(ws);
            if reply["type"] == "pong" {
                assert_eq!(reply["payload"]["i"], i);
                break;
            }
        }
        rtts.push(start.elapsed());
        // Stay under the probe's own rate limit (1,000 messages/s).
        std::thread::sleep(Duration::from_millis(1));
    }
    rtts
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[sorted.len() * 99 / 100]
}

#[test]
fn a_flooding_client_leaves_others_latency_alone() {
    let broker = Broker::with(|c| c.shards = 1); // same loop: the hardest case
    let (mut probe, _) = ws_connect(&broker, "/ws");

    // The flooder: a raw socket writing publish requests at 25 times the rate limit while
    // `flooding` is set, reading (and discarding) what comes back so it is not cut off as
    // a slow consumer. Quiet and flooded phases alternate, so both see the same machine.
    let mut flood = TcpStream::connect(broker.addr).unwrap();
    write!(
        flood,
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = Arc::new(AtomicBool::new(false));
    let mut reader = flood.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut sink = [0u8; 65536];
        while reader.read(&mut sink).is_ok_and(|n| n > 0) {}
    });
    let frame = masked_text(
        &json!({"type": "request", "payload": {"action": "publish", "topic": "flood.x", "data": "x".repeat(64)}})
            .to_string(),
    );
    let burst: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 256).collect();
    let (writer_stop, writer_flooding) = (stop.clone(), flooding.clone());
    let writer = std::thread::spawn(move || {
        let mut sent = 0usize;
        while !writer_stop.load(Ordering::Relaxed) {
            if writer_flooding.load(Ordering::Relaxed) {
                if flood.write_all(&burst).is_err() {
                    break;
                }
                sent += 256;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = flood.shutdown(std::net::Shutdown::Both);
        sent
    });
    let (mut quiet, mut flooded) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        flooding.store(false, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        quiet.extend(ping_rtts(&mut probe, 200));
        flooding.store(true, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        flooded.extend(ping_rtts(&mut probe, 200));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = writer.join().unwrap();
    let _ = reader.join();
    quiet.sort();
    flooded.sort();
    let (quiet, flooded) = (p99(&quiet), p99(&flooded));
    let (_, _, stats) = http(&broker, "GET", "/stats", "");
    eprintln!("ping p99 quiet {quiet:?}, flooded {flooded:?}; flooder sent {sent} messages; stats {}", stats["events"]);
    assert!(sent > 5_000, "the flood was real: {sent} messages");
    assert!(stats["events"]["published"].as_u64().unwrap() < sent as u64 / 2, "most of the flood was refused");
    // A floor keeps the timer and scheduler noise of a shared 2-core machine (tens of
    // microseconds) from deciding the ratio.
    let floor = Duration::from_micros(150);
    assert!(flooded <= 2 * quiet.max(floor), "p99 {flooded:?} flooded vs {quiet:?} quiet");
}
