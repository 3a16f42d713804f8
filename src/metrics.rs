//! Counters and latency histograms, and their two read-outs: `/stats` JSON and
//! Prometheus text.
//!
//! Owns [`ShardCounters`] (atomics each written by one shard, read by anyone, never
//! locked) and [`Latency`] (hdrhistograms a shard owns and records into without any
//! lock; a reader gets copies through the shard's control queue and merges them). It does
//! not decide what is counted: shards and the bus record; this module only stores and
//! renders.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::tls::HandshakeFailure;

/// Counters one shard writes. Aligned to its own cache lines: shards' counters sit side by
/// side in one `Vec`, and a delivery bumps one, so sharing a line would make every
/// delivery on one core invalidate the other cores' copies.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct ShardCounters {
    /// Open WebSocket connections.
    pub websocket: AtomicI64,
    /// Open SSE streams.
    pub sse: AtomicI64,
    /// Open plain HTTP connections.
    pub http: AtomicI64,
    /// Subscriptions held (an SSE stream is one).
    pub subscriptions: AtomicI64,
    /// Events queued to a connection.
    pub deliveries: AtomicU64,
    /// Events written as compressed frames (permessage-deflate).
    pub compressed_deliveries: AtomicU64,
    /// Events dropped because their receiver was too slow.
    pub dropped_slow_consumer: AtomicU64,
    /// Connections closed with 1013.
    pub slow_consumer_disconnects: AtomicU64,
    /// Client messages refused by the rate limit.
    pub rate_limited: AtomicU64,
    /// HTTP requests answered 504 after waiting too long for other shards or the engine.
    pub request_timeouts: AtomicU64,
    /// The shard's write coalescing window, microseconds (0 while it keeps up).
    pub coalescing_us: AtomicU64,
    /// TLS handshakes that failed, by [`HandshakeFailure::index`].
    pub tls_handshake_failures: [AtomicU64; HandshakeFailure::ALL.len()],
}

impl ShardCounters {
    /// Adds `delta` to a gauge.
    pub fn add(gauge: &AtomicI64, delta: i64) {
        gauge.fetch_add(delta, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Latency and size distributions one shard records.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Publish to queued on the connection, microseconds.
    pub publish_to_queue: Histogram<u64>,
    /// Publish to written to the socket, microseconds.
    pub publish_to_write: Histogram<u64>,
    /// Publish to the client's `ack`, microseconds.
    pub publish_to_ack: Histogram<u64>,
    /// Encoded event size, bytes.
    pub event_bytes: Histogram<u64>,
    /// Connections one event was queued to on this shard.
    pub fanout: Histogram<u64>,
}

impl Latency {
    /// What was recorded since `earlier` (a copy of these histograms taken before): the
    /// latency of the last interval, not of the whole run.
    pub fn since(&self, earlier: &Latency) -> Latency {
        let minus = |now: &Histogram<u64>, then: &Histogram<u64>| {
            let mut delta = now.clone();
            // Counts only grow; a failed subtraction (never expected) shows the cumulative.
            if delta.subtract(then).is_err() {
                return now.clone();
            }
            delta
        };
        Latency {
            publish_to_queue: minus(&self.publish_to_queue, &earlier.publish_to_queue),
            publish_to_write: minus(&self.publish_to_write, &earlier.publish_to_write),
            publish_to_ack: minus(&self.publish_to_ack, &earlier.publish_to_ack),
            event_bytes: minus(&self.event_bytes, &earlier.event_bytes),
            fanout: minus(&self.fanout, &earlier.fanout),
        }
    }
}

fn histogram() -> Histogram<u64> {
    // 3 significant digits up to an hour: fixed size, no resizing on the hot path.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap_or_else(|_| unreachable!("static bounds are valid"))
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            publish_to_queue: histogram(),
            publish_to_write: histogram(),
            publish_to_ack: histogram(),
            event_bytes: histogram(),
            fanout: histogram(),
        }
    }
}

