//! One connection's state: what phase it is in and what is queued for it.
//!
//! Owns [`Conn`] with its explicit [`State`] (`Http` → `WebSocket` | `Sse`) and its
//! closing phase ([`Closing`], which keeps the state, so what the connection held is still
//! known when it is removed), the outbound queue of whole frames ([`Outbound`]: owned bytes
//! or references to shared events, written with one vectored write), the [`Backlog`] of
//! events that wait outside it (a resume's replay and what arrives behind it), the one
//! bound over all of them ([`Conn::queued_bytes`]), and subscription filters. It holds no
//! socket and reads no clock: time comes in as arguments and writing goes to any `Write`,
//! so it is tested and fuzzed without sockets. Routing and fan-out belong to `core`.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use smallvec::SmallVec;

use crate::deflate::{Agreement, Window};
use crate::event::{After, Event};
use crate::limits::TokenBucket;
use crate::topic::Pattern;
use crate::ws::Codec;

/// A shard's own handle on a shared event. Every receiver's queue holds a clone; an
/// `Arc` cloned per receiver would have every shard's core write the same reference
/// count for each delivery (that cache line bouncing was about 15 % of a saturated
/// shard's samples). The bytes are still the bus's one encoding.
pub type LocalEvent = Rc<Arc<Event>>;

/// A batch-mode connection's events not yet turned into a `batch` message, with the bytes
/// they will take (kept as they come, so the outbound bound is checked without a scan).
#[derive(Debug, Default)]
pub struct PendingBatch {
    events: Vec<LocalEvent>,
    bytes: usize,
}

impl PendingBatch {
    /// Adds an event.
    pub fn push(&mut self, event: LocalEvent) {
        self.bytes += event.json().len() + 1;
        self.events.push(event);
    }

    /// Bytes of event JSON waiting, a separator each.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Takes the waiting events, leaving none.
    pub fn take(&mut self) -> Vec<LocalEvent> {
        self.bytes = 0;
        std::mem::take(&mut self.events)
    }
}

/// What the outbound queue holds: whole frames or responses.
#[derive(Debug)]
pub enum Chunk {
    /// Bytes made for this connection only (responses, control frames). Boxed so a queue
    /// entry is 16 bytes: events are most entries, and near capacity the first store into
    /// each connection's queue was the largest user-space cost (a cache miss per delivery).
    Owned(Box<Vec<u8>>),
    /// A shared event as a WebSocket frame: compressed for the window given (decided when
    /// queued, once the compressed frame exists, so its length never changes in the queue).
    WsEvent(LocalEvent, Option<Window>),
    /// A shared event as an SSE frame.
    SseEvent(LocalEvent),
}

const _: () = assert!(std::mem::size_of::<Chunk>() == 16, "a queue entry is two words");

impl Chunk {
    fn parts(&self) -> [&[u8]; 3] {
        match self {
            Chunk::Owned(bytes) => [bytes, &[], &[]],
            Chunk::WsEvent(event, window) => {
                [window.and_then(|w| event.deflated_frame(w)).unwrap_or(event.ws_frame()), &[], &[]]
            }
            Chunk::SseEvent(event) => [event.sse_head(), event.json(), crate::sse::EVENT_END],
        }
    }

    fn len(&self) -> usize {
        self.parts().iter().map(|p| p.len()).sum()
    }

    fn event(&self) -> Option<&Event> {
        match self {
            Chunk::Owned(_) => None,
            Chunk::WsEvent(e, _) | Chunk::SseEvent(e) => Some(e),
        }
    }

    fn compressed(&self) -> bool {
        matches!(self, Chunk::WsEvent(_, Some(_)))
    }
}

/// Most slices handed to one vectored write (`sendmsg`).
const MAX_IOV: usize = 64;

/// A connection's queue of frames to write, bounded by the caller through [`Self::bytes`].
#[derive(Debug, Default)]
pub struct Outbound {
    queue: VecDeque<Chunk>,
    /// Bytes of the front chunk already written.
    written: usize,
    bytes: usize,
    /// Owned chunks queued: replies and control frames, which never wait for company.
    owned: usize,
    /// The last frame (a close frame, a final response) is queued: nothing more is.
    sealed: bool,
}

impl Outbound {
    /// Bytes queued and not yet written.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Nothing left to write.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Holds something besides shared events (a reply, a ping, a close).
    pub fn has_owned(&self) -> bool {
        self.owned > 0
    }

