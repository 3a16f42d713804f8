//! Configuration: defaults, the TOML file, `VOLLEY_*` environment overrides, validation.
//!
//! Owns [`Config`], the one immutable settings value every other module reads. Loading
//! layers, lowest first: embedded defaults, the TOML file, `VOLLEY_<KEY>` environment
//! variables, command-line flags. It must not start anything or touch sockets; a bad value
//! is a [`ConfigError`] naming the key.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every setting, with docs/protocol.md's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the one listener serving every route.
    pub listen: SocketAddr,
    /// PEM file with the TLS certificate chain (leaf first); empty: no TLS.
    pub tls_cert: String,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key: String,
    /// A second listener speaking TLS while `listen` stays plain; empty: with a
    /// certificate, `listen` itself speaks TLS.
    pub listen_tls: String,
    /// An internal listener for operators: `/stats`, `/metrics`, `/dashboard` (and
    /// `/stats/stream`, `/health`) move there from `listen`; empty: they stay on `listen`.
    pub admin_listen: String,
    /// Serve the live dashboard (`/dashboard`, `/stats/stream`).
    pub dashboard: bool,
    /// Reactor threads; 0 means one per available core.
    pub shards: usize,
    /// TCP connections at once, every kind counted.
    pub max_connections: usize,
    /// TCP connections at once from one IP address.
    pub max_connections_per_ip: usize,
    /// Largest WebSocket message in, and largest encoded event.
    pub max_message_bytes: usize,
    /// Largest HTTP request body.
    pub max_body_bytes: usize,
    /// Subscriptions one WebSocket connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// Bytes of state one connection may make the broker keep (subscriptions, patterns,
    /// sources, ids, presence entries and their info, pending requests, replay cursors).
    pub max_connection_state_bytes: usize,
    /// Sustained messages per second one connection may send.
    pub rate_per_second: u32,
    /// Messages one connection may send in a burst.
    pub rate_burst: u32,
    /// Seconds of continuous rate limiting before a WebSocket is closed with 1008.
    pub rate_limit_close_after_ms: u64,
    /// HTTP publish requests per second from one IP address (over: 429).
    pub publish_rate_per_ip: u32,
    /// HTTP publish requests one IP address may send in a burst.
    pub publish_burst_per_ip: u32,
    /// Bytes queued for one connection before it is closed as a slow consumer (1013).
    pub max_outbound_bytes: usize,
    /// Events kept for resume and `/history`.
    pub history_max_events: usize,
    /// Age after which a retained event is dropped.
    pub history_max_age_ms: u64,
    /// Bytes of encoded events kept, whatever their count.
    pub history_max_bytes: usize,
    /// Interval of WebSocket pings and SSE `: ping` comments.
    pub heartbeat_interval_ms: u64,
    /// Reconnect delay told to clients (`retry:`, connect `ack`).
    pub reconnect_delay_ms: u64,
    /// Longest graceful drain on SIGTERM/SIGINT.
    pub drain_timeout_ms: u64,
    /// Time a client has to send a whole request head.
    pub http_header_timeout_ms: u64,
    /// Time an idle keep-alive HTTP connection is kept.
    pub http_idle_timeout_ms: u64,
    /// Time a request waiting on other shards or the engine (`/publish?wait=1`, `/stats`,
    /// a publish through a stalled engine) waits before it is answered `504`.
    pub http_request_timeout_ms: u64,
    /// Events waiting in one shard's inbound queue before publishes are refused.
    pub shard_queue_capacity: usize,
    /// Shortest time a connection's events wait for company before being written; 0 writes
    /// them in the loop turn that queued them.
    pub write_coalescing_min_ms: u64,
    /// Longest such wait when a shard falls behind; 0 never lets events wait.
    pub write_coalescing_max_ms: u64,
    /// Most members a `presence` answer lists (the rest: `truncated: true`).
    pub presence_max_entries: usize,
    /// Largest presence `info` (the token claim or the subscribe payload's), JSON bytes.
    pub presence_info_max_bytes: usize,
    /// With the Redis engine: a node's presence entries outlive it by at most this.
    pub presence_ttl_ms: u64,
    /// Agree to permessage-deflate (RFC 7692) with WebSocket clients that offer it.
    pub compression: bool,
    /// Events whose JSON is shorter go uncompressed even where deflate was agreed.
    pub compression_min_bytes: usize,
    /// `memory` (single node); `redis://host:port[/db]` (a cluster sharing one stream);
    /// several `redis://` URLs, comma-separated (streams sharded over those servers); or
    /// `redis+cluster://host:port,host:port` (streams sharded over a Redis Cluster).
    pub engine: String,
    /// Redis stream key holding the cluster's events (with several shards, the prefix of
    /// each shard's stream `<redis_stream>:{<n>}`).
    pub redis_stream: String,
    /// Logical shards topics are placed on; 0: one per server, 16 on a Redis Cluster.
    pub engine_shards: u32,
    /// Leading topic segments that place a topic (`chat.room1` with 1: `chat`).
    pub shard_key_segments: usize,
    /// HS256 secret for JWTs; empty turns auth off (everyone may do everything).
    pub jwt_secret: String,
    /// Time a WebSocket has to authenticate when it connected without a token.
    pub auth_timeout_ms: u64,
    /// Origins allowed for CORS and WebSocket upgrades; `*` allows any.
    pub allowed_origins: Vec<String>,
    /// Testing only: a WebSocket route that echoes messages (for Autobahn). Empty: off.
    pub echo_path: String,
    /// `tracing` filter, e.g. `info` or `volley=debug`.
    pub log_level: String,
    /// How log lines are written to stderr.
    pub log_format: LogFormat,
    /// Backend called when a WebSocket or SSE connection has no valid token; empty: off.
    pub proxy_connect_url: String,
    /// Call the connect proxy for every connection, token or not.
    pub proxy_connect_always: bool,
    /// Backend asked before a subscription to topics the grant does not cover; empty: off.
    pub proxy_subscribe_url: String,
    /// Backend asked before each client publish (not HTTP `/publish`); empty: off.
    pub proxy_publish_url: String,
    /// Backend answering `request` action `rpc`; empty: off.
    pub proxy_rpc_url: String,
    /// A backend call without an answer by then is answered `backend_timeout`.
    pub proxy_timeout_ms: u64,
    /// Backend calls running at once in the process.
    pub proxy_max_in_flight: usize,
    /// Backend calls one connection may have running at once.
    pub proxy_max_in_flight_per_connection: usize,
    /// Where topic occupied/vacated (and, opt-in, join/leave) events are posted; empty: off.
    pub webhook_url: String,
    /// Key of the `X-Volley-Signature` HMAC-SHA256 of each webhook body.
    pub webhook_secret: String,
    /// Also post presence joins and leaves.
    pub webhook_presence: bool,
    /// How long a webhook batch is retried (with backoff) before it is dropped.
    pub webhook_retry_ms: u64,
    /// Webhook events waiting to be posted; past it they are dropped (counted).
    pub webhook_queue_max: usize,
}

