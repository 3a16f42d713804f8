//! One shard: a thread with its own `mio::Poll`, listeners and sockets, driving a [`Core`].
//!
//! Owns the only code that touches sockets and the clock: it accepts (on a plain and, with
//! TLS, a TLS listener; a TLS socket goes through its [`TlsStream`], so the core sees
//! plaintext either way), reads into the core (as much as [`Core::read_budget`] allows: backpressure and rate pauses are the
//! core's decisions), writes what [`Core::poll_transmit`] names, shuts and drops the
//! sockets the core closed, and reads `now` at the start of each phase of a loop turn
//! (input, inbox and timers, writes) and hands it in. Everything a connection
//! does, its timers and the fan-out belong to the core; other shards reach this one only
//! through its inbox and waker.

use std::io::{self, IoSlice, Read, Write};
use std::net::{IpAddr, Shutdown};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use socket2::SockRef;

use crate::core::{AfterWrite, Core, Shared};
use crate::limits::Refusal;
use crate::tls::{Broken, Certificates, Input, TlsStream};

/// Token of the shard's waker.
pub const WAKER: Token = Token(usize::MAX - 1);
/// Token of the shard's first listener; the next ones count down from it.
const LISTENER: usize = usize::MAX - 2;

/// A listening socket of this shard, and the certificates if it speaks TLS.
pub struct Listener {
    /// The socket (`SO_REUSEPORT`, one per shard).
    pub socket: TcpListener,
    /// TLS: the pair new handshakes use.
    pub tls: Option<Arc<Certificates>>,
    /// The operators' listener (`admin_listen`).
    pub admin: bool,
}

/// A connection's socket.
enum Socket {
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl Socket {
    fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Socket::Plain(socket) => socket,
            Socket::Tls(tls) => tls.socket(),
        }
    }
}

/// Writes to a plain socket with `send`/`sendmsg` instead of `write`/`writev`.
///
/// The socket calls go straight to the protocol; the file calls first pass through the
/// file layer (`vfs_writev`: iovec import, area checks, change notification). At one small
/// write per delivery (a pinned 10,000-subscriber fan-out, perf), the way from the system
/// call to `tcp_sendmsg` was 9.9 % of the shard's samples with `writev` and 8.0 % with
/// `send`. The bytes and errors are the same.
struct Sender<'s>(&'s TcpStream);

