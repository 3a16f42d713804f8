//! TLS on the shards: the certificate pair, its reload, and one connection's TLS layer.
//!
//! Owns loading `tls_cert`/`tls_key` into a rustls `ServerConfig` ([`Certificates`]: TLS
//! 1.3 and 1.2, ALPN `http/1.1`, swapped whole on reload so new handshakes use the new pair
//! and established connections keep theirs), and [`TlsStream`]: a socket with its
//! `rustls::ServerConnection`, driven without a runtime: records read from the socket
//! (`read_tls`, `process_new_packets`) become plaintext for the connection core, and what
//! the core writes is encrypted straight from its slices (the shared event bytes) into
//! records and pushed to the socket (`write_tls`). rustls' own buffers are capped
//! ([`BUFFER_LIMIT`]): when they are full the writer says `WouldBlock`, so the core's
//! outbound queue, with its bound, stays the only queue. It does not know HTTP, WebSocket
//! or the core's connections; the shard owns the sockets and calls it.

use std::io::{self, IoSlice, Read, Write};
use std::path::Path;
use std::sync::{Arc, RwLock};

use mio::net::TcpStream;
use rustls::ServerConfig;
use rustls::server::ServerConnection;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Bytes rustls may hold per connection, plaintext waiting for the handshake and records
/// waiting for the socket each: past it the writer reports `WouldBlock` and the bytes wait
/// in the core's bounded queue instead.
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

/// A socket speaking TLS (a mio `TcpStream` on the shards; any byte stream in the fuzzer).
pub struct TlsStream<S = TcpStream> {
    socket: S,
    session: ServerConnection,
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("handshaking", &self.session.is_handshaking()).finish()
    }
}

impl<S: Read + Write> TlsStream<S> {
    /// Starts the server side of a handshake on `socket`.
    pub fn accept(socket: S, config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        let mut session = ServerConnection::new(config)?;
        session.set_buffer_limit(Some(BUFFER_LIMIT));
        Ok(Self { socket, session })
    }

    /// The socket (to register it, or shut it).
    pub fn socket(&mut self) -> &mut S {
        &mut self.socket
    }

    /// Reads plaintext into `buf`, reading and decrypting records from the socket as
    /// needed and sending what the handshake answers.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<Input, Broken> {
        loop {
            match self.session.reader().read(buf) {
                Ok(0) if !buf.is_empty() => return Ok(Input::Eof),
                Ok(n) => return Ok(Input::Data(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return Ok(Input::Eof),
            }
            match self.session.read_tls(&mut self.socket) {
                Ok(0) => return Ok(Input::Eof),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Input::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return Err(self.broken(None)),
            }
            if let Err(error) = self.session.process_new_packets() {
                // The alert rustls queued tells the client why, if the socket takes it.
                let _ = self.flush();
                return Err(self.broken(Some(&error)));
            }
            // Handshake answers (ServerHello, tickets) go out as soon as they exist.
            if let Err(e) = self.flush()
                && e.kind() != io::ErrorKind::WouldBlock
            {
                return Err(self.broken(None));
            }
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
        while self.session.wants_write() {
            match self.session.write_tls(&mut self.socket) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queues close_notify and pushes it with what is pending; true when all of it left.
    pub fn close(&mut self) -> bool {
        self.session.send_close_notify();
        self.flush().is_ok()
    }

    /// The plaintext side, for the core to write into.
    pub fn writer(&mut self) -> Plaintext<'_, S> {
        Plaintext { tls: self }
    }

    /// Whether the handshake is still going on.
    pub fn is_handshaking(&self) -> bool {
        self.session.is_handshaking()
    }
}

/// Writes plaintext into a [`TlsStream`]: encrypted into records at once (once the
/// handshake is done), records pushed to the socket when rustls' buffer fills.
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
        loop {
            let n = self.tls.session.writer().write_vectored(bufs)?;
            if n > 0 {
                return Ok(n);
            }
            // rustls is at its limit: only the socket taking records makes room.
            if !self.tls.session.wants_write() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.tls.flush()?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tls.flush()
    }
}