/// Most logical engine shards: each is a writer and a reader thread with its own
/// connection, and each event id names a position per shard read.
pub const MAX_ENGINE_SHARDS: u32 = 64;

/// A Redis engine's servers and how topics are placed on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineSpec {
    /// `urls` are the seed nodes of one Redis Cluster, not independent servers.
    pub cluster: bool,
    /// `redis://` URLs: the servers (shard `n` lives on `jump(n, urls.len())`), or the
    /// cluster's seeds.
    pub urls: Vec<String>,
    /// Topics on logical shards.
    pub placement: crate::placement::Placement,
}

impl EngineSpec {
    /// Index in `urls` of the server holding shard `shard`'s stream: shards go round the
    /// servers, so with as many shards as servers each holds one, and adding a server
    /// (with `engine_shards` left to default) keeps every existing shard where it was.
    pub fn server_index(&self, shard: u32) -> usize {
        shard as usize % self.urls.len()
    }

    /// Where shard `shard`'s stream lives, for `/stats` and `/health`.
    pub fn server_of(&self, shard: u32) -> &str {
        if self.cluster { "cluster" } else { &self.urls[self.server_index(shard)] }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert: String::new(),
            tls_key: String::new(),
            listen_tls: String::new(),
            admin_listen: String::new(),
            dashboard: true,
            shards: 0,
            max_connections: 65_536,
            max_connections_per_ip: 4_096,
            max_message_bytes: 64 * 1024,
            max_body_bytes: 1024 * 1024,
            max_subscriptions_per_connection: 128,
            max_connection_state_bytes: 256 * 1024,
            rate_per_second: 1_000,
            rate_burst: 2_000,
            rate_limit_close_after_ms: 5_000,
            publish_rate_per_ip: 10_000,
            publish_burst_per_ip: 20_000,
            max_outbound_bytes: 1024 * 1024,
            history_max_events: 10_000,
            history_max_age_ms: 300_000,
            history_max_bytes: 64 * 1024 * 1024,
            heartbeat_interval_ms: 25_000,
            reconnect_delay_ms: 1_000,
            drain_timeout_ms: 10_000,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_ms: 60_000,
            http_request_timeout_ms: 10_000,
            shard_queue_capacity: 65_536,
            write_coalescing_min_ms: 0,
            write_coalescing_max_ms: 200,
            presence_max_entries: 1000,
            presence_info_max_bytes: 1024,
            presence_ttl_ms: 30_000,
            compression: true,
            compression_min_bytes: 256,
            engine: "memory".into(),
            redis_stream: "volley:events".into(),
            engine_shards: 0,
            shard_key_segments: 1,
            jwt_secret: String::new(),
            auth_timeout_ms: 10_000,
            allowed_origins: vec!["*".into()],
            echo_path: String::new(),
            log_level: "info".into(),
            log_format: LogFormat::Human,
            proxy_connect_url: String::new(),
            proxy_connect_always: false,
            proxy_subscribe_url: String::new(),
            proxy_publish_url: String::new(),
            proxy_rpc_url: String::new(),
            proxy_timeout_ms: 5_000,
            proxy_max_in_flight: 1_024,
            proxy_max_in_flight_per_connection: 16,
            webhook_url: String::new(),
            webhook_secret: String::new(),
            webhook_presence: false,
            webhook_retry_ms: 60_000,
            webhook_queue_max: 65_536,
        }
    }
}

