//! `volley bench`: a load generator for any server that speaks PROTOCOL.md.
//!
//! Owns the benchmark client: subscriber connections driven by a few mio event loops (the
//! same reactor design as the broker: no thread per connection), publisher connections
//! that stamp each event with its publish time, end-to-end latency in an hdrhistogram,
//! loss accounting, server memory per connection, and `--compare` runs against volley and
//! the peer baseline in `benches/peers`. It uses only the wire protocol: it must not reach
//! into the broker's modules, so it measures any server the same way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use serde_json::json;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// One topic, every subscriber on it.
    Broadcast,
    /// Subscribers spread over `topics` topics, publishers round-robin over them.
    Fanout,
    /// Subscribed connections that receive nothing: server memory per connection.
    Idle,
    /// Like broadcast, with subscribers over Server-Sent Events.
    Sse,
}

/// A benchmark run's settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// The server, or the nodes of a cluster: subscribers and publishers are spread over
    /// them round-robin, so an event usually crosses nodes.
    pub addrs: Vec<SocketAddr>,
    /// What to measure.
    pub scenario: Scenario,
    /// Subscriber connections.
    pub connections: usize,
    /// Topics (fanout).
    pub topics: usize,
    /// Publisher connections.
    pub publishers: usize,
    /// Publishes per second over all publishers; 0: as fast as a window of 64 in flight per
    /// publisher allows.
    pub rate: u64,
    /// Bytes of padding in each event's data.
    pub payload_bytes: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time publishing before measuring.
    pub warmup: Duration,
    /// Subscriber event loops.
    pub threads: usize,
    /// The server's pid, for memory per connection.
    pub server_pid: Option<u32>,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Maximum.
    pub max: u64,
}

/// What a run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario.
    pub scenario: Scenario,
    /// Who was measured.
    pub server: String,
    /// Subscriber connections.
    pub connections: usize,
    /// Publishes acknowledged inside the measured window.
    pub published: u64,
    /// Deliveries of those publishes that arrived.
    pub delivered: u64,
    /// Deliveries expected (published × subscribers of the topic).
    pub expected: u64,
    /// Deliveries per second in the window.
    pub events_per_sec: f64,
    /// Publish to receive, microseconds.
    pub latency_us: Percentiles,
    /// CPU the harness used, in cores (1.0 = one core busy).
    pub client_cpu_cores: f64,
    /// Server RSS growth per subscribed connection, bytes (idle).
    pub server_rss_per_connection: Option<f64>,
}

impl Report {
    /// Deliveries that did not arrive.
    pub fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn topic_name(scenario: Scenario, i: usize, topics: usize) -> String {
    match scenario {
        Scenario::Fanout => format!("bench.t{}", i % topics.max(1)),
        _ => "bench.all".into(),
    }
}

/// The measured window, in publish-time microseconds.
#[derive(Debug, Clone, Copy)]
struct Window {
    start_us: u64,
    end_us: u64,
}

impl Window {
    fn contains(&self, t: u64) -> bool {
        t >= self.start_us && t < self.end_us
    }
}

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Appends a client (masked) text frame carrying `payload`.
pub fn masked_text(payload: &[u8], out: &mut Vec<u8>) {
    masked_frame(0x1, payload, out);
}

/// Appends a final client (masked) frame with `opcode` carrying `payload`.
pub fn masked_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65_536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
}

