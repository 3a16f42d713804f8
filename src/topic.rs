//! Topics, patterns and the per-shard subscription index.
//!
//! Owns the grammar of topics and patterns from docs/protocol.md (validation and matching) and
//! the [`Index`] a shard uses to find the subscriptions an event's topic matches: exact
//! topics by hash, patterns by a trie over segments, so a lookup costs what matches, not
//! what is subscribed. Each topic's or pattern's subscribers are a [`KeyList`], so a
//! subscriber leaving costs O(1) amortized however many share the topic. It knows nothing
//! of connections beyond an opaque copyable, hashable key, and never touches sockets, the
//! bus or filters other than the topic.

use std::collections::HashMap;
use std::hash::Hash;

/// Longest topic or pattern, in bytes.
pub const MAX_TOPIC_BYTES: usize = 255;

/// Why a topic or pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Zero bytes, or over [`MAX_TOPIC_BYTES`].
    #[error("must be 1 to 255 bytes")]
    Length,
    /// `a..b`, `.a` or `a.`.
    #[error("empty segment")]
    EmptySegment,
    /// A byte outside `[A-Za-z0-9_:@/-]`.
    #[error("invalid character {0:?}")]
    InvalidChar(char),
    /// `*` or `>` in a topic, inside a segment, or `>` before the last segment.
    #[error("misplaced wildcard")]
    Wildcard,
}

fn valid_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b':' | b'@' | b'/' | b'-')
}

fn check_shape(s: &str) -> Result<(), TopicError> {
    if s.is_empty() || s.len() > MAX_TOPIC_BYTES {
        return Err(TopicError::Length);
    }
    Ok(())
}

/// Checks that `topic` is a concrete topic (no wildcards).
pub fn validate_topic(topic: &str) -> Result<(), TopicError> {
    check_shape(topic)?;
    for segment in topic.split('.') {
        check_literal(segment)?;
    }
    Ok(())
}

fn check_literal(segment: &str) -> Result<(), TopicError> {
    if segment.is_empty() {
        return Err(TopicError::EmptySegment);
    }
    match segment.bytes().find(|&b| !valid_segment_byte(b)) {
        None => Ok(()),
        Some(b'*' | b'>') => Err(TopicError::Wildcard),
        Some(b) => Err(TopicError::InvalidChar(b as char)),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Box<str>),
    /// `*`: exactly one segment.
    Any,
    /// `>` (last only): one or more trailing segments.
    Tail,
}

/// A validated subscription pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    segments: Vec<Segment>,
}

impl Pattern {
    /// Parses and validates a pattern.
    pub fn parse(text: &str) -> Result<Self, TopicError> {
        check_shape(text)?;
        let count = text.split('.').count();
        let mut segments = Vec::with_capacity(count);
        for (i, segment) in text.split('.').enumerate() {
            segments.push(match segment {
                "*" => Segment::Any,
                ">" if i + 1 == count => Segment::Tail,
                ">" => return Err(TopicError::Wildcard),
                literal => {
                    check_literal(literal)?;
                    Segment::Literal(literal.into())
                }
            });
        }
        Ok(Self { text: text.into(), segments })
    }

