//! The WebSocket JSON protocol on a shard: what each client message does.
//!
//! Owns subscribe/unsubscribe (with resume hand-over), requests (publish, history, stats,
//! auth, listings), ping/ack, rate limiting per message, and how replies and errors are
//! sent (every reply under the connection's bound). It reads frames through the `ws` codec
//! and never touches sockets or clocks; routing, fan-out and timers stay in the core.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use super::members::Joiner;
use super::{Ctx, LINGER, Routed, SubRef};
use crate::auth::Grant;
use crate::backend::Proxy;
use crate::bus::Accepted;
use crate::conn::{Conn, Filter, State, Subscription, WsConn};
use crate::event::{self, After, PublishError};
use crate::history::{Cursor, NotRecoverable};
use crate::limits::Verdict;
use crate::mailbox::{BackendCall, Reply, ReplyTo};
use crate::metrics::{Latency, ShardCounters, StatsFormat};
use crate::presence::Transport;
use crate::protocol::{self, ClientMessage, ErrorCode, Rejection};
use crate::topic::Pattern;
use crate::ws::{Close, Ended, Received};

/// How long a resume waits for the engine shards it can match to be loaded before it goes
/// on with `recovered:false`.
const LOAD_WAIT: Duration = Duration::from_secs(3);

/// How long a resume from a node that was ahead waits for this one to read as far (nodes
/// follow the same streams, so they lag each other by milliseconds).
const AHEAD_WAIT: Duration = Duration::from_millis(250);

/// Resumes one connection may have waiting for engine shards at once.
const PARKED_PER_CONNECTION: usize = 16;

/// A resume waiting for the engine shards its patterns can match to be loaded.
#[derive(Debug)]
pub(super) struct Parked {
    pub(super) key: usize,
    pub(super) conn_id: u64,
    pub(super) waiting: Waiting,
    /// Counted in the node's interest while it waits.
    patterns: Vec<Pattern>,
    shards: Vec<u32>,
    /// The positions its `since` names, per shard.
    wanted: Option<Vec<crate::event::OrderKey>>,
    /// It goes on by then whatever happens (`recovered:false` if not loaded).
    until: Instant,
    /// Loaded but not read as far as `wanted`: it goes on by then. `None` once passed.
    behind_until: Option<Instant>,
}

/// What a parked resume goes on with.
#[derive(Debug)]
pub(super) enum Waiting {
    /// A WebSocket `subscribe`.
    Subscribe { correlation: Option<String>, args: protocol::SubscribeArgs },
    /// An SSE stream (its request is the connection's waiting request).
    Sse { grant: Grant, since: Option<String> },
}

impl Ctx {
    pub(super) fn on_ws_bytes(&mut self, key: usize, conn: &mut Conn, mut data: &[u8], now: Instant) {
        loop {
            let State::WebSocket(ws) = &mut conn.state else { return };
            ws.last_heard = now;
            let mut out = Vec::new();
            let step = ws.codec.next(&mut data, &mut out);
            match step {
                // The codec's own frames (pongs, the close reply) are counted like replies;
                // a close reply is the message allowed past the bound.
                Err(Ended::Closed | Ended::Failed(_)) => {
                    conn.out.push_bytes(out);
                    conn.begin_close(None, LINGER, now);
                    return;
                }
                _ if !out.is_empty() => self.send(key, conn, out, now),
                _ => {}
            }
            if conn.closing.is_some() {
                return;
            }
            match step {
                Ok(None) | Err(_) => return,
                Ok(Some(Received::Control)) => {}
                Ok(Some(Received::Text(text))) => self.on_ws_text(key, conn, text, now),
                Ok(Some(Received::Binary(data))) => {
                    let State::WebSocket(ws) = &mut conn.state else { return };
                    if ws.echo {
                        let out = echo(ws, Echo::Binary(data));
                        self.send(key, conn, out, now);
                    } else {
                        let rejection = Rejection::new(ErrorCode::InvalidMessage, "binary frames are not supported");
                        self.send_error(key, conn, None, &rejection, now);
                    }
                }
            }
            if conn.closing.is_some() {
                return;
            }
        }
    }