    /// Queues a chunk, unless the queue is sealed.
    pub fn push(&mut self, chunk: Chunk) {
        let len = chunk.len();
        if len == 0 || self.sealed {
            return;
        }
        self.bytes += len;
        self.owned += usize::from(chunk.event().is_none());
        self.queue.push_back(chunk);
    }

    /// Queues owned bytes.
    pub fn push_bytes(&mut self, bytes: Vec<u8>) {
        self.push(Chunk::Owned(Box::new(bytes)));
    }

    /// Ends the stream here: whatever is pushed from now on is discarded (RFC 6455 §5.5.1:
    /// nothing follows a close frame; nothing follows a response that closes HTTP).
    pub fn seal(&mut self) {
        self.sealed = true;
    }

    /// Drops every queued event not yet begun (a slow consumer's backlog); returns how
    /// many. Frames already partly written stay, so the stream stays well-formed.
    pub fn drop_unstarted_events(&mut self) -> usize {
        let keep_front = usize::from(self.written > 0);
        let before = self.queue.len();
        let mut index = 0;
        self.queue.retain(|chunk| {
            let keep = index < keep_front || chunk.event().is_none();
            index += 1;
            keep
        });
        self.bytes = self.queue.iter().map(Chunk::len).sum::<usize>() - self.written;
        before - self.queue.len()
    }

    /// Writes as much as `w` takes. Calls `on_event` for each event whose frame was
    /// completely written, saying whether it went compressed. Returns `Ok(true)` when the
    /// queue is empty.
    pub fn write_to(&mut self, w: &mut impl Write, mut on_event: impl FnMut(&Event, bool)) -> io::Result<bool> {
        while !self.queue.is_empty() {
            let mut slices: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            let mut skip = self.written;
            'fill: for chunk in &self.queue {
                for part in chunk.parts() {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    if count == MAX_IOV {
                        break 'fill;
                    }
                    slices[count] = IoSlice::new(&part[skip..]);
                    skip = 0;
                    count += 1;
                }
            }
            let mut n = match w.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.bytes -= n;
            while n > 0 {
                let Some(front) = self.queue.front() else { break };
                let remaining = front.len() - self.written;
                if n < remaining {
                    self.written += n;
                    break;
                }
                n -= remaining;
                self.written = 0;
                if let Some(chunk) = self.queue.pop_front() {
                    match chunk.event() {
                        Some(event) => on_event(event, chunk.compressed()),
                        None => self.owned -= 1,
                    }
                }
            }
        }
        Ok(true)
    }
}

/// Events due to a connection that wait outside its outbound queue, oldest first: the
/// resumes still replaying (each a cursor over a history snapshot and the subscription's
/// filter, read a few events at a time as the queue drains, so a resume costs a snapshot,
/// not a copy of every event it will replay), then live events that arrived while a replay
/// was pending (they must come after it). Only the live events count toward the bound.
#[derive(Debug, Default)]
pub struct Backlog {
    replays: VecDeque<Replay>,
    live: VecDeque<(LocalEvent, usize)>,
    live_bytes: usize,
}

/// One resume being replayed.
#[derive(Debug)]
struct Replay {
    /// The subscription it replays for ([`SSE_SUB`] for a stream).
    sub: u32,
    cursor: crate::history::Cursor,
    filter: Filter,
    ready: VecDeque<LocalEvent>,
}

/// Events read from a replay's cursor at a time.
const REPLAY_BATCH: usize = 64;

impl Backlog {
    /// Appends subscription `sub`'s resume: the events `cursor` yields that `filter` accepts.
    pub fn push_replay(&mut self, sub: u32, cursor: crate::history::Cursor, filter: Filter) {
        self.replays.push_back(Replay { sub, cursor, filter, ready: VecDeque::new() });
    }

    /// Ends subscription `sub`'s replay, and drops live events waiting behind replays that
    /// no subscription left (`wanted`) takes; how many events read went.
    fn cancel(&mut self, sub: u32, wanted: impl Fn(&Event) -> bool) -> usize {
        let mut dropped = 0;
        self.replays.retain(|replay| {
            dropped += if replay.sub == sub { replay.ready.len() } else { 0 };
            replay.sub != sub
        });
        let before = self.live.len();
        let mut freed = 0;
        self.live.retain(|(event, bytes)| {
            let keep = wanted(event);
            freed += if keep { 0 } else { *bytes };
            keep
        });
        self.live_bytes -= freed;
        dropped + before - self.live.len()
    }

