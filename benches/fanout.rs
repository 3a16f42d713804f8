//! Encode one event and queue it to 10,000 in-memory connections: the bus's encode-once
//! path plus a shard's index lookup and per-connection queueing, without sockets.

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use volley::bus::{Accepted, Bus};
use volley::conn::{Chunk, LocalEvent, Outbound};
use volley::history::Retention;
use volley::mailbox::{Inbox, Reply, ReplyTo};
use volley::protocol::PublishRequest;
use volley::topic::{Index, Pattern};

const CONNECTIONS: usize = 10_000;

fn bus() -> (Bus, mio::Poll) {
    let poll = mio::Poll::new().unwrap();
    let inbox = Inbox::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap(), 1 << 16);
    let retention = Retention { max_events: 1000, max_age: Duration::from_secs(300), max_bytes: 64 << 20 };
    (Bus::new(vec![inbox], retention, 64 * 1024), poll)
}

fn request() -> PublishRequest {
    let raw =
        RawValue::from_string(r#"{"topic":"chat.room1","source":"api","data":{"text":"hello, world","n":42}}"#.into())
            .unwrap();
    PublishRequest::from_json(&raw, "").unwrap()
}

fn fanout(c: &mut Criterion) {
    let (bus, _poll) = bus();
    let mut index = Index::default();
    let patterns =
        [Pattern::parse("chat.room1").unwrap(), Pattern::parse("chat.*").unwrap(), Pattern::parse("chat.>").unwrap()];
    for conn in 0..CONNECTIONS {
        index.insert(&patterns[conn % patterns.len()], conn);
    }
    let mut outbounds: Vec<Outbound> = (0..CONNECTIONS).map(|_| Outbound::default()).collect();
    let reply = Reply { to: ReplyTo { shard: 0, key: 0, conn_id: 0 }, wait: false, websocket: None };
    let mut group = c.benchmark_group("fanout");
    group.sample_size(20).measurement_time(Duration::from_secs(3)).throughput(Throughput::Elements(CONNECTIONS as u64));
    group.bench_function("encode_once_queue_to_10k_connections", |b| {
        b.iter(|| {
            let Ok(Accepted::Now(_)) = bus.publish(vec![request()], reply.clone(), Instant::now(), SystemTime::now())
            else {
                panic!("published")
            };
            let delivery = bus.inboxes()[0].events.pop().unwrap();
            let local = LocalEvent::new(delivery.event.clone());
            index.for_each_match(&delivery.event.topic, |conn| {
                outbounds[conn].push(Chunk::WsEvent(local.clone(), None))
            });
            for out in &mut outbounds {
                out.write_to(&mut std::io::sink(), |e, _| {
                    black_box(e);
                })
                .unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