    pub(super) fn on_ws_text(&mut self, key: usize, conn: &mut Conn, text: String, now: Instant) {
        let close_after = Duration::from_millis(self.config().rate_limit_close_after_ms);
        let State::WebSocket(ws) = &mut conn.state else { return };
        if ws.echo {
            let out = echo(ws, Echo::Text(text));
            return self.send(key, conn, out, now);
        }
        match ws.bucket.take(now, close_after) {
            Verdict::Allow => {}
            Verdict::Limit => {
                ShardCounters::bump(&self.counters().rate_limited);
                let rejection = Rejection::new(ErrorCode::RateLimited, "over the message rate limit; message dropped");
                return self.send_error(key, conn, None, &rejection, now);
            }
            Verdict::Abuse => {
                ShardCounters::bump(&self.counters().rate_limited);
                return conn.begin_close(Some(Close::Policy), LINGER, now);
            }
        }
        let incoming = match protocol::parse_client_message(&text) {
            Ok(incoming) => incoming,
            Err((correlation, rejection)) => {
                return self.send_error(key, conn, correlation.as_deref(), &rejection, now);
            }
        };
        let correlation = incoming.message_id.as_deref();
        if let ClientMessage::Request(protocol::Request::Auth { token }) = &incoming.message {
            return self.ws_auth(key, conn, correlation, token, now);
        }
        if matches!(&conn.state, State::WebSocket(ws) if ws.grant.is_none()) {
            let rejection = Rejection::new(ErrorCode::Unauthorized, "authenticate first: request action auth");
            return self.send_error(key, conn, correlation, &rejection, now);
        }
        match incoming.message {
            ClientMessage::Subscribe(args) => self.subscribe(key, conn, correlation, args, now),
            ClientMessage::Unsubscribe { subscription_id } => {
                self.unsubscribe(key, conn, correlation, &subscription_id, now)
            }
            ClientMessage::Ping(payload) => {
                let payload = payload.map(|p| p.get().to_string()).unwrap_or_else(|| "{}".into());
                self.send_message(key, conn, "pong", correlation, &payload, now);
            }
            ClientMessage::Ack { event_id } => {
                if let Some(published_at) = self.shared.bus.published_at(&event_id) {
                    Latency::record(&mut self.latency.publish_to_ack, now.saturating_duration_since(published_at));
                }
            }
            ClientMessage::Request(request) => self.ws_request(key, conn, correlation, request, now),
        }
    }

