//! RFC 6455 on a byte stream: the upgrade handshake and a sans-IO frame codec.
//!
//! Owns the handshake answer (101, or 426/400) and [`Codec`], which drives tungstenite's
//! protocol core (`WebSocketContext`: masking, fragmentation, interleaved control frames,
//! UTF-8, the close handshake) over in-memory bytes: bytes read go in, messages and bytes
//! to write come out. The shard writes the shared event frames itself, between whole
//! frames of the codec's output, so encode-once holds and a pong never lands inside a
//! half-written frame. Its `inflate` layer undoes permessage-deflate on what clients send
//! before tungstenite sees it. It does not touch sockets, subscriptions or the bus.

mod inflate;

use std::io::{self, Read, Write};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::{CloseFrame, Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

use crate::deflate::Agreement;
use crate::http::{HttpError, Request, Response};
use crate::protocol::ErrorCode;
pub use inflate::Inflater;

/// Close codes volley sends (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// 1000.
    Normal,
    /// 1001: shutting down, or dropped by the heartbeat.
    GoingAway,
    /// 1002: bad framing.
    Protocol,
    /// 1007: text that is not UTF-8.
    InvalidPayload,
    /// 1008: sustained rate-limit abuse.
    Policy,
    /// 1009: message over `max_message_bytes`.
    TooBig,
    /// 1011.
    Internal,
    /// 1013: slow consumer.
    TryAgainLater,
    /// 4001: unauthorized.
    Unauthorized,
    /// 4000-4999 (default 4003): disconnected by the server API.
    Disconnected(u16),
}

impl Close {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::Protocol => 1002,
            Self::InvalidPayload => 1007,
            Self::Policy => 1008,
            Self::TooBig => 1009,
            Self::Internal => 1011,
            Self::TryAgainLater => 1013,
            Self::Unauthorized => 4001,
            Self::Disconnected(code) => code,
        }
    }
}

/// Answers an upgrade request: the 101 response bytes (naming the extension agreed, if
/// any), or why not.
pub fn accept(request: &Request, deflate: Option<&Agreement>) -> Result<Vec<u8>, HttpError> {
    if request.method != "GET" {
        return Err(HttpError::new(ErrorCode::MethodNotAllowed, "WebSocket upgrades use GET"));
    }
    if request.websocket_version.as_deref() != Some("13") {
        return Err(HttpError::new(ErrorCode::BadRequest, "only WebSocket version 13 is supported").with_status(426));
    }
    let Some(key) = request.websocket_key.as_deref().filter(|k| !k.is_empty()) else {
        return Err(HttpError::new(ErrorCode::BadRequest, "missing Sec-WebSocket-Key"));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let extension = deflate.map(Agreement::response_header).unwrap_or_default();
    Ok(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{extension}\r\n"
    )
    .into_bytes())
}

/// The 426 response names the version we speak.
pub fn upgrade_error_response(error: &HttpError) -> Response {
    let response = Response::error(error);
    if error.status == 426 { response.header("Sec-WebSocket-Version", "13") } else { response }
}

/// What the peer sent, once whole.
#[derive(Debug)]
pub enum Received {
    /// A complete text message.
    Text(String),
    /// A complete binary message.
    Binary(Vec<u8>),
    /// A pong (or any ping, already answered): proof of life only.
    Control,
}

/// How the WebSocket ended, as far as reading goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The close handshake finished (either side started it); close the socket once the
    /// output is written.
    Closed,
    /// The peer broke the protocol; the close frame with this code is in the output.
    Failed(Close),
}

/// In-memory stream for tungstenite: reads from a slice, writes into a vector.
struct Pipe<'a, 'b> {
    input: &'b [u8],
    output: &'a mut Vec<u8>,
}

impl Read for Pipe<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.input.read(buf)?;
        Ok(n)
    }
}

impl Write for Pipe<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// One server-side WebSocket's protocol state, without I/O.
pub struct Codec {
    context: WebSocketContext,
    /// With permessage-deflate: the layer that inflates what the client sends, and the
    /// plain frames it made that tungstenite has not read yet (dropped once read, so an idle
    /// connection holds no buffer).
    inflate: Option<Box<(Inflater, Plain)>>,
}

