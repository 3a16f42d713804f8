//! `volley bench`: a load generator for any server that speaks docs/protocol.md.
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
    /// TLS handshakes per second (with `--tls`): `threads` clients each connect, complete
    /// a handshake, ask `/health` and close, again and again.
    Handshake,
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
    /// Publishes per second over all publishers, open loop: publish `i` is scheduled at
    /// `start + i / rate` and its latency counts from that time, so a publisher held up by
    /// the server is charged for it (no coordinated omission). 0 with no `closed_loop`:
    /// saturation, as fast as 64 unacknowledged publishes per publisher allow (deep
    /// queues: a regime that flatters batching, labelled as such).
    pub rate: u64,
    /// Closed loop: at most this many undelivered events per subscriber in flight; a
    /// publish waits until the subscribers have caught up.
    pub closed_loop: Option<u64>,
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
    /// Subscribers offer permessage-deflate (`permessage-deflate; client_max_window_bits`,
    /// as browsers do).
    pub deflate: bool,
    /// Subscribers connect over TLS to these addresses instead (publishers stay plain).
    pub tls: Option<TlsTarget>,
    /// Presence churn: joins (and as many leaves) per second while the run is measured, by
    /// subscribing to and unsubscribing from exact topics on 64 kept connections.
    pub churn: u64,
}

/// Where and how subscribers speak TLS.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    /// The server's TLS listeners.
    pub addrs: Vec<SocketAddr>,
    /// Trusts the run's test CA.
    pub config: Arc<rustls::ClientConfig>,
}

/// A test CA and a leaf for `localhost` and `127.0.0.1` in PEM files under a temporary
/// directory (removed on drop): TLS runs of the bench, and the TLS tests.
pub struct Pki {
    /// The directory holding the files.
    pub dir: std::path::PathBuf,
    /// The CA certificate clients trust.
    pub ca: rustls::pki_types::CertificateDer<'static>,
    /// The leaf's chain (PEM).
    pub cert: std::path::PathBuf,
    /// The leaf's private key (PEM).
    pub key: std::path::PathBuf,
    /// The leaf's SubjectPublicKeyInfo (DER), which browsers can be told to trust.
    pub leaf_spki: Vec<u8>,
}

impl Pki {
    /// A new CA and leaf, in a directory named after `name`.
    pub fn new(name: &str) -> io::Result<Self> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = std::env::temp_dir().join(format!("volley-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let ca_key = KeyPair::generate().map_err(io::Error::other)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(io::Error::other)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("volley test CA {name}"));
        let ca = ca_params.self_signed(&ca_key).map_err(io::Error::other)?;
        let key = KeyPair::generate().map_err(io::Error::other)?;
        let params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).map_err(io::Error::other)?;
        let leaf = params.signed_by(&key, &Issuer::new(ca_params, ca_key)).map_err(io::Error::other)?;
        let pki = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: ca.der().clone(),
            leaf_spki: rcgen::PublicKeyData::subject_public_key_info(&key),
            dir,
        };
        std::fs::write(&pki.cert, leaf.pem())?;
        std::fs::write(&pki.key, key.serialize_pem())?;
        std::fs::write(pki.dir.join("ca.pem"), ca.pem())?;
        Ok(pki)
    }

    /// The CA certificate as a PEM file (for curl's `--cacert`).
    pub fn ca_file(&self) -> std::path::PathBuf {
        self.dir.join("ca.pem")
    }

    /// A client configuration trusting only this CA (ALPN `http/1.1`).
    pub fn client_config(&self) -> io::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).map_err(io::Error::other)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    /// How the load was offered: `rate 2000/s`, `closed loop 16`, `saturate`.
    pub load: String,
    /// Publishes per second offered (open loop) or achieved (closed loop, saturation).
    pub offered_per_sec: f64,
    /// Deliveries per second in the window.
    pub events_per_sec: f64,
    /// Publish to receive, microseconds.
    pub latency_us: Percentiles,
    /// CPU the harness used, in cores (1.0 = one core busy).
    pub client_cpu_cores: f64,
    /// CPU the server used during the window, in cores (when its pid is known).
    pub server_cpu_cores: Option<f64>,
    /// Server CPU per delivery in the window, microseconds: what each event costs.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server RSS growth per subscribed connection, bytes (idle).
    pub server_rss_per_connection: Option<f64>,
    /// Bytes the subscribers read per delivery in the window (frames and headers).
    pub wire_bytes_per_delivery: Option<f64>,
}

impl Report {
    /// Deliveries that did not arrive.
    pub fn missing(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }

    /// Everything offered was published and delivered: the publisher kept its schedule
    /// (99 % of the offered rate acknowledged) and nothing is missing.
    pub fn delivered_in_full(&self, window: Duration) -> bool {
        let published_per_sec = self.published as f64 / window.as_secs_f64();
        self.missing() == 0 && published_per_sec >= 0.99 * self.offered_per_sec
    }
}

