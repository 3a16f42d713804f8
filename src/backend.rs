//! Backends in the loop: calls to the application's HTTP endpoints (the connect,
//! subscribe, publish and rpc proxies of docs/protocol.md), made off the event loop.
//!
//! Owns the call pool, the HTTP/1.1 client and the reading of a backend's answer into an
//! [`Outcome`]. A shard hands [`Backend::call`] a body and an opaque context and goes on;
//! a pool thread posts the body, and the outcome goes back with the context through the
//! `deliver` function the pool was built with (the shard's mailbox). Threads are started
//! as calls need them (by a dispatcher thread: starting one can take milliseconds), never
//! more than `proxy_max_in_flight` (each runs one call at a time), run at a lower
//! priority than the shards, and end after [`IDLE_THREAD_EXIT`] without work. Everything
//! a shard touches on the way is lock-free, so it never waits on a preempted pool thread.
//! The client is `ureq`: blocking, so a call is a plain thread with no async runtime
//! beside the reactor, and its agent keeps connections to the backend alive.
//!
//! It must not touch connections, sockets of clients or the shards' state: what an answer
//! means for a connection (a grant, a refusal, a publish) is the shard's to decide.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use serde_json::{Map, Value};

use crate::config::Config;

/// Which proxy a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// `proxy_connect_url`: who is this connection?
    Connect = 0,
    /// `proxy_subscribe_url`: may it read these topics?
    Subscribe = 1,
    /// `proxy_publish_url`: may it publish this (and as what)?
    Publish = 2,
    /// `proxy_rpc_url`: answer this call.
    Rpc = 3,
}

impl Proxy {
    const ALL: [Self; 4] = [Self::Connect, Self::Subscribe, Self::Publish, Self::Rpc];

    /// The proxy's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Subscribe => "subscribe",
            Self::Publish => "publish",
            Self::Rpc => "rpc",
        }
    }
}

/// What came of a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// HTTP 2xx with a JSON object that is not a refusal.
    Answer(Map<String, Value>),
    /// The backend said no: `{"error":{"code","message"}}`.
    Refused {
        /// The backend's code, passed on to the client.
        code: String,
        /// The backend's message.
        message: String,
    },
    /// No answer within `proxy_timeout_ms`.
    Timeout,
    /// Unreachable, a non-2xx status, or an answer that is not a JSON object.
    Unavailable(String),
}

/// Why a call was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// `proxy_max_in_flight` calls are already running in the process.
    #[error("too many backend calls in flight")]
    InFlight,
}

/// Largest backend answer read; a larger one is `Unavailable`.
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;

/// Times a pool thread that just finished a call yields and looks for the next before it
/// parks.
const IDLE_SPINS: u32 = 32;

/// A pool thread with nothing to do for this long ends.
pub const IDLE_THREAD_EXIT: Duration = Duration::from_secs(30);

/// Stack of a pool thread: a call is ureq plus serde_json, nowhere near the default 2 MiB,
/// and a thousand slow calls mean a thousand threads.
const THREAD_STACK: usize = 256 * 1024;

/// A shard's mailbox was full: how long a finished call keeps trying to hand its outcome
/// back before it is dropped (and counted).
const DELIVER_PATIENCE: Duration = Duration::from_secs(1);

/// Counters for `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct BackendCounters {
    /// Calls started, by [`Proxy`].
    pub calls: [AtomicU64; 4],
    /// Calls answered `Timeout`.
    pub timeouts: AtomicU64,
    /// Calls answered `Unavailable`.
    pub unavailable: AtomicU64,
    /// Calls the backend refused.
    pub refused: AtomicU64,
    /// Calls not started: `proxy_max_in_flight` reached.
    pub busy: AtomicU64,
    /// Outcomes dropped because the asking shard's mailbox stayed full.
    pub undelivered: AtomicU64,
    /// Calls running now.
    pub in_flight: AtomicUsize,
    /// Pool threads alive now.
    pub threads: AtomicUsize,
}

