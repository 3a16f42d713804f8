//! Placement of topics on the logical shards of a sharded engine: the first step of the
//! sharded engine (docs/architecture.md, "Past one Redis").
//!
//! Owns the shard key of a topic (its first `shard_key_segments` segments), the jump
//! consistent hash that maps a key to one of `engine_shards` logical shards (Lamping and
//! Veach, "A Fast, Minimal Memory, Consistent Hash Algorithm", 2014), and which shards a
//! subscription pattern can match. It must stay a pure function of its inputs, identical on
//! every node and across versions: the 64-bit key hash is FNV-1a, not std's randomized
//! hasher.

use std::hash::Hasher;

use crate::topic::Pattern;

/// Where topics go: `shards` logical shards, keyed by the first `key_segments` segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    shards: u32,
    key_segments: usize,
}

/// The shards a pattern can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    /// Exactly this one: the pattern's shard key is literal.
    One(u32),
    /// Any of them: a wildcard sits inside the shard key.
    All,
}

impl Placement {
    /// `shards` logical shards (at least 1), keyed by `key_segments` segments (at least 1).
    pub fn new(shards: u32, key_segments: usize) -> Self {
        Self { shards: shards.max(1), key_segments: key_segments.max(1) }
    }

    /// Logical shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The shard key of a concrete topic: its first `key_segments` segments (the whole
    /// topic when it has fewer).
    pub fn key<'t>(&self, topic: &'t str) -> &'t str {
        match topic.match_indices('.').nth(self.key_segments - 1) {
            Some((at, _)) => &topic[..at],
            None => topic,
        }
    }

    /// The logical shard of a concrete topic.
    pub fn shard_of(&self, topic: &str) -> u32 {
        let mut hasher = fnv::FnvHasher::default();
        hasher.write(self.key(topic).as_bytes());
        jump(hasher.finish(), self.shards)
    }

    /// The shards whose topics `pattern` can match.
    pub fn shards_of(&self, pattern: &Pattern) -> Shards {
        let text = pattern.as_str();
        let segments: Vec<&str> = text.split('.').collect();
        let key_is_literal = segments.iter().take(self.key_segments).all(|s| *s != "*" && *s != ">");
        // A pattern shorter than the key matches topics of its own length only if exact.
        let long_enough = segments.len() >= self.key_segments || pattern.is_exact();
        if key_is_literal && long_enough { Shards::One(self.shard_of(text)) } else { Shards::All }
    }
}

/// Jump consistent hash: the bucket in `0..buckets` of `key`. Growing `buckets` by one moves
/// only the keys that land in the new bucket (about 1/buckets of them).
pub fn jump(mut key: u64, buckets: u32) -> u32 {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_matches_the_papers_reference_implementation() {
        // What the paper's listing (`JumpConsistentHash`), compiled with gcc, gives.
        assert_eq!(jump(0, 1), 0);
        assert_eq!(jump(0, 100), 0);
        assert_eq!(jump(1, 100), 55);
        assert_eq!(jump(2, 100), 62);
        assert_eq!(jump(0xdead_beef, 10), 5);
        assert_eq!(jump(123_456_789, 1000), 294);
    }

    #[test]
    fn growing_by_one_bucket_moves_only_keys_into_it() {
        let keys: Vec<u64> = (0..10_000u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let moved = keys.iter().filter(|k| jump(**k, 8) != jump(**k, 9)).count();
        assert!(keys.iter().all(|k| jump(*k, 8) == jump(*k, 9) || jump(*k, 9) == 8));
        // About 1/9 of them.
        assert!((900..=1350).contains(&moved), "{moved} moved");
    }

    #[test]
    fn keys_spread_evenly_and_share_a_shard_by_prefix() {
        let placement = Placement::new(4, 1);
        let mut per_shard = [0usize; 4];
        for i in 0..400 {
            per_shard[placement.shard_of(&format!("key{i}.x")) as usize] += 1;
        }
        assert!(per_shard.iter().all(|n| (80..=120).contains(n)), "{per_shard:?}");
        assert_eq!(placement.shard_of("chat.room1"), placement.shard_of("chat.room2"));
        assert_eq!(placement.key("chat.room1.x"), "chat");
        assert_eq!(Placement::new(4, 2).key("chat.room1.x"), "chat.room1");
        assert_eq!(Placement::new(4, 2).key("chat"), "chat");
    }

    #[test]
    fn a_pattern_names_one_shard_only_when_its_key_is_literal() {
        let placement = Placement::new(16, 1);
        let pattern = |p: &str| placement.shards_of(&Pattern::parse(p).unwrap());
        assert_eq!(pattern("chat.*"), Shards::One(placement.shard_of("chat.room1")));
        assert_eq!(pattern("chat.>"), Shards::One(placement.shard_of("chat.x")));
        assert_eq!(pattern("chat"), Shards::One(placement.shard_of("chat")));
        assert_eq!(pattern("*.room1"), Shards::All);
        assert_eq!(pattern(">"), Shards::All);
        let two = Placement::new(16, 2);
        assert_eq!(two.shards_of(&Pattern::parse("chat.*").unwrap()), Shards::All);
        assert_eq!(two.shards_of(&Pattern::parse("chat.room1.>").unwrap()), Shards::One(two.shard_of("chat.room1.x")));
        assert_eq!(two.shards_of(&Pattern::parse("chat").unwrap()), Shards::One(two.shard_of("chat")));
        assert_eq!(two.shards_of(&Pattern::parse("chat.>").unwrap()), Shards::All);
    }
}
