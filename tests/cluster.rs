//! Several volley processes sharing one ordered log through a real redis-server.
//! `./scripts/test` installs redis-server when it is missing.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::processes::*;
use serde_json::{Value, json};
use tungstenite::Message;

struct Node {
    port: u16,
    process: Proc,
}

fn node(redis: &RedisServer) -> Node {
    node_with(redis, &[])
}

/// A node with extra `VOLLEY_*` settings.
fn node_with(redis: &RedisServer, settings: &[(&str, &str)]) -> Node {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--engine", &redis.url()])
        .env("VOLLEY_LOG_LEVEL", "warn")
        .envs(settings.iter().copied())
        .spawn()
        .unwrap();
    let node = Node { port, process: Proc(child) };
    wait_for_port(port, "volley");
    wait_engine_up(port);
    node
}

/// Publishes `events`; the acknowledged ids, or None when refused.
fn publish(port: u16, events: &Value) -> Option<Vec<String>> {
    let (status, body) = request(port, "POST", "/publish", &events.to_string())?;
    if status != 200 {
        return None;
    }
    let body: Value = serde_json::from_str(&body).ok()?;
    Some(body["message_ids"].as_array()?.iter().map(|v| v.as_str().unwrap().to_string()).collect())
}

fn subscriber(port: u16, since: Option<&str>) -> Ws {
    let (mut ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}/ws")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    assert!(ws.read().unwrap().to_text().unwrap().contains("connected"));
    let subscribe = json!({"type": "subscribe", "payload": {"topics": ["k.*"], "since": since}});
    ws.send(Message::text(subscribe.to_string())).unwrap();
    let ack: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(ack["payload"]["status"], "subscribed", "{ack}");
    if since.is_some() {
        assert_eq!(ack["payload"]["recovered"], true, "{ack}");
    }
    ws
}

