//! The JSON wire protocol of docs/protocol.md: what clients send and what the server says.
//!
//! Owns parsing of client envelopes and their payloads, validation of events to publish
//! (with the offending field named), and the byte layout of every server message,
//! including the one encoding of an event that all receivers share. Pure functions over
//! bytes and values: no sockets, no clocks except a caller-supplied time, no shard state.

use std::time::SystemTime;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};

use crate::topic::{self, Pattern};

/// Error codes sent in WebSocket `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Not JSON.
    InvalidJson,
    /// JSON of the wrong shape, a binary frame, or an event over size.
    InvalidMessage,
    /// `type` not one of the client types.
    UnknownType,
    /// `request` with an unknown `action`.
    UnknownAction,
    /// `unsubscribe` of an id this connection does not hold.
    UnknownSubscription,
    /// `subscribe` reusing an id on this connection.
    DuplicateSubscription,
    /// A topic or pattern outside the grammar.
    InvalidTopic,
    /// Not allowed by the token's claims.
    Forbidden,
    /// Over the message rate.
    RateLimited,
    /// Not (yet) authenticated.
    Unauthorized,
    /// Over `max_subscriptions_per_connection`.
    TooManySubscriptions,
    /// The cluster engine cannot take a publish now.
    EngineUnavailable,
    /// HTTP: a request volley cannot serve as sent (also a bad `limit`).
    BadRequest,
    /// HTTP: an event in a publish body of the wrong shape.
    InvalidEvent,
    /// HTTP: no such route.
    NotFound,
    /// HTTP: the route does not take this method.
    MethodNotAllowed,
    /// HTTP: a body or event over its size limit.
    TooLarge,
    /// HTTP: a request head over its size limit.
    HeadTooLarge,
    /// HTTP: over `max_connections` (503) or `max_connections_per_ip` (429).
    TooManyConnections,
    /// HTTP: a request waited too long for other shards or the engine.
    Timeout,
    /// Over a per-connection limit on what the broker keeps for a client: the state
    /// budget (`max_connection_state_bytes`), sources per subscription, bytes per id.
    LimitExceeded,
    /// A queue between the broker's threads is full; try again shortly.
    Overloaded,
    /// A backend proxy did not answer within `proxy_timeout_ms`.
    BackendTimeout,
    /// A backend proxy is unreachable or answered with a non-2xx status.
    BackendUnavailable,
}

impl ErrorCode {
    /// The HTTP status this code is answered with (a few callers pick a sibling status:
    /// 411 and 426 for `bad_request`, 429 for `too_many_connections` from one address).
    pub fn http_status(self) -> u16 {
        match self {
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::TooLarge => 413,
            Self::RateLimited => 429,
            Self::HeadTooLarge => 431,
            Self::EngineUnavailable | Self::TooManyConnections | Self::Overloaded => 503,
            Self::Timeout | Self::BackendTimeout => 504,
            Self::BackendUnavailable => 502,
            _ => 400,
        }
    }

    /// The code in HTTP's vocabulary (docs/protocol.md's HTTP list): message-level codes of the
    /// WebSocket protocol become `invalid_event` (a publish body) or `bad_request`.
    pub fn for_http(self) -> Self {
        match self {
            Self::InvalidMessage => Self::InvalidEvent,
            Self::UnknownType
            | Self::UnknownAction
            | Self::UnknownSubscription
            | Self::DuplicateSubscription
            | Self::TooManySubscriptions => Self::BadRequest,
            other => other,
        }
    }

    /// The code in the WebSocket protocol's vocabulary: HTTP-only codes become
    /// `invalid_message`.
    pub fn for_websocket(self) -> Self {
        match self {
            Self::BadRequest
            | Self::InvalidEvent
            | Self::NotFound
            | Self::MethodNotAllowed
            | Self::TooLarge
            | Self::HeadTooLarge
            | Self::TooManyConnections
            | Self::Timeout => Self::InvalidMessage,
            other => other,
        }
    }

