//! An event as it travels: its one encoding (WebSocket frame, SSE head, JSON), its place in
//! the order ([`OrderKey`]), what enters the order ([`Prepared`], [`StreamEntry`]) and the
//! crate's one WebSocket frame-header writer ([`push_ws_header`]): every frame volley
//! writes without tungstenite, server or client side, gets its header from it.
//!
//! This module owns bytes only. It must not touch the bus's lock, the history, shard
//! inboxes or connections: whoever orders an event calls `encode` and shares the result.

use std::sync::OnceLock;
use std::time::Instant;

use crate::deflate::{self, Window};
use crate::protocol::{EVENT_HEAD, EVENT_MID, PublishRequest};

/// A position in the engine's order: (epoch, seq) locally, (ms, n) for a Redis stream id.
pub type OrderKey = (u64, u64);

/// Where live delivery to a subscription takes over from its resume: events up to `key`
/// in this node's order were seen or replayed, and with a sharded engine, events of each
/// shard up to `positions` too (a client that resumed from a node ahead of this one: what
/// this node reads later up to there, it has had).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct After {
    /// This node's order key.
    pub key: OrderKey,
    /// Per engine shard, the stream id the client had reached.
    pub positions: Option<std::sync::Arc<[OrderKey]>>,
}

impl After {
    /// Live from the start: nothing seen.
    pub const START: Self = Self { key: (0, 0), positions: None };

    /// Whether `event` is news to the subscription.
    #[inline]
    pub fn passed_by(&self, event: &Event) -> bool {
        event.key > self.key && self.positions.as_ref().is_none_or(|p| event.is_after(p))
    }
}

/// One published event, encoded once and shared by every receiver and the history.
#[derive(Debug)]
pub struct Event {
    /// Position in this node's order (1-based, contiguous).
    pub seq: u64,
    /// Position in the engine's order, comparable across nodes: (epoch, seq) for the
    /// memory engine, the stream id (ms, n) for Redis.
    pub key: (u64, u64),
    /// The engine shard it was read from and its stream id there: `(0, key)` but with a
    /// sharded engine, where `key` is this node's own order.
    pub origin: (u32, OrderKey),
    /// The opaque id clients see.
    pub id: Box<str>,
    /// Concrete topic.
    pub topic: Box<str>,
    /// Source, `""` when none.
    pub source: Box<str>,
    /// Correlation id, if any.
    pub correlation_id: Option<Box<str>>,
    /// When the publisher's node accepted it, on this node's clock (for latency
    /// histograms): for an event read from the engine, derived from the publisher's wall
    /// clock, so it carries that node's clock skew.
    pub published_at: Instant,
    /// When this node's bus took it. Decisions (history age, write coalescing) use this
    /// one: a skewed clock on another node must not steer them.
    pub received_at: Instant,
    /// The WebSocket text frame: header then the event JSON.
    ws_frame: Box<[u8]>,
    json_start: usize,
    /// `id: <id>\ndata: ` — the SSE frame is this, the JSON, and `\n\n`.
    sse_head: Box<[u8]>,
    /// The compressed WebSocket frame per deflate window, made by the first connection that
    /// needs it and shared by all the others (`None` inside: not worth compressing).
    deflated: [OnceLock<Option<Box<[u8]>>>; 2],
}

impl Event {
    /// The event message JSON, as every receiver gets it.
    pub fn json(&self) -> &[u8] {
        &self.ws_frame[self.json_start..]
    }

    /// The complete unmasked WebSocket text frame.
    pub fn ws_frame(&self) -> &[u8] {
        &self.ws_frame
    }

    /// The SSE frame's head; write it, then [`Self::json`], then `\n\n`.
    pub fn sse_head(&self) -> &[u8] {
        &self.sse_head
    }

    /// Makes the event's compressed WebSocket frame (RSV1 set) for `window` unless made
    /// already, on whichever shard asks first, for every connection to share; false when
    /// compressing does not make it smaller.
    pub fn deflate(&self, window: Window) -> bool {
        self.deflated[window.index()]
            .get_or_init(|| compressed_frame(window, WS_OPCODE_TEXT, self.json()).map(Vec::into_boxed_slice))
            .is_some()
    }

