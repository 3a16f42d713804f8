//! TLS on the shards: the certificate pair, its reload, and one connection's TLS layer.
//!
//! Owns loading `tls_cert`/`tls_key` into a rustls `ServerConfig` ([`Certificates`]: TLS
//! 1.3 and 1.2, ALPN `http/1.1`, swapped whole on reload so new handshakes use the new pair
//! and established connections keep theirs), and [`TlsStream`]: a socket with its rustls
//! session, driven without a runtime through rustls' unbuffered API. Records read from
//! the socket into the shard's scratch become plaintext for the connection core; what the
//! core writes is gathered from its slices (the shared event bytes), sealed into records in
//! the shard's scratch and written to the socket at once. A connection keeps a buffer of
//! its own only for what is unfinished (a record in part, records the socket did not take),
//! so an idle TLS connection holds none; the writer says `WouldBlock` while records wait,
//! so the core's outbound queue, with its bound, stays the only queue. It does not know
//! HTTP, WebSocket or the core's connections; the shard owns the sockets and calls it.

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::path::Path;
use std::sync::{Arc, RwLock};

use mio::net::TcpStream;
use rustls::ServerConfig;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, UnbufferedStatus, WriteTraffic,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Plaintext the core may write before the handshake ends (a refusal answered at accept):
/// past it the writer reports `WouldBlock` and the bytes wait in the core's bounded queue.
pub const BUFFER_LIMIT: usize = 32 * 1024;

/// Why the certificate pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("{key}: {path}: {message}")]
    File {
        /// The setting naming the file.
        key: &'static str,
        /// The file.
        path: String,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the pair (a key that does not match the certificate, say).
    #[error("tls_cert/tls_key: {0}")]
    Pair(rustls::Error),
}

/// The current certificate pair as a rustls server configuration, and where it came from.
#[derive(Debug)]
pub struct Certificates {
    cert_path: String,
    key_path: String,
    current: RwLock<Arc<ServerConfig>>,
}

impl Certificates {
    /// Loads the pair (exit 2 at start if this fails: the caller says so).
    pub fn load(cert_path: &str, key_path: &str) -> Result<Self, TlsError> {
        let config = server_config(cert_path, key_path)?;
        Ok(Self { cert_path: cert_path.into(), key_path: key_path.into(), current: RwLock::new(config) })
    }

    /// Loads the files again; on success new handshakes use the new pair, on failure the
    /// old pair stays and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert_path, &self.key_path)?;
        *self.current.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
        Ok(())
    }

    /// The configuration a new connection starts with.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

