//! Webhooks: topic occupied/vacated (and, opt-in, presence join/leave) events posted to
//! the application (docs/protocol.md, "Webhooks").
//!
//! Owns a bounded queue the shards and the presence mirror push events into (never
//! blocking: past `webhook_queue_max` an event is dropped and counted) and one sender
//! thread that batches them (at most [`MAX_BATCH`] events, at most [`BATCH_WINDOW`] after
//! the first), signs each body with HMAC-SHA256 and posts it, retrying a failed batch
//! with exponential backoff for `webhook_retry_ms`. It must not decide what is a
//! transition (the presence registry does) nor touch connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_queue::ArrayQueue;
use serde_json::json;

use crate::config::Config;

/// Most events in one post.
pub const MAX_BATCH: usize = 100;

/// A batch goes out at most this long after its first event.
pub const BATCH_WINDOW: Duration = Duration::from_millis(100);

/// How often the sender looks at an empty queue.
const IDLE_POLL: Duration = Duration::from_millis(5);

/// First retry delay of a failed post; doubles up to [`MAX_RETRY_DELAY`].
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// What happened (the presence registry's transitions, told by the shards and, for a
/// dead node's members, by the presence mirror).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEvent {
    /// The first subscriber arrived on an exact topic.
    Occupied {
        /// The topic.
        topic: Box<str>,
    },
    /// The last subscriber left it.
    Vacated {
        /// The topic.
        topic: Box<str>,
    },
    /// A member joined (`webhook_presence`).
    Join {
        /// The topic.
        topic: Box<str>,
        /// The member's user, if it has one.
        user: Option<Box<str>>,
        /// The member's client id.
        client_id: String,
    },
    /// A member left (`webhook_presence`).
    Leave {
        /// The topic.
        topic: Box<str>,
        /// The member's user, if it has one.
        user: Option<Box<str>>,
        /// The member's client id.
        client_id: String,
    },
}

impl HookEvent {
    fn to_json(&self, time: SystemTime) -> serde_json::Value {
        let mut at = String::new();
        crate::protocol::push_timestamp(&mut at, time);
        match self {
            Self::Occupied { topic } => json!({"type": "topic_occupied", "topic": topic, "time": at}),
            Self::Vacated { topic } => json!({"type": "topic_vacated", "topic": topic, "time": at}),
            Self::Join { topic, user, client_id } => {
                json!({"type": "join", "topic": topic, "user": user, "client_id": client_id, "time": at})
            }
            Self::Leave { topic, user, client_id } => {
                json!({"type": "leave", "topic": topic, "user": user, "client_id": client_id, "time": at})
            }
        }
    }
}

/// Counters for `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookCounters {
    /// Events posted and answered 2xx.
    pub sent: AtomicU64,
    /// Events dropped: the queue was full, or their batch failed for `webhook_retry_ms`.
    pub dropped: AtomicU64,
    /// Posts that failed (each retried until the batch gives up).
    pub failed_posts: AtomicU64,
}

/// The webhook queue; the sender thread runs while it lives.
pub struct Webhooks {
    queue: ArrayQueue<(HookEvent, SystemTime)>,
    /// Whether joins and leaves are wanted too.
    pub presence: bool,
    /// Counters.
    pub counters: WebhookCounters,
}