    /// State the replays keep (their cursors and filters), for the state budget. Live
    /// events waiting here count toward the outbound bound instead.
    fn state_bytes(&self) -> usize {
        self.replays
            .iter()
            .map(|r| std::mem::size_of::<Replay>() + r.cursor.retained_bytes() + r.filter.state_bytes())
            .sum()
    }

    /// Appends a live event taking `bytes` of the bound.
    pub fn push_live(&mut self, event: LocalEvent, bytes: usize) {
        self.live_bytes += bytes;
        self.live.push_back((event, bytes));
    }

    /// Takes the oldest event, and whether it was replayed (not yet counted as delivered).
    pub fn pop(&mut self) -> Option<(LocalEvent, bool)> {
        while let Some(replay) = self.replays.front_mut() {
            if let Some(event) = replay.ready.pop_front() {
                return Some((event, true));
            }
            let Replay { cursor, filter, ready, .. } = replay;
            let batch = cursor.next_batch(REPLAY_BATCH, |e| filter.accepts(e));
            if batch.is_empty() {
                self.replays.pop_front();
            } else {
                ready.extend(batch.into_iter().map(LocalEvent::new));
            }
        }
        let (event, bytes) = self.live.pop_front()?;
        self.live_bytes -= bytes;
        Some((event, false))
    }

    /// Bytes of live events waiting.
    pub fn live_bytes(&self) -> usize {
        self.live_bytes
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.replays.is_empty() && self.live.is_empty()
    }

    /// Drops everything; how many events already read went (replays not yet read are not
    /// counted: they were never queued).
    pub fn clear(&mut self) -> usize {
        let dropped = self.live.len() + self.replays.iter().map(|r| r.ready.len()).sum::<usize>();
        self.live_bytes = 0;
        self.live = VecDeque::new();
        self.replays = VecDeque::new();
        dropped
    }
}

/// Which events a subscription (or an SSE stream) wants, beyond the topic index.
/// In declaration order: what a delivery checks first (`accepts_non_topic`).
#[derive(Debug, Clone)]
#[repr(C)]
pub struct Filter {
    /// Sources; empty: any.
    pub sources: Vec<String>,
    /// Correlation id to require, if any.
    pub correlation_id: Option<String>,
    /// Topic patterns (registered in the shard's index).
    pub patterns: Vec<Pattern>,
}

impl Filter {
    /// Builds a filter; no patterns means every topic.
    pub fn new(patterns: Vec<Pattern>, sources: Vec<String>, correlation_id: Option<String>) -> Self {
        let patterns = if patterns.is_empty() { vec![Pattern::everything()] } else { patterns };
        Self { patterns, sources: sources.into_iter().filter(|s| !s.is_empty()).collect(), correlation_id }
    }

    /// Whether the non-topic filters accept `event`.
    pub fn accepts_non_topic(&self, event: &Event) -> bool {
        (self.sources.is_empty() || self.sources.iter().any(|s| **s == *event.source))
            && self.correlation_id.as_deref().is_none_or(|c| event.correlation_id.as_deref() == Some(c))
    }

    /// Bytes it makes the broker keep: its patterns with their index entries, sources and
    /// correlation id.
    pub fn state_bytes(&self) -> usize {
        let patterns: usize = self.patterns.iter().map(|p| PATTERN_BYTES + p.as_str().len()).sum();
        let sources: usize = self.sources.iter().map(|s| std::mem::size_of::<String>() + s.len()).sum();
        patterns + sources + self.correlation_id.as_ref().map_or(0, String::len)
    }

    /// Whether `event` matches on everything, topic included (for history scans).
    pub fn accepts(&self, event: &Event) -> bool {
        self.patterns.iter().any(|p| p.matches(&event.topic)) && self.accepts_non_topic(event)
    }
}

/// The key an SSE stream's one subscription has in the shard's index.
pub const SSE_SUB: u32 = 0;

/// A WebSocket subscription. In declaration order: what `Conn::wants` reads (the key,
/// `after` and the filter's sources and correlation id) comes first, within 88 bytes.
#[derive(Debug)]
#[repr(C)]
pub struct Subscription {
    /// Key in the shard's index (unique within the connection).
    pub key: u32,
    /// Bytes of the presence `info` each of its exact topics' member entries holds.
    pub presence_info_bytes: u32,
    /// Live events up to here were already seen or replayed (resume hand-over).
    pub after: After,
    /// What it wants.
    pub filter: Filter,
    /// The client's or the server's id for it.
    pub id: String,
    /// Receives presence notices of its exact topics.
    pub presence: bool,
}