fn server_config(cert_path: &str, key_path: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let file_error =
        |key: &'static str, path: &str, message: String| TlsError::File { key, path: path.into(), message };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(Path::new(cert_path))
        .map_err(|e| file_error("tls_cert", cert_path, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error("tls_cert", cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("tls_cert", cert_path, "no CERTIFICATE in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_file(Path::new(key_path))
        .map_err(|e| file_error("tls_key", key_path, format!("no usable private key: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Pair)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Pair)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why a TLS connection failed during its handshake, for
/// `volley_tls_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not TLS, or TLS broken on the wire (garbage instead of a ClientHello).
    Protocol,
    /// A client with nothing in common (versions, cipher suites, ALPN).
    Incompatible,
    /// The client sent an alert (it distrusts the certificate, say).
    Alert,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// Every reason, in the order of [`Self::index`].
    pub const ALL: [HandshakeFailure; 4] = [Self::Protocol, Self::Incompatible, Self::Alert, Self::Other];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Protocol => "protocol",
            Self::Incompatible => "incompatible",
            Self::Alert => "alert",
            Self::Other => "other",
        }
    }

    /// Position in per-reason arrays.
    pub fn index(self) -> usize {
        self as usize
    }

    fn of(error: &rustls::Error) -> Self {
        use rustls::Error as E;
        match error {
            E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
                Self::Protocol
            }
            E::PeerMisbehaved(_) => Self::Protocol,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => Self::Incompatible,
            E::AlertReceived(_) => Self::Alert,
            _ => Self::Other,
        }
    }
}

/// What reading a TLS connection gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Input {
    /// Plaintext bytes put in the buffer.
    Data(usize),
    /// Nothing more until the socket is readable again.
    WouldBlock,
    /// The peer closed (with or without close_notify).
    Eof,
}

/// How a TLS connection broke.
#[derive(Debug)]
pub enum Broken {
    /// During the handshake: counted by reason.
    Handshake(HandshakeFailure),
    /// After it, or on the socket.
    Later,
}

/// The largest TLS record on the wire (16 KiB of plaintext, its header, tag and padding):
/// a read asks the socket for at least this much so a record never waits for a second read.
const MAX_RECORD: usize = 16 * 1024 + 2048 + 5;

/// Bytes a connection may hold undiscarded: a handshake message rustls is joining across
/// records stays until it is whole (rustls allows 64 KiB of message, its buffered API as
/// much of buffer), plus one record read past it. A peer that sends more (one byte of
/// message per padded record, say) is refused rather than kept.
const MAX_HELD: usize = 64 * 1024 + MAX_RECORD;

/// Plaintext encrypted per write: two full records, one `write` to the socket.
const PLAINTEXT_PER_WRITE: usize = 32 * 1024;

/// A TLS connection's bytes live in the shard's thread while it reads or writes, not in
/// the connection: an idle connection keeps no buffer at all (rustls' buffered API keeps a
/// 4 KiB read buffer per connection, however idle).
#[derive(Default)]
struct Scratch {
    /// Records as they arrive, before decryption.
    wire: Vec<u8>,
    /// Plaintext gathered from the core's slices.
    plain: Vec<u8>,
    /// Records sealed from it, on their way to the socket.
    sealed: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// A socket speaking TLS (a mio `TcpStream` on the shards; any byte stream in the fuzzer).
///
/// Built on rustls' unbuffered API: the session only decides, the bytes are ours. Between
/// calls a connection keeps only what could not be finished: a record that arrived in
/// part (`incoming`), records the socket did not take (`outgoing`, at most one write's
/// worth: the writer says `WouldBlock` until it is gone), plaintext that did not fit the
/// reader's buffer (`received`, at most one read's worth), and what the core wrote before
/// the handshake finished (`early`, at most [`BUFFER_LIMIT`]). Each is freed once empty.
pub struct TlsStream<S = TcpStream> {
    socket: S,
    session: UnbufferedServerConnection,
    incoming: Vec<u8>,
    outgoing: Vec<u8>,
    received: Vec<u8>,
    early: Vec<u8>,
    peer_closed: bool,
    close: Close,
    /// The session or the socket failed: nothing more is read or written.
    failed: bool,
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("handshaking", &self.session.is_handshaking()).finish()
    }
}

/// How far ending the connection has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Close {
    Open,
    /// The core finished; close_notify is not queued yet.
    Wanted,
    /// close_notify is queued behind everything before it.
    Queued,
    /// It left: the shard shut the socket's write side.
    Shut,
}

/// What the session asked for once it had processed every whole record it was given.
enum Settled {
    /// More bytes from the peer (a record in part, or the handshake's next flight).
    NeedBytes,
    /// The peer sent close_notify: nothing more will come.
    PeerClosed,
}

impl<S: Read + Write> TlsStream<S> {
    /// Starts the server side of a handshake on `socket`.
    pub fn accept(socket: S, config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            socket,
            session: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            received: Vec::new(),
            early: Vec::new(),
            peer_closed: false,
            close: Close::Open,
            failed: false,
        })
    }

    /// The socket (to register it, or shut it).
    pub fn socket(&mut self) -> &mut S {
        &mut self.socket
    }

    /// Reads plaintext into `buf`, reading and decrypting records from the socket as
    /// needed and sending what the handshake answers.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Input, Broken> {
        if !self.received.is_empty() {
            let n = buf.len().min(self.received.len());
            buf[..n].copy_from_slice(&self.received[..n]);
            self.received.drain(..n);
            release_if_empty(&mut self.received);
            return Ok(Input::Data(n));
        }
        if self.failed {
            return Err(Broken::Later);
        }
        if self.peer_closed {
            return Ok(Input::Eof);
        }
        let result = if self.incoming.is_empty() {
            // The usual case: records read into the shard's scratch, and only a record's
            // unfinished part (if any) copied to the connection.
            SCRATCH.with_borrow_mut(|scratch| {
                let mut filled = 0;
                let read_size = buf.len().max(MAX_RECORD);
                let result = self.read_into(&mut scratch.wire, &mut filled, read_size, buf);
                self.incoming.extend_from_slice(&scratch.wire[..filled]);
                result
            })
        } else {
            // Bytes already held are read onto in place, never copied per read: a peer
            // sending a record a byte at a time costs no more than one sending it whole.
            // One record's worth at a time, so what a connection holds stays near what it
            // needs.
            let mut held = std::mem::take(&mut self.incoming);
            let mut filled = held.len();
            let result = self.read_into(&mut held, &mut filled, MAX_RECORD, buf);
            held.truncate(filled);
            release_if_empty(&mut held);
            self.incoming = held;
            result
        };
        if result.is_err() {
            self.failed = true;
        }
        // A handshake that ended in this read lets what the core wrote before it go out.
        if !self.early.is_empty() && !self.session.is_handshaking() && !self.failed {
            let early = std::mem::take(&mut self.early);
            let sealed = self.with_traffic(|traffic, outgoing| seal(traffic, &early, outgoing));
            if !matches!(sealed, Ok(Ok(()))) {
                self.failed = true;
                return Err(Broken::Later);
            }
            let _ = self.flush();
        }
        result
    }

    /// Reads records onto `wire[..filled]`, `read_size` bytes at a time, and processes them
    /// until plaintext is produced, the socket is empty or the peer is done; `filled` ends
    /// as the bytes still held. `wire`'s length only grows (it is its capacity): nothing
    /// is zeroed per read. `received` never holds more than one read's worth.
    fn read_into(
        &mut self,
        wire: &mut Vec<u8>,
        filled: &mut usize,
        read_size: usize,
        buf: &mut [u8],
    ) -> Result<Input, Broken> {
        let mut produced = 0;
        let input = loop {
            let end = *filled + read_size;
            grow_to(wire, end);
            let eof = match self.socket.read(&mut wire[*filled..end]) {
                Ok(0) => true,
                Ok(n) => {
                    *filled += n;
                    false
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Input::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(self.broken(None)),
            };
            let (consumed, settled) = self.process(&mut wire[..*filled], buf, &mut produced)?;
            wire.copy_within(consumed..*filled, 0);
            *filled -= consumed;
            if *filled > MAX_HELD {
                return Err(self.broken(None));
            }
            if matches!(settled, Settled::PeerClosed) || eof {
                break Input::Eof;
            }
            if produced > 0 {
                break Input::Data(produced);
            }
        };
        if input == Input::Eof {
            self.peer_closed = true;
        }
        // Plaintext that arrived with the end is handed over first; the next read says Eof.
        Ok(if produced > 0 { Input::Data(produced) } else { input })
    }

    /// Lets the session process every whole record in `records`: plaintext into `buf`
    /// (past `produced`; what does not fit into `received`), handshake flights out.
    /// Returns how many bytes of `records` are done with.
    fn process(
        &mut self,
        records: &mut [u8],
        buf: &mut [u8],
        produced: &mut usize,
    ) -> Result<(usize, Settled), Broken> {
        let mut consumed = 0;
        loop {
            let UnbufferedStatus { discard, state } = self.session.process_tls_records(&mut records[consumed..]);
            consumed += discard;
            match state {
                Err(error) => {
                    // The alert rustls queued tells the client why, if the socket takes it.
                    self.send_alert(&mut records[consumed..]);
                    return Err(self.broken(Some(&error)));
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(|_| Broken::Later)?;
                        consumed += record.discard;
                        let n = (buf.len() - *produced).min(record.payload.len());
                        buf[*produced..*produced + n].copy_from_slice(&record.payload[..n]);
                        *produced += n;
                        self.received.extend_from_slice(&record.payload[n..]);
                    }
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if encode_into(&mut encode, &mut self.outgoing).is_err() {
                        return Err(self.broken(None));
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // Handshake answers (ServerHello, tickets) go out as soon as they
                    // exist; what the socket does not take waits in `outgoing`, in order.
                    match send(&mut self.socket, &mut self.outgoing) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(_) => return Err(self.broken(None)),
                    }
                    transmit.done();
                }
                Ok(ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake) => {
                    return Ok((consumed, Settled::NeedBytes));
                }
                Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                    return Ok((consumed, Settled::PeerClosed));
                }
                // Early data is never enabled in the server configuration.
                Ok(_) => return Err(self.broken(None)),
            }
        }
    }

    /// After a session error: the alert it queued, if any, best effort. Given the bytes
    /// the session has not discarded: a handshake message it was joining across records
    /// is known by its place in them.
    fn send_alert(&mut self, records: &mut [u8]) {
        let UnbufferedStatus { state, .. } = self.session.process_tls_records(records);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state
            && encode_into(&mut encode, &mut self.outgoing).is_ok()
        {
            let _ = send(&mut self.socket, &mut self.outgoing);
        }
    }

    fn broken(&self, error: Option<&rustls::Error>) -> Broken {
        match error {
            Some(error) if self.session.is_handshaking() => Broken::Handshake(HandshakeFailure::of(error)),
            None if self.session.is_handshaking() => Broken::Handshake(HandshakeFailure::Other),
            _ => Broken::Later,
        }
    }

    /// Pushes pending records to the socket: `Ok` once none are left, `WouldBlock` when
    /// the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        send(&mut self.socket, &mut self.outgoing)
    }

    /// The core has nothing more to send: close_notify follows what is queued, and
    /// [`Self::ready_to_shut`] says when the socket's write side may be shut.
    pub fn want_close(&mut self) {
        self.close = self.close.max(Close::Wanted);
    }

    /// True once, when a wanted close can be finished: the handshake is over (so what the
    /// core wrote during it, a refusal at accept, has gone out first), close_notify is
    /// queued and everything up to it has left. Asked on every write turn, so a socket
    /// that was full when the core finished still gets its close_notify.
    pub fn ready_to_shut(&mut self) -> bool {
        if self.failed || self.session.is_handshaking() || !self.early.is_empty() {
            return false;
        }
        if self.close == Close::Wanted {
            let queued = self.with_traffic(|traffic, outgoing| {
                append(outgoing, |out| traffic.queue_close_notify(out).map_err(EncryptError::required_size))
            });
            if !matches!(queued, Ok(Ok(()))) {
                self.failed = true;
                return false;
            }
            self.close = Close::Queued;
        }
        if self.close == Close::Queued && self.flush().is_ok() {
            self.close = Close::Shut;
            return true;
        }
        false
    }

    /// Runs `f` with the session in its traffic state: past the handshake, every whole
    /// record already read (`incoming` holds at most part of one), so the session only
    /// has its own messages (tickets, a key update) to send first.
    fn with_traffic<T>(
        &mut self,
        mut f: impl FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> T,
    ) -> io::Result<T> {
        loop {
            let UnbufferedStatus { discard, state } = self.session.process_tls_records(&mut self.incoming);
            let result = match state {
                Ok(ConnectionState::WriteTraffic(mut traffic)) => Some(Ok(f(&mut traffic, &mut self.outgoing))),
                Ok(ConnectionState::EncodeTlsData(mut encode)) => encode_into(&mut encode, &mut self.outgoing)
                    .map_err(|()| io::Error::other("TLS record not encoded"))
                    .err()
                    .map(Err),
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    // Ordered behind what `outgoing` holds; the socket takes it later.
                    transmit.done();
                    None
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(Ok(record)) = traffic.next_record() {
                        self.received.extend_from_slice(record.payload);
                    }
                    None
                }
                Ok(_) => Some(Err(io::ErrorKind::WouldBlock.into())),
                Err(e) => Some(Err(io::Error::other(e))),
            };
            self.incoming.drain(..discard);
            if let Some(result) = result {
                return result;
            }
        }
    }

    /// The plaintext side, for the core to write into.
    pub fn writer(&mut self) -> Plaintext<'_, S> {
        Plaintext { tls: self }
    }

    /// Whether the handshake is still going on (until the client's Finished is read).
    pub fn is_handshaking(&self) -> bool {
        self.session.is_handshaking()
    }

    /// Bytes this connection holds in buffers of its own (0 when idle).
    #[cfg(test)]
    fn buffered_bytes(&self) -> usize {
        [&self.incoming, &self.outgoing, &self.received, &self.early].iter().map(|b| b.capacity()).sum()
    }
}