/// Plain frames from the inflate layer, and how much of them tungstenite read.
#[derive(Debug, Default)]
struct Plain {
    bytes: Vec<u8>,
    read: usize,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec").field("can_write", &self.context.can_write()).finish()
    }
}

/// Bytes tungstenite allocates up front for reading; it grows per frame as needed, so a
/// small start keeps idle connections light.
const READ_BUFFER_START: usize = 512;

impl Codec {
    /// A codec accepting messages up to `max_message_bytes` (inflated, with `deflate`).
    pub fn new(max_message_bytes: usize, deflate: bool) -> Self {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER_START)
            .write_buffer_size(0)
            .max_message_size(Some(max_message_bytes))
            .max_frame_size(Some(max_message_bytes));
        let inflate = deflate.then(|| Box::new((Inflater::new(max_message_bytes), Plain::default())));
        Self { context: WebSocketContext::new(Role::Server, Some(config)), inflate }
    }

    /// Whether messages may still be sent (no close sent or received).
    pub fn can_write(&self) -> bool {
        self.context.can_write()
    }

    /// Feeds bytes read from the socket (consuming `input`) and returns the next whole
    /// message, or `None` once everything given is consumed. Bytes to send (pongs, the
    /// close reply) are appended to `output` in the order they arise, so a reply to a
    /// message is queued before a close caused by what followed it.
    pub fn next(&mut self, input: &mut &[u8], output: &mut Vec<u8>) -> Result<Option<Received>, Ended> {
        let Some(inflate) = self.inflate.as_deref_mut() else { return self.read(input, output) };
        loop {
            let (inflater, plain) = inflate;
            let mut unread = &plain.bytes[plain.read..];
            let before = unread.len();
            let result = read(&mut self.context, &mut unread, output);
            plain.read += before - unread.len();
            if plain.read == plain.bytes.len() {
                *plain = Plain::default();
            }
            match result {
                Ok(None) if !input.is_empty() => {}
                other => return other,
            }
            if let Err(close) = inflater.transform(input, &mut plain.bytes) {
                let mut pipe = Pipe { input: &[], output };
                close_with(&mut self.context, close, "", &mut pipe);
                return Err(Ended::Failed(close));
            }
        }
    }

    fn read(&mut self, input: &mut &[u8], output: &mut Vec<u8>) -> Result<Option<Received>, Ended> {
        read(&mut self.context, input, output)
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: String, output: &mut Vec<u8>) {
        let mut pipe = Pipe { input: &[], output };
        let _ = self.context.write(&mut pipe, Message::text(text));
    }

    /// Queues a binary message.
    pub fn send_binary(&mut self, data: Vec<u8>, output: &mut Vec<u8>) {
        let mut pipe = Pipe { input: &[], output };
        let _ = self.context.write(&mut pipe, Message::binary(data));
    }

    /// Queues a heartbeat ping.
    pub fn ping(&mut self, output: &mut Vec<u8>) {
        let mut pipe = Pipe { input: &[], output };
        let _ = self.context.write(&mut pipe, Message::Ping(Default::default()));
    }

    /// Starts the close handshake with `close` (no-op if closing already).
    pub fn close(&mut self, close: Close, output: &mut Vec<u8>) {
        close_with(&mut self.context, close, "", &mut Pipe { input: &[], output });
    }

    /// Writes a close frame carrying `reason` (cut to the 123 bytes a close frame holds).
    pub fn close_because(&mut self, close: Close, reason: &str, output: &mut Vec<u8>) {
        close_with(&mut self.context, close, reason, &mut Pipe { input: &[], output });
    }
}

