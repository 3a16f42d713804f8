//! Presence: who is on a topic.
//!
//! Owns the node's presence registry: for each topic, one entry per connection subscribed
//! to it by its exact name, with the number of distinct users kept up to date as entries
//! come and go (so `presence_stats` is O(1) however many members a topic has). A
//! subscription through a pattern is not membership: a pattern names topics that may not
//! exist yet, and a member of `chat.*` would be present in every room at once. The registry
//! is changed on subscribe, unsubscribe and the core's one close path, never on the publish
//! or fan-out path; it is split over [`BUCKETS`] locks by topic, and a reader holds one for
//! as long as copying at most `presence_max_entries` entry handles takes. It does not know
//! connections, shards or the wire: the core says who joined and who left, and delivers
//! the [`Notice`]s it gets back.

use std::collections::HashMap;
use std::collections::hash_map::Entry as Slot;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// A random id for this process, telling its presence entries from other nodes'.
pub fn new_node_id() -> u64 {
    RandomState::new().hash_one(std::process::id()) | 1
}
use serde_json::value::RawValue;

/// Locks the registry is split over.
pub const BUCKETS: usize = 16;

/// Who a member is: the node (a random id per process) and the connection on it.
pub type MemberId = (u64, u64);

/// One member of a topic, as readers and notices show it (kept small: a topic's members
/// are many, so the ids and the time are numbers until shown).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The node the connection is on.
    pub node: u64,
    /// The connection (its `client_id` is this in hex, as told in its connect `ack`).
    pub conn_id: u64,
    /// The token's `sub`; `null` with auth off.
    pub user: Option<Box<str>>,
    /// The token's `info` claim, or the subscribe payload's `presence_info`.
    pub info: Option<Box<RawValue>>,
    /// `websocket` or `sse`.
    pub transport: Transport,
    /// When it joined, milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// How a member is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A WebSocket subscription.
    WebSocket,
    /// An SSE stream.
    Sse,
}

impl Entry {
    /// The entry as clients see it: `client_id`, `node`, `user`, `info`, `transport`, `since`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut since = String::new();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.since_ms);
        crate::protocol::push_timestamp(&mut since, at);
        serde_json::json!({
            "client_id": format!("{:x}", self.conn_id),
            "node": format!("{:x}", self.node),
            "user": self.user,
            "info": self.info,
            "transport": self.transport,
            "since": since,
        })
    }
}

/// A join or a leave, for the members who asked to hear of them.
#[derive(Debug)]
pub struct Notice {
    /// The topic.
    pub topic: Box<str>,
    /// Joined (else left).
    pub joined: bool,
    /// Who.
    pub entry: Arc<Entry>,
    /// This join made the topic occupied (its first member), or this leave vacated it.
    pub transition: bool,
}

impl Notice {
    /// The notice's payload: `{"action", "topic", "entry"}`.
    pub fn payload(&self) -> String {
        let action = if self.joined { "join" } else { "leave" };
        serde_json::json!({"action": action, "topic": &*self.topic, "entry": self.entry.to_json()}).to_string()
    }
}

#[derive(Debug, Default)]
struct Room {
    members: HashMap<MemberId, Member>,
    /// Members per user, for the distinct-user count.
    users: HashMap<Box<str>, u32>,
}

#[derive(Debug)]
struct Member {
    entry: Arc<Entry>,
    /// Subscriptions of the connection naming the topic (membership ends with the last).
    subscriptions: u32,
}

/// The registry.
#[derive(Debug)]
pub struct Presence {
    buckets: Vec<Mutex<HashMap<Box<str>, Room>>>,
    hasher: RandomState,
}

impl Default for Presence {
    fn default() -> Self {
        Self { buckets: (0..BUCKETS).map(|_| Mutex::default()).collect(), hasher: RandomState::new() }
    }
}

