//! One shard: a thread with its own `mio::Poll`, listener, connections, index and timers.
//!
//! Owns the event loop and everything a connection does on it: accepting, reading bytes
//! into the connection state machines (HTTP routing in `routes`, the WebSocket protocol
//! in `session`), fan-out of the events the bus queued for this shard, one vectored write
//! per dirty connection per turn, the timer heap (one entry per connection, never a scan
//! of all connections) and the drain. Nothing in a shard is shared or locked except what
//! [`Shared`] holds; other shards reach it only through its inbox and waker.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read};
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use slab::Slab;

use crate::auth::Auth;
use crate::bus::{Bus, Control, Delivery, Event, ReplyTo};
use crate::config::Config;
use crate::conn::{Chunk, Conn, HttpConn, LocalEvent, State, Transport};
use crate::engine::EngineStatus;
use crate::http::{self, HttpError, Response};
use crate::limits::{Admission, IpRates, Refusal};
use crate::metrics::{Gather, Latency, ShardCounters, Snapshot, StatsFormat};
use crate::protocol;
use crate::sse;
use crate::topic::Index;
use crate::ws::Close;

mod routes;
mod session;

use routes::published_response;
use session::{close_ws, ctx_send, publish_rejection, send_error};

/// Token of the shard's listener.
pub const LISTENER: Token = Token(usize::MAX - 1);
/// Token of the shard's waker.
pub const WAKER: Token = Token(usize::MAX - 2);

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
}

impl Shared {
    fn snapshot(&self, latency: Latency) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for (counters, inbox) in self.counters.iter().zip(self.bus.inboxes()) {
            snapshot.add_shard(counters, inbox.events.len());
        }
        snapshot.published = self.bus.counters.published.load(Ordering::Relaxed);
        snapshot.refused_overloaded = self.bus.counters.refused_overloaded.load(Ordering::Relaxed);
        snapshot.history = self.bus.history_size();
        snapshot.latency = latency;
        snapshot.engine = self.engine.as_ref().map(|e| {
            (e.up.load(Ordering::Acquire), e.reconnects.load(Ordering::Relaxed), e.lag_us.load(Ordering::Relaxed))
        });
        snapshot
    }
}

/// Where an index entry points: a connection and one of its subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SubRef {
    conn: usize,
    sub: u32,
}

/// The key an SSE stream's one subscription has.
const SSE_SUB: u32 = 0;
/// How long a closing connection may take to flush and see the peer's EOF.
const LINGER: Duration = Duration::from_secs(2);
/// How long a slow consumer gets to read its 1013 close frame.
const SLOW_CONSUMER_LINGER: Duration = Duration::from_secs(5);
/// Read size per `read` call; one buffer per shard.
const SCRATCH_BYTES: usize = 64 * 1024;
/// Read size per turn for a connection over its message rate.
const LIMITED_READ_BYTES: usize = 2 * 1024;
/// Pause before reading more from a connection over its message rate.
const LIMITED_READ_PAUSE: Duration = Duration::from_millis(1);

/// Queued bytes that are written at once, coalescing or not: one write of this size
/// already amortizes its syscall.
const COALESCE_BYTES: usize = 16 * 1024;

/// How long a shard lets a connection's queued events wait for more before writing them.
///
/// `min` while the shard keeps up (0 by default: events are written in the loop turn that
/// fans them out). Once fan-out falls behind (events wait in the inbox longer than
/// `BEHIND`), every delivery costs a kernel send for the shard and a read for the client,
/// and the only way to deliver more per second is to put several events in one write:
/// the window doubles, up to `max`, while the shard is behind, and halves back to `min`
/// while it is not. Replies and control frames never wait.
#[derive(Debug)]
struct Coalescing {
    window: Duration,
    min: Duration,
    max: Duration,
}

impl Coalescing {
    const BEHIND: Duration = Duration::from_millis(5);
    const CAUGHT_UP: Duration = Duration::from_millis(1);
    const FIRST: Duration = Duration::from_millis(1);

    fn new(min: Duration, max: Duration) -> Self {
        Self { window: min, min, max }
    }

