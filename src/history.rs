//! The retained log of recent events, for resume (`since`, `Last-Event-ID`) and `/history`.
//!
//! Owns a ring of shared [`Event`]s bounded by count, age and bytes, and the rule for
//! when a position can be recovered. Events are contiguous by sequence number, so finding
//! a position is arithmetic, not a search. It never encodes or copies an event; it is
//! only ever touched inside the bus's publish critical section or a reader's short one.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bus::Event;

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

/// The retained log.
#[derive(Debug)]
pub struct History {
    events: VecDeque<Arc<Event>>,
    bytes: usize,
    retention: Retention,
    /// Positions with a key below this cannot be resumed: the key of the newest event
    /// evicted, or of the first event a joining node loaded.
    floor: Option<(u64, u64)>,
    /// Sequence of the newest event ever pushed (0: none).
    last_seq: u64,
}

/// A resume position that the log can no longer (or never could) serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRecoverable;

impl History {
    /// An empty log.
    pub fn new(retention: Retention) -> Self {
        Self { events: VecDeque::new(), bytes: 0, retention, floor: None, last_seq: 0 }
    }

    /// Appends the next event in sequence, evicting what the bounds no longer allow.
    pub fn push(&mut self, event: Arc<Event>, now: Instant) {
        self.last_seq = event.seq;
        self.bytes += event.retained_bytes();
        self.events.push_back(event);
        self.evict(now);
    }

    /// Drops events over the count, byte or age bound.
    pub fn evict(&mut self, now: Instant) {
        while let Some(front) = self.events.front() {
            let too_many = self.events.len() > self.retention.max_events || self.bytes > self.retention.max_bytes;
            let too_old = now.saturating_duration_since(front.published_at) > self.retention.max_age;
            if !(too_many || too_old) {
                break;
            }
            self.bytes -= front.retained_bytes();
            self.floor = Some(front.key);
            self.events.pop_front();
        }
    }

    /// Sequence of the newest event published (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Events retained.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Encoded bytes retained.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Key of the newest event.
    pub fn last_key(&self) -> Option<(u64, u64)> {
        self.events.back().map(|e| e.key).or(self.floor)
    }

    /// Marks everything before the first retained event as unrecoverable (a joining node
    /// has loaded what the cluster retains and nothing older).
    pub fn mark_caught_up(&mut self) {
        if let Some(front) = self.events.front() {
            self.floor = Some(self.floor.map_or(front.key, |f| f.max(front.key)));
        }
    }

    /// The sequence of the last event at or before `key`: where a client that saw `key`
    /// resumes. Fails when events after it were evicted, or `key` is in the future.
    pub fn position(&self, key: (u64, u64)) -> Result<u64, NotRecoverable> {
        if self.floor.is_some_and(|floor| key < floor) || self.last_key().is_none_or(|last| key > last) {
            return Err(NotRecoverable);
        }
        let at_or_before = self.events.partition_point(|e| e.key <= key);
        Ok(match at_or_before.checked_sub(1).and_then(|i| self.events.get(i)) {
            Some(event) => event.seq,
            None => self.events.front().map_or(self.last_seq, |front| front.seq - 1),
        })
    }

    /// The retained event with exactly `key`.
    pub fn find(&self, key: (u64, u64)) -> Option<&Arc<Event>> {
        let i = self.events.partition_point(|e| e.key < key);
        self.events.get(i).filter(|e| e.key == key)
    }

    /// Events after sequence `since` up to and including `upto`, oldest first, that
    /// `keep` accepts, at most `limit`.
    pub fn after(&self, since: u64, upto: u64, limit: usize, mut keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        let Some(front) = self.events.front() else { return Vec::new() };
        let start = (since + 1).saturating_sub(front.seq) as usize;
        self.events.iter().skip(start).take_while(|e| e.seq <= upto).filter(|e| keep(e)).take(limit).cloned().collect()
    }

    /// The newest `limit` events up to `upto` that `keep` accepts, oldest first.
    pub fn newest(&self, upto: u64, limit: usize, mut keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        let mut out: Vec<_> =
            self.events.iter().rev().filter(|e| e.seq <= upto && keep(e)).take(limit).cloned().collect();
        out.reverse();
        out
    }
}