    /// The code as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidMessage => "invalid_message",
            Self::UnknownType => "unknown_type",
            Self::UnknownAction => "unknown_action",
            Self::UnknownSubscription => "unknown_subscription",
            Self::DuplicateSubscription => "duplicate_subscription",
            Self::InvalidTopic => "invalid_topic",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::Unauthorized => "unauthorized",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::EngineUnavailable => "engine_unavailable",
            Self::BadRequest => "bad_request",
            Self::InvalidEvent => "invalid_event",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooLarge => "too_large",
            Self::HeadTooLarge => "head_too_large",
            Self::TooManyConnections => "too_many_connections",
            Self::Timeout => "timeout",
            Self::LimitExceeded => "limit_exceeded",
            Self::Overloaded => "overloaded",
            Self::BackendTimeout => "backend_timeout",
            Self::BackendUnavailable => "backend_unavailable",
        }
    }
}

/// A refused client message: the code, a human message, and for HTTP the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What kind of fault.
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
    /// The offending field (`topic`, `[3].topic`), if one.
    pub field: Option<String>,
    /// An rpc refused by the backend: the backend's own code, sent in place of `code`'s.
    pub backend_code: Option<String>,
}

impl Rejection {
    /// A rejection without a field.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None, backend_code: None }
    }

    /// A refusal by a backend that the client sees under the backend's own code.
    pub fn from_backend(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self { backend_code: Some(code.into()), ..Self::new(ErrorCode::Forbidden, message) }
    }

    fn at(code: ErrorCode, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: Some(field.into()), backend_code: None }
    }
}

/// One event a publisher asked to publish, validated.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// A valid concrete topic.
    pub topic: String,
    /// `""` when absent.
    pub source: String,
    /// Correlation id, if any.
    pub correlation_id: Option<String>,
    /// The `data` JSON text, `null` when absent.
    pub data: Box<RawValue>,
}

#[derive(Deserialize)]
struct RawEvent {
    topic: Option<Value>,
    source: Option<Value>,
    correlation_id: Option<Value>,
    data: Option<Box<RawValue>>,
}

fn null_raw() -> Box<RawValue> {
    RawValue::from_string("null".into()).unwrap_or_else(|_| unreachable!("`null` is JSON"))
}

impl PublishRequest {
    /// Validates one event object; `prefix` is prepended to field names (`[3].`).
    pub fn from_json(raw: &RawValue, prefix: &str) -> Result<Self, Rejection> {
        let field = |name: &str| format!("{prefix}{name}");
        let whole = if prefix.is_empty() { "event".to_string() } else { prefix.trim_end_matches('.').to_string() };
        let event: RawEvent = serde_json::from_str(raw.get())
            .map_err(|_| Rejection::at(ErrorCode::InvalidMessage, whole, "an event must be a JSON object"))?;
        let topic = match event.topic {
            Some(Value::String(t)) => t,
            Some(_) => return Err(Rejection::at(ErrorCode::InvalidTopic, field("topic"), "topic must be a string")),
            None => return Err(Rejection::at(ErrorCode::InvalidTopic, field("topic"), "topic is required")),
        };
        topic::validate_topic(&topic).map_err(|e| {
            Rejection::at(ErrorCode::InvalidTopic, field("topic"), format!("invalid topic {topic:?}: {e}"))
        })?;
        let source = match event.source {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(Rejection::at(ErrorCode::InvalidMessage, field("source"), "source must be a string"));
            }
        };
        let correlation_id = match event.correlation_id {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                return Err(Rejection::at(
                    ErrorCode::InvalidMessage,
                    field("correlation_id"),
                    "correlation_id must be a string or null",
                ));
            }
        };
        Ok(Self { topic, source, correlation_id, data: event.data.unwrap_or_else(null_raw) })
    }

    /// Everything of the event message after the timestamp, so the bus only has to put
    /// the id and time in front: `","correlation_id":…,"payload":{…}}`.
    pub fn encoded_tail(&self) -> String {
        let mut out = String::with_capacity(64 + self.topic.len() + self.source.len() + self.data.get().len());
        out.push_str("\",\"correlation_id\":");
        push_json_opt(&mut out, self.correlation_id.as_deref());
        out.push_str(",\"payload\":{\"topic\":");
        push_json_str(&mut out, &self.topic);
        out.push_str(",\"source\":");
        push_json_str(&mut out, &self.source);
        out.push_str(",\"data\":");
        out.push_str(self.data.get());
        out.push_str("}}");
        out
    }
}