    /// The compressed frame [`Self::deflate`] made, if it did and it is smaller.
    pub fn deflated_frame(&self, window: Window) -> Option<&[u8]> {
        self.deflated[window.index()].get()?.as_deref()
    }

    /// The payload of [`Self::deflated_frame`].
    pub fn deflated_payload(&self, window: Window) -> Option<&[u8]> {
        let frame = self.deflated_frame(window)?;
        let header = match frame[1] {
            126 => 4,
            127 => 10,
            _ => 2,
        };
        Some(&frame[header..])
    }

    /// Whether the event comes after `positions` (one stream id per engine shard).
    #[inline]
    pub fn is_after(&self, positions: &[OrderKey]) -> bool {
        positions.get(self.origin.0 as usize).is_none_or(|at| self.origin.1 > *at)
    }

    /// Bytes this event holds, as counted against the history bound.
    pub fn retained_bytes(&self) -> usize {
        self.ws_frame.len() + self.sse_head.len() + self.id.len() + self.topic.len() + self.source.len()
    }
}

/// Why a publish was refused; nothing of it was published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Event at this index would encode over `max_message_bytes`.
    #[error("event {0} is over max_message_bytes")]
    TooLarge(usize),
    /// A shard's inbound queue is full: the broker is overloaded.
    #[error("broker overloaded: shard queues are full")]
    Overloaded,
    /// The cluster engine cannot take publishes now.
    #[error("the engine is unavailable")]
    EngineUnavailable,
    /// A batch's topics are placed on different engine shards: each shard is its own
    /// ordered log, so such a batch could not be all-or-nothing.
    #[error("a batch's topics must share a shard key (the first shard_key_segments segments)")]
    AcrossShards,
}

/// One event as it enters the order, with everything but its position.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The validated request.
    pub request: PublishRequest,
    /// Its encoded tail ([`PublishRequest::encoded_tail`]).
    pub tail: String,
}

impl Prepared {
    /// Prepares `requests`, refusing (by index) any that would encode over `max_bytes`.
    pub fn all(requests: Vec<PublishRequest>, max_bytes: usize) -> Result<Vec<Prepared>, PublishError> {
        let overhead = EVENT_HEAD.len() + MAX_ID_LEN + EVENT_MID.len() + TIMESTAMP_LEN;
        requests
            .into_iter()
            .enumerate()
            .map(|(i, request)| {
                let tail = request.encoded_tail();
                if tail.len() + overhead > max_bytes {
                    Err(PublishError::TooLarge(i))
                } else {
                    Ok(Prepared { request, tail })
                }
            })
            .collect()
    }
}

/// An event whose place in the order an engine has decided (a Redis stream entry).
#[derive(Debug, Clone)]
pub struct StreamEntry {
    /// The engine's id (the stream id).
    pub id: String,
    /// The id as a comparable key.
    pub key: (u64, u64),
    /// Publish time as the publishing node wrote it.
    pub timestamp: String,
    /// The event.
    pub prepared: Prepared,
}

/// Longest id: 20 decimal digits, `-`, 20 decimal digits.
const MAX_ID_LEN: usize = 41;
/// `2026-11-23T12:00:00.123456Z`.
pub const TIMESTAMP_LEN: usize = 27;

