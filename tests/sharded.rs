//! The sharded engine over real processes: volley nodes whose topics are placed on the
//! streams of four standalone redis-servers, or of a local three-master Redis Cluster.
//! `./scripts/test` installs redis-server and redis-cli when they are missing.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::processes::*;
use serde_json::{Value, json};
use tungstenite::Message;

/// One test at a time: each runs several servers and nodes on two cores.
static ALONE: Mutex<()> = Mutex::new(());

struct Node {
    port: u16,
    _process: Proc,
}

fn node(engine: &str, shards: u32) -> Node {
    node_with(engine, shards, &[])
}

/// A node with extra `VOLLEY_*` settings.
fn node_with(engine: &str, shards: u32, settings: &[(&str, &str)]) -> Node {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_volley"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--engine", engine])
        .env("VOLLEY_LOG_LEVEL", "error")
        .env("VOLLEY_ENGINE_SHARDS", shards.to_string())
        .env("VOLLEY_HTTP_REQUEST_TIMEOUT_MS", "2000")
        .envs(settings.iter().copied())
        .spawn()
        .unwrap();
    let node = Node { port, _process: Proc(child) };
    wait_for_port(port, "volley");
    wait_engine_up(port);
    node
}

/// A stream position: (shard, (ms, n)).
type Origin = (u32, (u64, u64));

/// The event's own shard and stream id, from any id volley gives out.
fn origin(id: &str, shards: u32) -> Origin {
    let (shard, positions) = volley::positions::decode(id, shards).unwrap_or_else(|| panic!("{id} is a sharded id"));
    (shard, positions[shard as usize])
}

/// Publishes `n` events to `topic`: the status and the acknowledged ids.
fn publish(port: u16, topic: &str, n: usize) -> (u16, Vec<String>) {
    let events: Vec<Value> = (0..n).map(|i| json!({"topic": topic, "data": i})).collect();
    let Some((status, body)) = request(port, "POST", "/publish", &Value::from(events).to_string()) else {
        return (0, Vec::new());
    };
    let ids = serde_json::from_str::<Value>(&body).ok().and_then(|b| {
        b["message_ids"].as_array().map(|ids| ids.iter().map(|v| v.as_str().unwrap().to_string()).collect())
    });
    (status, ids.unwrap_or_default())
}

/// The next event's (id, topic), or None when nothing comes in time.
fn next_event(ws: &mut Ws) -> Option<(String, String)> {
    loop {
        match ws.read().ok()? {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "event" {
                    let topic = v["payload"]["topic"].as_str().unwrap().to_string();
                    return Some((v["message_id"].as_str().unwrap().to_string(), topic));
                }
            }
            Message::Close(_) => return None,
            _ => {}
        }
    }
}

/// Reads `count` events, then checks that nothing more comes within a moment.
fn exactly(ws: &mut Ws, count: usize) -> Vec<(String, String)> {
    let got: Vec<_> = (0..count).map_while(|_| next_event(ws)).collect();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    }
    let extra = next_event(ws);
    assert_eq!(extra, None, "more than the {count} events owed");
    got
}

fn matches(pattern: &str, topic: &str) -> bool {
    pattern == ">"
        || pattern == topic
        || pattern.strip_suffix(".*").is_some_and(|p| topic.split_once('.').unwrap().0 == p)
}

/// The model: every acknowledged event (its topic and stream position), and the ids
/// clients were given (each with the node's positions in every shard).
struct Model {
    shards: u32,
    published: Vec<(String, Origin)>,
    seen_ids: Vec<String>,
}

impl Model {
    fn publish(&mut self, port: u16, topic: &str, n: usize) -> u16 {
        let (status, ids) = publish(port, topic, n);
        if status == 200 {
            assert_eq!(ids.len(), n);
            self.published.extend(ids.iter().map(|id| (topic.to_string(), origin(id, self.shards))));
        }
        status
    }