/// The capacity rule: the highest offered rate up to which every rate tried was delivered
/// in full with p99 at or under `slo`. A rate that met the bound above one that missed it
/// does not count: at a machine's edge a pass after a miss is the run's luck, and counting
/// it put a fan-out capacity at 5,000/s in a sweep that missed at 3,000/s. `rows` are
/// (offered rate, its report), in any order.
pub fn capacity<'r>(rows: impl IntoIterator<Item = (u64, &'r Report)>, window: Duration, slo: Duration) -> Option<u64> {
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_by_key(|(rate, _)| *rate);
    rows.into_iter()
        .take_while(|(_, r)| r.delivered_in_full(window) && r.latency_us.p99 <= slo.as_micros() as u64)
        .map(|(rate, _)| rate)
        .last()
}

/// When each publish of an open-loop publisher is due: `rate` per second from `start_us`
/// (wall-clock microseconds, the unit stamped in events).
#[derive(Debug, Clone, Copy)]
pub struct Pacer {
    start_us: u64,
    rate: f64,
}

impl Pacer {
    /// Publishes at `rate` per second from `start_us`.
    pub fn new(start_us: u64, rate: f64) -> Self {
        Self { start_us, rate }
    }

    /// The scheduled time of publish `i`: stamped in the event, so its latency counts
    /// from when it should have been sent, not from when a stalled publisher got to it.
    pub fn scheduled(&self, i: u64) -> u64 {
        self.start_us + (i as f64 * 1e6 / self.rate) as u64
    }

    /// How many publishes are due at `now_us` (all those scheduled at or before it).
    pub fn due(&self, now_us: u64) -> u64 {
        match now_us.checked_sub(self.start_us) {
            None => 0,
            Some(elapsed) => (elapsed as f64 * self.rate / 1e6) as u64 + 1,
        }
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

/// Inflates what subscribers receive compressed. Every subscriber gets the same compressed
/// bytes for an event, so each thread inflates each distinct message once and recognises
/// the copies (a browser inflates its own copy on its own machine; here the subscribers
/// share two cores with the server, and inflating every copy would measure the harness).
struct Inflate {
    recent: std::collections::VecDeque<(Vec<u8>, Option<u64>)>,
    decompress: flate2::Decompress,
    out: Vec<u8>,
}

impl Inflate {
    fn new() -> Self {
        Self { recent: Default::default(), decompress: flate2::Decompress::new(false), out: Vec::new() }
    }

    /// The publish time stamped in a compressed message.
    fn stamped_time(&mut self, payload: &[u8]) -> Option<u64> {
        if let Some((_, t)) = self.recent.iter().rev().find(|(p, _)| p == payload) {
            return *t;
        }
        self.decompress.reset(false);
        self.out.clear();
        let mut input = payload.to_vec();
        input.extend_from_slice(&crate::deflate::SYNC_TAIL);
        self.out.reserve(input.len() * 4);
        while (self.decompress.total_in() as usize) < input.len() {
            let at = self.decompress.total_in() as usize;
            self.out.reserve(self.out.capacity().max(1024));
            let produced = self.out.len();
            if self.decompress.decompress_vec(&input[at..], &mut self.out, flate2::FlushDecompress::Sync).is_err()
                || (self.decompress.total_in() as usize == at && self.out.len() == produced)
            {
                break;
            }
        }
        let t = stamped_time(&self.out);
        if self.recent.len() == 32 {
            self.recent.pop_front();
        }
        self.recent.push_back((payload.to_vec(), t));
        t
    }
}

struct Subscriber {
    stream: TcpStream,
    /// TLS runs: the client side of the session.
    tls: Option<Box<rustls::ClientConnection>>,
    topic: String,
    phase: Phase,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl Subscriber {
    /// Reads what arrived (plaintext, under TLS) into `buf`; `Ok(0)` at the end.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &mut self.tls else { return self.stream.read(buf) };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if tls.read_tls(&mut self.stream)? == 0 {
                return Ok(0);
            }
            tls.process_new_packets().map_err(io::Error::other)?;
            flush_tls(tls, &mut self.stream)?;
        }
    }

