//! Test harness: starts the real `switchyard` and `switchyard-sim` binaries on free loopback
//! ports and speaks raw HTTP/1.1 to them, so tests see exactly what a client would.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use switchyard_dataplane::codec::{self, BodyFraming, ChunkedDecoder};

/// A loopback port nothing listens on now, and never handed out before in this test process:
/// tests run in parallel, and the kernel may offer a port released a moment ago again, so two
/// processes of two tests could be told to listen on the same one.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A loopback address on a port that was free a moment ago. A router restarted in a test
/// gets a new one: its old port may have been taken since it stopped (as the local port of
/// an outgoing connection, or by another test's listener).
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn wait_listening(addr: SocketAddr, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("process exited with {status} before listening on {addr}: {err}");
        }
        assert!(Instant::now() < deadline, "nothing listening on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// A router's control API and /metrics (token [`ADMIN_TOKEN`]).
    pub admin: Option<SocketAddr>,
    /// A router's working directory (its data directory is `switchyard-data` in it).
    pub dir: Option<std::path::PathBuf>,
}

pub const ADMIN_TOKEN: &str = "test-admin-token";
/// Allows only what remote data planes need.
pub const DATA_PLANE_TOKEN: &str = "test-data-plane-token";

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Stops a router with SIGTERM, checks it exits 0, and returns its stderr.
pub fn stop_router(mut r: Proc) -> String {
    let pid = r.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let mut err = String::new();
    r.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(r.child.wait().unwrap().code(), Some(0), "{err}");
    err
}

/// The usage events a router logged (`[usage] log_events = true`) in its stderr.
pub fn usage_events(stderr: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn sim(name: &str, args: &[&str]) -> Proc {
    sim_on(free_port(), name, args)
}

pub fn sim_on(port: u16, name: &str, args: &[&str]) -> Proc {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard-sim"))
        .args(["--listen", &addr.to_string(), "--name", name])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(addr, &mut child);
    Proc {
        child,
        addr,
        admin: None,
        dir: None,
    }
}

/// Starts the router with `config` (TOML) on two workers; its stderr is piped for the test.
pub fn router(config: &str) -> Proc {
    router_on_workers(config, 2)
}

pub fn router_on_workers(config: &str, workers: usize) -> Proc {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-test-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("switchyard.toml");
    std::fs::write(&path, config).unwrap();
    start_router(&dir, &path, free_addr(), workers)
}

/// Starts a router in `dir` (where its data directory lives) on `addr`.
pub fn start_router(
    dir: &std::path::Path,
    config: &std::path::Path,
    addr: SocketAddr,
    workers: usize,
) -> Proc {
    let admin = free_addr();
    let args = [
        "serve",
        "--config",
        config.to_str().unwrap(),
        "--listen",
        &addr.to_string(),
        "--workers",
        &workers.to_string(),
        "--admin-listen",
        &admin.to_string(),
    ];
    let mut r = spawn_switchyard(dir, &args, &[addr, admin]);
    r.admin = Some(admin);
    r
}

/// Runs `switchyard <args>` in `dir` with the test admin and data-plane tokens (a data plane
/// uses the latter), and waits until the first of `listening` (its `addr`) and the others
/// listen.
pub fn spawn_switchyard(dir: &std::path::Path, args: &[&str], listening: &[SocketAddr]) -> Proc {
    spawn_switchyard_with_env(dir, args, listening, &[])
}

/// `spawn_switchyard` with environment variables of its own.
pub fn spawn_switchyard_with_env(
    dir: &std::path::Path,
    args: &[&str],
    listening: &[SocketAddr],
    env: &[(&str, &str)],
) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("SWITCHYARD_DATA_PLANE_TOKEN", DATA_PLANE_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for addr in listening {
        wait_listening(*addr, &mut child);
    }
    Proc {
        child,
        addr: listening[0],
        admin: None,
        dir: Some(dir.to_path_buf()),
    }
}

/// Runs `switchyard <command> --admin http://<admin> <rest>` with `token`; returns (success,
/// stdout, stderr).
pub fn admin_cli(
    admin: SocketAddr,
    token: &str,
    command: &str,
    rest: &[&str],
) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg(command)
        .args(["--admin", &format!("http://{admin}")])
        .args(rest)
        .env("SWITCHYARD_ADMIN_TOKEN", token)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an OpenAI-shaped error with this status and returns the `error` object.
    pub fn error(&self, status: u16) -> serde_json::Value {
        assert_eq!(self.status, status, "{}", self.text());
        let v = self.json();
        let e = v["error"].clone();
        for key in ["message", "type", "param", "code"] {
            assert!(e.get(key).is_some(), "error body lacks `{key}`: {v}");
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        e
    }
}

/// A keep-alive client connection.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp).unwrap_or(0);
        self.buf.extend_from_slice(&tmp[..n]);
        n
    }

    /// Reads one response; `on_data` sees each decoded body piece as it arrives.
    pub fn read_response_with(&mut self, on_data: impl FnMut(&[u8])) -> Option<Response> {
        self.read_one(false, on_data)
    }

    /// Reads the response to a HEAD request (a head only, whatever its length says).
    pub fn read_head_response(&mut self) -> Option<Response> {
        self.read_one(true, |_| {})
    }

    fn read_one(&mut self, to_head: bool, mut on_data: impl FnMut(&[u8])) -> Option<Response> {
        let (head, n) = loop {
            if let Some(parsed) = codec::parse_response(&self.buf, to_head).unwrap() {
                break parsed;
            }
            if self.fill() == 0 {
                return None;
            }
        };
        self.buf.drain(..n);
        let headers = head
            .headers()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        match head.framing {
            BodyFraming::Empty => {}
            BodyFraming::Length(len) => {
                while self.buf.len() < len as usize {
                    assert!(self.fill() > 0, "connection closed inside the body");
                }
                body = self.buf.drain(..len as usize).collect();
                on_data(&body);
            }
            BodyFraming::Chunked => {
                let mut dec = ChunkedDecoder::default();
                loop {
                    let before = body.len();
                    let used = dec.decode(&self.buf, &mut body, u64::MAX).unwrap();
                    self.buf.drain(..used);
                    if body.len() > before {
                        on_data(&body[before..]);
                    }
                    if dec.is_done() {
                        break;
                    }
                    if self.fill() == 0 {
                        break;
                    }
                }
            }
            BodyFraming::UntilClose => while self.fill() > 0 {},
        }
        if head.framing == BodyFraming::UntilClose {
            body = std::mem::take(&mut self.buf);
        }
        Some(Response {
            status: head.status,
            headers,
            body,
        })
    }

    pub fn read_response(&mut self) -> Option<Response> {
        self.read_response_with(|_| {})
    }

    /// True when the server closed the connection (end of stream or reset) within the read
    /// timeout; bytes that come instead are kept for the next response.
    pub fn is_closed(&mut self) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let mut tmp = [0u8; 16384];
        match self.stream.read(&mut tmp) {
            Ok(0) => true,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                false
            }
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