/// Reads the next message tungstenite makes of `input` (see [`Codec::next`]).
fn read(context: &mut WebSocketContext, input: &mut &[u8], output: &mut Vec<u8>) -> Result<Option<Received>, Ended> {
    let mut pipe = Pipe { input, output };
    let result = match context.read(&mut pipe) {
        Ok(Message::Text(text)) => Ok(Some(Received::Text(text.as_str().to_owned()))),
        Ok(Message::Binary(data)) => Ok(Some(Received::Binary(data.to_vec()))),
        Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => Ok(Some(Received::Control)),
        // Writes our close reply (or completes the handshake we began).
        Ok(Message::Close(_)) => match context.flush(&mut pipe) {
            Err(Error::Io(e)) if e.kind() != io::ErrorKind::WouldBlock => Err(Ended::Failed(Close::Internal)),
            _ => Err(Ended::Closed),
        },
        // Everything consumed; pongs queued during the read go out now.
        Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => match context.flush(&mut pipe) {
            Err(Error::ConnectionClosed | Error::AlreadyClosed) => Err(Ended::Closed),
            _ => Ok(None),
        },
        Err(Error::ConnectionClosed | Error::AlreadyClosed) => Err(Ended::Closed),
        Err(error) => {
            let close = match error {
                Error::Utf8(_) => Close::InvalidPayload,
                Error::Capacity(_) => Close::TooBig,
                Error::Protocol(_) => Close::Protocol,
                _ => Close::Internal,
            };
            close_with(context, close, "", &mut pipe);
            Err(Ended::Failed(close))
        }
    };
    *input = pipe.input;
    result
}