/// How log lines are written (`log_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text for people to read; coloured when stderr is a terminal.
    Human,
    /// One JSON object per line, for a log collector.
    Json,
}

/// One listening address and what it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// Where.
    pub addr: SocketAddr,
    /// Speaks TLS.
    pub tls: bool,
    /// The operators' listener (`admin_listen`).
    pub admin: bool,
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{path} is not valid TOML: {message}")]
    Syntax {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A key has a value it cannot take.
    #[error("invalid value for `{key}`: {message}")]
    Invalid {
        /// The key, as in the file (`VOLLEY_` + upper case in the environment).
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The keys, in file order, as the environment sees them after `VOLLEY_`.
fn keys() -> Vec<String> {
    match toml::Table::try_from(Config::default()) {
        Ok(table) => table.keys().cloned().collect(),
        Err(_) => Vec::new(),
    }
}

impl Config {
    /// Loads defaults, then `file` if given, then `VOLLEY_*` variables from `env`.
    pub fn load(file: Option<&Path>, env: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut table = match file {
            None => toml::Table::new(),
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: shown.clone(), source })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Syntax { path: shown, message: e.message().to_string() })?
            }
        };
        let known = keys();
        for (name, value) in env {
            let Some(key) = name.strip_prefix("VOLLEY_").map(str::to_ascii_lowercase) else {
                continue;
            };
            if !known.contains(&key) {
                continue;
            }
            table.insert(key.clone(), env_value(&key, &value));
        }
        for key in table.keys() {
            if !known.contains(key) {
                return Err(ConfigError::Invalid { key: key.clone(), message: "unknown key".into() });
            }
        }
        // Each key on its own first, so a type error names its key.
        for (key, value) in &table {
            let mut one = toml::Table::new();
            one.insert(key.clone(), value.clone());
            toml::Value::Table(one)
                .try_into::<Config>()
                .map_err(|e| ConfigError::Invalid { key: key.clone(), message: e.message().to_string() })?;
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e| ConfigError::Invalid { key: "?".into(), message: e.message().to_string() })?;
        config.validate()?;
        Ok(config)
    }

    /// Where connections are accepted: `listen` (TLS when a certificate is set and
    /// `listen_tls` is not), `listen_tls` if set, then `admin_listen` if set (plain).
    pub fn listeners(&self) -> Vec<Listen> {
        let tls = !self.tls_cert.is_empty();
        let mut out = match self.listen_tls.parse::<SocketAddr>() {
            Ok(listen_tls) if tls => vec![
                Listen { addr: self.listen, tls: false, admin: false },
                Listen { addr: listen_tls, tls: true, admin: false },
            ],
            _ => vec![Listen { addr: self.listen, tls, admin: false }],
        };
        if let Ok(admin) = self.admin_listen.parse::<SocketAddr>() {
            out.push(Listen { addr: admin, tls: false, admin: true });
        }
        out
    }

    /// Where a Redis engine keeps its streams: `Err` says why `engine` names none.
    pub fn engine_spec(&self) -> Result<EngineSpec, String> {
        let (cluster, list) = match self.engine.strip_prefix("redis+cluster://") {
            Some(rest) => (true, rest),
            None => (false, self.engine.as_str()),
        };
        let urls: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| if cluster && !u.starts_with("redis://") { format!("redis://{u}") } else { u.to_string() })
            .collect();
        if urls.is_empty() || urls.iter().any(|u| !u.starts_with("redis://")) {
            return Err(format!(
                "{:?} is neither \"memory\", redis:// URLs (comma-separated) nor redis+cluster://host:port,...",
                self.engine
            ));
        }
        let shards = match self.engine_shards {
            0 if cluster => 16,
            0 => urls.len() as u32,
            n => n,
        };
        let placement = crate::placement::Placement::new(shards, self.shard_key_segments);
        Ok(EngineSpec { cluster, urls, placement })
    }

    /// The history bounds.
    pub fn retention(&self) -> crate::history::Retention {
        crate::history::Retention {
            max_events: self.history_max_events,
            max_age: Duration::from_millis(self.history_max_age_ms),
            max_bytes: self.history_max_bytes,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&str, u64); 24] = [
            ("webhook_queue_max", self.webhook_queue_max as u64),
            ("proxy_timeout_ms", self.proxy_timeout_ms),
            ("proxy_max_in_flight", self.proxy_max_in_flight as u64),
            ("proxy_max_in_flight_per_connection", self.proxy_max_in_flight_per_connection as u64),
            ("presence_ttl_ms", self.presence_ttl_ms),
            ("publish_rate_per_ip", self.publish_rate_per_ip as u64),
            ("publish_burst_per_ip", self.publish_burst_per_ip as u64),
            ("auth_timeout_ms", self.auth_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("max_connections_per_ip", self.max_connections_per_ip as u64),
            ("max_message_bytes", self.max_message_bytes as u64),
            ("max_body_bytes", self.max_body_bytes as u64),
            ("max_subscriptions_per_connection", self.max_subscriptions_per_connection as u64),
            ("max_connection_state_bytes", self.max_connection_state_bytes as u64),
            ("rate_per_second", self.rate_per_second as u64),
            ("rate_burst", self.rate_burst as u64),
            ("max_outbound_bytes", self.max_outbound_bytes as u64),
            ("history_max_age_ms", self.history_max_age_ms),
            ("history_max_bytes", self.history_max_bytes as u64),
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("http_header_timeout_ms", self.http_header_timeout_ms),
            ("http_idle_timeout_ms", self.http_idle_timeout_ms),
            ("http_request_timeout_ms", self.http_request_timeout_ms),
            ("shard_queue_capacity", self.shard_queue_capacity as u64),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(ConfigError::Invalid { key: key.into(), message: "must be greater than 0".into() });
            }
        }
        if self.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid {
                key: "max_message_bytes".into(),
                message: format!("{} is below the minimum of 1024", self.max_message_bytes),
            });
        }
        if self.max_outbound_bytes < self.max_message_bytes {
            return Err(ConfigError::Invalid {
                key: "max_outbound_bytes".into(),
                message: format!("{} is below max_message_bytes ({})", self.max_outbound_bytes, self.max_message_bytes),
            });
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            let key = if self.tls_cert.is_empty() { "tls_cert" } else { "tls_key" };
            return Err(ConfigError::Invalid { key: key.into(), message: "tls_cert and tls_key go together".into() });
        }
        if !self.listen_tls.is_empty() {
            if self.tls_cert.is_empty() {
                return Err(ConfigError::Invalid {
                    key: "listen_tls".into(),
                    message: "needs tls_cert and tls_key".into(),
                });
            }
            self.listen_tls.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                key: "listen_tls".into(),
                message: format!("{:?} is not host:port: {e}", self.listen_tls),
            })?;
        }
        for (key, url) in [
            ("proxy_connect_url", &self.proxy_connect_url),
            ("proxy_subscribe_url", &self.proxy_subscribe_url),
            ("proxy_publish_url", &self.proxy_publish_url),
            ("proxy_rpc_url", &self.proxy_rpc_url),
            ("webhook_url", &self.webhook_url),
        ] {
            // Backends sit beside the broker (loopback or a private network): plain HTTP.
            if !url.is_empty() && !url.starts_with("http://") {
                return Err(ConfigError::Invalid {
                    key: key.into(),
                    message: format!("{url:?} is not an http:// URL"),
                });
            }
        }
        if !self.admin_listen.is_empty() {
            self.admin_listen.parse::<SocketAddr>().map_err(|e| ConfigError::Invalid {
                key: "admin_listen".into(),
                message: format!("{:?} is not host:port: {e}", self.admin_listen),
            })?;
        }
        if !self.echo_path.is_empty() && !self.echo_path.starts_with('/') {
            return Err(ConfigError::Invalid { key: "echo_path".into(), message: "must start with /".into() });
        }
        if self.engine != "memory" {
            self.engine_spec().map_err(|message| ConfigError::Invalid { key: "engine".into(), message })?;
        }
        if self.engine_shards > MAX_ENGINE_SHARDS {
            return Err(ConfigError::Invalid {
                key: "engine_shards".into(),
                message: format!("{} is over {MAX_ENGINE_SHARDS}", self.engine_shards),
            });
        }
        if self.shard_key_segments == 0 {
            return Err(ConfigError::Invalid {
                key: "shard_key_segments".into(),
                message: "must be at least 1".into(),
            });
        }
        if self.write_coalescing_max_ms > 1000 {
            return Err(ConfigError::Invalid {
                key: "write_coalescing_max_ms".into(),
                message: format!("{} is over 1000", self.write_coalescing_max_ms),
            });
        }
        if self.write_coalescing_min_ms > self.write_coalescing_max_ms {
            return Err(ConfigError::Invalid {
                key: "write_coalescing_min_ms".into(),
                message: format!(
                    "{} is over write_coalescing_max_ms ({})",
                    self.write_coalescing_min_ms, self.write_coalescing_max_ms
                ),
            });
        }
        if self.shards > 1024 {
            return Err(ConfigError::Invalid {
                key: "shards".into(),
                message: format!("{} is over 1024", self.shards),
            });
        }
        Ok(())
    }

    /// The number of shard threads to run.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 { self.shards } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) }
    }

    /// The configuration as TOML, every key shown.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Whether an `Origin` header value may use the broker from a browser.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }

    /// [`Self::heartbeat_interval_ms`] as a duration.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
}

