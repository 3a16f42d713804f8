//! Backends in the loop, measured (docs/benchmarks.md, "Backends in the loop"):
//! `cargo bench --bench backend` (peer-free; one run prints every row).
//!
//! - **rpc overhead**: the same backend called directly (HTTP/1.1 keep-alive) and through
//!   volley (`rpc` over one WebSocket), each at a fixed 1,000 calls/s for 5 s, latency from
//!   each call's scheduled send time; the overhead is the difference of the percentiles.
//! - **slow backend beside a broadcast**: 100 subscribers hear a 200/s broadcast (20,000
//!   deliveries/s) for 5 s, alone and then while 1,000 rpc calls to a 500 ms backend are in
//!   flight throughout (each answered call is sent again); p99 delivery latency of both.
//! - **connect proxy**: WebSocket connections per second (connect, connect `ack`, close;
//!   8 client threads, closed loop, 3 s) with a JWT in the query and with a connect proxy
//!   deciding instead.
//!
//! The backend is a small thread-per-connection HTTP/1.1 server in this process (a fast one,
//! so what is measured is volley's part); it and the rpc callers run at the lowest priority
//! (nice 19), standing in for other machines on this two-core one. volley is the release
//! binary, its own process, at normal priority (its backend call threads lower their own).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// A backend answering `/rpc` with `{"data": <data>}` (after `data.delay_ms`, if given)
/// and `/connect` with a user; one thread per connection, keep-alive.
fn start_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || serve_backend(stream));
        }
    });
    addr
}

/// Lowers the calling thread's priority: the backend and the rpc callers stand in for other
/// machines, so they must not take the two cores from volley and the broadcast's clients.
fn elsewhere() {
    // SAFETY: setpriority takes no pointers; `0` names the calling thread on Linux.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
}

fn serve_backend(stream: TcpStream) {
    elsewhere();
    let _ = stream.set_nodelay(true);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    while let Some((first_line, body)) = read_http_message(&mut reader) {
        let path = first_line.split(' ').nth(1).unwrap_or("/").to_string();
        let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let answer = if path == "/connect" {
            json!({"user": "bench", "subscribe": [">"], "publish": [">"]})
        } else {
            let data = request["data"].clone();
            if let Some(ms) = data["delay_ms"].as_u64() {
                std::thread::sleep(Duration::from_millis(ms));
            }
            json!({"data": data})
        }
        .to_string();
        let head =
            format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", answer.len());
        if writer.write_all(format!("{head}{answer}").as_bytes()).is_err() {
            return;
        }
    }
}

/// One HTTP/1.1 message from `reader` (a request or a response): its first line and body.
fn read_http_message(reader: &mut impl BufRead) -> Option<(String, Vec<u8>)> {
    let mut first_line = String::new();
    if reader.read_line(&mut first_line).ok()? == 0 {
        return None;
    }
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        if header == "\r\n" {
            break;
        }
        if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((first_line, body))
}

struct Volley(Child, SocketAddr);

impl Drop for Volley {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_volley(settings: &[(&str, String)]) -> Volley {
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["serve", "--listen", &addr.to_string()])
        .env("VOLLEY_LOG_LEVEL", "warn")
        .env("VOLLEY_RATE_PER_SECOND", "1000000")
        .env("VOLLEY_RATE_BURST", "1000000")
        .envs(settings.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .spawn()
        .expect("the release volley binary runs");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "volley did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Volley(child, addr)
}

/// A raw WebSocket client: upgrade, then the connect `ack` read.
fn ws_open(addr: SocketAddr, query: &str) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    write!(
        stream,
        "GET /ws{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "closed during the upgrade");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let rest = buf.split_off(head_end);
    (stream, rest)
}

/// Reads whole server frames from `stream` into `on_text` until it returns false or the
/// stream ends; `pending` is what was already read.
fn read_texts(stream: &mut TcpStream, mut pending: Vec<u8>, mut on_text: impl FnMut(&[u8]) -> bool) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some((first, payload, used)) = volley::bench::next_frame(&pending) {
            let opcode = first & 0x0f;
            if opcode == 1 && !on_text(payload) {
                return;
            }
            if opcode == 8 {
                return;
            }
            pending.drain(..used);
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

fn text_frame(payload: &str) -> Vec<u8> {
    let mut out = Vec::new();
    volley::event::masked_text(payload.as_bytes(), &mut out);
    out
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn percentiles(h: &Histogram<u64>) -> String {
    format!(
        "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} calls)",
        h.value_at_quantile(0.5) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    )
}

/// Open loop at `rate`/s for `seconds`: `send(i)` at each scheduled time on one thread,
/// `receive` on another reports `(i, arrival)`; latency from the schedule.
fn paced(
    rate: u64,
    seconds: u64,
    mut send: impl FnMut(u64) + Send,
    receive: impl FnOnce(&mut dyn FnMut(u64, Instant) -> bool) + Send,
) -> Histogram<u64> {
    let total = rate * seconds;
    let start = Instant::now() + Duration::from_millis(50);
    let scheduled = move |i: u64| start + Duration::from_micros(i * 1_000_000 / rate);
    let histogram = Mutex::new(Histogram::<u64>::new(3).unwrap());
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut seen = 0;
            receive(&mut |i, at| {
                histogram.lock().unwrap().record(micros(at.saturating_duration_since(scheduled(i)))).unwrap();
                seen += 1;
                seen < total
            });
        });
        for i in 0..total {
            let due = scheduled(i);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            send(i);
        }
    });
    histogram.into_inner().unwrap()
}

