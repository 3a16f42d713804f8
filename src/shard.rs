//! One shard: a thread with its own `mio::Poll`, listener, connections, index and timers.
//!
//! Owns the event loop and everything a connection does on it: accepting, reading bytes
//! into the connection state machines, routing HTTP requests, the WebSocket protocol,
//! SSE streams, fan-out of the events the bus queued for this shard, one vectored write
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

use crate::auth::{Auth, AuthError, Grant};
use crate::bus::{Accepted, Bus, Control, Delivery, Event, PublishError, Reply, ReplyTo};
use crate::config::Config;
use crate::conn::{Chunk, Conn, Filter, HttpConn, SseConn, State, Subscription, Transport, WsConn};
use crate::engine::EngineStatus;
use crate::history::NotRecoverable;
use crate::http::{self, HttpError, Parsed, Request, Response};
use crate::limits::{Admission, IpRates, Refusal, TokenBucket, Verdict};
use crate::metrics::{Gather, Latency, ShardCounters, Snapshot, StatsFormat};
use crate::protocol::{self, ClientMessage, ErrorCode, HistoryQuery, Rejection};
use crate::sse;
use crate::topic::Index;
use crate::ws::{self, Close, Codec, Ended, Received};

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
    dirty: Vec<usize>,
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
        let next = match (timer, self.ctx.drain_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
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
            dirty: false,
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
        while let Some(Delivery { event, ticket }) = inbox.events.pop() {
            let mut queued = 0usize;
            let counters = &shared.counters[ctx.id];
            let dirty = &mut ctx.dirty;
            let written = &mut ctx.latency.publish_to_write;
            ctx.index.for_each_match(&event.topic, |at| {
                let Some(conn) = conns.get_mut(at.conn) else { return };
                if conn.last_seq == event.seq || !wants(conn, at.sub, &event) {
                    return;
                }
                conn.last_seq = event.seq;
                if enqueue_event(conn, &event, max_outbound, counters, written, now) {
                    queued += 1;
                }
                if !conn.dirty {
                    conn.dirty = true;
                    dirty.push(at.conn);
                }
            });
            ctx.fanned_out_through = event.seq;
            Latency::record(&mut ctx.latency.publish_to_queue, now.saturating_duration_since(event.published_at));
            ctx.latency.event_bytes.saturating_record(event.json().len() as u64);
            ctx.latency.fanout.saturating_record(queued as u64);
            let delivery = Delivery { event, ticket };
            if let Some(done) = delivery.report(queued) {
                shared.bus.inboxes()[done.reply_to.shard].send(Control::PublishDone(done));
            }
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.ctx.dirty);
        for &key in &dirty {
            if let Some(conn) = self.conns.get_mut(key) {
                conn.dirty = false;
                write_batch(conn);
            }
            self.after_io(key);
        }
        self.ctx.dirty = dirty;
        self.ctx.dirty.clear();
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
    event: &Arc<Event>,
    max_outbound: usize,
    counters: &ShardCounters,
    written: &mut hdrhistogram::Histogram<u64>,
    now: Instant,
) -> bool {
    let queued = |conn: &Conn| {
        let pending: usize = match &conn.state {
            State::WebSocket(ws) => ws.batch_pending.iter().map(|e| e.json().len() + 1).sum(),
            _ => 0,
        };
        conn.out.bytes() + pending + event.ws_frame().len()
    };
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
    ShardCounters::bump(&counters.deliveries);
    true
}

