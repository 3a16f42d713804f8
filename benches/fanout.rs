//! Encode one event and queue it to 10,000 in-memory connections: the bus's encode-once
//! path plus a shard's index lookup and per-connection queueing, without sockets; and a
//! shard's core fanning a 100-topic load out to 10,000 WebSocket connections, with the
//! writes going to a sink: the user-space part of a fan-out delivery (the kernel's part,
//! one small loopback write each, is `scripts/fanout-floor`'s).

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use volley::bus::{Accepted, Bus};
use volley::config::Config;
use volley::conn::{Chunk, LocalEvent, Outbound};
use volley::core::Core;
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

const TOPICS: usize = 100;

/// One event at a time, round-robin over 100 topics, each topic's 100 subscribers among
/// 10,000 connections, every write drained at once: between two events of one connection
/// the shard touches the other 9,900, so each delivery meets that connection's state cold,
/// as a fan-out subscriber's every event does.
fn core_fanout(c: &mut Criterion) {
    let epoch = (Instant::now(), SystemTime::now());
    let config = Config { shards: 1, max_connections_per_ip: usize::MAX, ..Config::default() };
    let (mut core, shared, _poll) = Core::standalone(config, epoch).unwrap();
    let now = epoch.0;
    let peer = std::net::IpAddr::from([127, 0, 0, 1]);
    let drain = |core: &mut Core| {
        for key in core.poll_transmit(now) {
            core.write_to(key, &mut std::io::sink(), now);
        }
    };
    for conn in 0..CONNECTIONS {
        core.admit(peer).unwrap();
        let key = core.accept(peer, None, now);
        core.handle_input(key, UPGRADE.as_bytes(), now);
        let subscribe = format!(r#"{{"type":"subscribe","payload":{{"topics":["t{}"]}}}}"#, conn % TOPICS);
        let mut frame = Vec::new();
        volley::event::masked_frame(1, subscribe.as_bytes(), &mut frame);
        core.handle_input(key, &frame, now);
        drain(&mut core);
    }
    let bodies: Vec<String> = (0..TOPICS)
        .map(|t| format!(r#"{{"topic":"t{t}","source":"bench","data":{{"text":"hello, world"}}}}"#))
        .collect();
    let reply = Reply { to: ReplyTo { shard: 0, key: usize::MAX, conn_id: 0 }, wait: false, websocket: None };
    let mut next = 0;
    let mut group = c.benchmark_group("fanout");
    group.sample_size(20).measurement_time(Duration::from_secs(3)).throughput(Throughput::Elements(TOPICS as u64));
    group.bench_function("core_100_topics_10k_websockets_per_delivery", |b| {
        b.iter(|| {
            let requests = volley::protocol::parse_publish_body(bodies[next % TOPICS].as_bytes(), 1).unwrap();
            next += 1;
            shared.bus.publish(requests, reply.clone(), now, epoch.1).unwrap();
            while core.handle_inbox(now) {}
            drain(&mut core);
        })
    });
    group.finish();
}

const UPGRADE: &str = "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

criterion_group!(benches, fanout, core_fanout);
criterion_main!(benches);