/// What one pattern costs beyond its text: the `Pattern`, its entry in the shard's index.
const PATTERN_BYTES: usize = std::mem::size_of::<Pattern>() + 64;
/// What one presence member entry costs beyond its topic and info (benches/presence.rs
/// measures 171 bytes).
const PRESENCE_ENTRY_BYTES: usize = 176;
/// A `stats` request in flight (its histograms are bounded process-wide, not here).
const STATS_PENDING_BYTES: usize = 1024;

impl Subscription {
    /// Bytes it makes the broker keep: itself, its id, its filter, and a presence member
    /// entry (with its info) per exact topic.
    pub fn state_bytes(&self) -> usize {
        let members: usize = self
            .filter
            .patterns
            .iter()
            .filter(|p| p.is_exact())
            .map(|p| PRESENCE_ENTRY_BYTES + p.as_str().len() + self.presence_info_bytes as usize)
            .sum();
        std::mem::size_of::<Self>() + self.id.len() + self.filter.state_bytes() + members
    }
}

/// A connection speaking HTTP requests.
#[derive(Debug)]
pub struct HttpConn {
    /// Bytes of requests not yet handled.
    pub buf: Vec<u8>,
    /// When the connection is dropped if no complete request arrived; while a request
    /// waits, when that request is answered `504`.
    pub deadline: Instant,
    /// `100 Continue` was sent for the request being read.
    pub continued: bool,
    /// The request waiting for an answer from other shards; requests behind it wait too.
    pub waiting: Option<Box<crate::http::Request>>,
}

/// A connection that upgraded to WebSocket.
///
/// Laid out in declaration order from a cache-line boundary: the fields every delivery
/// reads (`Conn::wants`, `Conn::push_event`, the bound and the write) fill the first three
/// lines, the first subscription inline among them (its hot fields in the first two, the
/// list's capacity word after it), so a fan-out touches three adjacent lines of this box
/// per connection. With the compiler's order and the subscriptions in a heap block of
/// their own they sat on four lines of the box (the pending batch at byte 376, the
/// subscription list at 432, deflate at 632, the batch flag at 685) and one or two of the
/// block, each a cache miss on a connection not seen since its last event
/// (`cargo bench --bench fanout -- core_100`).
#[derive(Debug)]
#[repr(C, align(64))]
pub struct WsConn {
    /// permessage-deflate, if agreed.
    pub deflate: Option<Agreement>,
    /// Events arrive as `batch` messages; when false `batch_pending` stays empty and is
    /// not read (it lies past the first lines).
    pub batch: bool,
    /// This mount echoes (Autobahn) instead of speaking the protocol.
    pub echo: bool,
    /// Subscriptions, at most `max_subscriptions_per_connection`; the first inline.
    pub subs: SmallVec<[Subscription; 1]>,
    /// Events waiting to be written as one batch message.
    pub batch_pending: PendingBatch,
    /// RFC 6455 state.
    pub codec: Codec,
    /// The id told in the connect `ack`.
    pub client_id: String,
    /// Next subscription key.
    pub next_key: u32,
    /// Messages sent, for server message ids.
    pub sent: u64,
    /// Last time anything arrived.
    pub last_heard: Instant,
    /// When the next heartbeat ping is due.
    pub next_ping: Instant,
    /// Message rate limit.
    pub bucket: TokenBucket,
    /// What the connection may do; `None` until it authenticates.
    pub grant: Option<crate::auth::Grant>,
    /// A connection over its rate is read again only at this time.
    pub resume_read_at: Option<Instant>,
    /// When an unauthenticated connection is closed with 4001.
    pub auth_deadline: Option<Instant>,
    /// Its `stats` request in flight, if one (at most one at a time): alive while the
    /// shards gather it, gone once answered or lost.
    pub stats: Option<std::sync::Weak<crate::mailbox::StatsRead>>,
    /// Backend calls in flight for this connection (at most
    /// `proxy_max_in_flight_per_connection`).
    pub backend_calls: usize,
    /// Bytes those calls hold until they are answered (counted in the state budget).
    pub backend_bytes: usize,
    /// Waiting for the connect proxy: nothing more is read until it answers.
    pub connecting: bool,
    /// Bytes that came behind the upgrade request while connecting, handled once connected.
    pub held: Vec<u8>,
    /// When the connection is closed with 4001 (a connect proxy's `expire_at`), unless it
    /// authenticates again.
    pub expire_at: Option<Instant>,
}