    /// The pattern matching every topic.
    pub fn everything() -> Self {
        Self { text: ">".into(), segments: vec![Segment::Tail] }
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the pattern has no wildcard.
    pub fn is_exact(&self) -> bool {
        self.segments.iter().all(|s| matches!(s, Segment::Literal(_)))
    }

    /// Whether `topic` (assumed valid) matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut parts = topic.split('.');
        for segment in &self.segments {
            match segment {
                Segment::Tail => return parts.next().is_some(),
                Segment::Any => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Segment::Literal(lit) => {
                    if parts.next() != Some(lit) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Whether every topic this pattern matches is also matched by `other`
    /// (used to check a subscription against the patterns a token allows).
    pub fn is_covered_by(&self, other: &Pattern) -> bool {
        let mut mine = self.segments.iter();
        for theirs in &other.segments {
            match (theirs, mine.next()) {
                (Segment::Tail, Some(_)) => return true,
                (Segment::Any, Some(Segment::Literal(_) | Segment::Any)) => {}
                (Segment::Literal(a), Some(Segment::Literal(b))) if a == b => {}
                _ => return false,
            }
        }
        mine.next().is_none()
    }
}

#[derive(Debug)]
struct TrieNode<K> {
    literal: HashMap<Box<str>, TrieNode<K>>,
    any: Option<Box<TrieNode<K>>>,
    /// Keys whose pattern ends here.
    here: KeyList<K>,
    /// Keys whose pattern ends here with `>`.
    tail: KeyList<K>,
}

impl<K> Default for TrieNode<K> {
    fn default() -> Self {
        Self { literal: HashMap::new(), any: None, here: KeyList::default(), tail: KeyList::default() }
    }
}

impl<K> TrieNode<K> {
    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.any.is_none() && self.here.is_empty() && self.tail.is_empty()
    }
}

/// Maps topics to the keys subscribed to a pattern matching them.
///
/// A key may be inserted under several patterns; [`Index::for_each_match`] then yields it
/// once per matching pattern and the caller deduplicates (the shard does it with a
/// per-connection sequence stamp, without a set).
#[derive(Debug)]
pub struct Index<K> {
    exact: HashMap<Box<str>, KeyList<K>>,
    root: TrieNode<K>,
    len: usize,
}

impl<K> Default for Index<K> {
    fn default() -> Self {
        Self { exact: HashMap::new(), root: TrieNode::default(), len: 0 }
    }
}

impl<K: Copy + Eq + Hash> Index<K> {
    /// Number of (pattern, key) entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `key` under `pattern`.
    pub fn insert(&mut self, pattern: &Pattern, key: K) {
        self.len += 1;
        if pattern.is_exact() {
            self.exact.entry(pattern.as_str().into()).or_default().insert(key);
            return;
        }
        let mut node = &mut self.root;
        for segment in &pattern.segments {
            node = match segment {
                Segment::Literal(lit) => node.literal.entry(lit.clone()).or_default(),
                Segment::Any => node.any.get_or_insert_with(Default::default),
                Segment::Tail => {
                    node.tail.insert(key);
                    return;
                }
            };
        }
        node.here.insert(key);
    }

    /// Removes one entry of `key` under `pattern`; returns whether it was there.
    pub fn remove(&mut self, pattern: &Pattern, key: K) -> bool {
        let removed = if pattern.is_exact() {
            match self.exact.get_mut(pattern.as_str()) {
                Some(keys) => {
                    let removed = keys.remove(key);
                    if keys.is_empty() {
                        self.exact.remove(pattern.as_str());
                    }
                    removed
                }
                None => false,
            }
        } else {
            remove_from_trie(&mut self.root, &pattern.segments, key)
        };
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Calls `f` for every entry whose pattern matches `topic`.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(K)) {
        if let Some(keys) = self.exact.get(topic) {
            keys.as_slice().iter().copied().for_each(&mut f);
        }
        if !self.root.is_empty() {
            walk(&self.root, topic.split('.'), &mut f);
        }
    }
}

fn walk<K: Copy>(node: &TrieNode<K>, mut rest: std::str::Split<'_, char>, f: &mut impl FnMut(K)) {
    let Some(first) = rest.next() else {
        node.here.as_slice().iter().copied().for_each(f);
        return;
    };
    node.tail.as_slice().iter().copied().for_each(&mut *f);
    if let Some(child) = node.literal.get(first) {
        walk(child, rest.clone(), f);
    }
    if let Some(child) = &node.any {
        walk(child, rest, f);
    }
}

fn remove_from_trie<K: Copy + Eq + Hash>(node: &mut TrieNode<K>, segments: &[Segment], key: K) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return node.here.remove(key);
    };
    match first {
        Segment::Tail => node.tail.remove(key),
        Segment::Any => {
            let Some(child) = node.any.as_mut() else { return false };
            let removed = remove_from_trie(child, rest, key);
            if child.is_empty() {
                node.any = None;
            }
            removed
        }
        Segment::Literal(lit) => {
            let Some(child) = node.literal.get_mut(lit) else { return false };
            let removed = remove_from_trie(child, rest, key);
            if child.is_empty() {
                node.literal.remove(lit);
            }
            removed
        }
    }
}

/// Lists up to this long are scanned: cheaper than hashing, and no map to keep.
const SCAN_UP_TO: usize = 16;

/// The keys under one topic or pattern, in no particular order: a contiguous slice to
/// iterate (the fan-out path) and, past [`SCAN_UP_TO`] keys, a map from each key to its
/// places in it, kept in step through `swap_remove`, so removing one is O(1) amortized
/// instead of a scan (N subscribers of one topic leaving was O(N²)).
///
/// A key may be in the list more than once (inserted twice); each removal takes away one
/// occurrence, as a plain `Vec` with `position` + `swap_remove` did.
#[derive(Debug)]
pub struct KeyList<K> {
    keys: Vec<K>,
    /// Where each key is in `keys`; `None` while the list is short enough to scan.
    places: Option<HashMap<K, Places>>,
}

/// Where one key is in a [`KeyList`]: nearly always once.
#[derive(Debug)]
enum Places {
    One(usize),
    Many(Vec<usize>),
}

impl Places {
    fn add(&mut self, at: usize) {
        match self {
            Places::One(first) => *self = Places::Many(vec![*first, at]),
            Places::Many(all) => all.push(at),
        }
    }