    /// Takes how long the oldest event drained in a loop turn waited in the inbox.
    fn observe(&mut self, waited: Duration) {
        if waited > Self::BEHIND {
            self.window = (self.window * 2).max(Self::FIRST).min(self.max);
        } else if waited < Self::CAUGHT_UP {
            self.window /= 2;
            if self.window < Self::FIRST / 4 {
                self.window = Duration::ZERO;
            }
        }
        self.window = self.window.max(self.min);
    }

    fn window(&self) -> Duration {
        self.window
    }
}

/// Everything of a shard but its connections, so both can be borrowed at once.
struct Ctx {
    id: usize,
    poll: Poll,
    listener: Option<TcpListener>,
    shared: Arc<Shared>,
    index: Index<SubRef>,
    timers: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    latency: Latency,
    scratch: Vec<u8>,
    /// Connections with events queued and not yet written.
    dirty: Vec<usize>,
    coalescing: Coalescing,
    /// When the first of the connections `coalescing` holds back is due.
    next_flush: Option<Instant>,
    /// Connections that had more to read when their per-turn budget ran out.
    read_again: Vec<usize>,
    next_conn: u64,
    /// Highest sequence fanned out here: the live/replay boundary for `since`.
    fanned_out_through: u64,
    /// When draining: the time the shard stops regardless.
    drain_deadline: Option<Instant>,
    stopping: bool,
}

/// A shard, ready to run on its own thread.
pub struct Shard {
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

impl Shard {
    /// A shard `id` polling `poll`, accepting on `listener`.
    pub fn new(id: usize, poll: Poll, mut listener: TcpListener, shared: Arc<Shared>) -> io::Result<Self> {
        poll.registry().register(&mut listener, LISTENER, Interest::READABLE)?;
        let coalescing = Coalescing::new(
            Duration::from_millis(shared.config.write_coalescing_min_ms),
            Duration::from_millis(shared.config.write_coalescing_max_ms),
        );
        Ok(Self {
            conns: Slab::new(),
            ctx: Ctx {
                id,
                poll,
                listener: Some(listener),
                shared,
                index: Index::default(),
                timers: BinaryHeap::new(),
                latency: Latency::default(),
                scratch: vec![0; SCRATCH_BYTES],
                dirty: Vec::new(),
                coalescing,
                next_flush: None,
                read_again: Vec::new(),
                next_conn: (id as u64) << 48,
                fanned_out_through: 0,
                drain_deadline: None,
                stopping: false,
            },
        })
    }

