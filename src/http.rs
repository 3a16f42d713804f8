//! HTTP/1.1 request heads and responses.
//!
//! Owns parsing of a request head from buffered bytes with httparse (an incomplete head
//! is [`Parsed::Partial`], not an error), the head-size limit, query strings, and the
//! byte layout of responses and of docs/protocol.md's JSON error body. Pure: it does not read
//! sockets, route requests or know the bus.

use serde_json::json;

use crate::protocol::ErrorCode;

/// Largest request head (docs/protocol.md: over it, `431`).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A parsed request head, owning the fields volley uses.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// Raw query string (after `?`), may be empty.
    pub query: String,
    /// HTTP/1.0 is 0, HTTP/1.1 is 1.
    pub minor_version: u8,
    /// `Content-Length`, if sent.
    pub content_length: Option<usize>,
    /// `Transfer-Encoding` was sent (volley answers `411`).
    pub chunked: bool,
    /// The client asked to close after this request (or HTTP/1.0 without keep-alive).
    pub close: bool,
    /// `Upgrade: websocket` and `Connection: upgrade`.
    pub websocket_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub websocket_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub websocket_version: Option<String>,
    /// Every `Sec-WebSocket-Extensions` value, in order.
    pub websocket_extensions: Vec<String>,
    /// `Origin`.
    pub origin: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `Last-Event-ID`.
    pub last_event_id: Option<String>,
    /// `Expect: 100-continue` (curl sends it for bodies over 1 KiB).
    pub expect_continue: bool,
    /// `Cookie`, `User-Agent` and `X-Forwarded-For`, for the connect proxy.
    pub for_backend: Vec<(&'static str, String)>,
}

/// The outcome of trying to parse a head from the start of a buffer.
#[derive(Debug)]
pub enum Parsed {
    /// More bytes are needed.
    Partial,
    /// A whole head, and how many bytes it took.
    Complete(Box<Request>, usize),
    /// Not HTTP, or over a limit.
    Invalid(HttpError),
}

/// A request that cannot be served, with its status and error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// HTTP status: the code's own, unless a caller picked a sibling.
    pub status: u16,
    /// docs/protocol.md error code.
    pub code: ErrorCode,
    /// For humans.
    pub message: String,
    /// The field at fault, if one.
    pub field: Option<String>,
}

impl HttpError {
    /// An error without a field, answered with the code's status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        let code = code.for_http();
        Self { status: code.http_status(), code, message: message.into(), field: None }
    }

    /// The same error answered with `status` instead (411, 426, 429 siblings).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// The same error naming `field`.
    pub fn at(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The JSON body `{"error":{...}}`.
    pub fn body(&self) -> Vec<u8> {
        json!({"error": {"code": self.code.as_str(), "message": self.message, "field": self.field}})
            .to_string()
            .into_bytes()
    }
}

/// Parses a request head at the start of `buf`.
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_HEAD_BYTES {
                Parsed::Invalid(HttpError::new(ErrorCode::HeadTooLarge, "request head over 16 KiB"))
            } else {
                Parsed::Partial
            };
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Invalid(HttpError::new(ErrorCode::HeadTooLarge, "too many headers"));
        }
        Err(e) => return Parsed::Invalid(HttpError::new(ErrorCode::BadRequest, format!("malformed request: {e}"))),
    };
    if consumed > MAX_HEAD_BYTES {
        return Parsed::Invalid(HttpError::new(ErrorCode::HeadTooLarge, "request head over 16 KiB"));
    }
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version) else {
        return Parsed::Invalid(HttpError::new(ErrorCode::BadRequest, "incomplete request line"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut out = Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        minor_version,
        close: minor_version == 0,
        ..Request::default()
    };
    let mut upgrade = false;
    let mut connection_upgrade = false;
    for header in req.headers.iter() {
        let Ok(value) = std::str::from_utf8(header.value) else {
            return Parsed::Invalid(HttpError::new(
                ErrorCode::BadRequest,
                format!("header {} is not UTF-8", header.name),
            ));
        };
        let value = value.trim();
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<usize>() {
                Ok(n) if out.content_length.is_none_or(|prev| prev == n) => out.content_length = Some(n),
                _ => return Parsed::Invalid(HttpError::new(ErrorCode::BadRequest, "invalid Content-Length")),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    out.close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    out.close = false;
                } else if token.eq_ignore_ascii_case("upgrade") {
                    connection_upgrade = true;
                }
            }
        } else if name.eq_ignore_ascii_case("upgrade") {
            upgrade = value.split(',').any(|v| v.trim().eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.websocket_key = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.websocket_version = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            out.websocket_extensions.push(value.to_string());
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("authorization") {
            out.authorization = Some(value.to_string());
        } else if name.eq_ignore_ascii_case("expect") {
            out.expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if let Some(kept) =
            ["Cookie", "User-Agent", "X-Forwarded-For"].into_iter().find(|kept| name.eq_ignore_ascii_case(kept))
        {
            out.for_backend.push((kept, value.to_string()));
        } else if name.eq_ignore_ascii_case("last-event-id") {
            out.last_event_id = Some(value.to_string());
        }
    }
    out.websocket_upgrade = upgrade && connection_upgrade;
    Parsed::Complete(Box::new(out), consumed)
}

impl Request {
    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_pairs(&self.query).find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The bearer token from `Authorization`, or `token=` in the query.
    pub fn token(&self) -> Option<String> {
        self.authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Bearer ").or_else(|| a.strip_prefix("bearer ")))
            .map(|t| t.trim().to_string())
            .or_else(|| self.query_param("token"))
    }
}

/// Decoded `key=value` pairs of a query string (`application/x-www-form-urlencoded`:
/// `+` is a space, percent escapes are decoded, invalid UTF-8 is replaced).
pub fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    form_urlencoded::parse(query.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned()))
}

