//! HTTP on a shard: routing requests to their handlers, publishing over HTTP, the
//! WebSocket upgrade, starting SSE streams and the history document.
//!
//! Owns what a plain HTTP connection can ask for and how each answer looks (status, CORS,
//! error bodies). It turns a connection into a WebSocket or SSE stream but leaves the
//! WebSocket protocol to `session` and fan-out and timers to the core; like the rest of
//! the core it touches no socket and reads no clock.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::members::Joiner;
use super::session::readable_patterns;
use super::{Ctx, LINGER, Routed, SSE_SUB, SubRef};
use crate::auth::{AuthError, Grant};
use crate::backend::Proxy;
use crate::bus::Accepted;
use crate::config::Config;
use crate::conn::{Conn, Filter, SseConn, State, Transport, WsConn};
use crate::deflate;
use crate::event::PublishError;
use crate::history::NotRecoverable;
use crate::http::{self, HttpError, Parsed, Request, Response};
use crate::limits::TokenBucket;
use crate::mailbox::{BackendCall, Control, Reply, StatsRead};
use crate::metrics::{Gather, ShardCounters, StatsFormat};
use crate::protocol::{self, ErrorCode, HistoryQuery, Rejection};
use crate::sse;
use crate::ws::{self, Close, Codec};

impl Ctx {
    pub(super) fn process_http(&mut self, key: usize, conn: &mut Conn, now: Instant) {
        loop {
            if conn.closing.is_some() {
                return;
            }
            if conn.over_read_share() {
                // Backpressure: the rest waits until the client has read what is queued.
                conn.read_blocked = true;
                return;
            }
            let State::Http(http) = &mut conn.state else { return };
            if http.waiting.is_some() {
                return;
            }
            let (request, head_len) = match http::parse_head(&http.buf) {
                Parsed::Partial => return,
                Parsed::Invalid(error) => return self.fail_http(key, conn, &error, now),
                Parsed::Complete(request, head_len) => (request, head_len),
            };
            if request.chunked {
                let error =
                    HttpError::new(ErrorCode::BadRequest, "chunked bodies are not supported; send Content-Length")
                        .with_status(411);
                return self.fail_http(key, conn, &error, now);
            }
            let body_len = request.content_length.unwrap_or(0);
            if body_len > self.config().max_body_bytes {
                let error =
                    HttpError::new(ErrorCode::TooLarge, format!("body over {} bytes", self.config().max_body_bytes));
                return self.fail_http(key, conn, &error, now);
            }
            if http.buf.len() < head_len + body_len {
                if request.expect_continue && !http.continued {
                    http.continued = true;
                    self.send(key, conn, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(), now);
                }
                return;
            }
            http.continued = false;
            let body: Vec<u8> = http.buf[head_len..head_len + body_len].to_vec();
            http.buf.drain(..head_len + body_len);
            http.deadline = now + Duration::from_millis(self.config().http_idle_timeout_ms);
            if let Routed::Halt = self.route(key, conn, request, &body, now) {
                return;
            }
        }
    }

    pub(super) fn fail_http(&mut self, key: usize, conn: &mut Conn, error: &HttpError, now: Instant) {
        self.send(key, conn, Response::error(error).encode(true), now);
        conn.begin_close(None, LINGER, now);
    }

    pub(super) fn respond(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        response: Response,
        now: Instant,
    ) -> Routed {
        let response = self.cors(request, response);
        self.send(key, conn, response.encode(request.close), now);
        if request.close || conn.closing.is_some() {
            conn.begin_close(None, LINGER, now);
            return Routed::Halt;
        }
        Routed::Next
    }

