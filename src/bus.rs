//! The bus: where a publish gets its place in the one total order and reaches every shard.
//!
//! Ordering choice (ARCHITECTURE.md option b): one short critical section assigns the
//! next sequence number, stamps the time, builds the event's bytes once (event JSON,
//! WebSocket frame, SSE head), appends it to the history and pushes a reference onto every
//! shard's lock-free inbound queue, all in the same order; shards are woken after the lock
//! is released, once per batch. On two to a few cores one uncontended mutex costs less than
//! a sequencer thread's hand-off and is far simpler than a multi-producer ring; what runs
//! inside it is a memcpy of pre-escaped JSON, never serialization. The bus owns event ids
//! (`<epoch>-<seq>`) and the shard inboxes; it never touches sockets or connections.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crossbeam_queue::{ArrayQueue, SegQueue};
use mio::Waker;

use crate::history::{History, NotRecoverable, Retention};
use crate::protocol::{self, EVENT_HEAD, EVENT_MID, PublishRequest};

/// One published event, encoded once and shared by every receiver and the history.
#[derive(Debug)]
pub struct Event {
    /// Position in the total order (1-based).
    pub seq: u64,
    /// The opaque id clients see.
    pub id: Box<str>,
    /// Concrete topic.
    pub topic: Box<str>,
    /// Source, `""` when none.
    pub source: Box<str>,
    /// Correlation id, if any.
    pub correlation_id: Option<Box<str>>,
    /// When the bus accepted it (for latency histograms and history age).
    pub published_at: Instant,
    /// The WebSocket text frame: header then the event JSON.
    ws_frame: Box<[u8]>,
    json_start: usize,
    /// `id: <id>\ndata: ` — the SSE frame is this, the JSON, and `\n\n`.
    sse_head: Box<[u8]>,
}

impl Event {
    /// The event message JSON, as every receiver gets it.
    pub fn json(&self) -> &[u8] {
        &self.ws_frame[self.json_start..]
    }

    /// The complete unmasked WebSocket text frame.
    pub fn ws_frame(&self) -> &[u8] {
        &self.ws_frame
    }

    /// The SSE frame's head; write it, then [`Self::json`], then `\n\n`.
    pub fn sse_head(&self) -> &[u8] {
        &self.sse_head
    }

    /// Bytes this event holds, as counted against the history bound.
    pub fn retained_bytes(&self) -> usize {
        self.ws_frame.len() + self.sse_head.len() + self.id.len() + self.topic.len() + self.source.len()
    }
}

/// Where a reply is owed when a publish with `?wait=1` has been queued everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The shard holding the connection.
    pub shard: usize,
    /// The connection's slab key.
    pub key: usize,
    /// The connection's unique id (slab keys are reused).
    pub conn_id: u64,
}

/// Counts, for a `?wait=1` publish, how many connections each event was queued to.
#[derive(Debug)]
pub struct PublishTicket {
    remaining: AtomicUsize,
    delivered: Box<[AtomicUsize]>,
    /// Who to tell when every shard has queued every event.
    pub reply_to: ReplyTo,
    /// The ids, in request order.
    pub ids: Vec<Box<str>>,
}

impl PublishTicket {
    /// Per event, the connections it was queued to.
    pub fn delivered(&self) -> Vec<usize> {
        self.delivered.iter().map(|d| d.load(Ordering::Acquire)).collect()
    }
}

/// An event on its way to one shard.
#[derive(Debug)]
pub struct Delivery {
    /// The shared event.
    pub event: Arc<Event>,
    /// For `?wait=1`: the ticket and this event's index in it.
    pub ticket: Option<(Arc<PublishTicket>, usize)>,
}

impl Delivery {
    /// Records that this shard queued the event to `count` connections; returns the
    /// ticket when this was the last shard and event to report.
    pub fn report(&self, count: usize) -> Option<Arc<PublishTicket>> {
        let (ticket, index) = self.ticket.as_ref()?;
        ticket.delivered[*index].fetch_add(count, Ordering::AcqRel);
        (ticket.remaining.fetch_sub(1, Ordering::AcqRel) == 1).then(|| ticket.clone())
    }
}