/// The event message head before the id: the tail of [`PublishRequest::encoded_tail`]
/// and these pieces make the whole message.
pub const EVENT_HEAD: &str = "{\"type\":\"event\",\"message_id\":\"";
/// Between the id and the timestamp.
pub const EVENT_MID: &str = "\",\"timestamp\":\"";

/// Parses a `POST /publish` body: one event object or an array of 1 to `max_events`.
pub fn parse_publish_body(body: &[u8], max_events: usize) -> Result<Vec<PublishRequest>, Rejection> {
    let text = std::str::from_utf8(body).map_err(|_| Rejection::new(ErrorCode::InvalidJson, "body is not UTF-8"))?;
    let raw: &RawValue = serde_json::from_str(text)
        .map_err(|e| Rejection::new(ErrorCode::InvalidJson, format!("body is not JSON: {e}")))?;
    if raw.get().starts_with('[') {
        let items: Vec<&RawValue> = serde_json::from_str(raw.get())
            .map_err(|e| Rejection::new(ErrorCode::InvalidJson, format!("body is not JSON: {e}")))?;
        if items.is_empty() || items.len() > max_events {
            return Err(Rejection::new(
                ErrorCode::InvalidMessage,
                format!("an array must hold 1 to {max_events} events"),
            ));
        }
        items.iter().enumerate().map(|(i, item)| PublishRequest::from_json(item, &format!("[{i}]."))).collect()
    } else {
        Ok(vec![PublishRequest::from_json(raw, "")?])
    }
}

/// What a client sent over WebSocket.
#[derive(Debug)]
pub enum ClientMessage {
    /// `subscribe`.
    Subscribe(SubscribeArgs),
    /// `unsubscribe`.
    Unsubscribe {
        /// Which one.
        subscription_id: String,
    },
    /// `request`.
    Request(Request),
    /// `ping`, with its payload to echo.
    Ping(Option<Box<RawValue>>),
    /// `ack` of an event.
    Ack {
        /// The event id acknowledged.
        event_id: String,
    },
}

/// The message and its `message_id`, kept for the reply's `correlation_id`.
#[derive(Debug)]
pub struct Incoming {
    /// The client's `message_id`, if any.
    pub message_id: Option<String>,
    /// The parsed message.
    pub message: ClientMessage,
}

/// A `subscribe` payload, validated.
#[derive(Debug)]
pub struct SubscribeArgs {
    /// Chosen by the client, or `None` for the server to make one.
    pub subscription_id: Option<String>,
    /// Patterns; empty means every topic.
    pub topics: Vec<Pattern>,
    /// Sources; empty means any.
    pub sources: Vec<String>,
    /// Only events with this correlation id.
    pub correlation_id: Option<String>,
    /// Resume after this event id.
    pub since: Option<String>,
    /// Receive `presence` notices (join and leave) of its exact topics.
    pub presence: bool,
    /// What presence shows about this connection, when the token has no `info` claim.
    pub presence_info: Option<Box<RawValue>>,
}

