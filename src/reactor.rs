//! Starting and stopping the broker: listeners, shard threads, signals.
//!
//! Owns the process-level shape: one `SO_REUSEPORT` listener per shard on the same
//! address (the kernel spreads accepts over shards with no acceptor thread and no
//! hand-off queue, and a shard's accepts never wait on another's loop), the [`Shared`]
//! state built once, one thread per shard, and the drain on SIGTERM/SIGINT. It does not
//! run any event loop itself; the main thread only waits for signals and joins.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use mio::{Poll, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::bus::{Bus, Sequencer};
use crate::config::Config;
use crate::core::Shared;
use crate::engine::{Redis, RedisSettings};
use crate::mailbox::{Inbox, Lifecycle};
use crate::shard::{Listener, Shard, WAKER};
use crate::tls::{Certificates, TlsError};

/// A running broker.
pub struct Server {
    /// Bound addresses, in the order of [`Config::listeners`].
    addrs: Vec<(SocketAddr, crate::config::Listen)>,
    shared: Arc<Shared>,
    certificates: Option<Arc<Certificates>>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

fn listener(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

impl Server {
    /// Binds and starts every shard.
    pub fn start(config: Config) -> io::Result<Self> {
        let shards = config.shard_count();
        let certificates = match config.tls_cert.is_empty() {
            true => None,
            false => Some(Arc::new(
                Certificates::load(&config.tls_cert, &config.tls_key)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?,
            )),
        };
        // Per shard, one socket per configured listener, all on the address the first
        // shard bound (port 0 becomes one port for every shard).
        let mut listeners: Vec<Vec<Listener>> = (0..shards).map(|_| Vec::new()).collect();
        let mut addrs = Vec::new();
        for listen in config.listeners() {
            let first = listener(listen.addr)?;
            let addr = first.local_addr()?;
            addrs.push((addr, listen));
            let tls = listen.tls.then(|| certificates.clone()).flatten();
            listeners[0].push(Listener { socket: first, tls: tls.clone(), admin: listen.admin });
            for shard in listeners.iter_mut().skip(1) {
                shard.push(Listener { socket: listener(addr)?, tls: tls.clone(), admin: listen.admin });
            }
        }
        let mut polls = Vec::with_capacity(shards);
        let mut inboxes = Vec::with_capacity(shards);
        for _ in 0..shards {
            let poll = Poll::new()?;
            inboxes.push(Inbox::new(Waker::new(poll.registry(), WAKER)?, config.shard_queue_capacity));
            polls.push(poll);
        }
        let retention = config.retention();
        let (bus, engine) = if config.engine == "memory" {
            (Bus::new(inboxes, retention, config.max_message_bytes), None)
        } else {
            let spec = config.engine_spec().map_err(io::Error::other)?;
            let shards = spec.placement.shards();
            let settings = RedisSettings {
                spec,
                stream: config.redis_stream.clone(),
                max_len: config.history_max_events,
                queue: config.shard_queue_capacity,
                request_timeout: std::time::Duration::from_millis(config.http_request_timeout_ms),
            };
            let (redis, submit) = Redis::new(settings).map_err(|e| io::Error::other(format!("engine: {e}")))?;
            let bus = Bus::with_sequencer(inboxes, retention, config.max_message_bytes, Sequencer::Engine(submit))
                .with_engine_shards(shards);
            (bus, Some(redis))
        };
        let bus = Arc::new(bus);
        let status = engine.as_ref().map(|e| e.status.clone());
        let epoch = (std::time::Instant::now(), std::time::SystemTime::now());
        // Presence, webhooks' cluster view and server API actions go through one server:
        // the first listed, or the master of their hash tag's slot on a Redis Cluster.
        let mirror = config.engine_spec().ok().map(|spec| crate::presence_mirror::Settings {
            spec,
            prefix: config.redis_stream.clone(),
            ttl: std::time::Duration::from_millis(config.presence_ttl_ms),
        });
        let shared = Arc::new(Shared::new(config, bus.clone(), status, shards, epoch));
        if let Some(engine) = engine {
            engine.start(bus.clone(), shared.interest.clone())?;
            wait_for_catch_up(&bus);
        }
        if let Some(settings) = mirror {
            crate::presence_mirror::start(settings, shared.clone())?;
        }
        let mut threads = Vec::with_capacity(shards);
        for (id, (poll, listener)) in polls.into_iter().zip(listeners).enumerate() {
            let shared = shared.clone();
            // Built on its own thread: a shard's queues hold thread-local handles (`Rc`).
            let thread = std::thread::Builder::new()
                .name(format!("volley-shard-{id}"))
                .spawn(move || contain(id, move || Shard::new(id, poll, listener, shared)?.run()))?;
            threads.push(thread);
        }
        tracing::info!(addrs = ?addrs.iter().map(|(a, _)| *a).collect::<Vec<_>>(), tls = certificates.is_some(), shards, "volley listening");
        Ok(Self { addrs, shared, certificates, threads })
    }

    /// The bound address of `listen` (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0].0
    }

    /// The bound address of `listen_tls`, if set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.addrs.iter().skip(1).find(|(_, l)| l.tls).map(|(a, _)| *a)
    }

