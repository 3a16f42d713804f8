//! Clients that try to make a real broker process keep more than it should: a flood of
//! subscriptions carrying sources, and a flood of `stats` requests from clients that never
//! read. Each measures the process's peak resident memory (`VmHWM`) and checks the broker
//! stays responsive.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::processes::{Proc, free_port, wait_for_port};
use serde_json::json;
use tungstenite::Message;

/// A broker process on a free port.
fn broker() -> (Proc, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .env("VOLLEY_LOG_LEVEL", "warn")
        .spawn()
        .unwrap();
    wait_for_port(port, "volley");
    (Proc(child), port)
}

/// Peak resident memory of `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib / 1024.0
}

/// A WebSocket client whose writes give up after a while (the broker stops reading a
/// client that does not read its answers; the attacker then stops too).
fn client(port: u16) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}/ws"), stream).unwrap();
    ws.get_ref().set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    ws
}

/// `GET /health` answered within a second.
fn health_answers(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut text = String::new();
    s.read_to_string(&mut text).is_ok() && text.starts_with("HTTP/1.1 200")
}

#[test]
fn a_flood_of_subscriptions_with_sources_stays_within_the_state_budget() {
    let (process, port) = broker();
    let pid = process.0.id();
    let before = peak_rss_mib(pid);
    let attackers: Vec<_> = (0..20)
        .map(|c| {
            std::thread::spawn(move || {
                let mut ws = client(port);
                let mut limited = 0;
                for s in 0..128 {
                    // What the caps allow: 64 distinct topics and 64 sources of 128 bytes.
                    let topics: Vec<String> = (0..64).map(|t| format!("c{c}.s{s}.t{t}")).collect();
                    let sources: Vec<String> =
                        (0..64).map(|i| format!("{c:04}{s:04}{i:04}{}", "x".repeat(116))).collect();
                    let subscribe = json!({"type": "subscribe", "payload": {"topics": topics, "sources": sources}});
                    // And what they do not: thousands of sources in one subscription (under 64 KiB).
                    let many: Vec<String> = (0..3000).map(|i| format!("s{c}-{s}-{i}")).collect();
                    let flood = json!({"type": "subscribe", "payload": {"topics": ["a"], "sources": many}});
                    for message in [subscribe, flood] {
                        if ws.send(Message::text(message.to_string())).is_err() {
                            return limited;
                        }
                        loop {
                            match ws.read() {
                                Ok(Message::Text(t)) if t.contains("limit_exceeded") => {
                                    limited += 1;
                                    break;
                                }
                                Ok(Message::Text(t)) if t.contains("\"ack\"") || t.contains("error") => break,
                                Ok(_) => {}
                                Err(_) => return limited,
                            }
                        }
                    }
                }
                // Held open while the memory is measured.
                std::thread::sleep(Duration::from_millis(500));
                limited
            })
        })
        .collect();
    let limited: usize = attackers.into_iter().map(|a| a.join().unwrap()).sum();
    let peak = peak_rss_mib(pid);
    assert!(limited >= 20 * 128, "every over-cap subscription refused, and the budget reached: {limited}");
    assert!(peak < 64.0, "peak RSS {peak:.1} MiB (was {before:.1} before the flood)");
    assert!(health_answers(port));
    eprintln!("sources flood: peak RSS {before:.1} -> {peak:.1} MiB, {limited} subscriptions refused limit_exceeded");
}

#[test]
fn a_flood_of_stats_requests_from_clients_that_never_read_is_bounded() {
    let (process, port) = broker();
    let pid = process.0.id();
    let before = peak_rss_mib(pid);
    let flooding = Arc::new(AtomicBool::new(true));
    let attackers: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut ws = client(port);
                let stats = json!({"type": "request", "payload": {"action": "stats"}}).to_string();
                for _ in 0..2000 {
                    // Never reads: once the broker stops reading it, the write times out.
                    if ws.send(Message::text(stats.clone())).is_err() {
                        break;
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            })
        })
        .collect();
    let health = {
        let flooding = flooding.clone();
        std::thread::spawn(move || {
            let mut checks = 0;
            while flooding.load(Ordering::Acquire) {
                let asked = Instant::now();
                assert!(health_answers(port), "/health answered within 1 s during the flood");
                assert!(asked.elapsed() < Duration::from_secs(1));
                checks += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            checks
        })
    };
    for attacker in attackers {
        attacker.join().unwrap();
    }
    flooding.store(false, Ordering::Release);
    let checks = health.join().unwrap();
    let peak = peak_rss_mib(pid);
    assert!(checks > 5, "health was polled during the flood");
    assert!(peak < 128.0, "peak RSS {peak:.1} MiB (was {before:.1} before the flood)");
    eprintln!("stats flood: peak RSS {before:.1} -> {peak:.1} MiB, /health answered {checks} times");
}
