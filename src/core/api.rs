//! The server API on the operators' routes (docs/protocol.md, "Server API"):
//! `POST /api/disconnect`, `POST /api/unsubscribe` and `GET /api/topics`.
//!
//! Owns reading those requests and acting on this shard's connections when asked: a
//! disconnect or unsubscribe goes to every shard's mailbox ([`Control::Api`]); each acts
//! on its own connections and counts them, and the last to finish tells the shard holding
//! the HTTP request ([`Control::ApiDone`]); a shard finds the connections by its
//! [`Directory`] (client id and user), never by a scan. It must not reach into another shard's
//! connections; the topic list is read from the presence registry, which every shard
//! shares. With the Redis engine the action is also queued for the presence mirror, which
//! tells every other node (each acts on its own connections and answers nobody).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use serde_json::json;

use super::{Core, Ctx, LINGER, Routed, SubRef};
use crate::conn::{Conn, State};
use crate::http::{HttpError, Request, Response};
use crate::mailbox::{ApiAction, ApiTally, Control};
use crate::protocol::ErrorCode;
use crate::sse;
use crate::ws::Close;

/// A shard's WebSocket connections by client id and by user, so a server API call costs
/// what it matches, never a scan of every connection (a mass disconnect must not hold a
/// shard up).
#[derive(Debug, Default)]
pub(super) struct Directory {
    clients: HashMap<u64, usize>,
    users: HashMap<Box<str>, Vec<usize>>,
}

impl Directory {
    /// A WebSocket connection `conn_id` at slab `key`.
    pub(super) fn add_client(&mut self, conn_id: u64, key: usize) {
        self.clients.insert(conn_id, key);
    }

    /// The connection at `key` is now `user`'s (it was `old`'s).
    pub(super) fn set_user(&mut self, key: usize, old: Option<&str>, user: Option<&str>) {
        if old == user {
            return;
        }
        if let Some(old) = old {
            self.forget_user(key, old);
        }
        if let Some(user) = user {
            self.users.entry(user.into()).or_default().push(key);
        }
    }

    /// The connection `conn_id` at `key`, of `user`, is gone.
    pub(super) fn remove(&mut self, conn_id: u64, key: usize, user: Option<&str>) {
        self.clients.remove(&conn_id);
        if let Some(user) = user {
            self.forget_user(key, user);
        }
    }

    fn forget_user(&mut self, key: usize, user: &str) {
        if let Some(keys) = self.users.get_mut(user) {
            keys.retain(|k| *k != key);
            if keys.is_empty() {
                self.users.remove(user);
            }
        }
    }

    /// The connections an action names on this shard.
    fn matching(&self, action: &ApiAction) -> Vec<usize> {
        let user = match action {
            ApiAction::Disconnect { user: Some(user), .. } | ApiAction::Unsubscribe { user, .. } => user,
            ApiAction::Disconnect { client_id: Some(id), .. } => {
                let key = u64::from_str_radix(id, 16).ok().and_then(|id| self.clients.get(&id));
                return key.into_iter().copied().collect();
            }
            ApiAction::Disconnect { .. } => return Vec::new(),
        };
        self.users.get(user.as_str()).cloned().unwrap_or_default()
    }
}

/// `/api/topics` answers at most this many topics per page.
const MAX_TOPICS_PAGE: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsubscribeBody {
    user: String,
    topic: String,
}

fn bad(message: impl Into<String>) -> Response {
    Response::error(&HttpError::new(ErrorCode::BadRequest, message))
}