/// Turns a batch-mode connection's pending events into one `batch` message, built from
/// the events' shared bytes (no re-serialization).
fn write_batch(conn: &mut Conn) {
    let State::WebSocket(ws) = &mut conn.state else { return };
    if ws.batch_pending.is_empty() {
        return;
    }
    let events = std::mem::take(&mut ws.batch_pending);
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

/// Sends a server message on a WebSocket connection (nothing if it is not one).
fn ctx_send(conn: &mut Conn, kind: &str, correlation_id: Option<&str>, payload: &str) {
    let State::WebSocket(ws) = &mut conn.state else { return };
    if !ws.codec.can_write() {
        return;
    }
    let id = ws.next_message_id();
    let text = protocol::server_message(kind, &id, SystemTime::now(), correlation_id, payload);
    let mut out = Vec::new();
    ws.codec.send_text(text, &mut out);
    conn.out.push_bytes(out);
}

fn send_error(conn: &mut Conn, correlation_id: Option<&str>, rejection: &Rejection) {
    ctx_send(conn, "error", correlation_id, &protocol::error_payload(rejection).to_string());
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

    fn process_http(&mut self, key: usize, conn: &mut Conn, now: Instant) {
        loop {
            let State::Http(http) = &mut conn.state else { return };
            if http.waiting.is_some() {
                return;
            }
            let (request, head_len) = match http::parse_head(&http.buf) {
                Parsed::Partial => return,
                Parsed::Invalid(error) => return self.fail_http(conn, &error, now),
                Parsed::Complete(request, head_len) => (request, head_len),
            };
            if request.chunked {
                let error = HttpError::new(411, "bad_request", "chunked bodies are not supported; send Content-Length");
                return self.fail_http(conn, &error, now);
            }
            let body_len = request.content_length.unwrap_or(0);
            if body_len > self.config().max_body_bytes {
                let error =
                    HttpError::new(413, "too_large", format!("body over {} bytes", self.config().max_body_bytes));
                return self.fail_http(conn, &error, now);
            }
            if http.buf.len() < head_len + body_len {
                if request.expect_continue && !http.continued {
                    http.continued = true;
                    conn.out.push_bytes(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec());
                }
                return;
            }
            http.continued = false;
            let body: Vec<u8> = http.buf[head_len..head_len + body_len].to_vec();
            http.buf.drain(..head_len + body_len);
            http.deadline = now + Duration::from_millis(self.config().http_idle_timeout_ms);
            if let Routed::Halt = self.route(key, conn, request, &body, now) {
                return;
            }
        }
    }

    fn fail_http(&mut self, conn: &mut Conn, error: &HttpError, now: Instant) {
        conn.out.push_bytes(Response::error(error).encode(true));
        conn.state = State::Closing { deadline: now + LINGER, shut: false };
    }

    fn respond(&mut self, conn: &mut Conn, request: &Request, response: Response, now: Instant) -> Routed {
        let response = self.cors(request, response);
        conn.out.push_bytes(response.encode(request.close));
        if request.close {
            conn.state = State::Closing { deadline: now + LINGER, shut: false };
            return Routed::Halt;
        }
        Routed::Next
    }

    /// The `Access-Control-Allow-Origin` answer for `request`, if its origin is allowed.
    fn allow_origin<'r>(&self, request: &'r Request) -> Option<&'r str> {
        let origin = request.origin.as_deref().filter(|o| self.config().origin_allowed(o))?;
        Some(if self.config().allowed_origins.iter().any(|o| o == "*") { "*" } else { origin })
    }

    fn cors(&self, request: &Request, response: Response) -> Response {
        match self.allow_origin(request) {
            Some(allow) => response.header("Access-Control-Allow-Origin", allow).header("Vary", "Origin"),
            None => response,
        }
    }

    fn route(&mut self, key: usize, conn: &mut Conn, request: Box<Request>, body: &[u8], now: Instant) -> Routed {
        let request_ref = &*request;
        if let Some(routed) = self.route_now(key, conn, request_ref, body, now) {
            return routed;
        }
        // The answer comes from other shards: keep the request for it.
        if let State::Http(http) = &mut conn.state {
            http.waiting = Some(request);
        }
        Routed::Halt
    }

    /// Routes a request; `None` when the answer will come later through the inbox.
    fn route_now(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        body: &[u8],
        now: Instant,
    ) -> Option<Routed> {
        let method = request.method.as_str();
        let path = request.path.as_str();
        if method == "OPTIONS" {
            let response = Response::with_body(204, "text/plain", Vec::new())
                .header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
                .header("Access-Control-Allow-Headers", "Content-Type, Authorization, Last-Event-ID")
                .header("Access-Control-Max-Age", "86400");
            return Some(self.respond(conn, request, response, now));
        }
        let echo = !self.config().echo_path.is_empty() && path == self.config().echo_path;
        let allowed: &[&str] = match path {
            "/ws" => &["GET"],
            _ if echo => &["GET"],
            "/publish" => &["POST"],
            "/sse" | "/history" | "/health" | "/stats" | "/metrics" => &["GET"],
            _ => {
                let error = HttpError::new(404, "not_found", format!("no route {path}"));
                return Some(self.respond(conn, request, Response::error(&error), now));
            }
        };
        if !allowed.contains(&method) {
            let error = HttpError::new(405, "method_not_allowed", format!("{path} takes {}", allowed.join(", ")));
            let response = Response::error(&error).header("Allow", allowed.join(", "));
            return Some(self.respond(conn, request, response, now));
        }
        Some(match path {
            "/ws" => self.upgrade(key, conn, request, false, now),
            _ if echo => self.upgrade(key, conn, request, true, now),
            "/publish" => return self.http_publish(key, conn, request, body, now),
            "/sse" => self.start_sse(key, conn, request, now),
            "/history" => {
                let response = match self.authorized_query(request) {
                    Ok(query) => Response::with_body(200, "application/json", self.history(&query).into_bytes()),
                    Err(response) => response,
                };
                self.respond(conn, request, response, now)
            }
            "/health" => {
                let engine_up = self.shared.engine.as_ref().map(|e| e.up.load(Ordering::Acquire));
                let response = if self.shared.draining.load(Ordering::Acquire) {
                    Response::json(503, &json!({"status": "draining"}))
                } else {
                    match engine_up {
                        None => Response::json(200, &json!({"status": "ok"})),
                        Some(true) => Response::json(200, &json!({"status": "ok", "engine": "up"})),
                        // Still serving subscribers; publishes fail until the engine is back.
                        Some(false) => Response::json(200, &json!({"status": "degraded", "engine": "down"})),
                    }
                };
                self.respond(conn, request, response, now)
            }
            _ => {
                let format = if path == "/stats" { StatsFormat::Json } else { StatsFormat::Prometheus };
                self.gather_stats(key, conn, format);
                return None;
            }
        })
    }

    fn gather_stats(&mut self, key: usize, conn: &Conn, format: StatsFormat) {
        let inboxes = self.shared.bus.inboxes();
        let gather = Arc::new(Gather::new(inboxes.len(), self.reply_to(key, conn), format));
        for inbox in inboxes {
            inbox.send(Control::Collect(gather.clone()));
        }
    }

    fn http_publish(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        body: &[u8],
        now: Instant,
    ) -> Option<Routed> {
        if let Err(retry_after) = self.shared.publish_rates.take(conn.peer, now) {
            ShardCounters::bump(&self.counters().rate_limited);
            let error = HttpError::new(429, "rate_limited", "too many publish requests from this address");
            let response = Response::error(&error).header("Retry-After", retry_after.to_string());
            return Some(self.respond(conn, request, response, now));
        }
        let grant = match self.shared.auth.verify(request.token().as_deref()) {
            Ok(grant) => grant,
            Err(error) => return Some(self.respond(conn, request, unauthorized(&error), now)),
        };
        let requests = match protocol::parse_publish_body(body, 1000) {
            Ok(r) => r,
            Err(rejection) => {
                return Some(self.respond(conn, request, Response::error(&http_error_of(&rejection)), now));
            }
        };
        if let Some(i) = requests.iter().position(|r| !grant.may_publish(&r.topic)) {
            let field = if requests.len() > 1 { format!("[{i}].topic") } else { "topic".into() };
            let error = HttpError {
                status: 403,
                code: "forbidden",
                message: format!("may not publish on {}", requests[i].topic),
                field: Some(field),
            };
            return Some(self.respond(conn, request, Response::error(&error), now));
        }
        let wait = request.query_param("wait").is_some_and(|w| w == "1" || w == "true");
        let reply = Reply { to: self.reply_to(key, conn), wait, websocket: None };
        let count = requests.len();
        match self.shared.bus.publish(requests, reply) {
            Ok(Accepted::Later) => None,
            Ok(Accepted::Now(ids)) => Some(self.respond(conn, request, published_response(Ok(ids), count), now)),
            Err(error) => Some(self.respond(conn, request, published_response(Err(error), count), now)),
        }
    }

    fn upgrade(&mut self, key: usize, conn: &mut Conn, request: &Request, echo: bool, now: Instant) -> Routed {
        if !request.websocket_upgrade {
            let error = HttpError::new(426, "bad_request", "this route needs a WebSocket upgrade");
            return self.respond(conn, request, ws::upgrade_error_response(&error), now);
        }
        if let Some(origin) = request.origin.as_deref()
            && !self.config().origin_allowed(origin)
        {
            let error = HttpError::new(403, "forbidden", format!("origin {origin} is not allowed"));
            return self.respond(conn, request, Response::error(&error), now);
        }
        let handshake = match ws::accept(request) {
            Ok(bytes) => bytes,
            Err(error) => return self.respond(conn, request, ws::upgrade_error_response(&error), now),
        };
        // A browser cannot read an HTTP status from a failed upgrade, so a bad token is
        // answered after it, with close 4001; no token at all may still come as the
        // first message.
        let (grant, refuse) = match self.shared.auth.verify(request.token().as_deref()) {
            Ok(grant) => (Some(grant), false),
            Err(AuthError::Missing) => (None, false),
            Err(_) => (None, true),
        };
        conn.out.push_bytes(handshake);
        let leftover = match &mut conn.state {
            State::Http(http) => std::mem::take(&mut http.buf),
            _ => Vec::new(),
        };
        let config = self.config();
        let heartbeat = config.heartbeat_interval();
        let mut ws = Box::new(WsConn {
            codec: Codec::new(config.max_message_bytes),
            echo,
            batch: request.query_param("batch").is_some_and(|b| b == "1" || b == "true"),
            batch_pending: Vec::new(),
            client_id: format!("{:x}", conn.id),
            subs: Vec::new(),
            next_key: 1,
            sent: 0,
            last_heard: now,
            next_ping: now + heartbeat,
            bucket: TokenBucket::new(config.rate_per_second, config.rate_burst, now),
            resume_read_at: None,
            auth_deadline: grant.is_none().then(|| now + Duration::from_millis(config.auth_timeout_ms)),
            grant: if echo { Some(Grant::everything()) } else { grant },
        });
        if refuse {
            let mut out = Vec::new();
            ws.codec.close(Close::Unauthorized, &mut out);
            conn.out.push_bytes(out);
            conn.state = State::Closing { deadline: now + LINGER, shut: false };
            return Routed::Halt;
        }
        if !echo {
            let payload = json!({
                "status": "connected",
                "client_id": ws.client_id,
                "heartbeat_interval_ms": config.heartbeat_interval_ms,
                "reconnect_delay_ms": config.reconnect_delay_ms,
                "max_message_bytes": config.max_message_bytes,
            });
            let id = ws.next_message_id();
            let text = protocol::server_message("ack", &id, SystemTime::now(), None, &payload.to_string());
            let mut out = Vec::new();
            ws.codec.send_text(text, &mut out);
            conn.out.push_bytes(out);
        }
        conn.state = State::WebSocket(ws);
        conn.transport = Transport::WebSocket;
        ShardCounters::add(&self.counters().http, -1);
        ShardCounters::add(&self.counters().websocket, 1);
        if !leftover.is_empty() {
            self.on_ws_bytes(key, conn, &leftover, now);
        }
        Routed::Halt
    }

    fn on_ws_bytes(&mut self, key: usize, conn: &mut Conn, mut data: &[u8], now: Instant) {
        loop {
            let State::WebSocket(ws) = &mut conn.state else { return };
            ws.last_heard = now;
            let mut out = Vec::new();
            let step = ws.codec.next(&mut data, &mut out);
            conn.out.push_bytes(out);
            match step {
                Ok(None) => return,
                Ok(Some(Received::Control)) => {}
                Ok(Some(Received::Text(text))) => self.on_ws_text(key, conn, text, now),
                Ok(Some(Received::Binary(data))) => {
                    let State::WebSocket(ws) = &mut conn.state else { return };
                    if ws.echo {
                        let mut out = Vec::new();
                        ws.codec.send_binary(data, &mut out);
                        conn.out.push_bytes(out);
                    } else {
                        let rejection = Rejection::new(ErrorCode::InvalidMessage, "binary frames are not supported");
                        send_error(conn, None, &rejection);
                    }
                }
                Err(Ended::Closed | Ended::Failed(_)) => {
                    write_batch(conn);
                    conn.state = State::Closing { deadline: now + LINGER, shut: false };
                    return;
                }
            }
        }
    }

    fn on_ws_text(&mut self, key: usize, conn: &mut Conn, text: String, now: Instant) {
        let close_after = Duration::from_millis(self.config().rate_limit_close_after_ms);
        let State::WebSocket(ws) = &mut conn.state else { return };
        if ws.echo {
            let mut out = Vec::new();
            ws.codec.send_text(text, &mut out);
            conn.out.push_bytes(out);
            return;
        }
        match ws.bucket.take(now, close_after) {
            Verdict::Allow => {}
            Verdict::Limit => {
                ShardCounters::bump(&self.counters().rate_limited);
                let rejection = Rejection::new(ErrorCode::RateLimited, "over the message rate limit; message dropped");
                return send_error(conn, None, &rejection);
            }
            Verdict::Abuse => {
                ShardCounters::bump(&self.counters().rate_limited);
                let mut out = Vec::new();
                ws.codec.close(Close::Policy, &mut out);
                conn.out.push_bytes(out);
                conn.state = State::Closing { deadline: now + LINGER, shut: false };
                return;
            }
        }
        let incoming = match protocol::parse_client_message(&text) {
            Ok(incoming) => incoming,
            Err((correlation, rejection)) => return send_error(conn, correlation.as_deref(), &rejection),
        };
        let correlation = incoming.message_id.as_deref();
        if let ClientMessage::Request(protocol::Request::Auth { token }) = &incoming.message {
            return self.ws_auth(conn, correlation, token, now);
        }
        if matches!(&conn.state, State::WebSocket(ws) if ws.grant.is_none()) {
            let rejection = Rejection::new(ErrorCode::Unauthorized, "authenticate first: request action auth");
            return send_error(conn, correlation, &rejection);
        }
        match incoming.message {
            ClientMessage::Subscribe(args) => self.subscribe(key, conn, correlation, args),
            ClientMessage::Unsubscribe { subscription_id } => {
                self.unsubscribe(key, conn, correlation, &subscription_id)
            }
            ClientMessage::Ping(payload) => {
                let payload = payload.map(|p| p.get().to_string()).unwrap_or_else(|| "{}".into());
                ctx_send(conn, "pong", correlation, &payload);
            }
            ClientMessage::Ack { event_id } => {
                if let Some(published_at) = self.shared.bus.published_at(&event_id) {
                    Latency::record(&mut self.latency.publish_to_ack, now.saturating_duration_since(published_at));
                }
            }
            ClientMessage::Request(request) => self.ws_request(key, conn, correlation, request),
        }
    }

    fn ws_auth(&mut self, conn: &mut Conn, correlation: Option<&str>, token: &str, now: Instant) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        match self.shared.auth.verify(Some(token)) {
            Ok(grant) => {
                let payload = json!({"client_id": ws.client_id, "sub": grant.sub});
                ws.grant = Some(grant);
                ws.auth_deadline = None;
                ctx_send(conn, "response", correlation, &payload.to_string());
            }
            Err(error) => {
                send_error(conn, correlation, &Rejection::new(ErrorCode::Unauthorized, error.to_string()));
                close_ws(conn, Close::Unauthorized, now);
            }
        }
    }

    fn subscribe(&mut self, key: usize, conn: &mut Conn, correlation: Option<&str>, args: protocol::SubscribeArgs) {
        let max = self.config().max_subscriptions_per_connection;
        let State::WebSocket(ws) = &mut conn.state else { return };
        let Some(grant) = &ws.grant else { return };
        let topics = match readable_patterns(grant, args.topics) {
            Ok(topics) => topics,
            Err(rejection) => return send_error(conn, correlation, &rejection),
        };
        if ws.subs.len() >= max {
            let rejection = Rejection::new(ErrorCode::TooManySubscriptions, format!("at most {max} subscriptions"));
            return send_error(conn, correlation, &rejection);
        }
        let sub_key = ws.next_key;
        ws.next_key += 1;
        let id = args.subscription_id.unwrap_or_else(|| format!("sub-{sub_key}"));
        if ws.subs.iter().any(|s| s.id == id) {
            let rejection = Rejection::new(ErrorCode::DuplicateSubscription, format!("subscription {id:?} exists"));
            return send_error(conn, correlation, &rejection);
        }
        let filter = Filter::new(topics, args.sources, args.correlation_id);
        let (recovered, after, replay) = self.resume(args.since.as_deref(), &filter);
        for pattern in &filter.patterns {
            self.index.insert(pattern, SubRef { conn: key, sub: sub_key });
            conn.indexed.push((pattern.clone(), sub_key));
        }
        ws.subs.push(Subscription { key: sub_key, id: id.clone(), filter, after });
        ShardCounters::add(&self.counters().subscriptions, 1);
        let payload = json!({"subscription_id": id, "status": "subscribed", "recovered": recovered});
        ctx_send(conn, "ack", correlation, &payload.to_string());
        self.replay_into(conn, &replay);
    }

    /// For a subscription resuming after `since`: whether it can, the order key live
    /// events must pass, and the retained events to replay first (up to what this shard
    /// has fanned out; everything later is still in its queue).
    fn resume(&self, since: Option<&str>, filter: &Filter) -> (bool, (u64, u64), Vec<Arc<Event>>) {
        let Some(since) = since else { return (true, (0, 0), Vec::new()) };
        match self.shared.bus.replay(since, self.fanned_out_through, usize::MAX, |e| filter.accepts(e)) {
            Ok((after, events)) => (true, after, events),
            Err(NotRecoverable) => (false, (0, 0), Vec::new()),
        }
    }

    fn replay_into(&mut self, conn: &mut Conn, events: &[Arc<Event>]) {
        let now = Instant::now();
        let max_outbound = self.config().max_outbound_bytes;
        let counters = &self.shared.counters[self.id];
        for event in events {
            if !enqueue_event(conn, event, max_outbound, counters, &mut self.latency.publish_to_write, now) {
                break;
            }
        }
        write_batch(conn);
    }

    fn unsubscribe(&mut self, key: usize, conn: &mut Conn, correlation: Option<&str>, subscription_id: &str) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        let Some(position) = ws.subs.iter().position(|s| s.id == subscription_id) else {
            let rejection =
                Rejection::new(ErrorCode::UnknownSubscription, format!("no subscription {subscription_id:?}"));
            return send_error(conn, correlation, &rejection);
        };
        let sub = ws.subs.swap_remove(position);
        let index = &mut self.index;
        conn.indexed.retain(|(pattern, k)| {
            let mine = *k == sub.key;
            if mine {
                index.remove(pattern, SubRef { conn: key, sub: sub.key });
            }
            !mine
        });
        ShardCounters::add(&self.counters().subscriptions, -1);
        let payload = json!({"subscription_id": sub.id, "status": "unsubscribed"});
        ctx_send(conn, "ack", correlation, &payload.to_string());
    }

    fn ws_request(&mut self, key: usize, conn: &mut Conn, correlation: Option<&str>, request: protocol::Request) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        let payload = match request {
            protocol::Request::ListSubscriptions => {
                let subs: Vec<_> = ws
                    .subs
                    .iter()
                    .map(|s| {
                        json!({
                            "subscription_id": s.id,
                            "topics": s.filter.patterns.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                            "sources": s.filter.sources,
                            "correlation_id": s.filter.correlation_id,
                        })
                    })
                    .collect();
                json!({"subscriptions": subs}).to_string()
            }
            protocol::Request::SubscriptionCount => json!({"count": ws.subs.len()}).to_string(),
            protocol::Request::Publish(publish)
                if !ws.grant.as_ref().is_some_and(|g| g.may_publish(&publish.topic)) =>
            {
                let rejection = Rejection::new(ErrorCode::Forbidden, format!("may not publish on {}", publish.topic));
                return send_error(conn, correlation, &rejection);
            }
            protocol::Request::Publish(publish) => {
                let reply = Reply {
                    to: ReplyTo { shard: self.id, key, conn_id: conn.id },
                    wait: false,
                    websocket: Some(correlation.map(str::to_string)),
                };
                match self.shared.bus.publish(vec![publish], reply) {
                    Ok(Accepted::Now(ids)) => json!({"message_id": ids.first()}).to_string(),
                    Ok(Accepted::Later) => return,
                    Err(error) => return send_error(conn, correlation, &publish_rejection(&error)),
                }
            }
            protocol::Request::History(mut query) => {
                let Some(grant) = &ws.grant else { return };
                match readable_patterns(grant, std::mem::take(&mut query.topics)) {
                    Ok(topics) => query.topics = topics,
                    Err(rejection) => return send_error(conn, correlation, &rejection),
                }
                self.history(&query)
            }
            // Answered before the grant check, in `ws_auth`.
            protocol::Request::Auth { .. } => return,
            protocol::Request::Stats => {
                return self.gather_stats(key, conn, StatsFormat::WsResponse(correlation.map(str::to_string)));
            }
        };
        ctx_send(conn, "response", correlation, &payload);
    }

    /// A history document `{"events":[...],"recovered":bool}`, built from shared bytes.
    fn history(&self, query: &HistoryQuery) -> String {
        let filter = Filter::new(query.topics.clone(), query.sources.clone(), query.correlation_id.clone());
        let bus = &self.shared.bus;
        let (events, recovered) = match query.since.as_deref() {
            None => (bus.newest(u64::MAX, query.limit, |e| filter.accepts(e)), true),
            Some(since) => match bus.replay(since, u64::MAX, query.limit, |e| filter.accepts(e)) {
                Ok((_, events)) => (events, true),
                Err(NotRecoverable) => (bus.newest(u64::MAX, query.limit, |e| filter.accepts(e)), false),
            },
        };
        let mut out = String::from("{\"events\":[");
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(std::str::from_utf8(event.json()).unwrap_or("null"));
        }
        out.push_str("],\"recovered\":");
        out.push_str(if recovered { "true" } else { "false" });
        out.push('}');
        out
    }

    /// The history/SSE query of `request`, its topics checked against (or, when none,
    /// taken from) what the request's token may read.
    fn authorized_query(&self, request: &Request) -> Result<HistoryQuery, Response> {
        let grant = self.shared.auth.verify(request.token().as_deref()).map_err(|e| unauthorized(&e))?;
        let mut query = history_query_from(request).map_err(|r| Response::error(&http_error_of(&r)))?;
        query.topics = readable_patterns(&grant, query.topics).map_err(|r| Response::error(&http_error_of(&r)))?;
        Ok(query)
    }

    fn start_sse(&mut self, key: usize, conn: &mut Conn, request: &Request, now: Instant) -> Routed {
        let query = match self.authorized_query(request) {
            Ok(q) => q,
            Err(response) => return self.respond(conn, request, response, now),
        };
        let filter = Filter::new(query.topics, query.sources, query.correlation_id);
        let since = sse::resume_from(request.last_event_id.as_deref(), query.since.as_deref());
        let (recovered, after, replay) = self.resume(since.as_deref(), &filter);
        let head = sse::stream_head(self.allow_origin(request), self.config().reconnect_delay_ms, recovered);
        conn.out.push_bytes(head);
        for pattern in &filter.patterns {
            self.index.insert(pattern, SubRef { conn: key, sub: SSE_SUB });
            conn.indexed.push((pattern.clone(), SSE_SUB));
        }
        conn.state =
            State::Sse(Box::new(SseConn { filter, after, next_ping: now + self.config().heartbeat_interval() }));
        conn.transport = Transport::Sse;
        ShardCounters::add(&self.counters().http, -1);
        ShardCounters::add(&self.counters().sse, 1);
        ShardCounters::add(&self.counters().subscriptions, 1);
        self.replay_into(conn, &replay);
        Routed::Halt
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

/// Starts the close handshake with `close` and lets the connection linger until done.
fn close_ws(conn: &mut Conn, close: Close, now: Instant) {
    let State::WebSocket(ws) = &mut conn.state else { return };
    let mut out = Vec::new();
    ws.codec.close(close, &mut out);
    conn.out.push_bytes(out);
    conn.state = State::Closing { deadline: now + LINGER, shut: false };
}

/// The patterns to use for a read: those asked for, each covered by the grant, or the
/// grant's own when none were asked for.
fn readable_patterns(
    grant: &Grant,
    asked: Vec<crate::topic::Pattern>,
) -> Result<Vec<crate::topic::Pattern>, Rejection> {
    if asked.is_empty() {
        if grant.subscribe.is_empty() {
            return Err(Rejection::new(ErrorCode::Forbidden, "the token allows reading nothing"));
        }
        return Ok(grant.subscribe.clone());
    }
    match asked.iter().find(|p| !grant.may_subscribe(p)) {
        Some(p) => Err(Rejection::new(ErrorCode::Forbidden, format!("may not read {}", p.as_str()))),
        None => Ok(asked),
    }
}

/// `401` for a refused token.
fn unauthorized(error: &AuthError) -> Response {
    Response::error(&HttpError::new(401, "unauthorized", error.to_string())).header("WWW-Authenticate", "Bearer")
}

/// Reads `topics`, `sources`, `correlation_id`, `since`, `limit` from a query string.
fn history_query_from(request: &Request) -> Result<HistoryQuery, Rejection> {
    let list = |name: &str| -> Vec<String> {
        request
            .query_param(name)
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default()
    };
    let limit = request.query_param("limit").map(serde_json::Value::String);
    Ok(HistoryQuery {
        topics: protocol::parse_patterns(&list("topics"))?,
        sources: list("sources"),
        correlation_id: request.query_param("correlation_id").filter(|c| !c.is_empty()),
        since: request.query_param("since").filter(|s| !s.is_empty()),
        limit: protocol::parse_limit(limit.as_ref())?,
    })
}

/// The answer to an HTTP publish; `count` events were asked for (names the field of a
/// too-large event).
fn published_response(result: Result<Vec<Box<str>>, PublishError>, count: usize) -> Response {
    let error = match result {
        Ok(ids) => return Response::json(200, &json!({"message_ids": ids})),
        Err(error) => error,
    };
    let http_error = match error {
        PublishError::TooLarge(i) => HttpError {
            status: 413,
            code: "too_large",
            message: error.to_string(),
            field: Some(if count > 1 { format!("[{i}]") } else { "data".into() }),
        },
        PublishError::Overloaded | PublishError::EngineUnavailable => {
            HttpError::new(503, "engine_unavailable", error.to_string())
        }
    };
    let response = Response::error(&http_error);
    if http_error.status == 503 { response.header("Retry-After", "1") } else { response }
}

/// The WebSocket form of a refused publish.
fn publish_rejection(error: &PublishError) -> Rejection {
    let code = match error {
        PublishError::TooLarge(_) => ErrorCode::InvalidMessage,
        PublishError::Overloaded => ErrorCode::RateLimited,
        PublishError::EngineUnavailable => ErrorCode::EngineUnavailable,
    };
    Rejection::new(code, error.to_string())
}

/// The HTTP form of a protocol rejection.
fn http_error_of(rejection: &Rejection) -> HttpError {
    let (status, code) = match rejection.code {
        ErrorCode::InvalidJson => (400, "invalid_json"),
        ErrorCode::InvalidTopic => (400, "invalid_topic"),
        ErrorCode::Forbidden => (403, "forbidden"),
        ErrorCode::Unauthorized => (401, "unauthorized"),
        ErrorCode::RateLimited => (429, "rate_limited"),
        _ if rejection.field.as_deref() == Some("limit") => (400, "bad_request"),
        _ => (400, "invalid_event"),
    };
    HttpError { status, code, message: rejection.message.clone(), field: rejection.field.clone() }
}