impl Write for Sender<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        SockRef::from(self.0).send(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match bufs {
            [one] => self.write(one),
            _ => SockRef::from(self.0).send_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Read size per `read` call; one buffer per shard.
const SCRATCH_BYTES: usize = 64 * 1024;

/// A shard, ready to run on its own thread.
pub struct Shard {
    id: usize,
    core: Core,
    poll: Poll,
    /// Emptied when the core stops accepting (drain).
    listeners: Vec<Listener>,
    /// Sockets by the core's connection key.
    sockets: Vec<Option<Socket>>,
    scratch: Vec<u8>,
    /// The inbox held more than one turn's fan-out: poll without waiting.
    inbox_pending: bool,
}

impl Shard {
    /// A shard `id` polling `poll`, accepting on `listeners`.
    pub fn new(id: usize, poll: Poll, mut listeners: Vec<Listener>, shared: Arc<Shared>) -> io::Result<Self> {
        for (i, listener) in listeners.iter_mut().enumerate() {
            poll.registry().register(&mut listener.socket, Token(LISTENER - i), Interest::READABLE)?;
        }
        Ok(Self {
            id,
            core: Core::new(id, shared),
            poll,
            listeners,
            sockets: Vec::new(),
            scratch: vec![0; SCRATCH_BYTES],
            inbox_pending: false,
        })
    }

    /// Runs the loop until stopped or drained.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            let timeout = if self.core.has_read_again() || self.inbox_pending {
                Some(Duration::ZERO)
            } else {
                self.core.poll_timeout().map(|t| t.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            for key in self.core.take_read_again() {
                self.read(key, now);
            }
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    Token(token) if token > LISTENER - self.listeners.len() && token <= LISTENER => {
                        self.accept(LISTENER - token, now)
                    }
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(key, now);
                        }
                        if event.is_writable() {
                            self.write(key, now);
                        }
                    }
                }
            }
            // Read again for each phase: events published during this turn's reads must not
            // look older than their publish (publish->queue and publish->write latency).
            let now = Instant::now();
            self.inbox_pending = self.core.handle_inbox(now);
            self.core.handle_timeout(now);
            let now = Instant::now();
            for key in self.core.poll_transmit(now) {
                self.write(key, now);
            }
            self.reap();
            if !self.core.accepting() {
                for mut listener in self.listeners.drain(..) {
                    let _ = self.poll.registry().deregister(&mut listener.socket);
                }
            }
            if self.core.finished() {
                return Ok(());
            }
        }
    }

    fn accept(&mut self, which: usize, now: Instant) {
        // A key the core freed must not be handed out while its old socket is still here.
        self.reap();
        loop {
            let Some(listener) = self.listeners.get(which) else { return };
            let (socket, addr) = match listener.socket.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: log and try again on the next readiness event.
                    tracing::warn!(shard = self.id, error = %e, "accept failed");
                    return;
                }
            };
            let _ = socket.set_nodelay(true);
            let socket = match &listener.tls {
                None => Socket::Plain(socket),
                Some(certificates) => match TlsStream::accept(socket, certificates.current()) {
                    Ok(tls) => Socket::Tls(Box::new(tls)),
                    Err(e) => {
                        tracing::warn!(shard = self.id, error = %e, "TLS session not created");
                        continue;
                    }
                },
            };
            let refusal = self.core.admit(addr.ip()).err();
            let admin = listener.admin;
            self.insert(socket, addr.ip(), refusal, admin, now);
        }
    }

    fn insert(&mut self, mut socket: Socket, peer: IpAddr, refusal: Option<Refusal>, admin: bool, now: Instant) {
        let key = self.core.vacant_key();
        if let Err(e) = self.poll.registry().register(socket.tcp(), Token(key), Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!(error = %e, "register failed");
            if refusal.is_none() {
                self.core.release(peer);
            }
            return;
        }
        let accepted = self.core.accept(peer, refusal, now);
        debug_assert_eq!(accepted, key, "the core hands out the key it told");
        if admin {
            self.core.mark_admin(accepted);
        }
        if self.sockets.len() <= key {
            self.sockets.resize_with(key + 1, || None);
        }
        self.sockets[key] = Some(socket);
        for key in self.core.poll_transmit(now) {
            self.write(key, now);
        }
    }

    fn read(&mut self, key: usize, now: Instant) {
        loop {
            let budget = self.core.read_budget(key, self.scratch.len());
            let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else { return };
            if budget == 0 {
                return;
            }
            let read = match socket {
                Socket::Plain(socket) => socket.read(&mut self.scratch[..budget]),
                Socket::Tls(tls) => match tls.read(&mut self.scratch[..budget]) {
                    Ok(Input::Data(n)) => Ok(n),
                    Ok(Input::Eof) => Ok(0),
                    Ok(Input::WouldBlock) => Err(io::ErrorKind::WouldBlock.into()),
                    Err(Broken::Handshake(reason)) => return self.core.tls_handshake_failed(key, reason),
                    Err(Broken::Later) => return self.core.remove(key),
                },
            };
            match read {
                Ok(0) => return self.core.handle_eof(key, now),
                Ok(n) => {
                    self.core.handle_input(key, &self.scratch[..n], now);
                    if n == budget {
                        // Fairness: one buffer per connection per turn; the rest waits for
                        // the next turn so a flooding client cannot starve others.
                        return self.core.budget_spent(key, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return self.core.remove(key),
            }
        }
    }

    fn write(&mut self, key: usize, now: Instant) {
        let Some(socket) = self.sockets.get_mut(key).and_then(Option::as_mut) else { return };
        let shutdown = match socket {
            Socket::Plain(socket) => self.core.write_to(key, &mut Sender(socket), now) == AfterWrite::Shutdown,
            Socket::Tls(tls) => {
                // Records rustls still holds go first: they are older than anything queued.
                match tls.flush() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => return self.core.remove(key),
                }
                if self.core.write_to(key, &mut tls.writer(), now) == AfterWrite::Shutdown {
                    tls.want_close();
                }
                match tls.flush() {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(_) => return self.core.remove(key),
                }
                // Half-close only once close_notify and everything before it left: asked
                // on every write turn, as the socket may have been full when the core
                // finished.
                tls.ready_to_shut()
            }
        };
        if shutdown && socket.tcp().shutdown(Shutdown::Write).is_err() {
            self.core.remove(key);
        }
    }

    /// Drops the sockets of the connections the core removed.
    fn reap(&mut self) {
        for key in self.core.poll_closed() {
            if let Some(mut socket) = self.sockets.get_mut(key).and_then(Option::take) {
                let _ = self.poll.registry().deregister(socket.tcp());
            }
        }
    }
}
