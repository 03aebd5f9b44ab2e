//! `switchyard-sim`: an OpenAI-compatible backend simulator for tests, benchmarks and the demo.
//! Owns: chat/completions/embeddings/models answers with realistic `usage`, streaming at a set
//! pace, and fault injection (error statuses, resets before/after the head, mid-stream stalls,
//! slow first byte), set per process by flags or per request by the `x-sim-fault` header.
//! Must not: be slow; it answers on monoio workers with the router's own codec so a benchmark
//! measures the router, not the simulator.

use clap::Parser;
use monoio::io::AsyncWriteRentExt;
use monoio::net::{ListenerOpts, TcpListener, TcpStream};
use std::cell::Cell;
use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use switchyard_dataplane::codec::{Head, Method};
use switchyard_dataplane::conn::{read_body, read_head, Client, HeadError};
use switchyard_shared::routing::Listener;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "switchyard-sim",
    version,
    about = "OpenAI-compatible backend simulator with fault injection"
)]
pub struct SimConfig {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Name reported in answers and the `x-sim-backend` header.
    #[arg(long, default_value = "sim")]
    pub name: String,
    /// Models listed by /v1/models (any model name is answered).
    #[arg(long, value_delimiter = ',', default_value = "sim-small,sim-large")]
    pub models: Vec<String>,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Delay before the response head, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Completion tokens per answer (capped by the request's max_tokens).
    #[arg(long, default_value_t = 16)]
    pub completion_tokens: u64,
    /// Streaming pace; 0 sends all chunks at once.
    #[arg(long, default_value_t = 0.0)]
    pub tokens_per_second: f64,
    /// Share of requests answered with `--error-status` (0.0-1.0).
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    #[arg(long, default_value_t = 500)]
    pub error_status: u16,
    /// Share of requests whose connection is reset before the response head.
    #[arg(long, default_value_t = 0.0)]
    pub reset_before_head_rate: f64,
    /// Share of streamed requests whose connection is reset after the head and a few chunks.
    #[arg(long, default_value_t = 0.0)]
    pub reset_after_head_rate: f64,
    /// Share of streamed requests that stall forever after a few chunks.
    #[arg(long, default_value_t = 0.0)]
    pub stall_rate: f64,
    /// Keep the last request (head and body) for `GET /sim/last-request` (tests only).
    #[arg(long)]
    pub record: bool,
}

impl SimConfig {
    /// Defaults with a given name and address, for the in-process demo.
    pub fn named(name: &str, listen: SocketAddr) -> SimConfig {
        let mut c = SimConfig::parse_from(["switchyard-sim"]);
        c.name = name.to_string();
        c.listen = listen;
        c
    }
}

/// What to do with one request, from the flags' rates or the `x-sim-fault` header.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    Status(u16),
    ResetBeforeHead,
    ResetAfterHead,
    Stall,
    SlowFirstByte(u64),
}

struct Sim {
    config: SimConfig,
    seq: Cell<u64>,
    last_request: Arc<Mutex<Vec<u8>>>,
    /// Inference requests received, over all workers (tests count upstream calls with it).
    received: Arc<std::sync::atomic::AtomicU64>,
}

impl Sim {
    /// True with probability `rate`.
    fn roll(&self, rate: f64) -> bool {
        rate > 0.0 && fastrand::f64() < rate
    }

    fn fault(&self, head: &Head, stream: bool) -> Fault {
        if let Some(f) = head.header_str("x-sim-fault") {
            return match f.split_once('=') {
                Some(("status", s)) => Fault::Status(s.parse().unwrap_or(500)),
                Some(("slow-first-byte", ms)) => Fault::SlowFirstByte(ms.parse().unwrap_or(1000)),
                _ if f == "slow-first-byte" => Fault::SlowFirstByte(1000),
                _ if f == "reset-before-head" => Fault::ResetBeforeHead,
                _ if f == "reset-after-head" => Fault::ResetAfterHead,
                _ if f == "stall" => Fault::Stall,
                _ => Fault::None,
            };
        }
        let c = &self.config;
        if self.roll(c.reset_before_head_rate) {
            Fault::ResetBeforeHead
        } else if self.roll(c.error_rate) {
            Fault::Status(c.error_status)
        } else if stream && self.roll(c.reset_after_head_rate) {
            Fault::ResetAfterHead
        } else if stream && self.roll(c.stall_rate) {
            Fault::Stall
        } else {
            Fault::None
        }
    }
}

