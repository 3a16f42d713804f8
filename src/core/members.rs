//! Presence in the core: who joins and leaves a topic as connections subscribe, unsubscribe
//! and go, and delivering join/leave notices to the members that asked for them.
//!
//! Membership is registered in [`crate::presence::Presence`] (shared by the shards) for
//! every exact topic a WebSocket subscription or an SSE stream names; a notice goes to every
//! shard's inbox and each shard hands it to its own connections whose subscription names
//! the topic exactly and opted in (`"presence": true`, `?presence=1`). Nothing here runs
//! on the publish or fan-out path.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, UNIX_EPOCH};

use super::{Core, Ctx, SSE_SUB};
use crate::conn::{Filter, State};
use crate::mailbox::Control;
use crate::presence::{Entry, Notice, Transport};
use crate::protocol::{ErrorCode, Rejection};
use crate::sse;
use crate::topic::Pattern;

/// What presence shows about a connection joining.
pub(super) struct Joiner<'a> {
    pub conn_id: u64,
    pub user: Option<&'a str>,
    pub info: Option<&'a serde_json::value::RawValue>,
    pub transport: Transport,
}

/// A connection's id as clients see it (its connect `ack`, presence entries).
pub(super) fn client_id(conn_id: u64) -> String {
    format!("{conn_id:x}")
}

/// Whether `filter` names `topic` exactly.
fn names(filter: &Filter, topic: &str) -> bool {
    filter.patterns.iter().any(|p| p.is_exact() && p.as_str() == topic)
}

impl Ctx {
    /// `joiner` subscribed to `patterns`: a member of each exact one.
    pub(super) fn join_presence(&self, joiner: &Joiner<'_>, patterns: &[Pattern], now: Instant) {
        for pattern in patterns.iter().filter(|p| p.is_exact()) {
            let entry = || Entry {
                node: self.shared.node,
                conn_id: joiner.conn_id,
                user: joiner.user.map(Into::into),
                info: joiner.info.map(ToOwned::to_owned),
                transport: joiner.transport,
                since_ms: self.shared.wall(now).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            };
            if let Some(notice) = self.shared.presence.join(pattern.as_str(), (self.shared.node, joiner.conn_id), entry)
            {
                self.announce(notice);
            }
        }
    }

    /// Connection `conn_id` no longer names `pattern` in one of its subscriptions.
    pub(super) fn leave_presence(&self, conn_id: u64, pattern: &Pattern) {
        if pattern.is_exact()
            && let Some(notice) = self.shared.presence.leave(pattern.as_str(), (self.shared.node, conn_id))
        {
            self.announce(notice);
        }
    }

    fn announce(&self, notice: Notice) {
        // This node's own member joined or left: its transitions are this node's to tell.
        if let Some(hooks) = &self.shared.webhooks {
            hooks.tell(&notice, true);
        }
        let notice = Arc::new(notice);
        // A shard whose control queue is full misses the notice (counted); its members'
        // lists stay right, only the notice is lost.
        self.shared.bus.mailboxes.to_every_shard(|| Control::Presence(notice.clone()));
        if self.shared.engine.is_some() && self.shared.presence_outbox.push(notice).is_err() {
            self.shared.presence_resync.store(true, Ordering::Release);
        }
    }

    /// The `presence` or `presence_stats` answer for `topic`, if `may_read` it.
    pub(super) fn presence_answer(
        &self,
        topic: &str,
        stats: bool,
        may_read: impl Fn(&Pattern) -> bool,
    ) -> Result<String, Rejection> {
        let pattern = Pattern::parse(topic).ok().filter(Pattern::is_exact).ok_or_else(|| {
            Rejection::new(ErrorCode::InvalidTopic, format!("presence is of exact topics, not {topic:?}"))
        })?;
        if !may_read(&pattern) {
            return Err(Rejection::new(ErrorCode::Forbidden, format!("may not read {topic}")));
        }
        let presence = &self.shared.presence;
        Ok(if stats {
            let (connections, users) = presence.stats(topic);
            serde_json::json!({"topic": topic, "connections": connections, "users": users}).to_string()
        } else {
            let (entries, truncated) = presence.entries(topic, self.config().presence_max_entries);
            let entries: Vec<serde_json::Value> = entries.iter().map(|e| e.to_json()).collect();
            serde_json::json!({"topic": topic, "entries": entries, "truncated": truncated}).to_string()
        })
    }
}

impl Core {
    /// Hands a join or leave to this shard's connections that asked for it, once each.
    pub(super) fn deliver_presence(&mut self, notice: &Notice, now: Instant) {
        let Core { conns, ctx } = self;
        let mut targets = Vec::new();
        ctx.index.for_each_match(&notice.topic, |at| targets.push(at));
        targets.sort_by_key(|at| at.conn);
        targets.dedup_by_key(|at| at.conn);
        let payload = notice.payload();
        for at in targets {
            let Some(conn) = conns.get_mut(at.conn).filter(|c| c.closing.is_none()) else { continue };
            let topic = &*notice.topic;
            match &conn.state {
                State::WebSocket(ws) if ws.subs.iter().any(|s| s.presence && names(&s.filter, topic)) => {
                    ctx.send_message(at.conn, conn, "presence", None, &payload, now);
                }
                State::Sse(sse) if at.sub == SSE_SUB && sse.presence && names(&sse.filter, topic) => {
                    ctx.send(at.conn, conn, sse::named_event("presence", &payload), now);
                }
                _ => continue,
            }
            // Reached through the index (not through `reach`), so recorded here.
            ctx.changed.push(at.conn);
        }
    }
}
