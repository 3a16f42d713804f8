//! Cluster presence through Redis: this node's members mirrored out, every other node's
//! mirrored in, joins and leaves told across nodes.
//!
//! Owns two threads, started with the Redis engine. The writer, every [`TICK`], takes the
//! joins and leaves the shards queued (batched: one pipeline and one `PUBLISH` per tick,
//! never on the publish or fan-out path), applies them to this node's hash
//! (`<stream>:presence:<node>`, field `<topic>\n<client_id>`, value the entry) and renews
//! the hash's expiry, so a node that dies loses its entries when the hash expires; every
//! quarter of `presence_ttl_ms` it reads every node's hash and reconciles the local mirror
//! (a dead node's members leave, anything a lost message missed is caught up). The
//! subscriber applies other nodes' joins and leaves as they are published. Both change
//! the local registry through one [`Mirror`], which orders their changes, and hand the
//! resulting notices to the shards' inboxes, so members everywhere hear of them, and a
//! presence read on any node is answered from its own registry. Both connect through the
//! engine's [`Connector`] (timeouts, backoff). It does not touch connections or the event
//! stream. The same threads carry server API actions (disconnect, unsubscribe) to every
//! other node: the writer publishes what this node was asked, the subscriber hands what
//! others were asked to this node's shards.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redis::Value;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::core::Shared;
use crate::engine::{Connector, OneServer};
use crate::mailbox::Control;
use crate::presence::{Entry, Notice, Presence, Transport};

/// A field every node's hash keeps, so a node without members still has one (a member's
/// field is `<topic>\n<client_id>`: this one is never read as a member).
const ALIVE_FIELD: &str = "alive";

/// The node id a presence hash key ends with.
fn node_of(key: &str) -> Option<u64> {
    key.rsplit(':').next().and_then(|n| u64::from_str_radix(n, 16).ok())
}

/// How often queued joins and leaves go out.
pub const TICK: Duration = Duration::from_millis(50);

/// An entry as stored in a node's hash and told to other nodes.
#[derive(Serialize, Deserialize)]
struct Stored {
    user: Option<Box<str>>,
    info: Option<Box<RawValue>>,
    transport: Transport,
    since_ms: u64,
}

/// One join or leave as published.
#[derive(Serialize, Deserialize)]
struct Told {
    joined: bool,
    topic: Box<str>,
    conn: String,
    entry: Option<Stored>,
}

/// A server API action one node was asked, for the others.
#[derive(Serialize, Deserialize)]
struct ApiTold {
    node: String,
    action: crate::mailbox::ApiAction,
}

/// A batch of joins and leaves from one node.
#[derive(Serialize, Deserialize)]
struct Batch {
    node: String,
    told: Vec<Told>,
}

/// Where a node's presence lives.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The engine's servers: presence lives on the first, or on a Redis Cluster with the
    /// master of its hash tag's slot.
    pub spec: crate::config::EngineSpec,
    /// Key prefix (the event stream's key).
    pub prefix: String,
    /// Entries of a node that stops renewing them are gone from every node within this.
    pub ttl: Duration,
}

impl Settings {
    /// `{<prefix>}:presence:<node>`: the hash tag keeps every node's hash on one slot of
    /// a Redis Cluster, where one `SCAN` sees them all.
    fn hash_of(&self, node: u64) -> String {
        format!("{{{}}}:presence:{node:x}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:presence", self.prefix)
    }

    /// Where server API actions are told to every node.
    fn api_channel(&self) -> String {
        format!("{}:api", self.prefix)
    }
}

/// Starts the writer and subscriber threads.
pub fn start(settings: Settings, shared: Arc<Shared>) -> std::io::Result<()> {
    let client = OneServer::new(&settings.spec, &settings.hash_of(0)).map_err(std::io::Error::other)?;
    // Reconnections count with the engine's: the mirror's connections are the engine's too.
    let status = shared.engine.clone().unwrap_or_default();
    let mirror = Arc::new(Mirror::default());
    let writer = Writer {
        connector: Connector::new(client.clone(), "presence writer", status.clone()),
        settings: settings.clone(),
        shared: shared.clone(),
        mirror: mirror.clone(),
    };
    std::thread::Builder::new().name("volley-presence-writer".into()).spawn(move || writer.run())?;
    let subscriber =
        Subscriber { connector: Connector::new(client, "presence subscriber", status), settings, shared, mirror };
    std::thread::Builder::new().name("volley-presence-subscriber".into()).spawn(move || subscriber.run())?;
    Ok(())
}

fn field(topic: &str, conn: u64) -> String {
    format!("{topic}\n{conn:x}")
}

