//! The retained log of recent events, for resume (`since`, `Last-Event-ID`) and `/history`.
//!
//! Owns the retained [`Event`]s bounded by count, age and bytes, and the rule for when a
//! position can be recovered. It never encodes or copies an event, and knows nothing of
//! shards, queues or connections.
//!
//! Readers must never hold up a publish. The log is a list of sealed, immutable chunks of
//! [`CHUNK`] events (`Arc<[Arc<Event>]>`) plus one open tail that only the publisher
//! appends to. The bus mutates a [`History`] only inside its publish critical section;
//! a reader takes a [`Snapshot`] under that same lock, which costs one reference count per
//! sealed chunk plus at most `CHUNK - 1` for the tail (not one per retained event), and
//! then searches, filters and clones outside it. Events are contiguous by sequence
//! number and every sealed chunk is full, so finding a position is arithmetic plus a
//! binary search on keys, never a scan.
//!
//! Eviction drops whole chunks: the oldest sealed chunk stays allocated until its last
//! event is evicted (and until the last snapshot holding it is dropped), so up to
//! `CHUNK - 1` evicted events may outlive their eviction. The byte and count bounds apply
//! to the events retained, which is what readers can see.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::{Event, OrderKey};

/// Events per sealed chunk. Large enough that a snapshot of 10,000 retained events is a
/// few dozen reference counts, small enough that copying the open tail (at most
/// `CHUNK - 1` reference counts) under the lock stays in the microsecond range.
pub const CHUNK: usize = 256;

/// Bounds of the retained log.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Most events kept.
    pub max_events: usize,
    /// Oldest event kept.
    pub max_age: Duration,
    /// Most encoded bytes kept.
    pub max_bytes: usize,
}

/// The retained log, as the publisher sees it.
#[derive(Debug)]
pub struct History {
    /// Full chunks, oldest first. A `Vec` rather than a deque so a snapshot and every
    /// query see one contiguous slice; dropping the oldest chunk shifts `len / CHUNK`
    /// pointers once per `CHUNK` evictions.
    sealed: Vec<Arc<[Arc<Event>]>>,
    /// Events not yet in a full chunk. Only the oldest segment holds evicted events:
    /// when the tail is oldest (nothing sealed) eviction removes from it directly.
    tail: Vec<Arc<Event>>,
    /// Evicted events at the start of `sealed[0]`; 0 when nothing is sealed.
    skip: usize,
    bytes: usize,
    retention: Retention,
    /// Positions with a key below this cannot be resumed: the key of the newest event
    /// evicted, or of the first event a joining node loaded.
    floor: Option<(u64, u64)>,
    /// Sequence of the newest event ever pushed (0: none).
    last_seq: u64,
    /// With a sharded engine, per shard: positions before this cannot be resumed (the
    /// stream id of the newest event of that shard evicted, or where its load began).
    /// Empty otherwise.
    origin_floors: Vec<Option<OrderKey>>,
}

/// The key right before `key` (stream ids are `(ms, n)`).
pub fn key_before(key: OrderKey) -> OrderKey {
    match key.1.checked_sub(1) {
        Some(n) => (key.0, n),
        None => (key.0.saturating_sub(1), u64::MAX),
    }
}

/// A resume position that the log can no longer (or never could) serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRecoverable;

/// An immutable view of the log at one instant, taken under the bus lock and read
/// without it. Publishes and evictions after it was taken do not change it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    sealed: Vec<Arc<[Arc<Event>]>>,
    tail: Vec<Arc<Event>>,
    skip: usize,
    floor: Option<(u64, u64)>,
    last_seq: u64,
}

/// A resume's place in a snapshot: the events after `next` up to `upto` that are still to
/// be replayed. Holds the snapshot (one pointer per sealed chunk plus the open tail, the
/// events themselves shared with the log), never a copy of the events it will replay.
#[derive(Debug, Clone)]
pub struct Cursor {
    snapshot: Snapshot,
    next: u64,
    upto: u64,
    /// With a sharded engine: only events of each shard after these stream ids.
    positions: Option<Arc<[OrderKey]>>,
}

