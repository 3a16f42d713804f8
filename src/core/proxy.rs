//! The shard's side of backend calls (docs/protocol.md, "Backends in the loop"): starting
//! a call for a WebSocket connection within its limits (calls in flight and its state
//! budget), and finishing what waited on it (a connect, a subscription, a publish, an rpc)
//! when the outcome comes back through the mailbox.
//!
//! It must not block or do I/O: calls run on the backend pool ([`crate::backend`]), and a
//! connection whose call is pending keeps being served (only a connect holds its reads).

use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value, json};

use super::routes::connected_ack;
use super::{Core, Ctx, LINGER, Routed};
use crate::auth::Grant;
use crate::backend::{Outcome, Proxy};
use crate::conn::{Conn, State};
use crate::http::{Request, Response};
use crate::mailbox::{BackendCall, Pending};
use crate::protocol::{ErrorCode, Rejection};
use crate::ws::Close;

impl Ctx {
    /// Starts a backend call for a WebSocket connection; refused `overloaded` past the
    /// calls in flight allowed (per connection or in the process) and `limit_exceeded`
    /// past its state budget.
    pub(super) fn call_backend(
        &mut self,
        key: usize,
        conn: &mut Conn,
        proxy: Proxy,
        body: &Value,
        call: BackendCall,
    ) -> Result<(), Rejection> {
        let config = self.config();
        let (per_connection, budget) = (config.proxy_max_in_flight_per_connection, config.max_connection_state_bytes);
        let body = body.to_string().into_bytes();
        let bytes = body.len() + std::mem::size_of::<Pending>();
        if conn.state_bytes() + bytes > budget {
            return Err(Rejection::new(
                ErrorCode::LimitExceeded,
                format!("over max_connection_state_bytes ({budget}) with this backend call"),
            ));
        }
        let to = self.reply_to(key, conn);
        // An HTTP connection (an SSE start) waits on one request at a time: one call.
        if let State::WebSocket(ws) = &conn.state
            && ws.backend_calls >= per_connection
        {
            return Err(Rejection::new(
                ErrorCode::Overloaded,
                format!("at most {per_connection} backend calls in flight per connection"),
            ));
        }
        self.shared
            .backend
            .call(proxy, body, Pending { to, bytes, call })
            .map_err(|busy| Rejection::new(ErrorCode::Overloaded, busy.to_string()))?;
        if let State::WebSocket(ws) = &mut conn.state {
            ws.backend_calls += 1;
            ws.backend_bytes += bytes;
        }
        Ok(())
    }

    /// Whether the connect proxy decides who a new WebSocket or SSE connection is: for one
    /// without a valid token (with auth off there is no such thing), or for every one with
    /// `proxy_connect_always`.
    pub(super) fn connect_proxy_decides(&self, valid_token: bool) -> bool {
        self.shared.backend.configured(Proxy::Connect)
            && (self.config().proxy_connect_always || !self.shared.auth.enabled() || !valid_token)
    }

    /// The connect proxy's request body for `request` arriving on `conn`.
    pub(super) fn connect_body(&self, conn: &Conn, request: &Request, transport: &str) -> Value {
        let mut headers = Map::new();
        for (name, value) in [("Origin", &request.origin), ("Authorization", &request.authorization)] {
            if let Some(value) = value {
                headers.insert(name.into(), value.as_str().into());
            }
        }
        for (name, value) in &request.for_backend {
            headers.insert((*name).into(), value.as_str().into());
        }
        json!({
            "client_id": super::members::client_id(conn.id),
            "transport": transport,
            "remote_addr": conn.peer.to_string(),
            "headers": headers,
            "query": request.query,
        })
    }

    /// A WebSocket just upgraded without a grant and the connect proxy decides: nothing
    /// more is read from it until the backend answers.
    pub(super) fn ask_connect_proxy(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        leftover: Vec<u8>,
        now: Instant,
    ) -> Routed {
        let body = self.connect_body(conn, request, "websocket");
        let State::WebSocket(ws) = &mut conn.state else { return Routed::Halt };
        ws.held = leftover;
        if let Err(rejection) = self.call_backend(key, conn, Proxy::Connect, &body, BackendCall::Connect) {
            self.refuse_connect(key, conn, &rejection, now);
        }
        Routed::Halt
    }

    /// The connect proxy refused or failed: say why, then close (4001 for a refusal,
    /// 1011 for a backend that could not answer: the client retries after its delay).
    fn refuse_connect(&mut self, key: usize, conn: &mut Conn, rejection: &Rejection, now: Instant) {
        let close = match rejection.code {
            ErrorCode::Unauthorized => Close::Unauthorized,
            _ => Close::Internal,
        };
        self.send_error(key, conn, None, rejection, now);
        conn.begin_close(Some(close), LINGER, now);
    }

    /// The connect proxy's answer: the connection gets its grant and the connect `ack`,
    /// and reading resumes with what came behind the upgrade.
    fn connected(&mut self, key: usize, conn: &mut Conn, answer: Map<String, Value>, now: Instant) {
        let grant = match Grant::from_connect_answer(answer) {
            Ok(grant) => grant,
            Err(error) => {
                let rejection = Rejection::new(ErrorCode::BackendUnavailable, error.to_string());
                return self.refuse_connect(key, conn, &rejection, now);
            }
        };
        let wall = self.shared.wall(now);
        let shared = self.shared.clone();
        let State::WebSocket(ws) = &mut conn.state else { return };
        ws.expire_at = grant.expire_at.map(|at| instant_of(at, now, wall));
        self.directory.set_user(key, None, grant.sub.as_deref());
        ws.grant = Some(grant);
        ws.auth_deadline = None;
        ws.connecting = false;
        let held = std::mem::take(&mut ws.held);
        let ack = connected_ack(ws, &shared.config, wall);
        conn.out.push_bytes(ack);
        self.read_again.push(key);
        if !held.is_empty() {
            self.on_ws_bytes(key, conn, &held, now);
        }
    }
}