    pub(super) fn ws_auth(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation: Option<&str>,
        token: &str,
        now: Instant,
    ) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        match self.shared.auth.verify(Some(token)) {
            Ok(grant) => {
                let payload = json!({"client_id": ws.client_id, "sub": grant.sub});
                let old = ws.grant.as_ref().and_then(|g| g.sub.as_deref());
                self.directory.set_user(key, old, grant.sub.as_deref());
                ws.grant = Some(grant);
                ws.auth_deadline = None;
                // A token replaces what a connect proxy gave, its expiry included.
                ws.expire_at = None;
                self.send_message(key, conn, "response", correlation, &payload.to_string(), now);
            }
            Err(error) => {
                let rejection = Rejection::new(ErrorCode::Unauthorized, error.to_string());
                self.send_error(key, conn, correlation, &rejection, now);
                conn.begin_close(Some(Close::Unauthorized), LINGER, now);
            }
        }
    }

    pub(super) fn subscribe(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation: Option<&str>,
        mut args: protocol::SubscribeArgs,
        now: Instant,
    ) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        let Some(grant) = &ws.grant else { return };
        let not_granted: Vec<&str> =
            args.topics.iter().filter(|p| !grant.may_subscribe(p)).map(|p| p.as_str()).collect();
        if !not_granted.is_empty() && self.shared.backend.configured(Proxy::Subscribe) {
            let body = json!({"client_id": ws.client_id, "user": grant.sub, "topics": not_granted, "info": grant.info});
            let call = BackendCall::Subscribe { correlation: correlation.map(str::to_string), args };
            if let Err(rejection) = self.call_backend(key, conn, Proxy::Subscribe, &body, call) {
                self.send_error(key, conn, correlation, &rejection, now);
            }
            return;
        }
        match readable_patterns(grant, std::mem::take(&mut args.topics)) {
            Ok(topics) => args.topics = topics,
            Err(rejection) => return self.send_error(key, conn, correlation, &rejection, now),
        }
        self.subscribe_granted(key, conn, correlation, args, now);
    }

    /// A subscription whose topics the grant (or the subscribe proxy) allows. With a
    /// sharded engine, a resume whose shards this node does not read yet waits for their
    /// loads (at most [`LOAD_WAIT`]); meanwhile it counts as interest, which starts them.
    pub(super) fn subscribe_granted(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation: Option<&str>,
        args: protocol::SubscribeArgs,
        now: Instant,
    ) {
        if args.since.is_some() {
            let patterns = if args.topics.is_empty() { vec![Pattern::everything()] } else { args.topics.clone() };
            if let Some(shards) = self.resume_waits_for(&patterns, args.since.as_deref()) {
                let waiting = Waiting::Subscribe { correlation: correlation.map(str::to_string), args };
                if let Err(rejection) = self.park(key, conn.id, patterns, shards, waiting, now) {
                    self.send_error(key, conn, correlation, &rejection, now);
                }
                return;
            }
        }
        self.subscribe_now(key, conn, correlation, args, true, now)
    }

    /// With a sharded engine, the shards `patterns` can match that this node has not
    /// loaded, when there are any: a resume over them waits.
    pub(super) fn shards_to_load(&self, patterns: &[Pattern]) -> Option<Vec<u32>> {
        let shards = self.shared.interest.as_ref()?.shards_of(patterns);
        shards.iter().any(|&shard| !self.shared.bus.loaded(shard)).then_some(shards)
    }

    /// With a sharded engine, the shards `patterns` can match when a resume from `since`
    /// must wait: some are not loaded, or this node has not yet read them as far as
    /// `since` says (a client moving from a node that was ahead: the ids it would be
    /// given meanwhile would name positions behind what it has).
    pub(super) fn resume_waits_for(&self, patterns: &[Pattern], since: Option<&str>) -> Option<Vec<u32>> {
        let shards = self.shared.interest.as_ref()?.shards_of(patterns);
        let bus = &self.shared.bus;
        let loaded = shards.iter().all(|&shard| bus.loaded(shard));
        let reached = since.and_then(|since| bus.positions_of(since)).is_none_or(|at| bus.reached(&shards, &at));
        (!loaded || !reached).then_some(shards)
    }

    /// Makes `waiting` wait for `shards` to load, counting `patterns` as interest (which
    /// starts their readers) meanwhile; at most [`PARKED_PER_CONNECTION`] per connection.
    pub(super) fn park(
        &mut self,
        key: usize,
        conn_id: u64,
        patterns: Vec<Pattern>,
        shards: Vec<u32>,
        waiting: Waiting,
        now: Instant,
    ) -> Result<(), Rejection> {
        if self.parked.iter().filter(|p| p.key == key && p.conn_id == conn_id).count() >= PARKED_PER_CONNECTION {
            return Err(Rejection::new(
                ErrorCode::Overloaded,
                format!("{PARKED_PER_CONNECTION} resumes already wait for engine shards to load"),
            ));
        }
        if let Some(interest) = &self.shared.interest {
            let wall = super::wall_ms(self.shared.wall(now));
            patterns.iter().for_each(|pattern| interest.add(pattern, wall));
        }
        // Within the request timeout, so an SSE request waiting is not answered 504.
        let wait = LOAD_WAIT.min(Duration::from_millis(self.config().http_request_timeout_ms) / 2);
        let since = match &waiting {
            Waiting::Subscribe { args, .. } => args.since.as_deref(),
            Waiting::Sse { since, .. } => since.as_deref(),
        };
        let wanted = since.and_then(|since| self.shared.bus.positions_of(since));
        let until = now + wait;
        let behind_until = Some(now + AHEAD_WAIT);
        self.parked.push(Parked { key, conn_id, waiting, patterns, shards, wanted, until, behind_until });
        Ok(())
    }

    /// A resume that waited for engine shards goes on (`ready`: they loaded).
    pub(super) fn unpark(&mut self, key: usize, conn: &mut Conn, waiting: Waiting, ready: bool, now: Instant) {
        match waiting {
            Waiting::Subscribe { correlation, args } => {
                self.subscribe_now(key, conn, correlation.as_deref(), args, ready, now);
            }
            Waiting::Sse { grant, .. } => {
                if conn.closing.is_some() {
                    return;
                }
                let State::Http(http) = &mut conn.state else { return };
                let Some(request) = http.waiting.take() else { return };
                if let Routed::Next = self.start_sse_granted(key, conn, &request, grant, Some(ready), now) {
                    self.process_http(key, conn, now);
                }
            }
        }
    }

    /// When the first parked resume stops waiting.
    pub(super) fn next_unpark(&self) -> Option<Instant> {
        self.parked.iter().map(|p| p.behind_until.unwrap_or(p.until)).min()
    }

    /// Resumes whose engine shards are loaded now (`true`) or that waited [`LOAD_WAIT`]
    /// (`false`) go on.
    pub(super) fn take_unparked(&mut self, now: Instant) -> Vec<(Parked, bool)> {
        let mut going = Vec::new();
        for mut parked in std::mem::take(&mut self.parked) {
            let bus = &self.shared.bus;
            let loaded = parked.shards.iter().all(|&shard| bus.loaded(shard));
            let reached = parked.wanted.as_ref().is_none_or(|wanted| bus.reached(&parked.shards, wanted));
            // Behind for longer than a node lags another: go on, live delivery skips up to
            // the wanted positions (`event::After`).
            if parked.behind_until.is_some_and(|at| now >= at) {
                parked.behind_until = None;
            }
            let behind_waited = parked.behind_until.is_none();
            if (loaded && (reached || behind_waited)) || now >= parked.until {
                if let Some(interest) = &self.shared.interest {
                    parked.patterns.iter().for_each(|pattern| interest.remove(pattern));
                }
                going.push((parked, loaded));
            } else {
                self.parked.push(parked);
            }
        }
        going
    }

    /// [`Ctx::subscribe_granted`] once its shards are loaded (`shards_ready`) or it gave
    /// up waiting.
    pub(super) fn subscribe_now(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation: Option<&str>,
        args: protocol::SubscribeArgs,
        shards_ready: bool,
        now: Instant,
    ) {
        let max = self.config().max_subscriptions_per_connection;
        let State::WebSocket(ws) = &mut conn.state else { return };
        let Some(grant) = &ws.grant else { return };
        let topics = args.topics;
        if ws.subs.len() >= max {
            let rejection = Rejection::new(ErrorCode::TooManySubscriptions, format!("at most {max} subscriptions"));
            return self.send_error(key, conn, correlation, &rejection, now);
        }
        let sub_key = ws.next_key;
        ws.next_key += 1;
        let id = args.subscription_id.unwrap_or_else(|| format!("sub-{sub_key}"));
        if ws.subs.iter().any(|s| s.id == id) {
            let rejection = Rejection::new(ErrorCode::DuplicateSubscription, format!("subscription {id:?} exists"));
            return self.send_error(key, conn, correlation, &rejection, now);
        }
        let info = grant.info.clone().or(args.presence_info);
        let info_max = self.config().presence_info_max_bytes;
        if info.as_ref().is_some_and(|i| i.get().len() > info_max) {
            let rejection = Rejection::new(ErrorCode::InvalidMessage, format!("presence info over {info_max} bytes"));
            return self.send_error(key, conn, correlation, &rejection, now);
        }
        let filter = Filter::new(topics, args.sources, args.correlation_id);
        let since = args.since.as_deref().filter(|_| shards_ready);
        let (recovered, after, replay) = match (args.since.is_some(), since) {
            (true, None) => (false, After::START, None),
            _ => self.resume(since, &filter.patterns, now),
        };
        let sub = Subscription {
            key: sub_key,
            id,
            filter,
            after,
            presence: args.presence,
            presence_info_bytes: info.as_ref().map_or(0, |i| i.get().len()) as u32,
        };
        // The subscription, its presence entries and its replay cursor (its filter is kept
        // twice while it replays) against the connection's state budget.
        let replay_bytes = replay.as_ref().map_or(0, |c| c.retained_bytes() + sub.filter.state_bytes());
        let budget = self.config().max_connection_state_bytes;
        if conn.state_bytes() + sub.state_bytes() + replay_bytes > budget {
            let rejection = Rejection::new(
                ErrorCode::LimitExceeded,
                format!("over max_connection_state_bytes ({budget}): unsubscribe something first"),
            );
            return self.send_error(key, conn, correlation, &rejection, now);
        }
        let State::WebSocket(ws) = &mut conn.state else { return };
        for pattern in &sub.filter.patterns {
            self.index_pattern(pattern, SubRef { conn: key, sub: sub_key }, now);
        }
        let user = ws.grant.as_ref().and_then(|g| g.sub.as_deref());
        let joiner = Joiner { conn_id: conn.id, user, info: info.as_deref(), transport: Transport::WebSocket };
        self.join_presence(&joiner, &sub.filter.patterns, now);
        let replay_filter = replay.is_some().then(|| sub.filter.clone());
        let payload = json!({"subscription_id": sub.id, "status": "subscribed", "recovered": recovered});
        ws.subs.push(sub);
        self.gauge(None, None, 1);
        self.send_message(key, conn, "ack", correlation, &payload.to_string(), now);
        if let Some(filter) = replay_filter {
            self.replay_into(conn, sub_key, replay, filter);
        }
    }

    /// For a subscription resuming after `since`: whether it can, the order key live
    /// events must pass, and a cursor over the retained events to replay first (everything
    /// the log holds after `since`; live delivery takes over after the last of them).
    pub(super) fn resume(
        &self,
        since: Option<&str>,
        patterns: &[Pattern],
        now: Instant,
    ) -> (bool, After, Option<Cursor>) {
        let Some(since) = since else { return (true, After::START, None) };
        let over = self.shared.interest.as_ref().map(|interest| interest.shards_of(patterns));
        match self.shared.bus.resume_over(since, over.as_deref(), now, self.shared.wall(now)) {
            Ok((after, cursor)) => (true, after, cursor),
            Err(NotRecoverable) => (false, After::START, None),
        }
    }

    /// Puts a resume in the connection's backlog, from which its events are fed into the
    /// outbound queue as it drains (a resume larger than the bound is not a slow consumer).
    pub(super) fn replay_into(&mut self, conn: &mut Conn, sub: u32, cursor: Option<Cursor>, filter: Filter) {
        let Some(cursor) = cursor else { return };
        conn.push_replay(sub, cursor, filter);
        let (_, replayed) = conn.refill();
        self.counters().deliveries.fetch_add(replayed as u64, Ordering::Relaxed);
    }

    pub(super) fn unsubscribe(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation: Option<&str>,
        subscription_id: &str,
        now: Instant,
    ) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        let Some(position) = ws.subs.iter().position(|s| s.id == subscription_id) else {
            let rejection =
                Rejection::new(ErrorCode::UnknownSubscription, format!("no subscription {subscription_id:?}"));
            return self.send_error(key, conn, correlation, &rejection, now);
        };
        let sub = ws.subs.swap_remove(position);
        for pattern in &sub.filter.patterns {
            self.unindex_pattern(pattern, SubRef { conn: key, sub: sub.key });
            self.leave_presence(conn.id, pattern);
        }
        self.gauge(None, None, -1);
        // Nothing of it may follow the ack: its replay ends, and a batch already pending
        // goes out before the ack.
        conn.cancel_replay(sub.key);
        super::write_batch(conn, self.shared.wall(now));
        let payload = json!({"subscription_id": sub.id, "status": "unsubscribed"});
        self.send_message(key, conn, "ack", correlation, &payload.to_string(), now);
    }

    pub(super) fn ws_request(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation: Option<&str>,
        request: protocol::Request,
        now: Instant,
    ) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        let payload = match request {
            protocol::Request::ListSubscriptions => {
                let subs: Vec<_> = ws
                    .subs
                    .iter()
                    .map(|s| {
                        json!({
                            "subscription_id": s.id,
                            "topics": s.filter.patterns.iter().map(|p| p.as_str()).collect::<Vec<_>>(),
                            "sources": s.filter.sources,
                            "correlation_id": s.filter.correlation_id,
                        })
                    })
                    .collect();
                json!({"subscriptions": subs}).to_string()
            }
            protocol::Request::SubscriptionCount => json!({"count": ws.subs.len()}).to_string(),
            // With a publish proxy the backend decides every client publish (and may
            // replace its data); without one, the grant does.
            protocol::Request::Publish(publish) if self.shared.backend.configured(Proxy::Publish) => {
                let user = ws.grant.as_ref().and_then(|g| g.sub.as_deref());
                let body = json!({
                    "client_id": ws.client_id,
                    "user": user,
                    "topic": publish.topic,
                    "source": publish.source,
                    "correlation_id": publish.correlation_id,
                    "data": publish.data,
                });
                let call = BackendCall::Publish { correlation: correlation.map(str::to_string), request: publish };
                if let Err(rejection) = self.call_backend(key, conn, Proxy::Publish, &body, call) {
                    self.send_error(key, conn, correlation, &rejection, now);
                }
                return;
            }
            protocol::Request::Publish(publish)
                if !ws.grant.as_ref().is_some_and(|g| g.may_publish(&publish.topic)) =>
            {
                let rejection = Rejection::new(ErrorCode::Forbidden, format!("may not publish on {}", publish.topic));
                return self.send_error(key, conn, correlation, &rejection, now);
            }
            protocol::Request::Publish(publish) => return self.publish_now(key, conn, correlation, publish, now),
            protocol::Request::Rpc { method, data } => {
                if !self.shared.backend.configured(Proxy::Rpc) {
                    let rejection = Rejection::new(ErrorCode::UnknownAction, "rpc needs a backend (proxy_rpc_url)");
                    return self.send_error(key, conn, correlation, &rejection, now);
                }
                let user = ws.grant.as_ref().and_then(|g| g.sub.as_deref());
                let body = json!({"client_id": ws.client_id, "user": user, "method": method, "data": data});
                let call = BackendCall::Rpc { correlation: correlation.map(str::to_string), method };
                if let Err(rejection) = self.call_backend(key, conn, Proxy::Rpc, &body, call) {
                    self.send_error(key, conn, correlation, &rejection, now);
                }
                return;
            }
            protocol::Request::History(mut query) => {
                let Some(grant) = &ws.grant else { return };
                match readable_patterns(grant, std::mem::take(&mut query.topics)) {
                    Ok(topics) => query.topics = topics,
                    Err(rejection) => return self.send_error(key, conn, correlation, &rejection, now),
                }
                self.history(&query, now)
            }
            // Answered before the grant check, in `ws_auth`.
            protocol::Request::Auth { .. } => return,
            protocol::Request::Stats => {
                // Authenticated before any request is routed here.
                let admin_claim = ws.grant.as_ref().is_some_and(|g| g.admin);
                let asked = self.operator(conn, Ok(admin_claim)).and_then(|()| {
                    self.gather_stats(key, conn, StatsFormat::WsResponse(correlation.map(str::to_string)))
                });
                if let Err(rejection) = asked {
                    self.send_error(key, conn, correlation, &rejection, now);
                }
                return;
            }
            protocol::Request::Presence { ref topic } | protocol::Request::PresenceStats { ref topic } => {
                let stats = matches!(request, protocol::Request::PresenceStats { .. });
                let Some(grant) = &ws.grant else { return };
                match self.presence_answer(topic, stats, |p| grant.may_subscribe(p)) {
                    Ok(answer) => answer,
                    Err(rejection) => return self.send_error(key, conn, correlation, &rejection, now),
                }
            }
        };
        self.send_message(key, conn, "response", correlation, &payload, now);
    }

    /// Publishes a client's event (allowed by its grant or the publish proxy) and answers
    /// with its id, now or when the engine has it.
    pub(super) fn publish_now(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation: Option<&str>,
        publish: protocol::PublishRequest,
        now: Instant,
    ) {
        let reply = Reply {
            to: ReplyTo { shard: self.id, key, conn_id: conn.id },
            wait: false,
            websocket: Some(correlation.map(str::to_string)),
        };
        match self.shared.bus.publish(vec![publish], reply, now, self.shared.wall(now)) {
            Ok(Accepted::Now(ids)) => {
                let payload = json!({"message_id": ids.first()}).to_string();
                self.send_message(key, conn, "response", correlation, &payload, now);
            }
            Ok(Accepted::Later) => {}
            Err(error) => self.send_error(key, conn, correlation, &publish_rejection(&error), now),
        }
    }

    /// Sends a server message on a WebSocket connection (nothing if it is not one, or
    /// closing), under its bound.
    pub(super) fn send_message(
        &mut self,
        key: usize,
        conn: &mut Conn,
        kind: &str,
        correlation_id: Option<&str>,
        payload: &str,
        now: Instant,
    ) {
        let State::WebSocket(ws) = &mut conn.state else { return };
        if !ws.codec.can_write() || conn.closing.is_some() {
            return;
        }
        let id = ws.next_message_id();
        let text = protocol::server_message(kind, &id, self.shared.wall(now), correlation_id, payload);
        let mut out = Vec::new();
        ws.codec.send_text(text, &mut out);
        self.send(key, conn, out, now);
    }

    /// Sends an `error` message.
    pub(super) fn send_error(
        &mut self,
        key: usize,
        conn: &mut Conn,
        correlation_id: Option<&str>,
        rejection: &Rejection,
        now: Instant,
    ) {
        self.send_message(key, conn, "error", correlation_id, &protocol::error_payload(rejection).to_string(), now);
    }
}

