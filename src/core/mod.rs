//! A shard's connections without their sockets: the sans-IO core of the event loop.
//!
//! Owns every connection's state machine (HTTP routing in `routes`, the WebSocket
//! protocol in `session`), the subscription index, fan-out of the events the bus queued
//! for this shard, write coalescing, the timer heap (one entry per connection, never a
//! scan of all connections), the drain, and the gauges (changed only in [`Core::accept`],
//! the transitions in `routes`/`session` through [`Ctx::gauge`], and [`Core::remove`]).
//!
//! In the manner of quinn-proto it does no I/O and reads no clock: the shard hands it
//! bytes read with [`Core::handle_input`], a time with [`Core::handle_timeout`], asks
//! [`Core::poll_timeout`] when to come back, [`Core::read_budget`] how much to read, and
//! writes each connection [`Core::poll_transmit`] names through [`Core::write_to`] into
//! its socket. Sockets removed here are reported by [`Core::poll_closed`]. So every bound
//! and timer is tested with plain byte slices and a manual clock (see `tests` below and
//! the `connection` fuzz target). It must not touch sockets, the poll or the clock.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Write};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;
use slab::Slab;

use crate::auth::Auth;
use crate::backend::{Backend, Outcome};
use crate::bus::Bus;
use crate::config::Config;
use crate::conn::{Conn, HttpConn, LocalEvent, OverBound, SSE_SUB, State, Transport};
use crate::deflate::Joiner;
use crate::engine::EngineStatus;
use crate::event::{self, Event};
use crate::http::{HttpError, Response};
use crate::limits::{Admission, IpRates, Refusal};
use crate::mailbox::{Control, Delivery, Lifecycle, Pending, ReplyTo, StatsRead};
use crate::metrics::{Latency, ShardCounters, Snapshot, StatsFormat};
use crate::protocol;
use crate::protocol::ErrorCode;
use crate::sse;
use crate::topic::{Index, Pattern};
use crate::ws::Close;

mod api;
mod members;
mod proxy;
mod routes;
mod session;
mod timers;

use routes::published_response;
use session::publish_rejection;

/// State every shard can read: settings, the bus, admission, counters, the drain flag.
pub struct Shared {
    /// Settings.
    pub config: Config,
    /// Token verification.
    pub auth: Auth,
    /// The publish path.
    pub bus: Arc<Bus>,
    /// Health of the cluster engine, when one runs.
    pub engine: Option<Arc<EngineStatus>>,
    /// Connection limits.
    pub admission: Admission,
    /// HTTP publish rate per client address.
    pub publish_rates: IpRates,
    /// One per shard, written only by that shard.
    pub counters: Vec<ShardCounters>,
    /// Set when a drain begins: `/health` answers 503.
    pub draining: AtomicBool,
    /// Who is on which exact topic.
    pub presence: crate::presence::Presence,
    /// This process's id in presence entries.
    pub node: u64,
    /// With a cluster engine: this node's joins and leaves for the presence mirror to
    /// write out (bounded: past it, the mirror rewrites the node's members whole).
    pub presence_outbox: crossbeam_queue::ArrayQueue<Arc<crate::presence::Notice>>,
    /// The mirror must rewrite this node's members whole (it was away, or the outbox
    /// overflowed).
    pub presence_resync: AtomicBool,
    /// Open `/stats/stream`s: each keeps a copy of the histograms (about 200 KiB), so
    /// there are at most [`MAX_STATS_STREAMS`].
    pub stats_streams: std::sync::atomic::AtomicUsize,
    /// Stats reads in flight (each merges its own copy of the histograms): at most
    /// [`MAX_STATS_GATHERS`], beyond that a read is answered `overloaded`.
    pub stats_gathers: Arc<std::sync::atomic::AtomicUsize>,
    /// One reading of both clocks at start: wall-clock timestamps are derived from the
    /// monotonic `now` the core is given, so the core never reads a clock.
    pub epoch: (Instant, SystemTime),
    /// The backend proxies; their outcomes come back through the shards' mailboxes.
    pub backend: Backend<Pending>,
    /// With a cluster engine: server API actions for the presence mirror to tell the other
    /// nodes (bounded: past it the call is answered `overloaded`).
    pub api_outbox: crossbeam_queue::ArrayQueue<crate::mailbox::ApiAction>,
    /// Webhooks, when `webhook_url` is set.
    pub webhooks: Option<Arc<crate::webhook::Webhooks>>,
    /// With a sharded engine: which shards this node's subscriptions can match.
    pub interest: Option<Arc<crate::interest::Interest>>,
}

/// Where shard `shard`'s connection ids start: 16 bits of the node's random id, 8 of the
/// shard, then a 40-bit count. Client ids (the hex of a connection id) name a connection
/// across the cluster, where the server API acts on every node: without the node's bits
/// every node's first connection would be client `1`.
fn first_conn_id(node: u64, shard: usize) -> u64 {
    ((node & 0xffff) << 48) | ((shard as u64 & 0xff) << 40)
}

/// Milliseconds since the Unix epoch of `wall`.
fn wall_ms(wall: SystemTime) -> u64 {
    wall.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Most `/stats/stream`s open at once (dashboards are few; each holds a copy of the
/// histograms outside any connection's byte bound).
pub const MAX_STATS_STREAMS: usize = 16;

/// Most stats reads in flight at once in the process (a connection has at most one).
pub const MAX_STATS_GATHERS: usize = 32;

/// How often a `/stats/stream` (the dashboard's feed) gets a push.
pub const STATS_PUSH_EVERY: Duration = Duration::from_secs(1);

/// Server API actions waiting for the presence mirror to tell the other nodes.
const API_OUTBOX: usize = 1024;

/// Joins and leaves waiting for the presence mirror before it rewrites the node whole.
const PRESENCE_OUTBOX: usize = 65_536;

impl Shared {
    /// The shared state of `shards` shards over `bus`; `epoch` is one reading of both
    /// clocks, taken by the caller (the core reads none).
    pub fn new(
        config: Config,
        bus: Arc<Bus>,
        engine: Option<Arc<EngineStatus>>,
        shards: usize,
        epoch: (Instant, SystemTime),
    ) -> Self {
        let mailboxes = bus.clone();
        let backend = Backend::new(
            &config,
            Box::new(move |answer: Box<(Pending, Outcome)>| {
                let shard = answer.0.to.shard;
                match mailboxes.mailboxes.try_to_shard(shard, Control::Backend(answer)) {
                    Ok(()) => Ok(()),
                    Err(Control::Backend(back)) => Err(back),
                    // Only ever the message it was given comes back.
                    Err(_) => Ok(()),
                }
            }),
        );
        Self {
            backend,
            webhooks: crate::webhook::Webhooks::start(&config),
            api_outbox: crossbeam_queue::ArrayQueue::new(API_OUTBOX),
            bus,
            engine,
            admission: Admission::new(config.max_connections, config.max_connections_per_ip),
            publish_rates: IpRates::new(config.publish_rate_per_ip, config.publish_burst_per_ip),
            counters: (0..shards).map(|_| ShardCounters::default()).collect(),
            draining: Default::default(),
            presence: Default::default(),
            node: crate::presence::new_node_id(),
            presence_outbox: crossbeam_queue::ArrayQueue::new(PRESENCE_OUTBOX),
            presence_resync: AtomicBool::new(true),
            stats_streams: Default::default(),
            stats_gathers: Default::default(),
            auth: Auth::new(&config.jwt_secret),
            epoch,
            interest: config
                .engine_spec()
                .ok()
                .filter(|spec| spec.placement.shards() > 1)
                .map(|spec| Arc::new(crate::interest::Interest::new(spec.placement))),
            config,
        }
    }

    fn snapshot(&self, latency: Latency) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (counters, inbox) in self.counters.iter().zip(self.bus.inboxes()) {
            snapshot.add_shard(counters, inbox.events.len());
        }
        snapshot.published = self.bus.counters.published.load(Ordering::Relaxed);
        snapshot.refused_overloaded = self.bus.counters.refused_overloaded.load(Ordering::Relaxed);
        snapshot.control_refused = self.bus.mailboxes.control_refused.load(Ordering::Relaxed);
        snapshot.history = self.bus.history_size();
        snapshot.backend = self.backend.counters().read();
        snapshot.webhooks = self.webhooks.as_ref().map(|w| {
            let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            (load(&w.counters.sent), load(&w.counters.dropped), load(&w.counters.failed_posts), w.queued())
        });
        snapshot.latency = latency;
        snapshot.engine = self.engine.as_ref().map(|e| e.figures());
        snapshot
    }

    /// The wall-clock time at monotonic `now`.
    pub fn wall(&self, now: Instant) -> SystemTime {
        let (mono, wall) = self.epoch;
        match now.checked_duration_since(mono) {
            Some(after) => wall + after,
            None => wall - mono.duration_since(now),
        }
    }
}

/// Where an index entry points: a connection and one of its subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SubRef {
    conn: usize,
    sub: u32,
}