/// Reads an environment value as the TOML type its key expects: numbers as integers,
/// lists from commas, anything else as a string (so a typo still names the key).
fn env_value(key: &str, raw: &str) -> toml::Value {
    let default = toml::Table::try_from(Config::default()).ok().and_then(|t| t.get(key).cloned());
    match default {
        Some(toml::Value::Integer(_)) => match raw.trim().replace('_', "").parse::<i64>() {
            Ok(n) => toml::Value::Integer(n),
            Err(_) => toml::Value::String(raw.into()),
        },
        Some(toml::Value::Boolean(_)) => match raw.trim() {
            "true" | "1" => toml::Value::Boolean(true),
            "false" | "0" => toml::Value::Boolean(false),
            _ => toml::Value::String(raw.into()),
        },
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| toml::Value::String(s.into())).collect(),
        ),
        _ => toml::Value::String(raw.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_match_protocol() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.max_message_bytes, 65_536);
        assert_eq!(c.heartbeat_interval_ms, 25_000);
        assert_eq!(c.allowed_origins, vec!["*"]);
    }

    #[test]
    fn env_overrides_and_errors_name_the_key() {
        let c = Config::load(
            None,
            env(&[("VOLLEY_MAX_OUTBOUND_BYTES", "131072"), ("VOLLEY_ALLOWED_ORIGINS", "http://a, http://b")]),
        )
        .unwrap();
        assert_eq!(c.max_outbound_bytes, 131_072);
        assert_eq!(c.allowed_origins, vec!["http://a", "http://b"]);
        let err = Config::load(None, env(&[("VOLLEY_MAX_MESSAGE_BYTES", "lots")])).unwrap_err();
        assert!(err.to_string().contains("max_message_bytes"), "{err}");
        let err = Config::load(None, env(&[("VOLLEY_HEARTBEAT_INTERVAL_MS", "0")])).unwrap_err();
        assert!(err.to_string().contains("heartbeat_interval_ms"), "{err}");
    }

    #[test]
    fn log_format_is_human_or_json() {
        assert_eq!(Config::load(None, env(&[])).unwrap().log_format, LogFormat::Human);
        let c = Config::load(None, env(&[("VOLLEY_LOG_FORMAT", "json")])).unwrap();
        assert_eq!(c.log_format, LogFormat::Json);
        let err = Config::load(None, env(&[("VOLLEY_LOG_FORMAT", "xml")])).unwrap_err();
        assert!(err.to_string().contains("log_format"), "{err}");
    }

    #[test]
    fn example_file_lists_every_key_with_its_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("volley.example.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table.keys().cloned().collect::<Vec<_>>().len(), keys().len(), "every key is in the example");
        assert_eq!(Config::load(Some(&path), env(&[])).unwrap(), Config::default());
    }

    #[test]
    fn file_layer_and_unknown_keys() {
        let dir = std::env::temp_dir().join(format!("volley-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.toml");
        std::fs::write(&path, "max_connections = 10\nlisten = \"127.0.0.1:9\"\n").unwrap();
        let c = Config::load(Some(&path), env(&[("VOLLEY_MAX_CONNECTIONS", "20")])).unwrap();
        assert_eq!(c.max_connections, 20);
        assert_eq!(c.listen.port(), 9);
        std::fs::write(&path, "max_conections = 10\n").unwrap();
        let err = Config::load(Some(&path), env(&[])).unwrap_err();
        assert!(err.to_string().contains("max_conections"), "{err}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
