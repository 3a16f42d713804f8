//! permessage-deflate's inbound half: compressed client frames in, plain frames out, for
//! tungstenite to judge. Part of [`crate::ws`], not [`crate::deflate`]: it answers with
//! WebSocket close codes ([`Close`]), and deflate must stay below frames and WebSocket.
//!
//! tungstenite has no permessage-deflate and rejects RSV1, so this layer sits between the
//! socket bytes and tungstenite's protocol core. It reads frame headers only as far as it
//! needs: a frame it does not own (control frames, uncompressed messages, anything odd:
//! unmasked, RSV2/RSV3, RSV1 on a continuation) passes through byte for byte, so
//! tungstenite keeps judging everything RFC 6455 says. The frames of a compressed message
//! are unmasked, inflated as their bytes arrive (a frame need not be whole) and re-emitted
//! as plain fragments of the same message with a zero mask, so a stalled or huge frame
//! costs no more than what arrived. The inflated size of a message is checked before each
//! step: a message that would pass `max_message_bytes` fails with 1009 having inflated at
//! most one byte more (a decompression bomb costs the bound, not its expansion). The
//! inflate state exists only inside a compressed message (the client was told
//! `client_no_context_takeover`), so an idle connection holds none. It does not touch
//! sockets, connections or the bus.

use flate2::{Decompress, FlushDecompress, Status};

use crate::deflate::SYNC_TAIL;
use crate::ws::Close;

/// Most plain bytes produced per call; the caller hands them to tungstenite and calls again.
const PLAIN_PER_CALL: usize = 64 * 1024;
/// Most inflated bytes per emitted fragment.
const FRAGMENT: usize = 16 * 1024;
/// Compressed bytes unmasked at a time.
const STEP: usize = 4 * 1024;

/// One connection's inbound permessage-deflate layer.
#[derive(Debug)]
pub struct Inflater {
    max_message_bytes: usize,
    /// The header of the frame being read, until it is whole (at most 14 bytes).
    head: [u8; 14],
    head_len: usize,
    frame: Option<Frame>,
    /// The compressed message being read, between its first and its final frame.
    message: Option<Box<Message>>,
}

#[derive(Debug)]
struct Frame {
    remaining: u64,
    mask: [u8; 4],
    /// Payload bytes read so far (the mask's phase).
    offset: usize,
    /// Part of a compressed message (else passed through).
    inflate: bool,
    fin: bool,
}

struct Message {
    decompress: Decompress,
    /// Opcode of the message (text or binary), used by its first emitted fragment.
    opcode: u8,
    /// A fragment was emitted (the next ones are continuations).
    started: bool,
    inflated: usize,
    compressed: usize,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message").field("inflated", &self.inflated).field("compressed", &self.compressed).finish()
    }
}