impl WsConn {
    /// Next id for a server-originated message.
    pub fn next_message_id(&mut self) -> String {
        self.sent += 1;
        format!("{}-{}", self.client_id, self.sent)
    }
}

/// A Server-Sent Events stream.
#[derive(Debug)]
pub struct SseConn {
    /// What it wants.
    pub filter: Filter,
    /// Receives presence notices (`?presence=1`) of its exact topics.
    pub presence: bool,
    /// A `/stats/stream`: the latency histograms at the last push (boxed: five
    /// hdrhistograms, held only by the few operators' streams).
    pub stats: Option<Box<crate::metrics::Latency>>,
    /// Live events up to here were already seen or replayed.
    pub after: After,
    /// When the next `: ping` comment is due.
    pub next_ping: Instant,
    /// Its token's (or connect proxy's) user, for the server API.
    pub user: Option<Box<str>>,
}

/// What a connection speaks. It stays as it was while the connection closes, so its
/// transport and subscriptions are still there to be counted out when it is removed.
#[derive(Debug)]
pub enum State {
    /// Reading HTTP requests.
    Http(HttpConn),
    /// A WebSocket session.
    WebSocket(Box<WsConn>),
    /// An SSE stream.
    Sse(Box<SseConn>),
}

/// A connection on its way out: writing what is queued, then half-closing and waiting
/// (until `deadline`) for the peer's EOF, so a final response or close frame is not lost
/// to a reset.
#[derive(Debug, Clone, Copy)]
pub struct Closing {
    /// When the socket is closed regardless.
    pub deadline: Instant,
    /// Our write side is shut.
    pub shut: bool,
}

/// The transport a connection counts as, for gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP.
    Http,
    /// WebSocket.
    WebSocket,
    /// SSE.
    Sse,
}

/// Why a connection was over its bound: what the caller counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverBound {
    /// Events dropped with it (queued and not begun, waiting in a batch or the backlog).
    pub dropped_events: usize,
}

/// One accepted TCP connection, without its socket.
///
/// Laid out in declaration order from a cache-line boundary: what every delivery reads
/// and writes (the queue; the state and the dedup sequence; closing, the bound, the
/// backlog, the coalescing marks and the flags) fills the first three lines, and the
/// identity the last. With the compiler's order the fields a delivery touches were spread
/// over all four lines of an unaligned 232 bytes, a miss on each for a connection not seen
/// since its last event (a fan-out subscriber's every event).
#[derive(Debug)]
#[repr(C, align(64))]
pub struct Conn {
    /// Queued output.
    pub out: Outbound,
    /// What it speaks.
    pub state: State,
    /// Sequence of the last event queued (deduplicates overlapping subscriptions).
    pub last_seq: u64,
    /// Set once it is closing; never cleared.
    pub closing: Option<Closing>,
    /// When its events were last released for writing (coalescing holds events only for
    /// connections written within the window).
    pub released_at: Option<Instant>,
    /// Events due after what `out` holds, fed into it as it drains.
    /// Boxed and made on first use: most connections never resume, and an idle
    /// connection should not pay for two empty queues.
    backlog: Option<Box<Backlog>>,
    /// Most bytes `queued_bytes` may reach (`max_outbound_bytes`).
    pub limit: usize,
    /// Events were queued since the last flush: it waits in the core's dirty list, to be
    /// written at the end of a loop turn or later while it coalesces.
    pub dirty: bool,
    /// Waits in the core's list of connections to write.
    pub transmit_queued: bool,
    /// Has an entry in the core's heap of connections waiting for company.
    pub held: bool,
    /// Reading stopped because too much is queued; resumed once it drains.
    pub read_blocked: bool,
    /// The peer half-closed after a request whose answer is still being written: its
    /// end, seen again, must not cut that answer.
    pub answering_half_close: bool,
    /// Counted by admission (false for a connection being turned away).
    pub admitted: bool,
    /// Came through `admin_listen`.
    pub admin: bool,
    /// Unique for the broker's life (slab keys are reused).
    pub id: u64,
    /// Peer address, for per-IP accounting.
    pub peer: IpAddr,
}

/// How much of its bound a connection may hold and still be read from: above it, volley
/// stops reading (the client's requests wait in the kernel) rather than make more replies.
pub const READ_SHARE_DIVISOR: usize = 2;

/// The backlog is fed into the outbound queue while that holds less than this.
const REFILL_BYTES: usize = 64 * 1024;

