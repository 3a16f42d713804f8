//! Engines: where the one total order of events comes from.
//!
//! `memory` is the bus's own sequencer (see [`crate::bus`]). `redis` makes a Redis Stream
//! the cluster's shared, ordered log: publishes go to a dedicated writer thread that
//! `XADD`s them (pipelined, one `MULTI`/`EXEC` per batch, trimmed with `MAXLEN ~`), and a
//! reader thread `XREAD BLOCK`s the stream from its last id and feeds every event, in
//! stream order and with the stream id as its event id, into the bus. Shards never block
//! on Redis: they hand over a publish and get the answer through their inbox. This module
//! owns those two threads, reconnection with backoff, and the engine's health; it does not
//! touch connections or encode anything beyond the stream entry's fields.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Value;
use serde_json::value::RawValue;

use crate::bus::{Bus, Control, Prepared, PublishError, PublishTicket, Reply, StreamEntry, Submit};
use crate::protocol::{self, PublishRequest};

/// Health of a cluster engine, shown by `/health` and `/metrics`.
#[derive(Debug, Default)]
pub struct EngineStatus {
    /// Both threads are connected.
    pub up: AtomicBool,
    /// Reconnections after a failure.
    pub reconnects: AtomicU64,
    /// Age of the newest event read, at the time it was read, in microseconds.
    pub lag_us: AtomicU64,
}

/// A publish on its way to Redis.
struct Submission {
    prepared: Vec<Prepared>,
    reply: Reply,
}

/// Tickets of `?wait=1` publishes, by stream id, until the reader meets their events.
type Waits = Arc<Mutex<HashMap<String, (Arc<PublishTicket>, usize)>>>;

/// Settings of the Redis engine.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Stream key.
    pub stream: String,
    /// Approximate stream length kept (`MAXLEN ~`): the history retention.
    pub max_len: usize,
    /// Publishes waiting for the writer before new ones are refused.
    pub queue: usize,
}

/// The Redis engine before its threads start: the bus's submit function is made first,
/// the threads need the finished bus.
pub struct Redis {
    settings: RedisSettings,
    client: redis::Client,
    receiver: Receiver<Submission>,
    waits: Waits,
    /// Health, shared with the reactor.
    pub status: Arc<EngineStatus>,
}

const BATCH: usize = 256;
const READ_COUNT: usize = 512;
const BLOCK_MS: u64 = 1000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Redis {
    /// Checks the URL and returns the engine and the submit function for the bus.
    pub fn new(settings: RedisSettings) -> Result<(Self, Submit), redis::RedisError> {
        let client = redis::Client::open(settings.url.as_str())?;
        let (sender, receiver) = std::sync::mpsc::sync_channel(settings.queue);
        let status = Arc::new(EngineStatus::default());
        let submit = submitter(sender);
        let engine = Self { settings, client, receiver, waits: Arc::default(), status };
        Ok((engine, submit))
    }

    /// Starts the writer and reader threads feeding `bus`.
    pub fn start(self, bus: Arc<Bus>) -> std::io::Result<()> {
        let Redis { settings, client, receiver, waits, status } = self;
        let writer = Writer {
            client: client.clone(),
            settings: settings.clone(),
            bus: bus.clone(),
            waits: waits.clone(),
            status: status.clone(),
        };
        std::thread::Builder::new().name("volley-redis-writer".into()).spawn(move || writer.run(receiver))?;
        let reader = Reader { client, settings, bus, waits, status };
        std::thread::Builder::new().name("volley-redis-reader".into()).spawn(move || reader.run())?;
        Ok(())
    }
}

fn submitter(sender: SyncSender<Submission>) -> Submit {
    Box::new(move |prepared, reply| match sender.try_send(Submission { prepared, reply }) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => Err(PublishError::Overloaded),
        Err(TrySendError::Disconnected(_)) => Err(PublishError::EngineUnavailable),
    })
}