/// Writes what `outgoing` holds to `socket`, dropping its allocation once it is empty.
fn send(socket: &mut impl Write, outgoing: &mut Vec<u8>) -> io::Result<()> {
    if outgoing.is_empty() {
        return Ok(());
    }
    let mut sent = 0;
    let result = loop {
        if sent == outgoing.len() {
            break Ok(());
        }
        match socket.write(&outgoing[sent..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    outgoing.drain(..sent);
    release_if_empty(outgoing);
    result
}

fn release_if_empty(buffer: &mut Vec<u8>) {
    if buffer.is_empty() {
        *buffer = Vec::new();
    }
}

/// Appends to `out` what `write` puts into room after its end, growing the room to the
/// size rustls asks for (`Err(Some(size))`); `Err(None)` is any other failure.
fn append(out: &mut Vec<u8>, mut write: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>) -> Result<(), ()> {
    let len = out.len();
    let mut room = 1024;
    loop {
        out.resize(len + room, 0);
        match write(&mut out[len..]) {
            Ok(n) => {
                out.truncate(len + n);
                return Ok(());
            }
            Err(Some(required)) if required > room => room = required,
            Err(_) => {
                out.truncate(len);
                release_if_empty(out);
                return Err(());
            }
        }
    }
}

/// Appends the handshake record rustls has ready to `out`.
fn encode_into(encode: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut Vec<u8>) -> Result<(), ()> {
    append(out, |room| encode.encode(room).map_err(EncodeError::required_size))
}

/// Encrypts `plain` into records appended to `out`.
fn seal(traffic: &mut WriteTraffic<'_, ServerConnectionData>, plain: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
    if plain.is_empty() {
        return Ok(());
    }
    append(out, |room| traffic.encrypt(plain, room).map_err(EncryptError::required_size))
}

/// Encrypts `plain` into records at the start of `scratch`, which only grows (its length
/// is its capacity: nothing is zeroed per write); returns their length.
fn seal_in_scratch(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    plain: &[u8],
    scratch: &mut Vec<u8>,
) -> Option<usize> {
    loop {
        match traffic.encrypt(plain, scratch) {
            Ok(len) => return Some(len),
            Err(e) => match e.required_size() {
                Some(required) if required > scratch.len() => grow_to(scratch, required),
                _ => return None,
            },
        }
    }
}

/// Lengthens `buffer` to `len` (never shortens it), to exactly that capacity.
fn grow_to(buffer: &mut Vec<u8>, len: usize) {
    if buffer.len() < len {
        buffer.reserve_exact(len - buffer.len());
        buffer.resize(len, 0);
    }
}

/// The buffer size rustls asked for, when that is what went wrong.
trait RequiredSize {
    fn required_size(self) -> Option<usize>;
}

impl RequiredSize for EncodeError {
    fn required_size(self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => Some(required_size),
            _ => None,
        }
    }
}

impl RequiredSize for EncryptError {
    fn required_size(self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => Some(required_size),
            _ => None,
        }
    }
}

/// Writes plaintext into a [`TlsStream`]: the core's slices gathered (up to
/// [`PLAINTEXT_PER_WRITE`]), sealed into records in the shard's scratch and written to
/// the socket at once; only what the socket does not take is kept, and until it has gone
/// the writer says `WouldBlock`, so the core's bounded queue stays the only queue.
pub struct Plaintext<'a, S = TcpStream> {
    tls: &'a mut TlsStream<S>,
}