/// Messages between shards other than events (few, bounded by connections).
#[derive(Debug)]
pub enum Control {
    /// Every shard has queued a `?wait=1` publish.
    PublishDone(Arc<PublishTicket>),
    /// Add this shard's histograms to a stats read.
    Collect(Arc<crate::metrics::Gather>),
    /// Every shard has added to a stats read this shard asked for.
    StatsReady(Arc<crate::metrics::Gather>),
    /// Begin a graceful drain.
    Drain,
    /// Stop now.
    Stop,
}

/// One shard's inbound side: the event queue, the control queue and its waker.
#[derive(Debug)]
pub struct Inbox {
    /// Events in publish order.
    pub events: ArrayQueue<Delivery>,
    /// Control messages.
    pub control: SegQueue<Control>,
    waker: Waker,
    wake_pending: AtomicBool,
}

impl Inbox {
    /// An inbox woken through `waker`, holding at most `capacity` events.
    pub fn new(waker: Waker, capacity: usize) -> Self {
        Self {
            events: ArrayQueue::new(capacity),
            control: SegQueue::new(),
            waker,
            wake_pending: AtomicBool::new(false),
        }
    }

    /// Wakes the shard unless a wake-up is already pending.
    pub fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::AcqRel) {
            let _ = self.waker.wake();
        }
    }

    /// Called by the shard before it drains, so later pushes wake it again.
    pub fn clear_wake(&self) {
        self.wake_pending.store(false, Ordering::Release);
    }

    /// Sends a control message and wakes the shard.
    pub fn send(&self, message: Control) {
        self.control.push(message);
        self.wake();
    }
}

/// Why a publish was refused; nothing of it was published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Event at this index would encode over `max_message_bytes`.
    #[error("event {0} is over max_message_bytes")]
    TooLarge(usize),
    /// A shard's inbound queue is full: the broker is overloaded.
    #[error("broker overloaded: shard queues are full")]
    Overloaded,
}

struct Ordered {
    history: History,
}

/// Counters the bus keeps.
#[derive(Debug, Default)]
pub struct BusCounters {
    /// Events published.
    pub published: AtomicU64,
    /// Publishes refused because a shard queue was full.
    pub refused_overloaded: AtomicU64,
}

/// The publish entry point shared by all shards.
pub struct Bus {
    ordered: Mutex<Ordered>,
    inboxes: Vec<Inbox>,
    epoch: String,
    max_message_bytes: usize,
    /// Counters.
    pub counters: BusCounters,
}

/// Longest id: 16 hex epoch digits, `-`, 20 decimal digits.
const MAX_ID_LEN: usize = 37;
/// `2026-11-23T12:00:00.123456Z`.
const TIMESTAMP_LEN: usize = 27;

impl Bus {
    /// A bus feeding `inboxes`, one per shard.
    pub fn new(inboxes: Vec<Inbox>, retention: Retention, max_message_bytes: usize) -> Self {
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Self {
            ordered: Mutex::new(Ordered { history: History::new(retention) }),
            inboxes,
            epoch: format!("{epoch:x}"),
            max_message_bytes,
            counters: BusCounters::default(),
        }
    }

    /// The shard inboxes.
    pub fn inboxes(&self) -> &[Inbox] {
        &self.inboxes
    }