struct Writer {
    client: redis::Client,
    settings: RedisSettings,
    bus: Arc<Bus>,
    waits: Waits,
    status: Arc<EngineStatus>,
}

impl Writer {
    fn run(self, receiver: Receiver<Submission>) {
        let mut connection: Option<redis::Connection> = None;
        while let Ok(first) = receiver.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            if connection.is_none() {
                connection = self.client.get_connection_with_timeout(CONNECT_TIMEOUT).ok();
            }
            let result = match connection.as_mut() {
                Some(conn) => self.write(conn, &batch),
                None => Err(PublishError::EngineUnavailable),
            };
            if result.is_ok() {
                self.status.up.store(true, Ordering::Release);
            } else {
                connection = None;
                self.status.up.store(false, Ordering::Release);
                for submission in batch {
                    self.answer(submission.reply, Err(PublishError::EngineUnavailable));
                }
            }
        }
    }

    /// One transaction for the batch: every event of it is in the stream, or none is.
    fn write(&self, conn: &mut redis::Connection, batch: &[Submission]) -> Result<(), PublishError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        let mut timestamp = String::new();
        protocol::push_timestamp(&mut timestamp, SystemTime::now());
        for submission in batch {
            for prepared in &submission.prepared {
                let request = &prepared.request;
                let cmd = pipe
                    .cmd("XADD")
                    .arg(&self.settings.stream)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(self.settings.max_len)
                    .arg("*")
                    .arg("ts")
                    .arg(&timestamp)
                    .arg("topic")
                    .arg(&request.topic)
                    .arg("source")
                    .arg(&request.source)
                    .arg("data")
                    .arg(request.data.get());
                if let Some(correlation_id) = &request.correlation_id {
                    cmd.arg("cid").arg(correlation_id);
                }
            }
        }
        // Held from before the XADDs until the tickets are in: the reader cannot meet
        // these events before their tickets.
        let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<String> = pipe.query(conn).map_err(|_| PublishError::EngineUnavailable)?;
        let mut ids = ids.into_iter();
        let shards = self.bus.inboxes().len();
        let mut answers = Vec::with_capacity(batch.len());
        for submission in batch {
            let mine: Vec<Box<str>> = ids.by_ref().take(submission.prepared.len()).map(Into::into).collect();
            if submission.reply.wait {
                let ticket = PublishTicket::new(submission.reply.to, mine.clone(), shards);
                for (index, id) in mine.iter().enumerate() {
                    waits.insert(id.to_string(), (ticket.clone(), index));
                }
            } else {
                answers.push((submission.reply.clone(), mine));
            }
        }
        drop(waits);
        for (reply, ids) in answers {
            self.answer(reply, Ok(ids));
        }
        Ok(())
    }

    fn answer(&self, reply: Reply, result: Result<Vec<Box<str>>, PublishError>) {
        // A full control queue loses the answer: an HTTP publisher gets 504 at its timeout.
        self.bus.to_shard(reply.to.shard, Control::Published(reply, result));
    }
}

struct Reader {
    client: redis::Client,
    settings: RedisSettings,
    bus: Arc<Bus>,
    waits: Waits,
    status: Arc<EngineStatus>,
}

