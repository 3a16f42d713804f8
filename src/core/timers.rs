//! The shard's timer queue: at most one deadline per connection, moved in place.
//!
//! An indexed binary min-heap keyed by the connection's slab key: setting a connection's
//! deadline moves its one entry up or down (O(log n)), clearing it removes the entry, so
//! the heap never holds a stale or duplicate entry and a handler runs once per deadline.
//! (A lazy heap that pushes a new entry whenever a deadline moves earlier and skips stale
//! ones on pop grew an entry per rate-limit pause and ran a connection's handler once per
//! duplicate.) It knows nothing of connections: the core says which deadline each key has.

use std::time::Instant;

/// Deadlines by connection key.
#[derive(Debug, Default)]
pub(super) struct Timers {
    /// (deadline, key), a min-heap on the deadline.
    heap: Vec<(Instant, usize)>,
    /// Position of each key's entry in `heap`, `NONE` when it has none.
    position: Vec<usize>,
}

const NONE: usize = usize::MAX;

impl Timers {
    /// Gives `key` the deadline `at` (`None`: no deadline), replacing the one it had.
    pub(super) fn set(&mut self, key: usize, at: Option<Instant>) {
        if key >= self.position.len() {
            if at.is_none() {
                return;
            }
            self.position.resize(key + 1, NONE);
        }
        match (self.position[key], at) {
            (NONE, None) => {}
            (NONE, Some(at)) => {
                self.heap.push((at, key));
                self.position[key] = self.heap.len() - 1;
                self.up(self.heap.len() - 1);
            }
            (i, Some(at)) => {
                self.heap[i].0 = at;
                let i = self.up(i);
                self.down(i);
            }
            (i, None) => self.remove_at(i),
        }
    }

    /// The earliest deadline.
    pub(super) fn next(&self) -> Option<Instant> {
        self.heap.first().map(|&(at, _)| at)
    }

    /// Removes and returns the key with the earliest deadline if it is due at `now`.
    pub(super) fn pop_due(&mut self, now: Instant) -> Option<usize> {
        let &(at, key) = self.heap.first()?;
        if at > now {
            return None;
        }
        self.remove_at(0);
        Some(key)
    }

    /// Entries held (one per connection with a deadline).
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    fn remove_at(&mut self, i: usize) {
        let last = self.heap.len() - 1;
        self.swap(i, last);
        let (_, key) = self.heap.pop().expect("the heap holds entry i");
        self.position[key] = NONE;
        if i < self.heap.len() {
            let i = self.up(i);
            self.down(i);
        }
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        self.position[self.heap[a].1] = a;
        self.position[self.heap[b].1] = b;
    }

    fn up(&mut self, mut i: usize) -> usize {
        while i > 0 {
            let parent = (i - 1) / 2;
            if self.heap[parent].0 <= self.heap[i].0 {
                break;
            }
            self.swap(i, parent);
            i = parent;
        }
        i
    }

    fn down(&mut self, mut i: usize) {
        loop {
            let (left, right) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if left < self.heap.len() && self.heap[left].0 < self.heap[least].0 {
                least = left;
            }
            if right < self.heap.len() && self.heap[right].0 < self.heap[least].0 {
                least = right;
            }
            if least == i {
                return;
            }
            self.swap(i, least);
            i = least;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_entry_per_key_moved_in_place_and_popped_in_order() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut timers = Timers::default();
        // A pseudo-random walk of sets and clears against a model of one deadline per key.
        let mut model: Vec<Option<Instant>> = vec![None; 50];
        let mut seed = 7u64;
        for _ in 0..5_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = (seed >> 33) as usize % model.len();
            let deadline = (!(seed >> 20).is_multiple_of(4)).then(|| at((seed >> 40) % 1_000));
            timers.set(key, deadline);
            model[key] = deadline;
            assert_eq!(timers.len(), model.iter().flatten().count());
            assert_eq!(timers.next(), model.iter().flatten().min().copied());
        }
        let mut popped = Vec::new();
        while let Some(key) = timers.pop_due(at(1_000)) {
            popped.push(model[key].take().expect("popped a key with a deadline"));
        }
        assert!(popped.windows(2).all(|w| w[0] <= w[1]), "due deadlines come earliest first");
        assert!(model.iter().all(Option::is_none), "every deadline was popped once");
    }

    #[test]
    fn nothing_pops_before_it_is_due() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.set(3, Some(t0 + Duration::from_millis(5)));
        assert_eq!(timers.pop_due(t0), None);
        timers.set(3, Some(t0));
        assert_eq!(timers.pop_due(t0), Some(3));
        assert_eq!(timers.pop_due(t0), None);
        timers.set(3, None);
        timers.set(9, None);
        assert_eq!(timers.len(), 0);
    }
}
