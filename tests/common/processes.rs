//! Child processes for tests: a free port, waiting for a listener, a process killed on
//! drop, and a real redis-server in a temporary directory (which can be paused).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    process: Option<Proc>,
    /// A Redis Cluster member.
    cluster: bool,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_member(false)
    }

    fn start_member(cluster: bool) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("volley-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = Self { port, dir, process: None, cluster };
        server.spawn();
        server
    }

    pub fn spawn(&mut self) {
        let cluster: &[&str] = if self.cluster { &["--cluster-enabled", "yes"] } else { &[] };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(cluster)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (./scripts/test installs it)");
        self.process = Some(Proc(child));
        wait_for_port(self.port, "redis-server");
    }

    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Stops redis-server (SIGSTOP): its connections stay open and nothing is answered,
    /// as with a hung server or a dead network path.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Continues a paused redis-server (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        if let Some(process) = &self.process {
            // SAFETY: signalling our own child process.
            unsafe { libc::kill(process.0.id() as i32, signal) };
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.process = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A local Redis Cluster of `masters` masters and no replicas, made with
/// `redis-cli --cluster create`.
pub struct RedisCluster {
    pub members: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        let members: Vec<RedisServer> = (0..masters).map(|_| RedisServer::start_member(true)).collect();
        let addrs: Vec<String> = members.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli is installed (./scripts/test installs it)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        for member in &members {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &member.port.to_string(), "cluster", "info"])
                    .output()
                    .expect("redis-cli runs");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not come up");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Self { members }
    }

    /// The engine setting naming every member as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self.members.iter().map(|m| format!("127.0.0.1:{}", m.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }
}

/// tests/backend.py (the backend the proxy and webhook tests call) on a free port,
/// killed on drop.
pub struct TestBackend {
    pub port: u16,
    _process: Proc,
}

impl TestBackend {
    pub fn start() -> Self {
        let port = free_port();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/backend.py");
        let child = Command::new("python3").arg(script).arg(port.to_string()).spawn().expect("python3 runs");
        wait_for_port(port, "the test backend");
        Self { port, _process: Proc(child) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// `GET path` as JSON (`/calls`: calls per path and the most at once; `/webhooks`: the
    /// webhook posts taken).
    pub fn get(&self, path: &str) -> serde_json::Value {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        serde_json::from_str(raw.split_once("\r\n\r\n").unwrap().1).unwrap()
    }
}

/// One HTTP/1.1 request to a broker process on `port`: the status and body, or None when
/// the connection failed.
pub fn request(port: u16, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.split(' ').nth(1)?.parse().ok()?, body.to_string()))
}

/// `GET path`'s body (empty when the request failed).
pub fn get(port: u16, path: &str) -> String {
    request(port, "GET", path, "").map(|(_, b)| b).unwrap_or_default()
}

/// Waits until the broker on `port` says its engine is up.
pub fn wait_engine_up(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !get(port, "/health").contains("\"up\"") {
        assert!(Instant::now() < deadline, "engine did not come up: {}", get(port, "/health"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A WebSocket client of a broker process.
pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// Connects to the broker on `port` and subscribes to `pattern` (after `since`): the
/// socket and the ack's `recovered`.
pub fn subscribe_on(port: u16, pattern: &str, since: Option<&str>) -> (Ws, bool) {
    use serde_json::{Value, json};
    let (mut ws, _) = tungstenite::connect(format!("ws://127.0.0.1:{port}/ws")).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    assert!(ws.read().unwrap().to_text().unwrap().contains("connected"));
    let subscribe = json!({"type": "subscribe", "payload": {"topics": [pattern], "since": since}});
    ws.send(tungstenite::Message::text(subscribe.to_string())).unwrap();
    let ack: Value = serde_json::from_str(ws.read().unwrap().to_text().unwrap()).unwrap();
    assert_eq!(ack["payload"]["status"], "subscribed", "{ack}");
    let recovered = ack["payload"]["recovered"].as_bool().unwrap();
    (ws, recovered)
}