impl Latency {
    /// Records a duration in microseconds.
    pub fn record(h: &mut Histogram<u64>, elapsed: Duration) {
        h.saturating_record((elapsed.as_micros() as u64).max(1));
    }

    /// Adds another shard's histograms.
    pub fn merge(&mut self, other: &Latency) {
        let _ = self.publish_to_queue.add(&other.publish_to_queue);
        let _ = self.publish_to_write.add(&other.publish_to_write);
        let _ = self.publish_to_ack.add(&other.publish_to_ack);
        let _ = self.event_bytes.add(&other.event_bytes);
        let _ = self.fanout.add(&other.fanout);
    }
}

/// Percentiles of a histogram as docs/protocol.md's `/stats` shows them (all 0 when empty).
pub fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({"count": 0, "p50": 0, "p90": 0, "p99": 0, "p999": 0, "max": 0});
    }
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.5),
        "p90": h.value_at_quantile(0.9),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

/// Everything `/stats` and `/metrics` show, gathered from all shards.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Per shard: (open connections, inbound queue depth, write coalescing window in µs).
    pub shards: Vec<(i64, usize, u64)>,
    /// Open WebSocket connections.
    pub websocket: i64,
    /// Open SSE streams.
    pub sse: i64,
    /// Open plain HTTP connections.
    pub http: i64,
    /// Subscriptions.
    pub subscriptions: i64,
    /// Events published.
    pub published: u64,
    /// Deliveries queued.
    pub delivered: u64,
    /// Events written compressed.
    pub compressed_deliveries: u64,
    /// TLS handshakes that failed, by reason.
    pub tls_handshake_failures: [u64; HandshakeFailure::ALL.len()],
    /// Deliveries dropped for slow consumers.
    pub dropped_slow_consumer: u64,
    /// Publishes refused because a shard queue was full.
    pub refused_overloaded: u64,
    /// Control messages a full control queue refused.
    pub control_refused: u64,
    /// 1013 disconnects.
    pub slow_consumer_disconnects: u64,
    /// Messages refused by rate limits.
    pub rate_limited: u64,
    /// HTTP requests answered 504.
    pub request_timeouts: u64,
    /// (events, bytes) in the history.
    pub history: (usize, usize),
    /// Merged histograms.
    pub latency: Latency,
    /// Cluster engine, when one runs.
    pub engine: Option<EngineFigures>,
    /// Backend proxy calls.
    pub backend: crate::backend::BackendFigures,
    /// Webhooks, when on: (events sent, dropped, failed posts, queued).
    pub webhooks: Option<(u64, u64, u64, usize)>,
}

impl Snapshot {
    /// Adds one shard's counters.
    pub fn add_shard(&mut self, counters: &ShardCounters, queue_depth: usize) {
        let load = |g: &AtomicI64| g.load(Ordering::Relaxed);
        let (ws, sse, http) = (load(&counters.websocket), load(&counters.sse), load(&counters.http));
        self.shards.push((ws + sse + http, queue_depth, counters.coalescing_us.load(Ordering::Relaxed)));
        self.websocket += ws;
        self.sse += sse;
        self.http += http;
        self.subscriptions += load(&counters.subscriptions);
        self.delivered += counters.deliveries.load(Ordering::Relaxed);
        self.compressed_deliveries += counters.compressed_deliveries.load(Ordering::Relaxed);
        for (total, counter) in self.tls_handshake_failures.iter_mut().zip(&counters.tls_handshake_failures) {
            *total += counter.load(Ordering::Relaxed);
        }
        self.dropped_slow_consumer += counters.dropped_slow_consumer.load(Ordering::Relaxed);
        self.slow_consumer_disconnects += counters.slow_consumer_disconnects.load(Ordering::Relaxed);
        self.rate_limited += counters.rate_limited.load(Ordering::Relaxed);
        self.request_timeouts += counters.request_timeouts.load(Ordering::Relaxed);
    }