impl Webhooks {
    /// The webhooks `config` asks for (none without `webhook_url`), with the sender started.
    pub fn start(config: &Config) -> Option<Arc<Self>> {
        if config.webhook_url.is_empty() {
            return None;
        }
        let hooks = Arc::new(Self {
            queue: ArrayQueue::new(config.webhook_queue_max),
            presence: config.webhook_presence,
            counters: WebhookCounters::default(),
        });
        let sender = Sender {
            hooks: hooks.clone(),
            url: config.webhook_url.clone(),
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, config.webhook_secret.as_bytes()),
            retry_for: Duration::from_millis(config.webhook_retry_ms),
            agent: crate::backend::agent(Duration::from_millis(config.proxy_timeout_ms), 1),
        };
        let started = std::thread::Builder::new().name("volley-webhooks".into()).spawn(move || sender.run());
        if let Err(error) = started {
            tracing::error!(%error, "cannot start the webhook sender; webhooks are off");
            return None;
        }
        Some(hooks)
    }

    /// Queues `event`, stamped now (its `time`: the sender may post it much later while it
    /// retries); dropped (and counted) when the queue is full.
    pub fn push(&self, event: HookEvent) {
        if self.queue.push((event, SystemTime::now())).is_err() {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events waiting.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The events a presence notice means: occupied/vacated when it was the topic's first
    /// join or last leave, and the join or leave itself when presence webhooks are on.
    pub fn tell(&self, notice: &crate::presence::Notice, transitions: bool) {
        let topic = &notice.topic;
        let transition = transitions && notice.transition;
        let member = || (notice.entry.user.clone(), format!("{:x}", notice.entry.conn_id));
        // In the order they happened: occupied before the first join, vacated after the
        // last leave.
        if notice.joined {
            if transition {
                self.push(HookEvent::Occupied { topic: topic.clone() });
            }
            if self.presence {
                let (user, client_id) = member();
                self.push(HookEvent::Join { topic: topic.clone(), user, client_id });
            }
        } else {
            if self.presence {
                let (user, client_id) = member();
                self.push(HookEvent::Leave { topic: topic.clone(), user, client_id });
            }
            if transition {
                self.push(HookEvent::Vacated { topic: topic.clone() });
            }
        }
    }
}

/// The signature header's value for `body`: `sha256=<hex HMAC-SHA256>`.
pub fn signature(key: &ring::hmac::Key, body: &[u8]) -> String {
    let tag = ring::hmac::sign(key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

struct Sender {
    hooks: Arc<Webhooks>,
    url: String,
    key: ring::hmac::Key,
    retry_for: Duration,
    agent: ureq::Agent,
}

impl Sender {
    fn run(self) {
        // The queue's only consumer: it ends with the process.
        loop {
            let batch = self.next_batch();
            self.deliver(&batch);
        }
    }

    /// Waits for an event, then takes up to [`MAX_BATCH`] within [`BATCH_WINDOW`] of it.
    fn next_batch(&self) -> Vec<(HookEvent, SystemTime)> {
        let first = loop {
            match self.hooks.queue.pop() {
                Some(event) => break event,
                None => std::thread::sleep(IDLE_POLL),
            }
        };
        let until = Instant::now() + BATCH_WINDOW;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && Instant::now() < until {
            match self.hooks.queue.pop() {
                Some(event) => batch.push(event),
                None => std::thread::sleep(IDLE_POLL.min(until.saturating_duration_since(Instant::now()))),
            }
        }
        batch
    }

    /// Posts one batch, retrying with backoff until it is taken or `retry_for` passed.
    fn deliver(&self, batch: &[(HookEvent, SystemTime)]) {
        let events: Vec<_> = batch.iter().map(|(event, time)| event.to_json(*time)).collect();
        let body = json!({"events": events}).to_string();
        let signature = signature(&self.key, body.as_bytes());
        let counters = &self.hooks.counters;
        let started = Instant::now();
        let mut delay = FIRST_RETRY_DELAY;
        loop {
            let posted = self
                .agent
                .post(&self.url)
                .header("Content-Type", "application/json")
                .header("X-Volley-Signature", &signature)
                .send(body.as_bytes());
            match posted {
                Ok(response) if response.status().is_success() => {
                    counters.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return;
                }
                Ok(response) => tracing::debug!(status = response.status().as_u16(), "webhook refused"),
                Err(error) => tracing::debug!(%error, "webhook failed"),
            }
            counters.failed_posts.fetch_add(1, Ordering::Relaxed);
            if started.elapsed() + delay > self.retry_for {
                tracing::warn!(events = batch.len(), "webhook batch dropped after retrying");
                counters.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                return;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(MAX_RETRY_DELAY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hex_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            signature(&key, b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let hooks = Webhooks { queue: ArrayQueue::new(2), presence: false, counters: WebhookCounters::default() };
        for _ in 0..5 {
            hooks.push(HookEvent::Occupied { topic: "t".into() });
        }
        assert_eq!((hooks.queued(), hooks.counters.dropped.load(Ordering::Relaxed)), (2, 3));
    }
}