/// Starts the close handshake with `close` (no-op if closing already).
fn close_with(context: &mut WebSocketContext, close: Close, reason: &str, pipe: &mut Pipe<'_, '_>) {
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let frame = CloseFrame { code: CloseCode::from(close.code()), reason: reason[..cut].into() };
    let _ = context.close(pipe, Some(frame));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        assert!(payload.len() < 126);
        out.push(0x80 | payload.len() as u8);
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn feed(codec: &mut Codec, mut input: &[u8]) -> (Vec<String>, Vec<u8>, Result<(), Ended>) {
        let mut texts = Vec::new();
        let mut out = Vec::new();
        let result = loop {
            match codec.next(&mut input, &mut out) {
                Ok(None) => break Ok(()),
                Ok(Some(Received::Text(t))) => texts.push(t),
                Ok(Some(_)) => {}
                Err(ended) => break Err(ended),
            }
        };
        (texts, out, result)
    }

    /// Feeds `stream` one byte per call: messages must not need whole frames.
    fn feed_bytewise(codec: &mut Codec, stream: &[u8]) -> (Vec<String>, Vec<u8>) {
        let (mut texts, mut out) = (Vec::new(), Vec::new());
        for byte in stream.chunks(1) {
            let (t, o, r) = feed(codec, byte);
            assert_eq!(r, Ok(()));
            texts.extend(t);
            out.extend(o);
        }
        (texts, out)
    }

    #[test]
    fn fragments_with_interleaved_ping_byte_by_byte() {
        let mut codec = Codec::new(1024, false);
        let mut stream = masked(0x1, false, b"hel");
        stream.extend(masked(0x9, true, b"p"));
        stream.extend(masked(0x0, true, b"lo"));
        let (texts, out) = feed_bytewise(&mut codec, &stream);
        assert_eq!(texts, vec!["hello"]);
        assert_eq!(out, vec![0x8A, 1, b'p'], "pong echoes the ping");
    }

    #[test]
    fn failures_map_to_close_codes() {
        let cases: [(Vec<u8>, u16); 4] = [
            (vec![0x81, 0x01, b'a'], 1002),           // unmasked
            (masked(0x1, true, &[0xff, 0xfe]), 1007), // bad UTF-8
            (masked(0x1 | 0x40, true, b"a"), 1002),   // RSV1 without extension
            (masked(0x1, true, &[b'a'; 100]), 1009),  // over max size
        ];
        for (input, code) in cases {
            let mut codec = Codec::new(64, false);
            let (_, out, result) = feed(&mut codec, &input);
            assert!(matches!(result, Err(Ended::Failed(c)) if c.code() == code), "{input:?} -> {result:?}");
            assert_eq!(out[0], 0x88);
            assert_eq!(u16::from_be_bytes([out[2], out[3]]), code);
        }
    }

    #[test]
    fn close_is_echoed() {
        let mut codec = Codec::new(64, false);
        let (_, out, result) = feed(&mut codec, &masked(0x8, true, &1000u16.to_be_bytes()));
        assert_eq!(result, Err(Ended::Closed));
        assert_eq!(out, vec![0x88, 2, 0x03, 0xE8]);
        assert!(!codec.can_write());
    }

    /// A client's compressed message: raw deflate, sync flush, tail removed (RFC 7692).
    fn deflated(data: &[u8]) -> Vec<u8> {
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, flate2::FlushCompress::Sync).unwrap();
        assert!(out.ends_with(&crate::deflate::SYNC_TAIL));
        out.truncate(out.len() - 4);
        out
    }

    fn masked_long(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9u8, 8, 7, 6];
        let mut out = vec![first, 0x80 | 127];
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn compressed_fragments_with_interleaved_ping_byte_by_byte() {
        let text = "hello hello hello hello, compressed in two fragments";
        let compressed = deflated(text.as_bytes());
        let (a, b) = compressed.split_at(compressed.len() / 2);
        let mut stream = masked(0x1 | 0x40, false, a); // RSV1 on the first frame only
        stream.extend(masked(0x9, true, b"p"));
        stream.extend(masked(0x0, true, b));
        stream.extend(masked(0x1, true, b"plain after")); // uncompressed messages still pass
        let mut codec = Codec::new(1024, true);
        let (texts, out) = feed_bytewise(&mut codec, &stream);
        assert_eq!(texts, vec![text.to_string(), "plain after".to_string()]);
        assert_eq!(out, vec![0x8A, 1, b'p']);
    }

    #[test]
    fn compressed_framing_violations() {
        let compressed = deflated(b"abc");
        let cases: [(Vec<u8>, u16); 4] = [
            // RSV1 on a continuation frame.
            ([masked(0x1 | 0x40, false, &compressed), masked(0x40, true, &[])].concat(), 1002),
            // RSV1 on a control frame.
            (masked(0x9 | 0x40, true, b""), 1002),
            // A new message before the compressed one ended.
            ([masked(0x1 | 0x40, false, &compressed), masked(0x1, true, b"x")].concat(), 1002),
            // Not deflate data.
            (masked(0x1 | 0x40, true, &[0xff, 0xff, 0xff]), 1007),
        ];
        for (input, code) in cases {
            let mut codec = Codec::new(1024, true);
            let (_, out, result) = feed(&mut codec, &input);
            assert!(matches!(result, Err(Ended::Failed(c)) if c.code() == code), "{input:?} -> {result:?}");
            assert_eq!(u16::from_be_bytes([out[2], out[3]]), code);
        }
        // Without the extension, RSV1 stays a protocol error.
        let mut codec = Codec::new(1024, false);
        let (_, _, result) = feed(&mut codec, &masked(0x1 | 0x40, true, &compressed));
        assert!(matches!(result, Err(Ended::Failed(Close::Protocol))));
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_bound() {
        // 64 MiB of zeros in about 64 KiB; the bound is 64 KiB inflated.
        let bomb = deflated(&vec![0u8; 64 << 20]);
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        let mut codec = Codec::new(64 * 1024, true);
        let stream = masked_long(0x81 | 0x40, &bomb);
        let mut input = &stream[..];
        let mut out = Vec::new();
        let result = loop {
            match codec.next(&mut input, &mut out) {
                Ok(None) => break Ok(()),
                Ok(Some(_)) => {}
                Err(e) => break Err(e),
            }
        };
        assert_eq!(result, Err(Ended::Failed(Close::TooBig)));
        assert_eq!(find_code(&out), Some(1009));
        assert!(!input.is_empty(), "stopped long before the end of the bomb");
    }

    fn find_code(out: &[u8]) -> Option<u16> {
        (out.first() == Some(&0x88)).then(|| u16::from_be_bytes([out[2], out[3]]))
    }
}