    /// The `/stats` document.
    pub fn to_json(&self) -> Value {
        let shards: Vec<Value> = self
            .shards
            .iter()
            .enumerate()
            .map(|(id, (connections, depth, coalescing))| {
                json!({"id": id, "connections": connections, "queue_depth": depth, "coalescing_us": coalescing})
            })
            .collect();
        json!({
            "connections": {
                "total": self.websocket + self.sse + self.http,
                "websocket": self.websocket, "sse": self.sse, "http": self.http,
            },
            "subscriptions": self.subscriptions,
            "events": {
                "published": self.published,
                "delivered": self.delivered,
                "compressed_deliveries": self.compressed_deliveries,
                "dropped": self.dropped_slow_consumer,
            },
            "request_timeouts": self.request_timeouts,
            "slow_consumer_disconnects": self.slow_consumer_disconnects,
            "rate_limited": self.rate_limited,
            "refused_overloaded": self.refused_overloaded,
            "control_refused": self.control_refused,
            "tls_handshake_failures": HandshakeFailure::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), json!(self.tls_handshake_failures[r.index()])))
                .collect::<serde_json::Map<_, _>>(),
            "shards": shards,
            "history": {"events": self.history.0, "bytes": self.history.1},
            "webhooks": self.webhooks.map(|(sent, dropped, failed_posts, queued)| json!({
                "sent": sent, "dropped": dropped, "failed_posts": failed_posts, "queued": queued,
            })),
            "backend": {
                "calls": self.backend.calls.iter().map(|(p, n)| (p.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
                "timeouts": self.backend.timeouts,
                "unavailable": self.backend.unavailable,
                "refused": self.backend.refused,
                "busy": self.backend.busy,
                "undelivered": self.backend.undelivered,
                "in_flight": self.backend.in_flight,
                "threads": self.backend.threads,
            },
            "engine": self.engine,
            "latency_us": {
                "publish_to_queue": percentiles(&self.latency.publish_to_queue),
                "publish_to_write": percentiles(&self.latency.publish_to_write),
                "publish_to_ack": percentiles(&self.latency.publish_to_ack),
            },
            "event_bytes": percentiles(&self.latency.event_bytes),
            "fanout": percentiles(&self.latency.fanout),
        })
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        family(
            "volley_connections",
            "gauge",
            "Open connections by transport.",
            &[
                ("{transport=\"websocket\"}", self.websocket.to_string()),
                ("{transport=\"sse\"}", self.sse.to_string()),
                ("{transport=\"http\"}", self.http.to_string()),
            ],
        );
        family(
            "volley_subscriptions",
            "gauge",
            "Subscriptions held (an SSE stream is one).",
            &[("", self.subscriptions.to_string())],
        );
        family(
            "volley_events_published_total",
            "counter",
            "Events accepted by the bus.",
            &[("", self.published.to_string())],
        );
        family(
            "volley_deliveries_total",
            "counter",
            "Events queued to a connection.",
            &[("", self.delivered.to_string())],
        );
        family(
            "volley_compressed_deliveries_total",
            "counter",
            "Events written as permessage-deflate frames (compressed once, shared by every such connection).",
            &[("", self.compressed_deliveries.to_string())],
        );
        let tls_failures: Vec<(String, String)> = HandshakeFailure::ALL
            .iter()
            .map(|r| (format!("{{reason=\"{}\"}}", r.as_str()), self.tls_handshake_failures[r.index()].to_string()))
            .collect();
        let tls_failures: Vec<(&str, String)> = tls_failures.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
        family(
            "volley_tls_handshake_failures_total",
            "counter",
            "TLS handshakes that failed, by reason.",
            &tls_failures,
        );
        family(
            "volley_dropped_total",
            "counter",
            "Events or messages dropped, by reason.",
            &[
                ("{reason=\"slow_consumer\"}", self.dropped_slow_consumer.to_string()),
                ("{reason=\"overloaded\"}", self.refused_overloaded.to_string()),
                ("{reason=\"control_queue_full\"}", self.control_refused.to_string()),
                ("{reason=\"rate_limited\"}", self.rate_limited.to_string()),
            ],
        );
        let calls: Vec<(String, String)> =
            self.backend.calls.iter().map(|(p, n)| (format!("{{proxy=\"{p}\"}}"), n.to_string())).collect();
        let calls: Vec<(&str, String)> = calls.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
        family("volley_backend_calls_total", "counter", "Backend proxy calls started, by proxy.", &calls);
        family(
            "volley_backend_failures_total",
            "counter",
            "Backend proxy calls that did not get a yes, by outcome (refused, timeout, unavailable) or were not started (busy) or not handed back (undelivered).",
            &[
                ("{outcome=\"refused\"}", self.backend.refused.to_string()),
                ("{outcome=\"timeout\"}", self.backend.timeouts.to_string()),
                ("{outcome=\"unavailable\"}", self.backend.unavailable.to_string()),
                ("{outcome=\"busy\"}", self.backend.busy.to_string()),
                ("{outcome=\"undelivered\"}", self.backend.undelivered.to_string()),
            ],
        );
        if let Some((sent, dropped, failed_posts, _)) = self.webhooks {
            family(
                "volley_webhook_sent_total",
                "counter",
                "Webhook events posted and accepted.",
                &[("", sent.to_string())],
            );
            family(
                "volley_webhook_dropped_total",
                "counter",
                "Webhook events dropped: the queue was full, or their batch kept failing for webhook_retry_ms.",
                &[("", dropped.to_string())],
            );
            family(
                "volley_webhook_failed_posts_total",
                "counter",
                "Webhook posts that failed (each is retried).",
                &[("", failed_posts.to_string())],
            );
        }
        family(
            "volley_backend_calls_in_flight",
            "gauge",
            "Backend proxy calls running now.",
            &[("", self.backend.in_flight.to_string())],
        );
        family(
            "volley_slow_consumer_disconnects_total",
            "counter",
            "Connections closed with 1013.",
            &[("", self.slow_consumer_disconnects.to_string())],
        );
        family(
            "volley_request_timeouts_total",
            "counter",
            "HTTP requests answered 504 after waiting too long for other shards or the engine.",
            &[("", self.request_timeouts.to_string())],
        );
        let per_shard = |value: &dyn Fn(&(i64, usize, u64)) -> String| -> Vec<(String, String)> {
            self.shards.iter().enumerate().map(|(i, shard)| (format!("{{shard=\"{i}\"}}"), value(shard))).collect()
        };
        let depths = per_shard(&|(_, depth, _)| depth.to_string());
        let depths: Vec<(&str, String)> = depths.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
        family("volley_shard_queue_depth", "gauge", "Events waiting in a shard's inbound queue.", &depths);
        let windows = per_shard(&|(_, _, us)| (*us as f64 / 1e6).to_string());
        let windows: Vec<(&str, String)> = windows.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
        family(
            "volley_shard_write_coalescing_seconds",
            "gauge",
            "How long a shard lets events wait for company before writing them (0 while it keeps up).",
            &windows,
        );
        family("volley_history_events", "gauge", "Events retained for resume.", &[("", self.history.0.to_string())]);
        family("volley_history_bytes", "gauge", "Bytes retained for resume.", &[("", self.history.1.to_string())]);
        if let Some(engine) = &self.engine {
            family(
                "volley_engine_up",
                "gauge",
                "1 while every shard of the cluster engine is connected.",
                &[("", u8::from(engine.up).to_string())],
            );
            let shards: Vec<(String, String)> = engine
                .shards
                .iter()
                .map(|s| (format!("{{shard=\"{}\"}}", s.shard), u8::from(s.up).to_string()))
                .collect();
            let shards: Vec<(&str, String)> = shards.iter().map(|(l, v)| (l.as_str(), v.clone())).collect();
            family("volley_engine_shard_up", "gauge", "1 while this engine shard is connected.", &shards);
            family(
                "volley_engine_ingested_total",
                "counter",
                "Events this node read from the engine.",
                &[("", engine.ingested.to_string())],
            );
            family(
                "volley_engine_reconnects_total",
                "counter",
                "Reconnections to the cluster engine.",
                &[("", engine.reconnects.to_string())],
            );
            family(
                "volley_engine_lag_seconds",
                "gauge",
                "Age of the newest event read from the engine when read.",
                &[("", (engine.lag_us as f64 / 1e6).to_string())],
            );
        }
        for (name, help, h) in [
            ("volley_publish_to_queue_seconds", "Publish to queued on a connection.", &self.latency.publish_to_queue),
            ("volley_publish_to_write_seconds", "Publish to written to the socket.", &self.latency.publish_to_write),
            ("volley_publish_to_ack_seconds", "Publish to the client's ack.", &self.latency.publish_to_ack),
        ] {
            push_histogram(&mut out, name, help, h);
        }
        out
    }
}