    /// Records that the occurrence at `from` moved to `to`.
    fn moved(&mut self, from: usize, to: usize) {
        match self {
            Places::One(at) => *at = to,
            Places::Many(all) => {
                if let Some(at) = all.iter_mut().find(|at| **at == from) {
                    *at = to;
                }
            }
        }
    }
}

impl<K> Default for KeyList<K> {
    fn default() -> Self {
        Self { keys: Vec::new(), places: None }
    }
}

impl<K> KeyList<K> {
    /// The keys, contiguous.
    pub fn as_slice(&self) -> &[K] {
        &self.keys
    }

    /// Number of entries (a key inserted twice counts twice).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the list is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

impl<K: Copy + Eq + Hash> KeyList<K> {
    /// Adds one entry of `key`.
    pub fn insert(&mut self, key: K) {
        let at = self.keys.len();
        self.keys.push(key);
        match &mut self.places {
            Some(places) => match places.get_mut(&key) {
                Some(p) => p.add(at),
                None => {
                    places.insert(key, Places::One(at));
                }
            },
            None if self.keys.len() > SCAN_UP_TO => self.places = Some(index_places(&self.keys)),
            None => {}
        }
    }

    /// Removes one entry of `key`; returns whether there was one.
    pub fn remove(&mut self, key: K) -> bool {
        let Some(places) = &mut self.places else {
            let Some(at) = self.keys.iter().position(|k| *k == key) else { return false };
            self.keys.swap_remove(at);
            return true;
        };
        let at = match places.get_mut(&key) {
            None => return false,
            Some(Places::One(at)) => {
                let at = *at;
                places.remove(&key);
                at
            }
            Some(Places::Many(all)) => {
                // The last place, so a list of one left behind is the common shape again.
                let Some(at) = all.pop() else { return false };
                if let [only] = all[..] {
                    places.insert(key, Places::One(only));
                }
                at
            }
        };
        let last = self.keys.len() - 1;
        self.keys.swap_remove(at);
        if at != last {
            let moved = self.keys[at];
            if let Some(p) = places.get_mut(&moved) {
                p.moved(last, at);
            }
        }
        // Hysteresis: a list hovering around the threshold does not rebuild its map.
        if self.keys.len() <= SCAN_UP_TO / 2 {
            self.places = None;
        }
        true
    }
}

fn index_places<K: Copy + Eq + Hash>(keys: &[K]) -> HashMap<K, Places> {
    let mut places: HashMap<K, Places> = HashMap::with_capacity(keys.len());
    for (at, key) in keys.iter().enumerate() {
        match places.get_mut(key) {
            Some(p) => p.add(at),
            None => {
                places.insert(*key, Places::One(at));
            }
        }
    }
    places
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_grammar() {
        assert!(validate_topic("chat.room1").is_ok());
        assert!(validate_topic("a:b@c/d-e_f").is_ok());
        assert_eq!(validate_topic(""), Err(TopicError::Length));
        assert_eq!(validate_topic(&"a".repeat(256)), Err(TopicError::Length));
        assert_eq!(validate_topic("a..b"), Err(TopicError::EmptySegment));
        assert_eq!(validate_topic(".a"), Err(TopicError::EmptySegment));
        assert_eq!(validate_topic("a."), Err(TopicError::EmptySegment));
        assert_eq!(validate_topic("a.*"), Err(TopicError::Wildcard));
        assert_eq!(validate_topic("a b"), Err(TopicError::InvalidChar(' ')));
    }

    #[test]
    fn pattern_grammar_and_matching() {
        assert!(Pattern::parse("a*").is_err());
        assert!(Pattern::parse("a.>.b").is_err());
        assert!(Pattern::parse("a.b>").is_err());
        let star = Pattern::parse("chat.*").unwrap();
        assert!(star.matches("chat.x"));
        assert!(!star.matches("chat"));
        assert!(!star.matches("chat.x.y"));
        let tail = Pattern::parse("chat.>").unwrap();
        assert!(tail.matches("chat.x") && tail.matches("chat.x.y"));
        assert!(!tail.matches("chat"));
        assert!(Pattern::parse(">").unwrap().matches("anything.at.all"));
    }

    #[test]
    fn coverage() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("chat.room1").is_covered_by(&p("chat.*")));
        assert!(p("chat.*").is_covered_by(&p("chat.>")));
        assert!(!p("chat.>").is_covered_by(&p("chat.*")));
        assert!(p("a.b.c").is_covered_by(&p(">")));
        assert!(!p("chat.*").is_covered_by(&p("chat.room1")));
    }

