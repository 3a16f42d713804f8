//! permessage-deflate against a real broker, with a raw client that owns its frames (no
//! tungstenite, which has no permessage-deflate): RSV1, the compressed bytes, their
//! inflated content, batch mode and resume, and a decompression bomb.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};

const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A raw WebSocket client.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Upgrades on `path`, offering `extensions`; returns the client and the response head.
    fn connect(broker: &Broker, path: &str, extensions: Option<&str>) -> (Self, String) {
        let mut s = TcpStream::connect(broker.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let offer = extensions.map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n")).unwrap_or_default();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n").unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (Self { s, buf: Vec::new() }, head)
    }

    /// The next frame: its first byte and payload.
    fn frame(&mut self) -> (u8, Vec<u8>) {
        loop {
            if self.buf.len() >= 2 {
                let (len, header) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    n if n < 126 => (n as usize, 2),
                    _ => (usize::MAX, 0),
                };
                if len != usize::MAX && self.buf.len() >= header + len {
                    let first = self.buf[0];
                    let payload = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    return (first, payload);
                }
            }
            let mut chunk = [0u8; 65536];
            let n = self.s.read(&mut chunk).expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next data message as text, and whether it came compressed.
    fn message(&mut self) -> (String, bool) {
        loop {
            let (first, payload) = self.frame();
            if first & 0x0f == 0x9 || first & 0x0f == 0xA {
                continue;
            }
            assert_eq!(first & 0x8f, 0x81, "a final text frame");
            let compressed = first & 0x40 != 0;
            let bytes = if compressed { inflate(&payload) } else { payload };
            return (String::from_utf8(bytes).unwrap(), compressed);
        }
    }

    fn json(&mut self) -> Value {
        serde_json::from_str(&self.message().0).unwrap()
    }

    fn send(&mut self, frame: &[u8]) {
        self.s.write_all(frame).unwrap();
    }
}

fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = Decompress::new(false);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync).unwrap();
    out
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    out.truncate(out.len() - 4);
    out
}

/// A masked client frame with `first` as its first byte.
fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut out = Vec::new();
    volley::event::push_ws_header(&mut out, first, payload.len(), Some(mask));
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A 1 KiB JSON object like an application's event.
fn kilobyte_event(n: usize) -> Value {
    let items: Vec<Value> =
        (0..12).map(|i| json!({"sku": format!("SKU-{:05}", n * 100 + i), "qty": i, "price_cents": 1999 + i})).collect();
    json!({"order_id": n, "customer": "ACME Corporation", "status": "confirmed", "items": items})
}

fn metric(broker: &Broker, name: &str) -> u64 {
    let mut s = TcpStream::connect(broker.addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

#[test]
fn events_are_compressed_once_and_inflate_to_the_plain_bytes() {
    let broker = Broker::start();
    let (mut plain, head) = Raw::connect(&broker, "/ws", None);
    assert!(!head.to_ascii_lowercase().contains("sec-websocket-extensions"), "{head}");
    let (mut compressed, head) = Raw::connect(&broker, "/ws", Some(OFFER));
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        ),
        "{head}"
    );
    let (mut second, _) = Raw::connect(&broker, "/ws", Some(OFFER));
    for client in [&mut plain, &mut compressed, &mut second] {
        assert_eq!(client.json()["type"], "ack");
        let subscribe = json!({"type": "subscribe", "message_id": "s", "payload": {"topics": ["orders"]}});
        client.send(&client_frame(0x81, subscribe.to_string().as_bytes()));
        assert_eq!(client.json()["type"], "ack");
    }
    let before = metric(&broker, "volley_compressed_deliveries_total");
    publish(&broker, &json!([{"topic": "orders", "data": kilobyte_event(1)}, {"topic": "orders", "data": "tiny"}]));
    let (big_plain, was) = plain.message();
    assert!(!was);
    let (big, was) = compressed.message();
    assert!(was, "a 1 KiB event goes compressed");
    assert_eq!(big, big_plain, "inflates to the very bytes a plain subscriber gets");
    assert_eq!(second.message(), (big_plain.clone(), true));
    let (small_plain, _) = plain.message();
    assert_eq!(compressed.message(), (small_plain, false), "under compression_min_bytes: plain, RSV1 clear");
    assert!(!second.message().1);
    assert_eq!(metric(&broker, "volley_compressed_deliveries_total") - before, 2);
}

#[test]
fn compressed_client_messages_fragmented_and_interleaved_with_ping() {
    let broker = Broker::start();
    let (mut client, _) = Raw::connect(&broker, "/ws", Some(OFFER));
    assert_eq!(client.json()["type"], "ack");
    let subscribe = json!({"type": "subscribe", "message_id": "s1", "payload": {"topics": ["a", "b", "c"]}});
    let compressed = deflate(subscribe.to_string().as_bytes());
    let (x, y) = compressed.split_at(compressed.len() / 2);
    let mut stream = client_frame(0x01 | 0x40, x);
    stream.extend(client_frame(0x89, b"hi"));
    stream.extend(client_frame(0x80, y));
    // Byte by byte: the layer must not need whole frames.
    for byte in &stream {
        client.send(&[*byte]);
    }
    let (first, payload) = client.frame();
    assert_eq!((first, payload.as_slice()), (0x8A, &b"hi"[..]), "the pong comes first");
    let ack = client.json();
    assert_eq!((ack["type"].as_str(), ack["correlation_id"].as_str()), (Some("ack"), Some("s1")), "{ack}");
}