impl Presence {
    fn bucket(&self, topic: &str) -> MutexGuard<'_, HashMap<Box<str>, Room>> {
        let index = self.hasher.hash_one(topic) as usize % BUCKETS;
        // A panic while holding it takes the process down (see `reactor::contain`).
        self.buckets[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Topics with at least one member, in order, that start with `prefix` and come after
    /// `after`: at most `limit`, each with its member count (connections), and whether
    /// more follow. Reads every bucket: an operator's call, not a hot path.
    pub fn topics(&self, prefix: &str, after: Option<&str>, limit: usize) -> (Vec<(Box<str>, usize)>, bool) {
        let mut found: Vec<(Box<str>, usize)> = Vec::new();
        for index in 0..BUCKETS {
            let rooms = self.buckets[index].lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            found.extend(
                rooms
                    .iter()
                    .filter(|(topic, room)| {
                        !room.members.is_empty() && topic.starts_with(prefix) && after.is_none_or(|a| &***topic > a)
                    })
                    .map(|(topic, room)| (topic.clone(), room.members.len())),
            );
        }
        found.sort_unstable();
        let more = found.len() > limit;
        found.truncate(limit);
        (found, more)
    }

    /// One more subscription of member `id` names `topic`; the notice when that makes it a
    /// member (`entry` is made only then).
    pub fn join(&self, topic: &str, id: MemberId, entry: impl FnOnce() -> Entry) -> Option<Notice> {
        let mut rooms = self.bucket(topic);
        let room = rooms.entry(topic.into()).or_default();
        match room.members.entry(id) {
            Slot::Occupied(mut member) => {
                member.get_mut().subscriptions += 1;
                None
            }
            Slot::Vacant(slot) => {
                let entry = Arc::new(entry());
                if let Some(user) = &entry.user {
                    *room.users.entry(user.clone()).or_default() += 1;
                }
                slot.insert(Member { entry: entry.clone(), subscriptions: 1 });
                let transition = room.members.len() == 1;
                Some(Notice { topic: topic.into(), joined: true, entry, transition })
            }
        }
    }

    /// One subscription of member `id` naming `topic` is gone; the notice when that was its
    /// last.
    pub fn leave(&self, topic: &str, id: MemberId) -> Option<Notice> {
        let mut rooms = self.bucket(topic);
        let room = rooms.get_mut(topic)?;
        let member = room.members.get_mut(&id)?;
        member.subscriptions -= 1;
        if member.subscriptions > 0 {
            return None;
        }
        let member = room.members.remove(&id)?;
        if let Some(user) = &member.entry.user
            && let Some(count) = room.users.get_mut(user)
        {
            *count -= 1;
            if *count == 0 {
                room.users.remove(user);
            }
        }
        let transition = room.members.is_empty();
        if transition {
            rooms.remove(topic);
        }
        Some(Notice { topic: topic.into(), joined: false, entry: member.entry, transition })
    }

    /// Sets another node's member (a mirror applying what Redis says): the notice when it
    /// is new. Idempotent: the same member told twice is one member.
    pub fn upsert(&self, topic: &str, entry: Entry) -> Option<Notice> {
        let id = (entry.node, entry.conn_id);
        let mut rooms = self.bucket(topic);
        let room = rooms.entry(topic.into()).or_default();
        if room.members.contains_key(&id) {
            return None;
        }
        let entry = Arc::new(entry);
        if let Some(user) = &entry.user {
            *room.users.entry(user.clone()).or_default() += 1;
        }
        room.members.insert(id, Member { entry: entry.clone(), subscriptions: 1 });
        let transition = room.members.len() == 1;
        Some(Notice { topic: topic.into(), joined: true, entry, transition })
    }

    /// Removes another node's member whatever its count: the notice when it was there.
    pub fn remove(&self, topic: &str, id: MemberId) -> Option<Notice> {
        let mut rooms = self.bucket(topic);
        let room = rooms.get_mut(topic)?;
        room.members.get_mut(&id)?.subscriptions = 1;
        drop(rooms);
        self.leave(topic, id)
    }

    /// Up to `max` members of `topic`, and whether there are more.
    pub fn entries(&self, topic: &str, max: usize) -> (Vec<Arc<Entry>>, bool) {
        let rooms = self.bucket(topic);
        let Some(room) = rooms.get(topic) else { return (Vec::new(), false) };
        let entries = room.members.values().take(max).map(|m| m.entry.clone()).collect();
        (entries, room.members.len() > max)
    }

    /// Every member, by topic, that `keep` selects by its node (a mirror's view: this
    /// node's own entries, or every other node's).
    pub fn members(&self, keep: impl Fn(u64) -> bool) -> Vec<(Box<str>, Arc<Entry>)> {
        let mut out = Vec::new();
        for bucket in &self.buckets {
            let rooms = bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            for (topic, room) in rooms.iter() {
                out.extend(
                    room.members
                        .iter()
                        .filter(|((node, _), _)| keep(*node))
                        .map(|(_, m)| (topic.clone(), m.entry.clone())),
                );
            }
        }
        out
    }

    /// (connections, distinct users) on `topic`; connections without a user (auth off)
    /// are not users.
    pub fn stats(&self, topic: &str) -> (usize, usize) {
        self.bucket(topic).get(topic).map_or((0, 0), |room| (room.members.len(), room.users.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(conn_id: u64, user: Option<&str>) -> impl FnOnce() -> Entry {
        let user = user.map(str::to_string);
        move || Entry {
            node: 1,
            conn_id,
            user: user.map(Into::into),
            info: None,
            transport: Transport::WebSocket,
            since_ms: 0,
        }
    }

    #[test]
    fn membership_counts_connections_and_users() {
        let p = Presence::default();
        assert!(p.join("room", (1, 97), entry(97, Some("ann"))).is_some_and(|n| n.joined));
        assert!(p.join("room", (1, 97), entry(97, Some("ann"))).is_none(), "a second subscription is no new member");
        assert!(p.join("room", (1, 98), entry(98, Some("ann"))).is_some());
        assert!(p.join("room", (1, 99), entry(99, None)).is_some());
        assert_eq!(p.stats("room"), (3, 1));
        assert!(p.leave("room", (1, 97)).is_none(), "one of two subscriptions left");
        let left = p.leave("room", (1, 97)).expect("the last one left");
        assert!(!left.joined && left.entry.conn_id == 97);
        assert_eq!(p.stats("room"), (2, 1));
        assert!(p.leave("room", (1, 98)).is_some());
        assert_eq!(p.stats("room"), (1, 0));
        assert!(p.leave("room", (1, 0)).is_none());
        assert!(p.leave("room", (1, 99)).is_some());
        assert_eq!(p.stats("room"), (0, 0));
        assert_eq!(p.entries("room", 10).0.len(), 0);
    }

    #[test]
    fn entries_are_capped() {
        let p = Presence::default();
        for i in 0..5 {
            p.join("t", (1, i), entry(i, None));
        }
        let (some, truncated) = p.entries("t", 3);
        assert_eq!((some.len(), truncated), (3, true));
        let (all, truncated) = p.entries("t", 5);
        assert_eq!((all.len(), truncated), (5, false));
    }
}