/// The patterns to use for a read: those asked for, each covered by the grant, or the
/// grant's own when none were asked for.
pub(super) fn readable_patterns(
    grant: &Grant,
    asked: Vec<crate::topic::Pattern>,
) -> Result<Vec<crate::topic::Pattern>, Rejection> {
    if asked.is_empty() {
        if grant.subscribe.is_empty() {
            return Err(Rejection::new(ErrorCode::Forbidden, "the token allows reading nothing"));
        }
        return Ok(grant.subscribe.clone());
    }
    match asked.iter().find(|p| !grant.may_subscribe(p)) {
        Some(p) => Err(Rejection::new(ErrorCode::Forbidden, format!("may not read {}", p.as_str()))),
        None => Ok(asked),
    }
}

/// The WebSocket form of a refused publish.
pub(super) fn publish_rejection(error: &PublishError) -> Rejection {
    let code = match error {
        PublishError::TooLarge(_) => ErrorCode::InvalidMessage,
        PublishError::Overloaded => ErrorCode::Overloaded,
        PublishError::EngineUnavailable => ErrorCode::EngineUnavailable,
        PublishError::AcrossShards => ErrorCode::InvalidMessage,
    };
    Rejection::new(code, error.to_string())
}

/// A message for the testing echo route to send back.
enum Echo {
    Text(String),
    Binary(Vec<u8>),
}

/// The echo route's answer: compressed per message where deflate was agreed (so the
/// conformance suite checks volley's compressed frames too), else through tungstenite.
fn echo(ws: &mut WsConn, message: Echo) -> Vec<u8> {
    let (opcode, bytes) = match &message {
        Echo::Text(text) => (0x1, text.as_bytes()),
        Echo::Binary(data) => (0x2, data.as_slice()),
    };
    if let Some(agreement) = ws.deflate.filter(|a| a.worth(bytes.len()))
        && ws.codec.can_write()
        && let Some(frame) = event::compressed_frame(agreement.window, opcode, bytes)
    {
        return frame;
    }
    let mut out = Vec::new();
    match message {
        Echo::Text(text) => ws.codec.send_text(text, &mut out),
        Echo::Binary(data) => ws.codec.send_binary(data, &mut out),
    }
    out
}