    /// The `Access-Control-Allow-Origin` answer for `request`, if its origin is allowed.
    pub(super) fn allow_origin<'r>(&self, request: &'r Request) -> Option<&'r str> {
        let origin = request.origin.as_deref().filter(|o| self.config().origin_allowed(o))?;
        Some(if self.config().allowed_origins.iter().any(|o| o == "*") { "*" } else { origin })
    }

    pub(super) fn cors(&self, request: &Request, response: Response) -> Response {
        match self.allow_origin(request) {
            Some(allow) => response.header("Access-Control-Allow-Origin", allow).header("Vary", "Origin"),
            None => response,
        }
    }

    pub(super) fn route(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: Box<Request>,
        body: &[u8],
        now: Instant,
    ) -> Routed {
        let request_ref = &*request;
        if let Some(routed) = self.route_now(key, conn, request_ref, body, now) {
            return routed;
        }
        // The answer comes from other shards or the engine: keep the request for it, and
        // answer it 504 if that takes too long.
        if let State::Http(http) = &mut conn.state {
            http.waiting = Some(request);
            http.deadline = now + Duration::from_millis(self.config().http_request_timeout_ms);
        }
        Routed::Halt
    }

    /// Routes a request; `None` when the answer will come later through the inbox.
    pub(super) fn route_now(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        body: &[u8],
        now: Instant,
    ) -> Option<Routed> {
        let method = request.method.as_str();
        let path = request.path.as_str();
        if method == "OPTIONS" {
            let response = Response::with_body(204, "text/plain", Vec::new())
                .header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
                .header("Access-Control-Allow-Headers", "Content-Type, Authorization, Last-Event-ID")
                .header("Access-Control-Max-Age", "86400");
            return Some(self.respond(key, conn, request, response, now));
        }
        let echo = !self.config().echo_path.is_empty() && path == self.config().echo_path;
        // The operators' routes live on `admin_listen` when it is set, and only they do.
        let operators = matches!(
            path,
            "/stats"
                | "/metrics"
                | "/dashboard"
                | "/stats/stream"
                | "/api/disconnect"
                | "/api/unsubscribe"
                | "/api/topics"
        );
        let dashboard_off = !self.config().dashboard && matches!(path, "/dashboard" | "/stats/stream");
        let wrong_listener = !self.config().admin_listen.is_empty() && conn.admin != (operators || path == "/health");
        if dashboard_off || (wrong_listener && path != "/health") {
            let error = HttpError::new(ErrorCode::NotFound, format!("no route {path} here"));
            return Some(self.respond(key, conn, request, Response::error(&error), now));
        }
        let allowed: &[&str] = match path {
            "/ws" => &["GET"],
            _ if echo => &["GET"],
            "/publish" | "/api/disconnect" | "/api/unsubscribe" => &["POST"],
            "/api/topics" => &["GET"],
            "/sse" | "/history" | "/health" | "/stats" | "/metrics" | "/presence" | "/presence/stats"
            | "/volley.js" | "/dashboard" | "/stats/stream" => &["GET"],
            _ => {
                let error = HttpError::new(ErrorCode::NotFound, format!("no route {path}"));
                return Some(self.respond(key, conn, request, Response::error(&error), now));
            }
        };
        if !allowed.contains(&method) {
            let error = HttpError::new(ErrorCode::MethodNotAllowed, format!("{path} takes {}", allowed.join(", ")));
            let response = Response::error(&error).header("Allow", allowed.join(", "));
            return Some(self.respond(key, conn, request, response, now));
        }
        Some(match path {
            "/ws" => self.upgrade(key, conn, request, false, now),
            _ if echo => self.upgrade(key, conn, request, true, now),
            "/publish" => return self.http_publish(key, conn, request, body, now),
            "/api/disconnect" | "/api/unsubscribe" | "/api/topics" => match self.operator_http(conn, request) {
                Err(response) => self.respond(key, conn, request, response, now),
                Ok(()) => return self.http_api(key, conn, request, body, now),
            },
            "/sse" => return self.start_sse(key, conn, request, now),
            "/history" => {
                let response = match self.authorized_query(request) {
                    Ok((query, _)) => {
                        Response::with_body(200, "application/json", self.history(&query, now).into_bytes())
                    }
                    Err(response) => response,
                };
                self.respond(key, conn, request, response, now)
            }
            "/presence" | "/presence/stats" => {
                let response = self.http_presence(request, path == "/presence/stats");
                self.respond(key, conn, request, response, now)
            }
            "/dashboard" | "/stats/stream" => match self.operator_http(conn, request) {
                Err(response) => self.respond(key, conn, request, response, now),
                Ok(()) if path == "/dashboard" => {
                    let page = Response::with_body(200, "text/html; charset=utf-8", DASHBOARD_HTML.as_bytes().to_vec())
                        .header("Cache-Control", "no-cache");
                    self.respond(key, conn, request, page, now)
                }
                Ok(()) => self.start_stats_stream(key, conn, request, now),
            },
            "/volley.js" => {
                let response =
                    Response::with_body(200, "text/javascript; charset=utf-8", VOLLEY_JS.as_bytes().to_vec())
                        .header("Cache-Control", "no-cache");
                self.respond(key, conn, request, response, now)
            }
            "/health" => {
                let engine_up = self.shared.engine.as_ref().map(|e| e.up.load(Ordering::Acquire));
                let response = if self.shared.draining.load(Ordering::Acquire) {
                    Response::json(503, &json!({"status": "draining"}))
                } else {
                    match (engine_up, &self.shared.engine) {
                        (Some(true), _) => Response::json(200, &json!({"status": "ok", "engine": "up"})),
                        // Still serving subscribers; publishes to the shards down fail until
                        // they are back.
                        (Some(false), Some(engine)) => {
                            let down: Vec<_> = engine
                                .shards()
                                .into_iter()
                                .filter(|s| !s.up)
                                .map(|s| json!({"shard": s.shard, "server": s.server}))
                                .collect();
                            Response::json(200, &json!({"status": "degraded", "engine": "down", "shards_down": down}))
                        }
                        _ => Response::json(200, &json!({"status": "ok"})),
                    }
                };
                self.respond(key, conn, request, response, now)
            }
            _ => {
                if let Err(response) = self.operator_http(conn, request) {
                    return Some(self.respond(key, conn, request, response, now));
                }
                let format = if path == "/stats" { StatsFormat::Json } else { StatsFormat::Prometheus };
                match self.gather_stats(key, conn, format) {
                    Ok(()) => return None,
                    Err(rejection) => {
                        let response = Response::error(&http_error_of(&rejection)).header("Retry-After", "1");
                        self.respond(key, conn, request, response, now)
                    }
                }
            }
        })
    }

    /// Asks every shard for its histograms; the answer comes back as
    /// [`Control::StatsReady`]. Refused `overloaded` when this connection has a read in
    /// flight already, every place for one is taken, or every shard's queue is full.
    pub(super) fn gather_stats(&mut self, key: usize, conn: &mut Conn, format: StatsFormat) -> Result<(), Rejection> {
        let reply_to = self.reply_to(key, conn);
        if let State::WebSocket(ws) = &conn.state
            && ws.stats.as_ref().is_some_and(|g| g.strong_count() > 0)
        {
            return Err(stats_overloaded());
        }
        let shared = &self.shared;
        let shards = shared.bus.inboxes().len();
        let gather =
            Gather::new(shards, &shared.stats_gathers, super::MAX_STATS_GATHERS).ok_or_else(stats_overloaded)?;
        let read = Arc::new(StatsRead { gather, reply_to, format });
        if let State::WebSocket(ws) = &mut conn.state {
            ws.stats = Some(Arc::downgrade(&read));
        }
        let refused = shared.bus.mailboxes.to_every_shard(|| Control::Collect(read.clone()));
        // The shards that took it will answer (`overloaded`, since one could not); when
        // none did, nobody will, so the answer is now.
        if refused > 0 && read.gather.refused(refused) {
            return Err(stats_overloaded());
        }
        Ok(())
    }

    /// The one rule for the operators' views (`/stats`, `/metrics`, `/dashboard`,
    /// `/stats/stream`, and the WebSocket `stats` request): through `admin_listen` always
    /// (the network is the gate); elsewhere only when no `admin_listen` is set, and then,
    /// with auth on, for a token carrying the `admin` claim (`admin_claim`: the verified
    /// token's claim; with auth off every grant carries it).
    pub(super) fn operator(&self, conn: &Conn, admin_claim: Result<bool, &AuthError>) -> Result<(), Rejection> {
        if conn.admin {
            return Ok(());
        }
        if !self.config().admin_listen.is_empty() {
            return Err(Rejection::new(ErrorCode::Forbidden, "the operators' views are served on admin_listen"));
        }
        match admin_claim {
            Ok(true) => Ok(()),
            Ok(false) => Err(Rejection::new(ErrorCode::Forbidden, "the token has no admin claim")),
            Err(error) => Err(Rejection::new(ErrorCode::Unauthorized, error.to_string())),
        }
    }

    /// [`Self::operator`] for an HTTP request, answered as HTTP.
    fn operator_http(&self, conn: &Conn, request: &Request) -> Result<(), Response> {
        let verified = self.shared.auth.verify(request.token().as_deref());
        self.operator(conn, verified.as_ref().map(|grant| grant.admin)).map_err(|rejection| {
            match (&verified, rejection.code) {
                (Err(error), ErrorCode::Unauthorized) => unauthorized(error),
                _ => Response::error(&http_error_of(&rejection)),
            }
        })
    }

    pub(super) fn http_publish(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        body: &[u8],
        now: Instant,
    ) -> Option<Routed> {
        if let Err(retry_after) = self.shared.publish_rates.take(conn.peer, now) {
            ShardCounters::bump(&self.counters().rate_limited);
            let error = HttpError::new(ErrorCode::RateLimited, "too many publish requests from this address");
            let response = Response::error(&error).header("Retry-After", retry_after.to_string());
            return Some(self.respond(key, conn, request, response, now));
        }
        let grant = match self.shared.auth.verify(request.token().as_deref()) {
            Ok(grant) => grant,
            Err(error) => return Some(self.respond(key, conn, request, unauthorized(&error), now)),
        };
        let requests = match protocol::parse_publish_body(body, 1000) {
            Ok(r) => r,
            Err(rejection) => {
                return Some(self.respond(key, conn, request, Response::error(&http_error_of(&rejection)), now));
            }
        };
        if let Some(i) = requests.iter().position(|r| !grant.may_publish(&r.topic)) {
            let field = if requests.len() > 1 { format!("[{i}].topic") } else { "topic".into() };
            let error =
                HttpError::new(ErrorCode::Forbidden, format!("may not publish on {}", requests[i].topic)).at(field);
            return Some(self.respond(key, conn, request, Response::error(&error), now));
        }
        let wait = request.query_param("wait").is_some_and(|w| w == "1" || w == "true");
        let reply = Reply { to: self.reply_to(key, conn), wait, websocket: None };
        let count = requests.len();
        match self.shared.bus.publish(requests, reply, now, self.shared.wall(now)) {
            Ok(Accepted::Later) => None,
            Ok(Accepted::Now(ids)) => Some(self.respond(key, conn, request, published_response(Ok(ids), count), now)),
            Err(error) => Some(self.respond(key, conn, request, published_response(Err(error), count), now)),
        }
    }

    pub(super) fn upgrade(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        echo: bool,
        now: Instant,
    ) -> Routed {
        if !request.websocket_upgrade {
            let error = HttpError::new(ErrorCode::BadRequest, "this route needs a WebSocket upgrade").with_status(426);
            return self.respond(key, conn, request, ws::upgrade_error_response(&error), now);
        }
        if let Some(origin) = request.origin.as_deref()
            && !self.config().origin_allowed(origin)
        {
            let error = HttpError::new(ErrorCode::Forbidden, format!("origin {origin} is not allowed"));
            return self.respond(key, conn, request, Response::error(&error), now);
        }
        let config = self.config();
        let deflate = config
            .compression
            .then(|| {
                deflate::negotiate(
                    request.websocket_extensions.iter().map(String::as_str),
                    config.compression_min_bytes,
                )
            })
            .flatten();
        let handshake = match ws::accept(request, deflate.as_ref()) {
            Ok(bytes) => bytes,
            Err(error) => return self.respond(key, conn, request, ws::upgrade_error_response(&error), now),
        };
        // A browser cannot read an HTTP status from a failed upgrade, so a bad token is
        // answered after it, with close 4001; no token at all may still come as the
        // first message.
        let verified = self.shared.auth.verify(request.token().as_deref());
        let connecting = !echo && self.connect_proxy_decides(verified.is_ok());
        let (grant, refuse) = match verified {
            _ if connecting => (None, false),
            Ok(grant) => (Some(grant), false),
            Err(AuthError::Missing) => (None, false),
            Err(_) => (None, true),
        };
        self.send(key, conn, handshake, now);
        let leftover = match &mut conn.state {
            State::Http(http) => std::mem::take(&mut http.buf),
            _ => Vec::new(),
        };
        let config = self.config();
        let heartbeat = config.heartbeat_interval();
        let mut ws = Box::new(WsConn {
            codec: Codec::new(config.max_message_bytes, deflate.is_some()),
            deflate,
            echo,
            batch: request.query_param("batch").is_some_and(|b| b == "1" || b == "true"),
            batch_pending: Default::default(),
            client_id: super::members::client_id(conn.id),
            subs: Default::default(),
            next_key: 1,
            sent: 0,
            last_heard: now,
            next_ping: now + heartbeat,
            bucket: TokenBucket::new(config.rate_per_second, config.rate_burst, now),
            resume_read_at: None,
            stats: None,
            auth_deadline: grant.is_none().then(|| now + Duration::from_millis(config.auth_timeout_ms)),
            grant: if echo { Some(Grant::everything()) } else { grant },
            backend_calls: 0,
            backend_bytes: 0,
            connecting,
            held: Vec::new(),
            expire_at: None,
        });
        if !echo && !refuse && !connecting {
            conn.out.push_bytes(connected_ack(&mut ws, config, self.shared.wall(now)));
        }
        self.directory.add_client(conn.id, key);
        self.directory.set_user(key, None, ws.grant.as_ref().and_then(|g| g.sub.as_deref()));
        conn.state = State::WebSocket(ws);
        self.gauge(Some(Transport::Http), Some(Transport::WebSocket), 0);
        if refuse {
            conn.begin_close(Some(Close::Unauthorized), LINGER, now);
            return Routed::Halt;
        }
        if connecting {
            return self.ask_connect_proxy(key, conn, request, leftover, now);
        }
        if !leftover.is_empty() {
            self.on_ws_bytes(key, conn, &leftover, now);
        }
        Routed::Halt
    }

    /// A history document `{"events":[...],"recovered":bool}`, built from shared bytes.
    pub(super) fn history(&self, query: &HistoryQuery, now: Instant) -> String {
        let filter = Filter::new(query.topics.clone(), query.sources.clone(), query.correlation_id.clone());
        let bus = &self.shared.bus;
        // A sharded engine's shards this node does not read are not in its history: a
        // query from a position over them cannot be answered whole.
        let unread = query.since.is_some() && self.shards_to_load(&filter.patterns).is_some();
        let replayed = match query.since.as_deref() {
            Some(since) if !unread => bus.replay(since, query.limit, now, self.shared.wall(now), |e| filter.accepts(e)),
            _ => Err(NotRecoverable),
        };
        let (events, recovered) = match replayed {
            Ok(events) => (events, true),
            Err(NotRecoverable) => (bus.newest(query.limit, now, |e| filter.accepts(e)), query.since.is_none()),
        };
        let mut out = String::from("{\"events\":[");
        for (i, event) in events.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(std::str::from_utf8(event.json()).unwrap_or("null"));
        }
        out.push_str("],\"recovered\":");
        out.push_str(if recovered { "true" } else { "false" });
        out.push('}');
        out
    }

    /// The history/SSE query of `request`, its topics checked against (or, when none,
    /// taken from) what the request's token may read.
    pub(super) fn authorized_query(&self, request: &Request) -> Result<(HistoryQuery, Grant), Response> {
        let grant = self.shared.auth.verify(request.token().as_deref()).map_err(|e| unauthorized(&e))?;
        Ok((query_allowed(request, &grant)?, grant))
    }

    /// `GET /presence?topic=` and `/presence/stats?topic=`; with auth on, the token must
    /// allow subscribing to the topic.
    fn http_presence(&self, request: &Request, stats: bool) -> Response {
        let grant = match self.shared.auth.verify(request.token().as_deref()) {
            Ok(grant) => grant,
            Err(error) => return unauthorized(&error),
        };
        let Some(topic) = request.query_param("topic").filter(|t| !t.is_empty()) else {
            return Response::error(&HttpError::new(ErrorCode::BadRequest, "topic is required").at("topic"));
        };
        match self.presence_answer(&topic, stats, |p| grant.may_subscribe(p)) {
            Ok(answer) => Response::with_body(200, "application/json", answer.into_bytes()),
            Err(rejection) => Response::error(&http_error_of(&rejection)),
        }
    }

    /// `GET /stats/stream`: `/stats` as an SSE `event: stats` every second.
    fn start_stats_stream(&mut self, key: usize, conn: &mut Conn, request: &Request, now: Instant) -> Routed {
        let streams = &self.shared.stats_streams;
        if streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < super::MAX_STATS_STREAMS).then_some(n + 1))
            .is_err()
        {
            let error = HttpError::new(ErrorCode::TooManyConnections, "too many stats streams open");
            return self.respond(key, conn, request, Response::error(&error).header("Retry-After", "5"), now);
        }
        let head = sse::stream_head(self.allow_origin(request), self.config().reconnect_delay_ms, true);
        self.send(key, conn, head, now);
        conn.state = State::Sse(Box::new(SseConn {
            filter: Filter::new(Vec::new(), Vec::new(), None),
            presence: false,
            stats: Some(Box::default()),
            after: crate::event::After::START,
            next_ping: now + super::STATS_PUSH_EVERY,
            user: None,
        }));
        self.gauge(Some(Transport::Http), Some(Transport::Sse), 0);
        // Refused (too many reads in flight): the first push comes a second later.
        let _ = self.gather_stats(key, conn, StatsFormat::SsePush);
        Routed::Halt
    }

    /// `GET /sse`: a stream for the request's token, or, when the connect proxy decides
    /// (see [`Ctx::connect_proxy_decides`]), once it has answered (`None`: waiting).
    pub(super) fn start_sse(&mut self, key: usize, conn: &mut Conn, request: &Request, now: Instant) -> Option<Routed> {
        let verified = self.shared.auth.verify(request.token().as_deref());
        if self.connect_proxy_decides(verified.is_ok()) {
            let body = self.connect_body(conn, request, "sse");
            return match self.call_backend(key, conn, Proxy::Connect, &body, BackendCall::ConnectSse) {
                Ok(()) => None,
                Err(rejection) => {
                    Some(self.respond(key, conn, request, Response::error(&http_error_of(&rejection)), now))
                }
            };
        }
        let grant = match verified {
            Ok(grant) => grant,
            Err(error) => return Some(self.respond(key, conn, request, unauthorized(&error), now)),
        };
        Some(self.start_sse_granted(key, conn, request, grant, None, now))
    }

    /// Starts an SSE stream for what `grant` allows. `shards_ready`: `None` the first
    /// time (a resume over engine shards not loaded here waits for them), then whether
    /// they loaded.
    pub(super) fn start_sse_granted(
        &mut self,
        key: usize,
        conn: &mut Conn,
        request: &Request,
        grant: Grant,
        shards_ready: Option<bool>,
        now: Instant,
    ) -> Routed {
        let query = match query_allowed(request, &grant) {
            Ok(query) => query,
            Err(response) => return self.respond(key, conn, request, response, now),
        };
        let filter = Filter::new(query.topics, query.sources, query.correlation_id);
        let since = sse::resume_from(request.last_event_id.as_deref(), query.since.as_deref());
        if since.is_some()
            && shards_ready.is_none()
            && let Some(shards) = self.resume_waits_for(&filter.patterns, since.as_deref())
        {
            let waiting = super::session::Waiting::Sse { grant, since: since.clone() };
            return match self.park(key, conn.id, filter.patterns, shards, waiting, now) {
                Ok(()) => {
                    if let State::Http(http) = &mut conn.state {
                        http.waiting = Some(Box::new(request.clone()));
                        http.deadline = now + Duration::from_millis(self.config().http_request_timeout_ms);
                    }
                    Routed::Halt
                }
                Err(rejection) => self.respond(key, conn, request, Response::error(&http_error_of(&rejection)), now),
            };
        }
        let (recovered, after, replay) = match shards_ready {
            Some(false) => (false, crate::event::After::START, None),
            _ => self.resume(since.as_deref(), &filter.patterns, now),
        };
        let head = sse::stream_head(self.allow_origin(request), self.config().reconnect_delay_ms, recovered);
        self.send(key, conn, head, now);
        for pattern in &filter.patterns {
            self.index_pattern(pattern, SubRef { conn: key, sub: SSE_SUB }, now);
        }
        let user = grant.sub.as_deref();
        let info = grant.info.as_deref().filter(|i| i.get().len() <= self.config().presence_info_max_bytes);
        self.join_presence(
            &Joiner { conn_id: conn.id, user, info, transport: crate::presence::Transport::Sse },
            &filter.patterns,
            now,
        );
        let presence = request.query_param("presence").is_some_and(|p| p == "1" || p == "true");
        self.directory.add_client(conn.id, key);
        self.directory.set_user(key, None, user);
        conn.state = State::Sse(Box::new(SseConn {
            filter,
            presence,
            stats: None,
            after,
            next_ping: now + self.config().heartbeat_interval(),
            user: grant.sub.map(Into::into),
        }));
        self.gauge(Some(Transport::Http), Some(Transport::Sse), 1);
        if let State::Sse(sse) = &conn.state {
            let filter = sse.filter.clone();
            self.replay_into(conn, SSE_SUB, replay, filter);
        }
        Routed::Halt
    }
}

