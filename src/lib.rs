//! volley: a real-time message broker on a sharded mio reactor.
//!
//! A publish enters the [`bus`] once, is encoded once, and reaches every shard through
//! lock-free queues; each [`shard`] matches it against its subscription index and writes
//! it to WebSocket ([`ws`]) and SSE connections. See README.md for the user's view and
//! `docs/protocol.md` for the wire contract.

#![deny(missing_docs)]
#![deny(dead_code)]

pub mod auth;
pub mod backend;
#[cfg(feature = "bench")]
pub mod bench;
pub mod bus;
pub mod config;
pub mod conn;
pub mod core;
pub mod deflate;
pub mod engine;
pub mod event;
pub mod history;
pub mod http;
pub mod interest;
pub mod limits;
pub mod mailbox;
pub mod metrics;
pub mod placement;
pub mod positions;
pub mod presence;
pub mod presence_mirror;
pub mod protocol;
pub mod reactor;
pub mod shard;
pub mod sse;
pub mod tls;
pub mod topic;
pub mod webhook;
pub mod ws;

/// Built with the `fault-injection` feature only (the test build): an event on this topic
/// makes the shard that fans it out panic, so tests can prove a panic is contained.
#[cfg(feature = "fault-injection")]
pub const FAULT_PANIC_TOPIC: &str = "volley.fault.panic";

/// Built with the `fault-injection` feature only: an event on this topic makes every
/// shard drop every WebSocket at once, as a crashed proxy or a network cut would (no close
/// frame), so tests can prove clients resume without a gap.
#[cfg(feature = "fault-injection")]
pub const FAULT_DROP_TOPIC: &str = "volley.fault.drop";
