//! Which shards of a sharded engine this node's subscriptions can match, so a node reads
//! only those (docs/architecture.md, "Past one Redis").
//!
//! The shard cores count every pattern they index (an exact topic, or a pattern whose
//! shard-key segments are literal, names one shard; a wildcard among them names all);
//! each shard's engine reader waits while its count is zero and starts when it is not.
//! A subscription made while its shard is not read asks for live events from its own
//! moment (less a clock-skew allowance), so the reader that starts for it delivers what
//! was published since, not only what comes after it has started: no gap. Counters are
//! atomics, written by the cores and read by the readers; there is nothing to queue, so
//! nothing to bound. Owns the counts and those start requests; it must not touch the
//! bus, the engine's connections or a connection.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::placement::{Placement, Shards};
use crate::topic::Pattern;

/// How far a node's clock may be ahead of a Redis server's: a subscription made while its
/// shard is not read takes live events from this much before it (it may get a few events
/// published just before it subscribed, never miss one published after).
pub const SKEW_ALLOWANCE_MS: u64 = 1000;

/// Interest of this node in each shard.
#[derive(Debug)]
pub struct Interest {
    placement: Placement,
    /// Per shard: indexed patterns that can only match it.
    counts: Box<[AtomicU32]>,
    /// Indexed patterns that can match any shard.
    all: AtomicU32,
    /// Per shard: its reader delivers live events (a new subscription is covered).
    reading: Box<[AtomicBool]>,
    /// Per shard: the earliest wall-clock millisecond a subscription made while the shard
    /// was not read wants live events from (`u64::MAX`: none).
    wanted_from: Box<[AtomicU64]>,
}

impl Interest {
    /// No interest yet in any of `placement`'s shards.
    pub fn new(placement: Placement) -> Self {
        let shards = placement.shards() as usize;
        Self {
            placement,
            counts: (0..shards).map(|_| AtomicU32::new(0)).collect(),
            all: AtomicU32::new(0),
            reading: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            wanted_from: (0..shards).map(|_| AtomicU64::new(u64::MAX)).collect(),
        }
    }

    /// The shards `patterns` can match.
    pub fn shards_of<'p>(&self, patterns: impl IntoIterator<Item = &'p Pattern>) -> Vec<u32> {
        let mut shards: Vec<u32> = Vec::new();
        for pattern in patterns {
            match self.placement.shards_of(pattern) {
                Shards::One(shard) => shards.push(shard),
                Shards::All => return (0..self.placement.shards()).collect(),
            }
        }
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// A pattern was indexed at wall-clock millisecond `wall_ms`.
    pub fn add(&self, pattern: &Pattern, wall_ms: u64) {
        let from = wall_ms.saturating_sub(SKEW_ALLOWANCE_MS);
        let shards = match self.placement.shards_of(pattern) {
            Shards::One(shard) => {
                self.counts[shard as usize].fetch_add(1, Ordering::SeqCst);
                shard..shard + 1
            }
            Shards::All => {
                self.all.fetch_add(1, Ordering::SeqCst);
                0..self.placement.shards()
            }
        };
        for shard in shards {
            // Asked after the count is up, so a reader that sees the count either sees
            // this request or was reading already.
            if !self.reading[shard as usize].load(Ordering::SeqCst) {
                self.wanted_from[shard as usize].fetch_min(from, Ordering::SeqCst);
            }
        }
    }

    /// A pattern added with [`Interest::add`] was removed from the index.
    pub fn remove(&self, pattern: &Pattern) {
        let counter = match self.placement.shards_of(pattern) {
            Shards::One(shard) => &self.counts[shard as usize],
            Shards::All => &self.all,
        };
        // Never below zero, whatever a caller does.
        let _ = counter.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Whether some indexed pattern can match a topic of `shard`.
    pub fn wanted(&self, shard: u32) -> bool {
        self.all.load(Ordering::SeqCst) > 0 || self.counts[shard as usize].load(Ordering::SeqCst) > 0
    }

    /// The reader of `shard` starts delivering: the millisecond live delivery must start
    /// from (`None`: no subscription asked, e.g. only resumes waiting for the load).
    pub fn start(&self, shard: u32) -> Option<u64> {
        self.reading[shard as usize].store(true, Ordering::SeqCst);
        let from = self.wanted_from[shard as usize].swap(u64::MAX, Ordering::SeqCst);
        (from != u64::MAX).then_some(from)
    }

    /// The reader of `shard` stopped: subscriptions from now on ask again.
    pub fn stop(&self, shard: u32) {
        // An ask that raced with the start (made after it took the asks) was covered by
        // that reading: forget it, or the next start would deliver from then.
        self.wanted_from[shard as usize].store(u64::MAX, Ordering::SeqCst);
        self.reading[shard as usize].store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(p: &str) -> Pattern {
        Pattern::parse(p).unwrap()
    }

    #[test]
    fn literal_keys_want_one_shard_wildcards_want_all() {
        let placement = Placement::new(8, 1);
        let interest = Interest::new(placement);
        let p1 = placement.shard_of("p1.x");
        assert!((0..8).all(|s| !interest.wanted(s)));
        interest.add(&pattern("p1.>"), 10_000);
        assert!(interest.wanted(p1));
        assert_eq!((0..8).filter(|&s| interest.wanted(s)).count(), 1);
        interest.add(&pattern("*.x"), 10_000);
        assert!((0..8).all(|s| interest.wanted(s)));
        interest.remove(&pattern("*.x"));
        interest.remove(&pattern("p1.>"));
        interest.remove(&pattern("p1.>"));
        assert!((0..8).all(|s| !interest.wanted(s)), "never below zero");
        assert_eq!(interest.shards_of([&pattern("p1.a"), &pattern("p1.b")]), [p1]);
        assert_eq!(interest.shards_of([&pattern(">")]).len(), 8);
    }

    #[test]
    fn a_subscription_while_not_read_asks_for_events_from_its_moment() {
        let placement = Placement::new(2, 1);
        let interest = Interest::new(placement);
        let shard = placement.shard_of("a.x");
        interest.add(&pattern("a.x"), 50_000);
        interest.add(&pattern("a.y"), 40_000);
        assert_eq!(interest.start(shard), Some(40_000 - SKEW_ALLOWANCE_MS), "the earliest, less the allowance");
        interest.add(&pattern("a.z"), 60_000);
        assert_eq!(interest.start(shard), None, "covered: the reader was reading");
        interest.stop(shard);
        interest.add(&pattern("a.z"), 70_000);
        assert_eq!(interest.start(shard), Some(70_000 - SKEW_ALLOWANCE_MS));
    }
}
