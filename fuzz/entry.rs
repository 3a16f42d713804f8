//! What each fuzz target does with its input, shared by the cargo-fuzz targets and the
//! corpus replay test (`tests/fuzz_corpus.rs`), so a crash found by the fuzzer stays a
//! test on stable.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::io::{self, IoSlice, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use volley::bus::Bus;
use volley::config::Config;
use volley::core::Core;
use volley::history::Retention;
use volley::http::{Parsed, parse_head};
use volley::mailbox::{Inbox, Reply, ReplyTo};
use volley::protocol::{parse_client_message, parse_publish_body};
use volley::topic::{Pattern, validate_topic};
use volley::ws::{Codec, Received};

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus directory names).
pub const TARGETS: [(&str, Target); 8] = [
    ("connection", connection),
    ("tls_accept", tls_accept),
    ("http_head", http_head),
    ("ws_read", ws_read),
    ("ws_inflate", ws_inflate),
    ("protocol_message", protocol_message),
    ("topic", topic),
    ("sse_last_event_id", sse_last_event_id),
];

pub fn http_head(data: &[u8]) {
    if let Parsed::Complete(request, consumed) = parse_head(data) {
        assert!(consumed <= data.len());
        let _ = request.query_param("topics");
        let _ = request.token();
    }
}

/// The first byte picks the chunk size, so partial frames across reads are covered.
pub fn ws_read(data: &[u8]) {
    let Some((&chunk, rest)) = data.split_first() else { return };
    read_all(Codec::new(64 * 1024, false), rest, chunk as usize + 1, 64 * 1024);
}