    /// The bound address of `admin_listen`, if set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.addrs.iter().find(|(_, l)| l.admin).map(|(a, _)| *a)
    }

    /// Loads the certificate pair again (SIGHUP): new handshakes use it; on failure the
    /// old pair stays and the error says why.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.certificates {
            Some(certificates) => certificates.reload(),
            None => Ok(()),
        }
    }

    /// Begins a graceful drain: stop accepting, `/health` 503, close WebSockets with
    /// 1001 after their queued events, end SSE streams; shards exit when empty or at the
    /// drain timeout.
    pub fn drain(&self) {
        request(&self.shared, Lifecycle::Drain);
    }

    /// Stops every shard at once.
    pub fn stop(&self) {
        request(&self.shared, Lifecycle::Stop);
    }

    /// Waits for every shard to exit.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("a shard panicked")),
            }
        }
        result
    }
}

/// The one way a drain or a stop is asked of every shard (a drain also turns `/health` to
/// 503 at once).
fn request(shared: &Shared, lifecycle: Lifecycle) {
    if lifecycle == Lifecycle::Drain {
        shared.draining.store(true, Ordering::Release);
    }
    for inbox in shared.bus.inboxes() {
        inbox.request(lifecycle);
    }
}

/// Longest a starting node waits for the engine's first load before it serves.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Holds the shards back (connections wait in the listen backlog) until the engine has
/// loaded the retained log, so a client that resumes on a node that just (re)started gets
/// its replay instead of `recovered:false`. With the engine unreachable the node serves
/// after [`CATCH_UP_WAIT`] anyway: publishes are refused and resumes say `recovered:false`
/// until it catches up.
fn wait_for_catch_up(bus: &Bus) {
    let deadline = std::time::Instant::now() + CATCH_UP_WAIT;
    while !bus.caught_up() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    if !bus.caught_up() {
        tracing::warn!("engine not reachable yet; serving, resumes say recovered:false until it catches up");
    }
}

/// Exit status of a process whose shard panicked (EX_SOFTWARE).
pub const PANIC_EXIT_CODE: i32 = 70;

/// Runs a shard; if it panics, the whole process exits with [`PANIC_EXIT_CODE`].
///
/// A live process with a dead shard is the worst outcome: its inbox fills, every publish is
/// refused, gathers and `?wait=1` never complete, and the kernel keeps handing it new
/// connections. Restarting the shard in place would need every other shard and the engine
/// threads to forget what they hold for it, so volley does what a supervisor expects
/// instead: it logs the panic and exits non-zero; systemd or Kubernetes restarts it, and
/// clients reconnect and resume with `since` (history survives with the Redis engine).
fn contain(id: usize, run: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(shard = id, %message, "shard panicked; exiting so a supervisor restarts volley");
            eprintln!("volley: shard {id} panicked ({message}); exiting with status {PANIC_EXIT_CODE}");
            std::process::exit(PANIC_EXIT_CODE);
        }
    }
}

/// Runs the broker until SIGTERM/SIGINT, then drains (a second signal stops at once);
/// SIGHUP reloads the TLS certificate pair.
pub fn serve(config: Config) -> io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    crate::limits::raise_fd_limit();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let server = Server::start(config)?;
    let handle = signals.handle();
    let shared = server.shared.clone();
    let certificates = server.certificates.clone();
    std::thread::Builder::new().name("volley-signals".into()).spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            if signal == SIGHUP {
                match certificates.as_deref().map(Certificates::reload) {
                    Some(Ok(())) => tracing::info!("TLS certificate pair reloaded"),
                    Some(Err(e)) => tracing::error!(error = %e, "TLS reload failed; keeping the old pair"),
                    None => tracing::info!("SIGHUP: no TLS configured, nothing to reload"),
                }
                continue;
            }
            seen += 1;
            if seen == 1 {
                tracing::info!(signal, "draining");
                request(&shared, Lifecycle::Drain);
            } else {
                request(&shared, Lifecycle::Stop);
            }
        }
    })?;
    let result = server.join();
    handle.close();
    tracing::info!("stopped");
    result
}
