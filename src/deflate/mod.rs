//! permessage-deflate (RFC 7692): what a WebSocket agrees to, compressing each event once for
//! every subscriber, and inflating what clients send.
//!
//! Owns the negotiation ([`negotiate`] → [`Agreement`] and its response header), the
//! shard's compressors ([`compress`]; one per window size per thread, so the first shard
//! that needs an event's compressed frame builds it for every connection on every shard),
//! [`Joiner`], which joins independently compressed events and literal bytes into one
//! message (batch mode). Inflating what clients send is [`crate::ws`]'s (its `inflate`
//! layer). It does not touch sockets, connections, frames or the bus.
//!
//! Every agreement is without context takeover in both directions: the server's messages
//! must not depend on what else a connection received, or one compressed frame could not
//! serve every subscriber; and the client is told not to keep its context
//! (`client_no_context_takeover`, which RFC 7692 §7.1.1.2 lets a server require even when
//! not offered), so no connection keeps a 32 KiB inflate window while idle.

use std::cell::RefCell;

use flate2::{Compress, Compression, FlushCompress, Status};

/// The empty stored block a sync flush ends with; RFC 7692 §7.2.1 has the sender remove it
/// from every message and the receiver put it back.
pub const SYNC_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The LZ77 window volley compresses with. Zlib cannot compress raw deflate with a window
/// under 512 bytes, so an offer that limits the server to 256 (`server_max_window_bits=8`)
/// is declined; any other limit under 32 KiB gets the 512-byte window, so each event is
/// compressed at most twice however many limits clients ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// 32 KiB (15 bits): every client that does not limit the server.
    Full,
    /// 512 bytes (9 bits): clients that asked for `server_max_window_bits` from 9 to 14.
    Small,
}

impl Window {
    /// Both windows, in the order of [`Self::index`].
    pub const ALL: [Window; 2] = [Window::Full, Window::Small];

    /// Position in per-window arrays.
    pub fn index(self) -> usize {
        match self {
            Window::Full => 0,
            Window::Small => 1,
        }
    }

    fn bits(self) -> u8 {
        match self {
            Window::Full => 15,
            Window::Small => 9,
        }
    }
}

/// What one WebSocket agreed to: server messages compressed with `window` when their payload
/// has at least `min_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreement {
    /// The window outgoing messages are compressed with.
    pub window: Window,
    /// Smaller payloads are sent plain (RSV1 clear), which RFC 7692 allows per message.
    pub min_bytes: usize,
    /// The client's `server_max_window_bits`, echoed in the response.
    server_max_window_bits: Option<u8>,
}

impl Agreement {
    /// The `Sec-WebSocket-Extensions` response header line, CRLF included.
    pub fn response_header(&self) -> String {
        let mut line = String::from(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        );
        if let Some(bits) = self.server_max_window_bits {
            line.push_str(&format!("; server_max_window_bits={bits}"));
        }
        line.push_str("\r\n");
        line
    }

    /// Whether a payload of `len` bytes is worth compressing.
    pub fn worth(&self, len: usize) -> bool {
        len >= self.min_bytes
    }
}

/// Picks the first acceptable `permessage-deflate` offer from the `Sec-WebSocket-Extensions`
/// header values; `None` declines them all (the upgrade goes on without the extension, as
/// RFC 7692 §5 asks: an invalid offer is declined, never a failed handshake).
pub fn negotiate<'a>(header_values: impl IntoIterator<Item = &'a str>, min_bytes: usize) -> Option<Agreement> {
    header_values.into_iter().flat_map(|value| value.split(',')).find_map(|offer| accept_offer(offer, min_bytes))
}