    /// Runs the loop until stopped or drained.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = self.next_timeout();
            if let Err(e) = self.ctx.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for key in std::mem::take(&mut self.ctx.read_again) {
                self.on_readable(key);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(),
                    WAKER => {}
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.on_readable(key);
                        }
                        if event.is_writable() {
                            self.flush(key);
                        }
                    }
                }
            }
            self.drain_control();
            self.drain_events();
            self.flush_dirty();
            self.run_timers();
            if self.ctx.stopping || (self.ctx.drain_deadline.is_some() && self.conns.is_empty()) {
                return Ok(());
            }
        }
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        if !self.ctx.read_again.is_empty() {
            return Some(Duration::ZERO);
        }
        let now = Instant::now();
        let timer = self.ctx.timers.peek().map(|Reverse((t, _, _))| *t);
        let next = [timer, self.ctx.drain_deadline, self.ctx.next_flush].into_iter().flatten().min();
        next.map(|t| t.saturating_duration_since(now))
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.ctx.listener else { return };
            let (socket, addr) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log and try again on the next readiness event.
                    tracing::warn!(shard = self.ctx.id, error = %e, "accept failed");
                    return;
                }
            };
            let _ = socket.set_nodelay(true);
            let refusal = self.ctx.shared.admission.admit(addr.ip()).err();
            self.insert(socket, addr.ip(), refusal);
        }
    }

    fn insert(&mut self, mut socket: TcpStream, peer: IpAddr, refusal: Option<Refusal>) {
        let now = Instant::now();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) =
            self.ctx.poll.registry().register(&mut socket, Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!(error = %e, "register failed");
            if refusal.is_none() {
                self.ctx.shared.admission.release(peer);
            }
            return;
        }
        self.ctx.next_conn += 1;
        let config = &self.ctx.shared.config;
        let mut conn = Conn {
            id: self.ctx.next_conn,
            socket,
            peer,
            out: Default::default(),
            state: State::Http(HttpConn {
                buf: Vec::new(),
                deadline: now + Duration::from_millis(config.http_header_timeout_ms),
                waiting: None,
                continued: false,
            }),
            transport: Transport::Http,
            scheduled: None,
            last_seq: 0,
            dirty_since: None,
            indexed: Vec::new(),
            admitted: refusal.is_none(),
        };
        match refusal {
            None => ShardCounters::add(&self.ctx.counters().http, 1),
            Some(refusal) => {
                let error = match refusal {
                    Refusal::Full => HttpError::new(503, "too_many_connections", "the broker is at max_connections"),
                    Refusal::TooManyFromIp => {
                        HttpError::new(429, "too_many_connections", "too many connections from this address")
                    }
                };
                conn.out.push_bytes(Response::error(&error).header("Retry-After", "1").encode(true));
                conn.state = State::Closing { deadline: now + LINGER, shut: false };
            }
        }
        entry.insert(conn);
        self.after_io(key);
    }

    fn on_readable(&mut self, key: usize) {
        let Shard { conns, ctx } = self;
        let Some(conn) = conns.get_mut(key) else { return };
        let mut scratch = std::mem::take(&mut ctx.scratch);
        let now = Instant::now();
        let mut eof = false;
        // A sender over its rate limit gets a small read per turn: what it floods stays in
        // the kernel's buffers (TCP pushes back on it) instead of in this loop's time.
        let budget = match &conn.state {
            State::WebSocket(ws) if ws.bucket.is_limiting() => LIMITED_READ_BYTES,
            _ => scratch.len(),
        };
        loop {
            match conn.socket.read(&mut scratch[..budget]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    ctx.on_bytes(key, conn, &scratch[..n], now);
                    if n == budget {
                        // Fairness: one buffer per connection per turn; the rest waits
                        // for the next turn (or, over the rate, for the next token) so a
                        // flooding client cannot starve others.
                        match &mut conn.state {
                            State::WebSocket(ws) if budget == LIMITED_READ_BYTES => {
                                ws.resume_read_at = Some(now + LIMITED_READ_PAUSE);
                            }
                            _ => ctx.read_again.push(key),
                        }
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    eof = true;
                    break;
                }
            }
        }
        ctx.scratch = scratch;
        if eof {
            match &conn.state {
                // The peer may have half-closed after its last request: answer it first.
                State::Http(_) if !conn.out.is_empty() => {
                    conn.state = State::Closing { deadline: now + LINGER, shut: false };
                }
                _ => {
                    self.remove(key);
                    return;
                }
            }
        }
        self.after_io(key);
    }

    /// Writes what is queued, closes what is finished, and re-arms the timer.
    fn after_io(&mut self, key: usize) {
        self.flush(key);
        let heartbeat = self.ctx.shared.config.heartbeat_interval();
        let Some(conn) = self.conns.get_mut(key) else { return };
        if let Some(deadline) = conn.deadline(heartbeat)
            && conn.scheduled.is_none_or(|s| deadline < s)
        {
            conn.scheduled = Some(deadline);
            self.ctx.timers.push(Reverse((deadline, key, conn.id)));
        }
    }

    fn flush(&mut self, key: usize) {
        let Shard { conns, ctx } = self;
        let Some(conn) = conns.get_mut(key) else { return };
        let now = Instant::now();
        let histogram = &mut ctx.latency.publish_to_write;
        match conn.out.write_to(&mut conn.socket, |e| Latency::record(histogram, now - e.published_at)) {
            Err(_) => self.remove(key),
            Ok(false) => {}
            Ok(true) => {
                if let State::Closing { shut, .. } = &mut conn.state
                    && !*shut
                {
                    *shut = true;
                    if conn.socket.shutdown(Shutdown::Write).is_err() {
                        self.remove(key);
                    }
                }
            }
        }
    }

    fn remove(&mut self, key: usize) {
        if !self.conns.contains(key) {
            return;
        }
        let mut conn = self.conns.remove(key);
        for (pattern, sub) in conn.indexed.drain(..) {
            self.ctx.index.remove(&pattern, SubRef { conn: key, sub });
        }
        let counters = self.ctx.counters();
        match conn.transport {
            Transport::Http if conn.admitted => ShardCounters::add(&counters.http, -1),
            Transport::Http => {}
            Transport::WebSocket => {
                ShardCounters::add(&counters.websocket, -1);
            }
            Transport::Sse => ShardCounters::add(&counters.sse, -1),
        }
        let subscriptions = match &conn.state {
            State::WebSocket(ws) => ws.subs.len() as i64,
            State::Sse(_) => 1,
            _ => 0,
        };
        ShardCounters::add(&counters.subscriptions, -subscriptions);
        let _ = self.ctx.poll.registry().deregister(&mut conn.socket);
        if conn.admitted {
            self.ctx.shared.admission.release(conn.peer);
        }
    }

    fn drain_control(&mut self) {
        let shared = self.ctx.shared.clone();
        let inbox = &shared.bus.inboxes()[self.ctx.id];
        while let Some(message) = inbox.control.pop() {
            match message {
                Control::PublishDone(ticket) => {
                    let ReplyTo { key, conn_id, .. } = ticket.reply_to;
                    let body = json!({"message_ids": ticket.ids, "delivered_to": ticket.delivered()});
                    self.resume_http(key, conn_id, Response::json(200, &body));
                }
                Control::Published(reply, result) => {
                    let ReplyTo { key, conn_id, .. } = reply.to;
                    match &reply.websocket {
                        None => self.resume_http(key, conn_id, published_response(result, 0)),
                        Some(correlation) => {
                            let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == conn_id) else { continue };
                            match result {
                                Ok(ids) => {
                                    let payload = json!({"message_id": ids.first()}).to_string();
                                    ctx_send(conn, "response", correlation.as_deref(), &payload);
                                }
                                Err(error) => send_error(conn, correlation.as_deref(), &publish_rejection(&error)),
                            }
                            self.after_io(key);
                        }
                    }
                }
                Control::Collect(gather) => {
                    if gather.add(&self.ctx.latency) {
                        let shard = gather.reply_to.shard;
                        shared.bus.inboxes()[shard].send(Control::StatsReady(gather));
                    }
                }
                Control::StatsReady(gather) => self.answer_stats(&gather),
                Control::Drain => self.begin_drain(),
                Control::Stop => self.ctx.stopping = true,
            }
        }
    }

    fn answer_stats(&mut self, gather: &Gather) {
        let ReplyTo { key, conn_id, .. } = gather.reply_to;
        let snapshot = self.ctx.shared.snapshot(gather.latency());
        match &gather.format {
            StatsFormat::Json => self.resume_http(key, conn_id, Response::json(200, &snapshot.to_json())),
            StatsFormat::Prometheus => self.resume_http(
                key,
                conn_id,
                Response::with_body(200, "text/plain; version=0.0.4", snapshot.to_prometheus().into_bytes()),
            ),
            StatsFormat::WsResponse(correlation) => {
                let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == conn_id) else { return };
                ctx_send(conn, "response", correlation.as_deref(), &snapshot.to_json().to_string());
                self.after_io(key);
            }
        }
    }

    /// Answers the request an HTTP connection was waiting on, then handles what it
    /// pipelined behind it.
    fn resume_http(&mut self, key: usize, conn_id: u64, response: Response) {
        let Shard { conns, ctx } = self;
        let Some(conn) = conns.get_mut(key).filter(|c| c.id == conn_id) else { return };
        let State::Http(http) = &mut conn.state else { return };
        let Some(request) = http.waiting.take() else { return };
        let now = Instant::now();
        if let Routed::Next = ctx.respond(conn, &request, response, now) {
            ctx.process_http(key, conn, now);
        }
        self.after_io(key);
    }

    fn drain_events(&mut self) {
        let Shard { conns, ctx } = self;
        let shared = ctx.shared.clone();
        let inbox = &shared.bus.inboxes()[ctx.id];
        inbox.clear_wake();
        let now = Instant::now();
        let max_outbound = shared.config.max_outbound_bytes;
        let mut oldest: Option<Duration> = None;
        while let Some(Delivery { event, ticket }) = inbox.events.pop() {
            let mut queued = 0usize;
            let counters = &shared.counters[ctx.id];
            let dirty = &mut ctx.dirty;
            let written = &mut ctx.latency.publish_to_write;
            let local = LocalEvent::new(event.clone());
            ctx.index.for_each_match(&event.topic, |at| {
                let Some(conn) = conns.get_mut(at.conn) else { return };
                if conn.last_seq == event.seq || !wants(conn, at.sub, &event) {
                    return;
                }
                conn.last_seq = event.seq;
                if enqueue_event(conn, &local, max_outbound, counters, written, now) {
                    queued += 1;
                }
                if conn.dirty_since.is_none() {
                    conn.dirty_since = Some(now);
                    dirty.push(at.conn);
                }
            });
            // Counted once per event, not per delivery: a locked add per delivery showed in
            // a saturated shard's profile (about 3 % of its samples).
            counters.deliveries.fetch_add(queued as u64, Ordering::Relaxed);
            ctx.fanned_out_through = event.seq;
            let waited = now.saturating_duration_since(event.published_at);
            oldest = oldest.max(Some(waited));
            Latency::record(&mut ctx.latency.publish_to_queue, waited);
            ctx.latency.event_bytes.saturating_record(event.json().len() as u64);
            ctx.latency.fanout.saturating_record(queued as u64);
            let delivery = Delivery { event, ticket };
            if let Some(done) = delivery.report(queued) {
                shared.bus.inboxes()[done.reply_to.shard].send(Control::PublishDone(done));
            }
        }
        if let Some(oldest) = oldest {
            ctx.coalescing.observe(oldest);
            ctx.counters().coalescing_us.store(ctx.coalescing.window().as_micros() as u64, Ordering::Relaxed);
        }
    }

    /// Writes the connections events were queued for, except those the coalescing window
    /// lets wait for more (they stay dirty and set the next wake-up).
    fn flush_dirty(&mut self) {
        let now = Instant::now();
        let window = if self.ctx.drain_deadline.is_some() { Duration::ZERO } else { self.ctx.coalescing.window() };
        let dirty = std::mem::take(&mut self.ctx.dirty);
        let mut waiting = Vec::new();
        self.ctx.next_flush = None;
        for &key in &dirty {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            let Some(since) = conn.dirty_since else { continue };
            let due = since + window;
            if now < due && !conn.out.has_owned() && conn.queued_bytes() < COALESCE_BYTES {
                waiting.push(key);
                self.ctx.next_flush = Some(self.ctx.next_flush.map_or(due, |next| next.min(due)));
                continue;
            }
            conn.dirty_since = None;
            write_batch(conn);
            self.after_io(key);
        }
        self.ctx.dirty = dirty;
        self.ctx.dirty.clear();
        self.ctx.dirty.append(&mut waiting);
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        if self.ctx.drain_deadline.is_some_and(|d| now >= d) {
            self.ctx.stopping = true;
            return;
        }
        while let Some(Reverse((at, key, id))) = self.ctx.timers.peek().copied() {
            if at > now {
                break;
            }
            self.ctx.timers.pop();
            let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == id && c.scheduled == Some(at)) else {
                continue;
            };
            conn.scheduled = None;
            if let State::WebSocket(ws) = &mut conn.state
                && ws.resume_read_at.is_some_and(|t| t <= now)
            {
                ws.resume_read_at = None;
                self.ctx.read_again.push(key);
            }
            if self.ctx.on_timeout(conn, now) {
                self.remove(key);
            } else {
                self.after_io(key);
            }
        }
    }

    fn begin_drain(&mut self) {
        let now = Instant::now();
        self.ctx.drain_deadline = Some(now + Duration::from_millis(self.ctx.shared.config.drain_timeout_ms));
        if let Some(mut listener) = self.ctx.listener.take() {
            let _ = self.ctx.poll.registry().deregister(&mut listener);
        }
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let Some(conn) = self.conns.get_mut(key) else { continue };
            write_batch(conn);
            match &mut conn.state {
                State::WebSocket(ws) => {
                    let mut out = Vec::new();
                    ws.codec.close(Close::GoingAway, &mut out);
                    conn.out.push_bytes(out);
                    conn.state = State::Closing { deadline: now + LINGER, shut: false };
                }
                State::Sse(_) => conn.state = State::Closing { deadline: now + LINGER, shut: false },
                State::Http(http) if http.waiting.is_none() => {
                    conn.state = State::Closing { deadline: now + LINGER, shut: false };
                }
                _ => {}
            }
            self.after_io(key);
        }
    }
}