/// A `request` action.
#[derive(Debug)]
pub enum Request {
    /// `list_subscriptions`.
    ListSubscriptions,
    /// `subscription_count`.
    SubscriptionCount,
    /// `publish`.
    Publish(PublishRequest),
    /// `history`.
    History(HistoryQuery),
    /// `stats`.
    Stats,
    /// `auth`.
    Auth {
        /// The JWT.
        token: String,
    },
    /// `presence`: the members of an exact topic.
    Presence {
        /// The topic.
        topic: String,
    },
    /// `presence_stats`: how many connections and users are on an exact topic.
    PresenceStats {
        /// The topic.
        topic: String,
    },
    /// `rpc`: a call the backend answers (`proxy_rpc_url`).
    Rpc {
        /// The application's name for the call (at most 128 bytes).
        method: String,
        /// Its argument, any JSON (`null` when absent).
        data: Box<RawValue>,
    },
}

/// Arguments of a history query, from `/history` or the `history` action.
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    /// Patterns; empty means every topic.
    pub topics: Vec<Pattern>,
    /// Sources; empty means any.
    pub sources: Vec<String>,
    /// Only events with this correlation id.
    pub correlation_id: Option<String>,
    /// After this event id.
    pub since: Option<String>,
    /// At most this many (1..=1000).
    pub limit: usize,
}

/// Default and cap of a history `limit`.
pub const HISTORY_DEFAULT_LIMIT: usize = 100;
/// Largest history `limit`; larger asks are capped.
pub const HISTORY_MAX_LIMIT: usize = 1000;

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: Option<Value>,
    message_id: Option<Value>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawSubscribe {
    subscription_id: Option<String>,
    #[serde(alias = "event_types")]
    topics: Option<Vec<String>>,
    sources: Option<Vec<String>>,
    correlation_id: Option<String>,
    since: Option<String>,
    #[serde(default)]
    presence: bool,
    presence_info: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct RawRpc {
    method: String,
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct RawTopic {
    topic: String,
}

#[derive(Deserialize)]
struct RawUnsubscribe {
    subscription_id: String,
}

#[derive(Deserialize)]
struct RawAction {
    action: String,
}

#[derive(Deserialize)]
struct RawHistory {
    #[serde(alias = "event_types")]
    topics: Option<Vec<String>>,
    sources: Option<Vec<String>>,
    correlation_id: Option<String>,
    since: Option<String>,
    limit: Option<Value>,
}

#[derive(Deserialize)]
struct RawAuth {
    token: String,
}

#[derive(Deserialize)]
struct RawAck {
    message_id: String,
}

/// Parses patterns, empty meaning everything.
pub fn parse_patterns<S: AsRef<str>>(list: &[S]) -> Result<Vec<Pattern>, Rejection> {
    if list.len() > MAX_PATTERNS {
        return Err(Rejection::at(
            ErrorCode::InvalidTopic,
            "topics",
            format!("at most {MAX_PATTERNS} topics or patterns"),
        ));
    }
    list.iter()
        .map(|p| {
            Pattern::parse(p.as_ref()).map_err(|e| {
                Rejection::at(ErrorCode::InvalidTopic, "topics", format!("invalid pattern {:?}: {e}", p.as_ref()))
            })
        })
        .collect()
}

/// Most topics or patterns one subscription, stream or query names: each becomes an index
/// entry (and, for exact topics, a presence entry whose join every shard hears), outside
/// the connection's byte bound, so a 64 KiB message must not name thousands.
pub const MAX_PATTERNS: usize = 64;

/// Most `sources` one subscription, stream or query names: each is compared with every
/// event its topics match.
pub const MAX_SOURCES: usize = 64;

/// Longest id a client may make the broker keep or echo: `subscription_id`,
/// `correlation_id`, `message_id`, and each source (`since` and `Last-Event-ID`: up to
/// [`crate::positions::MAX_POSITION_BYTES`]).
pub const MAX_ID_BYTES: usize = 128;

/// Checks the client-chosen strings a subscription, stream or query keeps: at most
/// [`MAX_SOURCES`] sources, each id at most [`MAX_ID_BYTES`].
pub fn check_ids<'a>(
    sources: &[String],
    ids: impl IntoIterator<Item = (&'static str, Option<&'a str>)>,
) -> Result<(), Rejection> {
    if sources.len() > MAX_SOURCES {
        return Err(Rejection::at(ErrorCode::LimitExceeded, "sources", format!("at most {MAX_SOURCES} sources")));
    }
    if sources.iter().any(|s| s.len() > MAX_ID_BYTES) {
        return Err(Rejection::at(
            ErrorCode::LimitExceeded,
            "sources",
            format!("a source is over {MAX_ID_BYTES} bytes"),
        ));
    }
    // An event id names a position per engine shard, so a resume position may be longer.
    let limit = |field: &str| match field {
        "since" | "Last-Event-ID" => crate::positions::MAX_POSITION_BYTES,
        _ => MAX_ID_BYTES,
    };
    match ids.into_iter().find(|(field, id)| id.is_some_and(|id| id.len() > limit(field))) {
        Some((field, _)) => {
            Err(Rejection::at(ErrorCode::LimitExceeded, field, format!("{field} is over {} bytes", limit(field))))
        }
        None => Ok(()),
    }
}

/// Reads a history `limit` given as a number or a decimal string.
pub fn parse_limit(value: Option<&Value>) -> Result<usize, Rejection> {
    let bad = || Rejection::at(ErrorCode::BadRequest, "limit", "limit must be a positive integer");
    let n = match value {
        None | Some(Value::Null) => return Ok(HISTORY_DEFAULT_LIMIT),
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad)?,
        Some(Value::String(s)) => s.parse::<u64>().map_err(|_| bad())?,
        Some(_) => return Err(bad()),
    };
    if n == 0 {
        return Err(bad());
    }
    Ok((n as usize).min(HISTORY_MAX_LIMIT))
}

