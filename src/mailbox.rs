//! Mailboxes: how shards and the bus reach a shard. Each shard has one [`Inbox`]: its events
//! in publish order ([`Delivery`]), a bounded queue of [`Control`] messages (replies,
//! stats reads, presence notices) and the operator's [`Lifecycle`] flag; [`Mailboxes`]
//! holds them all and is the one place a control message is sent to one shard or to every
//! shard. Also who a reply is owed to ([`ReplyTo`], [`Reply`], [`PublishTicket`]) and a
//! stats read's pairing of its histograms with its asker ([`StatsRead`]), and a backend
//! call's context ([`Pending`]).
//!
//! This module owns the queues and their wake-ups only. It must not order, encode or
//! retain events (the bus and [`crate::event`] do) nor touch connections or sockets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use crossbeam_queue::ArrayQueue;
use mio::Waker;

use crate::backend::Outcome;
use crate::event::{Event, PublishError};
use crate::metrics::{Gather, StatsFormat};

/// Where a reply is owed when a publish with `?wait=1` has been queued everywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyTo {
    /// The shard holding the connection.
    pub shard: usize,
    /// The connection's slab key.
    pub key: usize,
    /// The connection's unique id (slab keys are reused).
    pub conn_id: u64,
}

/// Counts, for a `?wait=1` publish, how many connections each event was queued to.
#[derive(Debug)]
pub struct PublishTicket {
    remaining: AtomicUsize,
    delivered: Box<[AtomicUsize]>,
    /// Who to tell when every shard has queued every event.
    pub reply_to: ReplyTo,
    /// The ids, in request order.
    pub ids: Vec<Box<str>>,
}

impl PublishTicket {
    /// A ticket for `ids` that `shards` shards report on.
    pub fn new(reply_to: ReplyTo, ids: Vec<Box<str>>, shards: usize) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicUsize::new(ids.len() * shards),
            delivered: (0..ids.len()).map(|_| AtomicUsize::new(0)).collect(),
            reply_to,
            ids,
        })
    }

    /// Per event, the connections it was queued to.
    pub fn delivered(&self) -> Vec<usize> {
        self.delivered.iter().map(|d| d.load(Ordering::Acquire)).collect()
    }
}

/// An event on its way to one shard.
#[derive(Debug)]
pub struct Delivery {
    /// The shared event.
    pub event: Arc<Event>,
    /// For `?wait=1`: the ticket and this event's index in it.
    pub ticket: Option<(Arc<PublishTicket>, usize)>,
}

impl Delivery {
    /// Records that this shard queued the event to `count` connections; returns the
    /// ticket when this was the last shard and event to report.
    pub fn report(&self, count: usize) -> Option<Arc<PublishTicket>> {
        let (ticket, index) = self.ticket.as_ref()?;
        ticket.delivered[*index].fetch_add(count, Ordering::AcqRel);
        (ticket.remaining.fetch_sub(1, Ordering::AcqRel) == 1).then(|| ticket.clone())
    }
}

/// Messages between shards other than events. The queue that carries them is bounded
/// ([`CONTROL_CAPACITY`]): a sender that finds it full answers its requester `overloaded`
/// (or counts a dropped notice) instead of buffering.
#[derive(Debug)]
pub enum Control {
    /// Every shard has queued a `?wait=1` publish.
    PublishDone(Arc<PublishTicket>),
    /// A sharded engine's shard was loaded (or its load failed): subscriptions waiting
    /// for it resume now.
    EngineShardLoaded,
    /// An engine has answered a publish.
    Published(Reply, Result<Vec<Box<str>>, PublishError>),
    /// Add this shard's histograms to a stats read.
    Collect(Arc<StatsRead>),
    /// Every shard has added to a stats read this shard asked for.
    StatsReady(Arc<StatsRead>),
    /// Someone joined or left a topic: tell the members who asked.
    Presence(Arc<crate::presence::Notice>),
    /// A backend answered (or failed to answer) a call a connection made.
    Backend(Box<(Pending, Outcome)>),
    /// Act on this shard's connections for the server API.
    Api(Arc<ApiTally>),
    /// Every shard has acted on a server API call this shard was asked.
    ApiDone(Arc<ApiTally>),
}

