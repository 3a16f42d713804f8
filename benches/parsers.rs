//! The parsers that face the network and the subscription index, each on typical input.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use volley::event::push_ws_text_header;
use volley::http::parse_head;
use volley::protocol::{parse_client_message, parse_publish_body};
use volley::topic::{Index, Pattern};
use volley::ws::Codec;

fn masked_text(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    volley::event::masked_text(payload, &mut frame);
    frame
}

fn group<'a>(c: &'a mut Criterion, name: &str) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut group = c.benchmark_group(name);
    group.sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    group
}

fn http_head(c: &mut Criterion) {
    let upgrade = b"GET /ws?batch=1 HTTP/1.1\r\nHost: broker.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: https://app.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n\r\n";
    let publish = b"POST /publish?wait=1 HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\nContent-Length: 64\r\nAuthorization: Bearer abc.def.ghi\r\n\r\n";
    let mut g = group(c, "http_head");
    g.bench_function("upgrade", |b| b.iter(|| black_box(parse_head(black_box(upgrade)))));
    g.bench_function("publish", |b| b.iter(|| black_box(parse_head(black_box(publish)))));
    g.finish();
}

fn ws_frames(c: &mut Criterion) {
    let small = masked_text(&[b'a'; 100]);
    let large = masked_text(&vec![b'a'; 16 * 1024]);
    let mut g = group(c, "ws_frame");
    for (name, frame) in [("decode_100B", &small), ("decode_16KiB", &large)] {
        g.throughput(Throughput::Bytes(frame.len() as u64));
        let mut codec = Codec::new(1 << 20, false);
        let mut out = Vec::new();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut input: &[u8] = frame;
                while let Ok(Some(message)) = codec.next(&mut input, &mut out) {
                    black_box(message);
                }
            })
        });
    }
    let payload = vec![b'x'; 200];
    g.throughput(Throughput::Bytes(payload.len() as u64));
    g.bench_function("encode_header_200B", |b| {
        b.iter(|| {
            let mut frame = Vec::with_capacity(204);
            push_ws_text_header(&mut frame, payload.len());
            frame.extend_from_slice(&payload);
            black_box(frame)
        })
    });
    let mut codec = Codec::new(1 << 20, false);
    g.bench_function("encode_tungstenite_200B", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(256);
            codec.send_text(String::from_utf8(payload.clone()).unwrap(), &mut out);
            black_box(out)
        })
    });
    g.finish();
}

fn protocol_messages(c: &mut Criterion) {
    let subscribe = r#"{"type":"subscribe","message_id":"m1","payload":{"subscription_id":"sub-1","topics":["chat.*","news.>"],"sources":["api"],"since":"18c3f1a2b4d-42"}}"#;
    let publish = r#"{"type":"request","message_id":"m7","payload":{"action":"publish","topic":"chat.room1","source":"api","data":{"text":"hello","n":1}}}"#;
    let body = br#"[{"topic":"chat.room1","data":{"a":1}},{"topic":"chat.room2","source":"x","correlation_id":"c","data":[1,2,3]}]"#;
    let mut g = group(c, "protocol");
    g.bench_function("subscribe", |b| b.iter(|| black_box(parse_client_message(black_box(subscribe)).is_ok())));
    g.bench_function("publish_request", |b| b.iter(|| black_box(parse_client_message(black_box(publish)).is_ok())));
    g.bench_function("publish_body_2_events", |b| {
        b.iter(|| black_box(parse_publish_body(black_box(body), 1000).is_ok()))
    });
    g.finish();
}

fn topic_matching(c: &mut Criterion) {
    let mut index = Index::default();
    for i in 0..10_000usize {
        let pattern = match i % 4 {
            0 => format!("room{}.messages", i % 2500),
            1 => format!("room{}.*", i % 2500),
            2 => format!("user.{}.>", i % 2500),
            _ => format!("*.presence.u{i}"),
        };
        index.insert(&Pattern::parse(&pattern).unwrap(), i);
    }
    let mut g = group(c, "topic_index_10k");
    for topic in ["room42.messages", "user.42.inbox.new", "nobody.listens.here"] {
        g.bench_function(topic, |b| {
            b.iter(|| {
                let mut matched = 0;
                index.for_each_match(black_box(topic), |_| matched += 1);
                black_box(matched)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, http_head, ws_frames, protocol_messages, topic_matching);
criterion_main!(benches);