fn payload_as<'a, T: Deserialize<'a>>(payload: Option<&'a RawValue>, what: &str) -> Result<T, Rejection> {
    let text = payload.map(RawValue::get).unwrap_or("{}");
    serde_json::from_str(text)
        .map_err(|e| Rejection::new(ErrorCode::InvalidMessage, format!("invalid {what} payload: {e}")))
}

/// Parses one WebSocket text message. On error, returns the client's `message_id` (if it
/// could be read) with the rejection, for the error's `correlation_id`.
pub fn parse_client_message(text: &str) -> Result<Incoming, (Option<String>, Rejection)> {
    let envelope: Envelope<'_> = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(e) if e.is_syntax() || e.is_eof() => {
            return Err((None, Rejection::new(ErrorCode::InvalidJson, format!("not JSON: {e}"))));
        }
        Err(e) => return Err((None, Rejection::new(ErrorCode::InvalidMessage, format!("not a message object: {e}")))),
    };
    let message_id = match envelope.message_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err((None, Rejection::new(ErrorCode::InvalidMessage, "message_id must be a string"))),
    };
    // Echoed in the reply's `correlation_id`: a long one would be copied into every answer.
    check_ids(&[], [("message_id", message_id.as_deref())]).map_err(|r| (None, r))?;
    let fail = |r: Rejection| (message_id.clone(), r);
    let kind = match envelope.kind {
        Some(Value::String(k)) => k,
        _ => return Err(fail(Rejection::new(ErrorCode::InvalidMessage, "type must be a string"))),
    };
    let payload = envelope.payload.filter(|p| p.get() != "null");
    let message = match kind.as_str() {
        "subscribe" => {
            let raw: RawSubscribe = payload_as(payload, "subscribe").map_err(fail)?;
            let topics = parse_patterns(raw.topics.as_deref().unwrap_or_default()).map_err(fail)?;
            let sources = raw.sources.unwrap_or_default();
            let ids = [
                ("subscription_id", raw.subscription_id.as_deref()),
                ("correlation_id", raw.correlation_id.as_deref()),
                ("since", raw.since.as_deref()),
            ];
            check_ids(&sources, ids).map_err(fail)?;
            ClientMessage::Subscribe(SubscribeArgs {
                subscription_id: raw.subscription_id,
                topics,
                sources,
                correlation_id: raw.correlation_id,
                since: raw.since,
                presence: raw.presence,
                presence_info: raw.presence_info,
            })
        }
        "unsubscribe" => {
            let raw: RawUnsubscribe = payload_as(payload, "unsubscribe").map_err(fail)?;
            ClientMessage::Unsubscribe { subscription_id: raw.subscription_id }
        }
        "request" => ClientMessage::Request(parse_request(payload).map_err(fail)?),
        "ping" => ClientMessage::Ping(payload.map(|p| p.to_owned())),
        "ack" => {
            let raw: RawAck = payload_as(payload, "ack").map_err(fail)?;
            ClientMessage::Ack { event_id: raw.message_id }
        }
        other => {
            return Err(fail(Rejection::new(ErrorCode::UnknownType, format!("unknown type {other:?}"))));
        }
    };
    Ok(Incoming { message_id, message })
}