fn stored(entry: &Entry) -> Stored {
    Stored { user: entry.user.clone(), info: entry.info.clone(), transport: entry.transport, since_ms: entry.since_ms }
}

fn entry_of(node: u64, conn: u64, stored: Stored) -> Entry {
    Entry {
        node,
        conn_id: conn,
        user: stored.user,
        info: stored.info,
        transport: stored.transport,
        since_ms: stored.since_ms,
    }
}

/// Hands notices to every shard.
fn deliver(shared: &Shared, notices: impl IntoIterator<Item = Notice>) {
    for notice in notices {
        let notice = Arc::new(notice);
        shared.bus.mailboxes.to_every_shard(|| Control::Presence(notice.clone()));
    }
}

/// One member of another node: (topic, node, connection).
type Member = (Box<str>, u64, u64);

/// A member as a reconcile read it from its node's hash.
struct Read {
    member: Member,
    stored: Stored,
}

/// The local registry's mirror of other nodes, changed by two threads: the subscriber
/// applies joins and leaves as they are told, the writer's reconcile what the hashes said
/// when it read them. A reconcile reads over many round trips, so its snapshot can be
/// older than a notice: a join told after it read that node's hash was undone by its
/// removals, a leave told after the read by its upserts (each until the next reconcile,
/// with notices to members both ways). So both apply under one lock, and a reconcile
/// leaves alone every member the subscriber changed since it began reading: the notice
/// is at least as new as the snapshot, and whatever a lost notice missed, the next
/// reconcile catches. The notices are handed to the shards under that lock too, so
/// members hear them in the order they were applied (a push and a wake, no I/O).
#[derive(Default)]
struct Mirror {
    /// While a reconcile reads: the members the subscriber changed since it began. A
    /// reconcile that failed half-way leaves it set until the next one begins.
    touched: Mutex<Option<HashSet<Member>>>,
}

impl Mirror {
    fn lock(&self) -> MutexGuard<'_, Option<HashSet<Member>>> {
        self.touched.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies joins and leaves `node` told.
    fn apply_told(&self, presence: &Presence, node: u64, told: Vec<Told>, deliver: impl FnOnce(Vec<Notice>)) {
        let mut touched = self.lock();
        let mut notices = Vec::new();
        for told in told {
            let Ok(conn_id) = u64::from_str_radix(&told.conn, 16) else { continue };
            if let Some(touched) = touched.as_mut() {
                touched.insert((told.topic.clone(), node, conn_id));
            }
            let notice = match told.entry {
                Some(stored) if told.joined => presence.upsert(&told.topic, entry_of(node, conn_id, stored)),
                _ => presence.remove(&told.topic, (node, conn_id)),
            };
            notices.extend(notice);
        }
        deliver(notices);
    }

    /// A reconcile starts reading the hashes.
    fn begin_reconcile(&self) {
        *self.lock() = Some(HashSet::new());
    }

    /// Makes other nodes' members (all but `own`'s) what the hashes said, except those
    /// the subscriber changed while they were read.
    fn finish_reconcile(
        &self,
        presence: &Presence,
        own: u64,
        read: Vec<Read>,
        mut gone: impl FnMut(&Notice),
        deliver: impl FnOnce(Vec<Notice>),
    ) {
        let mut touched = self.lock();
        let changed = touched.take().unwrap_or_default();
        let mut notices = Vec::new();
        let mut present = HashSet::new();
        for Read { member, stored } in read {
            if !changed.contains(&member) {
                let (topic, node, conn_id) = &member;
                notices.extend(presence.upsert(topic, entry_of(*node, *conn_id, stored)));
            }
            present.insert(member);
        }
        for (topic, entry) in presence.members(|n| n != own) {
            let member = (topic, entry.node, entry.conn_id);
            if !present.contains(&member)
                && !changed.contains(&member)
                && let Some(notice) = presence.remove(&member.0, (member.1, member.2))
            {
                gone(&notice);
                notices.push(notice);
            }
        }
        deliver(notices);
    }
}

struct Writer {
    connector: Connector,
    settings: Settings,
    shared: Arc<Shared>,
    mirror: Arc<Mirror>,
}

impl Writer {
    fn run(mut self) {
        let node = self.shared.node;
        let mut connection: Option<redis::Connection> = None;
        let mut last_reconcile: Option<Instant> = None;
        loop {
            std::thread::sleep(TICK);
            if connection.is_none() {
                // Returns at once while backing off: queued joins and leaves wait.
                connection = self.connector.try_connect().ok();
                if connection.is_some() {
                    // Whatever was queued while away is in the registry: write it whole.
                    self.shared.presence_resync.store(true, Ordering::Release);
                }
            }
            let Some(conn) = connection.as_mut() else { continue };
            let mut result = self.flush(conn, node);
            let reconcile_every = self.settings.ttl / 4;
            if result.is_ok() && last_reconcile.is_none_or(|at| at.elapsed() >= reconcile_every) {
                result = self.reconcile(conn, node);
                last_reconcile = Some(Instant::now());
            }
            if let Err(e) = result {
                self.connector.lost(&e);
                connection = None;
            }
        }
    }

