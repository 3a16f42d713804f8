//! The core driven by hand: bytes in, a manual clock, output drained (or not) into a
//! `Vec`. Every timer is tested here without sleeping, and so are the bounds.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{AfterWrite, Core, LINGER, Shared};
use crate::config::Config;
use crate::mailbox::Lifecycle;

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A one-shard core with its own bus, and a clock that moves only when told.
pub(crate) struct Harness {
    pub core: Core,
    pub now: Instant,
    pub shared: Arc<Shared>,
    /// Connections the core asked to write and the test has not drained yet.
    ready: std::collections::BTreeSet<usize>,
    _poll: mio::Poll,
}

/// A frame a server sent: opcode and payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == 8 && self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// A text frame's JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or(Value::Null)
    }
}

/// Splits server (unmasked) frames; stops at an incomplete one.
pub(crate) fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while bytes.len() >= 2 {
        let opcode = bytes[0] & 0x0f;
        let (len, head) = match bytes[1] & 0x7f {
            126 if bytes.len() >= 4 => (u16::from_be_bytes([bytes[2], bytes[3]]) as usize, 4),
            127 if bytes.len() >= 10 => {
                let mut n = [0; 8];
                n.copy_from_slice(&bytes[2..10]);
                (u64::from_be_bytes(n) as usize, 10)
            }
            126 | 127 => break,
            n => (n as usize, 2),
        };
        if bytes.len() < head + len {
            break;
        }
        out.push(Frame { opcode, payload: bytes[head..head + len].to_vec() });
        bytes = &bytes[head + len..];
    }
    out
}

/// A client (masked) frame.
pub(crate) fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    crate::event::masked_frame(opcode, payload, &mut frame);
    frame
}

/// A client text frame.
pub(crate) fn text(payload: &str) -> Vec<u8> {
    masked(1, payload.as_bytes())
}

impl Harness {
    pub fn new(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config { shards: 1, ..Config::default() };
        tweak(&mut config);
        let epoch = (Instant::now(), std::time::SystemTime::now());
        let (core, shared, poll) = Core::standalone(config, epoch).expect("a core");
        Self { core, now: shared.epoch.0, shared, ready: Default::default(), _poll: poll }
    }

    pub fn connect(&mut self) -> usize {
        self.core.admit(PEER).expect("admitted");
        self.core.accept(PEER, None, self.now)
    }

    pub fn input(&mut self, key: usize, bytes: &[u8]) {
        self.core.handle_input(key, bytes, self.now);
    }