/// Feeds `stream` to `codec` `chunk` bytes at a time; no message may pass `max`.
fn read_all(mut codec: Codec, stream: &[u8], chunk: usize, max: usize) {
    let mut out = Vec::new();
    for mut piece in stream.chunks(chunk) {
        loop {
            match codec.next(&mut piece, &mut out) {
                Ok(Some(Received::Text(text))) => assert!(text.len() <= max),
                Ok(Some(Received::Binary(data))) => assert!(data.len() <= max),
                Ok(Some(Received::Control)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// permessage-deflate on the way in. The input is a bound selector, a chunk size, then
/// frames as `[first byte, flags, length, payload...]`; flags: bit 0 compresses the payload
/// (so valid compressed data and bombs are reachable), bit 1 repeats it 4,096 times before
/// that, bit 2 leaves the frame unmasked, bit 3 splits the compressed payload over this
/// frame and a continuation. RSV bits, opcodes and fragmentation come from the first byte.
pub fn ws_inflate(data: &[u8]) {
    let Some((&[bound, chunk], mut rest)) = data.split_first_chunk::<2>() else { return };
    let max = 1024usize << (bound % 7);
    let mut stream = Vec::new();
    while let Some((&[first, flags, len], tail)) = rest.split_first_chunk::<3>() {
        let take = (len as usize).min(tail.len());
        let (payload, after) = tail.split_at(take);
        rest = after;
        let mut body = payload.to_vec();
        if flags & 2 != 0 {
            body = body.repeat(4096);
        }
        if flags & 1 != 0 {
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut out = Vec::with_capacity(body.len() + 64);
            if c.compress_vec(&body, &mut out, flate2::FlushCompress::Sync).is_ok()
                && out.ends_with(&[0, 0, 0xff, 0xff])
            {
                out.truncate(out.len() - 4);
            }
            body = out;
        }
        let masked = flags & 4 == 0;
        if flags & 8 != 0 {
            let (a, b) = body.split_at(body.len() / 2);
            push_client_frame(&mut stream, first & 0x7f, masked, a);
            push_client_frame(&mut stream, 0x80, masked, b);
        } else {
            push_client_frame(&mut stream, first, masked, &body);
        }
    }
    read_all(Codec::new(max, true), &stream, chunk as usize + 1, max);
}

fn push_client_frame(out: &mut Vec<u8>, first: u8, masked: bool, payload: &[u8]) {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    volley::event::push_ws_header(out, first, payload.len(), masked.then_some(mask));
    if masked {
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
}

/// Bytes from a client as a TLS server reads them: the first byte picks the size of each
/// read from the wire, the rest is what the client sent (ClientHellos, records, garbage).
/// Whatever arrives, reading ends (no loop without progress) and nothing panics.
pub fn tls_accept(data: &[u8]) {
    use volley::tls::{Certificates, Input, TlsStream};
    static CONFIG: OnceLock<Arc<rustls::ServerConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let pki = volley::bench::Pki::new("fuzz").expect("test certificates");
        let certificates = Certificates::load(&pki.cert.display().to_string(), &pki.key.display().to_string());
        certificates.expect("a fresh pair loads").current()
    });
    let Some((&chunk, rest)) = data.split_first() else { return };
    let wire = Wire { input: rest, chunk: chunk as usize + 1, written: 0 };
    let Ok(mut tls) = TlsStream::accept(wire, config.clone()) else { return };
    let mut plaintext = [0u8; 4096];
    for _ in 0..rest.len() + 2 {
        match tls.read(&mut plaintext) {
            Ok(Input::Data(_)) => {}
            Ok(Input::WouldBlock | Input::Eof) | Err(_) => break,
        }
    }
    // Whatever state it is in, writing and flushing end too.
    let _ = tls.writer().write(&[b'x'; 1024]);
    let _ = tls.flush();
}

/// A client connection as the TLS layer sees it: reads of at most `chunk` bytes, then
/// WouldBlock; writes all taken.
struct Wire<'a> {
    input: &'a [u8],
    chunk: usize,
    written: usize,
}

impl io::Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.chunk).min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn protocol_message(data: &[u8]) {
    let _ = parse_client_message(&String::from_utf8_lossy(data));
    let _ = parse_publish_body(data, 1000);
}

/// Input is two strings split at the first newline: a topic or pattern, and another.
pub fn topic(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\n').unwrap_or((&text, ""));
    let topic_ok = validate_topic(b).is_ok();
    if let (Ok(p), Ok(q)) = (Pattern::parse(a), Pattern::parse(b)) {
        if topic_ok {
            let _ = p.matches(b);
        }
        // Coverage must agree with matching on the concrete topic.
        if q.is_exact() && p.matches(b) {
            assert!(q.is_covered_by(&p), "{b} matches {a} but is not covered by it");
        }
    }
}

fn bus() -> &'static Bus {
    static BUS: OnceLock<(mio::Poll, Bus)> = OnceLock::new();
    let (_, bus) = BUS.get_or_init(|| {
        let poll = mio::Poll::new().expect("poll");
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker");
        let retention = Retention { max_events: 16, max_age: Duration::from_secs(60), max_bytes: 1 << 20 };
        let bus = Bus::new(vec![Inbox::new(waker, 1024)], retention, 64 * 1024);
        (poll, bus)
    });
    bus
}

/// A `Last-Event-ID` header value through the head parser and the resume lookup.
pub fn sse_last_event_id(data: &[u8]) {
    let mut head = b"GET /sse?topics=a HTTP/1.1\r\nLast-Event-ID: ".to_vec();
    head.extend_from_slice(data);
    head.extend_from_slice(b"\r\n\r\n");
    if let Parsed::Complete(request, _) = parse_head(&head)
        && let Some(id) = request.last_event_id
    {
        let _ = bus().replay(&id, 10, Instant::now(), std::time::SystemTime::now(), |_| true);
    }
}

/// A peer that takes at most `room` bytes, then would block.
struct Peer {
    room: usize,
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let want: usize = bufs.iter().map(|b| b.len()).sum();
        let n = want.min(self.room);
        if n == 0 && want > 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const UPGRADE: &[u8] = b"GET /ws?batch=0 HTTP/1.1\r\nHost: f\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
const TOPICS: [&str; 4] = ["a", "a.b", "b.c", "c"];
const MESSAGES: [&str; 8] = [
    r#"{"type":"subscribe","payload":{"topics":["a",">"]}}"#,
    r#"{"type":"subscribe","payload":{"topics":["a.*"],"since":"1-1"}}"#,
    r#"{"type":"subscribe","payload":{"topics":["a","a.b","c.*","d"],"sources":["s1","s2","s3","s4","s5","s6","s7","s8"],"correlation_id":"a-correlation-id-of-some-length"}}"#,
    r#"{"type":"request","payload":{"action":"stats"}}"#,
    r#"{"type":"unsubscribe","payload":{"subscription_id":"sub-1"}}"#,
    r#"{"type":"request","payload":{"action":"history","topics":[">"],"limit":1000}}"#,
    r#"{"type":"ping","payload":{}}"#,
    r#"{"type":"request","payload":{"action":"publish","topic":"a.b","data":1}}"#,
];

/// One whole connection driven by a structured sequence of operations (bytes in, the
/// clock advanced, events published, output drained fully, partly or not at all, EOF),
/// with the core's invariants checked after every step.
pub fn connection(data: &[u8]) {
    let config = Config {
        shards: 1,
        max_message_bytes: 4096,
        max_outbound_bytes: 16 * 1024,
        heartbeat_interval_ms: 1_000,
        http_header_timeout_ms: 500,
        http_idle_timeout_ms: 2_000,
        http_request_timeout_ms: 700,
        auth_timeout_ms: 800,
        rate_per_second: 50,
        rate_burst: 20,
        rate_limit_close_after_ms: 1_000,
        history_max_events: 64,
        write_coalescing_max_ms: 5,
        shard_queue_capacity: 256,
        // Small enough that a few subscriptions with sources and resumes reach it.
        max_connection_state_bytes: 8 * 1024,
        ..Config::default()
    };
    let limit = config.max_outbound_bytes;
    let state_budget = config.max_connection_state_bytes;
    let epoch = (Instant::now(), std::time::SystemTime::now());
    let Ok((mut core, shared, _poll)) = Core::standalone(config, epoch) else { return };
    let peer = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut now: Instant = shared.epoch.0;
    if core.admit(peer).is_err() {
        return;
    }
    let key = core.accept(peer, None, now);
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next();
    while let Some(op) = next() {
        match op % 9 {
            0 => {
                let len = next().unwrap_or(0) as usize;
                let chunk: Vec<u8> = (0..len).map_while(|_| next()).collect();
                let budget = core.read_budget(key, 1 << 16);
                core.handle_input(key, &chunk[..chunk.len().min(budget)], now);
            }
            1 => {
                now += std::time::Duration::from_millis(u64::from(next().unwrap_or(0)) * 8);
                core.handle_timeout(now);
                let before = core.conn(key).map(|c| c.queued_bytes());
                core.handle_timeout(now);
                assert_eq!(core.conn(key).map(|c| c.queued_bytes()), before, "a deadline fired twice for one now");
            }
            2 | 3 => {
                let room = if op % 9 == 2 { usize::MAX } else { usize::from(next().unwrap_or(0)) * 16 };
                for ready in core.poll_transmit(now) {
                    let _ = core.write_to(ready, &mut Peer { room }, now);
                }
            }
            4 => {
                let topic = TOPICS[usize::from(next().unwrap_or(0)) % TOPICS.len()];
                let size = usize::from(next().unwrap_or(0)) * 16;
                let body = format!(r#"{{"topic":"{topic}","data":"{}"}}"#, "x".repeat(size));
                if let Ok(requests) = volley::protocol::parse_publish_body(body.as_bytes(), 1) {
                    let reply =
                        Reply { to: ReplyTo { shard: 0, key: usize::MAX, conn_id: 0 }, wait: false, websocket: None };
                    let _ = shared.bus.publish(requests, reply, now, shared.wall(now));
                }
                while core.handle_inbox(now) {}
            }
            5 => core.handle_input(key, UPGRADE, now),
            6 => {
                let message = MESSAGES[usize::from(next().unwrap_or(0)) % MESSAGES.len()];
                let mut frame = Vec::new();
                volley::event::masked_text(message.as_bytes(), &mut frame);
                core.handle_input(key, &frame, now);
            }
            7 => core.handle_eof(key, now),
            _ => {
                if core.read_budget(key, 1 << 16) == 0 {
                    let _ = core.take_read_again();
                }
            }
        }
        check(&core, &shared, key, limit, state_budget);
    }
}

fn check(core: &Core, shared: &volley::core::Shared, key: usize, limit: usize, state_budget: usize) {
    let counters = &shared.counters[0];
    let connections = counters.http.load(Relaxed) + counters.websocket.load(Relaxed) + counters.sse.load(Relaxed);
    let subscriptions = counters.subscriptions.load(Relaxed);
    match core.conn(key) {
        Some(conn) => {
            assert!(conn.queued_bytes() <= limit + 1024, "{} queued past the bound {limit}", conn.queued_bytes());
            assert_eq!(connections, 1, "one connection counted");
            assert_eq!(subscriptions, conn.subscriptions() as i64, "the gauge follows the subscriptions");
            assert_eq!(core.index_entries(), conn.index_entries().len(), "the index holds what the connection says");
            assert!(conn.state_bytes() <= state_budget, "{} bytes of state past the budget", conn.state_bytes());
            assert!(core.timer_entries() <= 1, "one timer entry per connection");
        }
        None => {
            assert_eq!((connections, subscriptions), (0, 0), "gauges back to zero once it left");
            assert_eq!(core.index_entries(), 0, "nothing left in the index");
            assert_eq!(core.timer_entries(), 0, "no timer left for it");
        }
    }
}