impl Inflater {
    /// A layer for messages of at most `max_message_bytes`, inflated.
    pub fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes, head: [0; 14], head_len: 0, frame: None, message: None }
    }

    /// Whether an inflate state is held (inside a compressed message).
    pub fn holds_state(&self) -> bool {
        self.message.is_some()
    }

    /// Consumes bytes from `input` and appends plain frames to `plain`, stopping when the
    /// input is used up or about [`PLAIN_PER_CALL`] bytes were produced.
    pub fn transform(&mut self, input: &mut &[u8], plain: &mut Vec<u8>) -> Result<(), Close> {
        let limit = plain.len() + PLAIN_PER_CALL;
        while !input.is_empty() && plain.len() < limit {
            match &mut self.frame {
                None => self.read_head(input, plain)?,
                Some(frame) if !frame.inflate => {
                    let n = (frame.remaining.min(input.len() as u64)) as usize;
                    plain.extend_from_slice(&input[..n]);
                    *input = &input[n..];
                    frame.remaining -= n as u64;
                    if frame.remaining == 0 {
                        self.frame = None;
                    }
                }
                Some(_) => self.inflate_payload(input, plain)?,
            }
        }
        // A compressed frame with no payload left (an empty final frame, say) ends here.
        if self.frame.as_ref().is_some_and(|f| f.inflate && f.remaining == 0) {
            self.end_frame(plain)?;
        }
        Ok(())
    }

    fn read_head(&mut self, input: &mut &[u8], plain: &mut Vec<u8>) -> Result<(), Close> {
        let need = if self.head_len < 2 { 2 } else { head_size(&self.head) };
        let n = (need - self.head_len).min(input.len());
        self.head[self.head_len..self.head_len + n].copy_from_slice(&input[..n]);
        self.head_len += n;
        *input = &input[n..];
        if self.head_len < 2 || self.head_len < head_size(&self.head) {
            return Ok(());
        }
        let head = &self.head[..self.head_len];
        let (b0, b1) = (head[0], head[1]);
        let (fin, rsv1, opcode, masked) = (b0 & 0x80 != 0, b0 & 0x40 != 0, b0 & 0x0f, b1 & 0x80 != 0);
        let remaining = match b1 & 0x7f {
            126 => u16::from_be_bytes([head[2], head[3]]) as u64,
            127 => u64::from_be_bytes(head[2..10].try_into().unwrap_or_default()),
            len => len as u64,
        };
        let plain_rsv = b0 & 0x30 == 0;
        let starts = rsv1 && plain_rsv && masked && matches!(opcode, 1 | 2) && self.message.is_none();
        let continues = !rsv1 && plain_rsv && masked && opcode == 0 && self.message.is_some();
        let mut mask = [0; 4];
        if masked {
            mask.copy_from_slice(&head[head.len() - 4..]);
        }
        if starts {
            self.message = Some(Box::new(Message {
                decompress: Decompress::new(false),
                opcode,
                started: false,
                inflated: 0,
                compressed: 0,
            }));
        }
        let inflate = starts || continues;
        if !inflate {
            // Not ours: tungstenite reads it as sent.
            plain.extend_from_slice(head);
        }
        self.head_len = 0;
        self.frame = Some(Frame { remaining, mask, offset: 0, inflate, fin });
        if !inflate && remaining == 0 {
            self.frame = None;
        }
        Ok(())
    }

    fn inflate_payload(&mut self, input: &mut &[u8], plain: &mut Vec<u8>) -> Result<(), Close> {
        let (Some(frame), Some(message)) = (&mut self.frame, &mut self.message) else { return Ok(()) };
        let n = (frame.remaining.min(input.len().min(STEP) as u64)) as usize;
        message.compressed += n;
        if message.compressed > self.max_message_bytes {
            return Err(Close::TooBig);
        }
        let mut unmasked = [0u8; STEP];
        for (i, (out, byte)) in unmasked.iter_mut().zip(&input[..n]).enumerate() {
            *out = byte ^ frame.mask[(frame.offset + i) % 4];
        }
        frame.offset = (frame.offset + n) % 4;
        frame.remaining -= n as u64;
        *input = &input[n..];
        inflate_into(message, &unmasked[..n], self.max_message_bytes, plain, false)?;
        if frame.remaining == 0 {
            self.end_frame(plain)?;
        }
        Ok(())
    }

    /// A compressed frame's payload is all read: the message ends if it was final.
    fn end_frame(&mut self, plain: &mut Vec<u8>) -> Result<(), Close> {
        let Some(frame) = self.frame.take() else { return Ok(()) };
        if frame.fin {
            if let Some(mut message) = self.message.take() {
                inflate_into(&mut message, &SYNC_TAIL, self.max_message_bytes, plain, true)?;
            }
        } else if let Some(message) = self.message.as_mut().filter(|m| !m.started) {
            // tungstenite must know a message is open even if nothing inflated yet, so that
            // a new message before this one's end is still a protocol error.
            push_frame(plain, false, message.opcode, &[]);
            message.started = true;
        }
        Ok(())
    }
}

/// Inflates `compressed` into fragments appended to `plain`; with `last`, ends the message
/// with a final fragment.
fn inflate_into(
    message: &mut Message,
    mut compressed: &[u8],
    max: usize,
    plain: &mut Vec<u8>,
    last: bool,
) -> Result<(), Close> {
    let mut fragment = [0u8; FRAGMENT];
    loop {
        // One byte past the bound is enough to know the message is too big.
        let room = FRAGMENT.min(max - message.inflated + 1);
        let (before_in, before_out) = (message.decompress.total_in(), message.decompress.total_out());
        let status = message
            .decompress
            .decompress(compressed, &mut fragment[..room], FlushDecompress::Sync)
            .map_err(|_| Close::InvalidPayload)?;
        let consumed = (message.decompress.total_in() - before_in) as usize;
        let produced = (message.decompress.total_out() - before_out) as usize;
        compressed = &compressed[consumed..];
        message.inflated += produced;
        if message.inflated > max {
            return Err(Close::TooBig);
        }
        // zlib fills the space it is given before it stops reading: space left over means
        // this input is all inflated (or the client ended the deflate stream early; bytes
        // after that end mean nothing).
        let done = produced < room || status == Status::StreamEnd || (consumed == 0 && produced == 0);
        if produced > 0 || (done && last) {
            let opcode = if message.started { 0 } else { message.opcode };
            push_frame(plain, last && done, opcode, &fragment[..produced]);
            message.started = true;
        }
        if done {
            return Ok(());
        }
    }
}

/// Appends a frame tungstenite accepts from a client: masked, with a zero key.
fn push_frame(out: &mut Vec<u8>, fin: bool, opcode: u8, payload: &[u8]) {
    crate::event::push_ws_header(out, if fin { 0x80 } else { 0 } | opcode, payload.len(), Some([0; 4]));
    out.extend_from_slice(payload);
}

/// Bytes of a frame header, known from its first two bytes.
fn head_size(head: &[u8; 14]) -> usize {
    let extended = match head[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + extended + if head[1] & 0x80 != 0 { 4 } else { 0 }
}