/// Whether subscription `sub` of `conn` wants `event` (the index already matched its topic).
fn wants(conn: &Conn, sub: u32, event: &Event) -> bool {
    match &conn.state {
        State::WebSocket(ws) => ws
            .subs
            .iter()
            .find(|s| s.key == sub)
            .is_some_and(|s| event.key > s.after && s.filter.accepts_non_topic(event)),
        State::Sse(sse) => event.key > sse.after && sse.filter.accepts_non_topic(event),
        _ => false,
    }
}

/// Queues `event` for `conn`, or closes it as a slow consumer. True when queued.
fn enqueue_event(
    conn: &mut Conn,
    event: &LocalEvent,
    max_outbound: usize,
    counters: &ShardCounters,
    written: &mut hdrhistogram::Histogram<u64>,
    now: Instant,
) -> bool {
    let queued = |conn: &Conn| conn.queued_bytes() + event.ws_frame().len();
    if queued(conn) > max_outbound {
        // The limit is for what the peer has not taken: write what this turn queued before
        // judging. A write error surfaces at the end-of-turn flush.
        write_batch(conn);
        let at = Instant::now();
        let _ = conn.out.write_to(&mut conn.socket, |e| Latency::record(written, at - e.published_at));
    }
    if queued(conn) > max_outbound {
        let dropped = conn.out.drop_unstarted_events() + 1;
        counters.dropped_slow_consumer.fetch_add(dropped as u64, Ordering::Relaxed);
        ShardCounters::bump(&counters.slow_consumer_disconnects);
        if let State::WebSocket(ws) = &mut conn.state {
            counters.dropped_slow_consumer.fetch_add(ws.batch_pending.len() as u64, Ordering::Relaxed);
            let mut out = Vec::new();
            ws.codec.close(Close::TryAgainLater, &mut out);
            conn.out.push_bytes(out);
        }
        conn.state = State::Closing { deadline: now + SLOW_CONSUMER_LINGER, shut: false };
        return false;
    }
    match &mut conn.state {
        State::WebSocket(ws) if ws.batch => ws.batch_pending.push(event.clone()),
        State::WebSocket(_) => conn.out.push(Chunk::WsEvent(event.clone())),
        State::Sse(_) => conn.out.push(Chunk::SseEvent(event.clone())),
        _ => return false,
    }
    true
}

