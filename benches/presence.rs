//! Presence at scale: `presence_stats` on a topic of 100 and of 100,000 members (O(1): the
//! same time), a join and leave pair, and the memory one member costs (RSS growth over
//! 100,000 entries, printed).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use volley::presence::{Entry, Presence, Transport};

fn entry(conn_id: u64) -> Entry {
    Entry {
        node: 7,
        conn_id,
        user: Some(format!("user-{}", conn_id % 1000).into()),
        info: None,
        transport: Transport::WebSocket,
        since_ms: 1_764_633_600_000,
    }
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok());
    kib.unwrap_or(0) * 1024
}

fn presence(c: &mut Criterion) {
    let before = rss_bytes();
    let presence = Presence::default();
    for conn in 0..100_000 {
        presence.join("big", (7, conn), || entry(conn));
    }
    let grown = rss_bytes().saturating_sub(before);
    println!("presence: {} bytes of RSS per member (100,000 members, 1,000 users)", grown / 100_000);
    for conn in 0..100 {
        presence.join("small", (7, conn), || entry(conn));
    }
    let mut g = c.benchmark_group("presence");
    g.sample_size(30).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(300));
    g.bench_function("stats_100_members", |b| b.iter(|| black_box(presence.stats(black_box("small")))));
    g.bench_function("stats_100000_members", |b| b.iter(|| black_box(presence.stats(black_box("big")))));
    g.bench_function("join_and_leave", |b| {
        b.iter(|| {
            presence.join("big", (8, 1), || entry(1));
            black_box(presence.leave("big", (8, 1)))
        })
    });
    g.finish();
}

criterion_group!(benches, presence);
criterion_main!(benches);