impl Conn {
    /// A new HTTP connection from `peer`, bounded by `limit` queued bytes.
    pub fn new(id: u64, peer: IpAddr, limit: usize, http: HttpConn, admitted: bool) -> Self {
        Self {
            id,
            peer,
            out: Outbound::default(),
            backlog: None,
            state: State::Http(http),
            closing: None,
            answering_half_close: false,
            limit,
            last_seq: 0,
            dirty: false,
            released_at: None,
            transmit_queued: false,
            held: false,
            read_blocked: false,
            admitted,
            admin: false,
        }
    }

    /// What the gauges count it as.
    pub fn transport(&self) -> Transport {
        match self.state {
            State::Http(_) => Transport::Http,
            State::WebSocket(_) => Transport::WebSocket,
            State::Sse(_) => Transport::Sse,
        }
    }

    /// Subscriptions it holds (an SSE stream holds one).
    pub fn subscriptions(&self) -> usize {
        match &self.state {
            State::Http(_) => 0,
            State::WebSocket(ws) => ws.subs.len(),
            State::Sse(_) => 1,
        }
    }

    /// Bytes the bound counts: the outbound queue, a batch not yet built, and live events
    /// waiting behind a replay. Replayed history is not counted (it is the bus's retained
    /// bytes, shared), only what the client falls behind by.
    pub fn queued_bytes(&self) -> usize {
        self.out.bytes() + self.batch_bytes() + self.backlog.as_ref().map_or(0, |b| b.live_bytes())
    }

    /// Frames queued or waiting to be (a batch-mode connection's pending events count one
    /// each): what a write would carry.
    pub fn queued_events(&self) -> usize {
        let pending = match &self.state {
            State::WebSocket(ws) if ws.batch => ws.batch_pending.len(),
            _ => 0,
        };
        self.out.len() + pending
    }

    /// Holds more than its reading share of the bound.
    pub fn over_read_share(&self) -> bool {
        self.queued_bytes() > self.limit / READ_SHARE_DIVISOR
    }

    /// Whether `more` bytes fit under the bound.
    pub fn fits(&self, more: usize) -> bool {
        self.queued_bytes() + more <= self.limit
    }

    /// Queues bytes made for this connection (a reply, a control frame) if they fit under
    /// the bound; `Err` when they do not (nothing queued: the caller closes it).
    pub fn send(&mut self, bytes: Vec<u8>) -> Result<(), OverBound> {
        if self.closing.is_some() {
            return Ok(());
        }
        if !self.fits(bytes.len()) {
            return Err(self.over_bound());
        }
        self.out.push_bytes(bytes);
        Ok(())
    }

    /// Drops everything not yet begun, leaving a well-formed stream; how many events went.
    fn over_bound(&mut self) -> OverBound {
        let mut dropped = self.out.drop_unstarted_events() + self.backlog.take().map_or(0, |mut b| b.clear());
        if let State::WebSocket(ws) = &mut self.state {
            dropped += ws.batch_pending.take().len();
        }
        OverBound { dropped_events: dropped }
    }

    /// Queues a live event (behind the backlog if one is waiting), or `Err` if it does
    /// not fit under the bound.
    pub fn push_event(&mut self, event: &LocalEvent) -> Result<(), OverBound> {
        let len = match &self.state {
            State::Sse(_) => event.sse_head().len() + event.json().len() + crate::sse::EVENT_END.len(),
            _ => event.ws_frame().len(),
        };
        if !self.fits(len) {
            return Err(self.over_bound());
        }
        match &mut self.backlog {
            Some(backlog) if !backlog.is_empty() => backlog.push_live(event.clone(), len),
            _ => self.queue_event(event.clone()),
        }
        Ok(())
    }

    fn queue_event(&mut self, event: LocalEvent) {
        match &mut self.state {
            State::WebSocket(ws) => {
                // Compressed here, by the first connection that needs it, for all the others.
                let window =
                    ws.deflate.filter(|a| a.worth(event.json().len()) && event.deflate(a.window)).map(|a| a.window);
                if ws.batch {
                    ws.batch_pending.push(event);
                } else {
                    self.out.push(Chunk::WsEvent(event, window));
                }
            }
            State::Sse(_) => self.out.push(Chunk::SseEvent(event)),
            State::Http(_) => {}
        }
    }

    /// Queues subscription `sub`'s resume behind whatever the connection already waits for.
    pub fn push_replay(&mut self, sub: u32, cursor: crate::history::Cursor, filter: Filter) {
        if self.closing.is_none() {
            self.backlog.get_or_insert_with(Default::default).push_replay(sub, cursor, filter);
        }
    }