    fn lock(&self) -> MutexGuard<'_, Ordered> {
        // A panic inside the critical section cannot leave it half-done in a way that
        // matters more than stopping the broker would, so poisoning is ignored.
        self.ordered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `requests` atomically and in order. With `reply_to`, a
    /// [`Control::PublishDone`] reaches that shard once every shard has queued them all.
    pub fn publish(
        &self,
        requests: &[PublishRequest],
        reply_to: Option<ReplyTo>,
    ) -> Result<Vec<Box<str>>, PublishError> {
        let tails: Vec<String> = requests.iter().map(PublishRequest::encoded_tail).collect();
        let overhead = EVENT_HEAD.len() + MAX_ID_LEN + EVENT_MID.len() + TIMESTAMP_LEN;
        if let Some(i) = tails.iter().position(|t| t.len() + overhead > self.max_message_bytes) {
            return Err(PublishError::TooLarge(i));
        }
        let ids = {
            let mut ordered = self.lock();
            let needed = requests.len();
            if self.inboxes.iter().any(|inbox| inbox.events.capacity() - inbox.events.len() < needed) {
                self.counters.refused_overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(PublishError::Overloaded);
            }
            let now = Instant::now();
            let wall = SystemTime::now();
            let mut timestamp = String::with_capacity(TIMESTAMP_LEN);
            protocol::push_timestamp(&mut timestamp, wall);
            let events: Vec<Arc<Event>> = requests
                .iter()
                .zip(&tails)
                .map(|(request, tail)| {
                    let seq = ordered.history.last_seq() + 1;
                    let event = Arc::new(self.encode(seq, request, tail, &timestamp, now));
                    ordered.history.push(event.clone(), now);
                    event
                })
                .collect();
            let ids: Vec<Box<str>> = events.iter().map(|e| e.id.clone()).collect();
            let ticket = reply_to.map(|reply_to| {
                Arc::new(PublishTicket {
                    remaining: AtomicUsize::new(events.len() * self.inboxes.len()),
                    delivered: (0..events.len()).map(|_| AtomicUsize::new(0)).collect(),
                    reply_to,
                    ids: ids.clone(),
                })
            });
            for inbox in &self.inboxes {
                for (index, event) in events.iter().enumerate() {
                    let delivery = Delivery { event: event.clone(), ticket: ticket.clone().map(|t| (t, index)) };
                    // Capacity was checked under this lock and only publishers push.
                    let _ = inbox.events.push(delivery);
                }
            }
            ids
        };
        self.counters.published.fetch_add(ids.len() as u64, Ordering::Relaxed);
        for inbox in &self.inboxes {
            inbox.wake();
        }
        Ok(ids)
    }

    fn encode(&self, seq: u64, request: &PublishRequest, tail: &str, timestamp: &str, now: Instant) -> Event {
        let id = format!("{}-{seq}", self.epoch);
        let json_len = EVENT_HEAD.len() + id.len() + EVENT_MID.len() + timestamp.len() + tail.len();
        let header_len = ws_header_len(json_len);
        let mut frame = Vec::with_capacity(header_len + json_len);
        push_ws_text_header(&mut frame, json_len);
        for part in [EVENT_HEAD, &id, EVENT_MID, timestamp, tail] {
            frame.extend_from_slice(part.as_bytes());
        }
        let sse_head = format!("id: {id}\ndata: ").into_bytes().into_boxed_slice();
        Event {
            seq,
            id: id.into_boxed_str(),
            topic: request.topic.as_str().into(),
            source: request.source.as_str().into(),
            correlation_id: request.correlation_id.as_deref().map(Into::into),
            published_at: now,
            ws_frame: frame.into_boxed_slice(),
            json_start: header_len,
            sse_head,
        }
    }

    /// The sequence number an id names, if it is one of this broker's (this epoch).
    pub fn parse_id(&self, id: &str) -> Option<u64> {
        let (epoch, seq) = id.split_once('-')?;
        (epoch == self.epoch).then(|| seq.parse().ok()).flatten()
    }

    /// Retained events after the id `since`, up to sequence `upto` (for a subscription:
    /// what the asking shard has already fanned out), that `keep` accepts. Also returns
    /// the sequence `since` names.
    pub fn replay(
        &self,
        since: &str,
        upto: u64,
        limit: usize,
        keep: impl FnMut(&Event) -> bool,
    ) -> Result<(u64, Vec<Arc<Event>>), NotRecoverable> {
        let seq = self.parse_id(since).ok_or(NotRecoverable)?;
        let mut ordered = self.lock();
        ordered.history.evict(Instant::now());
        Ok((seq, ordered.history.after(seq, upto, limit, keep)?))
    }

    /// The newest `limit` retained events up to `upto` that `keep` accepts, oldest first.
    pub fn newest(&self, upto: u64, limit: usize, keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        let mut ordered = self.lock();
        ordered.history.evict(Instant::now());
        ordered.history.newest(upto, limit, keep)
    }

    /// When the event named by `id` was published, while it is retained.
    pub fn published_at(&self, id: &str) -> Option<Instant> {
        let seq = self.parse_id(id)?;
        let ordered = self.lock();
        let events = ordered.history.after(seq.checked_sub(1)?, seq, 1, |_| true).ok()?;
        events.first().map(|e| e.published_at)
    }

    /// Sequence of the newest event published.
    pub fn last_seq(&self) -> u64 {
        self.lock().history.last_seq()
    }