/// Turns a batch-mode connection's pending events into one `batch` message, built from
/// the events' shared bytes (no re-serialization).
fn write_batch(conn: &mut Conn) {
    let State::WebSocket(ws) = &mut conn.state else { return };
    if ws.batch_pending.is_empty() {
        return;
    }
    let events = ws.batch_pending.take();
    let mut body = String::from("{\"events\":[");
    let mut first = true;
    for event in &events {
        if !first {
            body.push(',');
        }
        first = false;
        // Event JSON is built from `str`s by the bus, so it is UTF-8.
        body.push_str(std::str::from_utf8(event.json()).unwrap_or("null"));
    }
    body.push_str("]}");
    let id = ws.next_message_id();
    let text = protocol::server_message("batch", &id, SystemTime::now(), None, &body);
    let mut out = Vec::new();
    ws.codec.send_text(text, &mut out);
    conn.out.push_bytes(out);
}

impl Ctx {
    fn counters(&self) -> &ShardCounters {
        &self.shared.counters[self.id]
    }

    fn config(&self) -> &Config {
        &self.shared.config
    }

    fn reply_to(&self, key: usize, conn: &Conn) -> ReplyTo {
        ReplyTo { shard: self.id, key, conn_id: conn.id }
    }

    fn on_bytes(&mut self, key: usize, conn: &mut Conn, data: &[u8], now: Instant) {
        match &mut conn.state {
            State::Http(http) => {
                if http.buf.is_empty() {
                    let header_deadline = now + Duration::from_millis(self.config().http_header_timeout_ms);
                    http.deadline = http.deadline.min(header_deadline);
                }
                // One request head and body at most; more would be pipelining past a request
                // that is still waiting, which a client has no reason to do.
                if http.buf.len() + data.len() > http::MAX_HEAD_BYTES + self.config().max_body_bytes {
                    let error = HttpError::new(413, "too_large", "request data over the head and body limits");
                    return self.fail_http(conn, &error, now);
                }
                http.buf.extend_from_slice(data);
                self.process_http(key, conn, now);
            }
            State::WebSocket(_) => self.on_ws_bytes(key, conn, data, now),
            // SSE clients do not talk; a closing connection is only waiting for EOF.
            State::Sse(_) | State::Closing { .. } => {}
        }
    }