/// How long a closing connection may take to flush and see the peer's EOF.
const LINGER: Duration = Duration::from_secs(2);
/// How long a slow consumer gets to read its 1013 close frame.
const SLOW_CONSUMER_LINGER: Duration = Duration::from_secs(5);
/// Read size per turn for a connection over its message rate.
const LIMITED_READ_BYTES: usize = 2 * 1024;
/// Pause before reading more from a connection over its message rate.
const LIMITED_READ_PAUSE: Duration = Duration::from_millis(1);
/// Most bytes of events fanned out per call of [`Core::handle_inbox`], and at most a
/// quarter of the outbound bound: the shard writes between calls, so one turn cannot put
/// more in front of a client that reads than it has room for, and judge it slow for that.
const FANOUT_BYTES_PER_TURN: usize = 256 * 1024;
/// Most connections one call of [`Core::handle_inbox`] makes newly dirty before it lets the
/// shard write and read. A turn's cost is the writes it leaves behind, one per connection
/// with new events: a backlog of events for many topics turned into one turn of thousands
/// of writes, during which nothing was read (the publisher's next events included), so
/// the next turn found an even larger backlog, a cycle that kept a many-topic load's
/// median latency near 50 ms. Events for connections already dirty cost no new write, so
/// a busy topic's backlog is still fanned out in one turn.
///
/// That is the bound while the shard keeps up. Once it is behind (a turn stops at the
/// bound with events waiting longer than [`Coalescing::BEHIND`]), the bound doubles per
/// such turn, and returns to this once a turn empties the inbox: on a machine without
/// headroom a fixed bound cut every turn of a 100-topic load to about ten events, so each
/// connection got one event per write however far behind the shard was; the cost per
/// delivery grew with the backlog and throughput fell as offered load rose (a collapse).
/// Behind, wider turns put several events in each connection's write, so the cost per
/// delivery falls as load rises.
const NEW_WRITES_PER_TURN: usize = 1024;

/// Queued bytes that are written at once, coalescing or not: one write of this size
/// already amortizes its syscall.
const COALESCE_BYTES: usize = 16 * 1024;

/// How many events a shard lets a connection's queue gather before writing it, and for
/// how long.
///
/// While the shard keeps up, nothing waits beyond `min` (0 by default: events are written
/// in the loop turn that fans them out). Once fan-out falls behind (events wait in the
/// inbox longer than `BEHIND`), every delivery costs a kernel send for the shard and a
/// read for the client, and the only way to deliver more per second is to put several
/// events in one write: the batch a connection gathers doubles on every turn the shard
/// is behind (up to `MAX_BATCH`, 4), and a connection waits until it has that many events
/// or until `max` has passed since it was last written. The batch, not a time, is what
/// adapts, because connections hear events at very different rates: a connection of a
/// 1,000-subscriber broadcast at 4,000/s gathers 4 events in 1 ms, one of a 100-topic
/// fan-out at 1,000/s gathers 2 in 100 ms. A window of time that widened until the
/// fan-out caught up held the broadcast's connections that long too (p99 262 against
/// 65 ms), and one that widened slowly enough for the broadcast let the fan-out fall
/// behind first.
///
/// The batch halves at most once per `max` while the shard is caught up: holding is what
/// let it catch up, so catching up is no sign the batch can go (halved on every turn, it
/// was gone in the turns after it grew, and a shard at the edge went back to one write
/// per delivery and fell behind again). Only connections written within `max` wait
/// (`flush_dirty`): one that hears an event less often gains no company and would only
/// pay the wait. Replies and control frames never wait.
#[derive(Debug)]
struct Coalescing {
    /// Events a connection gathers before it is written while the shard is behind; 1
    /// while it keeps up.
    batch: usize,
    min: Duration,
    max: Duration,
    /// When the batch last changed.
    changed_at: Option<Instant>,
    /// When the shard last flushed before the current turn.
    flushed_at: Option<Instant>,
}

impl Coalescing {
    const BEHIND: Duration = Duration::from_millis(5);
    const CAUGHT_UP: Duration = Duration::from_millis(1);
    const MAX_BATCH: usize = 4;
    /// A connection written this recently, or since the shard's previous flush, is not
    /// held for its batch: it hears events often enough that every turn brings it company
    /// (a broadcast's connections), and holding it only added delay (p50 40-300 ms
    /// against 16-25 ms at 4,000/s to 1,000 connections) and, in a closed loop whose turns
    /// outlast 5 ms, slowed the publishers and cost 20-40 % more CPU per delivery.
    const RECENT: Duration = Duration::from_millis(5);

    fn new(min: Duration, max: Duration) -> Self {
        Self { batch: 1, min, max, changed_at: None, flushed_at: None }
    }

    /// Takes how long the oldest event drained in a loop turn waited in the inbox.
    fn observe(&mut self, waited: Duration, now: Instant) {
        if waited > Self::BEHIND && !self.max.is_zero() && self.batch < Self::MAX_BATCH {
            self.batch *= 2;
            self.changed_at = Some(now);
        } else if waited < Self::CAUGHT_UP && self.batch > 1 && self.changed_at.is_none_or(|at| now >= at + self.max) {
            self.batch /= 2;
            self.changed_at = Some(now);
        }
    }