impl Cursor {
    /// Bytes it keeps: the snapshot's references (the events are the log's, shared).
    pub fn retained_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.snapshot.sealed.len() * std::mem::size_of::<Arc<[Arc<Event>]>>()
            + self.snapshot.tail.len() * std::mem::size_of::<Arc<Event>>()
    }

    /// Replays what `snapshot` holds after sequence `after`, up to and including `upto`.
    pub fn new(snapshot: Snapshot, after: u64, upto: u64) -> Self {
        Self { snapshot, next: after, upto, positions: None }
    }

    /// Replays only events after `positions` in their shards (a sharded engine's resume).
    pub fn with_positions(mut self, positions: Arc<[OrderKey]>) -> Self {
        self.positions = Some(positions);
        self
    }

    /// The next at most `max` events that `keep` accepts, oldest first; empty once done.
    pub fn next_batch(&mut self, max: usize, mut keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        let positions = self.positions.as_deref();
        let keep = |e: &Event| positions.is_none_or(|p| e.is_after(p)) && keep(e);
        let batch = self.snapshot.after(self.next, self.upto, max, keep);
        self.next = match batch.last() {
            Some(last) if batch.len() == max => last.seq,
            // Fewer than asked for: the scan reached `upto`.
            _ => self.upto,
        };
        batch
    }
}

impl History {
    /// An empty log.
    pub fn new(retention: Retention) -> Self {
        Self {
            sealed: Vec::new(),
            tail: Vec::with_capacity(CHUNK),
            skip: 0,
            bytes: 0,
            retention,
            floor: None,
            last_seq: 0,
            origin_floors: Vec::new(),
        }
    }

    /// Keeps a floor per engine shard, for `shards` shards.
    pub fn track_shards(&mut self, shards: usize) {
        self.origin_floors = vec![None; shards];
    }

    /// Per engine shard, the position resumes must not be before (see [`Self::track_shards`]).
    pub fn origin_floors(&self) -> &[Option<OrderKey>] {
        &self.origin_floors
    }

    /// Positions of engine shard `shard` before `floor` cannot be resumed any more.
    pub fn raise_origin_floor(&mut self, shard: u32, floor: OrderKey) {
        if let Some(f) = self.origin_floors.get_mut(shard as usize) {
            *f = Some(f.map_or(floor, |f| f.max(floor)));
        }
    }

    fn view(&self) -> View<'_> {
        View { sealed: &self.sealed, tail: &self.tail, skip: self.skip, floor: self.floor, last_seq: self.last_seq }
    }

    /// A view to query outside the lock. Costs a reference count per sealed chunk and per
    /// tail event, never per retained event.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sealed: self.sealed.clone(),
            tail: self.tail.clone(),
            skip: self.skip,
            floor: self.floor,
            last_seq: self.last_seq,
        }
    }

    /// Appends the next event in sequence, evicting what the bounds no longer allow.
    pub fn push(&mut self, event: Arc<Event>, now: Instant) {
        self.last_seq = event.seq;
        self.bytes += event.retained_bytes();
        self.tail.push(event);
        if self.tail.len() == CHUNK {
            // Sealing moves the pointers into one shared allocation; the events are not
            // touched, and snapshots already taken keep their own copy of the old tail.
            let full = std::mem::replace(&mut self.tail, Vec::with_capacity(CHUNK));
            self.sealed.push(full.into());
        }
        self.evict(now);
    }

    /// Drops events over the count, byte or age bound.
    pub fn evict(&mut self, now: Instant) {
        while let Some(front) = self.view().front() {
            let (key, bytes, origin) = (front.key, front.retained_bytes(), front.origin);
            let too_many = self.len() > self.retention.max_events || self.bytes > self.retention.max_bytes;
            let too_old = now.saturating_duration_since(front.published_at) > self.retention.max_age;
            if !(too_many || too_old) {
                break;
            }
            self.bytes -= bytes;
            self.floor = Some(key);
            self.raise_origin_floor(origin.0, origin.1);
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        match self.sealed.first() {
            Some(oldest) => {
                self.skip += 1;
                if self.skip == oldest.len() {
                    self.sealed.remove(0);
                    self.skip = 0;
                }
            }
            // Fewer than CHUNK events are retained, so this shifts at most that many.
            None => {
                self.tail.remove(0);
            }
        }
    }

    /// Sequence of the newest event published (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Events retained.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Encoded bytes retained.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Key of the newest event.
    pub fn last_key(&self) -> Option<(u64, u64)> {
        self.view().last_key()
    }

    /// Marks everything before the first retained event as unrecoverable (a joining node
    /// has loaded what the cluster retains and nothing older).
    pub fn mark_caught_up(&mut self) {
        if let Some(front) = self.view().front() {
            self.floor = Some(self.floor.map_or(front.key, |f| f.max(front.key)));
        }
    }

    /// Marks every position before `first` as unrecoverable: events before it were lost to
    /// this log (an engine trimmed them while this node was away). The floor becomes the
    /// key just before `first`, so a client that saw exactly that key still resumes, and
    /// `first` itself, newer than the floor, is still taken.
    pub fn mark_gap(&mut self, first: (u64, u64)) {
        let before = key_before(first);
        self.floor = Some(self.floor.map_or(before, |f| f.max(before)));
    }

    /// The newest of the last `depth` retained events that `matches` accepts.
    pub fn find_newest(&self, depth: usize, matches: impl Fn(&Event) -> bool) -> Option<&Arc<Event>> {
        self.view().iter_from(0).rev().take(depth).find(|e| matches(e))
    }

    /// The retained event with exactly `key`: a binary search, cheap enough to run under
    /// the lock.
    pub fn find(&self, key: (u64, u64)) -> Option<&Arc<Event>> {
        self.view().find(key)
    }
}