    /// Handles a connection's deadline; true when it must be removed now.
    fn on_timeout(&mut self, conn: &mut Conn, now: Instant) -> bool {
        let heartbeat = self.config().heartbeat_interval();
        match &mut conn.state {
            State::Http(http) => now >= http.deadline && http.waiting.is_none(),
            State::WebSocket(ws) if ws.auth_deadline.is_some_and(|d| now >= d) => {
                close_ws(conn, Close::Unauthorized, now);
                false
            }
            State::WebSocket(ws) => {
                if now >= ws.last_heard + 2 * heartbeat {
                    let mut out = Vec::new();
                    ws.codec.close(Close::GoingAway, &mut out);
                    conn.out.push_bytes(out);
                    conn.state = State::Closing { deadline: now + LINGER, shut: false };
                } else if now >= ws.next_ping {
                    let mut out = Vec::new();
                    ws.codec.ping(&mut out);
                    conn.out.push_bytes(out);
                    ws.next_ping = now + heartbeat;
                }
                false
            }
            State::Sse(sse) => {
                if now >= sse.next_ping {
                    conn.out.push_bytes(sse::PING.to_vec());
                    sse.next_ping = now + heartbeat;
                }
                false
            }
            State::Closing { deadline, .. } => now >= *deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_opens_only_while_behind_and_closes_when_caught_up() {
        let mut c = Coalescing::new(Duration::ZERO, Duration::from_millis(20));
        c.observe(Duration::from_millis(3));
        assert_eq!(c.window(), Duration::ZERO, "a few ms of scheduling delay is not falling behind");
        let windows: Vec<_> = (0..7)
            .map(|_| {
                c.observe(Duration::from_millis(40));
                c.window().as_millis()
            })
            .collect();
        assert_eq!(windows, [1, 2, 4, 8, 16, 20, 20]);
        c.observe(Duration::from_millis(3));
        assert_eq!(c.window(), Duration::from_millis(20), "between the thresholds it holds");
        for _ in 0..8 {
            c.observe(Duration::from_micros(100));
        }
        assert_eq!(c.window(), Duration::ZERO);
    }

    #[test]
    fn coalescing_stays_within_the_configured_bounds() {
        let mut never = Coalescing::new(Duration::ZERO, Duration::ZERO);
        never.observe(Duration::from_secs(1));
        assert_eq!(never.window(), Duration::ZERO, "max 0 turns coalescing off");
        let mut always = Coalescing::new(Duration::from_millis(5), Duration::from_millis(5));
        assert_eq!(always.window(), Duration::from_millis(5));
        always.observe(Duration::from_secs(1));
        always.observe(Duration::ZERO);
        assert_eq!(always.window(), Duration::from_millis(5), "min holds while caught up");
    }
}