/// Bucket bounds in seconds: 50 µs to 10 s.
const BUCKETS: [f64; 16] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

fn push_histogram(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut sum_us = 0f64;
    for v in h.iter_recorded() {
        sum_us += v.value_iterated_to() as f64 * v.count_at_value() as f64;
    }
    for bound in BUCKETS {
        let us = (bound * 1e6) as u64;
        let count: u64 = h.iter_recorded().filter(|v| v.value_iterated_to() <= us).map(|v| v.count_at_value()).sum();
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    let _ = writeln!(out, "{name}_sum {}", sum_us / 1e6);
    let _ = writeln!(out, "{name}_count {}", h.len());
}

/// What a stats reader wants rendered once every shard has answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatsFormat {
    /// `GET /stats`.
    Json,
    /// `GET /metrics`.
    Prometheus,
    /// WebSocket `request` `stats`; the reply's `correlation_id`.
    WsResponse(Option<String>),
    /// One push of `GET /stats/stream` (the dashboard's feed).
    SsePush,
}

/// A stats read in progress: each shard adds a copy of its histograms, and the last one
/// hands the result back to the asking shard.
#[derive(Debug)]
pub struct Gather {
    remaining: std::sync::atomic::AtomicUsize,
    /// Some shard could not be asked (its control queue was full): answered `overloaded`.
    failed: std::sync::atomic::AtomicBool,
    latency: std::sync::Mutex<Latency>,
    /// Gathers in flight in the process, one of which this is until dropped.
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Gather {
    /// A read that `shards` shards must answer, taking one of `max` places in `in_flight`
    /// (each gather merges its own copy of the histograms, about 1 MB); `None` when every
    /// place is taken.
    pub fn new(shards: usize, in_flight: &std::sync::Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Self {
            remaining: std::sync::atomic::AtomicUsize::new(shards),
            failed: Default::default(),
            latency: std::sync::Mutex::new(Latency::default()),
            in_flight: in_flight.clone(),
        })
    }