impl Snapshot {
    fn view(&self) -> View<'_> {
        View { sealed: &self.sealed, tail: &self.tail, skip: self.skip, floor: self.floor, last_seq: self.last_seq }
    }

    /// Events in the snapshot.
    pub fn len(&self) -> usize {
        self.view().len()
    }

    /// True when the snapshot holds no event.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Key of the newest event (or, when none is retained, of the newest evicted).
    pub fn last_key(&self) -> Option<(u64, u64)> {
        self.view().last_key()
    }

    /// Sequence of the newest event the log had when the snapshot was taken.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The sequence of the last event at or before `key`: where a client that saw `key`
    /// resumes. Fails when events after it were evicted, or `key` is in the future.
    pub fn position(&self, key: (u64, u64)) -> Result<u64, NotRecoverable> {
        self.view().position(key)
    }

    /// The sequence just before the first event after `positions` in its shard (a
    /// sharded engine's resume starts there), if there is one.
    pub fn first_after(&self, positions: &[OrderKey]) -> Option<u64> {
        self.view().iter_from(0).find(|e| e.is_after(positions)).map(|e| e.seq - 1)
    }

    /// The event with exactly `key`.
    pub fn find(&self, key: (u64, u64)) -> Option<&Arc<Event>> {
        self.view().find(key)
    }

    /// Events after sequence `since` up to and including `upto`, oldest first, that
    /// `keep` accepts, at most `limit`.
    pub fn after(&self, since: u64, upto: u64, limit: usize, keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        self.view().after(since, upto, limit, keep)
    }

    /// The newest `limit` events up to `upto` that `keep` accepts, oldest first.
    pub fn newest(&self, upto: u64, limit: usize, keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        self.view().newest(upto, limit, keep)
    }
}

/// The queries, over either the live log or a snapshot: `sealed` are full chunks, `tail`
/// follows them, and the first `skip` events of the first segment are evicted. Index `i`
/// below counts retained events from the oldest.
#[derive(Clone, Copy)]
struct View<'a> {
    sealed: &'a [Arc<[Arc<Event>]>],
    tail: &'a [Arc<Event>],
    skip: usize,
    floor: Option<(u64, u64)>,
    last_seq: u64,
}

impl<'a> View<'a> {
    fn len(&self) -> usize {
        self.sealed.len() * CHUNK + self.tail.len() - self.skip
    }