    /// Whether a connection written at `released_at` with `queued` events may wait at
    /// `now` (until `released_at` + [`Self::wait`]).
    fn holds(&self, released_at: Instant, queued: usize, now: Instant) -> bool {
        let recent = now < released_at + Self::RECENT || self.flushed_at.is_some_and(|at| released_at >= at);
        let gathering = self.batch > 1 && queued < self.batch && !recent;
        now < released_at + self.wait() && (gathering || now < released_at + self.min)
    }

    /// Marks the end of a flush at `now`: connections written from then on were written
    /// in the turn before the next one.
    fn flushed(&mut self, now: Instant) {
        self.flushed_at = Some(now);
    }

    /// The longest a connection's events may wait now.
    fn wait(&self) -> Duration {
        if self.batch > 1 { self.max } else { self.min }
    }

    /// The batch while the shard is behind; 1 while it keeps up.
    fn batch(&self) -> usize {
        self.batch
    }
}

/// Everything of a core but its connections, so both can be borrowed at once.
struct Ctx {
    id: usize,
    shared: Arc<Shared>,
    index: Index<SubRef>,
    timers: timers::Timers,
    latency: Latency,
    /// Connections with events queued since this turn began, not yet written or held.
    dirty: Vec<usize>,
    /// Connections whose queued events wait for company, by when they were last written
    /// (with the connection's id: a key is reused): at most one entry per connection.
    held: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    coalescing: Coalescing,
    /// When the first of the connections `coalescing` holds back is due.
    next_flush: Option<Instant>,
    /// Connections to write this turn (each at most once: `Conn::transmit_queued`).
    transmit: Vec<usize>,
    /// Connections to read again without waiting for readiness.
    read_again: Vec<usize>,
    /// Connections removed whose sockets the shard must drop.
    closed: Vec<usize>,
    /// Connections whose state changed since the last [`Core::settle`].
    changed: Vec<usize>,
    next_conn: u64,
    /// WebSocket connections by client id and user, for the server API.
    directory: api::Directory,
    /// Connections the next fan-out turn may make newly dirty (see [`NEW_WRITES_PER_TURN`]).
    new_writes_limit: usize,
    /// When draining: the time the shard stops regardless.
    drain_deadline: Option<Instant>,
    stopping: bool,
    /// Resumes waiting for engine shards to load.
    parked: Vec<session::Parked>,
}

/// A shard's connections and everything it decides about them, without I/O.
pub struct Core {
    conns: Slab<Conn>,
    ctx: Ctx,
}

/// What routing one request did to the connection.
enum Routed {
    /// Answered; the next pipelined request may be handled.
    Next,
    /// The connection changed state or waits for other shards: stop handling requests.
    Halt,
}

/// What the shard does with a socket after [`Core::write_to`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterWrite {
    /// Keep it (more may come, or the rest waits for writability).
    Keep,
    /// Everything of a closing connection is written: shut the write side.
    Shutdown,
}

impl Core {
    /// The core of shard `id`.
    pub fn new(id: usize, shared: Arc<Shared>) -> Self {
        let next_conn = first_conn_id(shared.node, id);
        let coalescing = Coalescing::new(
            Duration::from_millis(shared.config.write_coalescing_min_ms),
            Duration::from_millis(shared.config.write_coalescing_max_ms),
        );
        Self {
            conns: Slab::new(),
            ctx: Ctx {
                id,
                shared,
                index: Index::default(),
                timers: timers::Timers::default(),
                latency: Latency::default(),
                dirty: Vec::new(),
                held: BinaryHeap::new(),
                coalescing,
                next_flush: None,
                transmit: Vec::new(),
                read_again: Vec::new(),
                closed: Vec::new(),
                changed: Vec::new(),
                next_conn,
                directory: api::Directory::default(),
                new_writes_limit: NEW_WRITES_PER_TURN,
                drain_deadline: None,
                parked: Vec::new(),
                stopping: false,
            },
        }
    }

    /// Admission of a new connection from `peer`: counted until [`Self::remove`].
    pub fn admit(&self, peer: IpAddr) -> Result<(), Refusal> {
        self.ctx.shared.admission.admit(peer)
    }

    /// Gives back an admission whose connection never reached the core.
    pub fn release(&self, peer: IpAddr) {
        self.ctx.shared.admission.release(peer);
    }

    /// The key the next accepted connection gets.
    pub fn vacant_key(&self) -> usize {
        self.conns.vacant_key()
    }

    /// Takes a new connection from `peer` (turned away with an HTTP error when
    /// `refusal` says so); returns its key, the one [`Self::vacant_key`] told.
    pub fn accept(&mut self, peer: IpAddr, refusal: Option<Refusal>, now: Instant) -> usize {
        self.ctx.next_conn += 1;
        let config = &self.ctx.shared.config;
        let http = HttpConn {
            buf: Vec::new(),
            deadline: now + Duration::from_millis(config.http_header_timeout_ms),
            waiting: None,
            continued: false,
        };
        let mut conn = Conn::new(self.ctx.next_conn, peer, config.max_outbound_bytes, http, refusal.is_none());
        match refusal {
            None => self.ctx.gauge(None, Some(Transport::Http), 0),
            Some(refusal) => {
                let error = match refusal {
                    Refusal::Full => HttpError::new(ErrorCode::TooManyConnections, "the broker is at max_connections"),
                    Refusal::TooManyFromIp => {
                        HttpError::new(ErrorCode::TooManyConnections, "too many connections from this address")
                            .with_status(429)
                    }
                };
                conn.out.push_bytes(Response::error(&error).header("Retry-After", "1").encode(true));
                conn.begin_close(None, LINGER, now);
            }
        }
        let key = self.conns.insert(conn);
        self.ctx.changed.push(key);
        self.settle();
        key
    }

    /// How many bytes the shard may read from `key` now: 0 while it holds more than its
    /// share of the bound (backpressure: read again once it drains), while it is paused
    /// over its message rate, or when it is gone.
    pub fn read_budget(&mut self, key: usize, max: usize) -> usize {
        let Some(conn) = self.conns.get_mut(key) else { return 0 };
        if conn.closing.is_some() {
            // Only waiting for EOF; whatever comes is discarded.
            return max;
        }
        if conn.over_read_share() {
            conn.read_blocked = true;
            return 0;
        }
        match &conn.state {
            State::WebSocket(ws) if ws.resume_read_at.is_some() || ws.connecting => 0,
            State::WebSocket(ws) if ws.bucket.is_limiting() => LIMITED_READ_BYTES.min(max),
            _ => max,
        }
    }

