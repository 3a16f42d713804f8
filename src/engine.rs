//! Engines: where the one total order of events comes from.
//!
//! `memory` is the bus's own sequencer (see [`crate::bus`]). `redis` makes Redis Streams
//! the cluster's shared, ordered log: one stream, or with a sharded engine one per
//! logical shard (topics placed by [`crate::placement`], streams on a list of servers or
//! a Redis Cluster, each shard with its own pair of threads). Per stream, publishes go
//! to a dedicated writer thread that
//! `XADD`s them (pipelined, one `MULTI`/`EXEC` per batch, trimmed with `MAXLEN ~`), and a
//! reader thread `XREAD BLOCK`s the stream from its last id and feeds every event, in
//! stream order, into the bus (which names the event by the stream id, or by the node's
//! position in every shard: [`crate::positions`]). Shards never block
//! on Redis: they hand over a publish and get the answer through their inbox. This module
//! owns those two threads, the tickets of `?wait=1` publishes between them, the engine's
//! health, and [`Connector`]: how every Redis thread (these two and the presence
//! mirror's) connects, times out and reconnects. It does not touch connections or encode
//! anything beyond the stream entry's fields.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::Value;
use serde_json::value::RawValue;

use crate::bus::{Bus, Submit};
use crate::config::EngineSpec;
use crate::event::{Prepared, PublishError, StreamEntry};
use crate::interest::Interest;
use crate::mailbox::{Control, PublishTicket, Reply};
use crate::metrics::{EngineFigures, ShardReport};
use crate::placement::Placement;
use crate::positions;
use crate::protocol::{self, PublishRequest};

/// Health of a cluster engine, shown by `/health`, `/stats` and `/metrics`.
#[derive(Debug)]
pub struct EngineStatus {
    /// Every shard's threads are connected (a writer counts as connected until a write
    /// fails).
    pub up: AtomicBool,
    /// Reconnections after a failure, of every Redis connection.
    pub reconnects: AtomicU64,
    /// Age of the newest event read, at the time it was read, in microseconds.
    pub lag_us: AtomicU64,
    /// Events this node read from the engine (its ingest).
    pub ingested: AtomicU64,
    /// Per shard: where it lives and how far this node read it.
    shards: Box<[ShardStatus]>,
    /// Per shard, which threads are down, as [`Part`] bits. A lock rather than flags: `up`
    /// is written from every thread, and racing read-then-store updates of separate flags
    /// could leave a stale `up`.
    down: Mutex<Vec<u8>>,
}

/// One engine shard as `/stats` shows it.
#[derive(Debug)]
struct ShardStatus {
    /// The server (or `cluster`) holding its stream.
    server: String,
    /// This node follows it.
    reading: AtomicBool,
    /// The stream id of the newest entry read.
    last_id: Mutex<String>,
}

impl EngineStatus {
    /// Status of shards living on `servers` (one entry per shard); all down until the
    /// readers connect.
    fn new(servers: Vec<String>) -> Self {
        Self {
            up: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            lag_us: AtomicU64::new(0),
            ingested: AtomicU64::new(0),
            down: Mutex::new(vec![Part::Reader as u8; servers.len().max(1)]),
            shards: servers
                .into_iter()
                .map(|server| ShardStatus { server, reading: AtomicBool::new(false), last_id: Mutex::default() })
                .collect(),
        }
    }

    fn set(&self, shard: u32, part: Part, up: bool) {
        let mut down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bits) = down.get_mut(shard as usize) {
            if up {
                *bits &= !(part as u8);
            } else {
                *bits |= part as u8;
            }
        }
        self.up.store(down.iter().all(|bits| *bits == 0), Ordering::Release);
    }

    fn is_down(&self, shard: u32, part: Part) -> bool {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
        down.get(shard as usize).is_some_and(|bits| bits & part as u8 != 0)
    }

    fn reading(&self, shard: u32, reading: bool) {
        if let Some(status) = self.shards.get(shard as usize) {
            status.reading.store(reading, Ordering::Relaxed);
        }
    }

    fn read_to(&self, shard: u32, id: &str) {
        if let Some(status) = self.shards.get(shard as usize) {
            let mut last = status.last_id.lock().unwrap_or_else(|p| p.into_inner());
            last.clear();
            last.push_str(id);
        }
    }

    /// What `/stats` and `/metrics` show.
    pub fn figures(&self) -> EngineFigures {
        EngineFigures {
            up: self.up.load(Ordering::Acquire),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            lag_us: self.lag_us.load(Ordering::Relaxed),
            ingested: self.ingested.load(Ordering::Relaxed),
            shards: self.shards(),
        }
    }

    /// Every shard: where it lives, whether it is up, how far it was read.
    pub fn shards(&self) -> Vec<ShardReport> {
        let down = self.down.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.shards
            .iter()
            .zip(down)
            .enumerate()
            .map(|(shard, (status, down))| ShardReport {
                shard: shard as u32,
                server: status.server.clone(),
                reading: status.reading.load(Ordering::Relaxed),
                last_id: status.last_id.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                up: down == 0,
            })
            .collect()
    }
}

impl Default for EngineStatus {
    /// One shard on an unnamed server (the presence mirror's own status in tests).
    fn default() -> Self {
        Self::new(vec![String::new()])
    }
}

/// A thread whose connection makes up a shard's health.
#[derive(Debug, Clone, Copy)]
enum Part {
    Writer = 1,
    Reader = 2,
}

/// A publish on its way to Redis.
struct Submission {
    prepared: Vec<Prepared>,
    reply: Reply,
}

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// The servers or cluster, and the placement of topics on shards.
    pub spec: EngineSpec,
    /// Stream key (with several shards, the prefix of `<stream>:{<n>}`).
    pub stream: String,
    /// Approximate stream length kept (`MAXLEN ~`, per shard): the history retention.
    /// Also the most events of `?wait=1` publishes waiting to be read: more than the
    /// stream keeps would be trimmed before the reader met them.
    pub max_len: usize,
    /// Publishes waiting for a shard's writer before new ones are refused.
    pub queue: usize,
    /// How long a shard waits for a publish's answer (`http_request_timeout_ms`): a
    /// `?wait=1` ticket older than this was answered 504 already and is dropped.
    pub request_timeout: Duration,
}