/// What the server API asks every shard to do (docs/protocol.md, "Server API"); with the
/// Redis engine it is also told to every other node (hence serializable).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ApiAction {
    /// Close the matching WebSocket connections with `code` and `reason`.
    Disconnect {
        /// The connections of this user (`sub`)...
        user: Option<String>,
        /// ...or the one connection with this client id.
        client_id: Option<String>,
        /// The close code, 4000-4999.
        code: u16,
        /// The close frame's reason (at most 123 bytes).
        reason: String,
    },
    /// Take `topic` out of every subscription of `user`'s connections.
    Unsubscribe {
        /// The user (`sub`).
        user: String,
        /// The exact topic.
        topic: String,
    },
}

/// A server API call in flight: the action, how many shards have yet to act on it, and
/// how many connections they acted on.
#[derive(Debug)]
pub struct ApiTally {
    /// What to do.
    pub action: ApiAction,
    /// Who asked; `None` for an action another node was asked (it answers its caller).
    pub reply_to: Option<ReplyTo>,
    remaining: AtomicUsize,
    affected: AtomicUsize,
}

impl ApiTally {
    /// A call that `shards` shards will act on.
    pub fn new(action: ApiAction, reply_to: Option<ReplyTo>, shards: usize) -> Arc<Self> {
        Arc::new(Self { action, reply_to, remaining: AtomicUsize::new(shards), affected: AtomicUsize::new(0) })
    }

    /// One shard acted on `affected` connections (or could not be asked: 0); true when
    /// it was the last.
    pub fn done(&self, affected: usize) -> bool {
        self.affected.fetch_add(affected, Ordering::AcqRel);
        self.remaining.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Connections acted on so far (all of them once the last shard is done).
    pub fn affected(&self) -> usize {
        self.affected.load(Ordering::Acquire)
    }
}

/// A backend call in flight: who made it and what to do with its outcome. It travels
/// with the call (the connection keeps only a count and the bytes, for its budget).
#[derive(Debug)]
pub struct Pending {
    /// The connection.
    pub to: ReplyTo,
    /// Bytes of the call the connection's state budget counts until the outcome is back.
    pub bytes: usize,
    /// What was asked.
    pub call: BackendCall,
}

/// What a connection asked a backend, with what the shard needs to finish it.
#[derive(Debug)]
pub enum BackendCall {
    /// Who the connection is (the connect proxy), for a WebSocket just upgraded.
    Connect,
    /// The same for an SSE start; the request waits on its HTTP connection.
    ConnectSse,
    /// May it subscribe (the subscribe proxy); the subscription waits here.
    Subscribe {
        /// The `subscribe` message's id.
        correlation: Option<String>,
        /// The subscription asked for.
        args: crate::protocol::SubscribeArgs,
    },
    /// May it publish (the publish proxy); the event waits here.
    Publish {
        /// The `request`'s message id.
        correlation: Option<String>,
        /// The event.
        request: crate::protocol::PublishRequest,
    },
    /// An rpc.
    Rpc {
        /// The `request`'s message id.
        correlation: Option<String>,
        /// The method, echoed in the response.
        method: String,
    },
}

/// Control messages a shard's queue holds. Replies are bounded by the requests waiting
/// for them (one per HTTP connection, a connection's state budget for WebSocket ones), so
/// this is room for bursts, not a promise: past it the sender answers `overloaded`.
pub const CONTROL_CAPACITY: usize = 16_384;

/// What the operator asked every shard to do: flags, not queued messages, so a full control
/// queue can never swallow a drain or a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lifecycle {
    /// Serving.
    Running = 0,
    /// Begin a graceful drain.
    Drain = 1,
    /// Stop now.
    Stop = 2,
}

/// One shard's inbound side: the event queue, the control queue and its waker.
#[derive(Debug)]
pub struct Inbox {
    /// Events in publish order.
    pub events: ArrayQueue<Delivery>,
    /// Control messages, at most [`CONTROL_CAPACITY`].
    pub control: ArrayQueue<Control>,
    /// The operator's request ([`Lifecycle`]), only ever raised.
    lifecycle: AtomicU8,
    waker: Waker,
    wake_pending: AtomicBool,
}