    /// The shard read a whole budget from `key` and stopped there: read it again next
    /// turn, or, over its message rate, after a pause (so what a flooding client sends
    /// stays in the kernel's buffers and TCP pushes back on it).
    pub fn budget_spent(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        match &mut conn.state {
            State::WebSocket(ws) if ws.bucket.is_limiting() && conn.closing.is_none() => {
                ws.resume_read_at = Some(now + LIMITED_READ_PAUSE);
                self.ctx.changed.push(key);
                self.settle();
            }
            _ => self.ctx.read_again.push(key),
        }
    }

    /// Connections to read without waiting for readiness (budget spent, backpressure
    /// lifted, rate pause over).
    pub fn take_read_again(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.ctx.read_again)
    }

    /// Whether some connection waits to be read again.
    pub fn has_read_again(&self) -> bool {
        !self.ctx.read_again.is_empty()
    }

    /// Bytes read from `key`.
    pub fn handle_input(&mut self, key: usize, data: &[u8], now: Instant) {
        let Core { conns, ctx } = self;
        let Some(conn) = conns.get_mut(key) else { return };
        ctx.on_bytes(key, conn, data, now);
        ctx.changed.push(key);
        self.settle();
    }

    /// The peer closed its side (or the socket failed).
    pub fn handle_eof(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else { return };
        // The peer may have half-closed after its last request: answer it first.
        if matches!(conn.state, State::Http(_)) && conn.closing.is_none() && !conn.out.is_empty() {
            conn.begin_close(None, LINGER, now);
            conn.answering_half_close = true;
            self.ctx.changed.push(key);
            self.settle();
        } else if conn.answering_half_close && conn.closing.as_ref().is_some_and(|closing| !closing.shut) {
            // The same end seen again (another readiness event) while that answer is
            // still being written: it goes on, bounded by the linger.
        } else {
            self.remove(key);
        }
    }

    /// Handles what other threads sent: control messages, then events to fan out, at most
    /// [`FANOUT_BYTES_PER_TURN`] of them and until [`NEW_WRITES_PER_TURN`] connections have
    /// new events; true when events are left for another call.
    pub fn handle_inbox(&mut self, now: Instant) -> bool {
        // Cleared before either queue is drained: a control message pushed while events
        // were drained must wake the shard again, or it waits for an unrelated wake-up
        // (the next event, socket or timer; on an idle broker, a heartbeat away).
        self.ctx.shared.bus.inboxes()[self.ctx.id].clear_wake();
        self.drain_control(now);
        let more = self.drain_events(now);
        self.settle();
        more
    }

    /// When [`Self::handle_timeout`] wants to be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.ctx.timers.next(), self.ctx.drain_deadline, self.ctx.next_flush, self.ctx.next_unpark()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs every deadline due at `now`, each once: a handler always moves its
    /// connection's deadline past `now` (or removes the connection).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.ctx.drain_deadline.is_some_and(|d| now >= d) {
            self.ctx.stopping = true;
            return;
        }
        self.unpark_ready(now);
        let mut due = Vec::new();
        while let Some(key) = self.ctx.timers.pop_due(now) {
            due.push(key);
        }
        for key in due {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            if self.ctx.on_timeout(key, conn, now) {
                self.remove(key);
            } else {
                let conn = &mut self.conns[key];
                debug_assert!(
                    conn.deadline(self.ctx.shared.config.heartbeat_interval()).is_none_or(|d| d > now),
                    "a timer handler left its deadline at or before now"
                );
                self.ctx.changed.push(key);
            }
        }
        self.settle();
    }

    /// The connections to write now, each once: those with replies, and those whose
    /// events the coalescing window no longer holds back.
    pub fn poll_transmit(&mut self, now: Instant) -> Vec<usize> {
        self.flush_dirty(now);
        let keys = std::mem::take(&mut self.ctx.transmit);
        for &key in &keys {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.transmit_queued = false;
            }
        }
        keys
    }

    /// Writes what `key` has queued into `w` (its socket), feeding its backlog in as the
    /// queue drains. A write error removes the connection.
    pub fn write_to(&mut self, key: usize, w: &mut impl Write, now: Instant) -> AfterWrite {
        let Core { conns, ctx } = self;
        let Some(conn) = conns.get_mut(key) else { return AfterWrite::Keep };
        let histogram = &mut ctx.latency.publish_to_write;
        let (mut replayed, mut compressed) = (0, 0);
        let result = loop {
            compressed += write_batch(conn, ctx.shared.wall(now));
            let on_event = |e: &Event, deflated: bool| {
                Latency::record(histogram, now.saturating_duration_since(e.published_at));
                compressed += usize::from(deflated);
            };
            match conn.out.write_to(w, on_event) {
                Ok(true) => match conn.refill() {
                    (0, _) => break Ok(true),
                    (_, from_replay) => replayed += from_replay,
                },
                other => break other,
            }
        };
        ctx.counters().deliveries.fetch_add(replayed as u64, Ordering::Relaxed);
        if compressed > 0 {
            ctx.counters().compressed_deliveries.fetch_add(compressed as u64, Ordering::Relaxed);
        }
        let after = match result {
            Err(_) => {
                self.remove(key);
                return AfterWrite::Keep;
            }
            Ok(false) => AfterWrite::Keep,
            Ok(true) => match &mut conn.closing {
                Some(closing) if !closing.shut => {
                    closing.shut = true;
                    AfterWrite::Shutdown
                }
                _ => AfterWrite::Keep,
            },
        };
        if conn.read_blocked && !conn.over_read_share() {
            conn.read_blocked = false;
            ctx.read_again.push(key);
            // Requests pipelined behind the backpressure wait in the buffer.
            if let State::Http(_) = conn.state
                && conn.closing.is_none()
            {
                ctx.process_http(key, conn, now);
                ctx.changed.push(key);
                self.settle();
            }
        }
        after
    }

    /// Connection `key` came through `admin_listen`: it is served the operators' routes.
    pub fn mark_admin(&mut self, key: usize) {
        if let Some(conn) = self.conns.get_mut(key) {
            conn.admin = true;
        }
    }

    /// A TLS connection failed its handshake: counted by reason, then removed.
    pub fn tls_handshake_failed(&mut self, key: usize, reason: crate::tls::HandshakeFailure) {
        ShardCounters::bump(&self.ctx.counters().tls_handshake_failures[reason.index()]);
        self.remove(key);
    }

    /// Removes `key` (the one close path): index entries, gauges and admission are
    /// counted out from what the connection still holds; its socket is reported by
    /// [`Self::poll_closed`].
    pub fn remove(&mut self, key: usize) {
        let Some(conn) = self.conns.try_remove(key) else { return };
        self.ctx.timers.set(key, None);
        for (pattern, sub) in conn.index_entries() {
            self.ctx.unindex_pattern(pattern, SubRef { conn: key, sub });
            self.ctx.leave_presence(conn.id, pattern);
        }
        if matches!(&conn.state, State::Sse(sse) if sse.stats.is_some()) {
            self.ctx.shared.stats_streams.fetch_sub(1, Ordering::AcqRel);
        }
        match &conn.state {
            State::WebSocket(ws) => {
                self.ctx.directory.remove(conn.id, key, ws.grant.as_ref().and_then(|g| g.sub.as_deref()))
            }
            State::Sse(sse) => self.ctx.directory.remove(conn.id, key, sse.user.as_deref()),
            State::Http(_) => {}
        }
        let transport = (conn.admitted || conn.transport() != Transport::Http).then(|| conn.transport());
        self.ctx.gauge(transport, None, -(conn.subscriptions() as i64));
        if conn.admitted {
            self.ctx.shared.admission.release(conn.peer);
        }
        self.ctx.closed.push(key);
    }

    /// Keys removed since the last call, whose sockets the shard drops.
    pub fn poll_closed(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.ctx.closed)
    }

    /// Whether the shard should accept new connections (not once draining).
    pub fn accepting(&self) -> bool {
        self.ctx.drain_deadline.is_none() && !self.ctx.stopping
    }

    /// Whether the loop should end: stopped, or drained of every connection.
    pub fn finished(&self) -> bool {
        self.ctx.stopping || (self.ctx.drain_deadline.is_some() && self.conns.is_empty())
    }

    /// A one-shard core over its own in-memory bus whose clock starts at `epoch`, for tests
    /// and the fuzz target; the poll only holds the inbox's waker and must live as long as
    /// the core.
    pub fn standalone(config: Config, epoch: (Instant, SystemTime)) -> io::Result<(Self, Arc<Shared>, mio::Poll)> {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), mio::Token(0))?;
        let inbox = crate::mailbox::Inbox::new(waker, config.shard_queue_capacity);
        // A sharded engine's bus (fed by hand) when `engine` names several servers.
        let bus = match config.engine_spec().map(|spec| spec.placement.shards()) {
            Ok(shards) if shards > 1 => {
                let submit: crate::bus::Submit = Box::new(|_, _| Err(crate::event::PublishError::EngineUnavailable));
                let sequencer = crate::bus::Sequencer::Engine(submit);
                Bus::with_sequencer(vec![inbox], config.retention(), config.max_message_bytes, sequencer)
                    .with_engine_shards(shards)
            }
            _ => Bus::new(vec![inbox], config.retention(), config.max_message_bytes),
        };
        let shared = Arc::new(Shared::new(config, Arc::new(bus), None, 1, epoch));
        Ok((Self::new(0, shared.clone()), shared, poll))
    }

    /// Entries in the subscription index (the connections' `Conn::index_entries` add up to it).
    pub fn index_entries(&self) -> usize {
        self.ctx.index.len()
    }

    /// The connection at `key`, for tests and the fuzz target's invariants.
    pub fn conn(&self, key: usize) -> Option<&Conn> {
        self.conns.get(key)
    }

    /// Entries in the timer queue (at most one per connection), for tests and the fuzz
    /// target's invariants.
    pub fn timer_entries(&self) -> usize {
        self.ctx.timers.len()
    }

    /// Entries in the heap of connections waiting for company (at most one per connection).
    pub fn held_entries(&self) -> usize {
        self.ctx.held.len()
    }

    /// Brings every connection changed since the last call (the one an entry point was
    /// called for, and those a control message or fan-out reached) in line with its
    /// state: its deadline in the timer queue is [`Conn::deadline`], and it is written
    /// this turn when [`Conn::must_write`] says so. Called at the end of each entry point.
    fn settle(&mut self) {
        let heartbeat = self.ctx.shared.config.heartbeat_interval();
        for key in std::mem::take(&mut self.ctx.changed) {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            self.ctx.timers.set(key, conn.deadline(heartbeat));
            if conn.must_write() {
                self.ctx.transmit_now(conn, key);
            }
        }
    }

    fn drain_control(&mut self, now: Instant) {
        let shared = self.ctx.shared.clone();
        let inbox = &shared.bus.inboxes()[self.ctx.id];
        match inbox.lifecycle() {
            Lifecycle::Running => {}
            Lifecycle::Drain if self.ctx.drain_deadline.is_none() => self.begin_drain(now),
            Lifecycle::Drain => {}
            Lifecycle::Stop => self.ctx.stopping = true,
        }
        while let Some(message) = inbox.control.pop() {
            match message {
                // Looked at below, with every turn that has resumes waiting: a load told
                // while this queue was full is not missed for long.
                Control::EngineShardLoaded => {}
                Control::PublishDone(ticket) => {
                    let ReplyTo { key, conn_id, .. } = ticket.reply_to;
                    let body = json!({"message_ids": ticket.ids, "delivered_to": ticket.delivered()});
                    self.resume_http(key, conn_id, Response::json(200, &body), now);
                }
                Control::Published(reply, result) => {
                    let ReplyTo { key, conn_id, .. } = reply.to;
                    match &reply.websocket {
                        None => self.resume_http(key, conn_id, published_response(result, 0), now),
                        Some(correlation) => {
                            let Core { conns, ctx } = self;
                            let Some(conn) = ctx.reach(conns, key, conn_id) else { continue };
                            match result {
                                Ok(ids) => {
                                    let payload = json!({"message_id": ids.first()}).to_string();
                                    ctx.send_message(key, conn, "response", correlation.as_deref(), &payload, now);
                                }
                                Err(error) => {
                                    ctx.send_error(key, conn, correlation.as_deref(), &publish_rejection(&error), now)
                                }
                            }
                        }
                    }
                }
                Control::Collect(read) => {
                    if read.gather.add(&self.ctx.latency) {
                        let shard = read.reply_to.shard;
                        shared.bus.mailboxes.to_shard(shard, Control::StatsReady(read));
                    }
                }
                Control::StatsReady(read) => self.answer_stats(&read, now),
                Control::Presence(notice) => self.deliver_presence(&notice, now),
                Control::Api(tally) => self.act_on_api(tally, now),
                Control::ApiDone(tally) => self.api_done(&tally, now),
                Control::Backend(answer) => {
                    let (pending, outcome) = *answer;
                    self.backend_answered(pending, outcome, now);
                }
            }
        }
        self.unpark_ready(now);
    }

    /// Resumes waiting for engine shards go on where the shards loaded or the wait ran out.
    fn unpark_ready(&mut self, now: Instant) {
        if self.ctx.parked.is_empty() {
            return;
        }
        for (parked, ready) in self.ctx.take_unparked(now) {
            let Core { conns, ctx } = self;
            let Some(conn) = ctx.reach(conns, parked.key, parked.conn_id) else { continue };
            ctx.unpark(parked.key, conn, parked.waiting, ready, now);
        }
    }

    fn answer_stats(&mut self, read: &StatsRead, now: Instant) {
        let ReplyTo { key, conn_id, .. } = read.reply_to;
        if read.gather.failed() {
            return self.stats_overloaded(read, now);
        }
        let snapshot = self.ctx.shared.snapshot(read.gather.latency());
        match &read.format {
            StatsFormat::Json => self.resume_http(key, conn_id, Response::json(200, &snapshot.to_json()), now),
            StatsFormat::Prometheus => self.resume_http(
                key,
                conn_id,
                Response::with_body(200, "text/plain; version=0.0.4", snapshot.to_prometheus().into_bytes()),
                now,
            ),
            StatsFormat::SsePush => {
                let Core { conns, ctx } = self;
                let Some(conn) = ctx.reach(conns, key, conn_id).filter(|c| c.closing.is_none()) else { return };
                let State::Sse(sse) = &mut conn.state else { return };
                let Some(previous) = sse.stats.as_mut() else { return };
                // Percentiles of the last interval beside the cumulative ones: a plot of the
                // last minutes must not be flattened by the whole run.
                let latest = read.gather.latency();
                let interval = latest.since(previous);
                **previous = latest;
                let mut document = snapshot.to_json();
                document["interval_latency_us"] = json!({
                    "publish_to_queue": crate::metrics::percentiles(&interval.publish_to_queue),
                    "publish_to_write": crate::metrics::percentiles(&interval.publish_to_write),
                    "publish_to_ack": crate::metrics::percentiles(&interval.publish_to_ack),
                });
                ctx.send(key, conn, sse::named_event("stats", &document.to_string()), now);
            }
            StatsFormat::WsResponse(correlation) => {
                let Core { conns, ctx } = self;
                let Some(conn) = ctx.reach(conns, key, conn_id) else { return };
                ctx.send_message(key, conn, "response", correlation.as_deref(), &snapshot.to_json().to_string(), now);
            }
        }
    }

    /// A stats read some shard could not take part in: `overloaded` (503), or no push.
    fn stats_overloaded(&mut self, read: &StatsRead, now: Instant) {
        let ReplyTo { key, conn_id, .. } = read.reply_to;
        let rejection = routes::stats_overloaded();
        match &read.format {
            StatsFormat::Json | StatsFormat::Prometheus => {
                let response = Response::error(&routes::http_error_of(&rejection)).header("Retry-After", "1");
                self.resume_http(key, conn_id, response, now);
            }
            StatsFormat::WsResponse(correlation) => {
                let Core { conns, ctx } = self;
                let Some(conn) = ctx.reach(conns, key, conn_id) else { return };
                ctx.send_error(key, conn, correlation.as_deref(), &rejection, now);
            }
            // The next push comes a second later.
            StatsFormat::SsePush => {}
        }
    }

    /// Answers the request an HTTP connection was waiting on, then handles what it
    /// pipelined behind it. An answer for a request already answered `504` finds the
    /// connection gone (it closes after a 504).
    fn resume_http(&mut self, key: usize, conn_id: u64, response: Response, now: Instant) {
        let Core { conns, ctx } = self;
        let Some(conn) = ctx.reach(conns, key, conn_id).filter(|c| c.closing.is_none()) else { return };
        let State::Http(http) = &mut conn.state else { return };
        let Some(request) = http.waiting.take() else { return };
        http.deadline = now + Duration::from_millis(ctx.config().http_idle_timeout_ms);
        if let Routed::Next = ctx.respond(key, conn, &request, response, now) {
            ctx.process_http(key, conn, now);
        }
    }

    /// Fans out events from the inbox until it is empty, a turn's worth of bytes went or
    /// the turn's limit of connections have new events ([`NEW_WRITES_PER_TURN`], wider
    /// while the shard is behind); true when more wait.
    fn drain_events(&mut self, now: Instant) -> bool {
        let Core { conns, ctx } = self;
        let shared = ctx.shared.clone();
        let inbox = &shared.bus.inboxes()[ctx.id];
        let mut oldest: Option<Duration> = None;
        let mut budget = FANOUT_BYTES_PER_TURN.min(shared.config.max_outbound_bytes / 4);
        let mut more = false;
        let dirty_before = ctx.dirty.len();
        // Connections that reached their batch, per event (kept across events: reused).
        let mut full = Vec::new();
        #[cfg(feature = "fault-injection")]
        let mut dropped = Vec::new();
        while let Some(Delivery { event, ticket }) = inbox.events.pop() {
            #[cfg(feature = "fault-injection")]
            if &*event.topic == crate::FAULT_PANIC_TOPIC {
                panic!("fault injection: shard {} was asked to panic", ctx.id);
            }
            #[cfg(feature = "fault-injection")]
            if &*event.topic == crate::FAULT_DROP_TOPIC {
                dropped
                    .extend(conns.iter().filter(|(_, c)| matches!(c.state, State::WebSocket(_))).map(|(key, _)| key));
            }
            let mut queued = 0usize;
            let counters = &shared.counters[ctx.id];
            let local = LocalEvent::new(event.clone());
            let mut slow = Vec::new();
            // A connection gathering a batch is written once it has it (1: nothing gathers).
            let batch = match ctx.coalescing.batch() {
                1 => usize::MAX,
                batch => batch,
            };
            ctx.index.for_each_match(&event.topic, |at| {
                let Some(conn) = conns.get_mut(at.conn) else { return };
                if conn.last_seq == event.seq || !conn.wants(at.sub, &event) {
                    return;
                }
                conn.last_seq = event.seq;
                match conn.push_event(&local) {
                    Ok(()) => queued += 1,
                    Err(over) => slow.push((at.conn, over)),
                }
                if !conn.dirty {
                    conn.dirty = true;
                    ctx.dirty.push(at.conn);
                } else if !conn.transmit_queued
                    && (conn.queued_events() >= batch || conn.queued_bytes() >= COALESCE_BYTES)
                {
                    // Its batch, or enough bytes to amortize a write: held or not, it
                    // goes this turn (once: a broadcast's connection reaches its batch
                    // on every event after it, and releasing it on each cost a closed
                    // loop 40 % more CPU per delivery).
                    full.push(at.conn);
                }
            });
            for (key, over) in slow {
                ctx.slow_consumer(key, &mut conns[key], over, now);
            }
            for key in full.drain(..) {
                if conns[key].dirty {
                    ctx.release(&mut conns[key], key, now);
                }
            }
            // Counted once per event, not per delivery: a locked add per delivery showed in
            // a saturated shard's profile (about 3 % of its samples).
            counters.deliveries.fetch_add(queued as u64, Ordering::Relaxed);
            // Coalescing follows how long events wait here, on this node's clock; the
            // histogram measures from the publisher's (another node's clock may be skewed).
            oldest = oldest.max(Some(now.saturating_duration_since(event.received_at)));
            Latency::record(&mut ctx.latency.publish_to_queue, now.saturating_duration_since(event.published_at));
            ctx.latency.event_bytes.saturating_record(event.json().len() as u64);
            ctx.latency.fanout.saturating_record(queued as u64);
            budget = budget.saturating_sub(event.ws_frame().len());
            let delivery = Delivery { event, ticket };
            if let Some(done) = delivery.report(queued) {
                shared.bus.mailboxes.to_shard(done.reply_to.shard, Control::PublishDone(done));
            }
            if budget == 0 {
                more = !inbox.events.is_empty();
                break;
            }
            if ctx.dirty.len().saturating_sub(dirty_before) >= ctx.new_writes_limit {
                more = !inbox.events.is_empty();
                if more && oldest.is_some_and(|waited| waited > Coalescing::BEHIND) {
                    ctx.new_writes_limit = ctx.new_writes_limit.saturating_mul(2);
                }
                break;
            }
        }
        if !more {
            ctx.new_writes_limit = NEW_WRITES_PER_TURN;
        }
        if let Some(oldest) = oldest {
            ctx.coalescing.observe(oldest, now);
            ctx.counters().coalescing_us.store(ctx.coalescing.wait().as_micros() as u64, Ordering::Relaxed);
        }
        #[cfg(feature = "fault-injection")]
        for key in dropped {
            self.remove(key);
        }
        more
    }

    /// Moves the dirty connections whose events may be written now to the transmit list;
    /// [`Coalescing`] lets the rest gather more (in `held`, setting the next wake-up), but
    /// only while more events wait in the inbox: once it is empty nothing is known to be
    /// coming, and holding events then would leave the shard idle while a publisher that
    /// waits for them (a closed loop) waits too. That was the half-speed mode the window
    /// alone settled into.
    ///
    /// A connection is held only if it was written within the longest wait, and then
    /// until that long after that write (or until it has its batch, `drain_events`): one
    /// that hears an event less often gains no company and is not held. Held connections
    /// wait in a heap by their last write, at most one entry each, so a turn costs what it
    /// releases, not a pass over every connection held (at a wait as long as a topic's gap
    /// between events that is all of them), and the heap is bounded by the connections.
    fn flush_dirty(&mut self, now: Instant) {
        let company_coming = !self.ctx.shared.bus.inboxes()[self.ctx.id].events.is_empty();
        let hold = self.ctx.drain_deadline.is_none() && company_coming;
        let Core { conns, ctx } = self;
        let mut dirty = std::mem::take(&mut ctx.dirty);
        for key in dirty.drain(..) {
            let Some(conn) = conns.get_mut(key).filter(|c| c.dirty) else { continue };
            let held = hold
                && !conn.out.has_owned()
                && conn.queued_bytes() < COALESCE_BYTES
                && conn.released_at.is_some_and(|at| ctx.coalescing.holds(at, conn.queued_events(), now));
            match conn.released_at {
                // One entry per connection: one already in the heap is brought up to date
                // when it comes out.
                Some(at) if held => {
                    if !conn.held {
                        conn.held = true;
                        ctx.held.push(Reverse((at, key, conn.id)));
                    }
                }
                _ => ctx.release(conn, key, now),
            }
        }
        ctx.dirty = dirty;
        let wait = if hold { ctx.coalescing.wait() } else { Duration::ZERO };
        while let Some(&Reverse((at, key, id))) = ctx.held.peek() {
            if now < at + wait {
                break;
            }
            ctx.held.pop();
            // The key may name another connection by now.
            let Some(conn) = conns.get_mut(key).filter(|c| c.id == id) else { continue };
            match (conn.dirty, conn.released_at) {
                // Written since (it gathered its batch, or a reply took its events along)
                // and dirty again: due a wait after that write.
                (true, Some(last)) if last != at && now < last + wait => {
                    ctx.held.push(Reverse((last, key, id)));
                }
                (true, _) => {
                    conn.held = false;
                    ctx.release(conn, key, now);
                }
                (false, _) => conn.held = false,
            }
        }
        ctx.next_flush = ctx.held.peek().map(|Reverse((at, _, _))| *at + wait);
        ctx.coalescing.flushed(now);
    }

    fn begin_drain(&mut self, now: Instant) {
        self.ctx.drain_deadline = Some(now + Duration::from_millis(self.ctx.shared.config.drain_timeout_ms));
        let Core { conns, ctx } = self;
        for (key, conn) in conns.iter_mut() {
            write_batch(conn, ctx.shared.wall(now));
            match &conn.state {
                State::WebSocket(_) => conn.begin_close(Some(Close::GoingAway), LINGER, now),
                State::Sse(_) => conn.begin_close(None, LINGER, now),
                State::Http(http) if http.waiting.is_none() => conn.begin_close(None, LINGER, now),
                State::Http(_) => {}
            }
            // Every connection changed: reached by iterating, not through `reach`.
            ctx.changed.push(key);
        }
    }
}