/// An event for the history's unit tests, which cannot build one (its bytes are private).
#[cfg(test)]
pub(crate) fn test_event(seq: u64, key: (u64, u64), published_at: Instant) -> std::sync::Arc<Event> {
    let raw = serde_json::value::RawValue::from_string(format!(r#"{{"topic":"t","data":{seq}}}"#))
        .expect("test JSON is valid");
    let request = PublishRequest::from_json(&raw, "").expect("test request is valid");
    let prepared = Prepared { tail: request.encoded_tail(), request };
    std::sync::Arc::new(encode(
        seq,
        key,
        &format!("{}-{}", key.0, key.1),
        &prepared,
        "2026-01-01T00:00:00Z",
        published_at,
        published_at,
    ))
}

/// Lays out an event's bytes once: the WebSocket frame (header + JSON) and the SSE head.
pub(crate) fn encode(
    seq: u64,
    key: (u64, u64),
    id: &str,
    prepared: &Prepared,
    timestamp: &str,
    published_at: Instant,
    received_at: Instant,
) -> Event {
    let json_len = EVENT_HEAD.len() + id.len() + EVENT_MID.len() + timestamp.len() + prepared.tail.len();
    let header_len = ws_header_len(json_len);
    let mut frame = Vec::with_capacity(header_len + json_len);
    push_ws_text_header(&mut frame, json_len);
    for part in [EVENT_HEAD, id, EVENT_MID, timestamp, &prepared.tail] {
        frame.extend_from_slice(part.as_bytes());
    }
    let request = &prepared.request;
    Event {
        seq,
        key,
        origin: (0, key),
        id: id.into(),
        topic: request.topic.as_str().into(),
        source: request.source.as_str().into(),
        correlation_id: request.correlation_id.as_deref().map(Into::into),
        published_at,
        received_at,
        ws_frame: frame.into_boxed_slice(),
        json_start: header_len,
        sse_head: crate::sse::event_head(id).into_boxed_slice(),
        deflated: Default::default(),
    }
}

/// Bytes of an unmasked frame header for a payload of `len`.
pub fn ws_header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65_535 => 4,
        _ => 10,
    }
}

/// The text frame opcode.
pub const WS_OPCODE_TEXT: u8 = 0x1;
/// First byte of a final text frame.
pub const WS_TEXT: u8 = 0x80 | WS_OPCODE_TEXT;
/// First byte of a final text frame compressed with permessage-deflate (RSV1).
pub const WS_DEFLATED_TEXT: u8 = WS_TEXT | deflate::RSV1;

/// Appends the header of a final, unmasked text frame of `len` payload bytes (RFC 6455 §5.2).
pub fn push_ws_text_header(out: &mut Vec<u8>, len: usize) {
    push_ws_header(out, WS_TEXT, len, None);
}

/// Appends a frame header (RFC 6455 §5.2): `first` (FIN, RSV, opcode), the length, and for
/// a client's frame the `mask` key. The one header writer in the crate; the caller writes
/// the payload (masked with the key when there is one).
pub fn push_ws_header(out: &mut Vec<u8>, first: u8, len: usize, mask: Option<[u8; 4]>) {
    let masked = if mask.is_some() { 0x80 } else { 0 };
    out.push(first);
    match len {
        0..=125 => out.push(masked | len as u8),
        126..=65_535 => {
            out.push(masked | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(masked | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// The mask a client frame written by [`masked_frame`] carries (a client's frames must be
/// masked, RFC 6455 §5.3; tests, fuzzing and the bench harness write them).
const CLIENT_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Appends a client (masked) text frame carrying `payload`.
pub fn masked_text(payload: &[u8], out: &mut Vec<u8>) {
    masked_frame(WS_OPCODE_TEXT, payload, out);
}

/// Appends a final client (masked) frame with `opcode` carrying `payload`.
pub fn masked_frame(opcode: u8, payload: &[u8], out: &mut Vec<u8>) {
    push_ws_header(out, 0x80 | opcode, payload.len(), Some(CLIENT_MASK));
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ CLIENT_MASK[i % 4]));
}

/// A whole unmasked frame (FIN, RSV1, `opcode`) carrying `payload` compressed, or `None`
/// when compressing does not make it smaller.
pub fn compressed_frame(window: Window, opcode: u8, payload: &[u8]) -> Option<Vec<u8>> {
    let compressed = deflate::compress(window, payload)?;
    let mut frame = Vec::with_capacity(ws_header_len(compressed.len()) + compressed.len());
    push_ws_header(&mut frame, 0x80 | deflate::RSV1 | opcode, compressed.len(), None);
    frame.extend_from_slice(&compressed);
    Some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::protocol::frame::FrameHeader;

    #[test]
    fn ws_header_agrees_with_tungstenite() {
        for len in [0usize, 1, 125, 126, 65_535, 65_536, 1 << 20] {
            let mut ours = Vec::new();
            push_ws_text_header(&mut ours, len);
            assert_eq!(ours.len(), ws_header_len(len));
            let mut cursor = std::io::Cursor::new(ours);
            let (header, parsed_len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(parsed_len, len as u64);
        }
    }
}