    /// Moves the clock and runs what is due, as a shard's loop turn would.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.turn();
    }

    /// One loop turn at the current time, without reading.
    pub fn turn(&mut self) {
        while self.core.handle_inbox(self.now) {}
        self.core.handle_timeout(self.now);
    }

    /// Everything the connection writes now, if the core asks for a write (a peer that
    /// reads everything).
    pub fn output(&mut self, key: usize) -> Vec<u8> {
        let mut out = Vec::new();
        self.ready.extend(self.core.poll_transmit(self.now));
        if self.ready.remove(&key) {
            let _ = self.core.write_to(key, &mut out, self.now);
        }
        out
    }

    pub fn frames(&mut self, key: usize) -> Vec<Frame> {
        frames(&self.output(key))
    }

    /// A WebSocket that has read its handshake and connect ack.
    pub fn websocket(&mut self, path: &str) -> usize {
        let key = self.connect();
        self.input(key, UPGRADE.replace("/ws", path).as_bytes());
        let out = self.output(key);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        key
    }

    /// A WebSocket subscribed to topic `a`, its ack read.
    pub fn subscriber_of_a(&mut self) -> usize {
        let key = self.websocket("/ws");
        self.input(key, &text(r#"{"type":"subscribe","payload":{"topics":["a"]}}"#));
        self.output(key);
        key
    }

    pub fn gauges(&self) -> (i64, i64, i64, i64) {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.shared.counters[0];
        (c.http.load(Relaxed), c.websocket.load(Relaxed), c.sse.load(Relaxed), c.subscriptions.load(Relaxed))
    }

    pub fn publish(&mut self, topic: &str, data: &str) {
        self.publish_from(topic, "test", data);
    }

    pub fn publish_from(&mut self, topic: &str, source: &str, data: &str) {
        let body = format!(r#"{{"topic":"{topic}","source":"{source}","data":{data}}}"#);
        let requests = crate::protocol::parse_publish_body(body.as_bytes(), 1).expect("valid publish");
        let reply = crate::mailbox::Reply {
            to: crate::mailbox::ReplyTo { shard: 0, key: usize::MAX, conn_id: 0 },
            wait: false,
            websocket: None,
        };
        let wall = self.shared.wall(self.now);
        self.shared.bus.publish(requests, reply, self.now, wall).expect("published");
    }
}

fn heartbeat(h: &Harness) -> Duration {
    h.shared.config.heartbeat_interval()
}

#[test]
fn heartbeat_pings_once_per_interval_then_drops_a_silent_client() {
    let mut h = Harness::new(|_| {});
    let key = h.websocket("/ws");
    let interval = heartbeat(&h);
    h.advance(interval);
    assert_eq!(h.frames(key).iter().map(|f| f.opcode).collect::<Vec<_>>(), [9], "one ping");
    h.turn();
    h.core.handle_timeout(h.now);
    assert!(h.frames(key).is_empty(), "a deadline never fires twice for one now");
    h.advance(interval - Duration::from_millis(1));
    assert!(h.frames(key).is_empty());
    h.advance(Duration::from_millis(1));
    let frames = h.frames(key);
    assert_eq!(frames.last().and_then(Frame::close_code), Some(1001), "stale after two intervals: {frames:?}");
    assert!(h.core.conn(key).is_some(), "lingers for the peer's close");
    h.advance(LINGER);
    assert!(h.core.conn(key).is_none(), "removed after the linger");
    assert_eq!(h.gauges(), (0, 0, 0, 0));
}

#[test]
fn a_client_that_talks_is_not_stale() {
    let mut h = Harness::new(|_| {});
    let key = h.websocket("/ws");
    let interval = heartbeat(&h);
    for _ in 0..5 {
        h.advance(interval);
        h.input(key, &masked(0xA, b""));
        let frames = h.frames(key);
        assert!(frames.iter().all(|f| f.opcode == 9), "{frames:?}");
    }
    assert!(h.core.conn(key).is_some_and(|c| c.closing.is_none()));
}

#[test]
fn header_timeout_drops_a_slow_head() {
    let mut h = Harness::new(|c| c.http_header_timeout_ms = 500);
    let key = h.connect();
    h.input(key, b"GET /health HTTP/1.1\r\nHost:");
    h.advance(Duration::from_millis(499));
    assert!(h.core.conn(key).is_some());
    h.advance(Duration::from_millis(1));
    assert!(h.core.conn(key).is_none(), "dropped at the header deadline");
    assert_eq!(h.gauges(), (0, 0, 0, 0));
}

#[test]
fn idle_timeout_closes_a_kept_alive_connection() {
    let mut h = Harness::new(|c| c.http_idle_timeout_ms = 1_000);
    let key = h.connect();
    h.input(key, b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(String::from_utf8_lossy(&h.output(key)).starts_with("HTTP/1.1 200"));
    h.advance(Duration::from_millis(999));
    assert!(h.core.conn(key).is_some());
    h.advance(Duration::from_millis(1));
    assert!(h.core.conn(key).is_none(), "idle connection closed");
}

#[test]
fn auth_timeout_closes_with_4001() {
    let mut h = Harness::new(|c| {
        c.jwt_secret = "secret".into();
        c.auth_timeout_ms = 2_000;
    });
    let key = h.websocket("/ws");
    h.advance(Duration::from_millis(1_999));
    assert!(h.frames(key).is_empty());
    h.advance(Duration::from_millis(1));
    assert_eq!(h.frames(key).last().and_then(Frame::close_code), Some(4001));
}

#[test]
fn rate_limit_refuses_then_closes_with_1008() {
    let mut h = Harness::new(|c| {
        c.rate_per_second = 10;
        c.rate_burst = 2;
        c.rate_limit_close_after_ms = 1_000;
    });
    let key = h.websocket("/ws");
    let ping = text(r#"{"type":"ping"}"#);
    h.input(key, &[ping.clone(), ping.clone(), ping.clone()].concat());
    let frames = h.frames(key);
    let kinds: Vec<_> = frames.iter().map(|f| f.json()["type"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(kinds, ["pong", "pong", "error"], "burst of two, then refused");
    assert_eq!(frames[2].json()["payload"]["code"], "rate_limited");
    // Still flooding a second later: closed.
    for _ in 0..20 {
        h.advance(Duration::from_millis(60));
        h.input(key, &[ping.clone(), ping.clone()].concat());
    }
    let frames = h.frames(key);
    assert_eq!(frames.last().and_then(Frame::close_code), Some(1008), "{frames:?}");
}

#[test]
fn rate_limited_reads_pause_and_resume_by_timer() {
    let mut h = Harness::new(|c| {
        c.rate_per_second = 10;
        c.rate_burst = 1;
    });
    let key = h.websocket("/ws");
    let ping = text(r#"{"type":"ping"}"#);
    h.input(key, &[ping.clone(), ping.clone()].concat());
    assert_eq!(h.core.read_budget(key, 1 << 16), super::LIMITED_READ_BYTES);
    h.core.budget_spent(key, h.now);
    assert_eq!(h.core.read_budget(key, 1 << 16), 0, "paused");
    assert!(h.core.take_read_again().is_empty());
    h.advance(super::LIMITED_READ_PAUSE);
    assert_eq!(h.core.take_read_again(), [key], "the pause timer asks for a read");
    assert_eq!(h.core.read_budget(key, 1 << 16), super::LIMITED_READ_BYTES);
}

#[test]
fn coalescing_holds_a_busy_connection_while_more_wait_and_its_timer_writes_them() {
    // A small bound makes each inbox call fan out one or two events.
    let mut h = Harness::new(|c| {
        c.max_outbound_bytes = 4096;
        c.write_coalescing_min_ms = 300;
        c.write_coalescing_max_ms = 300;
    });
    let key = h.websocket("/ws");
    h.input(key, &text(r#"{"type":"subscribe","payload":{"topics":["a"]}}"#));
    assert_eq!(h.frames(key)[0].json()["type"], "ack", "replies never wait");
    for i in 0..6 {
        h.publish("a", &format!(r#""{}-{i}""#, "x".repeat(600)));
    }
    assert!(h.core.handle_inbox(h.now), "more events wait in the inbox");
    let first = h.frames(key).len();
    assert!(first >= 1, "a connection not written within the window gains nothing by waiting");
    assert!(h.core.handle_inbox(h.now), "more events wait in the inbox");
    assert!(h.frames(key).is_empty(), "just written: held for company while company is coming");
    let due = h.core.poll_timeout().expect("a wake-up for the window");
    assert_eq!(due - h.now, Duration::from_millis(300));
    h.now += Duration::from_millis(299);
    h.core.handle_timeout(h.now);
    assert!(h.frames(key).is_empty());
    h.now += Duration::from_millis(1);
    h.core.handle_timeout(h.now);
    let held = h.frames(key).len();
    assert!(held >= 1, "the window's timer writes what it held");
    h.turn();
    assert_eq!(first + held + h.frames(key).len(), 6, "the rest as soon as the inbox is empty");
}

#[test]
fn each_held_connection_waits_a_window_from_its_own_last_write() {
    // Held connections wait in a heap by their last write: the one written earlier is
    // due earlier, whatever order their events came in, and one timer at a time is set.
    let mut h = Harness::new(|c| {
        c.max_outbound_bytes = 4096;
        c.write_coalescing_min_ms = 300;
        c.write_coalescing_max_ms = 300;
    });
    let (first, second) = (h.websocket("/ws"), h.websocket("/ws"));
    for (key, topic) in [(first, "a"), (second, "b")] {
        h.input(key, &text(&format!(r#"{{"type":"subscribe","payload":{{"topics":["{topic}"]}}}}"#)));
        h.output(key);
    }
    let start = h.now;
    let big = |i: i32| format!(r#""{}-{i}""#, "x".repeat(600));
    // Written at `start` and 100 ms later: nothing else waits, so nothing is held.
    h.publish("a", &big(0));
    h.turn();
    assert_eq!(h.frames(first).len(), 1);
    h.now += Duration::from_millis(100);
    h.publish("b", &big(0));
    h.turn();
    assert_eq!(h.frames(second).len(), 1);
    // Events for the second, then the first, with more waiting in the inbox: both held.
    h.now += Duration::from_millis(50);
    for i in 1..4 {
        h.publish("b", &big(i));
        h.publish("a", &big(i));
    }
    assert!(h.core.handle_inbox(h.now));
    assert!(h.frames(first).is_empty() && h.frames(second).is_empty(), "both held");
    assert_eq!(h.core.poll_timeout(), Some(start + Duration::from_millis(300)), "the first is due first");
    h.now = start + Duration::from_millis(300);
    h.core.handle_timeout(h.now);
    assert!(!h.frames(first).is_empty(), "written a window after its last write");
    assert!(h.frames(second).is_empty(), "still within its own window");
    assert_eq!(h.core.poll_timeout(), Some(start + Duration::from_millis(400)));
    h.now = start + Duration::from_millis(400);
    h.core.handle_timeout(h.now);
    assert!(!h.frames(second).is_empty());
}

#[test]
fn a_held_connection_with_a_writes_worth_queued_goes_at_once() {
    let mut h = Harness::new(|c| {
        c.max_outbound_bytes = 256 * 1024;
        c.write_coalescing_min_ms = 300;
        c.write_coalescing_max_ms = 300;
    });
    let key = h.subscriber_of_a();
    h.publish("a", "0");
    h.turn();
    assert_eq!(event_data(&h.frames(key)), [0], "written: the next events may be held");
    // 5 KiB events for another topic, more than a turn's 64 KiB of them, keep company
    // coming: the connection's next small event is held.
    let big = |i: i32| format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(5000));
    h.publish("a", "1");
    for i in 0..20 {
        h.publish("b", &big(i));
    }
    assert!(h.core.handle_inbox(h.now));
    assert!(h.frames(key).is_empty(), "held");
    // Held, it gets 16 KiB more: worth a write of its own, in the turn that queued them.
    for i in 0..4 {
        h.publish("a", &big(i));
    }
    for i in 0..20 {
        h.publish("b", &big(i));
    }
    assert!(h.core.handle_inbox(h.now));
    assert!(h.core.poll_timeout().is_some_and(|t| t > h.now), "the window has not passed");
    assert_eq!(h.frames(key).len(), 5, "the held event and the four behind it");
}

#[test]
fn the_batch_grows_on_every_turn_behind_and_shrinks_once_per_longest_wait() {
    let ms = Duration::from_millis;
    let mut coalescing = super::Coalescing::new(Duration::ZERO, ms(200));
    let start = Instant::now();
    assert!(!coalescing.holds(start, 1, start), "keeping up: nothing waits");
    let batches: Vec<_> = (0..3)
        .map(|_| {
            coalescing.observe(ms(10), start);
            coalescing.batch()
        })
        .collect();
    assert_eq!(batches, [2, 4, 4]);
    // A connection written at `start` waits for its batch, at most 200 ms.
    assert!(coalescing.holds(start, 3, start + ms(10)));
    assert_eq!(coalescing.wait(), ms(200));
    assert!(!coalescing.holds(start, 4, start + ms(10)), "its batch is there");
    assert!(!coalescing.holds(start, 3, start + ms(200)), "waited long enough");
    assert!(!coalescing.holds(start, 1, start + ms(4)), "written within 5 ms: company comes by itself");
    // Caught up: holding is what let the shard catch up; it shrinks once per 200 ms.
    coalescing.observe(Duration::ZERO, start + ms(199));
    assert_eq!(coalescing.batch(), 4);
    coalescing.observe(Duration::ZERO, start + ms(200));
    assert_eq!(coalescing.batch(), 2);
    coalescing.observe(Duration::ZERO, start + ms(399));
    assert_eq!(coalescing.batch(), 2);
    // Between caught up and behind it stays; behind, it grows at once.
    coalescing.observe(ms(3), start + ms(450));
    assert_eq!(coalescing.batch(), 2);
    coalescing.observe(ms(10), start + ms(450));
    assert_eq!(coalescing.batch(), 4);
    coalescing.observe(Duration::ZERO, start + ms(650));
    assert_eq!(coalescing.batch(), 2);
    coalescing.observe(Duration::ZERO, start + ms(850));
    assert_eq!(coalescing.batch(), 1, "back to writing every turn");
    assert_eq!(coalescing.wait(), Duration::ZERO);
}

/// A WebSocket subscribed to `a` on a shard (200 ms `write_coalescing_max_ms`, 1 KiB of
/// events per turn) whose last two turns found events (for nobody) that waited 10 ms: its
/// batch is 4.
fn subscriber_of_a_on_a_shard_that_fell_behind() -> (Harness, usize) {
    let mut h = Harness::new(|c| {
        c.max_outbound_bytes = 4096;
        c.write_coalescing_max_ms = 200;
    });
    let key = h.subscriber_of_a();
    for _ in 0..2 {
        h.publish("z", "0");
        h.now += Duration::from_millis(10);
        h.turn();
        h.frames(key);
    }
    (h, key)
}

#[test]
fn a_shard_behind_writes_a_connection_once_it_has_its_batch_not_after_the_longest_wait() {
    // A connection hearing events often gathers its batch in milliseconds: it must not
    // wait the 200 ms a connection hearing them rarely may wait.
    let (mut h, key) = subscriber_of_a_on_a_shard_that_fell_behind();
    h.publish("a", "0");
    h.turn();
    assert_eq!(event_data(&h.frames(key)), [0]);
    // 20 ms later (the shard flushes every turn: a connection written in the turn before
    // is not held), events for it keep coming.
    for _ in 0..2 {
        h.now += Duration::from_millis(10);
        h.turn();
        assert!(h.frames(key).is_empty());
    }
    let filler = |h: &mut Harness| (0..40).for_each(|_| h.publish("z", "0"));
    for n in 1..=3 {
        h.publish("a", &n.to_string());
    }
    filler(&mut h);
    let mut written = Vec::new();
    while h.core.handle_inbox(h.now) {
        written.extend(event_data(&h.frames(key)));
    }
    assert!(written.is_empty(), "three of four: held while more events come, {written:?}");
    h.publish("a", "4");
    filler(&mut h);
    let mut with_company_coming = Vec::new();
    while h.core.handle_inbox(h.now) {
        with_company_coming.extend(event_data(&h.frames(key)));
    }
    assert_eq!(with_company_coming, [1, 2, 3, 4], "written with its fourth event, 20 ms after the last write");
    // Held and written by its batch over and over within one longest wait: the heap keeps
    // one entry for it, not one per round.
    for round in 0..20 {
        for n in 0..4 {
            h.publish("a", &(round * 4 + n).to_string());
        }
        filler(&mut h);
        h.now += Duration::from_millis(1);
        while h.core.handle_inbox(h.now) {
            assert_eq!(event_data(&h.frames(key)).len() % 4, 0, "whole batches");
        }
        h.frames(key);
        assert!(h.core.held_entries() <= 1, "round {round}: {} entries", h.core.held_entries());
    }
}

#[test]
fn a_connection_written_in_the_turn_before_is_not_held_for_a_batch() {
    // A closed loop's or a broadcast's connections get events every turn, however long a
    // turn takes: holding them for a batch only slowed the publishers waiting on them.
    let (mut h, key) = subscriber_of_a_on_a_shard_that_fell_behind();
    h.publish("a", "0");
    h.turn();
    assert_eq!(event_data(&h.frames(key)), [0], "written in this turn's flush");
    // The next turn comes 10 ms later (a long turn), with more events waiting behind.
    h.now += Duration::from_millis(10);
    h.publish("a", "1");
    (0..40).for_each(|_| h.publish("z", "0"));
    assert!(h.core.handle_inbox(h.now), "company is coming");
    assert_eq!(event_data(&h.frames(key)), [1], "written in the turn before: not held");
}

#[test]
fn events_are_never_held_once_the_inbox_is_empty() {
    // The half-speed mode: a closed-loop publisher waits for its events while the shard,
    // with nothing else to do, holds them for company that cannot come.
    let mut h = Harness::new(|c| {
        c.write_coalescing_min_ms = 20;
        c.write_coalescing_max_ms = 20;
    });
    let key = h.subscriber_of_a();
    for round in 0..10 {
        h.publish("a", &round.to_string());
        h.turn();
        let frames = h.frames(key);
        assert_eq!(frames.len(), 1, "round {round}: written in the turn that fanned it out");
        let next = h.core.poll_timeout();
        assert!(next.is_none_or(|t| t > h.now + Duration::from_millis(20)), "nothing held for a window");
    }
}

/// The data of the events among `frames`, in order.
fn event_data(frames: &[Frame]) -> Vec<i64> {
    frames
        .iter()
        .map(Frame::json)
        .filter(|m| m["type"] == "event")
        .filter_map(|m| m["payload"]["data"].as_i64())
        .collect()
}

#[test]
fn split_and_overlapping_subscriptions_get_each_event_once_and_in_order() {
    // Several events fanned out in one turn; a connection whose subscriptions split them
    // must still get each event once, in order, whichever subscription the index matched
    // first.
    let mut h = Harness::new(|_| {});
    let single = h.websocket("/ws");
    h.input(single, &text(r#"{"type":"subscribe","payload":{"topics":["a"]}}"#));
    let split = h.websocket("/ws");
    h.input(split, &text(r#"{"type":"subscribe","payload":{"topics":["a"],"sources":["one"]}}"#));
    h.input(split, &text(r#"{"type":"subscribe","payload":{"topics":["a"],"sources":["two"]}}"#));
    h.output(single);
    h.output(split);
    for (i, source) in ["one", "two", "one", "two", "three"].into_iter().enumerate() {
        h.publish_from("a", source, &(i + 1).to_string());
    }
    h.turn();
    assert_eq!(event_data(&h.frames(single)), [1, 2, 3, 4, 5]);
    assert_eq!(event_data(&h.frames(split)), [1, 2, 3, 4], "source three is nobody's");

    // An overlapping third subscription takes everything; nothing twice.
    h.input(split, &text(r#"{"type":"subscribe","payload":{"topics":["a"]}}"#));
    h.output(split);
    for (i, source) in ["three", "one", "three"].into_iter().enumerate() {
        h.publish_from("a", source, &(i + 6).to_string());
    }
    h.turn();
    assert_eq!(event_data(&h.frames(split)), [6, 7, 8]);
    assert_eq!(event_data(&h.frames(single)), [6, 7, 8]);
}

#[test]
fn slow_consumers_are_closed_once_and_readers_get_every_event() {
    let mut h = Harness::new(|c| c.max_outbound_bytes = 4096);
    let reader = h.websocket("/ws");
    h.input(reader, &text(r#"{"type":"subscribe","payload":{"topics":["a"]}}"#));
    let stalled = h.websocket("/ws");
    h.input(stalled, &text(r#"{"type":"subscribe","payload":{"topics":["a"]}}"#));
    let stalled_twice = h.websocket("/ws");
    h.input(stalled_twice, &text(r#"{"type":"subscribe","payload":{"topics":["a"]}}"#));
    h.input(stalled_twice, &text(r#"{"type":"subscribe","payload":{"topics":["a"],"sources":["test"]}}"#));
    for key in [reader, stalled, stalled_twice] {
        h.output(key);
    }
    // Each event is about 700 bytes and a turn fans out four: the stalled connections
    // (never drained) go over their 4 KiB bound in the middle of the second turn.
    let mut read = 0;
    for i in 0..12 {
        h.publish("a", &format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(600)));
        if i % 4 == 3 {
            h.turn();
            read += h.frames(reader).len();
        }
    }
    assert_eq!(read, 12, "the reader gets every event");
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(h.shared.counters[0].slow_consumer_disconnects.load(Relaxed), 2, "each closed once");
    for key in [stalled, stalled_twice] {
        let frames = h.frames(key);
        assert_eq!(frames.last().and_then(Frame::close_code), Some(1013));
    }
}

#[test]
fn a_turn_stops_fanning_out_once_it_leaves_enough_writes_behind() {
    // Many topics, a few subscribers each: every event makes connections dirty that were
    // not, and a turn that fanned out the whole backlog would leave thousands of writes
    // (and no reads) behind it. It stops at NEW_WRITES_PER_TURN and the shard comes back.
    let mut h = Harness::new(|_| {});
    let per_topic = super::NEW_WRITES_PER_TURN / 2 + 8;
    let mut keys = Vec::new();
    for i in 0..3 * per_topic {
        let key = h.websocket("/ws");
        h.input(key, &text(&format!(r#"{{"type":"subscribe","payload":{{"topics":["t{}"]}}}}"#, i % 3)));
        h.output(key);
        keys.push(key);
    }
    for topic in ["t0", "t1", "t2"] {
        h.publish(topic, "1");
    }
    assert!(h.core.handle_inbox(h.now), "the third event waits for the next turn");
    let written = |h: &mut Harness| keys.iter().filter(|&&k| !event_data(&h.frames(k)).is_empty()).count();
    assert_eq!(written(&mut h), 2 * per_topic, "two topics' subscribers written");
    assert!(!h.core.handle_inbox(h.now), "nothing more waits");
    assert_eq!(written(&mut h), per_topic, "then the third's");

    // Events for connections that already have some queued cost no new write: a busy
    // topic's backlog goes out in one turn.
    for n in 0..50 {
        h.publish("t0", &n.to_string());
    }
    assert!(!h.core.handle_inbox(h.now), "one turn for one topic's backlog");
    assert_eq!(event_data(&h.frames(keys[0])), (0..50).collect::<Vec<_>>());
}

#[test]
fn a_shard_behind_widens_its_turns_and_narrows_them_once_caught_up() {
    // Six topics of NEW_WRITES_PER_TURN / 2 + 8 subscribers: a bounded turn takes two.
    // Nothing held for company (write_coalescing_max_ms 0): this is about the turns.
    let mut h = Harness::new(|c| c.write_coalescing_max_ms = 0);
    let per_topic = super::NEW_WRITES_PER_TURN / 2 + 8;
    let mut keys = Vec::new();
    for i in 0..6 * per_topic {
        let key = h.websocket("/ws");
        h.input(key, &text(&format!(r#"{{"type":"subscribe","payload":{{"topics":["t{}"]}}}}"#, i % 6)));
        h.output(key);
        keys.push(key);
    }
    let written = |h: &mut Harness| keys.iter().filter(|&&k| !event_data(&h.frames(k)).is_empty()).count();
    let publish_all = |h: &mut Harness| (0..6).for_each(|t| h.publish(&format!("t{t}"), "1"));
    // Events that waited 10 ms in the inbox: the shard is behind.
    publish_all(&mut h);
    h.now += Duration::from_millis(10);
    assert!(h.core.handle_inbox(h.now));
    assert_eq!(written(&mut h), 2 * per_topic, "the first turn stops at the bound");
    assert!(!h.core.handle_inbox(h.now), "the next turn, twice as wide, takes the other four topics");
    assert_eq!(written(&mut h), 4 * per_topic);
    // Caught up (the inbox emptied): the bound is back, even for events that waited.
    publish_all(&mut h);
    h.now += Duration::from_millis(10);
    assert!(h.core.handle_inbox(h.now));
    assert_eq!(written(&mut h), 2 * per_topic);
    // Events that did not wait keep the bound: a burst while keeping up is cut into turns.
    while h.core.handle_inbox(h.now) {}
    written(&mut h);
    publish_all(&mut h);
    assert!(h.core.handle_inbox(h.now));
    assert!(h.core.handle_inbox(h.now), "not behind: every turn stays at the bound");
    assert!(!h.core.handle_inbox(h.now));
}

#[test]
fn drain_closes_with_1001_and_stops_at_its_deadline() {
    let mut h = Harness::new(|c| c.drain_timeout_ms = 5_000);
    let key = h.websocket("/ws");
    let http = h.connect();
    h.shared.bus.inboxes()[0].request(Lifecycle::Drain);
    h.turn();
    assert!(!h.core.accepting());
    assert_eq!(h.frames(key).last().and_then(Frame::close_code), Some(1001));
    assert!(h.core.conn(http).is_some_and(|c| c.closing.is_some()));
    assert!(!h.core.finished(), "waits for its connections");
    h.advance(Duration::from_millis(5_000));
    assert!(h.core.finished(), "stops at the drain deadline");
}

#[test]
fn sse_pings_every_interval() {
    let mut h = Harness::new(|_| {});
    let key = h.connect();
    h.input(key, b"GET /sse?topics=a HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(String::from_utf8_lossy(&h.output(key)).starts_with("HTTP/1.1 200"));
    for _ in 0..3 {
        h.advance(heartbeat(&h));
        assert_eq!(h.output(key), crate::sse::PING);
    }
}

#[test]
fn a_request_waiting_too_long_is_answered_504_once() {
    let mut h = Harness::new(|c| c.http_request_timeout_ms = 1_000);
    let key = h.connect();
    // The stats gather goes to every shard's inbox: this test never delivers it in time.
    h.input(key, b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n");
    h.core.handle_timeout(h.now);
    assert!(h.output(key).is_empty(), "waiting");
    h.now += Duration::from_millis(1_000);
    h.core.handle_timeout(h.now);
    h.core.handle_timeout(h.now);
    let out = String::from_utf8_lossy(&h.output(key)).into_owned();
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
    assert_eq!(out.matches("HTTP/1.1").count(), 1, "answered once");
    // The late answer finds the request gone.
    h.turn();
    assert!(h.output(key).is_empty());
    h.advance(LINGER);
    assert!(h.core.conn(key).is_none());
    assert_eq!(h.gauges(), (0, 0, 0, 0));
}

#[test]
fn replies_count_against_the_bound_and_a_flooder_gets_1013() {
    let limit = 64 * 1024;
    let mut h = Harness::new(|c| {
        c.max_outbound_bytes = limit;
        c.rate_per_second = 100_000;
        c.rate_burst = 100_000;
    });
    for i in 0..100 {
        h.publish("a", &format!(r#""{}-{i}""#, "x".repeat(400)));
    }
    h.turn();
    let key = h.websocket("/ws");
    let request = text(r#"{"type":"request","payload":{"action":"history","topics":[">"],"limit":1000}}"#);
    // One reply (~45 KiB) puts it over its reading share: it is not read any more.
    h.input(key, &request);
    assert_eq!(h.core.read_budget(key, 1 << 16), 0);
    // But what one read had already brought in is handled, and the replies pass the bound.
    h.input(key, &request.repeat(50));
    let conn = h.core.conn(key).expect("closing, not gone");
    assert!(conn.queued_bytes() <= limit + 64, "never above the bound plus one message");
    assert!(conn.closing.is_some());
    let frames = h.frames(key);
    assert_eq!(frames.len(), 2, "one reply, then the close: {:?}", frames.iter().map(|f| f.opcode).collect::<Vec<_>>());
    assert_eq!(frames.last().and_then(Frame::close_code), Some(1013), "closed as a slow consumer");
}

#[test]
fn backpressure_stops_reading_and_resumes_when_drained() {
    let limit = 64 * 1024;
    let mut h = Harness::new(|c| c.max_outbound_bytes = limit);
    for i in 0..40 {
        h.publish("a", &format!(r#""{}-{i}""#, "x".repeat(400)));
    }
    h.turn();
    let key = h.websocket("/ws");
    // One reply of ~17 KiB per request: two pass the reading share (32 KiB).
    let request = text(r#"{"type":"request","payload":{"action":"history","topics":[">"],"limit":40}}"#);
    h.input(key, &request);
    assert!(h.core.read_budget(key, 1 << 16) > 0);
    h.input(key, &request);
    assert_eq!(h.core.read_budget(key, 1 << 16), 0, "over its share: not read");
    assert!(h.core.take_read_again().is_empty());
    let frames = h.frames(key);
    assert_eq!(frames.len(), 2, "both replies written");
    assert_eq!(h.core.take_read_again(), [key], "drained: read again");
    assert!(h.core.read_budget(key, 1 << 16) > 0);
}

#[test]
fn a_resume_larger_than_the_bound_is_fed_as_the_client_reads() {
    let limit = 32 * 1024;
    let mut h = Harness::new(|c| c.max_outbound_bytes = limit);
    h.publish("a", r#""first""#);
    h.turn();
    let first = h.shared.bus.newest(1, h.now, |_| true)[0].id.to_string();
    for i in 0..500 {
        h.publish("a", &format!(r#""{}-{i}""#, "x".repeat(400)));
    }
    h.turn();
    let key = h.websocket("/ws");
    let subscribe = format!(r#"{{"type":"subscribe","payload":{{"topics":["a"],"since":"{first}"}}}}"#);
    h.input(key, &text(&subscribe));
    h.publish("a", r#""live""#);
    h.turn();
    let mut got = Vec::new();
    for _ in 0..100 {
        assert!(h.core.conn(key).is_some_and(|c| c.queued_bytes() <= limit));
        let frames = h.frames(key);
        if frames.is_empty() {
            break;
        }
        got.extend(frames.into_iter().map(|f| f.json()));
    }
    assert_eq!(got[0]["type"], "ack");
    let events: Vec<_> = got[1..].iter().map(|m| m["payload"]["data"].clone()).collect();
    assert_eq!(events.len(), 501, "every retained event, then the live one");
    assert_eq!(events[500], "live");
    assert!(h.core.conn(key).is_some_and(|c| c.closing.is_none()), "a resume is not a slow consumer");
}

#[test]
fn gauges_return_to_zero_however_a_client_leaves() {
    let mut h = Harness::new(|_| {});
    let subscribe = text(r#"{"type":"subscribe","payload":{"topics":["a","b.*"]}}"#);
    // Close frame, then the peer's EOF.
    let a = h.websocket("/ws");
    h.input(a, &subscribe);
    // Abort.
    let b = h.websocket("/ws");
    h.input(b, &subscribe);
    // Slow consumer.
    let c = h.websocket("/ws");
    h.input(c, &subscribe);
    // SSE.
    let d = h.connect();
    h.input(d, b"GET /sse?topics=a HTTP/1.1\r\nHost: t\r\n\r\n");
    for key in [a, b, c, d] {
        h.output(key);
    }
    assert_eq!(h.gauges(), (0, 3, 1, 4), "one subscription each, the SSE stream's too");
    h.input(a, &masked(8, &1000u16.to_be_bytes()));
    assert_eq!(h.frames(a).last().and_then(Frame::close_code), Some(1000), "close answered");
    h.core.handle_eof(a, h.now);
    h.core.remove(b);
    h.core.handle_eof(d, h.now);
    for i in 0..4000 {
        h.publish("a", &format!(r#""{}-{i}""#, "x".repeat(400)));
        h.turn();
    }
    assert!(h.core.conn(c).is_some_and(|conn| conn.closing.is_some()), "over its bound");
    h.advance(super::SLOW_CONSUMER_LINGER);
    assert!(h.core.conn(c).is_none());
    assert_eq!(h.gauges(), (0, 0, 0, 0), "every gauge back to zero");
    assert_eq!(h.core.poll_closed().len(), 4);
}

#[test]
fn a_closing_connection_is_shut_once_its_queue_is_written() {
    let mut h = Harness::new(|_| {});
    let key = h.connect();
    h.input(key, b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
    h.core.poll_transmit(h.now);
    let mut out = Vec::new();
    assert_eq!(h.core.write_to(key, &mut out, h.now), AfterWrite::Shutdown);
    assert_eq!(h.core.write_to(key, &mut out, h.now), AfterWrite::Keep, "shut once");
    h.core.handle_eof(key, h.now);
    assert!(h.core.conn(key).is_none());
}

#[test]
fn a_half_closed_requests_answer_is_written_whole_however_often_the_end_is_seen() {
    let mut h = Harness::new(|_| {});
    for i in 0..200 {
        h.publish("a", &format!(r#""{}-{i}""#, "x".repeat(400)));
    }
    h.turn();
    let key = h.connect();
    h.input(key, b"GET /history?topics=a HTTP/1.1\r\nHost: t\r\n\r\n");
    h.core.handle_eof(key, h.now);
    h.core.poll_transmit(h.now);
    let mut got = Vec::new();
    assert_eq!(h.core.write_to(key, &mut Slow { got: &mut got, room: 1000 }, h.now), AfterWrite::Keep);
    // The socket says "read closed" again while the answer waits for room.
    h.core.handle_eof(key, h.now);
    assert!(h.core.conn(key).is_some(), "the answer is not cut");
    assert_eq!(h.core.write_to(key, &mut got, h.now), AfterWrite::Shutdown);
    let text = String::from_utf8_lossy(&got);
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole head");
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(|v| v.trim().parse().unwrap()))
        .expect("content-length");
    assert!(length > 50_000, "a large answer: {length}");
    assert_eq!(body.len(), length, "written whole");
    h.core.handle_eof(key, h.now);
    assert!(h.core.conn(key).is_none(), "gone once it was written");
}

/// Everything the connection writes until it has nothing more (a reader keeping up).
fn read_all(h: &mut Harness, key: usize) -> Vec<Frame> {
    let mut got = Vec::new();
    for _ in 0..1_000 {
        let frames = h.frames(key);
        if frames.is_empty() {
            break;
        }
        got.extend(frames);
    }
    got
}

/// A harness with `n` retained events of about 400 bytes on topic `a`, and a WebSocket
/// subscribed to `a` from before the first of them that has read nothing since (a replay
/// far larger than one refill, mostly still in its backlog).
fn resuming(n: usize) -> (Harness, usize) {
    let mut h = Harness::new(|c| c.max_outbound_bytes = 32 * 1024);
    h.publish("a", r#""first""#);
    h.turn();
    let first = h.shared.bus.newest(1, h.now, |_| true)[0].id.to_string();
    for i in 0..n {
        h.publish("a", &format!(r#""{}-{i}""#, "x".repeat(400)));
    }
    h.turn();
    let key = h.websocket("/ws");
    let subscribe =
        format!(r#"{{"type":"subscribe","payload":{{"subscription_id":"s","topics":["a"],"since":"{first}"}}}}"#);
    h.input(key, &text(&subscribe));
    (h, key)
}

#[test]
fn nothing_follows_a_close_frame_even_with_a_replay_pending() {
    let (mut h, key) = resuming(500);
    h.shared.bus.inboxes()[0].request(Lifecycle::Drain);
    h.turn();
    let rest = read_all(&mut h, key);
    assert_eq!(rest[0].json()["payload"]["recovered"], true);
    let close = rest.iter().position(|f| f.opcode == 8).expect("a close frame");
    assert_eq!(rest[close].close_code(), Some(1001));
    assert_eq!(rest.len(), close + 1, "frames after the close frame: {:?}", &rest[close + 1..]);
}

#[test]
fn unsubscribe_ends_its_replay_before_the_ack() {
    let (mut h, key) = resuming(500);
    h.input(key, &text(r#"{"type":"unsubscribe","payload":{"subscription_id":"s"}}"#));
    let rest = read_all(&mut h, key);
    assert!(event_data(&rest).len() < 100, "most of the replay was still to come");
    let ack = rest.iter().position(|f| f.json()["payload"]["status"] == "unsubscribed").expect("the ack");
    let after: Vec<_> = rest[ack + 1..].iter().map(Frame::json).collect();
    assert!(after.is_empty(), "after the unsubscribed ack: {after:?}");
    assert!(h.core.conn(key).is_some_and(|c| c.state_bytes() == 0), "the replay cursor is released");
}

#[test]
fn a_connection_keeps_one_timer_entry_however_often_it_pauses() {
    let mut h = Harness::new(|c| {
        c.rate_per_second = 10;
        c.rate_burst = 1;
    });
    let key = h.websocket("/ws");
    let ping = text(r#"{"type":"ping"}"#);
    for _ in 0..50 {
        h.input(key, &[ping.clone(), ping.clone()].concat());
        h.core.budget_spent(key, h.now);
        assert_eq!(h.core.timer_entries(), 1, "one deadline per connection, moved in place");
        h.advance(super::LIMITED_READ_PAUSE);
        assert_eq!(h.core.take_read_again(), [key]);
    }
    let frames = h.frames(key);
    assert!(frames.iter().all(|f| f.opcode != 9), "no heartbeat ran early or twice: {frames:?}");
}

#[test]
fn coalescing_follows_this_nodes_clock_not_the_publishers() {
    let mut h = Harness::new(|c| c.write_coalescing_max_ms = 20);
    let key = h.subscriber_of_a();
    // Entries stamped by a node whose clock runs five seconds ahead of... behind ours.
    let skewed = std::time::SystemTime::now() - Duration::from_secs(5);
    let mut timestamp = String::new();
    crate::protocol::push_timestamp(&mut timestamp, skewed);
    let raw = serde_json::value::RawValue::from_string(r#"{"topic":"a","data":1}"#.into()).unwrap();
    let request = crate::protocol::PublishRequest::from_json(&raw, "").unwrap();
    let entries: Vec<_> = (1..=20u64)
        .map(|n| crate::event::StreamEntry {
            id: format!("1-{n}"),
            key: (1, n),
            timestamp: timestamp.clone(),
            prepared: crate::event::Prepared::all(vec![request.clone()], 1024).unwrap().remove(0),
        })
        .collect();
    h.shared.bus.ingest(0, entries, |_| None);
    h.turn();
    let window = h.shared.counters[0].coalescing_us.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(window, 0, "events that waited no time here do not open the coalescing window");
    assert_eq!(event_data(&read_all(&mut h, key)).len(), 20);
}

/// The `error` codes of the frames.
fn error_codes(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .map(Frame::json)
        .filter(|m| m["type"] == "error")
        .map(|m| m["payload"]["code"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn the_state_budget_refuses_what_would_go_over_it_and_frees_on_unsubscribe() {
    let budget = 16 * 1024;
    let mut h = Harness::new(|c| c.max_connection_state_bytes = budget);
    let key = h.websocket("/ws");
    let topics: Vec<String> = (0..32).map(|i| format!("\"room.{i:03}\"")).collect();
    let mut refused_at = None;
    for i in 0..20 {
        let sub =
            format!(r#"{{"type":"subscribe","payload":{{"subscription_id":"s{i}","topics":[{}]}}}}"#, topics.join(","));
        h.input(key, &text(&sub));
        let codes = error_codes(&h.frames(key));
        assert!(h.core.conn(key).is_some_and(|c| c.state_bytes() <= budget), "never over the budget");
        if codes == ["limit_exceeded"] {
            refused_at = Some(i);
            break;
        }
    }
    let refused_at = refused_at.expect("the budget refused a subscription");
    assert!(refused_at >= 1, "a subscription of 32 topics fits in 16 KiB");
    let held = h.core.conn(key).map(|c| c.state_bytes()).unwrap();
    h.input(key, &text(r#"{"type":"unsubscribe","payload":{"subscription_id":"s0"}}"#));
    assert!(h.core.conn(key).map(|c| c.state_bytes()).unwrap() < held, "freed");
    let again =
        format!(r#"{{"type":"subscribe","payload":{{"subscription_id":"t","topics":[{}]}}}}"#, topics.join(","));
    h.input(key, &text(&again));
    assert!(error_codes(&h.frames(key)).is_empty(), "room again after an unsubscribe");
}

#[test]
fn sources_and_ids_are_capped() {
    let mut h = Harness::new(|_| {});
    let key = h.websocket("/ws");
    let sources: Vec<String> = (0..65).map(|i| format!("\"s{i}\"")).collect();
    let cases = [
        format!(r#"{{"type":"subscribe","payload":{{"topics":["a"],"sources":[{}]}}}}"#, sources.join(",")),
        format!(r#"{{"type":"subscribe","payload":{{"subscription_id":"{}","topics":["a"]}}}}"#, "i".repeat(129)),
        format!(r#"{{"type":"subscribe","payload":{{"topics":["a"],"correlation_id":"{}"}}}}"#, "c".repeat(129)),
        format!(r#"{{"type":"subscribe","payload":{{"topics":["a"],"since":"{}"}}}}"#, "9".repeat(1025)),
        format!(r#"{{"type":"ping","message_id":"{}"}}"#, "m".repeat(129)),
        format!(r#"{{"type":"request","payload":{{"action":"history","sources":[{}]}}}}"#, sources.join(",")),
    ];
    for case in &cases {
        h.input(key, &text(case));
        assert_eq!(error_codes(&h.frames(key)), ["limit_exceeded"], "{case}");
    }
    let ok = format!(r#"{{"type":"subscribe","payload":{{"topics":["a"],"sources":[{}]}}}}"#, sources[..64].join(","));
    h.input(key, &text(&ok));
    assert!(error_codes(&h.frames(key)).is_empty(), "64 sources are allowed");
}

#[test]
fn one_stats_read_in_flight_per_connection() {
    let mut h = Harness::new(|_| {});
    let key = h.websocket("/ws");
    let stats = text(r#"{"type":"request","message_id":"m","payload":{"action":"stats"}}"#);
    // Two in one read: the first is still being gathered when the second arrives.
    h.input(key, &[stats.clone(), stats.clone()].concat());
    let frames = h.frames(key);
    assert_eq!(error_codes(&frames), ["overloaded"], "the second waits for nothing");
    h.turn();
    let answered: Vec<_> = h.frames(key).iter().map(Frame::json).collect();
    assert_eq!(answered.len(), 1);
    assert_eq!(answered[0]["type"], "response");
    assert!(answered[0]["payload"]["connections"].is_object());
    h.input(key, &stats);
    h.turn();
    assert_eq!(h.frames(key).iter().filter(|f| f.json()["type"] == "response").count(), 1, "answered: room again");
    assert_eq!(h.shared.stats_gathers.load(std::sync::atomic::Ordering::Acquire), 0, "every place given back");
}

#[test]
fn a_full_control_queue_answers_overloaded_instead_of_buffering() {
    let mut h = Harness::new(|_| {});
    let key = h.websocket("/ws");
    let places = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reply_to = crate::mailbox::ReplyTo { shard: 0, key: usize::MAX, conn_id: 0 };
    let filler = Arc::new(crate::mailbox::StatsRead {
        gather: crate::metrics::Gather::new(1, &places, 1).expect("a place"),
        reply_to,
        format: crate::metrics::StatsFormat::Json,
    });
    while h.shared.bus.inboxes()[0].send(crate::mailbox::Control::Collect(filler.clone())).is_ok() {}
    assert_eq!(h.shared.bus.inboxes()[0].control.len(), crate::mailbox::CONTROL_CAPACITY, "bounded");
    h.input(key, &text(r#"{"type":"request","payload":{"action":"stats"}}"#));
    assert_eq!(error_codes(&h.frames(key)), ["overloaded"]);
    let http = h.connect();
    h.input(http, b"GET /stats HTTP/1.1\r\nHost: t\r\n\r\n");
    let answer = String::from_utf8_lossy(&h.output(http)).to_string();
    assert!(answer.starts_with("HTTP/1.1 503 Service Unavailable"), "{answer}");
    assert!(answer.contains("\"overloaded\"") && answer.contains("Retry-After: 1"), "{answer}");
}

#[test]
fn websocket_stats_follows_the_operators_rule() {
    // With admin_listen set, the operators' views are served there only (which serves no
    // WebSocket), so the public listener's `stats` request is refused.
    let mut h = Harness::new(|c| c.admin_listen = "127.0.0.1:0".into());
    let key = h.websocket("/ws");
    h.input(key, &text(r#"{"type":"request","payload":{"action":"stats"}}"#));
    assert_eq!(error_codes(&h.frames(key)), ["forbidden"], "served on admin_listen only");
    // Without it (and auth off) anyone may read them.
    let mut h = Harness::new(|_| {});
    let key = h.websocket("/ws");
    h.input(key, &text(r#"{"type":"request","payload":{"action":"stats"}}"#));
    h.turn();
    assert!(h.frames(key).iter().any(|f| f.json()["type"] == "response"));
}

/// A reader that takes at most `room` bytes per write call into `got`, then blocks.
struct Slow<'a> {
    got: &'a mut Vec<u8>,
    room: usize,
}

impl std::io::Write for Slow<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_vectored(&[std::io::IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(self.room - n);
            self.got.extend_from_slice(&b[..take]);
            n += take;
        }
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.room -= n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One resuming client of the model test: its bytes so far and what it must receive.
struct Resumer {
    key: usize,
    bytes: Vec<u8>,
    pattern: &'static str,
    /// `Some(i)`: resumed after event `i` of this run; `None`: must say `recovered:false`.
    after: Option<usize>,
    /// Events of this run when it subscribed.
    subscribed_at: usize,
}

/// Resume is exact by construction, as a property: random schedules of publishes,
/// restarts (a new process: a new bus and epoch, the old history gone), resumes from any
/// id ever published (this run's, an earlier run's, evicted ones) read slowly while more
/// is published. Every resume yields exactly the retained matching events after its id,
/// in order, then the live ones; or `recovered:false` and only live events. Never
/// `recovered:true` with a gap.
#[test]
fn resume_model_random_schedules() {
    const RETAINED: usize = 40;
    const TOPICS: [&str; 3] = ["a.x", "a.y", "b.x"];
    const PATTERNS: [&str; 3] = ["a.*", ">", "a.x"];
    let matches = |pattern: &str, topic: &str| match pattern {
        ">" => true,
        "a.*" => topic.starts_with("a."),
        exact => exact == topic,
    };
    let mut seed: u64 = std::env::var("VOLLEY_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut random = move |n: usize| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    let config = |c: &mut Config| {
        c.history_max_events = RETAINED;
        c.max_outbound_bytes = 32 * 1024;
    };
    let mut h = Harness::new(config);
    // This run's events (id, topic); ids of earlier runs.
    let mut run: Vec<(String, &str)> = Vec::new();
    let mut earlier: Vec<String> = Vec::new();
    let mut resumers: Vec<Resumer> = Vec::new();
    let mut checked = (0, 0);
    for step in 0..3_000 {
        match random(20) {
            0..=9 => {
                let topic = TOPICS[random(TOPICS.len())];
                h.publish(topic, &step.to_string());
                let id = h.shared.bus.newest(1, h.now, |_| true)[0].id.to_string();
                run.push((id, topic));
                h.turn();
            }
            10..=13 => {
                let since = match random(4) {
                    0 if !earlier.is_empty() => Some(earlier[random(earlier.len())].clone()),
                    1 => Some("garbage".to_string()),
                    _ if !run.is_empty() => Some(run[random(run.len())].0.clone()),
                    _ => None,
                };
                let Some(since) = since else { continue };
                let after = run.iter().position(|(id, _)| *id == since).filter(|&i| i + 1 + RETAINED >= run.len());
                let pattern = PATTERNS[random(PATTERNS.len())];
                let key = h.websocket("/ws");
                h.frames(key);
                let subscribe =
                    format!(r#"{{"type":"subscribe","payload":{{"topics":["{pattern}"],"since":"{since}"}}}}"#);
                h.input(key, &text(&subscribe));
                resumers.push(Resumer { key, bytes: Vec::new(), pattern, after, subscribed_at: run.len() });
            }
            14..=17 if !resumers.is_empty() => {
                // A slow read by one resuming client.
                let r = random(resumers.len());
                let room = 1 + random(4096);
                h.ready.extend(h.core.poll_transmit(h.now));
                if h.ready.remove(&resumers[r].key) {
                    let Resumer { key, bytes, .. } = &mut resumers[r];
                    let _ = h.core.write_to(*key, &mut Slow { got: bytes, room }, h.now);
                    h.ready.insert(*key);
                }
            }
            18 => {
                // Restart: what a client saw of the old run can no longer be resumed.
                let finished = std::mem::take(&mut resumers);
                checked = check_resumers(&mut h, finished, &run, matches, checked);
                earlier.extend(run.drain(..).map(|(id, _)| id));
                std::thread::sleep(Duration::from_millis(2)); // a new epoch (milliseconds)
                h = Harness::new(config);
            }
            _ => h.advance(Duration::from_millis(1)),
        }
    }
    let finished = std::mem::take(&mut resumers);
    let (exact, unrecovered) = check_resumers(&mut h, finished, &run, matches, checked);
    assert!(exact > 50 && unrecovered > 20, "the schedule exercised both outcomes: {exact} exact, {unrecovered} not");
}

/// Reads every resumer to the end and checks it against the model; (exact, unrecovered)
/// counts so far.
fn check_resumers(
    h: &mut Harness,
    resumers: Vec<Resumer>,
    run: &[(String, &str)],
    matches: impl Fn(&str, &str) -> bool,
    (mut exact, mut unrecovered): (usize, usize),
) -> (usize, usize) {
    for mut r in resumers {
        h.turn();
        loop {
            let mut more = Vec::new();
            h.ready.extend(h.core.poll_transmit(h.now));
            h.ready.remove(&r.key);
            let _ = h.core.write_to(r.key, &mut Slow { got: &mut more, room: usize::MAX }, h.now);
            if more.is_empty() {
                break;
            }
            r.bytes.extend(more);
        }
        let messages: Vec<Value> = frames(&r.bytes).iter().map(Frame::json).collect();
        let ack = messages.iter().find(|m| m["type"] == "ack").expect("a subscribe ack");
        let got: Vec<&str> =
            messages.iter().filter(|m| m["type"] == "event").filter_map(|m| m["message_id"].as_str()).collect();
        let live = run[r.subscribed_at..].iter().filter(|(_, t)| matches(r.pattern, t));
        let want: Vec<&str> = match r.after {
            Some(i) => {
                assert_eq!(ack["payload"]["recovered"], true, "{ack}");
                exact += 1;
                run[i + 1..r.subscribed_at]
                    .iter()
                    .filter(|(_, t)| matches(r.pattern, t))
                    .chain(live)
                    .map(|(id, _)| id.as_str())
                    .collect()
            }
            None => {
                assert_eq!(ack["payload"]["recovered"], false, "{ack}");
                unrecovered += 1;
                live.map(|(id, _)| id.as_str()).collect()
            }
        };
        let slow_consumer = frames(&r.bytes).iter().any(|f| f.close_code() == Some(1013));
        if slow_consumer {
            // Dropped for falling behind (it resumes again): what it got is a prefix.
            assert_eq!(got, want[..got.len()], "resumed {:?} on {}, then dropped", r.after, r.pattern);
        } else {
            assert_eq!(got, want, "resumed {:?} on {}", r.after, r.pattern);
        }
    }
    (exact, unrecovered)
}

/// Stream entries of topic `a` with ids `1-n` for `ns`.
fn entries_of_a(ns: std::ops::RangeInclusive<u64>) -> Vec<crate::event::StreamEntry> {
    let mut timestamp = String::new();
    crate::protocol::push_timestamp(&mut timestamp, std::time::SystemTime::now());
    let raw = serde_json::value::RawValue::from_string(r#"{"topic":"a","data":1}"#.into()).unwrap();
    let request = crate::protocol::PublishRequest::from_json(&raw, "").unwrap();
    ns.map(|n| crate::event::StreamEntry {
        id: format!("1-{n}"),
        key: (1, n),
        timestamp: timestamp.clone(),
        prepared: crate::event::Prepared::all(vec![request.clone()], 1024).unwrap().remove(0),
    })
    .collect()
}

/// With a sharded engine, a resume over a shard this node does not read waits for that
/// shard's load, counting as interest meanwhile, and is acknowledged `recovered:true`
/// with the replay once the load is done; one whose shard never loads gives up after
/// three seconds (manual clock) with `recovered:false`.
#[test]
fn a_resume_over_a_shard_not_loaded_waits_for_its_load_or_gives_up() {
    let mut h = Harness::new(|c| {
        c.engine = "redis://127.0.0.1:1,redis://127.0.0.1:2".into();
        c.engine_shards = 2;
    });
    let interest = h.shared.interest.clone().expect("sharded");
    let placement = crate::placement::Placement::new(2, 1);
    let shard = placement.shard_of("a");
    let key = h.websocket("/ws");
    let since = crate::positions::encode_own(shard, (1, 2));
    let subscribe = format!(r#"{{"type":"subscribe","payload":{{"topics":["a"],"since":"{since}"}}}}"#);
    h.input(key, &text(&subscribe));
    assert!(h.frames(key).is_empty(), "no ack before the shard is loaded");
    assert!(interest.wanted(shard), "the waiting resume starts the shard's reader");
    h.advance(Duration::from_millis(100));
    assert!(h.frames(key).is_empty());
    h.shared.bus.start_shard(shard, None);
    h.shared.bus.preload(shard, entries_of_a(1..=5), true);
    h.turn();
    let frames = read_all(&mut h, key);
    let ack = frames.iter().map(Frame::json).find(|m| m["type"] == "ack").expect("acknowledged");
    assert_eq!(ack["payload"]["recovered"], true, "{ack}");
    assert_eq!(event_data(&frames).len(), 3, "events 3, 4 and 5 replayed");
    assert!(interest.wanted(shard), "the subscription itself wants it now");

    // The other shard never loads: after three seconds, live only.
    let other = 1 - shard;
    let topic = (0..100).map(|i| format!("t{i}")).find(|t| placement.shard_of(t) == other).unwrap();
    let since = crate::positions::encode_own(other, (1, 1));
    let subscribe = format!(r#"{{"type":"subscribe","payload":{{"topics":["{topic}"],"since":"{since}"}}}}"#);
    h.input(key, &text(&subscribe));
    assert!(h.frames(key).is_empty());
    let parked_at = h.now;
    assert_eq!(h.core.poll_timeout(), Some(parked_at + Duration::from_millis(250)), "waiting has deadlines");
    h.advance(Duration::from_millis(250));
    assert_eq!(h.core.poll_timeout(), Some(parked_at + Duration::from_secs(3)), "not loaded: the long one");
    h.advance(Duration::from_millis(2_749));
    assert!(h.frames(key).is_empty());
    h.advance(Duration::from_millis(1));
    let ack = h.frames(key).iter().map(Frame::json).find(|m| m["type"] == "ack").expect("acknowledged");
    assert_eq!(ack["payload"]["recovered"], false, "{ack}");
}

/// A resume from a node that was ahead waits (briefly) until this node has read as far,
/// so nothing it already had comes again and the ids it is given never fall behind.
#[test]
fn a_resume_from_a_node_ahead_waits_until_this_one_has_read_as_far() {
    let mut h = Harness::new(|c| {
        c.engine = "redis://127.0.0.1:1,redis://127.0.0.1:2".into();
        c.engine_shards = 2;
    });
    let shard = crate::placement::Placement::new(2, 1).shard_of("a");
    h.shared.bus.start_shard(shard, None);
    h.shared.bus.preload(shard, entries_of_a(1..=5), true);
    h.turn();
    let key = h.websocket("/ws");
    let since = crate::positions::encode_own(shard, (1, 8));
    h.input(key, &text(&format!(r#"{{"type":"subscribe","payload":{{"topics":["a"],"since":"{since}"}}}}"#)));
    assert!(h.frames(key).is_empty(), "this node has read 1-5 only");
    h.shared.bus.ingest(shard, entries_of_a(6..=9), |_| None);
    h.turn();
    let frames = read_all(&mut h, key);
    let ack = frames.iter().map(Frame::json).find(|m| m["type"] == "ack").expect("acknowledged");
    assert_eq!(ack["payload"]["recovered"], true, "{ack}");
    let ids: Vec<String> = frames
        .iter()
        .map(Frame::json)
        .filter(|m| m["type"] == "event")
        .map(|m| m["message_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "only 1-9: it had 6, 7 and 8 ({ids:?})");
    let (_, at) = crate::positions::decode(&ids[0], 2).unwrap();
    assert_eq!(at[shard as usize], (1, 9));
}
