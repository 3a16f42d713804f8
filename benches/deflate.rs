//! permessage-deflate costs: compressing one event (done once per event, whatever the
//! number of subscribers) and inflating a client message (per message received).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use flate2::{Compress, Compression, FlushCompress};
use serde_json::json;
use volley::deflate::{Window, compress};
use volley::ws::Codec;

/// An application event of about 1 KiB, as the `--deflate` broadcast bench publishes.
fn event_json() -> Vec<u8> {
    let items: Vec<_> =
        (0..12).map(|i| json!({"sku": format!("SKU-{:05}", 4200 + i), "qty": i, "price_cents": 1999 + i})).collect();
    let data = json!({"order_id": 42, "customer": "ACME Corporation", "status": "confirmed", "items": items});
    json!({"type": "event", "message_id": "18c3f1a2b4d-42", "timestamp": "2026-12-02T06:00:00.000Z", "topic": "orders.eu", "source": "api", "correlation_id": null, "payload": data})
        .to_string()
        .into_bytes()
}

/// A masked client frame carrying `payload`, RSV1 set when `compressed`.
fn client_frame(payload: &[u8], compressed: bool) -> Vec<u8> {
    let mut frame = Vec::new();
    volley::event::masked_text(payload, &mut frame);
    if compressed {
        frame[0] |= 0x40;
    }
    frame
}

fn deflate(c: &mut Criterion) {
    let json = event_json();
    let mut g = c.benchmark_group("deflate");
    g.sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Bytes(json.len() as u64));
    for (name, window) in [("compress_event_1KiB", Window::Full), ("compress_event_1KiB_window_9", Window::Small)] {
        g.bench_function(name, |b| b.iter(|| black_box(compress(window, black_box(&json)))));
    }
    let mut compressor = Compress::new(Compression::default(), false);
    let mut compressed = Vec::with_capacity(json.len() + 64);
    compressor.compress_vec(&json, &mut compressed, FlushCompress::Sync).expect("compresses");
    compressed.truncate(compressed.len() - 4);
    for (name, frame) in [
        ("inflate_client_message_1KiB", client_frame(&compressed, true)),
        ("decode_plain_client_message_1KiB", client_frame(&json, false)),
    ] {
        let mut codec = Codec::new(1 << 20, true);
        let mut out = Vec::new();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut input: &[u8] = &frame;
                while let Ok(Some(message)) = codec.next(&mut input, &mut out) {
                    black_box(message);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, deflate);
criterion_main!(benches);