    /// A resume on `port` from `since` (or live, when `None`, after publishing one event
    /// to `topic` to see) gets exactly the events the model owes, each shard in order.
    fn check(&mut self, port: u16, pattern: &str, since: Option<&str>) {
        let (mut ws, recovered) = subscribe_on(port, pattern, since);
        let owed: Vec<Origin> = match since {
            Some(since) => {
                assert!(recovered, "resume from {since} on {port}");
                let (_, after) = volley::positions::decode(since, self.shards).unwrap();
                self.published
                    .iter()
                    .filter(|(topic, (shard, key))| matches(pattern, topic) && *key > after[*shard as usize])
                    .map(|(_, o)| *o)
                    .collect()
            }
            None => Vec::new(),
        };
        let got = exactly(&mut ws, owed.len());
        let mut got_origins: Vec<Origin> = got.iter().map(|(id, _)| origin(id, self.shards)).collect();
        for shard in 0..self.shards {
            let of_shard: Vec<_> = got_origins.iter().filter(|o| o.0 == shard).collect();
            assert!(of_shard.windows(2).all(|w| w[0].1 < w[1].1), "shard {shard} out of order: {of_shard:?}");
        }
        got_origins.sort();
        let mut owed = owed;
        owed.sort();
        assert_eq!(got_origins, owed, "resume from {since:?} on {port} ({pattern})");
        self.seen_ids.extend(got.into_iter().map(|(id, _)| id));
    }

    /// Subscribes live on `port`, publishes one event per topic through `via`, and keeps
    /// the ids the subscriber is given: positions a later resume starts from.
    fn observe(&mut self, port: u16, via: u16, topics: &[&str]) {
        let (mut ws, _) = subscribe_on(port, ">", None);
        let mut sent = 0;
        for topic in topics {
            if self.publish(via, topic, 1) == 200 {
                sent += 1;
            }
        }
        let got: Vec<_> = (0..sent).map_while(|_| next_event(&mut ws)).collect();
        assert_eq!(got.len(), sent, "a live subscriber on {port} gets every event");
        self.seen_ids.extend(got.into_iter().map(|(id, _)| id));
    }
}

