//! The peer baseline: the broker a competent Rust developer would write instead of volley.
//! tokio + tokio-tungstenite, a per-topic registry of per-connection channels, each event
//! encoded once and shared (`Utf8Bytes` is reference-counted). It speaks the subset of the
//! volley protocol that `volley bench` uses: `GET /ws` with the connect ack, `subscribe`
//! to exact topics, `request`/`publish`, and event messages in the volley format.
//! Usage: volley-peer 127.0.0.1:9000

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Registry = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::UnboundedSender<Message>)>>>>;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".into());
    // The same accept backlog as volley's listeners: the benchmark opens thousands of
    // connections at once, and a short backlog would drop SYNs and shrink the run.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(addr.parse().expect("listen address")).expect("bind");
    let listener = socket.listen(4096).expect("listen");
    let registry: Registry = Arc::default();
    let next_id = Arc::new(AtomicU64::new(1));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, registry.clone(), next_id.clone()));
    }
}

fn timestamp() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

async fn serve(stream: TcpStream, registry: Registry, next_id: Arc<AtomicU64>) {
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else { return };
    let conn_id = next_id.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.feed(message).await.is_err() {
                return;
            }
            // Batch whatever else is ready into one flush.
            while let Ok(message) = rx.try_recv() {
                if sink.feed(message).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let ack = json!({"type": "ack", "payload": {"status": "connected", "client_id": conn_id.to_string()}});
    let _ = tx.send(Message::text(ack.to_string()));
    let mut topics: Vec<String> = Vec::new();
    while let Some(Ok(message)) = source.next().await {
        let Message::Text(text) = message else { continue };
        let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else { continue };
        let correlation = v["message_id"].clone();
        match v["type"].as_str() {
            Some("subscribe") => {
                let wanted: Vec<String> = v["payload"]["topics"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|t| t.as_str().map(String::from)).collect())
                    .unwrap_or_default();
                {
                    let mut registry = registry.lock().unwrap();
                    for topic in &wanted {
                        registry.entry(topic.clone()).or_default().push((conn_id, tx.clone()));
                    }
                }
                topics.extend(wanted);
                let reply = json!({"type": "ack", "correlation_id": correlation, "payload": {"status": "subscribed", "recovered": true}});
                let _ = tx.send(Message::text(reply.to_string()));
            }
            Some("request") if v["payload"]["action"] == "publish" => {
                let topic = v["payload"]["topic"].as_str().unwrap_or_default().to_string();
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                let event = json!({
                    "type": "event", "message_id": id.to_string(), "timestamp": timestamp(),
                    "correlation_id": null,
                    "payload": {"topic": topic, "source": v["payload"]["source"], "data": v["payload"]["data"]},
                });
                // Encoded once; every receiver's message shares the bytes.
                let shared = Message::Text(Utf8Bytes::from(event.to_string()));
                let receivers: Vec<_> = registry
                    .lock()
                    .unwrap()
                    .get(&topic)
                    .map(|subs| subs.iter().map(|(_, s)| s.clone()).collect())
                    .unwrap_or_default();
                for receiver in receivers {
                    let _ = receiver.send(shared.clone());
                }
                let reply = json!({"type": "response", "correlation_id": correlation, "payload": {"message_id": id.to_string()}});
                let _ = tx.send(Message::text(reply.to_string()));
            }
            _ => {}
        }
    }
    {
        let mut registry = registry.lock().unwrap();
        for topic in &topics {
            if let Some(subs) = registry.get_mut(topic) {
                subs.retain(|(id, _)| *id != conn_id);
            }
        }
    }
    writer.abort();
}
