//! The bus: where a publish gets its place in the one total order and reaches every shard.
//!
//! Ordering choice (ARCHITECTURE.md option b): one short critical section assigns the
//! next sequence number, stamps the time, builds the event's bytes once (event JSON,
//! WebSocket frame, SSE head), appends it to the history and pushes a reference onto every
//! shard's lock-free inbound queue, all in the same order; shards are woken after the lock
//! is released, once per batch. On two to a few cores one uncontended mutex costs less than
//! a sequencer thread's hand-off and is far simpler than a multi-producer ring; what runs
//! inside it is a memcpy of pre-escaped JSON, never serialization. With a cluster engine
//! ([`Sequencer::Engine`]) the order is the engine's: a publish is handed over and comes
//! back through [`Bus::ingest`], which runs the same critical section with the engine's
//! ids. Readers of the history (resume, `/history`, acks) never run inside it for longer
//! than a snapshot or a binary search takes: they copy a [`Snapshot`] under the lock and
//! search, filter and clone events outside it, so a resuming subscriber never holds up a
//! publish. The bus owns event ids, order keys and the shards' [`Mailboxes`]; it never touches
//! sockets or connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::event::{After, Event, OrderKey, Prepared, PublishError, StreamEntry, TIMESTAMP_LEN, encode};
use crate::history::{Cursor, History, NotRecoverable, Retention, Snapshot};
use crate::mailbox::{Delivery, Inbox, Mailboxes, PublishTicket, Reply, ReplyTo};
use crate::positions;
use crate::protocol::{self, PublishRequest};

/// How a publish was taken.
#[derive(Debug)]
pub enum Accepted {
    /// Published; these are the ids.
    Now(Vec<Box<str>>),
    /// The answer reaches the publisher's shard later, as [`crate::mailbox::Control::Published`]
    /// or [`crate::mailbox::Control::PublishDone`].
    Later,
}

struct Ordered {
    history: History,
    /// The history holds everything the order had when this node started reading it: always
    /// for the local sequencer, after the first load for an engine. Before that a resume
    /// cannot be judged and is answered `recovered:false`.
    caught_up: bool,
    /// A sharded engine's shards (empty otherwise): how far this node has read each.
    reads: Vec<ShardRead>,
}

/// How far this node has read one shard of a sharded engine.
#[derive(Debug, Clone, Copy, Default)]
struct ShardRead {
    /// Stream id of the newest entry taken (`(0, 0)`: none).
    at: OrderKey,
    /// Its reader has loaded it and follows it: the history holds it from its floor on.
    loaded: bool,
    /// Event ids name it: its reader started, and every subscription that can match it
    /// gets its events from `start_at` on.
    included: bool,
    /// Where live delivery of this reading began (ids never name an earlier position).
    start_at: OrderKey,
}

impl ShardRead {
    /// This shard's component in an event id.
    fn position(&self) -> Option<OrderKey> {
        self.included.then(|| self.at.max(self.start_at))
    }
}

impl Ordered {
    /// Whether an entry of engine shard `shard` at `key` was taken already.
    fn seen(&self, shard: u32, key: OrderKey) -> bool {
        match self.reads.get(shard as usize) {
            Some(read) => key <= read.at,
            None => self.history.last_key().is_some_and(|last| key <= last),
        }
    }

    /// The entry as this node's next event, or `None` when it was taken already. With a
    /// sharded engine its key is this node's own order and its id the node's positions.
    fn order(&mut self, shard: u32, entry: &StreamEntry, published_at: Instant, now: Instant) -> Option<Arc<Event>> {
        if self.seen(shard, entry.key) {
            return None;
        }
        let seq = self.history.last_seq() + 1;
        let (prepared, timestamp) = (&entry.prepared, &entry.timestamp);
        let Some(read) = self.reads.get_mut(shard as usize) else {
            return Some(Arc::new(encode(seq, entry.key, &entry.id, prepared, timestamp, published_at, now)));
        };
        read.at = entry.key;
        let at: Vec<Option<OrderKey>> = self.reads.iter().map(ShardRead::position).collect();
        let id = positions::encode(shard, entry.key, &at);
        let mut event = encode(seq, (0, seq), &id, prepared, timestamp, published_at, now);
        event.origin = (shard, entry.key);
        Some(Arc::new(event))
    }
}