/// The dashboard (`static/dashboard.html`): one page, no external resources.
const DASHBOARD_HTML: &str = include_str!("../../static/dashboard.html");

/// The browser client (`static/volley.js`), served as it is in the repository.
const VOLLEY_JS: &str = include_str!("../../static/volley.js");

/// The framed connect `ack` that opens the WebSocket protocol (docs/protocol.md).
pub(super) fn connected_ack(ws: &mut WsConn, config: &Config, wall: SystemTime) -> Vec<u8> {
    let payload = json!({
        "status": "connected",
        "client_id": ws.client_id,
        "heartbeat_interval_ms": config.heartbeat_interval_ms,
        "reconnect_delay_ms": config.reconnect_delay_ms,
        "max_message_bytes": config.max_message_bytes,
    });
    let id = ws.next_message_id();
    let text = protocol::server_message("ack", &id, wall, None, &payload.to_string());
    let mut out = Vec::new();
    ws.codec.send_text(text, &mut out);
    out
}

/// `401` for a refused token.
pub(super) fn unauthorized(error: &AuthError) -> Response {
    Response::error(&HttpError::new(ErrorCode::Unauthorized, error.to_string())).header("WWW-Authenticate", "Bearer")
}

/// The history/SSE query of `request`, its topics checked against (or, when none, taken
/// from) what `grant` may read.
pub(super) fn query_allowed(request: &Request, grant: &Grant) -> Result<HistoryQuery, Response> {
    let mut query = history_query_from(request).map_err(|r| Response::error(&http_error_of(&r)))?;
    query.topics = readable_patterns(grant, query.topics).map_err(|r| Response::error(&http_error_of(&r)))?;
    Ok(query)
}