impl RedisSettings {
    fn shards(&self) -> u32 {
        self.spec.placement.shards()
    }

    /// Shard `shard`'s stream: the configured key itself with one shard (today's
    /// clusters keep their stream), `<stream>:{<n>}` with more (the braces are a Redis
    /// Cluster hash tag: the stream sits on one slot).
    fn stream_of(&self, shard: u32) -> String {
        if self.shards() == 1 { self.stream.clone() } else { format!("{}:{{{shard}}}", self.stream) }
    }

    /// The id a publisher is answered for the entry `id` of shard `shard`.
    fn answer_id(&self, shard: u32, id: &str) -> Box<str> {
        match parse_stream_id(id) {
            Some(key) if self.shards() > 1 => positions::encode_own(shard, key).into(),
            _ => id.into(),
        }
    }
}

/// How an engine thread reaches Redis: a server, or a Redis Cluster (whose client routes
/// each command by its key's slot).
pub trait Dial: Clone + Send + 'static {
    /// The connection it makes.
    type Link: redis::ConnectionLike;
    /// Connects, with [`CONNECT_TIMEOUT`] and [`IO_TIMEOUT`], and checks with a round trip.
    fn dial(&self) -> redis::RedisResult<Self::Link>;

    /// Sends `pipe`'s `XADD`s (all to one stream) in one round trip: the stream ids.
    fn write_all(conn: &mut Self::Link, pipe: redis::Pipeline) -> redis::RedisResult<Vec<String>>;
}

impl Dial for redis::Client {
    type Link = redis::Connection;

    fn dial(&self) -> redis::RedisResult<redis::Connection> {
        let mut conn = self.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        conn.set_read_timeout(Some(IO_TIMEOUT))?;
        conn.set_write_timeout(Some(IO_TIMEOUT))?;
        // A stopped Redis still completes TCP handshakes (the kernel does): only a reply
        // shows that it is there.
        redis::cmd("PING").query::<()>(&mut conn)?;
        Ok(conn)
    }

    /// One `MULTI`/`EXEC`: every event of the batch is in the stream, or none is.
    fn write_all(conn: &mut redis::Connection, mut pipe: redis::Pipeline) -> redis::RedisResult<Vec<String>> {
        pipe.atomic().query(conn)
    }
}

impl Dial for redis::cluster::ClusterClient {
    type Link = redis::cluster::ClusterConnection;

    fn dial(&self) -> redis::RedisResult<redis::cluster::ClusterConnection> {
        let mut conn = self.get_connection()?;
        redis::cmd("PING").query::<()>(&mut conn)?;
        Ok(conn)
    }

    /// A cluster pipeline, which has no transactions: after a failure part of a batch may
    /// be in the stream though its publisher was refused (docs/operations.md).
    fn write_all(
        conn: &mut redis::cluster::ClusterConnection,
        pipe: redis::Pipeline,
    ) -> redis::RedisResult<Vec<String>> {
        let mut cluster = redis::cluster::cluster_pipe();
        for cmd in pipe.cmd_iter() {
            cluster.add_command(cmd.clone());
        }
        cluster.query(conn)
    }
}

/// One connection for what must live on one server: the first listed server, or on a
/// Redis Cluster the master that owns `key`'s slot (looked up on each connect through any
/// seed, so a failover moves it). For the presence mirror: its hashes share one hash tag
/// and `SCAN` must see all of them, and a cluster's pub/sub reaches every node from any.
#[derive(Clone)]
pub struct OneServer {
    seeds: Vec<redis::Client>,
    /// With a cluster: the key whose slot's master to reach.
    cluster_key: Option<String>,
}

impl OneServer {
    /// The first of `spec`'s servers, or the master of `key`'s slot on `spec`'s cluster.
    pub fn new(spec: &EngineSpec, key: &str) -> redis::RedisResult<Self> {
        let seeds = spec.urls.iter().map(|url| redis::Client::open(url.as_str())).collect::<Result<Vec<_>, _>>()?;
        let seeds = if spec.cluster { seeds } else { seeds.into_iter().take(1).collect() };
        Ok(Self { seeds, cluster_key: spec.cluster.then(|| key.to_string()) })
    }

    /// Through `seed`, the address of the master owning `key`'s slot.
    fn owner(seed: &redis::Client, key: &str) -> redis::RedisResult<redis::Client> {
        let mut conn = seed.dial()?;
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query(&mut conn)?;
        let slots: Vec<Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
        let owner = slots.iter().find_map(|range| {
            let Value::Array(range) = range else { return None };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (range.first(), range.get(1), range.get(2))
            else {
                return None;
            };
            let (Some(host), Some(Value::Int(port))) = (master.first().and_then(text), master.get(1)) else {
                return None;
            };
            (*start <= slot && slot <= *end).then(|| format!("redis://{host}:{port}"))
        });
        let owner =
            owner.ok_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no master owns the slot")))?;
        redis::Client::open(owner.as_str())
    }
}

impl Dial for OneServer {
    type Link = redis::Connection;

    fn dial(&self) -> redis::RedisResult<redis::Connection> {
        let mut last = None;
        for seed in &self.seeds {
            let attempt = match &self.cluster_key {
                Some(key) => Self::owner(seed, key).and_then(|owner| owner.dial()),
                None => seed.dial(),
            };
            match attempt {
                Ok(conn) => return Ok(conn),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from((redis::ErrorKind::Client, "no server"))))
    }

    fn write_all(conn: &mut redis::Connection, pipe: redis::Pipeline) -> redis::RedisResult<Vec<String>> {
        redis::Client::write_all(conn, pipe)
    }
}