/// Counters the bus keeps.
#[derive(Debug, Default)]
pub struct BusCounters {
    /// Events published.
    pub published: AtomicU64,
    /// Publishes refused because a shard queue was full.
    pub refused_overloaded: AtomicU64,
}

/// Hands prepared events to a cluster engine, which answers through the publisher's
/// inbox and feeds the events back through [`Bus::ingest`].
pub type Submit = Box<dyn Fn(Vec<Prepared>, Reply) -> Result<(), PublishError> + Send + Sync>;

/// Where the order comes from.
pub enum Sequencer {
    /// This process: ids `<epoch>-<seq>`.
    Local {
        /// Start time of this broker run, hex milliseconds.
        epoch: String,
    },
    /// A cluster engine; ids are the engine's.
    Engine(Submit),
}

/// The publish entry point shared by all shards.
pub struct Bus {
    ordered: Mutex<Ordered>,
    /// The shards' inboxes, through which control messages are sent too.
    pub mailboxes: Mailboxes,
    sequencer: Sequencer,
    max_message_bytes: usize,
    /// Counters.
    pub counters: BusCounters,
}

impl Bus {
    /// A bus with the local sequencer feeding `inboxes`, one per shard.
    pub fn new(inboxes: Vec<Inbox>, retention: Retention, max_message_bytes: usize) -> Self {
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Self::with_sequencer(inboxes, retention, max_message_bytes, Sequencer::Local { epoch: format!("{epoch:x}") })
    }

    /// A bus whose order comes from `sequencer`.
    pub fn with_sequencer(
        inboxes: Vec<Inbox>,
        retention: Retention,
        max_message_bytes: usize,
        sequencer: Sequencer,
    ) -> Self {
        let caught_up = matches!(sequencer, Sequencer::Local { .. });
        Self {
            ordered: Mutex::new(Ordered { history: History::new(retention), caught_up, reads: Vec::new() }),
            mailboxes: Mailboxes::new(inboxes),
            sequencer,
            max_message_bytes,
            counters: BusCounters::default(),
        }
    }

    /// Takes its order from a sharded engine of `shards` shards (more than one): event ids
    /// become [`positions`] vectors, and a resume is judged per shard. Each shard is read
    /// only while wanted, so there is no load to wait for at start: a resume waits for its
    /// own shards' loads instead ([`Bus::loaded`]).
    pub fn with_engine_shards(self, shards: u32) -> Self {
        if shards > 1 {
            let mut ordered = self.lock();
            ordered.history.track_shards(shards as usize);
            ordered.reads = vec![ShardRead::default(); shards as usize];
            ordered.caught_up = true;
        }
        self
    }

    /// Shard `shard`'s reader starts: ids name it from now on, at `live_from` (wall-clock
    /// ms: where its live delivery starts) or after. `None`: from where it was read.
    pub fn start_shard(&self, shard: u32, live_from: Option<u64>) {
        if let Some(read) = self.lock().reads.get_mut(shard as usize) {
            read.included = true;
            // Just before: the entry at `(ms, 0)` itself is delivered live.
            read.start_at = live_from.map_or((0, 0), |ms| crate::history::key_before((ms, 0)));
        }
    }

    /// A subscription here wants shard `shard` from wall-clock millisecond `from` on:
    /// until its reader starts, ids name the shard there, not at the id's time (which
    /// would claim events the subscription is still owed).
    pub fn want_shard(&self, shard: u32, from: u64) {
        if let Some(read) = self.lock().reads.get_mut(shard as usize).filter(|read| !read.included) {
            read.included = true;
            read.start_at = crate::history::key_before((from, 0));
        }
    }

    /// Whether this node has read every one of `shards` up to `wanted` (a resume from a
    /// node that was ahead waits for that, so the ids it is given here never fall behind
    /// what it had).
    pub fn reached(&self, shards: &[u32], wanted: &[OrderKey]) -> bool {
        let ordered = self.lock();
        shards.iter().all(|&shard| {
            let (read, wanted) = (ordered.reads.get(shard as usize), wanted.get(shard as usize));
            read.zip(wanted).is_none_or(|(read, wanted)| read.at >= *wanted)
        })
    }

