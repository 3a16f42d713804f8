//! Server-Sent Events on the wire: the stream's head, an event's framing, heartbeats and
//! where a reconnecting stream resumes.
//!
//! Owns the bytes of the SSE format docs/protocol.md fixes (headers, `retry:`, `id:`/`data:`
//! with no `event:` line so `onmessage` fires, `: ping`, `event: recovery_failed`, and
//! named events without ids such as `event: presence`) and the
//! rule that `Last-Event-ID` wins over `since=`. It does not decide what a stream receives
//! (the shard's index and filters do) and never touches sockets.

/// A heartbeat comment.
pub const PING: &[u8] = b": ping\n\n";

/// What ends an event after its JSON.
pub const EVENT_END: &[u8] = b"\n\n";

/// The head of an event, before its JSON: built once per event by the bus.
pub fn event_head(id: &str) -> Vec<u8> {
    format!("id: {id}\ndata: ").into_bytes()
}

/// An event with a name and no id (not resumable): `event: <name>`, then `data: <json>`.
/// Its `data` is one line: `json` is serialized JSON, which has no raw newlines.
pub fn named_event(name: &str, json: &str) -> Vec<u8> {
    format!("event: {name}\ndata: {json}\n\n").into_bytes()
}

/// Where a reconnecting stream resumes: the `Last-Event-ID` header wins over `since=`.
pub fn resume_from(last_event_id: Option<&str>, since: Option<&str>) -> Option<String> {
    last_event_id.or(since).filter(|id| !id.is_empty()).map(str::to_string)
}

/// The response head and first lines of a stream. `allow_origin` is the CORS answer, if
/// any; without `recovered`, the client is told its position could not be resumed.
pub fn stream_head(allow_origin: Option<&str>, reconnect_delay_ms: u64, recovered: bool) -> Vec<u8> {
    let mut head = String::from(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: keep-alive\r\nX-Accel-Buffering: no\r\n",
    );
    if let Some(origin) = allow_origin {
        head.push_str(&format!("Access-Control-Allow-Origin: {origin}\r\nVary: Origin\r\n"));
    }
    head.push_str(&format!("\r\nretry: {reconnect_delay_ms}\n\n"));
    if !recovered {
        head.push_str("event: recovery_failed\ndata: {}\n\n");
    }
    head.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_wins_and_empty_means_none() {
        assert_eq!(resume_from(Some("a"), Some("b")).as_deref(), Some("a"));
        assert_eq!(resume_from(None, Some("b")).as_deref(), Some("b"));
        assert_eq!(resume_from(Some(""), None), None);
    }

    #[test]
    fn head_lines() {
        let head = String::from_utf8(stream_head(Some("*"), 1000, false)).unwrap();
        assert!(head.ends_with("\r\n\r\nretry: 1000\n\nevent: recovery_failed\ndata: {}\n\n"));
        assert!(head.contains("Access-Control-Allow-Origin: *\r\n"));
    }
}