/// Random schedules of publishes through any node, kill -9 and restarts of nodes, a
/// Redis stopped and started, and resumes on any node from any id a client was given:
/// each resume is `recovered:true` (the streams retain everything here) with exactly the
/// matching events after each shard's position, each shard in order, nothing more.
fn resume_model(engine: &str, shards: u32, mut redis_down: impl FnMut(bool), seed: u64) {
    let topics = ["a.x", "b.x", "c.x", "d.x", "e.x", "f.x"];
    let patterns = [">", "a.*", "b.x", "c.*", "f.x"];
    let mut nodes: Vec<Option<Node>> = (0..3).map(|_| Some(node(engine, shards))).collect();
    let mut seed = std::env::var("VOLLEY_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(seed);
    let mut random = move |n: usize| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    let mut model = Model { shards, published: Vec::new(), seen_ids: Vec::new() };
    let port = |nodes: &[Option<Node>], i: usize| nodes[i].as_ref().unwrap().port;
    model.observe(port(&nodes, 0), port(&nodes, 1), &topics);
    // The operator's case: publish while a node is down, restart it, resume on it before
    // anything new is published.
    nodes[2] = None;
    for topic in topics {
        model.publish(port(&nodes, 1), topic, 3);
    }
    nodes[2] = Some(node(engine, shards));
    let since = model.seen_ids[0].clone();
    model.check(port(&nodes, 2), ">", Some(&since));
    for _ in 0..30 {
        let live: Vec<usize> = (0..3).filter(|&i| nodes[i].is_some()).collect();
        let any = live[random(live.len())];
        match random(12) {
            0..=4 => {
                let status = model.publish(port(&nodes, any), topics[random(topics.len())], 1 + random(4));
                assert_eq!(status, 200);
            }
            5 if live.len() > 1 => {
                // kill -9: no drain, no goodbye.
                nodes[any] = None;
            }
            6 => {
                if let Some(dead) = (0..3).find(|&i| nodes[i].is_none()) {
                    nodes[dead] = Some(node(engine, shards));
                }
            }
            7 => {
                // One Redis stopped: what is placed elsewhere is still taken; resumes
                // wait for it to come back.
                redis_down(true);
                for topic in topics {
                    let status = model.publish(port(&nodes, any), topic, 1);
                    assert!(status == 200 || status == 503, "{status}");
                }
                redis_down(false);
                let deadline = Instant::now() + Duration::from_secs(20);
                for i in (0..3).filter(|&i| nodes[i].is_some()) {
                    while !get(port(&nodes, i), "/health").contains("\"up\"") {
                        assert!(Instant::now() < deadline, "node {i} did not reconnect");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
            8 => model.observe(port(&nodes, any), port(&nodes, live[random(live.len())]), &topics),
            _ => {
                let since = model.seen_ids[random(model.seen_ids.len())].clone();
                model.check(port(&nodes, any), patterns[random(patterns.len())], Some(&since));
            }
        }
    }
    // Every shard took events.
    let shards_used: std::collections::BTreeSet<u32> = model.published.iter().map(|(_, o)| o.0).collect();
    assert!(shards_used.len() > 1, "{shards_used:?}");
}

#[test]
fn resume_model_over_four_redis_servers_with_kills_restarts_and_a_redis_stopped() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let mut servers: Vec<RedisServer> = (0..4).map(|_| RedisServer::start()).collect();
    let engine = servers.iter().map(RedisServer::url).collect::<Vec<_>>().join(",");
    resume_model(
        &engine,
        4,
        |down| {
            if down {
                servers[1].kill();
            } else {
                servers[1].spawn();
            }
        },
        0x5aad,
    );
}

#[test]
fn resume_model_over_a_three_master_redis_cluster() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let mut cluster = RedisCluster::start(3);
    let url = cluster.url();
    resume_model(
        &url,
        8,
        |down| {
            // No replica to fail over to: the master comes back with its slots (its
            // nodes.conf and append-only file are kept).
            if down {
                cluster.members[2].kill();
            } else {
                cluster.members[2].spawn();
            }
        },
        0xc1a5,
    );
}

/// `XADD` calls a redis-server has taken (`INFO commandstats`).
fn xadds(server: &RedisServer) -> u64 {
    let output = Command::new("redis-cli").args(["-p", &server.port.to_string(), "info", "commandstats"]).output();
    let text = String::from_utf8_lossy(&output.expect("redis-cli runs").stdout).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("cmdstat_xadd:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn four_servers_take_a_quarter_of_400_shard_keys_each_and_one_down_refuses_only_its_shards() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let mut servers: Vec<RedisServer> = (0..4).map(|_| RedisServer::start()).collect();
    let engine = servers.iter().map(RedisServer::url).collect::<Vec<_>>().join(",");
    let a = node(&engine, 4);
    for key in 0..400 {
        assert_eq!(publish(a.port, &format!("key{key}.x"), 1).0, 200);
    }
    let per_server: Vec<u64> = servers.iter().map(xadds).collect();
    println!("XADDs per server for 400 shard keys: {per_server:?}");
    assert_eq!(per_server.iter().sum::<u64>(), 400);
    assert!(per_server.iter().all(|n| (80..=120).contains(n)), "25 % ± 5 % each: {per_server:?}");

    // Server 1 down: publishes placed on it fail within the request timeout, every other
    // shard is unaffected, and /health names the shard. (The subscription starts the
    // node's readers, which deliver from a second before it: wait that out.)
    std::thread::sleep(Duration::from_millis(1100 + volley::interest::SKEW_ALLOWANCE_MS));
    let (mut ws, _) = subscribe_on(a.port, ">", None);
    let placement = volley::placement::Placement::new(4, 1);
    let topic_on = |server: u32| (0..400).map(|k| format!("key{k}.x")).find(|t| placement.shard_of(t) == server);
    let down_topic = topic_on(1).unwrap();
    let up_topic = topic_on(2).unwrap();
    let mut acknowledged = 0;
    servers[1].kill();
    let started = Instant::now();
    let (status, _) = publish(a.port, &down_topic, 1);
    assert_eq!(status, 503, "placed on the server that is down");
    assert!(started.elapsed() < Duration::from_millis(2500), "within http_request_timeout_ms: {:?}", started.elapsed());
    for _ in 0..20 {
        assert_eq!(publish(a.port, &up_topic, 1).0, 200, "another server's shard is unaffected");
        acknowledged += 1;
    }
    let health: Value = serde_json::from_str(&get(a.port, "/health")).unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert_eq!(health["shards_down"][0]["shard"], 1, "{health}");
    servers[1].spawn();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !get(a.port, "/health").contains("\"up\"") {
        assert!(Instant::now() < deadline, "the reader did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..5 {
        assert_eq!(publish(a.port, &down_topic, 1).0, 200, "back");
        acknowledged += 1;
    }
    assert_eq!(exactly(&mut ws, acknowledged).len(), acknowledged, "every acknowledged event, once");
    let stats: Value = serde_json::from_str(&get(a.port, "/stats")).unwrap();
    let shards = stats["engine"]["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 4);
    assert!(shards.iter().all(|s| s["reading"] == true && s["server"].as_str().unwrap().starts_with("redis://")));
    assert_eq!(stats["engine"]["ingested"], 400 + acknowledged as u64, "{}", stats["engine"]);
}

/// Batches stay within one shard (one ordered log each): a batch across shard keys is
/// refused, one within a key is taken whole.
#[test]
fn a_batch_across_shard_keys_is_refused() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let servers: Vec<RedisServer> = (0..2).map(|_| RedisServer::start()).collect();
    let engine = servers.iter().map(RedisServer::url).collect::<Vec<_>>().join(",");
    let a = node(&engine, 16);
    let mut placed: BTreeMap<u32, String> = BTreeMap::new();
    for k in 0..64 {
        let topic = format!("k{k}.x");
        let (_, ids) = publish(a.port, &topic, 1);
        placed.entry(origin(&ids[0], 16).0).or_insert(topic);
    }
    let mut two = placed.values().take(2);
    let (one, other) = (two.next().unwrap(), two.next().unwrap());
    let body = json!([{"topic": one, "data": 1}, {"topic": other, "data": 2}]).to_string();
    let (status, answer) = request(a.port, "POST", "/publish", &body).unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("shard key"), "{answer}");
    let same = json!([{"topic": one, "data": 1}, {"topic": format!("{}.y", one), "data": 2}]).to_string();
    assert_eq!(request(a.port, "POST", "/publish", &same).unwrap().0, 200);
}

/// The `engine` part of `/stats`.
fn engine_stats(port: u16) -> Value {
    serde_json::from_str::<Value>(&get(port, "/stats")).unwrap()["engine"].clone()
}

/// Interest-based reading: a node whose clients only use `p1.>` reads only `p1`'s shard,
/// its subscriber still gets what was published right after it subscribed (the reader
/// started for it), and once nothing wants the shard the node stops reading it; a resume
/// over it later waits for its load and misses nothing.
#[test]
fn a_node_reads_only_the_shards_its_subscriptions_can_match() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let servers: Vec<RedisServer> = (0..4).map(|_| RedisServer::start()).collect();
    let engine = servers.iter().map(RedisServer::url).collect::<Vec<_>>().join(",");
    let (a, b) = (node(&engine, 4), node(&engine, 4));
    assert!(engine_stats(a.port)["shards"].as_array().unwrap().iter().all(|s| s["reading"] == false));
    let (mut ws, _) = subscribe_on(a.port, "p1.>", None);
    // At once, before A's reader for the shard has started: not lost.
    assert_eq!(publish(b.port, "p1.first", 1).0, 200);
    assert_eq!(next_event(&mut ws).map(|(_, topic)| topic).as_deref(), Some("p1.first"));
    let placement = volley::placement::Placement::new(4, 1);
    let mine = placement.shard_of("p1.x");
    let (mut total, mut on_mine) = (1u64, 1u64);
    for key in 0..200 {
        let topic = format!("p{key}.x");
        assert_eq!(publish(b.port, &topic, 2).0, 200);
        total += 2;
        if placement.shard_of(&topic) == mine {
            on_mine += 2;
        }
    }
    let got = exactly(&mut ws, 2);
    assert!(got.iter().all(|(_, topic)| topic == "p1.x"), "{got:?}");
    let stats = engine_stats(a.port);
    let ingested = stats["ingested"].as_u64().unwrap();
    println!("node A ingested {ingested} of {total} events ({on_mine} on its one shard of 4)");
    assert_eq!(ingested, on_mine, "only p1's shard: {stats}");
    assert!(ingested as f64 <= total as f64 * (0.25 + 0.05), "<= 1/K + 5 %: {ingested} of {total}");
    let reading: Vec<_> = stats["shards"].as_array().unwrap().iter().filter(|s| s["reading"] == true).collect();
    assert_eq!(reading.len(), 1, "{stats}");
    assert_eq!(reading[0]["shard"], mine);
    assert_eq!(engine_stats(b.port)["ingested"], 0, "B's clients want nothing");

    // Nothing wants the shard any more: A stops reading it after the linger, events go
    // on being published, and a resume from the last id A gave waits for the shard's
    // load and gets exactly what it missed.
    let last = got.last().unwrap().0.clone();
    drop(ws);
    let deadline = Instant::now() + Duration::from_secs(15);
    while engine_stats(a.port)["shards"][mine as usize]["reading"] == true {
        assert!(Instant::now() < deadline, "still reading");
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..3 {
        assert_eq!(publish(b.port, "p1.y", 1).0, 200);
        assert_eq!(publish(b.port, "p2.y", 1).0, 200);
    }
    let (mut ws, recovered) = subscribe_on(a.port, "p1.>", Some(&last));
    assert!(recovered);
    let got = exactly(&mut ws, 3);
    assert!(got.iter().all(|(_, topic)| topic == "p1.y"), "{got:?}");
}

/// Presence through a Redis Cluster: a member on one node is listed on another, and a
/// killed node's members are gone from the others within the TTL.
#[test]
fn presence_is_cluster_wide_on_a_redis_cluster() {
    let _alone = ALONE.lock().unwrap_or_else(|p| p.into_inner());
    let cluster = RedisCluster::start(3);
    let ttl = [("VOLLEY_PRESENCE_TTL_MS", "2000")];
    let a = node_with(&cluster.url(), 8, &ttl);
    let mut b = Some(node_with(&cluster.url(), 8, &ttl));
    let members = |port: u16| {
        let stats: Value = serde_json::from_str(&get(port, "/presence/stats?topic=room.1")).unwrap();
        stats["connections"].as_u64().unwrap()
    };
    let (_member, _) = subscribe_on(b.as_ref().unwrap().port, "room.1", None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while members(a.port) != 1 {
        assert!(Instant::now() < deadline, "the member on B is not listed on A");
        std::thread::sleep(Duration::from_millis(20));
    }
    b = None;
    let killed_at = Instant::now();
    while members(a.port) != 0 {
        assert!(killed_at.elapsed() < Duration::from_secs(5), "B's member outlived it");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(b.is_none());
    println!("gone {:?} after the kill (TTL 2 s)", killed_at.elapsed());
}