    /// Writes what is queued (through TLS when on).
    fn write_out(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            tls.writer().write_all(&self.out)?;
            self.out.clear();
            return flush_tls(tls, &mut self.stream);
        }
        if !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(n) => drop(self.out.drain(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Pushes a TLS client's pending records to its socket, as far as it takes them.
fn flush_tls(tls: &mut rustls::ClientConnection, stream: &mut impl Write) -> io::Result<()> {
    while tls.wants_write() {
        match tls.write_tls(stream) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What one subscriber loop measured.
struct LoopResult {
    latency: Histogram<u64>,
    /// Events published inside the window that arrived (loss accounting).
    delivered: u64,
    /// Events that arrived inside the window, whenever published (throughput).
    arrived_in_window: u64,
    /// Bytes read inside the window.
    bytes_in_window: u64,
}

struct Shared {
    ready: AtomicUsize,
    dead: AtomicUsize,
    /// Deliveries of events published inside the window.
    received: AtomicU64,
    /// Every delivery, whenever published (closed-loop accounting).
    arrived: AtomicU64,
    /// Deliveries owed for every publish sent (publishes × subscribers of their topic).
    owed: AtomicU64,
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
        let (addrs, tls) = match &opts.tls {
            Some(target) => {
                let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
                let session = rustls::ClientConnection::new(target.config.clone(), name).map_err(io::Error::other)?;
                (&target.addrs, Some(Box::new(session)))
            }
            None => (&opts.addrs, None),
        };
        let mut stream = connect(addrs[i % addrs.len()], i)?;
        poll.registry().register(&mut stream, Token(slot), Interest::READABLE | Interest::WRITABLE)?;
        let topic = topic_name(opts.scenario, i, opts.topics);
        subs.push(Subscriber { stream, tls, topic, phase: Phase::Connecting, buf: Vec::new(), out: Vec::new() });
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(io::Error::other)?;
    let mut delivered = 0u64;
    let mut arrived_in_window = 0u64;
    let mut bytes_in_window = 0u64;
    let mut inflate = Inflate::new();
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
                    _ => format!(
                        "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{}\r\n",
                        if opts.deflate {
                            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                        } else {
                            ""
                        }
                    ),
                };
                sub.out.extend_from_slice(request.as_bytes());
                sub.phase = Phase::Handshake;
            }
            if event.is_readable() {
                let window = window.get().copied();
                let mut counted = 0u64;
                loop {
                    let n = match sub.read(&mut scratch) {
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
                    if window.is_some_and(|w| w.contains(now)) {
                        bytes_in_window += n as u64;
                    }
                    let mut on_event = |t: u64| {
                        shared.arrived.fetch_add(1, Ordering::Relaxed);
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
                        let used = process(sub, &scratch[..n], opts.scenario, &shared, &mut inflate, &mut on_event);
                        sub.buf.extend_from_slice(&scratch[used..n]);
                    } else {
                        let mut buf = std::mem::take(&mut sub.buf);
                        buf.extend_from_slice(&scratch[..n]);
                        let used = process(sub, &buf, opts.scenario, &shared, &mut inflate, &mut on_event);
                        buf.drain(..used);
                        sub.buf = buf;
                    }
                    // A short read emptied the socket: data arriving later raises a new
                    // edge, so the read that would only say WouldBlock is saved (it halves
                    // the harness's syscalls per delivery). Not so under TLS, where a
                    // short read may be the end of one record.
                    if n < scratch.len() && sub.tls.is_none() {
                        break;
                    }
                }
                delivered += counted;
                shared.received.fetch_add(counted, Ordering::Relaxed);
            }
            if sub.write_out().is_err() {
                sub.phase = Phase::Dead;
            }
        }
    }
    Ok(LoopResult { latency, delivered, arrived_in_window, bytes_in_window })
}

/// Consumes whole frames (or SSE lines) from `data`; returns how many bytes it used.
fn process(
    sub: &mut Subscriber,
    data: &[u8],
    scenario: Scenario,
    shared: &Shared,
    inflate: &mut Inflate,
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
    while let Some((first, payload, used)) = next_frame(&data[at..]) {
        match first & 0x0f {
            0x1 => match sub.phase {
                Phase::Ready => {
                    let t = if first & 0x40 != 0 { inflate.stamped_time(payload) } else { stamped_time(payload) };
                    if let Some(t) = t {
                        on_event(t);
                    }
                }
                Phase::Connected => {
                    let subscribe = json!({"type": "subscribe", "payload": {"topics": [sub.topic]}}).to_string();
                    crate::event::masked_text(subscribe.as_bytes(), &mut sub.out);
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
                crate::event::masked_frame(0xA, payload, &mut sub.out);
            }
            0x8 => {
                sub.phase = Phase::Dead;
                shared.dead.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        at += used;
    }
    at
}

/// The next whole unmasked frame in `b`: its first byte (FIN, RSV, opcode), payload, bytes
/// used.
pub fn next_frame(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    if b.len() < 2 {
        return None;
    }
    let (len, header) = match b[1] & 0x7f {
        126 if b.len() >= 4 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
        127 if b.len() >= 10 => (u64::from_be_bytes(b[2..10].try_into().ok()?) as usize, 10),
        n if n < 126 => (n as usize, 2),
        _ => return None,
    };
    if b.len() < header + len {
        return None;
    }
    Some((b[0], &b[header..header + len], header + len))
}

/// A JSON value of about `bytes` bytes that compresses like application data (order lines
/// with varied numbers and a few repeated words, about 3 to 4 to 1 with deflate), not like a
/// run of one letter: the deflate bench's bytes-on-the-wire figure depends on it.
pub fn filler(bytes: usize) -> String {
    const WORDS: [&str; 8] = ["confirmed", "shipped", "warehouse", "express", "standard", "ACME", "Globex", "Initech"];
    let mut state = 0x2545_f491_u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let mut out = String::from("[");
    while out.len() + 2 < bytes {
        if out.len() > 1 {
            out.push(',');
        }
        let (sku, qty, price, word) = (next() % 100_000, next() % 20, next() % 100_000, WORDS[next() as usize % 8]);
        out.push_str(&format!(r#"{{"sku":"SKU-{sku:05}","qty":{qty},"cents":{price},"note":"{word}"}}"#));
    }
    out.push(']');
    out
}

/// What a publisher waits on before each publish.
enum Gate {
    /// Open loop: the pacer's schedule.
    Paced(Pacer),
    /// At most this many deliveries owed and not yet arrived.
    Closed(u64),
    /// At most this many publishes unacknowledged.
    Window(u64),
}

/// A publisher connection: frames written on this thread, acknowledgements read on
/// another, so a publish never waits for the answer to the one before it (open loop).
fn publisher_loop(
    opts: Options,
    index: usize,
    window: Window,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    subscribers_per_topic: Arc<HashMap<String, u64>>,
) -> io::Result<HashMap<String, u64>> {
    // Publishers start on the last node, subscribers on the first: in a cluster the
    // first publisher's events all cross nodes.
    let url = format!("ws://{}/ws", opts.addrs[(opts.addrs.len() - 1 + index) % opts.addrs.len()]);
    let (mut ws, _) = tungstenite::connect(url).map_err(io::Error::other)?;
    let _ = ws.read(); // connect ack
    let tungstenite::stream::MaybeTlsStream::Plain(mut stream) = ws.into_inner() else {
        return Err(io::Error::other("publishers speak plain TCP"));
    };
    stream.set_nodelay(true)?;
    let reader_stream = stream.try_clone()?;
    let in_flight: Arc<std::sync::Mutex<std::collections::VecDeque<(String, u64)>>> = Default::default();
    let acked_count = Arc::new(AtomicU64::new(0));
    let reader = {
        let (in_flight, acked_count, stop) = (in_flight.clone(), acked_count.clone(), stop.clone());
        std::thread::spawn(move || read_acks(reader_stream, window, &in_flight, &acked_count, &stop))
    };
    let pad = filler(opts.payload_bytes.saturating_sub(30));
    let publishers = opts.publishers.max(1) as u64;
    let connections = opts.connections as u64;
    let gate = match (opts.rate, opts.closed_loop) {
        (_, Some(n)) => Gate::Closed(n.max(1) * connections / publishers),
        (0, None) => Gate::Window(64),
        (rate, None) => {
            let per_publisher = rate as f64 / publishers as f64;
            // Publishers interleave their schedules instead of sending together.
            let offset = (index as f64 * 1e6 / rate as f64) as u64;
            Gate::Paced(Pacer::new(now_us() + offset, per_publisher))
        }
    };
    let mut sent = 0u64;
    let mut topic_turn = index;
    let mut frames = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let (batch, stamp) = match &gate {
            Gate::Paced(pacer) => {
                let due = pacer.due(now_us());
                if due <= sent {
                    let wait = pacer.scheduled(sent).saturating_sub(now_us());
                    std::thread::sleep(Duration::from_micros(wait.clamp(50, 1_000)));
                    continue;
                }
                ((due - sent).min(256), None)
            }
            Gate::Closed(limit) => {
                let owed = shared.owed.load(Ordering::Relaxed);
                let arrived = shared.arrived.load(Ordering::Relaxed);
                if owed.saturating_sub(arrived) >= *limit {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
                (1, Some(now_us()))
            }
            Gate::Window(limit) => {
                let open = sent.saturating_sub(acked_count.load(Ordering::Relaxed));
                if open >= *limit {
                    std::thread::sleep(Duration::from_micros(50));
                    continue;
                }
                (*limit - open, Some(now_us()))
            }
        };
        frames.clear();
        let mut stamps = Vec::with_capacity(batch as usize);
        for i in 0..batch {
            let topic = topic_name(opts.scenario, topic_turn, opts.topics);
            topic_turn += publishers as usize;
            let t = match (&gate, stamp) {
                (Gate::Paced(pacer), _) => pacer.scheduled(sent + i),
                (_, Some(t)) => t,
                (_, None) => now_us(),
            };
            let request = format!(
                r#"{{"type":"request","payload":{{"action":"publish","topic":"{topic}","data":{{"t":{t},"p":{pad}}}}}}}"#
            );
            crate::event::masked_text(request.as_bytes(), &mut frames);
            shared.owed.fetch_add(subscribers_per_topic.get(&topic).copied().unwrap_or(0), Ordering::Relaxed);
            stamps.push((topic, t));
        }
        in_flight.lock().map_err(|_| io::Error::other("ack reader panicked"))?.extend(stamps);
        if stream.write_all(&frames).is_err() {
            break;
        }
        sent += batch;
    }
    // Acknowledgements of what was sent still arrive: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while acked_count.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    reader.join().map_err(|_| io::Error::other("ack reader panicked"))?
}

/// Reads a publisher's acknowledgements (answers come in request order) and counts, per
/// topic, those of publishes stamped inside the window.
fn read_acks(
    mut stream: std::net::TcpStream,
    window: Window,
    in_flight: &std::sync::Mutex<std::collections::VecDeque<(String, u64)>>,
    acked_count: &AtomicU64,
    stop: &AtomicBool,
) -> io::Result<HashMap<String, u64>> {
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut buf = Vec::new();
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut scratch) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) && in_flight.lock().map(|q| q.is_empty()).unwrap_or(true) {
                    break;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        buf.extend_from_slice(&scratch[..n]);
        let mut at = 0;
        while let Some((first, payload, used)) = next_frame(&buf[at..]) {
            at += used;
            if first & 0x0f != 0x1 {
                continue;
            }
            let ok = memchr::memmem::find(payload, b"\"type\":\"response\"").is_some();
            let error = memchr::memmem::find(payload, b"\"type\":\"error\"").is_some();
            if !(ok || error) {
                continue;
            }
            let Some((topic, t)) = in_flight.lock().ok().and_then(|mut q| q.pop_front()) else { continue };
            acked_count.fetch_add(1, Ordering::Relaxed);
            if ok && window.contains(t) {
                *acked.entry(topic).or_default() += 1;
            }
        }
        buf.drain(..at);
    }
    Ok(acked)
}

fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// CPU seconds (user + system) process `pid` has used, from /proc.
fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / per_second)
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
    if opts.scenario == Scenario::Handshake {
        return handshakes(opts, server);
    }
    crate::limits::raise_fd_limit();
    let rss_before = opts.server_pid.and_then(rss_bytes);
    let shared = Arc::new(Shared {
        ready: AtomicUsize::new(0),
        dead: AtomicUsize::new(0),
        received: AtomicU64::new(0),
        arrived: AtomicU64::new(0),
        owed: AtomicU64::new(0),
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
    let mut subscribers_per_topic: HashMap<String, u64> = HashMap::new();
    for i in 0..ready {
        *subscribers_per_topic.entry(topic_name(opts.scenario, i, opts.topics)).or_default() += 1;
    }
    let subscribers_per_topic = Arc::new(subscribers_per_topic);
    let start_us = now_us() + opts.warmup.as_micros() as u64;
    let window = Window { start_us, end_us: start_us + opts.duration.as_micros() as u64 };
    let _ = window_cell.set(window);
    let stop_publishers = Arc::new(AtomicBool::new(false));
    // Each churner waits for its joins to be acknowledged by a server that is busy with the
    // broadcast (tens of ms a round trip), so enough of them run to keep the rate.
    const CHURNERS: usize = 64;
    let churners: Vec<_> = (0..usize::from(opts.churn > 0) * CHURNERS)
        .map(|i| {
            let (addr, stop, rate) = (opts.addrs[0], stop_publishers.clone(), opts.churn as f64 / CHURNERS as f64);
            std::thread::spawn(move || churn(addr, i, rate, &stop))
        })
        .collect();
    let publishers: Vec<_> = if opts.scenario == Scenario::Idle {
        Vec::new()
    } else {
        (0..opts.publishers.max(1))
            .map(|i| {
                let (opts, shared, stop, per_topic) =
                    (opts.clone(), shared.clone(), stop_publishers.clone(), subscribers_per_topic.clone());
                std::thread::spawn(move || publisher_loop(opts, i, window, shared, stop, per_topic))
            })
            .collect()
    };
    let measured = opts.scenario != Scenario::Idle;
    let began = Instant::now();
    let progress = |until: Duration| {
        while began.elapsed() < until {
            std::thread::sleep(Duration::from_secs(1).min(until.saturating_sub(began.elapsed())));
            eprint!(
                "\r{:>5.1}s  connections {}  events received {}   ",
                began.elapsed().as_secs_f64(),
                ready,
                shared.received.load(Ordering::Relaxed)
            );
        }
    };
    progress(opts.warmup);
    let server_cpu_start = opts.server_pid.and_then(process_cpu_seconds);
    let arrived_start = shared.arrived.load(Ordering::Relaxed);
    let window_began = Instant::now();
    if measured {
        progress(opts.warmup + opts.duration);
    }
    let server_cpu = server_cpu_start
        .zip(opts.server_pid.and_then(process_cpu_seconds))
        .map(|(start, end)| (end - start, window_began.elapsed().as_secs_f64()));
    let arrived_in_window = shared.arrived.load(Ordering::Relaxed) - arrived_start;
    eprintln!();
    stop_publishers.store(true, Ordering::Relaxed);
    let mut churned = 0;
    for churner in churners {
        churned += churner.join().map_err(|_| io::Error::other("churn thread panicked"))??;
    }
    if opts.churn > 0 {
        eprintln!("churn: {:.0} joins and leaves per second", churned as f64 / began.elapsed().as_secs_f64());
    }
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
    let (mut delivered, mut arrived, mut bytes) = (0, 0, 0);
    for handle in loops {
        let result = handle.join().map_err(|_| io::Error::other("subscriber loop panicked"))??;
        latency.add(&result.latency).map_err(io::Error::other)?;
        delivered += result.delivered;
        arrived += result.arrived_in_window;
        bytes += result.bytes_in_window;
    }
    let cpu = cpu_seconds() - cpu_start;
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
    let published: u64 = acked.values().sum();
    let seconds = opts.duration.as_secs_f64();
    let (load, offered_per_sec) = match (opts.rate, opts.closed_loop) {
        _ if !measured => ("idle".to_string(), 0.0),
        (_, Some(n)) => (format!("closed loop {n}"), published as f64 / seconds),
        (0, None) => ("saturate (deep queues)".to_string(), published as f64 / seconds),
        (rate, None) => (format!("rate {rate}/s"), rate as f64),
    };
    Ok(Report {
        scenario: opts.scenario,
        server: server.into(),
        connections: ready,
        published,
        delivered,
        expected,
        load,
        offered_per_sec,
        events_per_sec: arrived as f64 / seconds,
        latency_us: percentiles,
        client_cpu_cores: cpu / wall_start.elapsed().as_secs_f64(),
        server_cpu_cores: server_cpu.filter(|_| measured).map(|(cpu, wall)| cpu / wall),
        server_cpu_us_per_delivery: server_cpu
            .filter(|_| measured && arrived_in_window > 0)
            .map(|(cpu, _)| cpu * 1e6 / arrived_in_window as f64),
        server_rss_per_connection: rss_per_connection,
        wire_bytes_per_delivery: (measured && arrived > 0).then(|| bytes as f64 / arrived as f64),
    })
}

/// On one connection, subscribes to `bench.presence.<i>` (a join) and unsubscribes (a
/// leave), `rate` times a second (paced), until `stop`; returns how many. Connections are
/// kept, so the run measures presence, not TCP and WebSocket handshakes.
fn churn(addr: SocketAddr, i: usize, rate: f64, stop: &AtomicBool) -> io::Result<u64> {
    let pacer = Pacer::new(now_us(), rate);
    let subscribe = json!({"type": "subscribe", "payload": {"subscription_id": "churn", "topics": [format!("bench.presence.{i}")]}});
    let unsubscribe = json!({"type": "unsubscribe", "payload": {"subscription_id": "churn"}});
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws")).map_err(io::Error::other)?;
    let _ = ws.read(); // connect ack
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        if pacer.due(now_us()) <= done {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for message in [&subscribe, &unsubscribe] {
            ws.send(tungstenite::Message::text(message.to_string())).map_err(io::Error::other)?;
            let _ = ws.read(); // its ack
        }
        done += 1;
    }
    Ok(done)
}

/// TLS handshakes per second: `threads` blocking clients in a closed loop, each handshake
/// followed by one `GET /health` (so the server has finished its side) and a close.
fn handshakes(opts: &Options, server: &str) -> io::Result<Report> {
    let target = opts.tls.clone().ok_or_else(|| io::Error::other("the handshake scenario needs --tls"))?;
    let addr = target.addrs[0];
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let cpu_start = cpu_seconds();
    let wall_start = Instant::now();
    let clients: Vec<_> = (0..opts.threads.max(1))
        .map(|_| {
            let (stop, counting, done, config) = (stop.clone(), counting.clone(), done.clone(), target.config.clone());
            std::thread::spawn(move || -> io::Result<()> {
                let name = rustls::pki_types::ServerName::try_from("localhost").map_err(io::Error::other)?;
                while !stop.load(Ordering::Relaxed) {
                    let socket = std::net::TcpStream::connect(addr)?;
                    socket.set_nodelay(true)?;
                    let session =
                        rustls::ClientConnection::new(config.clone(), name.clone()).map_err(io::Error::other)?;
                    let mut tls = rustls::StreamOwned::new(session, socket);
                    tls.write_all(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
                    let mut answer = Vec::new();
                    let _ = tls.read_to_end(&mut answer);
                    if answer.starts_with(b"HTTP/1.1 200") && counting.load(Ordering::Relaxed) {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    std::thread::sleep(opts.warmup);
    let server_cpu_start = opts.server_pid.and_then(process_cpu_seconds);
    counting.store(true, Ordering::Relaxed);
    std::thread::sleep(opts.duration);
    counting.store(false, Ordering::Relaxed);
    let server_cpu = server_cpu_start.zip(opts.server_pid.and_then(process_cpu_seconds)).map(|(a, b)| b - a);
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().map_err(|_| io::Error::other("handshake client panicked"))??;
    }
    let count = done.load(Ordering::Relaxed);
    let seconds = opts.duration.as_secs_f64();
    Ok(Report {
        scenario: Scenario::Handshake,
        server: server.into(),
        connections: opts.threads,
        published: 0,
        delivered: count,
        expected: count,
        load: format!("closed loop {} clients", opts.threads),
        offered_per_sec: 0.0,
        events_per_sec: count as f64 / seconds,
        latency_us: Percentiles::default(),
        client_cpu_cores: (cpu_seconds() - cpu_start) / wall_start.elapsed().as_secs_f64(),
        server_cpu_cores: server_cpu.map(|c| c / seconds),
        server_cpu_us_per_delivery: server_cpu.filter(|_| count > 0).map(|c| c * 1e6 / count as f64),
        server_rss_per_connection: None,
        wire_bytes_per_delivery: None,
    })
}

/// A server the harness started, stopped on drop.
pub struct Spawned {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it listens for TLS, if asked to.
    pub tls_addr: Option<SocketAddr>,
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
pub fn spawn(binary: &std::path::Path, volley: bool, cpus: Option<&str>, pki: Option<&Pki>) -> io::Result<Spawned> {
    let addr = free_addr()?;
    let tls_addr = match pki {
        Some(_) if volley => Some(free_addr()?),
        _ => None,
    };
    let mut command = match cpus {
        Some(cpus) => {
            let mut taskset = Command::new("taskset");
            taskset.args(["-c", cpus]).arg(binary);
            taskset
        }
        None => Command::new(binary),
    };
    if volley {
        command
            .args(["serve", "--listen", &addr.to_string()])
            .env("VOLLEY_RATE_PER_SECOND", "100000000")
            .env("VOLLEY_RATE_BURST", "100000000")
            .env("VOLLEY_MAX_CONNECTIONS_PER_IP", "1000000")
            .env("VOLLEY_MAX_OUTBOUND_BYTES", "16777216")
            .env("VOLLEY_LOG_LEVEL", "warn");
        if let (Some(pki), Some(tls_addr)) = (pki, tls_addr) {
            command
                .env("VOLLEY_TLS_CERT", &pki.cert)
                .env("VOLLEY_TLS_KEY", &pki.key)
                .env("VOLLEY_LISTEN_TLS", tls_addr.to_string());
        }
    } else {
        command.arg(addr.to_string());
    }
    let child = command.stdout(Stdio::null()).spawn()?;
    let spawned = Spawned { child, addr, tls_addr };
    wait_listening(addr)?;
    Ok(spawned)
}

impl Spawned {
    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// One report as a row of [`table`].
pub fn row(r: &Report) -> String {
    let rss = r.server_rss_per_connection.map_or("-".into(), |b| format!("{:.1} KiB", b / 1024.0));
    let server_cpu = r.server_cpu_cores.map_or("-".into(), |c| format!("{c:.2}"));
    let per_delivery = r.server_cpu_us_per_delivery.map_or("-".into(), |c| format!("{c:.3}"));
    let wire = r.wire_bytes_per_delivery.map_or("-".into(), |b| format!("{b:.0}"));
    let l = r.latency_us;
    format!(
        "| {:?} | {} | {} | {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |\n",
        r.scenario,
        r.load,
        r.server,
        r.connections,
        r.offered_per_sec,
        r.events_per_sec,
        r.missing(),
        l.p50,
        l.p99,
        l.p999,
        l.max,
        server_cpu,
        per_delivery,
        wire,
        r.client_cpu_cores,
        rss
    )
}

/// Pins this process (and the threads it starts afterwards) to `cpus`, a list like `1`,
/// `0,1` or `0-1`.
pub fn pin_this_process(cpus: &str) -> io::Result<()> {
    let mut set = Vec::new();
    for part in cpus.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (low, high) = part.split_once('-').unwrap_or((part, part));
        let parse = |s: &str| s.trim().parse::<usize>().map_err(|_| io::Error::other(format!("bad CPU list {cpus:?}")));
        set.extend(parse(low)?..=parse(high)?);
    }
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it for indexes below
    // CPU_SETSIZE (checked); sched_setaffinity reads the set we pass for this process.
    unsafe {
        let mut mask: libc::cpu_set_t = std::mem::zeroed();
        for cpu in set {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::other(format!("CPU {cpu} out of range")));
            }
            libc::CPU_SET(cpu, &mut mask);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mask) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The human table for reports, with ratios of the first server to each other one.
pub fn table(reports: &[Report]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| scenario | load | server | conns | offered/s | delivered/s | missing | p50 µs | p99 µs | p99.9 µs | max µs | server CPU | CPU µs/delivery | bytes/delivery | client CPU | RSS/conn |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in reports {
        out.push_str(&row(r));
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let Some((volley, others)) = reports.split_first() else { return out };
    let cpu = |r: &Report| r.server_cpu_us_per_delivery.unwrap_or(f64::NAN);
    for peer in others {
        let names = format!("{}/{}", volley.server, peer.server);
        if let (Some(a), Some(b)) = (volley.server_rss_per_connection, peer.server_rss_per_connection) {
            let _ = writeln!(out, "\n{names}: server memory per connection ×{:.3}", ratio(a, b));
            continue;
        }
        let _ = writeln!(
            out,
            "\n{names}: delivered/s ×{:.2}, p50 ×{:.2}, p99 ×{:.2}, server CPU per delivery ×{:.2}, bytes per delivery ×{:.2} (latency, CPU and bytes: lower is better)",
            ratio(volley.events_per_sec, peer.events_per_sec),
            ratio(volley.latency_us.p50 as f64, peer.latency_us.p50 as f64),
            ratio(volley.latency_us.p99 as f64, peer.latency_us.p99 as f64),
            ratio(cpu(volley), cpu(peer)),
            ratio(volley.wire_bytes_per_delivery.unwrap_or(f64::NAN), peer.wire_bytes_per_delivery.unwrap_or(f64::NAN)),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stalled_publisher_is_charged_from_the_schedule() {
        let pacer = Pacer::new(1_000_000, 1_000.0);
        assert_eq!(pacer.due(999_999), 0, "nothing before the start");
        assert_eq!(pacer.due(1_000_000), 1);
        assert_eq!(pacer.scheduled(0), 1_000_000);
        assert_eq!(pacer.scheduled(500), 1_500_000);
        // Held up for a second (say, behind a full socket): 1,001 publishes are due at
        // once, each stamped with its own slot, so the stall shows in their latency.
        let now = 2_000_000;
        assert_eq!(pacer.due(now), 1_001);
        let latencies: Vec<u64> = (0..pacer.due(now)).map(|i| now - pacer.scheduled(i)).collect();
        assert_eq!(latencies[0], 1_000_000);
        assert_eq!(latencies[1_000], 0);
        assert_eq!(latencies[500], 500_000, "the median publish waited half a second");
    }

    fn report(rate: u64, published: u64, missing: u64, p99_ms: u64) -> Report {
        Report {
            scenario: Scenario::Broadcast,
            server: "s".into(),
            connections: 10,
            published,
            delivered: published * 10 - missing,
            expected: published * 10,
            load: format!("rate {rate}/s"),
            offered_per_sec: rate as f64,
            events_per_sec: 0.0,
            latency_us: Percentiles { p99: p99_ms * 1000, ..Percentiles::default() },
            client_cpu_cores: 0.0,
            server_cpu_cores: None,
            server_cpu_us_per_delivery: None,
            server_rss_per_connection: None,
            wire_bytes_per_delivery: None,
        }
    }

    #[test]
    fn capacity_is_the_highest_rate_up_to_which_every_rate_was_delivered_in_full_within_the_bound() {
        let window = Duration::from_secs(10);
        let slo = Duration::from_millis(50);
        let rows = [
            // Within the bound above a miss: not counted.
            (6_000, report(6_000, 60_000, 0, 45)),
            (1_000, report(1_000, 10_000, 0, 5)),
            (2_000, report(2_000, 20_000, 0, 40)),
            // Over the latency bound.
            (3_000, report(3_000, 30_000, 0, 51)),
            // Within it but the publisher could not keep its schedule.
            (4_000, report(4_000, 30_000, 0, 10)),
            // Within it but deliveries went missing.
            (5_000, report(5_000, 50_000, 3, 10)),
        ];
        assert_eq!(capacity(rows.iter().map(|(r, rep)| (*r, rep)), window, slo), Some(2_000));
        assert_eq!(capacity(rows[3..].iter().map(|(r, rep)| (*r, rep)), window, slo), None);
        assert_eq!(capacity(rows[..3].iter().map(|(r, rep)| (*r, rep)), window, slo), Some(6_000));
    }

    #[test]
    fn stamped_time_is_found_in_an_event() {
        let event = br#"{"type":"event","message_id":"1-2","payload":{"topic":"a","data":{"t":1234567,"p":"xx"}}}"#;
        assert_eq!(stamped_time(event), Some(1_234_567));
        assert_eq!(stamped_time(b"data: {\"t\":5,"), Some(5));
        assert_eq!(stamped_time(br#"{"type":"event","data":{"p":"x","t":77}}"#), Some(77));
        assert_eq!(stamped_time(b"nothing"), None);
    }
}
