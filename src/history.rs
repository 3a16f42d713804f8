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
    /// Sequence of the newest event ever evicted (0: none).
    evicted_through: u64,
    /// Sequence of the newest event ever pushed (0: none).
    last_seq: u64,
}

/// A resume position that the log can no longer (or never could) serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRecoverable;

impl History {
    /// An empty log.
    pub fn new(retention: Retention) -> Self {
        Self { events: VecDeque::new(), bytes: 0, retention, evicted_through: 0, last_seq: 0 }
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
            self.evicted_through = front.seq;
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

    /// Events after `since` up to and including `upto`, oldest first, that `keep` accepts,
    /// at most `limit`. Fails when an event after `since` was already evicted or `since`
    /// names an event not published yet.
    pub fn after(
        &self,
        since: u64,
        upto: u64,
        limit: usize,
        mut keep: impl FnMut(&Event) -> bool,
    ) -> Result<Vec<Arc<Event>>, NotRecoverable> {
        if since < self.evicted_through || since > self.last_seq {
            return Err(NotRecoverable);
        }
        let Some(front) = self.events.front() else { return Ok(Vec::new()) };
        let start = (since + 1).saturating_sub(front.seq) as usize;
        Ok(self
            .events
            .iter()
            .skip(start)
            .take_while(|e| e.seq <= upto)
            .filter(|e| keep(e))
            .take(limit)
            .cloned()
            .collect())
    }

    /// The newest `limit` events up to `upto` that `keep` accepts, oldest first.
    pub fn newest(&self, upto: u64, limit: usize, mut keep: impl FnMut(&Event) -> bool) -> Vec<Arc<Event>> {
        let mut out: Vec<_> =
            self.events.iter().rev().filter(|e| e.seq <= upto && keep(e)).take(limit).cloned().collect();
        out.reverse();
        out
    }
}
