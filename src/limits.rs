//! Admission and rate limits: how many connections, from where, and how fast they talk.
//!
//! Owns the broker-wide connection counters checked at accept (`max_connections`, then
//! `max_connections_per_ip`) and the per-connection token bucket. Accept-time counting is
//! the only shared state here (one atomic and a mutex touched once per accept and close,
//! never per message); buckets live inside their connection. Nothing here reads sockets.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lru::LruCache;

/// Why a new connection was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over `max_connections`: `503` with `Retry-After`.
    Full,
    /// Over `max_connections_per_ip`: `429`.
    TooManyFromIp,
}

/// Broker-wide connection accounting.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl Admission {
    /// Limits of `max_total` connections, `max_per_ip` from one address.
    pub fn new(max_total: usize, max_per_ip: usize) -> Self {
        Self { max_total, max_per_ip, total: AtomicUsize::new(0), per_ip: Mutex::new(HashMap::new()) }
    }

    /// Counts a new connection from `ip`, or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Full);
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::TooManyFromIp);
        }
        *count += 1;
        Ok(())
    }

    /// Forgets a connection admitted from `ip`.
    pub fn release(&self, ip: IpAddr) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = per_ip.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                per_ip.remove(&ip);
            }
        }
    }

    /// Connections open now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// Raises this process's open-file limit as far as it may: the hard limit up to the
/// kernel's `nr_open` when privileged, then the soft limit to the hard one. A broker (or
/// a benchmark client) holds one descriptor per connection.
pub fn raise_fd_limit() {
    use rlimit::Resource;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let Ok((_, hard)) = rlimit::getrlimit(Resource::NOFILE) else { return };
    let raised = nr_open.max(hard);
    if rlimit::setrlimit(Resource::NOFILE, raised, raised).is_err() {
        // Unprivileged: the hard limit cannot rise, but the soft one may reach it.
        let _ = rlimit::setrlimit(Resource::NOFILE, hard, hard);
    }
}

/// Per-IP token buckets for HTTP publish requests, shared by all shards (touched once per
/// request, never per delivery). Bounded: when it holds `MAX_TRACKED_IPS` addresses,
/// addresses whose bucket has refilled are forgotten first.
#[derive(Debug)]
pub struct IpRates {
    rate: u32,
    burst: u32,
    /// The most recently seen addresses: past [`MAX_TRACKED_IPS`] the least recently seen
    /// one is forgotten (a full bucket again if it returns), never all of them at once.
    buckets: Mutex<LruCache<IpAddr, TokenBucket>>,
}

const MAX_TRACKED_IPS: NonZeroUsize = NonZeroUsize::new(65_536).expect("non-zero");

impl IpRates {
    /// `rate` requests a second per address, `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self { rate, burst, buckets: Mutex::new(LruCache::new(MAX_TRACKED_IPS)) }
    }

    /// Takes a token for a request from `ip`; `Err(retry_after_secs)` when over.
    pub fn take(&self, ip: IpAddr, now: Instant) -> Result<(), u64> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = buckets.get_or_insert_mut(ip, || TokenBucket::new(self.rate, self.burst, now));
        match bucket.take(now, Duration::MAX) {
            Verdict::Allow => Ok(()),
            _ => Err(bucket.retry_after_secs()),
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    /// Start of the current stretch of limiting: refusals with no quiet second between.
    limited_since: Option<Instant>,
    last_refusal: Option<Instant>,
}

/// What the bucket says of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Take it.
    Allow,
    /// Drop it and say `rate_limited`.
    Limit,
    /// Limited for longer than allowed: close the connection.
    Abuse,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
            limited_since: None,
            last_refusal: None,
        }
    }

    /// Takes a token for one message at `now`; `abuse_after` of continuous limiting is abuse.
    pub fn take(&mut self, now: Instant, abuse_after: Duration) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let quiet = self.last_refusal.is_none_or(|t| now.saturating_duration_since(t) > Duration::from_secs(1));
        if quiet {
            self.limited_since = None;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        self.last_refusal = Some(now);
        let since = *self.limited_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= abuse_after { Verdict::Abuse } else { Verdict::Limit }
    }

    /// Whether the last message was refused (the sender is over its rate now).
    pub fn is_limiting(&self) -> bool {
        self.limited_since.is_some() && self.tokens < 1.0
    }

    /// Whole seconds until one token is back (for `Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        (((1.0 - self.tokens).max(0.0) / self.rate).ceil() as u64).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_of_new_addresses_forgets_the_least_recent_not_every_address() {
        let rates = IpRates::new(1, 1);
        let now = Instant::now();
        let abuser: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(rates.take(abuser, now), Ok(()));
        let other = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + i));
        for i in 0..MAX_TRACKED_IPS.get() as u32 - 1 {
            let _ = rates.take(other(i), now);
        }
        assert!(rates.take(abuser, now).is_err(), "still limited, and now the most recent");
        for i in 0..1_000 {
            let _ = rates.take(other(1_000_000 + i), now);
        }
        assert!(rates.take(abuser, now).is_err(), "a flood of new addresses must not reset every bucket");
    }

    fn nofile() -> (u64, u64) {
        rlimit::getrlimit(rlimit::Resource::NOFILE).expect("getrlimit")
    }

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        let (_, hard_before) = nofile();
        raise_fd_limit();
        let (soft, hard) = nofile();
        assert_eq!(soft, hard);
        assert!(hard >= hard_before);
    }

    #[test]
    fn admission_checks_total_before_ip() {
        let a = Admission::new(2, 1);
        let ip: IpAddr = [127, 0, 0, 1].into();
        let other: IpAddr = [127, 0, 0, 2].into();
        assert_eq!(a.admit(ip), Ok(()));
        assert_eq!(a.admit(ip), Err(Refusal::TooManyFromIp));
        assert_eq!(a.admit(other), Ok(()));
        assert_eq!(a.admit(ip), Err(Refusal::Full));
        a.release(ip);
        assert_eq!(a.admit(ip), Ok(()));
        assert_eq!(a.total(), 2);
    }

    #[test]
    fn bucket_limits_then_calls_abuse() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        let five = Duration::from_secs(5);
        assert_eq!(b.take(t0, five), Verdict::Allow);
        assert_eq!(b.take(t0, five), Verdict::Allow);
        assert_eq!(b.take(t0, five), Verdict::Limit);
        assert_eq!(b.take(t0 + Duration::from_millis(100), five), Verdict::Allow);
        assert_eq!(b.take(t0 + Duration::from_millis(100), five), Verdict::Limit);
        assert_eq!(b.take(t0 + Duration::from_millis(5100), five), Verdict::Allow);
        let mut b = TokenBucket::new(1, 1, t0);
        b.take(t0, five);
        let mut t = t0;
        let mut verdict = Verdict::Allow;
        for _ in 0..100 {
            t += Duration::from_millis(60);
            verdict = b.take(t, five);
            while verdict == Verdict::Allow {
                verdict = b.take(t, five);
            }
        }
        assert_eq!(verdict, Verdict::Abuse);
    }
}