/// Turns a batch-mode connection's pending events into one `batch` message, built from
/// the events' shared bytes (no re-serialization; with permessage-deflate, their shared
/// compressed bytes joined by stored blocks, no compression per connection). Returns how
/// many events went compressed.
fn write_batch(conn: &mut Conn, wall: SystemTime) -> usize {
    let State::WebSocket(ws) = &mut conn.state else { return 0 };
    if !ws.batch || ws.batch_pending.is_empty() {
        return 0;
    }
    let events = ws.batch_pending.take();
    let id = ws.next_message_id();
    // The envelope with an empty payload ends in its closing brace: the events go before it.
    let envelope = protocol::server_message("batch", &id, wall, None, "");
    let (head, tail) = envelope.split_at(envelope.len() - 1);
    let mut compressed = 0;
    let out = match ws.deflate {
        Some(agreement) => {
            let mut joiner = Joiner::default();
            joiner.literal(head.as_bytes());
            joiner.literal(b"{\"events\":[");
            for (i, event) in events.iter().enumerate() {
                if i > 0 {
                    joiner.literal(b",");
                }
                match event.deflated_payload(agreement.window) {
                    Some(payload) => {
                        joiner.compressed(payload);
                        compressed += 1;
                    }
                    None => joiner.literal(event.json()),
                }
            }
            joiner.literal(b"]}");
            joiner.literal(tail.as_bytes());
            let payload = joiner.finish();
            let mut frame = Vec::with_capacity(payload.len() + 10);
            event::push_ws_header(&mut frame, event::WS_DEFLATED_TEXT, payload.len(), None);
            frame.extend_from_slice(&payload);
            frame
        }
        None => {
            let mut text =
                String::with_capacity(envelope.len() + events.iter().map(|e| e.json().len() + 1).sum::<usize>() + 16);
            text.push_str(head);
            text.push_str("{\"events\":[");
            for (i, event) in events.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                // Event JSON is built from `str`s by the bus, so it is UTF-8.
                text.push_str(std::str::from_utf8(event.json()).unwrap_or("null"));
            }
            text.push_str("]}");
            text.push_str(tail);
            let mut out = Vec::new();
            ws.codec.send_text(text, &mut out);
            out
        }
    };
    // The batch's events were counted against the bound while pending; now its bytes are.
    conn.out.push_bytes(out);
    compressed
}