    /// The per-shard positions a sharded engine's id names (`None`: not such an id).
    pub fn positions_of(&self, id: &str) -> Option<Vec<OrderKey>> {
        let shards = self.engine_shards();
        (shards > 0).then(|| positions::decode(id, shards as u32).map(|(_, at)| at)).flatten()
    }

    /// Positions before `floor` in shard `shard` cannot be resumed (its reader loaded a
    /// stream that had lost what came before).
    pub fn raise_floor(&self, shard: u32, floor: OrderKey) {
        self.lock().history.raise_origin_floor(shard, floor);
    }

    /// Shard `shard`'s reader stopped (nothing here can match it any more): ids stop
    /// naming it and resumes wait for its next load.
    pub fn unload(&self, shard: u32) {
        if let Some(read) = self.lock().reads.get_mut(shard as usize) {
            read.loaded = false;
            read.included = false;
        }
    }

    /// Whether the history holds shard `shard` (always, but with a sharded engine).
    pub fn loaded(&self, shard: u32) -> bool {
        self.lock().reads.get(shard as usize).is_none_or(|read| read.loaded)
    }

    /// Tells every shard core that an engine shard's load ended (done or failed), so
    /// resumes waiting for it look again.
    pub fn tell_loaded(&self) {
        self.mailboxes.to_every_shard(|| crate::mailbox::Control::EngineShardLoaded);
    }

    /// Shards of a sharded engine; 0 when the order has one source.
    pub fn engine_shards(&self) -> usize {
        self.lock().reads.len()
    }

    /// The shard inboxes.
    pub fn inboxes(&self) -> &[Inbox] {
        self.mailboxes.inboxes()
    }