/// The publish time stamped in an event's data (`"t":<µs>`; servers may reorder keys).
fn stamped_time(payload: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"t\":";
    static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
    let at = FINDER.find(payload)? + KEY.len();
    let mut value = 0u64;
    let mut digits = 0;
    for &d in payload[at..].iter().take_while(|b| b.is_ascii_digit()) {
        value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

#[derive(Debug, PartialEq, Eq)]
enum Phase {
    Connecting,
    Handshake,
    Connected,
    Subscribing,
    Ready,
    Dead,
}

struct Subscriber {
    stream: TcpStream,
    topic: String,
    phase: Phase,
    buf: Vec<u8>,
    out: Vec<u8>,
}

/// What one subscriber loop measured.
struct LoopResult {
    latency: Histogram<u64>,
    /// Events published inside the window that arrived (loss accounting).
    delivered: u64,
    /// Events that arrived inside the window, whenever published (throughput).
    arrived_in_window: u64,
}

struct Shared {
    ready: AtomicUsize,
    dead: AtomicUsize,
    received: AtomicU64,
    stop: AtomicBool,
}

fn connect(addr: SocketAddr, index: usize) -> io::Result<TcpStream> {
    // One address has about 28,000 ephemeral ports: spread large runs over 127.0.0.x.
    let source = match addr.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => Some(Ipv4Addr::new(127, 0, 0, 1 + (index / 25_000) as u8)),
        _ => None,
    };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    if let Some(source) = source.filter(|_| index >= 25_000) {
        socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let _ = socket.set_tcp_nodelay(true);
    Ok(TcpStream::from_std(socket.into()))
}

fn subscriber_loop(
    opts: Options,
    indexes: Vec<usize>,
    shared: Arc<Shared>,
    window: Arc<std::sync::OnceLock<Window>>,
) -> io::Result<LoopResult> {
    let mut poll = Poll::new()?;
    let mut subs = Vec::with_capacity(indexes.len());
    for (slot, &i) in indexes.iter().enumerate() {
        let mut stream = connect(opts.addrs[i % opts.addrs.len()], i)?;
        poll.registry().register(&mut stream, Token(slot), Interest::READABLE | Interest::WRITABLE)?;
        let topic = topic_name(opts.scenario, i, opts.topics);
        subs.push(Subscriber { stream, topic, phase: Phase::Connecting, buf: Vec::new(), out: Vec::new() });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(io::Error::other)?;
    let mut delivered = 0u64;
    let mut arrived_in_window = 0u64;
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 256 * 1024];
    while !shared.stop.load(Ordering::Relaxed) {
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        for event in events.iter() {
            let sub = &mut subs[event.token().0];
            if sub.phase == Phase::Dead {
                continue;
            }
            if sub.phase == Phase::Connecting && event.is_writable() {
                let request = match opts.scenario {
                    Scenario::Sse => format!("GET /sse?topics={} HTTP/1.1\r\nHost: bench\r\n\r\n", sub.topic),
                    _ => "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_string(),
                };
                sub.out.extend_from_slice(request.as_bytes());
                sub.phase = Phase::Handshake;
            }
            if event.is_readable() {
                let window = window.get().copied();
                let mut counted = 0u64;
                loop {
                    let n = match sub.stream.read(&mut scratch) {
                        Ok(0) => {
                            sub.phase = Phase::Dead;
                            shared.dead.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            sub.phase = Phase::Dead;
                            shared.dead.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    };
                    let now = now_us();
                    let mut on_event = |t: u64| {
                        if window.is_some_and(|w| w.contains(now)) {
                            arrived_in_window += 1;
                        }
                        if window.is_some_and(|w| w.contains(t)) {
                            latency.saturating_record(now.saturating_sub(t).max(1));
                            counted += 1;
                        }
                    };
                    // Frames are parsed where they were read; only a partial tail is kept.
                    if sub.buf.is_empty() {
                        let used = process(sub, &scratch[..n], opts.scenario, &shared, &mut on_event);
                        sub.buf.extend_from_slice(&scratch[used..n]);
                    } else {
                        let mut buf = std::mem::take(&mut sub.buf);
                        buf.extend_from_slice(&scratch[..n]);
                        let used = process(sub, &buf, opts.scenario, &shared, &mut on_event);
                        buf.drain(..used);
                        sub.buf = buf;
                    }
                    // A short read emptied the socket: data arriving later raises a new
                    // edge, so the read that would only say WouldBlock is saved (it halves
                    // the harness's syscalls per delivery).
                    if n < scratch.len() {
                        break;
                    }
                }
                delivered += counted;
                shared.received.fetch_add(counted, Ordering::Relaxed);
            }
            if !sub.out.is_empty() {
                match sub.stream.write(&sub.out) {
                    Ok(n) => {
                        sub.out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => sub.phase = Phase::Dead,
                }
            }
        }
    }
    Ok(LoopResult { latency, delivered, arrived_in_window })
}

/// Consumes whole frames (or SSE lines) from `data`; returns how many bytes it used.
fn process(
    sub: &mut Subscriber,
    data: &[u8],
    scenario: Scenario,
    shared: &Shared,
    on_event: &mut impl FnMut(u64),
) -> usize {
    let mut at = 0;
    if sub.phase == Phase::Handshake {
        let Some(end) = memchr::memmem::find(data, b"\r\n\r\n") else { return 0 };
        let ok = if scenario == Scenario::Sse {
            data.starts_with(b"HTTP/1.1 200")
        } else {
            data.starts_with(b"HTTP/1.1 101")
        };
        at = end + 4;
        if !ok {
            sub.phase = Phase::Dead;
            shared.dead.fetch_add(1, Ordering::Relaxed);
            return at;
        }
        sub.phase = if scenario == Scenario::Sse {
            shared.ready.fetch_add(1, Ordering::Relaxed);
            Phase::Ready
        } else {
            Phase::Connected
        };
    }
    if scenario == Scenario::Sse {
        while let Some(nl) = memchr::memchr(b'\n', &data[at..]) {
            let line = &data[at..at + nl];
            if line.starts_with(b"data: ")
                && let Some(t) = stamped_time(line)
            {
                on_event(t);
            }
            at += nl + 1;
        }
        return at;
    }
    loop {
        let b = &data[at..];
        if b.len() < 2 {
            break;
        }
        let (len, header) = match b[1] & 0x7f {
            126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().unwrap_or_default()) as usize, 10),
            n if n < 126 => (n as usize, 2),
            _ => break,
        };
        if b.len() < header + len {
            break;
        }
        let opcode = b[0] & 0x0f;
        let payload = &b[header..header + len];
        match opcode {
            0x1 => match sub.phase {
                Phase::Ready => {
                    if let Some(t) = stamped_time(payload) {
                        on_event(t);
                    }
                }
                Phase::Connected => {
                    let subscribe = json!({"type": "subscribe", "payload": {"topics": [sub.topic]}}).to_string();
                    masked_text(subscribe.as_bytes(), &mut sub.out);
                    sub.phase = Phase::Subscribing;
                }
                Phase::Subscribing if payload.windows(12).any(|w| w == b"\"subscribed\"") => {
                    sub.phase = Phase::Ready;
                    shared.ready.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            },
            0x9 => {
                // Answer pings so heartbeats do not drop idle benchmark connections.
                sub.out.push(0x8a);
                sub.out.push(0x80 | len as u8);
                sub.out.extend_from_slice(&MASK);
                sub.out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
            }
            0x8 => {
                sub.phase = Phase::Dead;
                shared.dead.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        at += header + len;
    }
    at
}

/// A publisher connection: blocking tungstenite, a window of requests in flight.
fn publisher_loop(
    opts: Options,
    index: usize,
    window: Window,
    stop: Arc<AtomicBool>,
) -> io::Result<HashMap<String, u64>> {
    // Publishers start on the last node, subscribers on the first: in a cluster the
    // first publisher's events all cross nodes.
    let url = format!("ws://{}/ws", opts.addrs[(opts.addrs.len() - 1 + index) % opts.addrs.len()]);
    let (mut ws, _) = tungstenite::connect(url).map_err(io::Error::other)?;
    let _ = ws.read(); // connect ack
    let pad = "x".repeat(opts.payload_bytes.saturating_sub(30));
    let per_publisher_rate = opts.rate as f64 / opts.publishers.max(1) as f64;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut topic_turn = index;
    while !stop.load(Ordering::Relaxed) {
        let batch = if per_publisher_rate > 0.0 {
            let due = (started.elapsed().as_secs_f64() * per_publisher_rate) as u64;
            if due <= sent {
                std::thread::sleep(Duration::from_micros(500));
                continue;
            }
            (due - sent).min(64)
        } else {
            64
        };
        let mut stamps = Vec::with_capacity(batch as usize);
        for _ in 0..batch {
            let topic = topic_name(opts.scenario, topic_turn, opts.topics);
            topic_turn += opts.publishers.max(1);
            let t = now_us();
            let request = format!(
                r#"{{"type":"request","payload":{{"action":"publish","topic":"{topic}","data":{{"t":{t},"p":"{pad}"}}}}}}"#
            );
            ws.write(tungstenite::Message::text(request)).map_err(io::Error::other)?;
            stamps.push((topic, t));
        }
        ws.flush().map_err(io::Error::other)?;
        for (topic, t) in stamps {
            let reply = ws.read().map_err(io::Error::other)?;
            let ok = reply.to_text().map(|r| r.contains("\"response\"")).unwrap_or(false);
            if ok && window.contains(t) {
                *acked.entry(topic).or_default() += 1;
            }
        }
        sent += batch;
    }
    let _ = ws.close(None);
    Ok(acked)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF is always valid.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Runs one scenario against `opts.addrs`.
pub fn run(opts: &Options, server: &str) -> io::Result<Report> {
    if opts.addrs.is_empty() {
        return Err(io::Error::other("no server address"));
    }
    crate::limits::raise_fd_limit();
    let rss_before = opts.server_pid.and_then(rss_bytes);
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        dead: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let window_cell = Arc::new(std::sync::OnceLock::new());
    let cpu_start = cpu_seconds();
    let wall_start = Instant::now();
    let threads = opts.threads.max(1);
    let loops: Vec<_> = (0..threads)
        .map(|t| {
            let indexes: Vec<usize> = (t..opts.connections).step_by(threads).collect();
            let (opts, shared, window) = (opts.clone(), shared.clone(), window_cell.clone());
            std::thread::spawn(move || subscriber_loop(opts, indexes, shared, window))
        })
        .collect();
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    while shared.ready.load(Ordering::Relaxed) + shared.dead.load(Ordering::Relaxed) < opts.connections {
        if Instant::now() > connect_deadline || loops.iter().any(|l| l.is_finished()) {
            break;
        }
        eprint!(
            "\rconnecting: {} ready, {} failed   ",
            shared.ready.load(Ordering::Relaxed),
            shared.dead.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!();
    let ready = shared.ready.load(Ordering::Relaxed);
    let mut rss_per_connection = None;
    if opts.scenario == Scenario::Idle {
        std::thread::sleep(Duration::from_millis(500));
        if let (Some(before), Some(after)) = (rss_before, opts.server_pid.and_then(rss_bytes)) {
            rss_per_connection = Some(after.saturating_sub(before) as f64 / ready.max(1) as f64);
        }
    }
    let start_us = now_us() + opts.warmup.as_micros() as u64;
    let window = Window { start_us, end_us: start_us + opts.duration.as_micros() as u64 };
    let _ = window_cell.set(window);
    let stop_publishers = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = if opts.scenario == Scenario::Idle {
        Vec::new()
    } else {
        (0..opts.publishers.max(1))
            .map(|i| {
                let (opts, stop) = (opts.clone(), stop_publishers.clone());
                std::thread::spawn(move || publisher_loop(opts, i, window, stop))
            })
            .collect()
    };
    let run_for = opts.warmup + if opts.scenario == Scenario::Idle { Duration::ZERO } else { opts.duration };
    let began = Instant::now();
    while began.elapsed() < run_for {
        std::thread::sleep(Duration::from_secs(1).min(run_for.saturating_sub(began.elapsed())));
        eprint!(
            "\r{:>5.1}s  connections {}  events received {}   ",
            began.elapsed().as_secs_f64(),
            ready,
            shared.received.load(Ordering::Relaxed)
        );
    }
    eprintln!();
    stop_publishers.store(true, Ordering::Relaxed);
    let mut acked: HashMap<String, u64> = HashMap::new();
    for publisher in publishers {
        let counts = publisher.join().map_err(|_| io::Error::other("publisher panicked"))??;
        for (topic, n) in counts {
            *acked.entry(topic).or_default() += n;
        }
    }
    // Late deliveries are not lost: wait until arrivals stop (at most 15 s).
    let drain_deadline = Instant::now() + Duration::from_secs(15);
    let mut last = shared.received.load(Ordering::Relaxed);
    while Instant::now() < drain_deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = shared.received.load(Ordering::Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    shared.stop.store(true, Ordering::Relaxed);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(io::Error::other)?;
    let (mut delivered, mut arrived) = (0, 0);
    for handle in loops {
        let result = handle.join().map_err(|_| io::Error::other("subscriber loop panicked"))??;
        latency.add(&result.latency).map_err(io::Error::other)?;
        delivered += result.delivered;
        arrived += result.arrived_in_window;
    }
    let cpu = cpu_seconds() - cpu_start;
    let mut subscribers_per_topic: HashMap<String, u64> = HashMap::new();
    for i in 0..ready {
        *subscribers_per_topic.entry(topic_name(opts.scenario, i, opts.topics)).or_default() += 1;
    }
    let expected = acked.iter().map(|(topic, n)| n * subscribers_per_topic.get(topic).copied().unwrap_or(0)).sum();
    let percentiles = if latency.is_empty() {
        Percentiles::default()
    } else {
        Percentiles {
            p50: latency.value_at_quantile(0.5),
            p90: latency.value_at_quantile(0.9),
            p99: latency.value_at_quantile(0.99),
            p999: latency.value_at_quantile(0.999),
            max: latency.max(),
        }
    };
    Ok(Report {
        scenario: opts.scenario,
        server: server.into(),
        connections: ready,
        published: acked.values().sum(),
        delivered,
        expected,
        events_per_sec: arrived as f64 / opts.duration.as_secs_f64(),
        latency_us: percentiles,
        client_cpu_cores: cpu / wall_start.elapsed().as_secs_f64(),
        server_rss_per_connection: rss_per_connection,
    })
}

/// A server the harness started, stopped on drop.
pub struct Spawned {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

fn wait_listening(addr: SocketAddr) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("nothing listening on {addr}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts this volley binary with limits opened for benchmarking (no rate limit, large
/// queues), or the peer baseline binary.
pub fn spawn(binary: &std::path::Path, volley: bool) -> io::Result<Spawned> {
    let addr = free_addr()?;
    let mut command = Command::new(binary);
    if volley {
        command
            .args(["serve", "--listen", &addr.to_string()])
            .env("VOLLEY_RATE_PER_SECOND", "100000000")
            .env("VOLLEY_RATE_BURST", "100000000")
            .env("VOLLEY_MAX_CONNECTIONS_PER_IP", "1000000")
            .env("VOLLEY_MAX_OUTBOUND_BYTES", "16777216")
            .env("VOLLEY_LOG_LEVEL", "warn");
    } else {
        command.arg(addr.to_string());
    }
    let child = command.stdout(Stdio::null()).spawn()?;
    let spawned = Spawned { child, addr };
    wait_listening(addr)?;
    Ok(spawned)
}

impl Spawned {
    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The human table for reports, with volley/peer ratios when both are given.
pub fn table(reports: &[Report]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | server | conns | published | delivered/s | missing | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | client CPU | RSS/conn |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        let rss = r.server_rss_per_connection.map_or("-".into(), |b| format!("{:.1} KiB", b / 1024.0));
        let l = r.latency_us;
        let _ = writeln!(
            out,
            "| {:?} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            r.scenario,
            r.server,
            r.connections,
            r.published,
            r.events_per_sec,
            r.missing(),
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            r.client_cpu_cores,
            rss
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let Some((volley, others)) = reports.split_first() else { return out };
    for peer in others {
        let names = format!("{}/{}", volley.server, peer.server);
        if let (Some(a), Some(b)) = (volley.server_rss_per_connection, peer.server_rss_per_connection) {
            let _ = writeln!(out, "\n{names}: server memory per connection ×{:.3}", ratio(a, b));
            continue;
        }
        let _ = writeln!(
            out,
            "\n{names}: delivered/s ×{:.2}, p50 ×{:.2}, p99 ×{:.2} (latency: lower is better)",
            ratio(volley.events_per_sec, peer.events_per_sec),
            ratio(volley.latency_us.p50 as f64, peer.latency_us.p50 as f64),
            ratio(volley.latency_us.p99 as f64, peer.latency_us.p99 as f64),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_time_is_found_in_an_event() {
        let event = br#"{"type":"event","message_id":"1-2","payload":{"topic":"a","data":{"t":1234567,"p":"xx"}}}"#;
        assert_eq!(stamped_time(event), Some(1_234_567));
        assert_eq!(stamped_time(b"data: {\"t\":5,"), Some(5));
        assert_eq!(stamped_time(br#"{"type":"event","data":{"p":"x","t":77}}"#), Some(77));
        assert_eq!(stamped_time(b"nothing"), None);
    }
}