/// Starts the simulator on its own threads; returns the bound address once it listens.
pub fn spawn(config: SimConfig) -> io::Result<SocketAddr> {
    switchyard_dataplane::server::raise_open_files_limit();
    let probe = std::net::TcpListener::bind(config.listen)?;
    let address = probe.local_addr()?;
    drop(probe);
    let last_request = Arc::new(Mutex::new(Vec::new()));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for id in 0..config.workers.max(1) {
        let config = config.clone();
        let last_request = last_request.clone();
        let received = received.clone();
        let ready = ready_tx.clone();
        std::thread::Builder::new()
            .name(format!("sim-{id}"))
            .spawn(move || {
                let sim = Rc::new(Sim {
                    config,
                    seq: Cell::new(0),
                    last_request,
                    received,
                });
                // The router's ring setup, so that a comparison with the router measures the
                // work each does, not how their rings are set up.
                let build = |setup| {
                    monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .uring_builder(setup)
                        .enable_timer()
                        .build()
                };
                let mut rt = match build(switchyard_dataplane::server::ring_setup())
                    .or_else(|_| build(io_uring::IoUring::builder()))
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let opts = ListenerOpts::new().reuse_port(true).backlog(4096);
                    let listener = match TcpListener::bind_with_config(address, &opts) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready.send(Ok(()));
                    loop {
                        if let Ok((stream, _)) = listener.accept().await {
                            monoio::spawn(serve(sim.clone(), stream));
                        }
                    }
                });
            })?;
    }
    drop(ready_tx);
    for _ in 0..config.workers.max(1) {
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("simulator thread died"))??;
    }
    Ok(address)
}

fn limits() -> Listener {
    Listener {
        address: "127.0.0.1:0".parse().expect("literal address"),
        workers: 1,
        io_driver: Default::default(),
        max_header_bytes: 64 * 1024,
        max_body_bytes: 64 * 1024 * 1024,
        header_timeout: Duration::from_secs(30),
        body_timeout: Duration::from_secs(30),
        send_timeout: Duration::from_secs(30),
        keepalive_timeout: Duration::from_secs(300),
        drain_timeout: Duration::from_secs(1),
    }
}

async fn serve(sim: Rc<Sim>, stream: TcpStream) {
    let limits = limits();
    let mut client = Client::new(stream, limits.send_timeout);
    loop {
        let head = match read_head(&mut client, &limits, || {}).await {
            Ok(h) => h,
            Err(HeadError::Closed) | Err(HeadError::Bad(_)) => return,
        };
        let Ok(body) = read_body(&mut client, &head, &limits).await else {
            return;
        };
        if sim.config.record && head.method == Method::Post {
            let mut rec = head_text(&head).into_bytes();
            rec.extend_from_slice(&body);
            *sim.last_request.lock().unwrap_or_else(|p| p.into_inner()) = rec;
        }
        if !answer(&sim, &mut client, &head, &body).await || !head.keep_alive {
            return;
        }
    }
}

fn head_text(head: &Head) -> String {
    let mut s = format!("{}\n", head.target());
    for (n, v) in head.headers() {
        s.push_str(&format!(
            "{}: {}\n",
            String::from_utf8_lossy(n),
            String::from_utf8_lossy(v)
        ));
    }
    s.push('\n');
    s
}

