//! The operators' routes: `/stats`, `/metrics`, `/dashboard` and `/stats/stream` on
//! `admin_listen` only when it is set, behind an admin token on `listen` when auth is on,
//! and off with `dashboard = false`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

fn status(addr: std::net::SocketAddr, path: &str) -> u16 {
    http_to(addr, "GET", path, "").0
}

#[test]
fn admin_listen_takes_the_operators_routes_and_only_those() {
    let broker = Broker::with(|c| c.admin_listen = "127.0.0.1:0".into());
    let admin = broker.admin_addr.expect("admin_listen bound");
    for path in ["/stats", "/metrics", "/dashboard"] {
        assert_eq!(status(broker.addr, path), 404, "{path} left the public listener");
        assert_eq!(status(admin, path), 200, "{path} on admin_listen");
    }
    for path in ["/history?topics=a", "/presence?topic=a", "/volley.js"] {
        assert_eq!(status(broker.addr, path), 200, "{path} stays public");
        assert_eq!(status(admin, path), 404, "{path} is not an operators' route");
    }
    assert_eq!(status(admin, "/health"), 200, "both answer /health");
    assert_eq!(status(broker.addr, "/health"), 200);
    // The stream pushes /stats as SSE on the admin listener.
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /stats/stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains("\"interval_latency_us\"") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(seen.contains("text/event-stream") && seen.contains("event: stats\ndata: {"), "{seen}");
    // Each stream keeps a copy of the histograms: at most 16 at once, then 503; a closed
    // one frees its place.
    let mut streams: Vec<TcpStream> = (0..15)
        .map(|_| open_stream(admin))
        .map(|(code, s)| {
            assert_eq!(code, 200);
            s
        })
        .collect();
    assert_eq!(open_stream(admin).0, 503, "the seventeenth");
    streams.pop();
    drop(s);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (code, stream) = open_stream(admin);
        if code == 200 {
            streams.push(stream);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a closed stream frees its place");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens `/stats/stream` and reads only the status code.
fn open_stream(addr: std::net::SocketAddr) -> (u16, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /stats/stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    (String::from_utf8_lossy(&head[9..12]).parse().unwrap(), s)
}

#[test]
fn with_auth_on_the_dashboard_needs_an_admin_token() {
    const SECRET: &str = "ops-secret";
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let token = |admin: bool| {
        let claims = json!({"sub": "op", "exp": exp, "admin": admin});
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes()))
            .unwrap()
    };
    let broker = Broker::with(|c| c.jwt_secret = SECRET.into());
    for path in ["/dashboard", "/stats/stream"] {
        assert_eq!(status(broker.addr, path), 401, "{path} without a token");
        assert_eq!(status(broker.addr, &format!("{path}?token={}", token(false))), 403, "{path} without the claim");
    }
    assert_eq!(status(broker.addr, &format!("/dashboard?token={}", token(true))), 200);
    let off = Broker::with(|c| c.dashboard = false);
    assert_eq!(status(off.addr, "/dashboard"), 404);
    assert_eq!(status(off.addr, "/stats/stream"), 404);
    assert_eq!(status(off.addr, "/stats"), 200, "dashboard = false leaves /stats");
}