impl Inbox {
    /// An inbox woken through `waker`, holding at most `capacity` events.
    pub fn new(waker: Waker, capacity: usize) -> Self {
        Self {
            events: ArrayQueue::new(capacity),
            control: ArrayQueue::new(CONTROL_CAPACITY),
            lifecycle: AtomicU8::new(Lifecycle::Running as u8),
            waker,
            wake_pending: AtomicBool::new(false),
        }
    }

    /// Wakes the shard unless a wake-up is already pending.
    pub fn wake(&self) {
        // SeqCst here and in `clear_wake`: a pusher's push-then-check and the shard's
        // clear-then-pop must not both miss each other (a store-load pair, which weaker
        // orderings let reorder).
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }

    /// Called by the shard before it drains, so later pushes wake it again.
    pub fn clear_wake(&self) {
        self.wake_pending.swap(false, Ordering::SeqCst);
    }

    /// Sends a control message and wakes the shard; gives the message back when the
    /// queue is full (the caller answers `overloaded` or counts a drop).
    pub fn send(&self, message: Control) -> Result<(), Control> {
        self.control.push(message)?;
        self.wake();
        Ok(())
    }

    /// Asks the shard to drain or stop (a later request never lowers an earlier one).
    pub fn request(&self, lifecycle: Lifecycle) {
        self.lifecycle.fetch_max(lifecycle as u8, Ordering::SeqCst);
        self.wake();
    }

    /// What the operator asked for so far.
    pub fn lifecycle(&self) -> Lifecycle {
        match self.lifecycle.load(Ordering::SeqCst) {
            0 => Lifecycle::Running,
            1 => Lifecycle::Drain,
            _ => Lifecycle::Stop,
        }
    }
}

/// Who asked for a publish and how they want the answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The connection.
    pub to: ReplyTo,
    /// `?wait=1`: answer once every shard has queued the events.
    pub wait: bool,
    /// For a WebSocket `request`: the reply's `correlation_id`; `None` for HTTP.
    pub websocket: Option<Option<String>>,
}

/// Every shard's [`Inbox`], indexed by shard number.
#[derive(Debug)]
pub struct Mailboxes {
    inboxes: Vec<Inbox>,
    /// Control messages a full control queue refused (a notice dropped, a request
    /// answered `overloaded`, a reply lost to its requester's timeout).
    pub control_refused: AtomicU64,
}

impl Mailboxes {
    /// The mailboxes of `inboxes`, one per shard.
    pub fn new(inboxes: Vec<Inbox>) -> Self {
        Self { inboxes, control_refused: AtomicU64::new(0) }
    }

    /// The shard inboxes.
    pub fn inboxes(&self) -> &[Inbox] {
        &self.inboxes
    }

    /// Sends a control message to `shard`; false (and counted) when its queue is full.
    pub fn to_shard(&self, shard: usize, message: Control) -> bool {
        let sent = self.inboxes.get(shard).is_some_and(|inbox| inbox.send(message).is_ok());
        if !sent {
            self.control_refused.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Sends a control message to `shard`, or gives it back when the queue is full (for a
    /// sender that will try again; not counted). For senders that run at a low priority
    /// (the backend call threads): the wake-up does not go through the shared
    /// "wake pending" flag, which a preempted low-priority thread could hold set without
    /// having woken the shard yet, making every other sender skip its own wake-up (a
    /// priority inversion that held the shard's events for milliseconds).
    pub fn try_to_shard(&self, shard: usize, message: Control) -> Result<(), Control> {
        let Some(inbox) = self.inboxes.get(shard) else { return Ok(()) };
        inbox.control.push(message)?;
        let _ = inbox.waker.wake();
        Ok(())
    }

    /// Sends a control message made by `message` to every shard; how many shards' full
    /// queues refused it (counted).
    pub fn to_every_shard(&self, message: impl Fn() -> Control) -> usize {
        (0..self.inboxes.len()).filter(|&shard| !self.to_shard(shard, message())).count()
    }
}

/// A stats read in flight: the histograms the shards add to, and who asked in what format.
/// Paired here, not in [`Gather`], so metrics never names a mailbox type.
#[derive(Debug)]
pub struct StatsRead {
    /// The shards' merged histograms.
    pub gather: Gather,
    /// Where the answer goes.
    pub reply_to: ReplyTo,
    /// How to render it.
    pub format: StatsFormat,
}