/// One reading of [`BackendCounters`], for `/stats` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackendFigures {
    /// Calls started, by proxy name.
    pub calls: Vec<(&'static str, u64)>,
    /// Calls answered `Timeout`.
    pub timeouts: u64,
    /// Calls answered `Unavailable`.
    pub unavailable: u64,
    /// Calls the backend refused.
    pub refused: u64,
    /// Calls not started: `proxy_max_in_flight` reached.
    pub busy: u64,
    /// Outcomes dropped because the asking shard's mailbox stayed full.
    pub undelivered: u64,
    /// Calls running now.
    pub in_flight: usize,
    /// Pool threads alive now.
    pub threads: usize,
}

impl BackendCounters {
    /// The counters now.
    pub fn read(&self) -> BackendFigures {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BackendFigures {
            calls: Proxy::ALL.iter().map(|p| (p.as_str(), load(&self.calls[*p as usize]))).collect(),
            timeouts: load(&self.timeouts),
            unavailable: load(&self.unavailable),
            refused: load(&self.refused),
            busy: load(&self.busy),
            undelivered: load(&self.undelivered),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            threads: self.threads.load(Ordering::Relaxed),
        }
    }
}

/// Hands a context and its outcome back to the shard that asked; gives them back when the
/// shard's mailbox is full.
pub type Deliver<C> = dyn Fn(Box<(C, Outcome)>) -> Result<(), Box<(C, Outcome)>> + Send + Sync;

struct Job<C> {
    proxy: Proxy,
    body: Vec<u8>,
    context: C,
}

/// A pool thread as callers see it: a slot for one job, and how to wake it.
struct Worker<C> {
    slot: ArrayQueue<Job<C>>,
    thread: std::thread::Thread,
    /// [`IDLE`] (in the idle queue, free to claim), [`CLAIMED`], or [`GONE`] (idled out).
    state: AtomicU8,
}

const IDLE: u8 = 0;
const CLAIMED: u8 = 1;
const GONE: u8 = 2;

/// Everything a shard touches on its way to a pool thread is lock-free (queues, atomics,
/// an unpark): the pool threads run at a lower priority, and a shard must never wait on a
/// lock one of them holds while preempted.
struct Pool<C> {
    urls: [Option<String>; 4],
    agent: ureq::Agent,
    /// Pool threads waiting for a job (some may have idled out: claiming skips them).
    idle: ArrayQueue<Arc<Worker<C>>>,
    /// Jobs no idle thread took, for the dispatcher to start threads for.
    unassigned: ArrayQueue<Job<C>>,
    dispatcher: std::sync::OnceLock<std::thread::Thread>,
    deliver: Box<Deliver<C>>,
    counters: Arc<BackendCounters>,
}

/// The proxies of one process; `C` is what the caller needs back with each outcome.
pub struct Backend<C> {
    pool: Arc<Pool<C>>,
    max_in_flight: usize,
}

impl<C: Send + 'static> Backend<C> {
    /// The proxies `config` names; outcomes go back through `deliver`.
    pub fn new(config: &Config, deliver: Box<Deliver<C>>) -> Self {
        let url = |u: &String| (!u.is_empty()).then(|| u.clone());
        let max = config.proxy_max_in_flight;
        let pool = Arc::new(Pool {
            urls: [
                url(&config.proxy_connect_url),
                url(&config.proxy_subscribe_url),
                url(&config.proxy_publish_url),
                url(&config.proxy_rpc_url),
            ],
            agent: agent(Duration::from_millis(config.proxy_timeout_ms), max),
            // Both hold at most the calls in flight (claimed before a job is made).
            idle: ArrayQueue::new(max),
            unassigned: ArrayQueue::new(max),
            dispatcher: std::sync::OnceLock::new(),
            deliver,
            counters: Arc::default(),
        });
        if pool.urls.iter().any(Option::is_some) {
            let dispatcher = pool.clone();
            match std::thread::Builder::new()
                .name("volley-backend-dispatch".into())
                .spawn(move || dispatcher.dispatch())
            {
                Ok(handle) => {
                    let _ = pool.dispatcher.set(handle.thread().clone());
                }
                // `call` then refuses every call.
                Err(error) => tracing::error!(%error, "cannot start the backend dispatcher"),
            }
        }
        Self { pool, max_in_flight: max }
    }

    /// Whether `proxy` has a URL.
    pub fn configured(&self, proxy: Proxy) -> bool {
        self.pool.urls[proxy as usize].is_some()
    }

    /// The counters.
    pub fn counters(&self) -> &BackendCounters {
        &self.pool.counters
    }

    /// Starts a call to `proxy` (which must be configured) with a JSON `body`; its outcome
    /// comes back with `context`. Never blocks: the job goes to an idle pool thread, or,
    /// with none idle, to the dispatcher thread, which starts one (starting a thread can
    /// take milliseconds under load, which a shard must not wait).
    pub fn call(&self, proxy: Proxy, body: Vec<u8>, context: C) -> Result<(), Busy> {
        let counters = &self.pool.counters;
        let Some(dispatcher) = self.pool.dispatcher.get() else { return Err(Busy::InFlight) };
        let claimed = counters
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_in_flight).then_some(n + 1));
        if claimed.is_err() {
            counters.busy.fetch_add(1, Ordering::Relaxed);
            return Err(Busy::InFlight);
        }
        counters.calls[proxy as usize].fetch_add(1, Ordering::Relaxed);
        let Err(job) = self.pool.hand_to_idle(Job { proxy, body, context }) else { return Ok(()) };
        if self.pool.unassigned.push(job).is_err() {
            // Cannot happen (it holds as many as may be in flight); refuse rather than lose.
            counters.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(Busy::InFlight);
        }
        dispatcher.unpark();
        Ok(())
    }
}

