//! Topics, patterns and the per-shard subscription index.
//!
//! Owns the grammar of topics and patterns from PROTOCOL.md (validation and matching) and
//! the [`Index`] a shard uses to find the subscriptions an event's topic matches: exact
//! topics by hash, patterns by a trie over segments, so a lookup costs what matches, not
//! what is subscribed. It knows nothing of connections beyond an opaque copyable key, and
//! never touches sockets, the bus or filters other than the topic.

use std::collections::HashMap;

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
    here: Vec<K>,
    /// Keys whose pattern ends here with `>`.
    tail: Vec<K>,
}

impl<K> Default for TrieNode<K> {
    fn default() -> Self {
        Self { literal: HashMap::new(), any: None, here: Vec::new(), tail: Vec::new() }
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
    exact: HashMap<Box<str>, Vec<K>>,
    root: TrieNode<K>,
    len: usize,
}

impl<K> Default for Index<K> {
    fn default() -> Self {
        Self { exact: HashMap::new(), root: TrieNode::default(), len: 0 }
    }
}

impl<K: Copy + PartialEq> Index<K> {
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
            self.exact.entry(pattern.as_str().into()).or_default().push(key);
            return;
        }
        let mut node = &mut self.root;
        for segment in &pattern.segments {
            node = match segment {
                Segment::Literal(lit) => node.literal.entry(lit.clone()).or_default(),
                Segment::Any => node.any.get_or_insert_with(Default::default),
                Segment::Tail => {
                    node.tail.push(key);
                    return;
                }
            };
        }
        node.here.push(key);
    }

    /// Removes one entry of `key` under `pattern`; returns whether it was there.
    pub fn remove(&mut self, pattern: &Pattern, key: K) -> bool {
        let removed = if pattern.is_exact() {
            match self.exact.get_mut(pattern.as_str()) {
                Some(keys) => {
                    let removed = remove_one(keys, key);
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
            keys.iter().copied().for_each(&mut f);
        }
        if !self.root.is_empty() {
            walk(&self.root, topic.split('.'), &mut f);
        }
    }
}

fn walk<K: Copy>(node: &TrieNode<K>, mut rest: std::str::Split<'_, char>, f: &mut impl FnMut(K)) {
    let Some(first) = rest.next() else {
        node.here.iter().copied().for_each(f);
        return;
    };
    node.tail.iter().copied().for_each(&mut *f);
    if let Some(child) = node.literal.get(first) {
        walk(child, rest.clone(), f);
    }
    if let Some(child) = &node.any {
        walk(child, rest, f);
    }
}

fn remove_one<K: PartialEq>(keys: &mut Vec<K>, key: K) -> bool {
    match keys.iter().position(|k| *k == key) {
        Some(i) => {
            keys.swap_remove(i);
            true
        }
        None => false,
    }
}

fn remove_from_trie<K: PartialEq>(node: &mut TrieNode<K>, segments: &[Segment], key: K) -> bool {
    let Some((first, rest)) = segments.split_first() else {
        return remove_one(&mut node.here, key);
    };
    match first {
        Segment::Tail => remove_one(&mut node.tail, key),
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
}
