//! The shortest path through the broker: subscribe over WebSocket, publish over HTTP.

mod common;

use common::*;
use serde_json::json;

#[test]
fn publish_reaches_a_websocket_subscriber() {
    let broker = Broker::start();
    let (mut ws, ack) = ws_connect(&broker, "/ws");
    assert_eq!(ack["payload"]["status"], "connected");
    let sub = subscribe(&mut ws, json!({"topics": ["chat.*"]}));
    assert_eq!(sub["recovered"], true);
    let ids = publish(&broker, &json!({"topic": "chat.room1", "data": {"hello": 1}}));
    let event = recv_json(&mut ws);
    assert_eq!(event["type"], "event");
    assert_eq!(event["message_id"], ids[0].as_str());
    assert_eq!(event["payload"]["data"]["hello"], 1);
}