    fn segment(&self, k: usize) -> &'a [Arc<Event>] {
        match self.sealed.get(k) {
            Some(chunk) => chunk,
            None => self.tail,
        }
    }

    /// The `i`th retained event (every sealed chunk is full, so this is arithmetic).
    fn get(&self, i: usize) -> Option<&'a Arc<Event>> {
        if i >= self.len() {
            return None;
        }
        let g = i + self.skip;
        let k = (g / CHUNK).min(self.sealed.len());
        self.segment(k).get(g - k * CHUNK)
    }

    fn front(&self) -> Option<&'a Arc<Event>> {
        self.get(0)
    }

    /// The newest key the log has passed: its newest event's, or the floor when that is
    /// newer (everything evicted, or a gap marked after the newest event).
    fn last_key(&self) -> Option<(u64, u64)> {
        self.len().checked_sub(1).and_then(|i| self.get(i)).map(|e| e.key).max(self.floor)
    }

    /// Retained events from index `i` on, oldest first; reversible.
    fn iter_from(&self, i: usize) -> impl DoubleEndedIterator<Item = &'a Arc<Event>> + use<'a> {
        let view = *self;
        let g = i.min(view.len()) + view.skip;
        (g / CHUNK..=view.sealed.len()).flat_map(move |k| {
            let segment = view.segment(k);
            &segment[g.saturating_sub(k * CHUNK).min(segment.len())..]
        })
    }

    /// The first index whose event fails `pred`, given that `pred` holds for a prefix
    /// (keys and sequences only grow).
    fn partition_point(&self, pred: impl Fn(&Event) -> bool) -> usize {
        let (mut low, mut high) = (0, self.len());
        while low < high {
            let mid = low + (high - low) / 2;
            match self.get(mid) {
                Some(e) if pred(e) => low = mid + 1,
                _ => high = mid,
            }
        }
        low
    }

    fn position(&self, key: (u64, u64)) -> Result<u64, NotRecoverable> {
        if self.floor.is_some_and(|floor| key < floor) || self.last_key().is_none_or(|last| key > last) {
            return Err(NotRecoverable);
        }
        let at_or_before = self.partition_point(|e| e.key <= key);
        Ok(match at_or_before.checked_sub(1).and_then(|i| self.get(i)) {
            Some(event) => event.seq,
            None => self.front().map_or(self.last_seq, |front| front.seq - 1),
        })
    }

    fn find(&self, key: (u64, u64)) -> Option<&'a Arc<Event>> {
        self.get(self.partition_point(|e| e.key < key)).filter(|e| e.key == key)
    }

    fn after(&self, since: u64, upto: u64, limit: usize, mut keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        let Some(front) = self.front() else { return Vec::new() };
        let start = usize::try_from(since.saturating_add(1).saturating_sub(front.seq)).unwrap_or(usize::MAX);
        self.iter_from(start).take_while(|e| e.seq <= upto).filter(|e| keep(e)).take(limit).cloned().collect()
    }

    fn newest(&self, upto: u64, limit: usize, mut keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        let mut out: Vec<_> =
            self.iter_from(0).rev().filter(|e| e.seq <= upto && keep(e)).take(limit).cloned().collect();
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::test_event;

    const EPOCH: u64 = 7;

    fn history(max_events: usize) -> History {
        History::new(Retention { max_events, max_age: Duration::from_secs(60), max_bytes: usize::MAX })
    }

    fn fill(history: &mut History, seqs: std::ops::RangeInclusive<u64>, at: Instant) {
        for seq in seqs {
            history.push(test_event(seq, (EPOCH, seq), at), at);
        }
    }

    fn seqs(events: &[Arc<Event>]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    fn range(from: u64, to: u64) -> Vec<u64> {
        (from..=to).collect()
    }

    /// Seams between chunks, where arithmetic on positions goes wrong first.
    fn edges(n: u64) -> Vec<u64> {
        let c = CHUNK as u64;
        let mut edges = vec![0, 1, c - 1, c, c + 1, 2 * c - 1, 2 * c, 2 * c + 1, 3 * c, n - 1, n];
        edges.retain(|&k| k <= n);
        edges
    }

    #[test]
    fn snapshot_queries_across_chunk_edges() {
        let n = 3 * CHUNK as u64 + 10;
        let mut h = history(10_000);
        fill(&mut h, 1..=n, Instant::now());
        assert_eq!((h.sealed.len(), h.tail.len(), h.len()), (3, 10, n as usize));
        let snap = h.snapshot();
        for k in edges(n) {
            assert_eq!(snap.position((EPOCH, k)), Ok(k), "position {k}");
            assert_eq!(seqs(&snap.after(k, u64::MAX, usize::MAX, |_| true)), range(k + 1, n), "after {k}");
            assert_eq!(seqs(&snap.after(k, k + 2, usize::MAX, |_| true)), range(k + 1, (k + 2).min(n)), "upto {k}");
            assert_eq!(seqs(&snap.after(k, u64::MAX, 2, |_| true)), range(k + 1, (k + 2).min(n)), "limit {k}");
            if k > 0 {
                assert_eq!(snap.find((EPOCH, k)).map(|e| e.seq), Some(k), "find {k}");
                assert_eq!(h.find((EPOCH, k)).map(|e| e.seq), Some(k), "find live {k}");
                assert_eq!(seqs(&snap.newest(k, 3, |_| true)), range(k.saturating_sub(2).max(1), k), "newest {k}");
            }
        }
        let evens = snap.after(CHUNK as u64 - 3, 2 * CHUNK as u64 + 3, usize::MAX, |e| e.seq % 2 == 0);
        assert_eq!(seqs(&evens), (CHUNK as u64 - 2..=2 * CHUNK as u64 + 2).step_by(2).collect::<Vec<_>>());
        assert_eq!(seqs(&snap.newest(u64::MAX, 3, |e| e.seq % CHUNK as u64 == 0)), vec![256, 512, 768]);
        assert_eq!(snap.find((EPOCH, n + 1)).map(|e| e.seq), None);
        assert_eq!(snap.position((EPOCH, n + 1)), Err(NotRecoverable), "the future");
    }

    #[test]
    fn eviction_drops_whole_chunks_and_snapshots_keep_theirs() {
        let c = CHUNK as u64;
        let mut h = history(CHUNK + 10);
        fill(&mut h, 1..=4 * c, Instant::now());
        // Retained: the last CHUNK + 10, starting 10 before the end of the third chunk.
        let first = 3 * c - 9;
        assert_eq!((h.sealed.len(), h.skip, h.tail.len(), h.len()), (2, CHUNK - 10, 0, CHUNK + 10));
        let snap = h.snapshot();
        assert_eq!(snap.position((EPOCH, first - 2)), Err(NotRecoverable), "events after it were evicted");
        assert_eq!(snap.position((EPOCH, first - 1)), Ok(first - 1), "the newest evicted is the floor");
        assert_eq!(seqs(&snap.after(first - 1, u64::MAX, usize::MAX, |_| true)), range(first, 4 * c));
        assert_eq!(snap.position((EPOCH, 3 * c)), Ok(3 * c), "a chunk's last event");
        assert_eq!(seqs(&snap.after(3 * c, u64::MAX, usize::MAX, |_| true)), range(3 * c + 1, 4 * c));
        assert_eq!(seqs(&snap.newest(u64::MAX, usize::MAX, |_| true)), range(first, 4 * c));

        // The publisher moves on and evicts everything the snapshot holds.
        fill(&mut h, 4 * c + 1..=6 * c, Instant::now());
        assert_eq!(h.snapshot().position((EPOCH, 3 * c)), Err(NotRecoverable));
        assert_eq!(seqs(&h.snapshot().after(5 * c, u64::MAX, usize::MAX, |_| true)), range(5 * c + 1, 6 * c));
        assert_eq!(seqs(&snap.after(first - 1, u64::MAX, usize::MAX, |_| true)), range(first, 4 * c), "unchanged");
        assert_eq!(snap.last_key(), Some((EPOCH, 4 * c)));
    }

    #[test]
    fn matches_a_plain_window_for_every_retention() {
        for max_events in [1, 2, 3, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 1, 600] {
            let mut h = history(max_events);
            let now = Instant::now();
            for last in 1..=1100u64 {
                fill(&mut h, last..=last, now);
                let first = last.saturating_sub(max_events as u64) + 1;
                if last % 7 != 0 && last < 1090 {
                    continue;
                }
                let snap = h.snapshot();
                let all = seqs(&snap.after(first - 1, u64::MAX, usize::MAX, |_| true));
                assert_eq!(all, range(first, last), "max {max_events} at {last}");
                assert_eq!(seqs(&snap.newest(u64::MAX, usize::MAX, |_| true)), all);
                assert_eq!((snap.len(), h.len()), (all.len(), all.len()));
                assert_eq!(snap.last_key(), Some((EPOCH, last)));
                for k in first.saturating_sub(2)..=(first + 1).min(last) {
                    let want = if k + 1 >= first { Ok(k) } else { Err(NotRecoverable) };
                    assert_eq!(snap.position((EPOCH, k)), want, "max {max_events} at {last}: position {k}");
                }
            }
        }
    }

    #[test]
    fn age_and_byte_bounds() {
        let start = Instant::now();
        let one = test_event(512, (EPOCH, 512), start).retained_bytes(); // ids of 510..=512 are as long
        let retention = Retention { max_events: 10_000, max_age: Duration::from_secs(10), max_bytes: 3 * one + 1 };
        let mut h = History::new(retention);
        fill(&mut h, 1..=2 * CHUNK as u64, start);
        assert_eq!((h.len(), h.bytes()), (3, 3 * one));
        h.evict(start + Duration::from_secs(11));
        assert!(h.is_empty() && h.bytes() == 0 && h.snapshot().is_empty());
        let last = 2 * CHUNK as u64;
        assert_eq!(h.last_key(), Some((EPOCH, last)), "the floor stands in for the last key");
        assert_eq!(h.snapshot().position((EPOCH, last)), Ok(last), "caught up: nothing to replay");
        assert_eq!(h.snapshot().position((EPOCH, last - 1)), Err(NotRecoverable));
        fill(&mut h, last + 1..=last + 1, start + Duration::from_secs(11));
        assert_eq!(seqs(&h.snapshot().after(last, u64::MAX, usize::MAX, |_| true)), vec![last + 1]);
    }
}