/// The next event id, or None when the connection ended.
fn next_id(ws: &mut Ws) -> Option<String> {
    loop {
        match ws.read().ok()? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "event" {
                    return Some(v["message_id"].as_str().unwrap().to_string());
                }
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

fn key(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

#[test]
fn an_event_published_on_one_node_reaches_the_others_in_one_order() {
    let redis = RedisServer::start();
    let nodes: Vec<Node> = (0..3).map(|_| node(&redis)).collect();
    let mut on_two = subscriber(nodes[1].port, None);
    let mut on_three = subscriber(nodes[2].port, None);
    let mut ids = Vec::new();
    for batch in 0..10 {
        // Publishes alternate between nodes 1 and 3: one cluster-wide order regardless.
        let port = nodes[if batch % 2 == 0 { 0 } else { 2 }].port;
        let events: Vec<Value> = (0..30).map(|i| json!({"topic": "k.x", "data": batch * 30 + i})).collect();
        ids.extend(publish(port, &Value::from(events)).expect("publish accepted"));
    }
    let got_two: Vec<String> = (0..ids.len()).map(|_| next_id(&mut on_two).unwrap()).collect();
    let got_three: Vec<String> = (0..ids.len()).map(|_| next_id(&mut on_three).unwrap()).collect();
    assert_eq!(got_two, ids);
    assert_eq!(got_three, ids);
    drop(nodes);
}

#[test]
fn clients_of_a_killed_node_resume_on_another_without_gap_or_duplicate() {
    let redis = RedisServer::start();
    let one = node(&redis);
    let mut two = node(&redis);
    let three = node(&redis);
    let published = Arc::new(Mutex::new(Vec::<String>::new()));
    let publisher = {
        let published = published.clone();
        let port = one.port;
        std::thread::spawn(move || {
            for batch in 0..100 {
                let events: Vec<Value> = (0..20).map(|i| json!({"topic": "k.y", "data": batch * 20 + i})).collect();
                let ids = publish(port, &Value::from(events)).expect("publish accepted");
                published.lock().unwrap().extend(ids);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut received = Vec::new();
    let mut ws = subscriber(two.port, None);
    while received.len() < 500 {
        received.push(next_id(&mut ws).expect("events before the kill"));
    }
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(two.process.0.id() as i32, libc::SIGKILL) };
    let _ = two.process.0.wait();
    while let Some(id) = next_id(&mut ws) {
        received.push(id); // whatever was already in flight
    }
    let last = received.last().unwrap().clone();
    let mut ws = subscriber(three.port, Some(&last));
    publisher.join().unwrap();
    let total = published.lock().unwrap().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.len() < total {
        assert!(Instant::now() < deadline, "only {} of {total}", received.len());
        received.push(next_id(&mut ws).expect("events after resuming"));
    }
    assert_eq!(received, *published.lock().unwrap(), "every event exactly once, in order");
}

#[test]
fn redis_restart_loses_no_acknowledged_publish() {
    let mut redis = RedisServer::start();
    let one = node(&redis);
    let two = node(&redis);
    let mut ws = subscriber(two.port, None);
    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for i in 0..600 {
        if i == 200 {
            redis.kill();
        }
        if i == 260 {
            redis.spawn();
        }
        match publish(one.port, &json!({"topic": "k.z", "data": i})) {
            Some(ids) => acknowledged.extend(ids),
            None => {
                refused += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    assert!(refused > 0, "the outage was noticed (publishes refused while Redis was down)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(two.port, "/health").contains("\"up\"") {
        assert!(Instant::now() < deadline, "engine back up: {}", get(two.port, "/health"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !acknowledged.iter().all(|id| received.contains(id)) {
        assert!(Instant::now() < deadline, "missing acknowledged events");
        received.push(next_id(&mut ws).expect("events keep coming after the restart"));
    }
    assert!(received.windows(2).all(|w| key(&w[0]) < key(&w[1])), "in order, no duplicates");
    let metrics = get(two.port, "/metrics");
    assert!(metrics.contains("volley_engine_reconnects_total"), "{metrics}");
}

/// CPU seconds a process has used, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: f64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<f64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Finding 3 of the hostile-load review: a request still waiting when its deadline passed
/// kept that deadline, so its shard spun at 100 % CPU for good and never answered again.
#[test]
fn a_publish_waiting_on_a_paused_redis_gets_504_and_no_shard_spins() {
    let redis = RedisServer::start();
    let node =
        node_with(&redis, &[("VOLLEY_HTTP_REQUEST_TIMEOUT_MS", "1000"), ("VOLLEY_HTTP_IDLE_TIMEOUT_MS", "1000")]);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let paused_at = Instant::now();
    redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("ALL").query::<()>(&mut con).unwrap();
    let (status, body) = request(node.port, "POST", "/publish?wait=1", &json!({"topic": "p.x", "data": 1}).to_string())
        .expect("answered");
    assert_eq!(status, 504, "{body}");
    assert!(paused_at.elapsed() < Duration::from_millis(2_500), "answered at its deadline, not Redis's");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], "timeout", "{body}");

    // Redis comes back; every shard answers (SO_REUSEPORT spreads new connections).
    while paused_at.elapsed() < Duration::from_millis(3_200) {
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        let (status, _) = request(node.port, "GET", "/health", "").expect("every shard answers");
        assert_eq!(status, 200);
    }
    let pid = node.process.0.id();
    let before = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_seconds(pid) - before;
    assert!(used < 0.3, "an idle broker used {used:.2} s of CPU in one second");
}

/// A WebSocket member of `topic` on `port`, hearing joins and leaves.
fn presence_member(port: u16, topic: &str) -> (Ws, String) {
    let (mut ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}/ws")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let connected: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    let subscribe = json!({"type": "subscribe", "payload": {"topics": [topic], "presence": true}});
    ws.send(Message::text(subscribe.to_string())).unwrap();
    (ws, connected["payload"]["client_id"].as_str().unwrap().to_string())
}

/// The next presence notice's (action, client_id, node).
fn next_notice(ws: &mut Ws) -> (String, String, String) {
    loop {
        let m: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
        if m["type"] == "presence" {
            let p = &m["payload"];
            let text = |v: &Value| v.as_str().unwrap().to_string();
            return (text(&p["action"]), text(&p["entry"]["client_id"]), text(&p["entry"]["node"]));
        }
    }
}

/// `(connections, entries' (node, client_id))` of `topic` as `port` sees it.
fn presence_of(port: u16, topic: &str) -> (u64, Vec<(String, String)>) {
    let stats: Value = serde_json::from_str(&get(port, &format!("/presence/stats?topic={topic}"))).unwrap();
    let listed: Value = serde_json::from_str(&get(port, &format!("/presence?topic={topic}"))).unwrap();
    let mut entries: Vec<(String, String)> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["node"].as_str().unwrap().to_string(), e["client_id"].as_str().unwrap().to_string()))
        .collect();
    entries.sort();
    (stats["connections"].as_u64().unwrap(), entries)
}

/// Held by the tests whose timing bounds (presence TTL) a CPU-heavy neighbour could break
/// on a two-core machine, and by those neighbours (the resume model starts and kills nodes).
static TIMING: Mutex<()> = Mutex::new(());

#[test]
fn presence_is_cluster_wide_and_a_killed_nodes_members_expire() {
    let _alone = TIMING.lock().unwrap_or_else(|p| p.into_inner());
    let redis = RedisServer::start();
    let ttl = [("VOLLEY_PRESENCE_TTL_MS", "2000")];
    let mut nodes: Vec<Node> = (0..3).map(|_| node_with(&redis, &ttl)).collect();
    let (mut watcher, _) = presence_member(nodes[0].port, "room");
    let own = next_notice(&mut watcher);
    assert_eq!(own.0, "join");
    // A member on each other node: the watcher on node 0 hears both joins.
    let (_b, b_id) = presence_member(nodes[1].port, "room");
    let (_c, c_id) = presence_member(nodes[2].port, "room");
    let mut joined = vec![next_notice(&mut watcher), next_notice(&mut watcher)];
    joined.sort();
    let mut expected = vec![b_id.clone(), c_id.clone()];
    expected.sort();
    assert_eq!(joined.iter().map(|j| j.1.clone()).collect::<Vec<_>>(), expected);
    assert!(joined.iter().all(|j| j.0 == "join" && j.2 != own.2), "joins from the other nodes: {joined:?}");
    let c_node = joined.iter().find(|j| j.1 == c_id).unwrap().2.clone();
    // Every node lists all three.
    let deadline = Instant::now() + Duration::from_secs(5);
    for node in &nodes {
        while presence_of(node.port, "room").0 != 3 {
            assert!(Instant::now() < deadline, "node {} sees {:?}", node.port, presence_of(node.port, "room"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let everywhere = presence_of(nodes[0].port, "room").1;
    assert_eq!(presence_of(nodes[1].port, "room").1, everywhere);
    assert_eq!(presence_of(nodes[2].port, "room").1, everywhere);
    // kill -9 node 2: its member is gone everywhere within the TTL, with a leave notice.
    let killed_at = Instant::now();
    nodes.pop().unwrap().process.0.kill().unwrap();
    let left = next_notice(&mut watcher);
    assert_eq!((left.0.as_str(), left.1.as_str(), left.2.as_str()), ("leave", c_id.as_str(), c_node.as_str()));
    // Every remaining node drops it within the TTL (2 s; 0.5 s of slack for a busy machine).
    for node in &nodes {
        while presence_of(node.port, "room").0 != 2 {
            assert!(killed_at.elapsed() <= Duration::from_millis(2500), "node {} still lists it", node.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(killed_at.elapsed() <= Duration::from_millis(2500), "gone within the TTL: {:?}", killed_at.elapsed());
}

/// Subscribes to `pattern` after `since`; the ack's `recovered`.
fn resume_on(port: u16, pattern: &str, since: &str) -> (Ws, bool) {
    subscribe_on(port, pattern, Some(since))
}

/// Reads `count` events, then checks nothing more comes within a moment.
fn exactly(ws: &mut Ws, count: usize) -> Vec<String> {
    let got: Vec<String> = (0..count).map_while(|_| next_id(ws)).collect();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    }
    let extra = next_id(ws);
    assert_eq!(extra, None, "more than the {count} events owed");
    got
}

#[test]
fn a_node_started_after_the_publishes_replays_them_on_its_first_resume() {
    let _alone = TIMING.lock().unwrap_or_else(|p| p.into_inner());
    let redis = RedisServer::start();
    let a = node(&redis);
    let events: Vec<Value> = (0..100).map(|i| json!({"topic": "k.r", "data": i})).collect();
    let ids = publish(a.port, &Value::from(events)).expect("published");
    let b = node(&redis);
    let (mut ws, recovered) = resume_on(b.port, "k.*", &ids[9]);
    assert!(recovered, "the node has the stream's history from its start");
    assert_eq!(exactly(&mut ws, 90), ids[10..], "90 of 90, in order");
}

/// The resume property over real processes: random schedules of publishes through any node,
/// kill -9 and restarts, and resumes on any node from any id ever acknowledged. Each resume
/// is `recovered:true` (the stream retains everything here) with exactly the matching events
/// after its id, in stream order, and nothing more.
#[test]
fn resume_model_three_nodes_with_kills_and_restarts() {
    let _alone = TIMING.lock().unwrap_or_else(|p| p.into_inner());
    let redis = RedisServer::start();
    let mut nodes: Vec<Option<Node>> = (0..3).map(|_| Some(node(&redis))).collect();
    let mut seed: u64 = std::env::var("VOLLEY_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xc1a5);
    let mut random = move |n: usize| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    let topics = ["k.a", "k.b"];
    let patterns = ["k.*", "k.a", "k.b"];
    let mut published: Vec<(String, &str)> = Vec::new();
    let publish_on = |port: u16, topic: &'static str, n: usize, published: &mut Vec<(String, &str)>| {
        let events: Vec<Value> = (0..n).map(|i| json!({"topic": topic, "data": i})).collect();
        let ids = publish(port, &Value::from(events)).expect("publish accepted");
        published.extend(ids.into_iter().map(|id| (id, topic)));
    };
    let check = |port: u16, since: usize, pattern: &str, published: &[(String, &str)]| {
        let (mut ws, recovered) = resume_on(port, pattern, &published[since].0);
        assert!(recovered, "resume from {} on {port}", published[since].0);
        let want: Vec<String> = published[since + 1..]
            .iter()
            .filter(|(_, t)| pattern == "k.*" || pattern == *t)
            .map(|(id, _)| id.clone())
            .collect();
        assert_eq!(exactly(&mut ws, want.len()), want, "resume from {} on {pattern}", published[since].0);
    };
    // The operator's case first: publish while a node is down, restart it, resume on it
    // before anything new is published.
    publish_on(nodes[0].as_ref().unwrap().port, "k.a", 5, &mut published);
    nodes[2] = None;
    publish_on(nodes[1].as_ref().unwrap().port, "k.b", 20, &mut published);
    nodes[2] = Some(node(&redis));
    check(nodes[2].as_ref().unwrap().port, 2, "k.*", &published);
    for _ in 0..40 {
        let live: Vec<usize> = (0..3).filter(|&i| nodes[i].is_some()).collect();
        let any_live = live[random(live.len())];
        match random(10) {
            0..=4 => {
                let topic = topics[random(2)];
                publish_on(nodes[any_live].as_ref().unwrap().port, topic, 1 + random(5), &mut published);
            }
            5 if live.len() > 1 => {
                // kill -9: no drain, no goodbye.
                let mut killed = nodes[any_live].take().unwrap();
                killed.process.0.kill().unwrap();
                let _ = killed.process.0.wait();
            }
            6 => {
                if let Some(dead) = (0..3).find(|&i| nodes[i].is_none()) {
                    nodes[dead] = Some(node(&redis));
                }
            }
            _ => {
                let since = random(published.len());
                check(nodes[any_live].as_ref().unwrap().port, since, patterns[random(3)], &published);
            }
        }
    }
}

/// The `(type, topic)` of every webhook event `receiver` has taken.
fn webhook_events(receiver: &TestBackend) -> Vec<(String, String)> {
    let mut events = Vec::new();
    for post in receiver.get("/webhooks")["posts"].as_array().unwrap() {
        let body: Value = serde_json::from_str(post["body"].as_str().unwrap()).unwrap();
        for e in body["events"].as_array().unwrap() {
            events.push((e["type"].as_str().unwrap().to_string(), e["topic"].as_str().unwrap().to_string()));
        }
    }
    events
}

#[test]
fn occupied_and_vacated_are_told_once_across_three_nodes_when_one_is_killed() {
    let _alone = TIMING.lock().unwrap_or_else(|p| p.into_inner());
    let redis = RedisServer::start();
    let receiver = TestBackend::start();
    let url = receiver.url("/webhook");
    let settings = [("VOLLEY_PRESENCE_TTL_MS", "2000"), ("VOLLEY_WEBHOOK_URL", url.as_str())];
    let mut nodes: Vec<Node> = (0..3).map(|_| node_with(&redis, &settings)).collect();
    let everywhere = |nodes: &[Node], count: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        for node in nodes {
            while presence_of(node.port, "room").0 != count {
                assert!(Instant::now() < deadline, "node {} sees {:?}", node.port, presence_of(node.port, "room"));
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let (first, _) = presence_member(nodes[0].port, "room");
    everywhere(&nodes, 1);
    // Later members elsewhere find the topic occupied already.
    let (second, _) = presence_member(nodes[1].port, "room");
    let (_third, _) = presence_member(nodes[2].port, "room");
    everywhere(&nodes, 3);
    // Two leave; the member on node 2 keeps it occupied.
    drop((first, second));
    everywhere(&nodes, 1);
    // kill -9 node 2: its member expires everywhere; one of the two live nodes says so.
    nodes.pop().unwrap().process.0.kill().unwrap();
    everywhere(&nodes, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !webhook_events(&receiver).contains(&("topic_vacated".into(), "room".into())) {
        assert!(Instant::now() < deadline, "no vacated: {:?}", webhook_events(&receiver));
        std::thread::sleep(Duration::from_millis(20));
    }
    // Two more reconcile rounds on both live nodes: nothing more comes.
    std::thread::sleep(Duration::from_millis(1500));
    let events = webhook_events(&receiver);
    assert_eq!(events, [("topic_occupied".into(), "room".into()), ("topic_vacated".into(), "room".into())]);
}

#[test]
fn a_disconnect_or_unsubscribe_asked_of_one_node_acts_on_every_node() {
    let redis = RedisServer::start();
    let secret = "cluster-api";
    let nodes: Vec<Node> = (0..3).map(|_| node_with(&redis, &[("VOLLEY_JWT_SECRET", secret)])).collect();
    let alice = common::token(secret, json!({"sub": "alice", "subscribe": [">"]}));
    let connect = |port: u16| -> Ws {
        let (mut ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}/ws?token={alice}")).unwrap();
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        assert!(ws.read().unwrap().to_text().unwrap().contains("connected"));
        let subscribe = json!({"type": "subscribe", "payload": {"topics": ["chat.a", "chat.b"]}});
        ws.send(Message::text(subscribe.to_string())).unwrap();
        assert!(ws.read().unwrap().to_text().unwrap().contains("subscribed"));
        ws
    };
    let mut on_one = connect(nodes[1].port);
    let mut on_two = connect(nodes[2].port);
    let admin = common::token(secret, json!({"sub": "ops", "admin": true}));
    let api =
        |path: &str, body: Value| request(nodes[0].port, "POST", &format!("{path}?token={admin}"), &body.to_string());
    // Node 0 holds none of them (its count); the others act.
    let answer = api("/api/unsubscribe", json!({"user": "alice", "topic": "chat.a"})).unwrap();
    assert_eq!(answer, (200, json!({"unsubscribed": 0}).to_string()));
    for ws in [&mut on_one, &mut on_two] {
        let told: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
        assert_eq!((told["type"].as_str(), &told["payload"]), (Some("unsubscribed"), &json!({"topic": "chat.a"})));
    }
    let answer = api("/api/disconnect", json!({"user": "alice", "reason": "banned"})).unwrap();
    assert_eq!(answer, (200, json!({"disconnected": 0}).to_string()));
    for ws in [&mut on_one, &mut on_two] {
        loop {
            match ws.read().unwrap() {
                Message::Close(Some(frame)) => {
                    assert_eq!((u16::from(frame.code), frame.reason.as_str()), (4003, "banned"));
                    break;
                }
                Message::Close(None) => panic!("a close frame without a code"),
                _ => continue,
            }
        }
    }
}