impl Reader {
    fn run(self) {
        let mut last: Option<String> = None;
        let mut backoff = Duration::from_millis(50);
        loop {
            let connected = self.client.get_connection_with_timeout(CONNECT_TIMEOUT);
            let Ok(mut conn) = connected else {
                self.status.up.store(false, Ordering::Release);
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            };
            backoff = Duration::from_millis(50);
            if last.is_some() {
                self.status.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = self.follow(&mut conn, &mut last) {
                tracing::warn!(error = %e, "redis engine: reconnecting");
                self.status.up.store(false, Ordering::Release);
            }
        }
    }

    /// Catches up on first connect, then reads the stream in order until an error.
    fn follow(&self, conn: &mut redis::Connection, last: &mut Option<String>) -> redis::RedisResult<()> {
        if last.is_none() {
            let newest_first: Value = redis::cmd("XREVRANGE")
                .arg(&self.settings.stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(self.settings.max_len)
                .query(conn)?;
            let mut entries = parse_entries(&newest_first);
            entries.reverse();
            *last = Some(entries.last().map_or_else(|| "0-0".to_string(), |e| e.id.clone()));
            self.bus.preload(entries);
        }
        self.status.up.store(true, Ordering::Release);
        loop {
            let from = last.clone().unwrap_or_else(|| "0-0".into());
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(&self.settings.stream)
                .arg(&from)
                .query(conn)?;
            let entries = match &reply {
                Value::Array(streams) => streams.first().map(stream_entries).unwrap_or_default(),
                Value::Map(streams) => streams.first().map(|(_, v)| parse_entries(v)).unwrap_or_default(),
                _ => Vec::new(),
            };
            let Some(newest) = entries.last() else { continue };
            *last = Some(newest.id.clone());
            let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
            self.status.lag_us.store(now_ms.saturating_sub(newest.key.0) * 1000, Ordering::Relaxed);
            let mut waits = self.waits.lock().unwrap_or_else(|p| p.into_inner());
            self.bus.ingest(entries, |id| waits.remove(id));
        }
    }
}

/// `[key, [entry...]]` of an `XREAD` reply.
fn stream_entries(stream: &Value) -> Vec<StreamEntry> {
    match stream {
        Value::Array(pair) if pair.len() == 2 => parse_entries(&pair[1]),
        _ => Vec::new(),
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// `[[id, [field, value, ...]], ...]` into entries; malformed ones are skipped (they
/// were not written by volley).
fn parse_entries(value: &Value) -> Vec<StreamEntry> {
    let Value::Array(items) = value else { return Vec::new() };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else { return None };
            let (id, fields) = (text(pair.first()?)?, pair.get(1)?);
            let key = parse_stream_id(&id)?;
            let fields: HashMap<String, String> = match fields {
                Value::Array(flat) => {
                    flat.chunks(2).filter_map(|kv| Some((text(kv.first()?)?, text(kv.get(1)?)?))).collect()
                }
                Value::Map(pairs) => pairs.iter().filter_map(|(k, v)| Some((text(k)?, text(v)?))).collect(),
                _ => return None,
            };
            let request = PublishRequest {
                topic: fields.get("topic")?.clone(),
                source: fields.get("source").cloned().unwrap_or_default(),
                correlation_id: fields.get("cid").cloned(),
                data: RawValue::from_string(fields.get("data")?.clone()).ok()?,
            };
            let tail = request.encoded_tail();
            Some(StreamEntry { id, key, timestamp: fields.get("ts")?.clone(), prepared: Prepared { request, tail } })
        })
        .collect()
}

/// `<ms>-<n>`.
pub fn parse_stream_id(id: &str) -> Option<(u64, u64)> {
    let (ms, n) = id.split_once('-')?;
    Some((ms.parse().ok()?, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stream_entries_and_skips_foreign_ones() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = |id: &str, fields: &[&str]| {
            Value::Array(vec![bulk(id), Value::Array(fields.iter().map(|f| bulk(f)).collect())])
        };
        let value = Value::Array(vec![
            entry(
                "5-1",
                &["ts", "2026-01-01T00:00:00.000000Z", "topic", "a.b", "source", "s", "data", "{\"x\":1}", "cid", "c"],
            ),
            entry("5-2", &["unrelated", "field"]),
            entry("bad", &["ts", "t", "topic", "a", "data", "1"]),
        ]);
        let entries = parse_entries(&value);
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].key, (5, 1));
        assert_eq!(entries[0].prepared.request.correlation_id.as_deref(), Some("c"));
        assert_eq!(entries[0].prepared.request.data.get(), "{\"x\":1}");
    }
}