#[test]
fn a_decompression_bomb_is_closed_with_1009_and_memory_stays_flat() {
    let broker = Broker::start();
    let bomb = client_frame(0x81 | 0x40, &deflate(&vec![b' '; 60 << 20]));
    assert!(bomb.len() < 64 * 1024, "the bomb fits under max_message_bytes compressed: {}", bomb.len());
    let rss = || -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
    };
    let before = rss();
    for _ in 0..8 {
        let (mut client, _) = Raw::connect(&broker, "/ws", Some(OFFER));
        assert_eq!(client.json()["type"], "ack");
        client.send(&bomb);
        let code = loop {
            let (first, payload) = client.frame();
            if first & 0x0f == 0x8 {
                break u16::from_be_bytes([payload[0], payload[1]]);
            }
        };
        assert_eq!(code, 1009);
    }
    let grown_mib = rss().saturating_sub(before) / 1024;
    // Each bomb is 60 MiB inflated; the broker inflates 64 KiB of each before closing.
    assert!(grown_mib < 16, "RSS grew {grown_mib} MiB");
}

#[test]
fn batches_and_resumes_reuse_the_shared_compressed_events() {
    let broker = Broker::start();
    let ids = publish(
        &broker,
        &json!([{"topic": "r", "data": kilobyte_event(0)}, {"topic": "r", "data": kilobyte_event(1)}, {"topic": "r", "data": kilobyte_event(2)}]),
    );
    let (mut plain, _) = Raw::connect(&broker, "/ws", None);
    let (mut resumed, _) = Raw::connect(&broker, "/ws", Some(OFFER));
    let (mut batched, _) = Raw::connect(&broker, "/ws?batch=1", Some(OFFER));
    for client in [&mut plain, &mut resumed, &mut batched] {
        assert_eq!(client.json()["type"], "ack");
    }
    let since = json!({"type": "subscribe", "message_id": "s", "payload": {"topics": ["r"], "since": ids[0]}});
    for client in [&mut plain, &mut resumed] {
        client.send(&client_frame(0x81, since.to_string().as_bytes()));
        assert_eq!(client.json()["type"], "ack");
    }
    let live = json!({"type": "subscribe", "message_id": "s", "payload": {"topics": ["r"]}});
    batched.send(&client_frame(0x81, live.to_string().as_bytes()));
    assert_eq!(batched.json()["type"], "ack");
    // Replayed: the same compressed frames as live delivery.
    let mut replayed = Vec::new();
    for _ in &ids[1..] {
        let (text, was) = resumed.message();
        assert!(was, "replayed events go compressed");
        assert_eq!(text, plain.message().0);
        replayed.push(text);
    }
    publish(
        &broker,
        &json!([{"topic": "r", "data": kilobyte_event(3)}, {"topic": "r", "data": "small"}, {"topic": "r", "data": kilobyte_event(4)}]),
    );
    let singles: Vec<String> = (0..3).map(|_| plain.message().0).collect();
    let mut elements = Vec::new();
    while elements.len() < 3 {
        let (text, was) = batched.message();
        assert!(was, "a batch of compressed events goes compressed");
        let batch: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(batch["type"], "batch");
        for event in batch["payload"]["events"].as_array().unwrap() {
            elements.push(event.clone());
        }
    }
    let singles: Vec<Value> = singles.iter().map(|s| serde_json::from_str(s).unwrap()).collect();
    assert_eq!(elements, singles);
}

#[test]
fn invalid_offers_are_declined_not_refused() {
    let broker = Broker::start();
    for offer in
        ["permessage-deflate; server_max_window_bits=8", "permessage-deflate; nonsense", "x-webkit-deflate-frame"]
    {
        let (mut client, head) = Raw::connect(&broker, "/ws", Some(offer));
        assert!(!head.to_ascii_lowercase().contains("sec-websocket-extensions"), "{offer}: {head}");
        assert_eq!(client.json()["type"], "ack");
        // And RSV1 is then a protocol error.
        client.send(&client_frame(0xC1, &deflate(b"{}")));
        let (first, payload) = client.frame();
        assert_eq!((first, u16::from_be_bytes([payload[0], payload[1]])), (0x88, 1002));
    }
    let broker = Broker::with(|c| c.compression = false);
    let (_, head) = Raw::connect(&broker, "/ws", Some(OFFER));
    assert!(!head.to_ascii_lowercase().contains("sec-websocket-extensions"), "compression = false: {head}");
}