impl<C: Send + 'static> Pool<C> {
    /// Gives `job` to an idle pool thread, or gives it back when none is idle.
    fn hand_to_idle(&self, job: Job<C>) -> Result<(), Job<C>> {
        while let Some(worker) = self.idle.pop() {
            // A thread that idled out meanwhile is skipped (and its entry dropped).
            if worker.state.compare_exchange(IDLE, CLAIMED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                // Its slot is empty: it took its last job before it became idle.
                let _ = worker.slot.push(job);
                worker.thread.unpark();
                return Ok(());
            }
        }
        Err(job)
    }

    /// The dispatcher: each job no idle thread took goes to one that became idle since, or
    /// to a new thread. So there are at most as many threads as calls in flight
    /// (`proxy_max_in_flight`) plus those idling.
    fn dispatch(self: Arc<Self>) {
        loop {
            while let Some(job) = self.unassigned.pop() {
                let Err(job) = self.hand_to_idle(job) else { continue };
                let pool = self.clone();
                self.counters.threads.fetch_add(1, Ordering::Relaxed);
                let spawned = std::thread::Builder::new()
                    .name("volley-backend".into())
                    .stack_size(THREAD_STACK)
                    .spawn(move || pool.work(job));
                if let Err(error) = spawned {
                    // Out of threads: the job is lost with the closure; its slot comes back.
                    tracing::error!(%error, "cannot start a backend call thread");
                    self.counters.threads.fetch_sub(1, Ordering::Relaxed);
                    self.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
                }
            }
            // An unpark before this park makes it return at once: no job is missed.
            std::thread::park();
        }
    }
}