impl<S: Read + Write> Write for Plaintext<'_, S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let tls = &mut *self.tls;
        if tls.failed {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        tls.flush()?;
        if tls.session.is_handshaking() || !tls.early.is_empty() {
            // Held until the handshake ends (a refusal answered at accept, say).
            let room = BUFFER_LIMIT.saturating_sub(tls.early.len());
            if room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            return Ok(gather(bufs, &mut tls.early, room));
        }
        SCRATCH.with_borrow_mut(|scratch| {
            let Scratch { plain, sealed, .. } = scratch;
            plain.clear();
            let taken = gather(bufs, plain, PLAINTEXT_PER_WRITE);
            let sealed = match tls.with_traffic(|traffic, _| seal_in_scratch(traffic, plain, sealed)) {
                Ok(Some(len)) => &sealed[..len],
                Ok(None) => return Err(io::Error::other("TLS record not sealed")),
                Err(e) => return Err(e),
            };
            if !tls.outgoing.is_empty() {
                // The session's own records (a ticket, a key update) went first.
                tls.outgoing.extend_from_slice(sealed);
                return match send(&mut tls.socket, &mut tls.outgoing) {
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
                    _ => Ok(taken),
                };
            }
            // Straight to the socket; only the part it does not take is kept.
            let written = match tls.socket.write(sealed) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            };
            tls.outgoing.extend_from_slice(&sealed[written..]);
            Ok(taken)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tls.flush()
    }
}