    /// (events, bytes) retained.
    pub fn history_size(&self) -> (usize, usize) {
        let ordered = self.lock();
        (ordered.history.len(), ordered.history.bytes())
    }
}

/// Bytes of an unmasked frame header for a payload of `len`.
pub fn ws_header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    }
}

/// Appends the header of a final, unmasked text frame of `len` payload bytes (RFC 6455 §5.2).
pub fn push_ws_text_header(out: &mut Vec<u8>, len: usize) {
    out.push(0x81);
    match len {
        0..=125 => out.push(len as u8),
        126..=65_535 => {
            out.push(126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tungstenite::protocol::frame::FrameHeader;

    #[test]
    fn ws_header_agrees_with_tungstenite() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let mut ours = Vec::new();
            push_ws_text_header(&mut ours, len);
            assert_eq!(ours.len(), ws_header_len(len));
            let mut cursor = std::io::Cursor::new(ours);
            let (header, parsed_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(parsed_len, len as u64);
        }
    }

    fn bus(shards: usize, capacity: usize) -> (Bus, Vec<mio::Poll>) {
        let polls: Vec<_> = (0..shards).map(|_| mio::Poll::new().unwrap()).collect();
        let inboxes =
            polls.iter().map(|p| Inbox::new(Waker::new(p.registry(), mio::Token(0)).unwrap(), capacity)).collect();
        let retention = Retention { max_events: 3, max_age: Duration::from_secs(60), max_bytes: 1 << 20 };
        (Bus::new(inboxes, retention, 1024), polls)
    }

    fn req(topic: &str) -> PublishRequest {
        let raw =
            serde_json::value::RawValue::from_string(format!(r#"{{"topic":"{topic}","data":{{"n":1}}}}"#)).unwrap();
        PublishRequest::from_json(&raw, "").unwrap()
    }

    #[test]
    fn encodes_once_in_order_to_every_shard() {
        let (bus, _polls) = bus(2, 8);
        let ids = bus.publish(&[req("a"), req("b")], None).unwrap();
        for inbox in bus.inboxes() {
            let first = inbox.events.pop().unwrap();
            let second = inbox.events.pop().unwrap();
            assert_eq!((&*first.event.id, &*second.event.id), (&*ids[0], &*ids[1]));
            let v: serde_json::Value = serde_json::from_slice(first.event.json()).unwrap();
            assert_eq!(v["message_id"].as_str(), Some(&*ids[0]));
            assert_eq!(v["payload"]["topic"], "a");
        }
        let a = bus.inboxes()[0].events.len();
        assert_eq!(a, 0);
    }

    #[test]
    fn all_or_nothing_when_a_queue_is_full() {
        let (bus, _polls) = bus(2, 2);
        assert_eq!(bus.publish(&[req("a"), req("b"), req("c")], None), Err(PublishError::Overloaded));
        assert_eq!(bus.last_seq(), 0);
        let big = PublishRequest {
            data: serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(2000))).unwrap(),
            ..req("a")
        };
        assert_eq!(bus.publish(&[req("a"), big], None), Err(PublishError::TooLarge(1)));
    }

    #[test]
    fn replay_window_and_foreign_ids() {
        let (bus, _polls) = bus(1, 64);
        let ids: Vec<_> = (0..5).flat_map(|_| bus.publish(&[req("a")], None).unwrap()).collect();
        // Retention 3: events 3, 4, 5 are kept, so only ids 2.. can be resumed.
        assert!(bus.replay(&ids[0], 5, 100, |_| true).is_err());
        let (seq, got) = bus.replay(&ids[1], 5, 100, |_| true).unwrap();
        assert_eq!(seq, 2);
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(bus.replay(&ids[2], 4, 100, |_| true).unwrap().1.len(), 1);
        assert_eq!(bus.replay(&ids[4], 5, 100, |_| true).unwrap().1.len(), 0);
        assert_eq!(bus.replay(&ids[3], 2, 100, |_| true).unwrap().1.len(), 0, "a shard behind the id replays nothing");
        assert!(bus.replay("0-1", 5, 100, |_| true).is_err());
        assert!(bus.replay("garbage", 5, 100, |_| true).is_err());
        let future = format!("{}-99", bus.epoch);
        assert!(bus.replay(&future, 5, 100, |_| true).is_err());
    }
}
