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
//! subscriber applies other nodes' joins and leaves as they are published. Both hand the
//! resulting notices to the shards' inboxes, so members everywhere hear of them, and a
//! presence read on any node is answered from its own registry. It does not touch
//! connections or the event stream.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::bus::Control;
use crate::core::Shared;
use crate::presence::{Entry, Notice, Transport};

/// How often queued joins and leaves go out.
pub const TICK: Duration = Duration::from_millis(50);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Waits between reconnects while Redis is away (logged once per outage).
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

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

/// A batch of joins and leaves from one node.
#[derive(Serialize, Deserialize)]
struct Batch {
    node: String,
    told: Vec<Told>,
}

/// Where a node's presence lives.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Key prefix (the event stream's key).
    pub prefix: String,
    /// Entries of a node that stops renewing them are gone from every node within this.
    pub ttl: Duration,
}

impl Settings {
    fn hash_of(&self, node: u64) -> String {
        format!("{}:presence:{node:x}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:presence", self.prefix)
    }
}

/// Starts the writer and subscriber threads.
pub fn start(settings: Settings, shared: Arc<Shared>) -> std::io::Result<()> {
    let client = redis::Client::open(settings.url.as_str()).map_err(std::io::Error::other)?;
    let writer = Writer { client: client.clone(), settings: settings.clone(), shared: shared.clone() };
    std::thread::Builder::new().name("volley-presence-writer".into()).spawn(move || writer.run())?;
    let subscriber = Subscriber { client, settings, shared };
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
        shared.bus.to_every_shard(|| Control::Presence(notice.clone()));
    }
}

struct Writer {
    client: redis::Client,
    settings: Settings,
    shared: Arc<Shared>,
}

impl Writer {
    fn run(self) {
        let node = self.shared.node;
        let mut connection: Option<redis::Connection> = None;
        let mut last_reconcile: Option<Instant> = None;
        let mut backoff = TICK;
        loop {
            std::thread::sleep(backoff);
            if connection.is_none() {
                connection = self.client.get_connection_with_timeout(CONNECT_TIMEOUT).ok();
                // Whatever was queued while away is in the registry: write it whole.
                self.shared.presence_resync.store(true, Ordering::Release);
            }
            let Some(conn) = connection.as_mut() else {
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            };
            backoff = TICK;
            let mut result = self.flush(conn, node);
            let reconcile_every = self.settings.ttl / 4;
            if result.is_ok() && last_reconcile.is_none_or(|at| at.elapsed() >= reconcile_every) {
                result = self.reconcile(conn, node);
                last_reconcile = Some(Instant::now());
            }
            if let Err(e) = result {
                tracing::warn!(error = %e, "presence mirror: reconnecting");
                connection = None;
                backoff = FIRST_BACKOFF;
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
        // The hash outlives this node by at most three quarters of the TTL; the others'
        // reconcile, every quarter, then drops its members: gone everywhere within the TTL.
        let expiry = (self.settings.ttl * 3 / 4).as_millis() as u64;
        pipe.cmd("PEXPIRE").arg(&hash).arg(expiry.max(1)).ignore();
        if !told.is_empty() {
            let batch = Batch { node: format!("{node:x}"), told };
            pipe.publish(self.settings.channel(), serde_json::to_string(&batch).unwrap_or_default()).ignore();
        }
        pipe.query::<()>(conn).inspect_err(|_| self.shared.presence_resync.store(true, Ordering::Release))
    }

    /// Makes the mirror of other nodes what their hashes say.
    fn reconcile(&self, conn: &mut redis::Connection, node: u64) -> redis::RedisResult<()> {
        let pattern = format!("{}:presence:*", self.settings.prefix);
        // SCAN, not KEYS: it does not hold Redis up while it walks the keyspace.
        let keys: Vec<String> = redis::Commands::scan_match::<_, String>(conn, &pattern)?.collect::<Result<_, _>>()?;
        let own = self.settings.hash_of(node);
        let mut present = HashSet::new();
        let mut notices = Vec::new();
        for key in keys.iter().filter(|k| **k != own) {
            let Some(other) = key.rsplit(':').next().and_then(|n| u64::from_str_radix(n, 16).ok()) else { continue };
            let fields: Vec<(String, String)> = redis::cmd("HGETALL").arg(key).query(conn)?;
            for (name, value) in fields {
                let Some((topic, conn_hex)) = name.split_once('\n') else { continue };
                let (Ok(conn_id), Ok(value)) =
                    (u64::from_str_radix(conn_hex, 16), serde_json::from_str::<Stored>(&value))
                else {
                    continue;
                };
                present.insert((topic.to_string(), other, conn_id));
                notices.extend(self.shared.presence.upsert(topic, entry_of(other, conn_id, value)));
            }
        }
        for (topic, entry) in self.shared.presence.members(|n| n != node) {
            if !present.contains(&(topic.to_string(), entry.node, entry.conn_id)) {
                notices.extend(self.shared.presence.remove(&topic, (entry.node, entry.conn_id)));
            }
        }
        deliver(&self.shared, notices);
        Ok(())
    }
}

struct Subscriber {
    client: redis::Client,
    settings: Settings,
    shared: Arc<Shared>,
}

impl Subscriber {
    fn run(self) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = Instant::now();
            if let Err(e) = self.follow() {
                // Once a connection held a while, the next failure is news again.
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                if backoff == FIRST_BACKOFF {
                    tracing::warn!(error = %e, "presence subscriber: reconnecting");
                }
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    fn follow(&self) -> redis::RedisResult<()> {
        let mut conn = self.client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(self.settings.channel())?;
        loop {
            let message = pubsub.get_message()?;
            let Ok(batch) = serde_json::from_slice::<Batch>(message.get_payload_bytes()) else { continue };
            let Ok(node) = u64::from_str_radix(&batch.node, 16) else { continue };
            if node == self.shared.node {
                continue;
            }
            let mut notices = Vec::new();
            for told in batch.told {
                let Ok(conn_id) = u64::from_str_radix(&told.conn, 16) else { continue };
                let notice = match told.entry {
                    Some(stored) if told.joined => {
                        self.shared.presence.upsert(&told.topic, entry_of(node, conn_id, stored))
                    }
                    _ => self.shared.presence.remove(&told.topic, (node, conn_id)),
                };
                notices.extend(notice);
            }
            deliver(&self.shared, notices);
        }
    }
}