fn rpc_overhead(backend: SocketAddr) {
    const RATE: u64 = 1000;
    const SECONDS: u64 = 5;
    // Directly: pipelined on one keep-alive connection (answers come in order).
    let stream = TcpStream::connect(backend).unwrap();
    stream.set_nodelay(true).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let direct = paced(
        RATE,
        SECONDS,
        move |i| {
            let body = json!({"client_id": "c", "user": null, "method": "echo", "data": i}).to_string();
            let request = format!(
                "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            writer.write_all(request.as_bytes()).unwrap();
        },
        move |record| {
            let mut reader = BufReader::new(stream);
            while let Some((_, body)) = read_http_message(&mut reader) {
                let answer: Value = serde_json::from_slice(&body).unwrap();
                if !record(answer["data"].as_u64().unwrap(), Instant::now()) {
                    return;
                }
            }
        },
    );
    let volley = start_volley(&[("VOLLEY_PROXY_RPC_URL", format!("http://{backend}/rpc"))]);
    let (stream, pending) = ws_open(volley.1, "");
    let mut writer = stream.try_clone().unwrap();
    let mut reader = stream;
    let cpu = cpu_seconds(volley.0.id());
    let through = paced(
        RATE,
        SECONDS,
        move |i| {
            let request = json!({"type": "request", "message_id": i.to_string(),
                "payload": {"action": "rpc", "method": "echo", "data": i}});
            writer.write_all(&text_frame(&request.to_string())).unwrap();
        },
        move |record| {
            read_texts(&mut reader, pending, |text| {
                let message: Value = serde_json::from_slice(text).unwrap();
                match message["type"].as_str() {
                    Some("response") => record(message["payload"]["data"].as_u64().unwrap(), Instant::now()),
                    Some("error") => panic!("rpc refused: {message}"),
                    _ => true,
                }
            });
        },
    );
    let per_call = (cpu_seconds(volley.0.id()) - cpu) / (RATE * SECONDS) as f64 * 1e6;
    println!("rpc at {RATE}/s for {SECONDS} s, latency from the scheduled send:");
    println!("  backend directly:  {}", percentiles(&direct));
    println!("  through volley:    {}", percentiles(&through));
    let at = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "  overhead:          p50 {:+.3} ms, p99 {:+.3} ms",
        at(&through, 0.5) - at(&direct, 0.5),
        at(&through, 0.99) - at(&direct, 0.99)
    );
    println!("  volley's CPU per call: {per_call:.1} us");
}

