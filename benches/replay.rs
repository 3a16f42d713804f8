//! Replaying 10,000 retained events into a resuming subscriber's queue.

use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use serde_json::value::RawValue;
use volley::bus::{Accepted, Bus};
use volley::conn::{Chunk, Filter, LocalEvent, Outbound};
use volley::history::Retention;
use volley::mailbox::{Inbox, Reply, ReplyTo};
use volley::protocol::PublishRequest;
use volley::topic::Pattern;

fn replay(c: &mut Criterion) {
    let poll = mio::Poll::new().unwrap();
    let inbox = Inbox::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap(), 1 << 15);
    let retention = Retention { max_events: 10_000, max_age: Duration::from_secs(3600), max_bytes: 256 << 20 };
    let bus = Bus::new(vec![inbox], retention, 64 * 1024);
    let reply = Reply { to: ReplyTo { shard: 0, key: 0, conn_id: 0 }, wait: false, websocket: None };
    let mut first = None;
    for i in 0..10_001 {
        let raw = RawValue::from_string(format!(r#"{{"topic":"chat.room{}","data":{{"n":{i}}}}}"#, i % 10)).unwrap();
        let Ok(Accepted::Now(ids)) = bus.publish(
            vec![PublishRequest::from_json(&raw, "").unwrap()],
            reply.clone(),
            Instant::now(),
            SystemTime::now(),
        ) else {
            panic!("published")
        };
        first.get_or_insert(ids[0].to_string());
        while bus.inboxes()[0].events.pop().is_some() {}
    }
    let since = first.unwrap();
    let filter = Filter::new(vec![Pattern::parse("chat.*").unwrap()], Vec::new(), None);
    let mut group = c.benchmark_group("replay");
    group.sample_size(20).measurement_time(Duration::from_secs(3)).throughput(Throughput::Elements(10_000));
    group.bench_function("10k_retained_events_into_a_queue", |b| {
        b.iter(|| {
            let events =
                bus.replay(&since, usize::MAX, Instant::now(), SystemTime::now(), |e| filter.accepts(e)).unwrap();
            assert_eq!(events.len(), 10_000);
            let mut out = Outbound::default();
            for event in events {
                out.push(Chunk::WsEvent(LocalEvent::new(event), None));
            }
            out
        })
    });
    group.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