    #[test]
    fn index_matches_what_patterns_match() {
        let patterns = ["a.b", "a.*", "a.>", "*.b", ">", "a.b.c", "*.*.c", "x"];
        let mut index = Index::default();
        for (i, p) in patterns.iter().enumerate() {
            index.insert(&Pattern::parse(p).unwrap(), i);
        }
        for topic in ["a.b", "a", "a.b.c", "x", "q.b", "z.y.c"] {
            let mut got = Vec::new();
            index.for_each_match(topic, |k| got.push(k));
            got.sort();
            let want: Vec<_> =
                (0..patterns.len()).filter(|&i| Pattern::parse(patterns[i]).unwrap().matches(topic)).collect();
            assert_eq!(got, want, "topic {topic}");
        }
        for (i, p) in patterns.iter().enumerate() {
            assert!(index.remove(&Pattern::parse(p).unwrap(), i));
        }
        assert!(index.is_empty() && index.root.is_empty() && index.exact.is_empty());
    }

    /// A tiny deterministic generator (xorshift64), so the test needs no dependency.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    fn check(list: &KeyList<u32>, model: &[u32]) {
        let mut got = list.as_slice().to_vec();
        let mut want = model.to_vec();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want);
        if let Some(places) = &list.places {
            for (at, key) in list.keys.iter().enumerate() {
                let listed = match &places[key] {
                    Places::One(p) => vec![*p],
                    Places::Many(all) => all.clone(),
                };
                assert!(listed.contains(&at), "{key} at {at} is not in its places {listed:?}");
            }
            assert_eq!(
                places.values().map(|p| if let Places::Many(a) = p { a.len() } else { 1 }).sum::<usize>(),
                list.len()
            );
        }
    }

    #[test]
    fn key_list_agrees_with_a_plain_vec_through_the_threshold_and_duplicates() {
        let mut state = 0x9e37_79b9_7f4a_7c15;
        for keys in [4u64, 40, 400] {
            let mut list = KeyList::default();
            let mut model: Vec<u32> = Vec::new();
            for step in 0..20_000 {
                // Grow for a while, then shrink, so the list crosses the threshold both ways.
                let grow = (step / 2_000) % 2 == 0;
                let key = (next(&mut state) % keys) as u32;
                let insert = !next(&mut state).is_multiple_of(3); // two in three
                if insert == grow {
                    list.insert(key);
                    model.push(key);
                } else {
                    let want = model.iter().position(|k| *k == key).map(|i| model.swap_remove(i)).is_some();
                    assert_eq!(list.remove(key), want, "step {step}: remove {key}");
                }
                if step % 97 == 0 {
                    check(&list, &model);
                }
            }
            check(&list, &model);
            for key in model.drain(..) {
                assert!(list.remove(key));
            }
            assert!(list.is_empty() && list.places.is_none());
        }
    }

    #[test]
    fn many_subscribers_of_one_topic_leave_in_any_order() {
        let exact = Pattern::parse("chat.room1").unwrap();
        let star = Pattern::parse("chat.*").unwrap();
        let mut index = Index::default();
        for key in 0..1000usize {
            index.insert(&exact, key);
            index.insert(&star, key);
        }
        index.insert(&exact, 7); // 7 twice under one pattern: two entries, two matches
        let count = |index: &Index<usize>| {
            let mut n = 0;
            index.for_each_match("chat.room1", |_| n += 1);
            n
        };
        assert_eq!((index.len(), count(&index)), (2001, 2001));
        for key in (0..1000).rev().chain([7]) {
            assert!(index.remove(&exact, key), "exact {key}");
        }
        assert!(!index.remove(&exact, 7), "both entries of 7 are gone");
        for key in (0..1000).step_by(2).chain((1..1000).step_by(2)) {
            assert!(index.remove(&star, key), "pattern {key}");
        }
        assert!(index.is_empty() && index.root.is_empty() && index.exact.is_empty());
    }
}