    /// Adds one shard's histograms; true for the last shard.
    pub fn add(&self, latency: &Latency) -> bool {
        self.latency.lock().unwrap_or_else(|p| p.into_inner()).merge(latency);
        self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// `shards` shards could not be asked and will never add: the read fails. True when
    /// no other shard is left to report (the caller answers now).
    pub fn refused(&self, shards: usize) -> bool {
        self.failed.store(true, Ordering::Release);
        self.remaining.fetch_sub(shards, Ordering::AcqRel) == shards
    }

    /// Whether some shard could not be asked.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The merged histograms.
    pub fn latency(&self) -> Latency {
        self.latency.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for Gather {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The engine as `/stats` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineFigures {
    /// Every shard is up.
    pub up: bool,
    /// Reconnections of every Redis connection.
    pub reconnects: u64,
    /// Age of the newest event read when read, µs.
    pub lag_us: u64,
    /// Events this node read from the engine.
    pub ingested: u64,
    /// Per shard.
    pub shards: Vec<ShardReport>,
}

/// One shard's state for `/stats`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ShardReport {
    /// Logical shard.
    pub shard: u32,
    /// Where its stream lives.
    pub server: String,
    /// This node reads it.
    pub reading: bool,
    /// Newest stream id read (`""`: none).
    pub last_id: String,
    /// Its writer and reader are connected.
    pub up: bool,
}