impl Ctx {
    fn counters(&self) -> &ShardCounters {
        &self.shared.counters[self.id]
    }

    /// Indexes `pattern` for `sub`, and counts it in the node's interest in engine shards.
    fn index_pattern(&mut self, pattern: &Pattern, sub: SubRef, now: Instant) {
        self.index.insert(pattern, sub);
        if let Some(interest) = &self.shared.interest {
            let wall = wall_ms(self.shared.wall(now));
            interest.add(pattern, wall);
            let from = wall.saturating_sub(crate::interest::SKEW_ALLOWANCE_MS);
            for shard in interest.shards_of([pattern]) {
                self.shared.bus.want_shard(shard, from);
            }
        }
    }

    /// Undoes [`Ctx::index_pattern`].
    fn unindex_pattern(&mut self, pattern: &Pattern, sub: SubRef) {
        if self.index.remove(pattern, sub)
            && let Some(interest) = &self.shared.interest
        {
            interest.remove(pattern);
        }
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn reply_to(&self, key: usize, conn: &Conn) -> ReplyTo {
        ReplyTo { shard: self.id, key, conn_id: conn.id }
    }

    /// The one place the connection and subscription gauges change: a connection moving
    /// from one transport to another (`None`: arriving or leaving) and subscriptions
    /// added or removed.
    fn gauge(&self, from: Option<Transport>, to: Option<Transport>, subscriptions: i64) {
        let counters = self.counters();
        let gauge = |t: Transport| match t {
            Transport::Http => &counters.http,
            Transport::WebSocket => &counters.websocket,
            Transport::Sse => &counters.sse,
        };
        if let Some(from) = from {
            ShardCounters::add(gauge(from), -1);
        }
        if let Some(to) = to {
            ShardCounters::add(gauge(to), 1);
        }
        if subscriptions != 0 {
            ShardCounters::add(&counters.subscriptions, subscriptions);
        }
    }

    /// The connection at `key` if it is still the one `conn_id` names (slab keys are
    /// reused), recorded as changed: whatever the caller does to it, [`Core::settle`] then
    /// derives its deadline and whether it must be written from its state, so no caller
    /// has to remember either.
    fn reach<'c>(&mut self, conns: &'c mut Slab<Conn>, key: usize, conn_id: u64) -> Option<&'c mut Conn> {
        let conn = conns.get_mut(key).filter(|c| c.id == conn_id)?;
        self.changed.push(key);
        Some(conn)
    }

    /// Ends a connection's wait for company: its events are written this turn.
    fn release(&mut self, conn: &mut Conn, key: usize, now: Instant) {
        conn.dirty = false;
        conn.released_at = Some(now);
        self.transmit_now(conn, key);
    }

    /// Schedules a write of `conn` this turn.
    fn transmit_now(&mut self, conn: &mut Conn, key: usize) {
        if !conn.transmit_queued {
            conn.transmit_queued = true;
            self.transmit.push(key);
        }
    }

    /// Closes a connection that went over its bound with 1013 (SSE and HTTP: just
    /// closed), counting what it dropped.
    fn slow_consumer(&mut self, key: usize, conn: &mut Conn, over: OverBound, now: Instant) {
        let counters = self.counters();
        counters.dropped_slow_consumer.fetch_add(over.dropped_events as u64, Ordering::Relaxed);
        ShardCounters::bump(&counters.slow_consumer_disconnects);
        conn.begin_close(Some(Close::TryAgainLater), SLOW_CONSUMER_LINGER, now);
        // Reached by fan-out through the index (not through `reach`), so recorded here.
        self.changed.push(key);
    }

    /// Queues a reply, or closes the connection as a slow consumer when it does not fit.
    fn send(&mut self, key: usize, conn: &mut Conn, bytes: Vec<u8>, now: Instant) {
        if let Err(over) = conn.send(bytes) {
            self.slow_consumer(key, conn, over, now);
        }
    }

    fn on_bytes(&mut self, key: usize, conn: &mut Conn, data: &[u8], now: Instant) {
        if conn.closing.is_some() {
            // A closing connection is only waiting for EOF.
            return;
        }
        match &mut conn.state {
            State::Http(http) => {
                if http.buf.is_empty() && http.waiting.is_none() {
                    let header_deadline = now + Duration::from_millis(self.config().http_header_timeout_ms);
                    http.deadline = http.deadline.min(header_deadline);
                }
                // One request head and body at most; more would be pipelining past a request
                // that is still waiting, which a client has no reason to do.
                if http.buf.len() + data.len() > crate::http::MAX_HEAD_BYTES + self.config().max_body_bytes {
                    let error = HttpError::new(ErrorCode::TooLarge, "request data over the head and body limits");
                    return self.fail_http(key, conn, &error, now);
                }
                http.buf.extend_from_slice(data);
                self.process_http(key, conn, now);
            }
            State::WebSocket(_) => self.on_ws_bytes(key, conn, data, now),
            // SSE clients do not talk.
            State::Sse(_) => {}
        }
    }

    /// Handles a connection's due deadlines, each kind with its own outcome; true when
    /// it must be removed now.
    fn on_timeout(&mut self, key: usize, conn: &mut Conn, now: Instant) -> bool {
        if let Some(closing) = conn.closing {
            return now >= closing.deadline;
        }
        let heartbeat = self.config().heartbeat_interval();
        match &mut conn.state {
            State::Http(http) if now < http.deadline => false,
            State::Http(http) if http.waiting.is_some() => {
                let error = HttpError::new(ErrorCode::Timeout, "no answer in time from the shards or the engine");
                if let Some(request) = http.waiting.take() {
                    let response = self.cors(&request, Response::error(&error));
                    conn.out.push_bytes(response.encode(true));
                }
                ShardCounters::bump(&self.counters().request_timeouts);
                conn.begin_close(None, LINGER, now);
                false
            }
            // Header or idle timeout: nothing to answer.
            State::Http(_) => true,
            State::WebSocket(ws) if ws.auth_deadline.is_some_and(|d| now >= d) => {
                conn.begin_close(Some(Close::Unauthorized), LINGER, now);
                false
            }
            State::WebSocket(ws) if ws.expire_at.is_some_and(|at| now >= at) => {
                let rejection = protocol::Rejection::new(ErrorCode::Unauthorized, "the connection's grant expired");
                self.send_error(key, conn, None, &rejection, now);
                conn.begin_close(Some(Close::Unauthorized), LINGER, now);
                false
            }
            State::WebSocket(ws) if now >= ws.last_heard + 2 * heartbeat => {
                conn.begin_close(Some(Close::GoingAway), LINGER, now);
                false
            }
            State::WebSocket(ws) => {
                if ws.resume_read_at.is_some_and(|t| t <= now) {
                    ws.resume_read_at = None;
                    self.read_again.push(key);
                }
                if now >= ws.next_ping {
                    ws.next_ping = now + heartbeat;
                    let mut out = Vec::new();
                    ws.codec.ping(&mut out);
                    self.send(key, conn, out, now);
                }
                false
            }
            State::Sse(sse) if sse.stats.is_some() => {
                // A stats stream's pushes are its heartbeat.
                if now >= sse.next_ping {
                    sse.next_ping = now + STATS_PUSH_EVERY;
                    // Refused (too many reads in flight): the next push comes a second later.
                    let _ = self.gather_stats(key, conn, StatsFormat::SsePush);
                }
                false
            }
            State::Sse(sse) => {
                if now >= sse.next_ping {
                    sse.next_ping = now + heartbeat;
                    self.send(key, conn, sse::PING.to_vec(), now);
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