/// p99 (ms) of a 200/s broadcast to 100 subscribers over 5 s on `volley`; with `slow_calls`,
/// that many rpc calls of 500 ms are kept in flight throughout by 100 other connections.
fn broadcast_p99(volley: &Volley, slow_calls: usize) -> (f64, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for c in 0..if slow_calls > 0 { 100 } else { 0 } {
        let (stream, pending) = ws_open(volley.1, "");
        let mut writer = stream.try_clone().unwrap();
        let per = slow_calls / 100;
        let call = move |n: u64| {
            json!({"type": "request", "message_id": format!("{c}-{n}"),
                "payload": {"action": "rpc", "method": "slow", "data": {"delay_ms": 500}}})
            .to_string()
        };
        for n in 0..per as u64 {
            writer.write_all(&text_frame(&call(n))).unwrap();
        }
        let (stop, answered) = (stop.clone(), answered.clone());
        let mut reader = stream;
        callers.push(std::thread::spawn(move || {
            elsewhere();
            let mut n = per as u64;
            read_texts(&mut reader, pending, |text| {
                let message: Value = serde_json::from_slice(text).unwrap();
                if message["type"] == "response" {
                    answered.fetch_add(1, Ordering::Relaxed);
                    if !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let _ = writer.write_all(&text_frame(&call(n)));
                    }
                } else if message["type"] == "error" {
                    panic!("rpc refused: {message}");
                }
                !stop.load(Ordering::Relaxed)
            });
        }));
    }
    if slow_calls > 0 {
        // Let the pool grow to the calls in flight before measuring.
        std::thread::sleep(Duration::from_secs(2));
    }
    const SUBSCRIBERS: usize = 100;
    const RATE: u64 = 200;
    const SECONDS: u64 = 5;
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3).unwrap()));
    let mut readers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let (mut stream, pending) = ws_open(volley.1, "");
        stream.write_all(&text_frame(&json!({"type": "subscribe", "payload": {"topics": ["b"]}}).to_string())).unwrap();
        let histogram = histogram.clone();
        readers.push(std::thread::spawn(move || {
            let mut got = 0;
            read_texts(&mut stream, pending, |text| {
                let message: Value = serde_json::from_slice(text).unwrap();
                if message["type"] == "event" {
                    let sent = message["payload"]["data"]["at_us"].as_u64().unwrap();
                    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
                    histogram.lock().unwrap().record(now.saturating_sub(sent)).unwrap();
                    got += 1;
                }
                got < RATE * SECONDS
            });
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (publisher, pending) = ws_open(volley.1, "");
    let mut writer = publisher;
    drop(pending);
    let start = Instant::now();
    for i in 0..RATE * SECONDS {
        // The scheduled time, as wall clock, is the latency's origin.
        let due = start + Duration::from_micros(i * 1_000_000 / RATE);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let at_us = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
            - micros(Instant::now().saturating_duration_since(due));
        let publish =
            json!({"type": "request", "payload": {"action": "publish", "topic": "b", "data": {"at_us": at_us}}});
        writer.write_all(&text_frame(&publish.to_string())).unwrap();
    }
    for reader in readers {
        reader.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let histogram = histogram.lock().unwrap();
    (histogram.value_at_quantile(0.99) as f64 / 1000.0, histogram.len(), answered.load(Ordering::Relaxed))
}

/// CPU seconds the process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum());
    // SAFETY: sysconf takes no pointers.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn slow_backend_beside_broadcast(backend: SocketAddr) {
    let volley = start_volley(&[
        ("VOLLEY_PROXY_RPC_URL", format!("http://{backend}/rpc")),
        ("VOLLEY_PROXY_TIMEOUT_MS", "5000".into()),
    ]);
    let pid = volley.0.id();
    let (cpu, wall) = (cpu_seconds(pid), Instant::now());
    let (alone, delivered_alone, _) = broadcast_p99(&volley, 0);
    let cores_alone = (cpu_seconds(pid) - cpu) / wall.elapsed().as_secs_f64();
    let (cpu, wall) = (cpu_seconds(pid), Instant::now());
    let (beside, delivered_beside, answered) = broadcast_p99(&volley, 1000);
    let cores_beside = (cpu_seconds(pid) - cpu) / wall.elapsed().as_secs_f64();
    println!("broadcast 200/s to 100 subscribers for 5 s, p99 delivery latency from the scheduled publish:");
    println!("  alone:                                   p99 {alone:.3} ms ({delivered_alone} deliveries)");
    println!(
        "  beside 1,000 rpc calls to a 500 ms backend: p99 {beside:.3} ms ({delivered_beside} deliveries; {answered} calls answered meanwhile)"
    );
    println!("  ratio: {:.2}", beside / alone);
    println!(
        "  volley's CPU: {cores_alone:.2} cores alone, {cores_beside:.2} beside the calls ({:.1} us per call answered)",
        (cores_beside - cores_alone).max(0.0) * wall_seconds_per_phase(answered)
    );
}

/// Seconds of wall time per call answered over a phase of 7 s (2 s warm-up + 5 s).
fn wall_seconds_per_phase(answered: u64) -> f64 {
    7.0e6 / answered.max(1) as f64
}

fn connections_per_second(volley: &Volley, query: &str) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (stop, count, addr, query) = (stop.clone(), count.clone(), volley.1, query.to_string());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (mut stream, pending) = ws_open(addr, &query);
                    let mut connected = false;
                    read_texts(&mut stream, pending, |text| {
                        connected = std::str::from_utf8(text).is_ok_and(|t| t.contains("\"connected\""));
                        false
                    });
                    assert!(connected, "the connection was refused");
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn connect_proxy_rate(backend: SocketAddr) {
    let secret = "bench-secret";
    let volley = start_volley(&[
        ("VOLLEY_JWT_SECRET", secret.into()),
        ("VOLLEY_PROXY_CONNECT_URL", format!("http://{backend}/connect")),
    ]);
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "bench", "exp": exp, "subscribe": [">"]}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let jwt = connections_per_second(&volley, &format!("?token={token}"));
    let proxy = connections_per_second(&volley, "");
    println!("WebSocket connections per second (connect, ack, close; 8 threads, closed loop, 3 s):");
    println!("  JWT in the query:  {jwt:.0}/s");
    println!("  connect proxy:     {proxy:.0}/s");
    println!("  ratio (proxy/JWT): {:.2}", proxy / jwt);
}

fn main() {
    // `cargo bench` passes --bench; a test build of the benches (clippy, `cargo test
    // --benches`) runs it without, and a minute of measuring is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let backend = start_backend();
    rpc_overhead(backend);
    slow_backend_beside_broadcast(backend);
    connect_proxy_rate(backend);
}