/// Reads a disconnect or unsubscribe body into the action every shard performs.
fn action_of(path: &str, body: &[u8]) -> Result<ApiAction, Response> {
    let invalid = |e: serde_json::Error| bad(format!("body: {e}"));
    if path == "/api/disconnect" {
        let body: DisconnectBody = serde_json::from_slice(body).map_err(invalid)?;
        if body.user.is_some() == body.client_id.is_some() {
            return Err(bad("name exactly one of user and client_id"));
        }
        let code = body.code.unwrap_or(4003);
        if !(4000..=4999).contains(&code) {
            return Err(bad("code must be 4000-4999"));
        }
        return Ok(ApiAction::Disconnect {
            user: body.user,
            client_id: body.client_id,
            code,
            reason: body.reason.unwrap_or_default(),
        });
    }
    let body: UnsubscribeBody = serde_json::from_slice(body).map_err(invalid)?;
    if crate::topic::validate_topic(&body.topic).is_err() {
        return Err(Response::error(&HttpError::new(ErrorCode::InvalidTopic, "topic must be an exact topic")));
    }
    Ok(ApiAction::Unsubscribe { user: body.user, topic: body.topic })
}

impl Ctx {
    /// An operator's call (already past the operators' rule). A disconnect or unsubscribe
    /// waits for every shard; `None` means the answer comes later.
    pub(super) fn http_api(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        body: &[u8],
        now: Instant,
    ) -> Option<Routed> {
        if request.path == "/api/topics" {
            let response = self.topics_page(request);
            return Some(self.respond(key, conn, request, response, now));
        }
        let action = match action_of(&request.path, body) {
            Ok(action) => action,
            Err(response) => return Some(self.respond(key, conn, request, response, now)),
        };
        // With the Redis engine every other node acts too (told through the presence mirror).
        if self.shared.engine.is_some() && self.shared.api_outbox.push(action.clone()).is_err() {
            let response = Response::error(&HttpError::new(ErrorCode::Overloaded, "too many server API calls queued"))
                .header("Retry-After", "1");
            return Some(self.respond(key, conn, request, response, now));
        }
        let mailboxes = &self.shared.bus.mailboxes;
        let tally = ApiTally::new(action, Some(self.reply_to(key, conn)), mailboxes.inboxes().len());
        let refused = mailboxes.to_every_shard(|| Control::Api(tally.clone()));
        // The shards that took it answer; if the last of them finished before the refusals
        // were counted here, or none took it, the answer is now.
        // Every refusal counts (no short-circuit): the tally must reach zero exactly once.
        if (0..refused).fold(false, |last, _| tally.done(0) || last) {
            let response = Response::error(&HttpError::new(ErrorCode::Overloaded, "a shard's queue is full"))
                .header("Retry-After", "1");
            return Some(self.respond(key, conn, request, response, now));
        }
        None
    }

    /// `GET /api/topics?prefix=&limit=&cursor=`: exact topics with subscribers, in order.
    fn topics_page(&self, request: &Request) -> Response {
        let limit = match request.query_param("limit").map(|l| l.parse::<usize>()) {
            None => 100,
            Some(Ok(limit)) if limit > 0 => limit.min(MAX_TOPICS_PAGE),
            Some(_) => return bad("limit must be a positive integer"),
        };
        let prefix = request.query_param("prefix").unwrap_or_default();
        let after = request.query_param("cursor").filter(|c| !c.is_empty());
        let (topics, more) = self.shared.presence.topics(&prefix, after.as_deref(), limit);
        let cursor = more.then(|| topics.last().map(|(topic, _)| topic.clone())).flatten();
        let topics: Vec<_> = topics.iter().map(|(topic, n)| json!({"topic": topic, "subscribers": n})).collect();
        Response::json(200, &json!({"topics": topics, "cursor": cursor}))
    }
}