impl Ctx {
    /// The connect proxy answered for an SSE start waiting on `conn`: the stream starts
    /// with the answer's grant, or the request is answered 401/502/504.
    fn sse_connected(&mut self, key: usize, conn: &mut Conn, outcome: Outcome, now: Instant) {
        if conn.closing.is_some() {
            return;
        }
        let State::Http(http) = &mut conn.state else { return };
        let Some(request) = http.waiting.take() else { return };
        let grant = match outcome {
            Outcome::Answer(answer) => Grant::from_connect_answer(answer)
                .map_err(|error| Rejection::new(ErrorCode::BackendUnavailable, error.to_string())),
            other => Err(rejection_of(other, Some(ErrorCode::Unauthorized))),
        };
        let routed = match grant {
            Ok(grant) => self.start_sse_granted(key, conn, &request, grant, None, now),
            Err(rejection) => {
                let response = Response::error(&super::routes::http_error_of(&rejection));
                self.respond(key, conn, &request, response, now)
            }
        };
        if let Routed::Next = routed {
            self.process_http(key, conn, now);
        }
    }
}

/// The monotonic instant of Unix time `at` (seconds), given that `now` is `wall`.
fn instant_of(at: u64, now: Instant, wall: SystemTime) -> Instant {
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(at);
    match at.duration_since(wall) {
        Ok(ahead) => now + ahead,
        Err(_) => now,
    }
}

/// How a backend that did not say yes is told to the client: its own code for an rpc,
/// `forbidden` for a subscribe or publish, `unauthorized` for a connect.
fn rejection_of(outcome: Outcome, refused_as: Option<ErrorCode>) -> Rejection {
    match outcome {
        Outcome::Refused { code, message } => match refused_as {
            Some(code) => Rejection::new(code, message),
            None => Rejection::from_backend(code, message),
        },
        Outcome::Timeout => Rejection::new(ErrorCode::BackendTimeout, "the backend did not answer in time"),
        Outcome::Unavailable(why) => Rejection::new(ErrorCode::BackendUnavailable, why),
        Outcome::Answer(_) => Rejection::new(ErrorCode::BackendUnavailable, "the backend's answer did not allow it"),
    }
}

/// A subscribe or publish answer that allows: `{"result":"allow"}`.
fn allows(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Answer(answer) if answer.get("result").and_then(Value::as_str) == Some("allow"))
}

impl Core {
    /// A backend call came back: finish what waited on it. A connection that left (or is
    /// closing) meanwhile gets nothing.
    pub(super) fn backend_answered(&mut self, pending: Pending, outcome: Outcome, now: Instant) {
        let Core { conns, ctx } = self;
        let Pending { to, bytes, call } = pending;
        let Some(conn) = ctx.reach(conns, to.key, to.conn_id) else { return };
        let key = to.key;
        if let BackendCall::ConnectSse = call {
            return ctx.sse_connected(key, conn, outcome, now);
        }
        let State::WebSocket(ws) = &mut conn.state else { return };
        ws.backend_calls = ws.backend_calls.saturating_sub(1);
        ws.backend_bytes = ws.backend_bytes.saturating_sub(bytes);
        if conn.closing.is_some() {
            return;
        }
        match call {
            // Answered above, before the WebSocket state.
            BackendCall::ConnectSse => {}
            BackendCall::Connect => match outcome {
                Outcome::Answer(answer) => ctx.connected(key, conn, answer, now),
                other => ctx.refuse_connect(key, conn, &rejection_of(other, Some(ErrorCode::Unauthorized)), now),
            },
            BackendCall::Subscribe { correlation, args } => {
                if allows(&outcome) {
                    ctx.subscribe_granted(key, conn, correlation.as_deref(), args, now);
                } else {
                    let rejection = rejection_of(outcome, Some(ErrorCode::Forbidden));
                    ctx.send_error(key, conn, correlation.as_deref(), &rejection, now);
                }
            }
            BackendCall::Publish { correlation, mut request } => {
                let replacement = match &outcome {
                    Outcome::Answer(answer) if allows(&outcome) => answer.get("data").map(Value::to_string),
                    _ => {
                        let rejection = rejection_of(outcome, Some(ErrorCode::Forbidden));
                        return ctx.send_error(key, conn, correlation.as_deref(), &rejection, now);
                    }
                };
                if let Some(data) = replacement.and_then(|d| serde_json::value::RawValue::from_string(d).ok()) {
                    request.data = data;
                }
                ctx.publish_now(key, conn, correlation.as_deref(), request, now);
            }
            BackendCall::Rpc { correlation, method } => match outcome {
                Outcome::Answer(mut answer) => {
                    let data = answer.remove("data").unwrap_or(Value::Null);
                    let payload = json!({"action": "rpc", "method": method, "data": data});
                    ctx.send_message(key, conn, "response", correlation.as_deref(), &payload.to_string(), now);
                }
                other => ctx.send_error(key, conn, correlation.as_deref(), &rejection_of(other, None), now),
            },
        }
    }
}
