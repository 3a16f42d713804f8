//! End to end in headless Chromium: a page on another origin receives published events
//! over WebSocket and EventSource, and publishes itself through a CORS preflight.

mod common;

use std::time::Duration;

use common::chromium::*;
use common::*;
use serde_json::{Value, json};

/// Opens the page in headless Chromium against `broker_addr` (wss/https with `secure`),
/// publishes, and checks what the page received over WebSocket and EventSource.
fn page_receives_events(broker: &Broker, broker_addr: &str, secure: bool, chromium_args: &[String]) {
    let page = include_str!("browser/page.html").replace("BROKER", broker_addr).replace("SECURE", &secure.to_string());
    let (page_port, results) = page_server(page);
    let _browser = launch(&format!("http://127.0.0.1:{page_port}/"), chromium_args);

    let wait = Duration::from_secs(60);
    let (path, ready) = results.recv_timeout(wait).expect("the page subscribed on both transports");
    assert_eq!(path, "/ready", "page reported {ready}");
    let from_page = ready["published"][0].as_str().expect("cross-origin publish answered").to_string();
    let mut ids = vec![from_page];
    // The second event is large enough to go compressed to a client that agreed to deflate.
    let large: Vec<Value> = (0..40).map(|i| json!({"line": i, "sku": format!("SKU-{i:05}"), "qty": i % 7})).collect();
    ids.extend(publish(broker, &json!([{"topic": "browser.a", "data": 1}, {"topic": "browser.b", "data": large}])));
    let (path, got) = results.recv_timeout(wait).expect("the page received the events");
    assert_eq!(path, "/result", "page reported {got}");
    let as_ids =
        |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect() };
    assert_eq!(as_ids(&got["ws"]), ids, "over WebSocket");
    assert_eq!(as_ids(&got["sse"]), ids, "over EventSource");
    assert!(got["extensions"].as_str().is_some_and(|e| e.starts_with("permessage-deflate")), "negotiated: {got}");
    let (_, _, stats) = http(broker, "GET", "/stats", "");
    assert!(
        stats["events"]["compressed_deliveries"].as_u64().is_some_and(|n| n >= 1),
        "the browser (the only client that offered deflate) received a compressed event: {stats}"
    );
}

#[test]
fn a_browser_on_another_origin_receives_events_over_websocket_and_sse() {
    let broker = Broker::start();
    page_receives_events(&broker, &broker.addr.to_string(), false, &[]);
}

#[test]
fn a_browser_uses_wss_and_https_with_the_brokers_certificate() {
    let pki = volley::bench::Pki::new("chromium").unwrap();
    let broker = Broker::with(|c| {
        c.tls_cert = pki.cert.display().to_string();
        c.tls_key = pki.key.display().to_string();
        c.listen_tls = "127.0.0.1:0".into();
    });
    // Chromium trusts the test leaf by the hash of its public key, as a pinned self-signed
    // certificate would be trusted in development.
    use base64::Engine as _;
    let spki = ring::digest::digest(&ring::digest::SHA256, &pki.leaf_spki);
    let pin = base64::engine::general_purpose::STANDARD.encode(spki.as_ref());
    let tls_addr = broker.tls_addr.expect("listen_tls bound");
    page_receives_events(
        &broker,
        &format!("localhost:{}", tls_addr.port()),
        true,
        &[format!("--ignore-certificate-errors-spki-list={pin}")],
    );
}

#[test]
fn the_dashboard_loads_and_its_figures_follow_publishes() {
    let broker = Broker::start();
    let page = include_str!("browser/dashboard.html").replace("BROKER", &broker.addr.to_string());
    let (page_port, results) = page_server(page);
    let _browser = launch(&format!("http://127.0.0.1:{page_port}/"), &[]);
    let wait = Duration::from_secs(60);
    let (path, ready) = results.recv_timeout(wait).expect("the dashboard went live");
    assert_eq!(path, "/ready", "{ready}");
    assert_eq!((ready["published"].as_u64(), ready["shards"].as_u64()), (Some(0), Some(2)), "{ready}");
    for n in 0..5 {
        publish(&broker, &json!({"topic": "dash", "data": n}));
    }
    let (path, after) = results.recv_timeout(wait).expect("the dashboard's figures changed");
    assert_eq!(path, "/result", "{after}");
    assert_eq!(after["published"], 5, "the stream pushed the new counters: {after}");
    assert_ne!(after["publishes"], "0", "publishes per second moved: {after}");
}