fn response(status: u16, content_type: &str, body: &[u8], name: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nx-sim-backend: {name}\r\n\r\n",
        switchyard_dataplane::codec::reason(status),
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

async fn write_json(
    client: &mut Client,
    status: u16,
    value: &serde_json::Value,
    name: &str,
) -> bool {
    write(
        client,
        response(
            status,
            "application/json",
            &serde_json::to_vec(value).unwrap_or_default(),
            name,
        ),
    )
    .await
}

/// Drops the connection with a reset (RST), not an orderly close: `SO_LINGER` of zero.
fn reset(client: &Client) -> bool {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a pointer to a live `linger` of the size given.
    unsafe {
        libc::setsockopt(
            client.stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    false
}

/// The fault mid-answer: a reset, or a stall that never ends.
async fn stall_or_reset(client: &Client, fault: Fault) -> bool {
    if fault == Fault::Stall {
        // A timer, not `std::future::pending()`: monoio frees a task that holds no waker,
        // which would close the connection instead of stalling it.
        monoio::time::sleep(Duration::from_secs(3600)).await;
    }
    reset(client)
}

async fn write(client: &mut Client, bytes: Vec<u8>) -> bool {
    client.stream.write_all(bytes).await.0.is_ok()
}

/// Answers one request; returns whether the connection may carry another.
async fn answer(sim: &Sim, client: &mut Client, head: &Head, body: &[u8]) -> bool {
    let c = &sim.config;
    match (head.method, head.path()) {
        (Method::Get, "/v1/models") => {
            let data: Vec<_> = c.models.iter().map(|m| serde_json::json!({"id": m, "object": "model", "owned_by": "switchyard-sim"})).collect();
            return write_json(client, 200, &serde_json::json!({"object": "list", "data": data}), &c.name).await;
        }
        (Method::Get, "/health") => return write(client, response(200, "application/json", b"{}", &c.name)).await,
        (Method::Get, "/sim/last-request") => {
            let rec = sim.last_request.lock().unwrap_or_else(|p| p.into_inner()).clone();
            return write(client, response(200, "text/plain", &rec, &c.name)).await;
        }
        (Method::Get, "/sim/stats") => {
            let received = sim.received.load(std::sync::atomic::Ordering::Relaxed);
            return write_json(client, 200, &serde_json::json!({ "received": received }), &c.name).await;
        }
        (Method::Post, "/v1/chat/completions" | "/v1/completions" | "/v1/embeddings") => {
            sim.received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        _ => return write(client, response(404, "application/json", br#"{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":null}}"#, &c.name)).await,
    }
    let Ok(req) = serde_json::from_slice::<serde_json::Value>(body) else {
        return write(client, response(400, "application/json", br#"{"error":{"message":"invalid JSON","type":"invalid_request_error","param":null,"code":null}}"#, &c.name)).await;
    };
    let stream = req["stream"].as_bool().unwrap_or(false);
    let fault = sim.fault(head, stream);
    let delay = match fault {
        Fault::SlowFirstByte(ms) => ms,
        _ => c.latency_ms,
    };
    if delay > 0 {
        monoio::time::sleep(Duration::from_millis(delay)).await;
    }
    match fault {
        Fault::ResetBeforeHead => return reset(client),
        Fault::Status(status) => {
            let body = format!("{{\"error\":{{\"message\":\"simulated failure from {}\",\"type\":\"server_error\",\"param\":null,\"code\":{status}}}}}", c.name);
            return write(
                client,
                response(status, "application/json", body.as_bytes(), &c.name),
            )
            .await;
        }
        _ => {}
    }
    let n = sim.seq.get() + 1;
    sim.seq.set(n);
    let model = req["model"].as_str().unwrap_or("sim").to_string();
    let prompt_tokens = (body.len() as u64).div_ceil(4);
    let completion = req["max_tokens"]
        .as_u64()
        .or(req["max_completion_tokens"].as_u64())
        .map_or(c.completion_tokens, |m| m.min(c.completion_tokens))
        .max(1);
    // Cut short by the caller's limit, as OpenAI reports it.
    let finish_reason = if completion < c.completion_tokens {
        "length"
    } else {
        "stop"
    };
    let path = head.path();
    if path == "/v1/embeddings" {
        let inputs = match &req["input"] {
            serde_json::Value::Array(a) if a.first().is_some_and(|v| !v.is_number()) => a.len(),
            _ => 1,
        };
        let data: Vec<_> = (0..inputs).map(|i| serde_json::json!({"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3, 0.05]})).collect();
        let out = serde_json::json!({"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
        return write_json(client, 200, &out, &c.name).await;
    }
    let chat = path == "/v1/chat/completions";
    let usage = serde_json::json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion});
    if !stream {
        let text = words(&c.name, completion);
        let choice = if chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": finish_reason})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        let out = serde_json::json!({"id": format!("cmpl-{}-{n}", c.name), "object": object, "created": 1_700_000_000, "model": model, "choices": [choice], "usage": usage});
        if let Fault::ResetAfterHead | Fault::Stall = fault {
            // The head and part of the body, then the fault.
            let mut whole = response(
                200,
                "application/json",
                &serde_json::to_vec(&out).unwrap_or_default(),
                &c.name,
            );
            whole.truncate(whole.len() - 10);
            if !write(client, whole).await {
                return false;
            }
            return stall_or_reset(client, fault).await;
        }
        return write_json(client, 200, &out, &c.name).await;
    }
    let include_usage = req["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    stream_answer(
        sim,
        client,
        chat,
        &model,
        n,
        (completion, finish_reason),
        include_usage.then_some(usage),
        fault,
    )
    .await
}

fn words(name: &str, tokens: u64) -> String {
    (0..tokens)
        .map(|i| {
            if i == 0 {
                name.to_string()
            } else {
                "word".to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[allow(clippy::too_many_arguments)]
async fn stream_answer(
    sim: &Sim,
    client: &mut Client,
    chat: bool,
    model: &str,
    n: u64,
    (tokens, finish_reason): (u64, &str),
    usage: Option<serde_json::Value>,
    fault: Fault,
) -> bool {
    let c = &sim.config;
    let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: chunked\r\nx-sim-backend: {}\r\n\r\n", c.name);
    if !write(client, head.into_bytes()).await {
        return false;
    }
    let pause =
        (c.tokens_per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / c.tokens_per_second));
    let (id, object) = (
        format!("cmpl-{}-{n}", c.name),
        if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        },
    );
    // Events are written as text around the parts that change, not built as JSON values per
    // token: the simulator must cost little next to the proxies it is used to measure.
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let opening = format!(
        "data: {{\"id\":{},\"object\":\"{object}\",\"created\":1700000000,\"model\":{},\"choices\":[",
        quoted(&id),
        quoted(model)
    );
    let (first_word, next_word) = (quoted(&c.name), quoted(" word"));
    // A few chunks in, or before the last of a short answer.
    let fault_at = tokens.saturating_sub(1).min(2);
    let last = format!("\"{finish_reason}\"");
    for i in 0..tokens {
        if i == fault_at && matches!(fault, Fault::ResetAfterHead | Fault::Stall) {
            return stall_or_reset(client, fault).await;
        }
        let word = if i == 0 { &first_word } else { &next_word };
        let finish = if i + 1 == tokens { &last } else { "null" };
        let mut event = String::with_capacity(opening.len() + 96);
        event.push_str(&opening);
        let _ = if chat {
            write!(event, "{{\"index\":0,\"delta\":{{\"content\":{word}}},\"finish_reason\":{finish}}}]}}\n\n")
        } else {
            write!(
                event,
                "{{\"index\":0,\"text\":{word},\"finish_reason\":{finish}}}]}}\n\n"
            )
        };
        if !write(client, chunk(&event)).await {
            return false;
        }
        if let Some(p) = pause {
            monoio::time::sleep(p).await;
        }
    }
    let mut tail = String::new();
    if let Some(u) = usage {
        let _ = write!(tail, "{opening}],\"usage\":{u}}}\n\n");
    }
    tail.push_str("data: [DONE]\n\n");
    let mut out = chunk(&tail);
    out.extend_from_slice(b"0\r\n\r\n");
    write(client, out).await
}

fn chunk(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 8);
    switchyard_dataplane::codec::encode_chunk(&mut out, s.as_bytes());
    out
}