    /// Writes this node's queued joins and leaves (or all of its members after a
    /// reconnect or an overflow), publishes them, and renews the hash's expiry.
    fn flush(&self, conn: &mut redis::Connection, node: u64) -> redis::RedisResult<()> {
        let hash = self.settings.hash_of(node);
        let mut pipe = redis::pipe();
        let mut told = Vec::new();
        let resync = self.shared.presence_resync.swap(false, Ordering::AcqRel);
        while let Some(notice) = self.shared.presence_outbox.pop() {
            let conn_id = notice.entry.conn_id;
            if !resync {
                if notice.joined {
                    let value = serde_json::to_string(&stored(&notice.entry)).unwrap_or_default();
                    pipe.hset(&hash, field(&notice.topic, conn_id), value).ignore();
                } else {
                    pipe.hdel(&hash, field(&notice.topic, conn_id)).ignore();
                }
            }
            let entry = notice.joined.then(|| stored(&notice.entry));
            told.push(Told { joined: notice.joined, topic: notice.topic.clone(), conn: format!("{conn_id:x}"), entry });
        }
        if resync {
            pipe.del(&hash).ignore();
            for (topic, entry) in self.shared.presence.members(|n| n == node) {
                let value = serde_json::to_string(&stored(&entry)).unwrap_or_default();
                pipe.hset(&hash, field(&topic, entry.conn_id), value).ignore();
            }
        }
        // The hash exists while the node lives, members or not (see `reconcile`).
        pipe.hset(&hash, ALIVE_FIELD, "1").ignore();
        // The hash outlives this node by at most three quarters of the TTL; the others'
        // reconcile, every quarter, then drops its members: gone everywhere within the TTL.
        let expiry = (self.settings.ttl * 3 / 4).as_millis() as u64;
        pipe.cmd("PEXPIRE").arg(&hash).arg(expiry.max(1)).ignore();
        while let Some(action) = self.shared.api_outbox.pop() {
            let told = ApiTold { node: format!("{node:x}"), action };
            pipe.publish(self.settings.api_channel(), serde_json::to_string(&told).unwrap_or_default()).ignore();
        }
        if !told.is_empty() {
            let batch = Batch { node: format!("{node:x}"), told };
            pipe.publish(self.settings.channel(), serde_json::to_string(&batch).unwrap_or_default()).ignore();
        }
        pipe.query::<()>(conn).inspect_err(|_| self.shared.presence_resync.store(true, Ordering::Release))
    }

    /// Makes the mirror of other nodes what their hashes say.
    fn reconcile(&self, conn: &mut redis::Connection, node: u64) -> redis::RedisResult<()> {
        self.mirror.begin_reconcile();
        let pattern = format!("{{{}}}:presence:*", self.settings.prefix);
        // SCAN, not KEYS: it does not hold Redis up while it walks the keyspace.
        let keys: Vec<String> = redis::Commands::scan_match::<_, String>(conn, &pattern)?.collect::<Result<_, _>>()?;
        let own = self.settings.hash_of(node);
        let mut read = Vec::new();
        for key in keys.iter().filter(|k| **k != own) {
            let Some(other) = node_of(key) else { continue };
            let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(key).query(conn)?;
            for (name, value) in fields {
                let Some((topic, conn_hex)) = name.split_once('\n') else { continue };
                let (Ok(conn_id), Ok(value)) =
                    (u64::from_str_radix(conn_hex, 16), serde_json::from_str::<Stored>(&value))
                else {
                    continue;
                };
                read.push(Read { member: (topic.into(), other, conn_id), stored: value });
            }
        }
        // Members gone from the hashes belong to a node that died (or whose leave was
        // lost): nobody else will tell their transitions, and every live node sees them, so
        // the live node with the lowest id tells the webhooks (every live node keeps its
        // hash, members or not, so all agree on who that is).
        let lowest = keys.iter().filter_map(|k| node_of(k)).all(|other| other >= node);
        let hooks = self.shared.webhooks.as_ref().filter(|_| lowest);
        let gone = |notice: &Notice| {
            if let Some(hooks) = hooks {
                hooks.tell(notice, true);
            }
        };
        self.mirror.finish_reconcile(&self.shared.presence, node, read, gone, |notices| deliver(&self.shared, notices));
        Ok(())
    }
}

