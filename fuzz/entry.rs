//! What each fuzz target does with its input, shared by the cargo-fuzz targets and the
//! corpus replay test (`tests/fuzz_corpus.rs`), so a crash found by the fuzzer stays a
//! test on stable.

use std::sync::OnceLock;
use std::time::Duration;

use volley::bus::{Bus, Inbox};
use volley::history::Retention;
use volley::http::{Parsed, parse_head};
use volley::protocol::{parse_client_message, parse_publish_body};
use volley::topic::{Pattern, validate_topic};
use volley::ws::Codec;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus directory names).
pub const TARGETS: [(&str, Target); 5] = [
    ("http_head", http_head),
    ("ws_read", ws_read),
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
    let mut codec = Codec::new(64 * 1024);
    let mut out = Vec::new();
    for mut piece in rest.chunks(chunk as usize + 1) {
        loop {
            match codec.next(&mut piece, &mut out) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
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
        let _ = bus().replay(&id, u64::MAX, 10, |_| true);
    }
}