fn accept_offer(offer: &str, min_bytes: usize) -> Option<Agreement> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_max_window_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().trim_matches('"'))),
            None => (param, None),
        };
        let which = [
            "server_no_context_takeover",
            "client_no_context_takeover",
            "server_max_window_bits",
            "client_max_window_bits",
        ]
        .iter()
        .position(|known| name.eq_ignore_ascii_case(known))?;
        if std::mem::replace(&mut seen[which], true) {
            return None; // RFC 7692 §7: a parameter given twice makes the offer invalid.
        }
        match (which, value) {
            (0 | 1, None) => {}
            (2, Some(value)) => server_max_window_bits = Some(window_bits(value)?),
            (3, None) => {}
            (3, Some(value)) => {
                window_bits(value)?;
            }
            _ => return None,
        }
    }
    let window = match server_max_window_bits {
        None | Some(15) => Window::Full,
        // Zlib's smallest raw-deflate window is 9 bits: a limit of 8 cannot be honoured.
        Some(8) => return None,
        Some(_) => Window::Small,
    };
    Some(Agreement { window, min_bytes, server_max_window_bits })
}

/// A window size parameter: 8 to 15, digits only, no leading zero (RFC 7692 §7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|bits| (8..=15).contains(bits))
}

/// The compression level: zlib's default. One compression serves every subscriber, so a
/// smaller output is worth more than the compressing time (the criterion bench
/// `deflate` measures both).
const LEVEL: u32 = 6;

thread_local! {
    /// This thread's compressors by window, made on first use and reset per message (no
    /// context takeover). A shard is a thread, so this is one pair per shard.
    static COMPRESSORS: RefCell<[Option<Compress>; 2]> = const { RefCell::new([None, None]) };
}

/// Compresses `payload` as one message's payload (RFC 7692 §7.2.1: deflate, sync flush,
/// the final `00 00 ff ff` removed), or `None` when that would not be smaller.
pub fn compress(window: Window, payload: &[u8]) -> Option<Vec<u8>> {
    COMPRESSORS.with_borrow_mut(|compressors| {
        let compressor = compressors[window.index()]
            .get_or_insert_with(|| Compress::new_with_window_bits(Compression::new(LEVEL), false, window.bits()));
        compressor.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        loop {
            let consumed = compressor.total_in() as usize;
            match compressor.compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync) {
                Ok(Status::Ok | Status::BufError | Status::StreamEnd) => {}
                Err(_) => return None,
            }
            // zlib's contract: the flush is complete once input is consumed and output space
            // is left over.
            if compressor.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
            if out.len() >= payload.len() {
                return None;
            }
            out.reserve(out.capacity());
        }
        if !out.ends_with(&SYNC_TAIL) {
            return None;
        }
        out.truncate(out.len() - SYNC_TAIL.len());
        (out.len() < payload.len()).then_some(out)
    })
}

/// The frame header bit that marks a compressed message (RFC 7692 §6).
pub const RSV1: u8 = 0x40;

/// Builds one compressed message from literal bytes and independently compressed
/// payloads (each as [`compress`] made it). Every compressed payload ends, once its sync
/// tail is put back, on a byte boundary with no reference outside itself, and literal bytes
/// go in stored blocks, so the pieces concatenate into one valid deflate stream: a batch of
/// events reuses each event's shared compressed bytes instead of compressing again.
#[derive(Debug, Default)]
pub struct Joiner {
    out: Vec<u8>,
    ends_compressed: bool,
}

impl Joiner {
    /// Appends bytes as they are (in stored blocks of at most 65,535 bytes).
    pub fn literal(&mut self, bytes: &[u8]) {
        for block in bytes.chunks(u16::MAX as usize) {
            let len = block.len() as u16;
            // BFINAL 0, BTYPE 00 (stored), then padding to the byte boundary we are on.
            self.out.push(0x00);
            self.out.extend_from_slice(&len.to_le_bytes());
            self.out.extend_from_slice(&(!len).to_le_bytes());
            self.out.extend_from_slice(block);
            self.ends_compressed = false;
        }
    }

    /// Appends a compressed payload.
    pub fn compressed(&mut self, payload: &[u8]) {
        self.out.extend_from_slice(payload);
        self.out.extend_from_slice(&SYNC_TAIL);
        self.ends_compressed = true;
    }