struct Subscriber {
    connector: Connector,
    settings: Settings,
    shared: Arc<Shared>,
    mirror: Arc<Mirror>,
}

impl Subscriber {
    /// Another node's server API action: every shard here acts on its own connections.
    fn act(&self, payload: &[u8]) {
        let Ok(told) = serde_json::from_slice::<ApiTold>(payload) else { return };
        if u64::from_str_radix(&told.node, 16).is_ok_and(|n| n == self.shared.node) {
            return;
        }
        let mailboxes = &self.shared.bus.mailboxes;
        let tally = crate::mailbox::ApiTally::new(told.action, None, mailboxes.inboxes().len());
        mailboxes.to_every_shard(|| Control::Api(tally.clone()));
    }

    fn run(mut self) {
        loop {
            let mut conn = self.connector.connect();
            if let Err(e) = self.follow(&mut conn) {
                self.connector.lost(&e);
            }
        }
    }

    fn follow(&self, conn: &mut redis::Connection) -> redis::RedisResult<()> {
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(self.settings.channel())?;
        pubsub.subscribe(self.settings.api_channel())?;
        loop {
            let message = match pubsub.get_message() {
                Ok(message) => message,
                // Nothing told for a read timeout: a quiet channel answers a PING, a
                // stopped Redis or a dead path does not.
                Err(e) if e.is_timeout() => {
                    pubsub.ping::<Value>()?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if message.get_channel_name() == self.settings.api_channel() {
                self.act(message.get_payload_bytes());
                continue;
            }
            let Ok(batch) = serde_json::from_slice::<Batch>(message.get_payload_bytes()) else { continue };
            let Ok(node) = u64::from_str_radix(&batch.node, 16) else { continue };
            if node == self.shared.node {
                continue;
            }
            self.mirror.apply_told(&self.shared.presence, node, batch.told, |notices| deliver(&self.shared, notices));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: u64 = 1;
    const OTHER: u64 = 2;

    fn stored() -> Stored {
        Stored { user: None, info: None, transport: Transport::WebSocket, since_ms: 0 }
    }

    fn told(joined: bool, conn: u64) -> Vec<Told> {
        vec![Told { joined, topic: "room".into(), conn: format!("{conn:x}"), entry: joined.then(stored) }]
    }

    fn read(conn: u64) -> Read {
        Read { member: ("room".into(), OTHER, conn), stored: stored() }
    }

    fn listed(presence: &Presence) -> Vec<u64> {
        let mut conns: Vec<u64> = presence.entries("room", 100).0.iter().map(|e| e.conn_id).collect();
        conns.sort();
        conns
    }

    /// Review item 7: a join told while a reconcile was reading (after it read the
    /// joining node's hash) was removed again by the reconcile, with a leave notice.
    #[test]
    fn a_reconcile_does_not_undo_a_join_told_while_it_read() {
        let (presence, mirror) = (Presence::default(), Mirror::default());
        mirror.apply_told(&presence, OTHER, told(true, 7), |_| {});
        mirror.begin_reconcile();
        // The hash as read: member 7 only; 8 joins after the read.
        let snapshot = vec![read(7)];
        mirror.apply_told(&presence, OTHER, told(true, 8), |_| {});
        let mut notices = Vec::new();
        mirror.finish_reconcile(&presence, OWN, snapshot, |_| {}, |n| notices = n);
        assert_eq!(listed(&presence), [7, 8]);
        assert!(notices.is_empty(), "no leave for the member that joined");
    }

    #[test]
    fn a_reconcile_does_not_undo_a_leave_told_while_it_read() {
        let (presence, mirror) = (Presence::default(), Mirror::default());
        mirror.begin_reconcile();
        // Read while 9 was a member; 9 leaves before the reconcile applies.
        let snapshot = vec![read(9)];
        mirror.apply_told(&presence, OTHER, told(true, 9), |_| {});
        mirror.apply_told(&presence, OTHER, told(false, 9), |_| {});
        mirror.finish_reconcile(&presence, OWN, snapshot, |_| {}, |_| {});
        assert!(listed(&presence).is_empty());
    }

    #[test]
    fn a_reconcile_still_drops_members_gone_from_the_hashes_and_adds_missed_ones() {
        let (presence, mirror) = (Presence::default(), Mirror::default());
        mirror.apply_told(&presence, OTHER, told(true, 3), |_| {});
        mirror.begin_reconcile();
        let mut gone = Vec::new();
        mirror.finish_reconcile(&presence, OWN, vec![read(4)], |n| gone.push(n.transition), |_| {});
        assert_eq!(gone, [false], "member 3 left; 4 keeps the topic occupied");
        assert_eq!(listed(&presence), [4]);
    }
}