pub fn post_raw(path: &str, body: &str, extra_headers: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra_headers}\r\n{body}", body.len()).into_bytes()
}

pub fn post(addr: SocketAddr, path: &str, body: &str, extra_headers: &str) -> Response {
    let mut c = Conn::open(addr);
    c.send(&post_raw(path, body, extra_headers));
    c.read_response().expect("a response")
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    let mut c = Conn::open(addr);
    c.send(format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n").as_bytes());
    c.read_response().expect("a response")
}

pub fn chat(content: &str) -> String {
    serde_json::json!({"model": "auto", "messages": [{"role": "user", "content": content}]})
        .to_string()
}

/// One backend per sim, a tier per backend in order, cheapest first.
pub fn config_for(backends: &[(&str, String)], extra: &str) -> String {
    let mut out = String::from("[health]\ninterval_ms = 100\ntimeout_ms = 500\neject_after_failures = 2\nbase_ejection_ms = 300\nmax_ejection_ms = 2000\n\n");
    for (name, url) in backends {
        out.push_str(&format!("[[backends]]\nname = \"{name}\"\nurl = \"{url}\"\nmodels = [{{ name = \"{name}-model\", input_per_mtok = 1.0, output_per_mtok = 2.0 }}]\nfirst_byte_timeout_ms = 3000\n\n"));
    }
    for (name, _) in backends {
        out.push_str(&format!(
            "[[tiers]]\nname = \"{name}\"\ntargets = [\"{name}/{name}-model\"]\n\n"
        ));
    }
    out.push_str(extra);
    out
}

/// The text of a streamed answer's content deltas.
pub fn streamed_text(body: &[u8]) -> String {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// Waits until `check` holds (what a test saw can lag behind its cause: usage events reach
/// the ledger after the response, a reload after the file change), failing with `what` after
/// 15 s.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Requests a simulator has received.
pub fn upstream_calls(sim: &Proc) -> u64 {
    get(sim.addr, "/sim/stats").json()["received"]
        .as_u64()
        .unwrap()
}

/// Sends `body` to `path` from a thread of its own and returns once the first bytes of the
/// answer's body have arrived (failing with `what` after 10 s); the thread returns the whole
/// response.
pub fn caller_past_first_bytes(
    addr: SocketAddr,
    path: &'static str,
    body: String,
    what: &str,
) -> std::thread::JoinHandle<Response> {
    let (first_bytes, arrived) = std::sync::mpsc::channel();
    let caller = std::thread::spawn(move || {
        let mut c = Conn::open(addr);
        c.send(&post_raw(path, &body, ""));
        c.read_response_with(|_| {
            let _ = first_bytes.send(());
        })
        .expect("a response")
    });
    arrived
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}"));
    caller
}