    /// The message payload (the last sync tail removed, as a sender must).
    pub fn finish(mut self) -> Vec<u8> {
        if self.ends_compressed {
            self.out.truncate(self.out.len() - SYNC_TAIL.len());
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflate(payload: &[u8]) -> Vec<u8> {
        let mut input = payload.to_vec();
        input.extend_from_slice(&SYNC_TAIL);
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(1 << 20);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
        assert_eq!(d.total_in() as usize, input.len());
        out
    }

    #[test]
    fn offers() {
        let full = |bits| Some(Agreement { window: Window::Full, min_bytes: 0, server_max_window_bits: bits });
        let small = |bits| Some(Agreement { window: Window::Small, min_bytes: 0, server_max_window_bits: Some(bits) });
        let cases: &[(&[&str], Option<Agreement>)] = &[
            (&["permessage-deflate"], full(None)),
            (&["permessage-deflate; client_max_window_bits"], full(None)),
            (&["x-webkit-deflate-frame", "permessage-deflate; server_no_context_takeover"], full(None)),
            (&["permessage-deflate; server_max_window_bits=15"], full(Some(15))),
            (&["permessage-deflate; server_max_window_bits=\"10\""], small(10)),
            (&["permessage-deflate; server_max_window_bits=9; client_no_context_takeover"], small(9)),
            // Invalid offers are declined; a later valid one is taken.
            (&["permessage-deflate; server_max_window_bits=8, permessage-deflate"], full(None)),
            (&["permessage-deflate; server_max_window_bits"], None),
            (&["permessage-deflate; server_max_window_bits=16"], None),
            (&["permessage-deflate; client_max_window_bits=7"], None),
            (&["permessage-deflate; client_max_window_bits=010"], None),
            (&["permessage-deflate; server_no_context_takeover=1"], None),
            (&["permessage-deflate; server_no_context_takeover; server_no_context_takeover"], None),
            (&["permessage-deflate; mystery"], None),
            (&["x-webkit-deflate-frame"], None),
            (&[], None),
        ];
        for (values, expected) in cases {
            assert_eq!(negotiate(values.iter().copied(), 0), *expected, "{values:?}");
        }
        let header = negotiate(["permessage-deflate; server_max_window_bits=10"], 0).unwrap().response_header();
        assert_eq!(
            header,
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10\r\n"
        );
    }

    #[test]
    fn compresses_and_joins() {
        let json = br#"{"type":"event","topic":"orders.eu","payload":{"items":[1,2,3],"note":"the same words, the same words, the same words"}}"#;
        for window in Window::ALL {
            let payload = compress(window, json).expect("JSON compresses");
            assert!(payload.len() < json.len());
            assert_eq!(inflate(&payload), json);
            let mut joiner = Joiner::default();
            joiner.literal(b"[");
            joiner.compressed(&payload);
            joiner.literal(b",");
            joiner.compressed(&payload);
            joiner.literal(b"]");
            let mut expected = b"[".to_vec();
            expected.extend_from_slice(json);
            expected.push(b',');
            expected.extend_from_slice(json);
            expected.push(b']');
            assert_eq!(inflate(&joiner.finish()), expected);
        }
        assert_eq!(compress(Window::Full, b"ab"), None, "not worth it");
    }

    #[test]
    fn small_window_keeps_distances_short() {
        // 600 varied bytes twice: only a window over 600 bytes reaches back to the first copy.
        let block: Vec<u8> = (0..600u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let data = [block.clone(), block].concat();
        let full = compress(Window::Full, &data).unwrap();
        let small = compress(Window::Small, &data).unwrap();
        assert!(small.len() > full.len() + 200, "full {} small {}", full.len(), small.len());
        // A 512-byte window inflates it: no distance reaches further.
        let mut input = small;
        input.extend_from_slice(&SYNC_TAIL);
        let mut d = Decompress::new_with_window_bits(false, 9);
        let mut out = Vec::with_capacity(4096);
        d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
        assert_eq!(out, data);
    }
}