impl<C> Pool<C> {
    /// Runs `job`, then whatever callers hand this thread, until it idles out.
    fn work(&self, mut job: Job<C>) {
        lower_priority();
        let me =
            Arc::new(Worker { slot: ArrayQueue::new(1), thread: std::thread::current(), state: AtomicU8::new(IDLE) });
        loop {
            let outcome = self.post(job.proxy, &job.body);
            self.hand_back(job.context, outcome);
            self.counters.in_flight.fetch_sub(1, Ordering::AcqRel);
            me.state.store(IDLE, Ordering::Release);
            if self.idle.push(me.clone()).is_err() {
                // More threads than calls may be in flight: this one is not needed.
                break;
            }
            let idle_since = Instant::now();
            let mut spins = 0;
            job = loop {
                if let Some(next) = me.slot.pop() {
                    break next;
                }
                // A busy backend sends the next call within microseconds: look again a few
                // times before sleeping (waking a parked thread costs tens of them).
                if spins < IDLE_SPINS {
                    spins += 1;
                    std::thread::yield_now();
                    continue;
                }
                let waited = idle_since.elapsed();
                if waited >= IDLE_THREAD_EXIT {
                    // Leave unless a caller claimed this thread meanwhile (its job is
                    // then on the way).
                    if me.state.compare_exchange(IDLE, GONE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                        self.counters.threads.fetch_sub(1, Ordering::Relaxed);
                        return;
                    }
                    std::thread::park();
                } else {
                    std::thread::park_timeout(IDLE_THREAD_EXIT - waited);
                }
            };
        }
        self.counters.threads.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HTTP/1.1 client of backend calls and webhooks: `timeout` per call, up to `idle`
/// connections kept alive, no proxy from the environment (backends sit beside the broker),
/// and a resolver that starts no thread (ureq's default starts one per call to time a
/// lookup out, which cost more CPU than the rest of a call).
pub fn agent(timeout: Duration, idle: usize) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        // A non-2xx status is an outcome to read, not a transport error.
        .http_status_as_error(false)
        .max_idle_connections(idle)
        .max_idle_connections_per_host(idle)
        .proxy(None)
        .user_agent("volley")
        .build();
    ureq::Agent::with_parts(config, ureq::unversioned::transport::DefaultConnector::new(), InPlaceResolver)
}

/// Resolves an IP literal in place, and a name with the system resolver on the calling
/// (pool) thread, which may block it but never a shard. ureq's resolver API is outside its
/// semver promise: Cargo.lock pins the version this is written against.
#[derive(Debug)]
struct InPlaceResolver;

impl ureq::unversioned::resolver::Resolver for InPlaceResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        use std::net::ToSocketAddrs;
        let authority = uri.authority().ok_or_else(|| ureq::Error::BadUri(uri.to_string()))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let mut addrs = self.empty();
        match host.parse::<std::net::IpAddr>() {
            Ok(ip) => addrs.push(std::net::SocketAddr::new(ip, port)),
            Err(_) => {
                for addr in (host, port).to_socket_addrs().map_err(ureq::Error::Io)?.take(16) {
                    addrs.push(addr);
                }
            }
        }
        if addrs.is_empty() { Err(ureq::Error::HostNotFound) } else { Ok(addrs) }
    }
}

/// Backend calls are background work: their threads run at a lower priority (nice 10) so
/// that, on a busy machine, the shards and their events go first.
fn lower_priority() {
    // SAFETY: setpriority takes no pointers; on Linux `0` names the calling thread.
    let lowered = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
    if lowered != 0 {
        tracing::debug!("could not lower a backend call thread's priority");
    }
}

impl<C> Pool<C> {
    fn post(&self, proxy: Proxy, body: &[u8]) -> Outcome {
        let Some(url) = &self.urls[proxy as usize] else {
            return Outcome::Unavailable(format!("no {} proxy configured", proxy.as_str()));
        };
        let outcome = match self.agent.post(url).header("Content-Type", "application/json").send(body) {
            Ok(mut response) => {
                let status = response.status().as_u16();
                match response.body_mut().with_config().limit(MAX_ANSWER_BYTES).read_to_vec() {
                    Ok(answer) => read_answer(status, &answer),
                    Err(error) => transport_failure(error),
                }
            }
            Err(error) => transport_failure(error),
        };
        match &outcome {
            Outcome::Answer(_) => {}
            Outcome::Refused { .. } => bump(&self.counters.refused),
            Outcome::Timeout => bump(&self.counters.timeouts),
            Outcome::Unavailable(why) => {
                bump(&self.counters.unavailable);
                tracing::debug!(proxy = proxy.as_str(), why, "backend unavailable");
            }
        }
        outcome
    }