    fn lock(&self) -> MutexGuard<'_, Ordered> {
        // A panic inside the critical section cannot leave it half-done in a way that
        // matters more than stopping the broker would, so poisoning is ignored.
        self.ordered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes `requests` atomically and in order at `now` (`wall`: the same instant on
    /// the wall clock, for the event's timestamp). With the local sequencer and no `wait`,
    /// the ids come back at once; otherwise the answer reaches `reply.to`'s shard as a
    /// control message.
    pub fn publish(
        &self,
        requests: Vec<PublishRequest>,
        reply: Reply,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Accepted, PublishError> {
        let prepared = Prepared::all(requests, self.max_message_bytes)?;
        let epoch = match &self.sequencer {
            Sequencer::Engine(submit) => return submit(prepared, reply).map(|()| Accepted::Later),
            Sequencer::Local { epoch } => epoch,
        };
        let mut timestamp = String::with_capacity(TIMESTAMP_LEN);
        protocol::push_timestamp(&mut timestamp, wall);
        let epoch_key = u64::from_str_radix(epoch, 16).unwrap_or(0);
        let ticket_to = reply.wait.then_some(reply.to);
        let ids = self
            .append(prepared, ticket_to, now, |seq| (format!("{epoch}-{seq}"), (epoch_key, seq), timestamp.clone()))?;
        Ok(if reply.wait { Accepted::Later } else { Accepted::Now(ids) })
    }

    /// Appends events an engine has ordered, skipping any already seen. Waits while shard
    /// queues are full: the caller is the engine's own thread, and the engine's stream
    /// keeps what cannot be taken yet.
    /// `shard` is the engine shard the entries were read from (0 with one).
    pub fn ingest(
        &self,
        shard: u32,
        entries: Vec<StreamEntry>,
        mut ticket_of: impl FnMut(&str) -> Option<(Arc<PublishTicket>, usize)>,
    ) {
        let now = Instant::now();
        let wall_now = SystemTime::now();
        for entry in entries {
            let published_at = published_instant(&entry.timestamp, wall_now, now);
            let ticket = ticket_of(&entry.id);
            while let Err(PublishError::Overloaded) = self.append_entry(shard, &entry, published_at, ticket.clone()) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Loads events into the history only: a node joining a cluster catches up on the
    /// retained past without delivering it. From then on resumes are judged against it;
    /// they replay these events like any other (a resume's replay is bounded by what the
    /// log holds, not by what happened to pass this node's shards).
    ///
    /// With a sharded engine this is shard `shard`'s load (`whole`: all the stream ever
    /// held); the node is caught up once every shard's is done.
    pub fn preload(&self, shard: u32, entries: Vec<StreamEntry>, whole: bool) {
        let mut ordered = self.lock();
        let now = Instant::now();
        let wall_now = SystemTime::now();
        if let Some(first) = entries.first().filter(|_| !whole) {
            // What came before the first entry loaded may be gone: resumes from before it
            // are refused.
            ordered.history.raise_origin_floor(shard, first.key);
        }
        for entry in entries {
            let at = published_instant(&entry.timestamp, wall_now, now);
            if let Some(event) = ordered.order(shard, &entry, at, now) {
                ordered.history.push(event, now);
            }
        }
        if ordered.reads.is_empty() {
            ordered.history.mark_caught_up();
            ordered.caught_up = true;
        } else if let Some(read) = ordered.reads.get_mut(shard as usize) {
            read.loaded = true;
            drop(ordered);
            self.tell_loaded();
        }
    }

    /// Whether the history holds the order's retained past (an engine's first load is
    /// done); the reactor waits a moment for it so a restarted node resumes exactly.
    pub fn caught_up(&self) -> bool {
        self.lock().caught_up
    }

    /// The engine's log no longer holds the events this node missed before `first`, the
    /// oldest it still retains: positions before `first` cannot be resumed any more.
    /// (With a sharded engine, of shard `shard`.)
    pub fn mark_gap(&self, shard: u32, first: (u64, u64)) {
        let mut ordered = self.lock();
        if ordered.reads.is_empty() {
            ordered.history.mark_gap(first);
        } else {
            ordered.history.raise_origin_floor(shard, crate::history::key_before(first));
        }
    }

    fn append_entry(
        &self,
        shard: u32,
        entry: &StreamEntry,
        published_at: Instant,
        ticket: Option<(Arc<PublishTicket>, usize)>,
    ) -> Result<(), PublishError> {
        let mut ordered = self.lock();
        if ordered.seen(shard, entry.key) {
            return Ok(()); // read again after a reconnect
        }
        if self.inboxes().iter().any(|inbox| inbox.events.is_full()) {
            return Err(PublishError::Overloaded);
        }
        let now = Instant::now();
        let Some(event) = ordered.order(shard, entry, published_at, now) else { return Ok(()) };
        ordered.history.push(event.clone(), now);
        for inbox in self.inboxes() {
            let _ = inbox.events.push(Delivery { event: event.clone(), ticket: ticket.clone() });
        }
        drop(ordered);
        self.counters.published.fetch_add(1, Ordering::Relaxed);
        for inbox in self.inboxes() {
            inbox.wake();
        }
        Ok(())
    }

    fn append(
        &self,
        prepared: Vec<Prepared>,
        ticket_to: Option<ReplyTo>,
        now: Instant,
        mut id_of: impl FnMut(u64) -> (String, (u64, u64), String),
    ) -> Result<Vec<Box<str>>, PublishError> {
        let count = prepared.len();
        let ids = {
            let mut ordered = self.lock();
            if self.inboxes().iter().any(|inbox| inbox.events.capacity() - inbox.events.len() < count) {
                self.counters.refused_overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(PublishError::Overloaded);
            }
            let events: Vec<Arc<Event>> = prepared
                .iter()
                .map(|prepared| {
                    let seq = ordered.history.last_seq() + 1;
                    let (id, key, timestamp) = id_of(seq);
                    let event = Arc::new(encode(seq, key, &id, prepared, &timestamp, now, now));
                    ordered.history.push(event.clone(), now);
                    event
                })
                .collect();
            let ids: Vec<Box<str>> = events.iter().map(|e| e.id.clone()).collect();
            let ticket = ticket_to.map(|reply_to| PublishTicket::new(reply_to, ids.clone(), self.inboxes().len()));
            for inbox in self.inboxes() {
                for (index, event) in events.iter().enumerate() {
                    let delivery = Delivery { event: event.clone(), ticket: ticket.clone().map(|t| (t, index)) };
                    // Capacity was checked under this lock and only publishers push.
                    let _ = inbox.events.push(delivery);
                }
            }
            ids
        };
        self.counters.published.fetch_add(ids.len() as u64, Ordering::Relaxed);
        for inbox in self.inboxes() {
            inbox.wake();
        }
        Ok(ids)
    }

    /// The order key an id names: `<epoch>-<seq>` of this run for the local sequencer,
    /// `<ms>-<n>` for an engine. `None` for anything else.
    pub fn parse_key(&self, id: &str) -> Option<(u64, u64)> {
        let (left, right) = id.split_once('-')?;
        let right: u64 = right.parse().ok()?;
        match &self.sequencer {
            Sequencer::Local { epoch } if left == epoch => Some((u64::from_str_radix(left, 16).ok()?, right)),
            Sequencer::Local { .. } => None,
            Sequencer::Engine(_) => Some((left.parse().ok()?, right)),
        }
    }

    /// Retained events after the id `since` that `keep` accepts, at most `limit`, as of
    /// `now`: the first batch of a [`Bus::resume`].
    pub fn replay(
        &self,
        since: &str,
        limit: usize,
        now: Instant,
        wall: SystemTime,
        keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Arc<Event>>, NotRecoverable> {
        let (_, cursor) = self.resume(since, now, wall)?;
        Ok(cursor.map(|mut cursor| cursor.next_batch(limit, keep)).unwrap_or_default())
    }

    /// Where a subscription resuming after `since` starts, as of `now`: a cursor over
    /// every retained event after it (none when there is nothing to replay), and where
    /// live events take over. The replay is bounded by what the log holds when asked,
    /// and live delivery starts right after it: an event in the log is replayed whether
    /// or not it ever passed this shard (loaded at start-up, still in the inbox), and one
    /// that enters the log later comes live. So no gap and no repeat, by construction.
    ///
    /// With an engine, an id this node has not read yet (a client moving from a node that
    /// was ahead) replays nothing of what is still to come, and live delivery skips it up
    /// to there. Only ids within a clock-skew allowance of `wall` count as that.
    pub fn resume(
        &self,
        since: &str,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(After, Option<Cursor>), NotRecoverable> {
        self.resume_over(since, None, now, wall)
    }

    /// [`Bus::resume`] for a subscription that can match only `over` of a sharded
    /// engine's shards (`None`: any): only their floors can refuse it.
    pub fn resume_over(
        &self,
        since: &str,
        over: Option<&[u32]>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(After, Option<Cursor>), NotRecoverable> {
        let shards = self.engine_shards();
        if shards > 0 {
            return self.resume_sharded(since, shards as u32, over, now, wall);
        }
        let key = self.parse_key(since).ok_or(NotRecoverable)?;
        let (snapshot, caught_up) = self.snapshot(now);
        let after = |key| After { key, positions: None };
        match snapshot.position(key) {
            Ok(seq) if caught_up => {
                let through = snapshot.last_key().map_or(key, |last| last.max(key));
                let upto = snapshot.last_seq();
                Ok((after(through), (upto > seq).then(|| Cursor::new(snapshot, seq, upto))))
            }
            Err(NotRecoverable) if caught_up && self.is_pending_engine_key(key, snapshot.last_key(), wall) => {
                Ok((after(key), None))
            }
            _ => Err(NotRecoverable),
        }
    }

    /// [`Bus::resume`] with a sharded engine: `since` is a [`positions`] vector; each
    /// shard replays after its component, and resuming is possible when the log holds
    /// every shard from there on.
    fn resume_sharded(
        &self,
        since: &str,
        shards: u32,
        over: Option<&[u32]>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(After, Option<Cursor>), NotRecoverable> {
        const SKEW_MS: u64 = 10_000;
        let (_, wanted) = positions::decode(since, shards).ok_or(NotRecoverable)?;
        let (snapshot, ahead) = {
            let mut ordered = self.lock();
            ordered.history.evict(now);
            // Shards not loaded are not this resume's (the core waits for the loads of the
            // shards a subscription can match before it resumes).
            let floors = ordered.history.origin_floors();
            let matters = |shard: usize| over.is_none_or(|over| over.contains(&(shard as u32)));
            let lost = wanted.iter().zip(floors).zip(&ordered.reads).enumerate().any(|(shard, ((at, floor), read))| {
                matters(shard) && read.loaded && floor.is_some_and(|floor| *at < floor)
            });
            if lost {
                return Err(NotRecoverable);
            }
            let ahead = wanted.iter().zip(&ordered.reads).any(|(at, read)| *at > read.at);
            (ordered.history.snapshot(), ahead)
        };
        let now_ms = wall.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        if wanted.iter().any(|at| at.0 > now_ms + SKEW_MS) {
            return Err(NotRecoverable);
        }
        let wanted: Arc<[OrderKey]> = wanted.into();
        let through = snapshot.last_key().unwrap_or((0, 0));
        let upto = snapshot.last_seq();
        let cursor = snapshot
            .first_after(&wanted)
            .map(|start| Cursor::new(snapshot, start, upto).with_positions(wanted.clone()));
        Ok((After { key: through, positions: ahead.then_some(wanted) }, cursor))
    }

    fn is_pending_engine_key(&self, key: (u64, u64), last: Option<(u64, u64)>, wall: SystemTime) -> bool {
        const SKEW_MS: u64 = 10_000;
        let now_ms = wall.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        matches!(self.sequencer, Sequencer::Engine(_))
            && last.is_none_or(|last| key > last)
            && key.0 <= now_ms + SKEW_MS
    }

    /// The newest `limit` retained events that `keep` accepts as of `now`, oldest first.
    pub fn newest(&self, limit: usize, now: Instant, keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        self.snapshot(now).0.newest(u64::MAX, limit, keep)
    }

    /// The history as of `now`, for searching and filtering outside the lock: the caller's
    /// `keep` and the cloning of up to every retained event must never hold up a publish.
    /// Evicts first, so a reader never sees what the bounds no longer allow even when
    /// nothing has been published for a while. Also whether the log is caught up.
    fn snapshot(&self, now: Instant) -> (Snapshot, bool) {
        let mut ordered = self.lock();
        ordered.history.evict(now);
        (ordered.history.snapshot(), ordered.caught_up)
    }

    /// When the event named by `id` was published, while it is retained. A binary search
    /// under the lock: cheaper than a snapshot, and independent of what is retained.
    /// With a sharded engine, a search from the newest event back over the last 256: it
    /// runs under the lock for every `ack` a client sends, and an ack of an older event
    /// only loses one latency sample.
    pub fn published_at(&self, id: &str) -> Option<Instant> {
        const ACK_SEARCH: usize = 256;
        let ordered = self.lock();
        if ordered.reads.is_empty() {
            let key = self.parse_key(id)?;
            return ordered.history.find(key).map(|e| e.published_at);
        }
        // The own component is all an ack needs: decode no more of a long id.
        let own = id.split('_').next()?;
        let (shard, positions) = positions::decode(own, ordered.reads.len() as u32)?;
        let origin = (shard, positions[shard as usize]);
        ordered.history.find_newest(ACK_SEARCH, |e| e.origin == origin).map(|e| e.published_at)
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

/// The local instant matching a publish timestamp written by (possibly) another node, so
/// latency histograms measure from the publisher's clock.
fn published_instant(timestamp: &str, wall_now: SystemTime, now: Instant) -> Instant {
    let Ok(parsed) = time::OffsetDateTime::parse(timestamp, &time::format_description::well_known::Rfc3339) else {
        return now;
    };
    let then = SystemTime::from(parsed);
    match wall_now.duration_since(then) {
        Ok(age) => now.checked_sub(age).unwrap_or(now),
        Err(_) => now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::Waker;
    use std::time::Duration;

    fn bus(shards: usize, capacity: usize) -> (Bus, Vec<mio::Poll>) {
        let polls: Vec<_> = (0..shards).map(|_| mio::Poll::new().unwrap()).collect();
        let inboxes =
            polls.iter().map(|p| Inbox::new(Waker::new(p.registry(), mio::Token(0)).unwrap(), capacity)).collect();
        let retention = Retention { max_events: 3, max_age: Duration::from_secs(60), max_bytes: 1 << 20 };
        (Bus::new(inboxes, retention, 1024), polls)
    }

    fn publish(bus: &Bus, requests: Vec<PublishRequest>) -> Result<Vec<Box<str>>, PublishError> {
        let reply = Reply { to: ReplyTo { shard: 0, key: 0, conn_id: 0 }, wait: false, websocket: None };
        match bus.publish(requests, reply, Instant::now(), SystemTime::now())? {
            Accepted::Now(ids) => Ok(ids),
            Accepted::Later => unreachable!("the local sequencer answers at once"),
        }
    }

    /// Up to `limit` retained events after `since`, now.
    /// And where live delivery takes over.
    fn replay(bus: &Bus, since: &str, limit: usize) -> Result<(OrderKey, Vec<Arc<Event>>), NotRecoverable> {
        let (after, _) = bus.resume(since, Instant::now(), SystemTime::now())?;
        Ok((after.key, bus.replay(since, limit, Instant::now(), SystemTime::now(), |_| true)?))
    }

    fn engine_bus() -> (Bus, mio::Poll) {
        let poll = mio::Poll::new().unwrap();
        let inbox = Inbox::new(Waker::new(poll.registry(), mio::Token(0)).unwrap(), 64);
        let retention = Retention { max_events: 1_000, max_age: Duration::from_secs(60), max_bytes: 1 << 20 };
        (Bus::with_sequencer(vec![inbox], retention, 1024, Sequencer::Engine(Box::new(|_, _| Ok(())))), poll)
    }

    fn stream_entry(ms: u64, n: u64) -> StreamEntry {
        let mut timestamp = String::new();
        protocol::push_timestamp(&mut timestamp, SystemTime::now());
        StreamEntry {
            id: format!("{ms}-{n}"),
            key: (ms, n),
            timestamp,
            prepared: Prepared::all(vec![req("a")], 1024).unwrap().remove(0),
        }
    }

    #[test]
    fn a_resume_replays_events_loaded_at_start_up_that_never_passed_a_shard() {
        let (bus, _poll) = engine_bus();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        let (now, wall) = (Instant::now(), SystemTime::now());
        assert_eq!(bus.resume(&format!("{now_ms}-0"), now, wall).err(), Some(NotRecoverable), "not caught up yet");
        bus.preload(0, (1..=100).map(|n| stream_entry(now_ms, n)).collect(), false);
        assert!(bus.inboxes()[0].events.is_empty(), "a load is not delivered");
        let (through, cursor) = bus.resume(&format!("{now_ms}-10"), now, wall).unwrap();
        assert_eq!(through.key, (now_ms, 100), "live delivery starts after what the log held");
        let mut cursor = cursor.expect("something to replay");
        let keys: Vec<_> = std::iter::from_fn(|| Some(cursor.next_batch(7, |_| true)))
            .take_while(|batch| !batch.is_empty())
            .flatten()
            .map(|e| e.key.1)
            .collect();
        assert_eq!(keys, (11..=100).collect::<Vec<_>>(), "all 90, in order");
        // An event still in the shard's inbox when the resume is asked is in the replay, and
        // the order key tells live delivery to skip it.
        bus.ingest(0, vec![stream_entry(now_ms, 101)], |_| None);
        let (through, _) = bus.resume(&format!("{now_ms}-100"), now, wall).unwrap();
        assert_eq!(through.key, (now_ms, 101));
    }

    fn req(topic: &str) -> PublishRequest {
        let raw =
            serde_json::value::RawValue::from_string(format!(r#"{{"topic":"{topic}","data":{{"n":1}}}}"#)).unwrap();
        PublishRequest::from_json(&raw, "").unwrap()
    }

    #[test]
    fn encodes_once_in_order_to_every_shard() {
        let (bus, _polls) = bus(2, 8);
        let ids = publish(&bus, vec![req("a"), req("b")]).unwrap();
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
        assert_eq!(publish(&bus, vec![req("a"), req("b"), req("c")]), Err(PublishError::Overloaded));
        assert_eq!(bus.last_seq(), 0);
        let big = PublishRequest {
            data: serde_json::value::RawValue::from_string(format!("\"{}\"", "x".repeat(2000))).unwrap(),
            ..req("a")
        };
        assert_eq!(publish(&bus, vec![req("a"), big]), Err(PublishError::TooLarge(1)));
    }

    #[test]
    fn an_engine_id_this_node_has_not_read_yet_resumes_with_nothing_to_replay() {
        let (bus, _poll) = engine_bus();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        bus.preload(0, Vec::new(), true);
        bus.ingest(0, vec![stream_entry(now_ms - 2, 0), stream_entry(now_ms - 1, 0)], |_| None);
        let (key, events) = replay(&bus, &format!("{}-0", now_ms - 2), 10).unwrap();
        assert_eq!((key, events.len()), ((now_ms - 1, 0), 1));
        let ahead = format!("{}-0", now_ms + 1);
        let (key, events) = replay(&bus, &ahead, 10).unwrap();
        assert_eq!((key, events.len()), ((now_ms + 1, 0), 0), "pending: replays nothing, skips up to it");
        assert!(replay(&bus, "99999999999999-0", 10).is_err(), "far future is bogus");
    }

    #[test]
    fn replay_window_and_foreign_ids() {
        let (bus, _polls) = bus(1, 64);
        let ids: Vec<_> = (0..5).flat_map(|_| publish(&bus, vec![req("a")]).unwrap()).collect();
        // Retention 3: events 3, 4, 5 are kept, so only ids 2.. can be resumed.
        assert!(replay(&bus, &ids[0], 100).is_err());
        let (through, got) = replay(&bus, &ids[1], 100).unwrap();
        assert_eq!(through.1, 5, "live delivery takes over after the newest");
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(replay(&bus, &ids[2], 100).unwrap().1.len(), 2);
        assert_eq!(replay(&bus, &ids[2], 1).unwrap().1.len(), 1, "at most limit");
        assert_eq!(replay(&bus, &ids[4], 100).unwrap().1.len(), 0);
        assert!(replay(&bus, "0-1", 100).is_err());
        assert!(replay(&bus, "garbage", 100).is_err());
        let future = format!("{}-99", ids[0].split_once('-').unwrap().0);
        assert!(replay(&bus, &future, 100).is_err());
    }

    /// Runs `read` on another thread with a `keep` that blocks on its first call, and
    /// checks that a publish (and the cheap reads) complete while it is blocked.
    /// A history read: the bus, the id to resume after, and the `keep` to pass on.
    type Read = fn(&Bus, &str, &mut dyn FnMut(&Event) -> bool) -> usize;

    fn publish_completes_while_a_reader_blocks(read: Read) {
        use std::sync::mpsc;
        let (bus, _polls) = bus(1, 64);
        let bus = Arc::new(bus);
        let ids: Vec<_> = (0..2).flat_map(|_| publish(&bus, vec![req("a")]).unwrap()).collect();
        // Just before the first event: a resume from it replays both.
        let since = format!("{}-0", ids[0].split_once('-').unwrap().0);
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let reader = std::thread::spawn({
            let bus = bus.clone();
            move || {
                let mut first = true;
                read(&bus, &since, &mut |_| {
                    if std::mem::take(&mut first) {
                        let _ = entered_tx.send(());
                        let _ = release_rx.recv();
                    }
                    true
                })
            }
        });
        entered_rx.recv_timeout(Duration::from_secs(10)).expect("the reader reached keep");
        let (done_tx, done_rx) = mpsc::channel();
        let publisher = std::thread::spawn({
            let bus = bus.clone();
            move || {
                let published = publish(&bus, vec![req("b")]).is_ok();
                let acked = bus.published_at(&ids[1]).is_some();
                let _ = done_tx.send((published, acked, bus.history_size().0));
            }
        });
        let finished = done_rx.recv_timeout(Duration::from_secs(3));
        // Released whatever happened, so a failure reports instead of hanging.
        let _ = release_tx.send(());
        let seen = reader.join().expect("reader");
        publisher.join().expect("publisher");
        assert_eq!(finished, Ok((true, true, 3)), "a publish waited for a reader's keep");
        assert_eq!(seen, 2, "the reader sees the history as of its snapshot");
    }

    #[test]
    fn replay_never_blocks_a_publish() {
        publish_completes_while_a_reader_blocks(|bus, since, keep| {
            bus.replay(since, usize::MAX, Instant::now(), SystemTime::now(), keep)
                .map(|events| events.len())
                .unwrap_or(usize::MAX)
        });
    }

    #[test]
    fn newest_never_blocks_a_publish() {
        publish_completes_while_a_reader_blocks(|bus, _, keep| bus.newest(usize::MAX, Instant::now(), keep).len());
    }
}