fn parse_request(payload: Option<&RawValue>) -> Result<Request, Rejection> {
    let action: RawAction = payload_as(payload, "request")?;
    Ok(match action.action.as_str() {
        "list_subscriptions" => Request::ListSubscriptions,
        "subscription_count" => Request::SubscriptionCount,
        "stats" => Request::Stats,
        "publish" => Request::Publish(PublishRequest::from_json(payload.unwrap_or(&null_raw()), "")?),
        "history" => {
            let raw: RawHistory = payload_as(payload, "history")?;
            let sources = raw.sources.unwrap_or_default();
            check_ids(&sources, [("correlation_id", raw.correlation_id.as_deref()), ("since", raw.since.as_deref())])?;
            Request::History(HistoryQuery {
                topics: parse_patterns(raw.topics.as_deref().unwrap_or_default())?,
                sources,
                correlation_id: raw.correlation_id,
                since: raw.since,
                limit: parse_limit(raw.limit.as_ref())?,
            })
        }
        "auth" => {
            let raw: RawAuth = payload_as(payload, "auth")?;
            Request::Auth { token: raw.token }
        }
        "presence" => Request::Presence { topic: payload_as::<RawTopic>(payload, "presence")?.topic },
        "presence_stats" => Request::PresenceStats { topic: payload_as::<RawTopic>(payload, "presence_stats")?.topic },
        "rpc" => {
            let raw: RawRpc = payload_as(payload, "rpc")?;
            check_ids(&[], [("method", Some(raw.method.as_str()))])?;
            Request::Rpc { method: raw.method, data: raw.data.unwrap_or_else(null_raw) }
        }
        other => return Err(Rejection::new(ErrorCode::UnknownAction, format!("unknown action {other:?}"))),
    })
}

/// A server message other than an event: `ack`, `response`, `error`, `pong`.
pub fn server_message(
    kind: &str,
    message_id: &str,
    now: SystemTime,
    correlation_id: Option<&str>,
    payload: &str,
) -> String {
    let mut out = String::with_capacity(128);
    out.push_str("{\"type\":");
    push_json_str(&mut out, kind);
    out.push_str(",\"message_id\":");
    push_json_str(&mut out, message_id);
    out.push_str(",\"timestamp\":\"");
    push_timestamp(&mut out, now);
    out.push_str("\",\"correlation_id\":");
    push_json_opt(&mut out, correlation_id);
    out.push_str(",\"payload\":");
    out.push_str(payload);
    out.push('}');
    out
}

/// The payload of an `error`.
pub fn error_payload(rejection: &Rejection) -> Value {
    let code = rejection.backend_code.as_deref().unwrap_or(rejection.code.for_websocket().as_str());
    json!({"code": code, "message": rejection.message})
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping is the reference; writing into a String cannot fail.
    out.push_str(&Value::from(s).to_string());
}

fn push_json_opt(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_json_str(out, s),
        None => out.push_str("null"),
    }
}