/// The Redis engine before its threads start: the bus's submit function is made first,
/// the threads need the finished bus.
pub struct Redis {
    settings: RedisSettings,
    receivers: Vec<Receiver<Submission>>,
    /// Health, shared with the reactor.
    pub status: Arc<EngineStatus>,
}

const BATCH: usize = 256;
const READ_COUNT: usize = 512;
const BLOCK_MS: u64 = 1000;
/// Longest any Redis reply may take. The slowest command is `XREAD BLOCK`, answered
/// within [`BLOCK_MS`]; a reply later than this means Redis is stopped or the path to it
/// is gone, and without a timeout the thread would wait for it forever.
const IO_TIMEOUT: Duration = Duration::from_millis(BLOCK_MS + 1000);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Expired tickets are looked for at most this often.
const SWEEP_EVERY: Duration = Duration::from_millis(BLOCK_MS);

impl Redis {
    /// Checks the URLs and returns the engine and the submit function for the bus: a
    /// publish goes to the writer of its topics' shard.
    pub fn new(settings: RedisSettings) -> Result<(Self, Submit), redis::RedisError> {
        let shards = settings.shards();
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| std::sync::mpsc::sync_channel(settings.queue)).unzip();
        let servers = (0..shards).map(|shard| settings.spec.server_of(shard).to_string()).collect();
        // Fail on a bad URL now, not on the threads.
        for url in &settings.spec.urls {
            redis::Client::open(url.as_str())?;
        }
        let status = Arc::new(EngineStatus::new(servers));
        let submit = submitter(senders, settings.spec.placement);
        Ok((Self { settings, receivers, status }, submit))
    }

    /// Starts a writer and a reader thread per shard, feeding `bus`.
    /// With `interest`, each shard is read only while wanted.
    pub fn start(self, bus: Arc<Bus>, interest: Option<Arc<Interest>>) -> std::io::Result<()> {
        let Redis { settings, receivers, status } = self;
        let feed = Feed { bus, interest };
        if settings.spec.cluster {
            let client = redis::cluster::ClusterClient::builder(settings.spec.urls.iter().map(String::as_str))
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(IO_TIMEOUT)
                // A master that is down is retried by the next round (with the connector's
                // backoff), not inside a command: a publish must fail within its timeout.
                .retries(1)
                .build()
                .map_err(std::io::Error::other)?;
            start_shards(&settings, receivers, &status, &feed, |_| client.clone())
        } else {
            let clients = settings
                .spec
                .urls
                .iter()
                .map(|url| redis::Client::open(url.as_str()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(std::io::Error::other)?;
            start_shards(&settings, receivers, &status, &feed, |shard| {
                clients[settings.spec.server_index(shard)].clone()
            })
        }
    }
}

/// Where the readers' events go, and whether they read only while wanted.
struct Feed {
    bus: Arc<Bus>,
    interest: Option<Arc<Interest>>,
}

fn start_shards<D: Dial>(
    settings: &RedisSettings,
    receivers: Vec<Receiver<Submission>>,
    status: &Arc<EngineStatus>,
    feed: &Feed,
    dial_for: impl Fn(u32) -> D,
) -> std::io::Result<()> {
    let bus = &feed.bus;
    for (shard, receiver) in (0..settings.shards()).zip(receivers) {
        let dial = dial_for(shard);
        let shard_settings = ShardSettings { shard, stream: settings.stream_of(shard), settings: settings.clone() };
        let waits = Arc::new(Waits::new(settings.request_timeout, settings.max_len));
        let writer = Writer {
            connector: Connector::new(dial.clone(), "engine writer", status.clone()),
            shard: shard_settings.clone(),
            bus: bus.clone(),
            waits: waits.clone(),
            status: status.clone(),
            interest: feed.interest.clone(),
        };
        std::thread::Builder::new().name(format!("volley-redis-writer-{shard}")).spawn(move || writer.run(receiver))?;
        let reader = Reader {
            connector: Connector::new(dial, "engine reader", status.clone()),
            shard: shard_settings,
            interest: feed.interest.clone(),
            bus: bus.clone(),
            waits,
            status: status.clone(),
        };
        std::thread::Builder::new().name(format!("volley-redis-reader-{shard}")).spawn(move || reader.run())?;
    }
    Ok(())
}

/// What one shard's threads need to know.
#[derive(Clone)]
struct ShardSettings {
    shard: u32,
    stream: String,
    settings: RedisSettings,
}

fn submitter(senders: Vec<SyncSender<Submission>>, placement: Placement) -> Submit {
    Box::new(move |prepared, reply| {
        let shard = prepared.first().map_or(0, |p| placement.shard_of(&p.request.topic));
        if prepared.iter().any(|p| placement.shard_of(&p.request.topic) != shard) {
            return Err(PublishError::AcrossShards);
        }
        match senders[shard as usize].try_send(Submission { prepared, reply }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(PublishError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(PublishError::EngineUnavailable),
        }
    })
}

/// Why no connection was made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The last attempt failed and its backoff has not passed.
    #[error("waiting to reconnect")]
    Backoff,
    /// Connecting, or the first round trip, failed.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// How one thread connects to Redis: every connection has read and write timeouts
/// ([`IO_TIMEOUT`]) and has answered a `PING`; failed attempts back off exponentially
/// from 50 ms to 2 s; an outage is logged once, and each reconnection counted.
pub struct Connector<D: Dial = OneServer> {
    dial: D,
    /// The thread, for the log.
    name: &'static str,
    status: Arc<EngineStatus>,
    backoff: Duration,
    /// No attempt before this.
    retry_at: Option<Instant>,
    /// When the current connection was made; `None` before the first.
    connected_at: Option<Instant>,
    /// This outage was logged.
    logged: bool,
}

impl<D: Dial> Connector<D> {
    /// A connector counting its reconnections in `status`.
    pub fn new(dial: D, name: &'static str, status: Arc<EngineStatus>) -> Self {
        Self { dial, name, status, backoff: FIRST_BACKOFF, retry_at: None, connected_at: None, logged: false }
    }

    /// One attempt, or at once [`ConnectError::Backoff`] while the last failure's backoff
    /// has not passed (for a thread that must not sleep).
    pub fn try_connect(&mut self) -> Result<D::Link, ConnectError> {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(ConnectError::Backoff);
        }
        match self.dial.dial() {
            Ok(conn) => {
                if self.connected_at.is_some() {
                    self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                }
                if self.logged {
                    tracing::info!(thread = self.name, "redis: reconnected");
                }
                self.connected_at = Some(Instant::now());
                self.retry_at = None;
                Ok(conn)
            }
            Err(e) => {
                self.failed(&e);
                Err(e.into())
            }
        }
    }

    /// Attempts until one succeeds, sleeping out the backoff between them.
    pub fn connect(&mut self) -> D::Link {
        loop {
            match self.try_connect() {
                Ok(conn) => return conn,
                Err(_) => {
                    let wait = self.retry_at.map_or(FIRST_BACKOFF, |at| at.saturating_duration_since(Instant::now()));
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// The current connection failed (a timeout included): the caller drops it.
    pub fn lost(&mut self, error: &redis::RedisError) {
        // A connection that held a while ends the outage: this failure is news, and
        // reconnecting starts from the first backoff. One that failed at once (Redis
        // accepting connections but failing commands) keeps backing off.
        if self.connected_at.is_some_and(|at| at.elapsed() > MAX_BACKOFF) {
            self.backoff = FIRST_BACKOFF;
            self.logged = false;
        }
        self.failed(error);
    }

    fn failed(&mut self, error: &redis::RedisError) {
        if !self.logged {
            tracing::warn!(thread = self.name, error = %error, "redis: connection lost, reconnecting");
            self.logged = true;
        }
        self.retry_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Tickets of `?wait=1` publishes, by stream id, until the reader meets their events.
///
/// The writer learns an event's id only from the `XADD` reply, and the reader may read
/// the event from the stream before that reply is back, so a ticket can be late. Holding
/// the lock across the writer's round trip (as once done) kept the reader out, but also
/// made the reader wait on Redis with the lock held. Instead the writer counts each write
/// carrying tickets before sending it (`sent`) and again once its tickets are in
/// (`done`); the reader, having read a batch, waits (lock released, on a condition
/// variable) until every write sent before it looked is done. A write whose events are
/// in the batch was executed before the `XREAD` reply was made, so it was sent, and
/// counted, before the reader looked: its tickets are in when the reader takes them. The
/// wait is bounded by the writer's own [`IO_TIMEOUT`]; past it the reader goes on, and
/// such a publish is answered 504 by its shard, which is what a ticket never found means.
struct Waits {
    state: Mutex<WaitState>,
    done: Condvar,
    /// A ticket older than this was answered already (504) by its shard.
    expiry: Duration,
    /// Most events with a ticket.
    bound: usize,
}

#[derive(Default)]
struct WaitState {
    tickets: HashMap<Box<str>, Waiting>,
    sent: u64,
    done: u64,
    swept: Option<Instant>,
}

struct Waiting {
    ticket: Arc<PublishTicket>,
    index: usize,
    since: Instant,
}

/// A ticket and its event's index in it, as the bus takes it.
type Ticket = (Arc<PublishTicket>, usize);

impl Waits {
    fn new(expiry: Duration, bound: usize) -> Self {
        Self { state: Mutex::default(), done: Condvar::new(), expiry, bound: bound.max(1) }
    }

    fn lock(&self) -> MutexGuard<'_, WaitState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Splits `batch` into what may be written and the `?wait=1` publishes refused
    /// because their tickets would exceed the bound. Only the reader removes tickets
    /// between this and [`Waits::written`], so the bound holds.
    fn admit(&self, batch: Vec<Submission>) -> (Vec<Submission>, Vec<Submission>) {
        let mut room = self.bound.saturating_sub(self.lock().tickets.len());
        batch.into_iter().partition(|submission| {
            let count = submission.prepared.len();
            if !submission.reply.wait {
                return true;
            }
            let fits = count <= room;
            if fits {
                room -= count;
            }
            fits
        })
    }

    /// A write carrying tickets is about to be sent: returns its number for
    /// [`Waits::written`].
    fn sending(&self) -> u64 {
        let mut state = self.lock();
        state.sent += 1;
        state.sent
    }

    /// Write `number` is answered (or failed, then with no tickets).
    fn written(&self, number: u64, tickets: Vec<(Box<str>, Ticket)>) {
        let mut state = self.lock();
        let since = Instant::now();
        for (id, (ticket, index)) in tickets {
            state.tickets.insert(id, Waiting { ticket, index, since });
        }
        state.done = state.done.max(number);
        drop(state);
        self.done.notify_all();
    }

    /// The tickets of events just read, out of the map: the caller ingests without the
    /// lock.
    fn take<'a>(&self, ids: impl Iterator<Item = &'a str>) -> HashMap<Box<str>, Ticket> {
        let state = self.lock();
        let target = state.sent;
        let (mut state, _) = self
            .done
            .wait_timeout_while(state, IO_TIMEOUT + CONNECT_TIMEOUT, |s| s.done < target)
            .unwrap_or_else(|p| p.into_inner());
        self.sweep_locked(&mut state);
        ids.filter_map(|id| state.tickets.remove(id).map(|w| (id.into(), (w.ticket, w.index)))).collect()
    }

    /// Drops tickets whose publishes were answered by their deadline already: their
    /// events were loaded at start-up, trimmed, or are still far ahead of this node.
    fn sweep(&self) {
        self.sweep_locked(&mut self.lock());
    }

    fn sweep_locked(&self, state: &mut WaitState) {
        let now = Instant::now();
        if state.swept.is_some_and(|at| now.saturating_duration_since(at) < SWEEP_EVERY) {
            return;
        }
        state.swept = Some(now);
        state.tickets.retain(|_, w| now.saturating_duration_since(w.since) < self.expiry);
    }
}

struct Writer<D: Dial> {
    connector: Connector<D>,
    shard: ShardSettings,
    /// With interest-based reading: a `?wait=1` publish to a shard nothing here reads is
    /// answered once written (no shard here will queue it).
    interest: Option<Arc<Interest>>,
    bus: Arc<Bus>,
    waits: Arc<Waits>,
    status: Arc<EngineStatus>,
}

impl<D: Dial> Writer<D> {
    fn run(mut self, receiver: Receiver<Submission>) {
        let mut connection: Option<D::Link> = None;
        loop {
            let first = match receiver.recv_timeout(Duration::from_millis(BLOCK_MS)) {
                Ok(first) => first,
                // Idle and down: reconnect anyway, so health comes back without a publish.
                Err(RecvTimeoutError::Timeout) => {
                    if connection.is_none() && self.status.is_down(self.shard.shard, Part::Writer) {
                        connection = self.connector.try_connect().ok();
                        if connection.is_some() {
                            self.status.set(self.shard.shard, Part::Writer, true);
                        }
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let (batch, refused) = self.waits.admit(batch);
            for submission in refused {
                self.answer(submission.reply, Err(PublishError::Overloaded));
            }
            if batch.is_empty() {
                continue;
            }
            if connection.is_none() {
                connection = self.connector.try_connect().ok();
            }
            let result = match connection.as_mut() {
                Some(conn) => self.write(conn, &batch).map_err(|e| self.connector.lost(&e)),
                None => Err(()),
            };
            self.status.set(self.shard.shard, Part::Writer, result.is_ok());
            if result.is_err() {
                connection = None;
                for submission in batch {
                    self.answer(submission.reply, Err(PublishError::EngineUnavailable));
                }
            }
        }
    }

    /// One transaction for the batch: every event of it is in the stream, or none is.
    fn write(&self, conn: &mut D::Link, batch: &[Submission]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        let mut timestamp = String::new();
        protocol::push_timestamp(&mut timestamp, SystemTime::now());
        for submission in batch {
            for prepared in &submission.prepared {
                let request = &prepared.request;
                let cmd = pipe
                    .cmd("XADD")
                    .arg(&self.shard.stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.shard.settings.max_len)
                    .arg("*")
                    .arg("ts")
                    .arg(&timestamp)
                    .arg("topic")
                    .arg(&request.topic)
                    .arg("source")
                    .arg(&request.source)
                    .arg("data")
                    .arg(request.data.get());
                if let Some(correlation_id) = &request.correlation_id {
                    cmd.arg("cid").arg(correlation_id);
                }
            }
        }
        let read_here = self.interest.as_ref().is_none_or(|i| i.wanted(self.shard.shard));
        let number = (read_here && batch.iter().any(|s| s.reply.wait)).then(|| self.waits.sending());
        let result = D::write_all(conn, pipe);
        let mut tickets = Vec::new();
        let mut answers = Vec::with_capacity(batch.len());
        if let Ok(ids) = &result {
            let mut ids = ids.iter();
            let shards = self.bus.inboxes().len();
            for submission in batch {
                let mine: Vec<&String> = ids.by_ref().take(submission.prepared.len()).collect();
                let answer: Vec<Box<str>> =
                    mine.iter().map(|id| self.shard.settings.answer_id(self.shard.shard, id)).collect();
                if submission.reply.wait && read_here {
                    let ticket = PublishTicket::new(submission.reply.to, answer, shards);
                    tickets.extend(
                        mine.into_iter().enumerate().map(|(index, id)| (id.as_str().into(), (ticket.clone(), index))),
                    );
                } else {
                    answers.push((submission.reply.clone(), answer));
                }
            }
        }
        // Even after a failure: the reader must not wait for a write that is over.
        if let Some(number) = number {
            self.waits.written(number, tickets);
        }
        result?;
        for (reply, ids) in answers {
            self.answer(reply, Ok(ids));
        }
        Ok(())
    }

    fn answer(&self, reply: Reply, result: Result<Vec<Box<str>>, PublishError>) {
        // A full control queue loses the answer: an HTTP publisher gets 504 at its timeout.
        self.bus.mailboxes.to_shard(reply.to.shard, Control::Published(reply, result));
    }
}

struct Reader<D: Dial> {
    connector: Connector<D>,
    shard: ShardSettings,
    /// With interest-based reading: whether anything here wants this shard.
    interest: Option<Arc<Interest>>,
    bus: Arc<Bus>,
    waits: Arc<Waits>,
    status: Arc<EngineStatus>,
}

/// How a reader (re)starts following its stream.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// It was following and its connection failed: go on from its last id (checking for
    /// a gap), delivering everything after it.
    Reconnect,
    /// It starts reading (at start-up, or wanted again after it stopped): load the
    /// stream's retained tail into the history, delivering only what is newer than
    /// `live_from` (wall-clock ms; `None`: nothing, no subscription asked for live events).
    Load { live_from: Option<u64> },
}

/// How often an idle reader looks whether its shard is wanted.
const IDLE_POLL: Duration = Duration::from_millis(10);
/// How long a reader goes on reading a shard nothing here can match any more, so a client
/// that drops and comes back does not stop and reload it.
const LINGER: Duration = Duration::from_secs(5);

impl<D: Dial> Reader<D> {
    /// The reader's state machine: `Idle` (its shard wanted by nothing here; only with
    /// interest-based reading) → `Starting` (connect, load) → `Reading` (follow) → back to
    /// `Idle` once nothing wanted it for [`LINGER`]; a failure goes back to `Starting` with
    /// the cursor kept.
    fn run(mut self) {
        let shard = self.shard.shard;
        let mut last: Option<String> = None;
        loop {
            let live_from = match &self.interest {
                Some(interest) => {
                    self.status.reading(shard, false);
                    // Idle is not down.
                    self.status.set(shard, Part::Reader, true);
                    while !interest.wanted(shard) {
                        std::thread::sleep(IDLE_POLL);
                    }
                    // Live from what subscriptions asked, and at least from now (less the
                    // skew allowance): one made while this loads is covered by no request.
                    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
                    let now_ms = now_ms.saturating_sub(crate::interest::SKEW_ALLOWANCE_MS);
                    let live_from = interest.start(shard).map_or(now_ms, |asked| asked.min(now_ms));
                    self.bus.start_shard(shard, Some(live_from));
                    Some(live_from)
                }
                None => None,
            };
            let mut start = Start::Load { live_from };
            loop {
                let mut conn = match self.connector.try_connect() {
                    Ok(conn) => conn,
                    Err(error) => {
                        if matches!(error, ConnectError::Redis(_)) {
                            self.status.set(shard, Part::Reader, false);
                            // Resumes waiting for this shard's load stop waiting.
                            self.bus.tell_loaded();
                        }
                        std::thread::sleep(FIRST_BACKOFF);
                        continue;
                    }
                };
                match self.follow(&mut conn, &mut last, start) {
                    Ok(()) => break,
                    Err(e) => {
                        self.status.set(shard, Part::Reader, false);
                        self.connector.lost(&e);
                        if matches!(start, Start::Load { .. }) {
                            self.bus.tell_loaded();
                        }
                        // Loaded already (or not: then it loads again).
                        if self.bus.loaded(shard) {
                            start = Start::Reconnect;
                        }
                    }
                }
            }
            if let Some(interest) = &self.interest {
                // Unloaded first: a subscription made between the two finds the shard not
                // named by ids and names it from its own moment (`Bus::want_shard`).
                self.bus.unload(shard);
                interest.stop(shard);
            }
        }
    }

    /// Loads or checks for a gap, then reads the stream in order until an error (a
    /// timeout is one) or, with interest-based reading, until nothing here wants it.
    fn follow(&self, conn: &mut D::Link, last: &mut Option<String>, start: Start) -> redis::RedisResult<()> {
        let shard = self.shard.shard;
        match (start, last.as_deref().and_then(parse_stream_id)) {
            (Start::Reconnect, Some(read)) => {
                let oldest: Value =
                    redis::cmd("XRANGE").arg(&self.shard.stream).arg("-").arg("+").arg("COUNT").arg(1).query(conn)?;
                let first = parse_ids(&oldest).next().and_then(|id| parse_stream_id(&id));
                if let Some(first) = gap(read, first) {
                    tracing::warn!(after = ?read, first = ?first, "redis engine: events were trimmed while away");
                    self.bus.mark_gap(shard, first);
                }
            }
            (_, read) => {
                let live_from = match start {
                    Start::Load { live_from } => live_from,
                    Start::Reconnect => None,
                };
                self.load(conn, last, read, live_from)?;
            }
        }
        self.status.set(shard, Part::Reader, true);
        self.status.reading(shard, true);
        let mut unwanted_since: Option<Instant> = None;
        loop {
            if let Some(interest) = &self.interest {
                match (interest.wanted(shard), unwanted_since) {
                    (true, _) => unwanted_since = None,
                    (false, None) => unwanted_since = Some(Instant::now()),
                    (false, Some(since)) if since.elapsed() >= LINGER => return Ok(()),
                    (false, Some(_)) => {}
                }
            }
            let from = last.clone().unwrap_or_else(|| "0-0".into());
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&self.shard.stream)
                .arg(&from)
                .query(conn)?;
            let Parsed { entries, newest } = read_reply(&reply);
            // Past every entry read, volley's or not: a batch of foreign entries would
            // otherwise be read again forever.
            if let Some(newest) = newest {
                self.status.read_to(shard, &newest);
                *last = Some(newest);
            }
            let Some(newest) = entries.last() else {
                self.waits.sweep();
                continue;
            };
            let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            self.status.lag_us.store(now_ms.saturating_sub(newest.key.0) * 1000, Ordering::Relaxed);
            self.ingest(entries);
        }
    }

    /// Loads the stream's retained tail: what is older than `live_from` into the history
    /// only, the rest delivered. `read`: where this node had read it to before (it goes on
    /// from there when the stream still holds it, else marks the gap).
    fn load(
        &self,
        conn: &mut D::Link,
        last: &mut Option<String>,
        read: Option<(u64, u64)>,
        live_from: Option<u64>,
    ) -> redis::RedisResult<()> {
        let shard = self.shard.shard;
        let newest_first: Value = redis::cmd("XREVRANGE")
            .arg(&self.shard.stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(self.shard.settings.max_len)
            .query(conn)?;
        // Fewer entries than the stream keeps: it was never trimmed, and this is all of it.
        let whole = parse_ids(&newest_first).count() < self.shard.settings.max_len;
        let Parsed { mut entries, newest } = parse_entries(&newest_first);
        entries.reverse();
        if let (Some(read), false) = (read, whole)
            && let Some(first) = gap(read, entries.first().map(|e| e.key))
        {
            tracing::warn!(after = ?read, first = ?first, "redis engine: events were trimmed while not read");
            self.bus.mark_gap(shard, first);
        }
        if let Some(newest) = &newest {
            self.status.read_to(shard, newest);
            *last = Some(newest.clone());
        } else if last.is_none() {
            *last = Some("0-0".to_string());
        }
        if let (None, false, Some(oldest)) = (read, whole, entries.first()) {
            // Never read here and trimmed: nothing before its oldest entry can be resumed
            // (whether that entry is loaded into the history or delivered).
            self.bus.raise_floor(shard, oldest.key);
        }
        let live = live_from.map_or(entries.len(), |ms| entries.partition_point(|e| e.key < (ms, 0)));
        let delivered = entries.split_off(live);
        self.status.ingested.fetch_add(entries.len() as u64, Ordering::Relaxed);
        // The floor is set above (or by the gap just marked).
        self.bus.preload(shard, entries, true);
        self.ingest(delivered);
        Ok(())
    }

    fn ingest(&self, entries: Vec<StreamEntry>) {
        if entries.is_empty() {
            return;
        }
        let mut tickets = self.waits.take(entries.iter().map(|e| e.id.as_str()));
        self.status.ingested.fetch_add(entries.len() as u64, Ordering::Relaxed);
        self.bus.ingest(self.shard.shard, entries, |id| tickets.remove(id));
    }
}

/// The first id this node can still read after `read`, when the stream no longer holds
/// everything after it: its oldest entry is past the id right after `read`. Trimming
/// (`MAXLEN ~`) drops the oldest entries, so while `read` is retained nothing after it
/// is lost. Once `read` is gone too, ids between it and `first` may have existed or not
/// (ids follow the clock); this assumes they did: resumes from before them are refused
/// (`recovered: false`) rather than answered with a hole.
fn gap(read: (u64, u64), first: Option<(u64, u64)>) -> Option<(u64, u64)> {
    let next = match read.1.checked_add(1) {
        Some(n) => (read.0, n),
        None => (read.0.saturating_add(1), 0),
    };
    first.filter(|first| *first > next)
}

/// Entries of a reply, and the newest id read (parsed into an entry or not).
struct Parsed {
    entries: Vec<StreamEntry>,
    newest: Option<String>,
}

/// An `XREAD` reply: `[[key, [entry...]]]`, or a map of key to entries (RESP3).
fn read_reply(reply: &Value) -> Parsed {
    let entries = match reply {
        Value::Array(streams) => streams.first().and_then(|stream| match stream {
            Value::Array(pair) if pair.len() == 2 => Some(&pair[1]),
            _ => None,
        }),
        Value::Map(streams) => streams.first().map(|(_, v)| v),
        _ => None,
    };
    entries.map_or(Parsed { entries: Vec::new(), newest: None }, parse_entries)
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// The ids of `[[id, fields], ...]`, in reply order.
fn parse_ids(value: &Value) -> impl Iterator<Item = String> + '_ {
    let items = match value {
        Value::Array(items) => items.as_slice(),
        _ => &[],
    };
    items.iter().filter_map(|item| match item {
        Value::Array(pair) => text(pair.first()?),
        _ => None,
    })
}

/// `[[id, [field, value, ...]], ...]` into entries; malformed ones are skipped (they
/// were not written by volley), but their ids still count for `newest`.
fn parse_entries(value: &Value) -> Parsed {
    let newest = parse_ids(value).filter_map(|id| Some((parse_stream_id(&id)?, id))).max().map(|(_, id)| id);
    let Value::Array(items) = value else { return Parsed { entries: Vec::new(), newest } };
    let entries = items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else { return None };
            let (id, fields) = (text(pair.first()?)?, pair.get(1)?);
            let key = parse_stream_id(&id)?;
            let fields: HashMap<String, String> = match fields {
                Value::Array(flat) => {
                    flat.chunks(2).filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?))).collect()
                }
                Value::Map(pairs) => pairs.iter().filter_map(|(k, v)| Some((text(k)?, text(v)?))).collect(),
                _ => return None,
            };
            let request = PublishRequest {
                topic: fields.get("topic")?.clone(),
                source: fields.get("source").cloned().unwrap_or_default(),
                correlation_id: fields.get("cid").cloned(),
                data: RawValue::from_string(fields.get("data")?.clone()).ok()?,
            };
            let tail = request.encoded_tail();
            Some(StreamEntry { id, key, timestamp: fields.get("ts")?.clone(), prepared: Prepared { request, tail } })
        })
        .collect();
    Parsed { entries, newest }
}

/// `<ms>-<n>`.
pub fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, n) = id.split_once('-')?;
    Some((ms.parse().ok()?, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Sequencer;
    use crate::history::Retention;
    use crate::mailbox::{Inbox, ReplyTo};

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[&str]) -> Value {
        Value::Array(vec![bulk(id), Value::Array(fields.iter().map(|f| bulk(f)).collect())])
    }

    fn volley_entry(id: &str) -> Value {
        entry(
            id,
            &["ts", "2026-01-01T00:00:00.000000Z", "topic", "a.b", "source", "s", "data", "{\"x\":1}", "cid", "c"],
        )
    }

    #[test]
    fn parses_stream_entries_and_skips_foreign_ones() {
        let value = Value::Array(vec![
            volley_entry("5-1"),
            entry("5-2", &["unrelated", "field"]),
            entry("bad", &["ts", "t", "topic", "a", "data", "1"]),
        ]);
        let Parsed { entries, newest } = parse_entries(&value);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key, (5, 1));
        assert_eq!(entries[0].prepared.request.correlation_id.as_deref(), Some("c"));
        assert_eq!(entries[0].prepared.request.data.get(), "{\"x\":1}");
        assert_eq!(newest.as_deref(), Some("5-2"), "the foreign entry is read too");
    }

    /// Review item 5: `last` only moved on parsed entries, so a batch of foreign ones was
    /// read again forever.
    #[test]
    fn an_xread_batch_of_only_foreign_entries_still_moves_past_them() {
        let foreign = Value::Array(vec![entry("7-1", &["other", "app"]), entry("7-3", &["other", "app"])]);
        let reply = Value::Array(vec![Value::Array(vec![bulk("stream"), foreign.clone()])]);
        let Parsed { entries, newest } = read_reply(&reply);
        assert!(entries.is_empty());
        assert_eq!(newest.as_deref(), Some("7-3"));
        let resp3 = Value::Map(vec![(bulk("stream"), foreign)]);
        assert_eq!(read_reply(&resp3).newest.as_deref(), Some("7-3"));
        // XREVRANGE (newest first) during the catch-up.
        let reversed = Value::Array(vec![volley_entry("9-2"), volley_entry("9-1")]);
        assert_eq!(parse_entries(&reversed).newest.as_deref(), Some("9-2"));
    }

    #[test]
    fn a_gap_is_a_first_retained_id_past_the_next_one() {
        assert_eq!(gap((5, 1), None), None, "empty stream");
        assert_eq!(gap((5, 1), Some((3, 0))), None, "what was read is still retained");
        assert_eq!(gap((5, 1), Some((5, 1))), None);
        assert_eq!(gap((5, 1), Some((5, 2))), None, "the very next id: nothing can be missing");
        assert_eq!(gap((5, 1), Some((5, 3))), Some((5, 3)));
        assert_eq!(gap((5, 1), Some((9, 0))), Some((9, 0)));
        assert_eq!(gap((5, u64::MAX), Some((6, 0))), None);
    }

    fn engine_bus() -> (Bus, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let waker = mio::Waker::new(poll.registry(), mio::Token(0)).unwrap();
        // The entries' timestamps are fixed, so any age is fine.
        let retention = Retention { max_events: 100, max_age: Duration::MAX, max_bytes: usize::MAX };
        let submit: Submit = Box::new(|_, _| Ok(()));
        (Bus::with_sequencer(vec![Inbox::new(waker, 64)], retention, 1 << 16, Sequencer::Engine(submit)), poll)
    }

    fn stream_entries(ids: &[&str]) -> Vec<StreamEntry> {
        parse_entries(&Value::Array(ids.iter().map(|id| volley_entry(id)).collect())).entries
    }

    /// Review item 6: after events were trimmed while the reader was away, a resume from
    /// before them was answered `recovered: true` with a hole.
    #[test]
    fn a_gap_makes_resumes_from_before_it_unrecoverable() {
        let (bus, _poll) = engine_bus();
        bus.preload(0, Vec::new(), true);
        let resume = |id: &str| bus.resume(id, std::time::Instant::now(), SystemTime::now());
        bus.ingest(0, stream_entries(&["5-1", "5-2"]), |_| None);
        assert!(resume("5-1").is_ok());
        bus.mark_gap(0, (9, 0));
        assert!(resume("5-2").is_err(), "the newest read event is before the gap");
        assert!(resume("7-0").is_err(), "an id inside the gap, before the first event after it arrives");
        bus.ingest(0, stream_entries(&["9-0", "9-1"]), |_| None);
        assert_eq!(bus.last_seq(), 4, "the first event after the gap is taken");
        assert!(resume("7-0").is_err(), "an id inside the gap");
        assert!(resume("8-99").is_err(), "an id inside the gap");
        assert!(resume("9-0").is_ok());
    }

    #[test]
    fn the_engine_is_up_only_while_both_threads_are() {
        let status = EngineStatus::default();
        assert!(!status.up.load(Ordering::Acquire), "the reader has not connected");
        status.set(0, Part::Reader, true);
        assert!(status.up.load(Ordering::Acquire));
        status.set(0, Part::Writer, false);
        status.set(0, Part::Reader, true);
        assert!(!status.up.load(Ordering::Acquire), "the writer's failure stands");
        status.set(0, Part::Writer, true);
        assert!(status.up.load(Ordering::Acquire));
    }

    fn submission(wait: bool, events: usize) -> Submission {
        let request = || PublishRequest {
            topic: "a".into(),
            source: String::new(),
            correlation_id: None,
            data: RawValue::from_string("1".into()).unwrap(),
        };
        let prepared = Prepared::all((0..events).map(|_| request()).collect(), 1 << 16).unwrap();
        let to = ReplyTo { shard: 0, key: 0, conn_id: 0 };
        Submission { prepared, reply: Reply { to, wait, websocket: None } }
    }

    fn tickets(ids: &[&str]) -> Vec<(Box<str>, Ticket)> {
        let to = ReplyTo { shard: 0, key: 0, conn_id: 0 };
        let ticket = PublishTicket::new(to, ids.iter().map(|&id| id.into()).collect(), 1);
        ids.iter().enumerate().map(|(i, &id)| (id.into(), (ticket.clone(), i))).collect()
    }

    /// Review item 3: the reader may read an event before the writer has its id. It waits
    /// for the write, without any lock held across the writer's round trip.
    #[test]
    fn the_reader_waits_for_tickets_of_a_write_in_flight() {
        let waits = Arc::new(Waits::new(Duration::from_secs(10), 100));
        let number = waits.sending();
        let writer = {
            let waits = waits.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                // The lock is free while the write is in flight.
                assert_eq!(waits.admit(vec![submission(true, 1)]).1.len(), 0);
                waits.written(number, tickets(&["1-1"]));
            })
        };
        let taken = waits.take(["1-1", "1-2"].into_iter());
        assert_eq!(taken.keys().map(|k| &**k).collect::<Vec<_>>(), ["1-1"]);
        writer.join().unwrap();
    }

    /// Review item 4: tickets of events never read stayed forever, and nothing bounded them.
    #[test]
    fn tickets_expire_and_are_bounded() {
        let waits = Waits::new(Duration::from_millis(50), 3);
        let (admitted, refused) =
            waits.admit(vec![submission(true, 2), submission(false, 5), submission(true, 2), submission(true, 1)]);
        assert_eq!(admitted.iter().map(|s| s.prepared.len()).collect::<Vec<_>>(), [2, 5, 1]);
        assert_eq!(refused.len(), 1, "past the bound: answered overloaded");
        let number = waits.sending();
        waits.written(number, tickets(&["1-1", "1-2", "1-3"]));
        assert_eq!(waits.admit(vec![submission(true, 1)]).1.len(), 1, "full");
        std::thread::sleep(Duration::from_millis(80));
        waits.sweep();
        assert_eq!(waits.lock().tickets.len(), 0, "expired");
        assert_eq!(waits.admit(vec![submission(true, 1)]).1.len(), 0);
    }
}