impl Core {
    /// Does a server API action to this shard's connections, then reports how many.
    pub(super) fn act_on_api(&mut self, tally: Arc<ApiTally>, now: Instant) {
        let mut affected = 0;
        for key in self.ctx.directory.matching(&tally.action) {
            let Core { conns, ctx } = self;
            let Some(conn) = conns.get_mut(key) else { continue };
            let acted = match &tally.action {
                ApiAction::Disconnect { user, client_id, code, reason } => {
                    disconnect(conn, user.as_deref(), client_id.as_deref(), *code, reason, now)
                }
                ApiAction::Unsubscribe { user, topic } => ctx.unsubscribe_topic(key, conn, user, topic, now),
            };
            if acted {
                affected += 1;
                ctx.changed.push(key);
            }
        }
        self.settle();
        if tally.done(affected)
            && let Some(reply_to) = tally.reply_to
        {
            self.ctx.shared.bus.mailboxes.to_shard(reply_to.shard, Control::ApiDone(tally));
        }
    }

    /// Every shard has acted: answer the operator.
    pub(super) fn api_done(&mut self, tally: &ApiTally, now: Instant) {
        let field = match tally.action {
            ApiAction::Disconnect { .. } => "disconnected",
            ApiAction::Unsubscribe { .. } => "unsubscribed",
        };
        let Some(reply_to) = tally.reply_to else { return };
        let response = Response::json(200, &json!({ field: tally.affected() }));
        self.resume_http(reply_to.key, reply_to.conn_id, response, now);
    }
}

/// Closes `conn` if it is a WebSocket or SSE stream of `user` or with `client_id`: a
/// WebSocket with a close frame carrying `code` and `reason`, a stream with an
/// `event: disconnect` carrying them (so a client knows not to reconnect).
fn disconnect(
    conn: &mut Conn,
    user: Option<&str>,
    client_id: Option<&str>,
    code: u16,
    reason: &str,
    now: Instant,
) -> bool {
    if conn.closing.is_some() {
        return false;
    }
    let conn_user = match &conn.state {
        State::WebSocket(ws) => ws.grant.as_ref().and_then(|g| g.sub.as_deref()),
        State::Sse(sse) => sse.user.as_deref(),
        State::Http(_) => return false,
    };
    let by_user = user.is_some_and(|u| conn_user == Some(u));
    if !(by_user || client_id == Some(super::members::client_id(conn.id).as_str())) {
        return false;
    }
    let frame = match &mut conn.state {
        State::WebSocket(ws) => {
            let mut frame = Vec::new();
            ws.codec.close_because(Close::Disconnected(code), reason, &mut frame);
            frame
        }
        _ => sse::named_event("disconnect", &json!({"code": code, "reason": reason}).to_string()),
    };
    conn.out.push_bytes(frame);
    conn.begin_close(None, LINGER, now);
    true
}

impl Ctx {
    /// Takes `topic` out of every subscription of `user`'s connection `conn` (a
    /// subscription left with no topic ends); tells the client once.
    fn unsubscribe_topic(&mut self, key: usize, conn: &mut Conn, user: &str, topic: &str, now: Instant) -> bool {
        if conn.closing.is_some() {
            return false;
        }
        let conn_id = conn.id;
        let State::WebSocket(ws) = &mut conn.state else { return false };
        if ws.grant.as_ref().and_then(|g| g.sub.as_deref()) != Some(user) {
            return false;
        }
        let mut acted = false;
        let mut ended = Vec::new();
        for sub in &mut ws.subs {
            let before = sub.filter.patterns.len();
            sub.filter.patterns.retain(|pattern| {
                let keep = pattern.as_str() != topic;
                if !keep {
                    self.unindex_pattern(pattern, SubRef { conn: key, sub: sub.key });
                    self.leave_presence(conn_id, pattern);
                }
                keep
            });
            acted |= sub.filter.patterns.len() != before;
            if sub.filter.patterns.is_empty() {
                ended.push(sub.key);
            }
        }
        if !acted {
            return false;
        }
        for sub in &ended {
            ws.subs.retain(|s| s.key != *sub);
        }
        self.gauge(None, None, -(ended.len() as i64));
        for sub in ended {
            conn.cancel_replay(sub);
        }
        let payload = json!({"topic": topic}).to_string();
        self.send_message(key, conn, "unsubscribed", None, &payload, now);
        true
    }
}