    /// Subscription `sub` is gone: its replay ends, and live events waiting in the backlog
    /// that no remaining subscription wants go too (nothing of it follows its
    /// `unsubscribed` ack). How many events went.
    pub fn cancel_replay(&mut self, sub: u32) -> usize {
        let Some(backlog) = self.backlog.as_mut() else { return 0 };
        let State::WebSocket(ws) = &self.state else { return 0 };
        let subs = &ws.subs;
        let wanted = |e: &Event| subs.iter().any(|s| s.key != sub && s.after.passed_by(e) && s.filter.accepts(e));
        backlog.cancel(sub, wanted)
    }

    /// Bytes of state the client made the broker keep for it, counted against
    /// `max_connection_state_bytes`: derived from what it holds, so nothing can drift.
    pub fn state_bytes(&self) -> usize {
        let held = match &self.state {
            State::Http(_) => 0,
            State::WebSocket(ws) => {
                let stats = ws.stats.as_ref().filter(|g| g.strong_count() > 0).map_or(0, |_| STATS_PENDING_BYTES);
                ws.subs.iter().map(Subscription::state_bytes).sum::<usize>() + stats + ws.backend_bytes + ws.held.len()
            }
            State::Sse(sse) => sse.filter.state_bytes(),
        };
        held + self.backlog.as_ref().map_or(0, |b| b.state_bytes())
    }

    /// Moves backlog events into the outbound queue while it is short; how many moved,
    /// and how many of those were replayed (deliveries not counted yet). Nothing moves
    /// once the connection is closing.
    pub fn refill(&mut self) -> (usize, usize) {
        let (mut moved, mut replayed) = (0, 0);
        if self.closing.is_some() {
            return (moved, replayed);
        }
        let target = REFILL_BYTES.min(self.limit / 4);
        while self.out.bytes() + self.batch_bytes() < target {
            let Some((event, from_replay)) = self.backlog.as_mut().and_then(|b| b.pop()) else {
                // Drained: give the memory back.
                self.backlog = None;
                break;
            };
            self.queue_event(event);
            moved += 1;
            replayed += usize::from(from_replay);
        }
        (moved, replayed)
    }

    fn batch_bytes(&self) -> usize {
        match &self.state {
            State::WebSocket(ws) if ws.batch => ws.batch_pending.bytes(),
            _ => 0,
        }
    }

    /// Starts closing: a WebSocket sends `close` (when given and none was sent), the rest
    /// of the queue is written, then the write side is shut and the socket is dropped at
    /// EOF or after `linger`. The close frame is allowed past the bound: it is the one
    /// message a connection may hold beyond it. The one closing rule: from here on nothing
    /// else is queued (the queue is sealed; events waiting outside it, in a batch or the
    /// backlog, are dropped: the client resumes with `since`). A second call changes nothing.
    pub fn begin_close(&mut self, close: Option<crate::ws::Close>, linger: std::time::Duration, now: Instant) {
        if self.closing.is_some() {
            return;
        }
        if let State::WebSocket(ws) = &mut self.state {
            ws.batch_pending.take();
            if let Some(close) = close {
                let mut out = Vec::new();
                ws.codec.close(close, &mut out);
                self.out.push_bytes(out);
            }
        }
        self.backlog = None;
        self.out.seal();
        self.closing = Some(Closing { deadline: now + linger, shut: false });
    }

    /// Whether its subscription `sub` wants `event` (the index already matched the topic).
    pub fn wants(&self, sub: u32, event: &Event) -> bool {
        if self.closing.is_some() {
            return false;
        }
        match &self.state {
            State::WebSocket(ws) => ws
                .subs
                .iter()
                .find(|s| s.key == sub)
                .is_some_and(|s| s.after.passed_by(event) && s.filter.accepts_non_topic(event)),
            State::Sse(sse) => sse.after.passed_by(event) && sse.filter.accepts_non_topic(event),
            State::Http(_) => false,
        }
    }

    /// Every entry this connection has in the shard's index, (pattern, subscription key):
    /// each pattern of each subscription it holds.
    /// Read from the subscriptions themselves rather than kept in a second list: an idle
    /// subscriber should not pay for a copy of its patterns.
    pub fn index_entries(&self) -> Vec<(&Pattern, u32)> {
        match &self.state {
            State::WebSocket(ws) => {
                ws.subs.iter().flat_map(|s| s.filter.patterns.iter().map(move |p| (p, s.key))).collect()
            }
            State::Sse(sse) => sse.filter.patterns.iter().map(|p| (p, SSE_SUB)).collect(),
            State::Http(_) => Vec::new(),
        }
    }

