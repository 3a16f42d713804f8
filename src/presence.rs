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

use serde::Serialize;
use serde_json::value::RawValue;

/// Locks the registry is split over.
pub const BUCKETS: usize = 16;

/// One member of a topic, as readers and notices show it (kept small: a topic's members
/// are many, so the id and the time are numbers until shown).
#[derive(Debug)]
pub struct Entry {
    /// The connection (its `client_id` is this in hex, as told in its connect `ack`).
    pub conn_id: u64,
    /// The token's `sub`; `null` with auth off.
    pub user: Option<Box<str>>,
    /// The token's `info` claim, or the subscribe payload's `presence_info`.
    pub info: Option<Box<RawValue>>,
    /// `websocket` or `sse`.
    pub transport: &'static str,
    /// When it joined, milliseconds since the Unix epoch.
    pub since_ms: u64,
}

impl Serialize for Entry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut since = String::new();
        crate::protocol::push_timestamp(
            &mut since,
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.since_ms),
        );
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("client_id", &format!("{:x}", self.conn_id))?;
        map.serialize_entry("user", &self.user)?;
        map.serialize_entry("info", &self.info)?;
        map.serialize_entry("transport", self.transport)?;
        map.serialize_entry("since", &since)?;
        map.end()
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
}

impl Notice {
    /// The notice's payload: `{"action", "topic", "entry"}`.
    pub fn payload(&self) -> String {
        let action = if self.joined { "join" } else { "leave" };
        serde_json::json!({"action": action, "topic": &*self.topic, "entry": &*self.entry}).to_string()
    }
}

#[derive(Debug, Default)]
struct Room {
    /// By connection id.
    members: HashMap<u64, Member>,
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

    /// One more subscription of connection `conn_id` names `topic`; the notice when that
    /// makes it a member (`entry` is made only then).
    pub fn join(&self, topic: &str, conn_id: u64, entry: impl FnOnce() -> Entry) -> Option<Notice> {
        let mut rooms = self.bucket(topic);
        let room = rooms.entry(topic.into()).or_default();
        match room.members.entry(conn_id) {
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
                Some(Notice { topic: topic.into(), joined: true, entry })
            }
        }
    }

    /// One subscription of connection `conn_id` naming `topic` is gone; the notice when that
    /// was its last.
    pub fn leave(&self, topic: &str, conn_id: u64) -> Option<Notice> {
        let mut rooms = self.bucket(topic);
        let room = rooms.get_mut(topic)?;
        let member = room.members.get_mut(&conn_id)?;
        member.subscriptions -= 1;
        if member.subscriptions > 0 {
            return None;
        }
        let member = room.members.remove(&conn_id)?;
        if let Some(user) = &member.entry.user
            && let Some(count) = room.users.get_mut(user)
        {
            *count -= 1;
            if *count == 0 {
                room.users.remove(user);
            }
        }
        if room.members.is_empty() {
            rooms.remove(topic);
        }
        Some(Notice { topic: topic.into(), joined: false, entry: member.entry })
    }

    /// Up to `max` members of `topic`, and whether there are more.
    pub fn entries(&self, topic: &str, max: usize) -> (Vec<Arc<Entry>>, bool) {
        let rooms = self.bucket(topic);
        let Some(room) = rooms.get(topic) else { return (Vec::new(), false) };
        let entries = room.members.values().take(max).map(|m| m.entry.clone()).collect();
        (entries, room.members.len() > max)
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
        move || Entry { conn_id, user: user.map(Into::into), info: None, transport: "websocket", since_ms: 0 }
    }

    #[test]
    fn membership_counts_connections_and_users() {
        let p = Presence::default();
        assert!(p.join("room", 97, entry(97, Some("ann"))).is_some_and(|n| n.joined));
        assert!(p.join("room", 97, entry(97, Some("ann"))).is_none(), "a second subscription is no new member");
        assert!(p.join("room", 98, entry(98, Some("ann"))).is_some());
        assert!(p.join("room", 99, entry(99, None)).is_some());
        assert_eq!(p.stats("room"), (3, 1));
        assert!(p.leave("room", 97).is_none(), "one of two subscriptions left");
        let left = p.leave("room", 97).expect("the last one left");
        assert!(!left.joined && left.entry.conn_id == 97);
        assert_eq!(p.stats("room"), (2, 1));
        assert!(p.leave("room", 98).is_some());
        assert_eq!(p.stats("room"), (1, 0));
        assert!(p.leave("room", 0).is_none());
        assert!(p.leave("room", 99).is_some());
        assert_eq!(p.stats("room"), (0, 0));
        assert_eq!(p.entries("room", 10).0.len(), 0);
    }

    #[test]
    fn entries_are_capped() {
        let p = Presence::default();
        for i in 0..5 {
            p.join("t", i, entry(i, None));
        }
        let (some, truncated) = p.entries("t", 3);
        assert_eq!((some.len(), truncated), (3, true));
        let (all, truncated) = p.entries("t", 5);
        assert_eq!((all.len(), truncated), (5, false));
    }
}
