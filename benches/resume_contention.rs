//! Publish latency while resuming subscribers replay the retained history.
//!
//! Builds a bus in-process (no sockets), retains 10,000 events of about 500 bytes, then
//! publishes one event every 50 µs and records each publish's latency from its scheduled
//! send time (so a publisher held up behind a lock is charged for every publish it
//! delays): first with no readers, then while one and then two threads replay the whole
//! retained history back to back, as a broker's shards do when clients resume with
//! `since` (each replay is one client resuming 10,000 events; the row says how many
//! resumes ran during the measurement, far more than 50). Prints one row per phase and the
//! ratio of their p99s. With two readers and the publisher on a 2-core machine, the
//! publisher also competes for a core, whatever the locking.
//!
//! Run: `cargo bench --bench resume_contention`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::Histogram;
use serde_json::value::RawValue;
use volley::bus::{Accepted, Bus};
use volley::conn::Filter;
use volley::history::Retention;
use volley::mailbox::{Inbox, Reply, ReplyTo};
use volley::protocol::PublishRequest;
use volley::topic::Pattern;

const RETAINED: u64 = 10_000;
/// Publishes a reader may race past between reading `last_seq` and replaying, before its
/// starting id is evicted (see `reader`).
const SLACK: u64 = 64;
const PUBLISHES: u64 = 20_000;
const PACE: Duration = Duration::from_micros(50);

fn request(i: u64) -> PublishRequest {
    let text = "x".repeat(440);
    let raw = RawValue::from_string(format!(r#"{{"topic":"chat.room{}","data":{{"n":{i},"text":"{text}"}}}}"#, i % 10))
        .expect("valid JSON");
    PublishRequest::from_json(&raw, "").expect("valid request")
}

fn publish(bus: &Bus, request: PublishRequest) -> Box<str> {
    let reply = Reply { to: ReplyTo { shard: 0, key: 0, conn_id: 0 }, wait: false, websocket: None };
    match bus.publish(vec![request], reply, Instant::now(), SystemTime::now()) {
        Ok(Accepted::Now(mut ids)) => ids.remove(0),
        other => panic!("publish refused: {other:?}"),
    }
}

fn drain(bus: &Bus) {
    while bus.inboxes()[0].events.pop().is_some() {}
}

/// Publishes at a fixed pace; latency counts from each publish's scheduled time.
fn measure(bus: &Bus, next: &mut u64) -> Histogram<u64> {
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
    let requests: Vec<_> = (0..PUBLISHES).map(|i| request(*next + i)).collect();
    *next += PUBLISHES;
    let start = Instant::now() + Duration::from_millis(10);
    for (i, request) in requests.into_iter().enumerate() {
        let scheduled = start + PACE * i as u32;
        while let Some(ahead) = scheduled.checked_duration_since(Instant::now()) {
            if ahead > Duration::from_micros(200) {
                std::thread::sleep(ahead - Duration::from_micros(100));
            } else {
                std::hint::spin_loop();
            }
        }
        publish(bus, request);
        histogram.saturating_record(scheduled.elapsed().as_nanos() as u64);
        if i % 1024 == 0 {
            drain(bus);
        }
    }
    drain(bus);
    histogram
}

/// Replays everything retained, over and over, until `stop`.
fn reader(bus: &Bus, epoch: &str, stop: &AtomicBool, replays: &AtomicU64, misses: &AtomicU64) {
    let filter = Filter::new(vec![Pattern::parse("chat.*").expect("pattern")], Vec::new(), None);
    while !stop.load(Ordering::Relaxed) {
        // The event just before the oldest retained one: replaying from it yields all
        // 10,000 (plus whatever was published meanwhile).
        let since = format!("{epoch}-{}", bus.last_seq() - RETAINED);
        match bus.replay(&since, usize::MAX, Instant::now(), SystemTime::now(), |e| filter.accepts(e)) {
            Ok(events) => {
                std::hint::black_box(events);
                replays.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                misses.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn row(name: &str, h: &Histogram<u64>) -> String {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    format!(
        "{name:<24} n={:>6}  p50={:>9.1} µs  p99={:>9.1} µs  p99.9={:>9.1} µs  max={:>9.1} µs",
        h.len(),
        us(0.5),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    )
}

fn main() {
    let poll = mio::Poll::new().expect("poll");
    // Large enough for every publish between drains: a full queue would refuse them.
    let inbox = Inbox::new(mio::Waker::new(poll.registry(), mio::Token(0)).expect("waker"), 1 << 16);
    let retention =
        Retention { max_events: (RETAINED + SLACK) as usize, max_age: Duration::from_secs(3600), max_bytes: 1 << 30 };
    let bus = Arc::new(Bus::new(vec![inbox], retention, 64 * 1024));
    let mut next = 0;
    let mut first = None;
    for _ in 0..RETAINED + SLACK {
        first.get_or_insert(publish(&bus, request(next)));
        next += 1;
        if next % 1024 == 0 {
            drain(&bus);
        }
    }
    drain(&bus);
    let epoch = first.expect("published").split_once('-').expect("local id").0.to_string();

    let quiet = measure(&bus, &mut next);
    let phases: Vec<_> =
        [1, 2].into_iter().map(|readers| (readers, with_readers(&bus, &epoch, readers, &mut next))).collect();

    println!(
        "resume_contention: {RETAINED} retained events of ~500 B, {PUBLISHES} publishes, one every {} µs, {} cores",
        PACE.as_micros(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("{}", row("no readers", &quiet));
    for (readers, (busy, replays, misses)) in &phases {
        let name = format!("{readers} replaying thread(s)");
        println!("{}   ({replays} resumes of 10,000 events, {misses} starts evicted)", row(&name, busy));
    }
    for (readers, (busy, _, _)) in &phases {
        println!(
            "p99 with {readers} replaying / p99 without: {:.2}",
            busy.value_at_quantile(0.99) as f64 / quiet.value_at_quantile(0.99) as f64
        );
    }
}

/// Measures publishes while `readers` threads replay; returns the latencies, the replays
/// completed during the measurement and how many starting ids were evicted under a reader.
fn with_readers(bus: &Arc<Bus>, epoch: &str, readers: usize, next: &mut u64) -> (Histogram<u64>, u64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let replays = Arc::new(AtomicU64::new(0));
    let misses = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..readers)
        .map(|_| {
            let (bus, epoch, stop, replays, misses) =
                (bus.clone(), epoch.to_string(), stop.clone(), replays.clone(), misses.clone());
            std::thread::spawn(move || reader(&bus, &epoch, &stop, &replays, &misses))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let replays_before = replays.load(Ordering::Relaxed);
    let busy = measure(bus, next);
    let done = replays.load(Ordering::Relaxed) - replays_before;
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("reader");
    }
    (busy, done, misses.load(Ordering::Relaxed))
}
