//! 50,000 subscribers of one topic join, then all leave: the index's insert and remove
//! path when one topic is very popular (an exact topic and a pattern).

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use volley::topic::{Index, Pattern};

const SUBSCRIBERS: usize = 50_000;

fn unsubscribe(c: &mut Criterion) {
    let mut group = c.benchmark_group("unsubscribe_50k_one_topic");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for text in ["chat.room1", "chat.*"] {
        let pattern = Pattern::parse(text).unwrap();
        group.bench_function(format!("insert_then_remove_all/{text}"), |b| {
            b.iter_batched(
                || (),
                |()| {
                    let mut index = Index::default();
                    for key in 0..SUBSCRIBERS {
                        index.insert(&pattern, key);
                    }
                    // Leave in join order: the worst case of a linear scan from the front
                    // after swap_remove has moved the tail forward.
                    for key in 0..SUBSCRIBERS {
                        assert!(index.remove(&pattern, key));
                    }
                    black_box(index.is_empty())
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, unsubscribe);
criterion_main!(benches);