/// Reads `topics`, `sources`, `correlation_id`, `since`, `limit` from a query string.
pub(super) fn history_query_from(request: &Request) -> Result<HistoryQuery, Rejection> {
    let list = |name: &str| -> Vec<String> {
        request
            .query_param(name)
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default()
    };
    let limit = request.query_param("limit").map(serde_json::Value::String);
    let query = HistoryQuery {
        topics: protocol::parse_patterns(&list("topics"))?,
        sources: list("sources"),
        correlation_id: request.query_param("correlation_id").filter(|c| !c.is_empty()),
        since: request.query_param("since").filter(|s| !s.is_empty()),
        limit: protocol::parse_limit(limit.as_ref())?,
    };
    let ids = [
        ("correlation_id", query.correlation_id.as_deref()),
        ("since", query.since.as_deref()),
        ("Last-Event-ID", request.last_event_id.as_deref()),
    ];
    protocol::check_ids(&query.sources, ids)?;
    Ok(query)
}

/// The answer to an HTTP publish; `count` events were asked for (names the field of a
/// too-large event).
pub(super) fn published_response(result: Result<Vec<Box<str>>, PublishError>, count: usize) -> Response {
    let error = match result {
        Ok(ids) => return Response::json(200, &json!({"message_ids": ids})),
        Err(error) => error,
    };
    let http_error = match error {
        PublishError::TooLarge(i) => HttpError::new(ErrorCode::TooLarge, error.to_string()).at(if count > 1 {
            format!("[{i}]")
        } else {
            "data".into()
        }),
        PublishError::Overloaded => HttpError::new(ErrorCode::Overloaded, error.to_string()),
        PublishError::EngineUnavailable => HttpError::new(ErrorCode::EngineUnavailable, error.to_string()),
        PublishError::AcrossShards => HttpError::new(ErrorCode::BadRequest, error.to_string()),
    };
    let response = Response::error(&http_error);
    if http_error.status == 503 { response.header("Retry-After", "1") } else { response }
}

/// The answer to a stats read that cannot be made now.
pub(super) fn stats_overloaded() -> Rejection {
    Rejection::new(ErrorCode::Overloaded, "too many stats reads in flight; try again")
}

/// The HTTP form of a protocol rejection.
pub(super) fn http_error_of(rejection: &Rejection) -> HttpError {
    let error = HttpError::new(rejection.code, rejection.message.clone());
    match &rejection.field {
        Some(field) => error.at(field.clone()),
        None => error,
    }
}