/// The reason phrase of `status`, from the `http` crate's table.
fn reason(status: u16) -> &'static str {
    ::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Unknown")
}

/// A response being built: status, extra headers, body.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    content_type: &'static str,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self { status, headers: Vec::new(), body: body.to_string().into_bytes(), content_type: "application/json" }
    }

    /// A response with a body of the given type.
    pub fn with_body(status: u16, content_type: &'static str, body: Vec<u8>) -> Self {
        Self { status, headers: Vec::new(), body, content_type }
    }

    /// A docs/protocol.md error response.
    pub fn error(error: &HttpError) -> Self {
        Self { status: error.status, headers: Vec::new(), body: error.body(), content_type: "application/json" }
    }

    /// Adds a header.
    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The bytes on the wire; `close` adds `Connection: close`.
    pub fn encode(&self, close: bool) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity(160 + self.body.len());
        let _ = write!(out, "HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        if self.status != 204 {
            let _ = write!(out, "Content-Type: {}\r\nContent-Length: {}\r\n", self.content_type, self.body.len());
        }
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&self.body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_volley_sends_has_its_reason_phrase() {
        for (status, phrase) in [(504, "Gateway Timeout"), (503, "Service Unavailable"), (413, "Payload Too Large")] {
            let head = Response::with_body(status, "text/plain", Vec::new()).encode(true);
            let head = String::from_utf8(head).unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} {phrase}\r\n")), "{head}");
        }
    }

    #[test]
    fn partial_then_complete() {
        let head =
            b"GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\nrest";
        for cut in 0..head.len() - 4 {
            assert!(matches!(parse_head(&head[..cut]), Parsed::Partial), "cut {cut}");
        }
        let Parsed::Complete(req, n) = parse_head(head) else { panic!() };
        assert_eq!(n, head.len() - 4);
        assert_eq!((req.path.as_str(), req.query.as_str()), ("/ws", "x=1"));
        assert!(req.websocket_upgrade && !req.close);
    }

    #[test]
    fn limits_and_garbage() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert!(matches!(parse_head(&big), Parsed::Invalid(HttpError { status: 431, .. })));
        assert!(matches!(parse_head(b"\x00\x01\x02garbage\r\n\r\n"), Parsed::Invalid(HttpError { status: 400, .. })));
        let dup = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(matches!(parse_head(dup), Parsed::Invalid(HttpError { status: 400, .. })));
    }

    #[test]
    fn query_decoding() {
        let pairs: Vec<_> = query_pairs("topics=a.*%2Cb.%3E&x=%zz&y=a+b&z=%").collect();
        assert_eq!(pairs[0], ("topics".into(), "a.*,b.>".into()));
        assert_eq!(pairs[1].1, "%zz");
        assert_eq!(pairs[2].1, "a b");
        assert_eq!(pairs[3].1, "%");
    }
}