    /// Whether it must be written this turn: a reply or control frame is queued, or a
    /// close must be finished. (Queued events alone wait in the core's `dirty` list for
    /// the coalescing window.)
    pub fn must_write(&self) -> bool {
        self.out.has_owned() || self.closing.is_some_and(|c| !c.shut)
    }

    /// The earliest time this connection needs attention without I/O.
    pub fn deadline(&self, heartbeat: std::time::Duration) -> Option<Instant> {
        if let Some(closing) = &self.closing {
            return Some(closing.deadline);
        }
        match &self.state {
            State::Http(http) => Some(http.deadline),
            State::WebSocket(ws) if ws.echo => None,
            State::WebSocket(ws) => {
                let heartbeat = ws.next_ping.min(ws.last_heard + 2 * heartbeat);
                Some(
                    [ws.auth_deadline, ws.resume_read_at, ws.expire_at]
                        .into_iter()
                        .flatten()
                        .fold(heartbeat, Instant::min),
                )
            }
            State::Sse(sse) => Some(sse.next_ping),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_delivery_touches_sits_on_the_first_cache_lines() {
        use std::mem::{align_of, offset_of, size_of};
        // A connection: the queue, the state, the dedup sequence, closing, the bound, the
        // backlog, the coalescing marks and the flags in the first three lines.
        assert_eq!(align_of::<Conn>(), 64);
        assert_eq!(offset_of!(Conn, out), 0);
        for end in [
            offset_of!(Conn, state) + size_of::<State>(),
            offset_of!(Conn, last_seq) + 8,
            offset_of!(Conn, backlog) + 8,
            offset_of!(Conn, limit) + 8,
            offset_of!(Conn, released_at) + size_of::<Option<Instant>>(),
            offset_of!(Conn, admin) + 1,
        ] {
            assert!(end <= 3 * 64, "{end}");
        }
        // Its WebSocket box: deflate and the batch flag in the first line, the
        // subscription list with its first subscription inline (and its capacity word
        // after it) within the first three, and that subscription's key, `after`, sources
        // and correlation id in its first 88 bytes.
        assert_eq!(align_of::<WsConn>(), 64);
        assert!(offset_of!(WsConn, batch) < 64 && offset_of!(WsConn, deflate) + size_of::<Option<Agreement>>() <= 64);
        assert!(offset_of!(WsConn, subs) + size_of::<SmallVec<[Subscription; 1]>>() <= 3 * 64);
        assert_eq!(offset_of!(Subscription, key), 0);
        assert!(offset_of!(Subscription, after) + size_of::<After>() <= offset_of!(Subscription, filter));
        assert_eq!(offset_of!(Filter, sources), 0);
        assert!(
            offset_of!(Subscription, filter) + offset_of!(Filter, correlation_id) + size_of::<Option<String>>() <= 88
        );
    }

    /// A writer that takes at most `cap` bytes a call and then blocks once.
    struct Trickle {
        got: Vec<u8>,
        cap: usize,
        block_next: bool,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let block = self.block_next;
            self.block_next = !block;
            if block {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.cap - n);
                self.got.extend_from_slice(&b[..take]);
                n += take;
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn partial_writes_keep_frames_whole_and_in_order() {
        let mut out = Outbound::default();
        let mut want = Vec::new();
        for i in 0..200u8 {
            let bytes = vec![i; (i as usize % 7) + 1];
            want.extend_from_slice(&bytes);
            out.push_bytes(bytes);
        }
        let mut w = Trickle { got: Vec::new(), cap: 5, block_next: false };
        assert!(out.has_owned());
        while !out.write_to(&mut w, |_, _| {}).unwrap() {}
        assert_eq!(w.got, want);
        assert_eq!(out.bytes(), 0);
        assert!(!out.has_owned(), "every owned chunk written is counted out");
    }

    #[test]
    fn dropping_backlog_keeps_the_partly_written_frame() {
        let mut out = Outbound::default();
        out.push_bytes(vec![1; 10]);
        out.push_bytes(vec![2; 10]);
        let mut w = Trickle { got: Vec::new(), cap: 5, block_next: false };
        assert!(!out.write_to(&mut w, |_, _| {}).unwrap());
        assert_eq!(out.drop_unstarted_events(), 0, "owned frames are not events");
        assert_eq!(out.bytes(), 15);
    }
}