    /// Gives the outcome to the asking shard, waiting out a full mailbox for a while.
    fn hand_back(&self, context: C, outcome: Outcome) {
        let mut pending = Box::new((context, outcome));
        let mut waited = Duration::ZERO;
        let step = Duration::from_millis(1);
        loop {
            match (self.deliver)(pending) {
                Ok(()) => return,
                Err(back) if waited < DELIVER_PATIENCE => {
                    pending = back;
                    std::thread::sleep(step);
                    waited += step;
                }
                Err(_) => return bump(&self.counters.undelivered),
            }
        }
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn transport_failure(error: ureq::Error) -> Outcome {
    match error {
        ureq::Error::Timeout(_) => Outcome::Timeout,
        ureq::Error::Io(io) if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
            Outcome::Timeout
        }
        other => Outcome::Unavailable(other.to_string()),
    }
}

/// Reads a backend's HTTP answer (docs/protocol.md, "Backends in the loop").
pub fn read_answer(status: u16, body: &[u8]) -> Outcome {
    if !(200..300).contains(&status) {
        return Outcome::Unavailable(format!("backend answered HTTP {status}"));
    }
    let mut answer = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(answer)) => answer,
        Ok(_) => return Outcome::Unavailable("backend answer is not a JSON object".into()),
        Err(error) => return Outcome::Unavailable(format!("backend answer is not JSON: {error}")),
    };
    match answer.remove("error") {
        None | Some(Value::Null) => Outcome::Answer(answer),
        Some(error) => {
            let text = |key: &str, default: &str| {
                error.get(key).and_then(Value::as_str).unwrap_or(default).chars().take(256).collect::<String>()
            };
            Outcome::Refused { code: text("code", "forbidden"), message: text("message", "refused by the backend") }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_are_read_by_status_and_shape() {
        assert_eq!(
            read_answer(200, br#"{"result":"allow"}"#),
            Outcome::Answer(json!({"result":"allow"}).as_object().unwrap().clone())
        );
        assert_eq!(
            read_answer(200, br#"{"error":{"code":"banned","message":"no"}}"#),
            Outcome::Refused { code: "banned".into(), message: "no".into() }
        );
        assert_eq!(
            read_answer(200, br#"{"error":{}}"#),
            Outcome::Refused { code: "forbidden".into(), message: "refused by the backend".into() }
        );
        assert!(matches!(read_answer(500, b"{}"), Outcome::Unavailable(_)));
        assert!(matches!(read_answer(200, b"[1]"), Outcome::Unavailable(_)));
        assert!(matches!(read_answer(200, b"not json"), Outcome::Unavailable(_)));
        // A null error is no error.
        assert!(matches!(read_answer(200, br#"{"error":null,"data":1}"#), Outcome::Answer(_)));
    }

    #[test]
    fn the_pool_refuses_past_its_bound_and_frees_a_slot_per_outcome() {
        // Nothing listens on port 9 of loopback: every call fails fast.
        let config =
            Config { proxy_rpc_url: "http://127.0.0.1:9/rpc".into(), proxy_max_in_flight: 2, ..Config::default() };
        let (sender, receiver) = std::sync::mpsc::channel();
        let backend: Backend<u32> = Backend::new(
            &config,
            Box::new(move |answer: Box<(u32, Outcome)>| {
                let _ = sender.send(*answer);
                Ok(())
            }),
        );
        assert!(backend.configured(Proxy::Rpc));
        assert!(!backend.configured(Proxy::Connect));
        let mut started = 0;
        let mut refused = 0;
        for i in 0..10 {
            match backend.call(Proxy::Rpc, b"{}".to_vec(), i) {
                Ok(()) => started += 1,
                Err(Busy::InFlight) => refused += 1,
            }
        }
        assert!(started >= 2 && refused > 0, "started {started}, refused {refused}");
        for _ in 0..started {
            let (_, outcome) = receiver.recv_timeout(Duration::from_secs(10)).expect("an outcome per call");
            assert!(matches!(outcome, Outcome::Unavailable(_)), "{outcome:?}");
        }
        // Every slot comes back (the counter falls just after the hand-back).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while backend.counters().in_flight.load(Ordering::Acquire) > 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(backend.counters().in_flight.load(Ordering::Acquire), 0);
        assert!(backend.counters().threads.load(Ordering::Relaxed) <= 2);
    }

    #[test]
    fn a_call_thread_runs_at_a_lower_priority() {
        let nice = std::thread::spawn(|| {
            lower_priority();
            // SAFETY: getpriority takes no pointers; `0` names this thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
        })
        .join()
        .unwrap();
        assert_eq!(nice, 10);
    }

    #[test]
    fn ip_literals_and_names_resolve_in_place() {
        use ureq::unversioned::resolver::Resolver;
        let config = ureq::config::Config::default();
        let timeout = ureq::unversioned::transport::NextTimeout::default;
        let resolve = |url: &str| InPlaceResolver.resolve(&url.parse().unwrap(), &config, timeout()).unwrap().to_vec();
        assert_eq!(resolve("http://127.0.0.1:9000/x"), ["127.0.0.1:9000".parse().unwrap()]);
        assert_eq!(resolve("http://[::1]:9000/x"), ["[::1]:9000".parse().unwrap()]);
        assert!(resolve("http://localhost:9000/x").iter().all(|a| a.port() == 9000 && a.ip().is_loopback()));
    }
}