/// Copies the slices, in order, into `into` up to `limit` bytes; returns how many.
fn gather(bufs: &[IoSlice<'_>], into: &mut Vec<u8>, limit: usize) -> usize {
    let mut taken = 0;
    for buf in bufs {
        let n = buf.len().min(limit - taken);
        into.extend_from_slice(&buf[..n]);
        taken += n;
        if taken == limit {
            break;
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    //! A [`TlsStream`] against a real rustls client over an in-memory socket that takes
    //! and gives bytes in small pieces and fills up: every byte arrives once and in order,
    //! both ways and across record sizes, and an idle connection keeps no buffer.

    use std::cell::RefCell;
    use std::collections::VecDeque;
    use std::rc::Rc;

    use super::*;
    use crate::bench::Pki;

    /// Both directions of one loopback socket; the server's side takes at most `room`
    /// bytes in flight to the client and reads at most `chunk` at a time.
    #[derive(Default)]
    struct Wire {
        to_server: VecDeque<u8>,
        to_client: VecDeque<u8>,
        chunk: usize,
        room: usize,
    }

    #[derive(Clone)]
    struct ServerSide(Rc<RefCell<Wire>>);

    impl Read for ServerSide {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut wire = self.0.borrow_mut();
            if wire.to_server.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(wire.chunk).min(wire.to_server.len());
            for (slot, byte) in buf.iter_mut().zip(wire.to_server.drain(..n)) {
                *slot = byte;
            }
            Ok(n)
        }
    }

    impl Write for ServerSide {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut wire = self.0.borrow_mut();
            let n = buf.len().min(wire.room.saturating_sub(wire.to_client.len())).min(wire.chunk);
            if n == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            wire.to_client.extend(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Pair {
        wire: Rc<RefCell<Wire>>,
        server: TlsStream<ServerSide>,
        client: rustls::ClientConnection,
        /// Plaintext the server read so far.
        server_got: Vec<u8>,
        /// Plaintext the client read so far.
        client_got: Vec<u8>,
    }

    impl Pair {
        fn new(chunk: usize, room: usize) -> Self {
            Self::fragmenting(chunk, room, None)
        }

        /// A client that cuts its records to `fragment` bytes of plaintext: its
        /// ClientHello spans several records, which the session joins.
        fn fragmenting(chunk: usize, room: usize, fragment: Option<usize>) -> Self {
            // One pair of files for every test of the process (they run in parallel).
            static CONFIGS: std::sync::OnceLock<(Arc<ServerConfig>, Arc<rustls::ClientConfig>)> =
                std::sync::OnceLock::new();
            let (server_config, client_config) = CONFIGS.get_or_init(|| {
                let pki = Pki::new("tls-unit").unwrap();
                let certificates =
                    Certificates::load(&pki.cert.display().to_string(), &pki.key.display().to_string()).unwrap();
                (certificates.current(), pki.client_config().unwrap())
            });
            let wire = Rc::new(RefCell::new(Wire { chunk, room, ..Wire::default() }));
            let server = TlsStream::accept(ServerSide(wire.clone()), server_config.clone()).unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let mut client_config = (**client_config).clone();
            client_config.max_fragment_size = fragment;
            let client = rustls::ClientConnection::new(Arc::new(client_config), name).unwrap();
            Self { wire, server, client, server_got: Vec::new(), client_got: Vec::new() }
        }

        /// Moves bytes both ways until nothing moves: the client as a blocking peer that
        /// always reads, the server as the shard does (read with `read_size`, flush).
        fn pump(&mut self, read_size: usize) {
            for _ in 0..10_000 {
                let mut moved = false;
                {
                    let mut wire = self.wire.borrow_mut();
                    while self.client.wants_write() {
                        let mut out = Vec::new();
                        self.client.write_tls(&mut out).unwrap();
                        moved |= !out.is_empty();
                        wire.to_server.extend(out);
                    }
                    let bytes: Vec<u8> = wire.to_client.drain(..).collect();
                    let mut reader = &bytes[..];
                    loop {
                        if !reader.is_empty() {
                            self.client.read_tls(&mut reader).unwrap();
                            self.client.process_new_packets().unwrap();
                            moved = true;
                        }
                        // Its plaintext, before it reads more records.
                        let mut plain = vec![0; 1 << 16];
                        while let Ok(n @ 1..) = self.client.reader().read(&mut plain) {
                            self.client_got.extend_from_slice(&plain[..n]);
                        }
                        if reader.is_empty() {
                            break;
                        }
                    }
                }
                let mut buf = vec![0; read_size];
                loop {
                    match self.server.read(&mut buf) {
                        Ok(Input::Data(n)) => {
                            self.server_got.extend_from_slice(&buf[..n]);
                            moved = true;
                        }
                        Ok(Input::WouldBlock | Input::Eof) => break,
                        Err(broken) => panic!("server broke: {broken:?}"),
                    }
                }
                moved |= !self.server.outgoing.is_empty();
                let _ = self.server.flush();
                if !moved {
                    return;
                }
            }
            panic!("the pair never settled");
        }

        /// Writes `slices` through the server's plaintext side as the core does: again
        /// while it takes bytes, pumping the wire whenever it says `WouldBlock`.
        fn server_writes(&mut self, slices: &[&[u8]]) {
            let mut queue: VecDeque<u8> = slices.iter().flat_map(|s| s.iter().copied()).collect();
            while !queue.is_empty() {
                let (front, back) = queue.as_slices();
                match self.server.writer().write_vectored(&[IoSlice::new(front), IoSlice::new(back)]) {
                    Ok(n) => {
                        queue.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.pump(4096),
                    Err(e) => panic!("{e}"),
                }
            }
            self.pump(4096);
        }
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[test]
    fn every_byte_arrives_once_in_order_both_ways_through_small_reads_and_a_full_socket() {
        for (chunk, room, read_size) in [(1 << 20, 1 << 20, 65536), (7, 300, 13), (1500, 4000, 100), (64, 20_000, 1)] {
            let mut pair = Pair::new(chunk, room);
            pair.pump(read_size);
            assert!(!pair.server.is_handshaking(), "handshake done ({chunk}, {room})");
            let mut sent_up = Vec::new();
            for (i, len) in [1, 100, 16_384, 16_385, 70_000].into_iter().enumerate() {
                let up = pattern(len, i as u8);
                // The client's own buffer takes 64 KiB at most: pump between pieces.
                for piece in up.chunks(20_000) {
                    pair.client.writer().write_all(piece).unwrap();
                    pair.pump(read_size);
                }
                sent_up.extend_from_slice(&up);
            }
            assert_eq!(pair.server_got, sent_up, "client to server ({chunk}, {room}, {read_size})");
            let events: Vec<Vec<u8>> = (0..300).map(|i| pattern(50 + i * 7, i as u8)).collect();
            let slices: Vec<&[u8]> = events.iter().map(Vec::as_slice).collect();
            pair.server_writes(&slices);
            assert_eq!(pair.client_got, events.concat(), "server to client ({chunk}, {room})");
            assert_eq!(pair.server.buffered_bytes(), 0, "an idle connection keeps no buffer");
        }
    }

    #[test]
    fn a_client_hello_across_many_small_records_is_joined() {
        for chunk in [1, 5, 1 << 20] {
            let mut pair = Pair::fragmenting(chunk, 1 << 20, Some(64));
            pair.pump(100);
            assert!(!pair.server.is_handshaking(), "handshake done (reads of {chunk})");
            pair.client.writer().write_all(&pattern(5_000, 3)).unwrap();
            pair.pump(100);
            assert_eq!(pair.server_got, pattern(5_000, 3));
        }
    }

    #[test]
    fn garbage_after_part_of_a_client_hello_is_refused_without_a_panic() {
        let mut pair = Pair::fragmenting(1 << 20, 1 << 20, Some(64));
        let mut hello = Vec::new();
        pair.client.write_tls(&mut hello).unwrap();
        // The first two records (a ClientHello in part), then a record of no known type.
        let record_end = |at: usize| at + 5 + usize::from(u16::from_be_bytes([hello[at + 3], hello[at + 4]]));
        let first_two = record_end(record_end(0));
        assert!(first_two < hello.len(), "the ClientHello spans more than two records");
        let mut wire = hello[..first_two].to_vec();
        wire.extend_from_slice(&[0x63, 3, 3, 0, 4, 0xff, 0xff, 0xff, 0xff]);
        pair.wire.borrow_mut().to_server.extend(wire);
        match pair.server.read(&mut [0; 1024]) {
            Err(Broken::Handshake(_)) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_the_core_writes_before_the_handshake_ends_follows_it() {
        let mut pair = Pair::new(1 << 20, 1 << 20);
        let refusal = b"HTTP/1.1 503 Service Unavailable\r\n\r\n";
        assert_eq!(pair.server.writer().write(refusal).unwrap(), refusal.len());
        pair.server.want_close();
        assert!(!pair.server.ready_to_shut(), "no shutdown before the answer can go out");
        pair.pump(4096);
        assert_eq!(pair.client_got, refusal);
        assert_eq!(pair.server.buffered_bytes(), 0);
        assert!(pair.server.ready_to_shut());
        assert!(!pair.server.ready_to_shut(), "once");
        pair.pump(4096);
        assert_eq!(pair.client.reader().read(&mut [0; 8]).unwrap(), 0, "then close_notify");
    }

    #[test]
    fn close_notify_reaches_the_client_and_the_clients_ends_the_reader() {
        let mut pair = Pair::new(1 << 20, 1 << 20);
        pair.pump(4096);
        pair.server_writes(&[b"bye"]);
        pair.server.want_close();
        assert!(pair.server.ready_to_shut());
        pair.pump(4096);
        let mut rest = [0u8; 8];
        assert_eq!(pair.client.reader().read(&mut rest).unwrap(), 0, "clean end after close_notify");
        assert_eq!(pair.client_got, b"bye");
        pair.client.writer().write_all(b"last").unwrap();
        pair.client.send_close_notify();
        pair.pump(4096);
        assert_eq!(pair.server_got, b"last");
        assert_eq!(pair.server.read(&mut [0; 16]).unwrap(), Input::Eof);
    }

    #[test]
    fn a_request_arriving_with_the_clients_finished_and_close_notify_is_answered() {
        let mut pair = Pair::new(1 << 20, 1 << 20);
        let mut hello = Vec::new();
        pair.client.write_tls(&mut hello).unwrap();
        pair.wire.borrow_mut().to_server.extend(hello);
        assert_eq!(pair.server.read(&mut [0; 1024]).unwrap(), Input::WouldBlock);
        let flight: Vec<u8> = pair.wire.borrow_mut().to_client.drain(..).collect();
        pair.client.read_tls(&mut &flight[..]).unwrap();
        pair.client.process_new_packets().unwrap();
        // Finished, the request and close_notify in one read.
        pair.client.writer().write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        pair.client.send_close_notify();
        let mut last = Vec::new();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut last).unwrap();
        }
        pair.wire.borrow_mut().to_server.extend(last);
        let mut buf = [0; 1024];
        let Ok(Input::Data(n)) = pair.server.read(&mut buf) else { panic!("the request is read") };
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(pair.server.read(&mut buf).unwrap(), Input::Eof);
        assert!(!pair.server.is_handshaking());
        pair.server_writes(&[b"HTTP/1.1 200 OK\r\n\r\n"]);
        pair.server.want_close();
        assert!(pair.server.ready_to_shut());
        pair.pump(4096);
        assert_eq!(pair.client_got, b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[test]
    fn a_handshake_message_dribbled_one_byte_per_record_is_refused_not_kept() {
        let mut pair = Pair::new(1 << 20, 1 << 20);
        // A ClientHello declaring 64 KiB, then one byte of it per record: each byte costs
        // six on the wire, and rustls keeps every record until the message is whole.
        let mut wire = vec![22, 3, 1, 0, 4, 1, 0, 0xff, 0xff];
        for _ in 0..20_000 {
            wire.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
        }
        pair.wire.borrow_mut().to_server.extend(wire);
        match pair.server.read(&mut [0; 1024]) {
            Err(Broken::Handshake(_)) => {}
            other => panic!("{other:?}"),
        }
        let unread = pair.wire.borrow().to_server.len();
        assert!(20_000 * 6 + 9 - unread > 64 * 1024, "refused once past the bound, not before ({unread} unread)");
        assert!(pair.server.buffered_bytes() <= 2 * MAX_HELD, "{}", pair.server.buffered_bytes());
    }

    #[test]
    fn garbage_instead_of_a_client_hello_is_a_protocol_failure() {
        let mut pair = Pair::new(1 << 20, 1 << 20);
        pair.wire.borrow_mut().to_server.extend(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        match pair.server.read(&mut [0; 1024]) {
            Err(Broken::Handshake(HandshakeFailure::Protocol)) => {}
            other => panic!("{other:?}"),
        }
    }
}