/// RFC 3339 in UTC with microseconds, as every message's `timestamp`.
const TIMESTAMP: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Appends `t` as `2026-11-23T12:00:00.123456Z` (once per event or reply, not per
/// delivery).
pub fn push_timestamp(out: &mut String, t: SystemTime) {
    let t = time::OffsetDateTime::from(t);
    if let Ok(text) = t.format(TIMESTAMP) {
        out.push_str(&text);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn timestamp_format() {
        let mut s = String::new();
        push_timestamp(&mut s, UNIX_EPOCH + Duration::from_micros(1_795_435_200_123_456));
        assert_eq!(s, "2026-11-23T12:00:00.123456Z");
        let mut s = String::new();
        push_timestamp(&mut s, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn publish_body_names_the_bad_field() {
        let ok = parse_publish_body(br#"[{"topic":"a.b","data":{"x":1}},{"topic":"c"}]"#, 1000).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].data.get(), "null");
        let err =
            parse_publish_body(br#"[{"topic":"a"},{"topic":"a"},{"topic":"a"},{"topic":"a*"}]"#, 1000).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("[3].topic"));
        let err = parse_publish_body(br#"{"topic":"a","source":5}"#, 1000).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("source"));
        assert_eq!(parse_publish_body(b"{", 10).unwrap_err().code, ErrorCode::InvalidJson);
        assert!(parse_publish_body(b"[]", 10).is_err());
        assert!(parse_publish_body(br#"[{"topic":"a"},{"topic":"a"}]"#, 1).is_err());
    }

    #[test]
    fn event_tail_is_json() {
        let req = PublishRequest::from_json(
            &RawValue::from_string(r#"{"topic":"t.x","source":"a\"b","correlation_id":"c","data":[1, 2]}"#.into())
                .unwrap(),
            "",
        )
        .unwrap();
        let whole = format!("{EVENT_HEAD}ID{EVENT_MID}TS{}", req.encoded_tail());
        let v: Value = serde_json::from_str(&whole).unwrap();
        assert_eq!(v["payload"]["source"], "a\"b");
        assert_eq!(v["payload"]["data"], json!([1, 2]));
        assert_eq!(v["correlation_id"], "c");
    }

    #[test]
    fn client_messages() {
        let m = parse_client_message(r#"{"type":"subscribe","message_id":"m1","payload":{"event_types":["a.*"]}}"#)
            .unwrap();
        assert_eq!(m.message_id.as_deref(), Some("m1"));
        assert!(matches!(m.message, ClientMessage::Subscribe(ref s) if s.topics.len() == 1));
        let (id, r) =
            parse_client_message(r#"{"type":"subscribe","message_id":"m2","payload":{"topics":["a*"]}}"#).unwrap_err();
        assert_eq!((id.as_deref(), r.code), (Some("m2"), ErrorCode::InvalidTopic));
        assert_eq!(parse_client_message("nope").unwrap_err().1.code, ErrorCode::InvalidJson);
        assert_eq!(parse_client_message(r#"{"type":"x"}"#).unwrap_err().1.code, ErrorCode::UnknownType);
        assert_eq!(parse_client_message("[1]").unwrap_err().1.code, ErrorCode::InvalidMessage);
        let m = parse_client_message(r#"{"type":"request","payload":{"action":"nope"}}"#).unwrap_err();
        assert_eq!(m.1.code, ErrorCode::UnknownAction);
        assert!(matches!(
            parse_client_message(r#"{"type":"request","payload":{"action":"publish","topic":"a","data":1}}"#)
                .unwrap()
                .message,
            ClientMessage::Request(Request::Publish(_))
        ));
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit(None).unwrap(), 100);
        assert_eq!(parse_limit(Some(&json!(5000))).unwrap(), 1000);
        assert!(parse_limit(Some(&json!(0))).is_err());
        assert!(parse_limit(Some(&json!(-1))).is_err());
        assert!(parse_limit(Some(&json!("1.5"))).is_err());
    }
}
