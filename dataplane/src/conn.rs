//! One client connection. Owns: reading request heads and bodies within the listener's limits
//! and timeouts, keep-alive and pipelining (requests are answered in order), the local
//! endpoints (`/healthz`, `/readyz`, `/v1/models`), and error responses.
//! Must not: parse bytes itself (codec does) or talk to upstreams (proxy does).

use crate::codec::{self, BodyFraming, ChunkedDecoder, CodecError, Head, Method};
use crate::proxy;
use crate::server::Worker;
use crate::snapshot::Snapshot;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::Sleep;
use slab::Slab;
use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};
use switchyard_shared::error::ErrorKind;
use switchyard_shared::openai::Endpoint;
use switchyard_shared::routing::Listener;

pub struct Client {
    pub stream: TcpStream,
    /// Bytes read and not yet consumed (a partial or pipelined request).
    pub buf: Vec<u8>,
    /// The previous request's body buffer, kept to become the next read buffer: a body that
    /// arrives alone is handed over whole, and this keeps that free of allocation.
    pub spare: Vec<u8>,
    /// The longest one write may wait for the client to take bytes (`listener.send_timeout_ms`).
    send_timeout: Duration,
    /// One timer for the connection's life, moved forward for each write: extending a timer
    /// is a store, where a new one per write is an insertion into the wheel and a removal.
    send_deadline: Pin<Box<Sleep>>,
    /// When `unless_gone` starts watching for a disconnect: kept for the same reason.
    watch_from: Pin<Box<Sleep>>,
    /// When a read gives up (`read_more_by`): kept for the same reason. The three are polled
    /// only from the connection's own task (a monoio timer keeps the first waker it is given).
    read_deadline: Pin<Box<Sleep>>,
    /// The request being answered is HTTP/1.0, whose connections close unless the answer says
    /// otherwise.
    pub http10: bool,
    /// Whether it waits for a next request with nothing of it here (what a drain closes).
    waiting: Rc<Cell<Waiting>>,
}

/// Where a connection stands for a drain.
#[derive(Clone, Copy, PartialEq, Default)]
enum Waiting {
    #[default]
    Busy,
    /// Between requests, nothing of the next one here.
    Idle,
    /// Closed for reading by a drain while idle.
    Shut,
    /// Closed for reading by the drain deadline while busy (`OpenConnections::shut_busy`).
    Cut,
}

impl Client {
    pub fn new(stream: TcpStream, send_timeout: Duration) -> Client {
        // Small request/response pairs must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        Client {
            stream,
            buf: Vec::with_capacity(8192),
            spare: Vec::new(),
            send_timeout,
            // All are set before each use.
            send_deadline: Box::pin(monoio::time::sleep(Duration::MAX)),
            watch_from: Box::pin(monoio::time::sleep(Duration::MAX)),
            read_deadline: Box::pin(monoio::time::sleep(Duration::MAX)),
            http10: false,
            waiting: Rc::default(),
        }
    }

    /// Appends what the socket has by `deadline`; 0 means the client closed, `None` that the
    /// deadline passed first.
    async fn read_more_by(&mut self, deadline: Instant) -> Option<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 2048 {
            self.buf.reserve(8192);
        }
        let len = self.buf.len();
        let read = self
            .stream
            .read(std::mem::take(&mut self.buf).slice_mut(len..));
        self.read_deadline.as_mut().reset(deadline.into());
        monoio::select! {
            biased;
            (res, slice) = read => {
                self.buf = slice.into_inner();
                Some(res)
            }
            // The buffer stays with the cancelled read; the connection is closed after this.
            _ = self.read_deadline.as_mut() => None,
        }
    }

    /// Between requests: buffers a large body grew are given back, so that a connection left
    /// idle after one does not keep up to `max_body_bytes` each.
    fn release_large_buffers(&mut self) {
        const KEEP: usize = 64 * 1024;
        if self.spare.capacity() > KEEP {
            self.spare = Vec::new();
        }
        if self.buf.capacity() > KEEP {
            self.buf.shrink_to(self.buf.len().max(8192));
        }
    }

    /// Writes all of `bytes`, or fails when that takes longer than the send timeout: the
    /// client stopped reading (the buffer then stays with the cancelled write; an empty one
    /// comes back).
    pub async fn write(&mut self, bytes: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        let deadline = Instant::now() + self.send_timeout;
        self.send_deadline.as_mut().reset(deadline.into());
        monoio::select! {
            biased;
            (res, bytes) = self.stream.write_all(bytes) => (res.map(|_| ()), bytes),
            _ = self.send_deadline.as_mut() => (
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client took no bytes within the send timeout",
                )),
                Vec::new(),
            ),
        }
    }

    /// Runs `work`, or returns `None` if the client disconnects first; the caller then drops
    /// the work (which closes its upstream connection). The watch costs a poll (epoll) or a
    /// poll op (io_uring), so it starts `from` a time that most work finishes by. A large
    /// `work` is best passed pinned (`Pin<&mut _>`), so that it is not moved into this future.
    pub async fn unless_gone<T>(
        &mut self,
        from: Instant,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        self.watch_from.as_mut().reset(from.into());
        let (from, stream, waiting) = (self.watch_from.as_mut(), &self.stream, &*self.waiting);
        let watch = std::pin::pin!(async move {
            from.await;
            client_gone(stream, waiting).await
        });
        monoio::select! {
            biased;
            r = work => Some(r),
            _ = watch => None,
        }
    }
}

/// Resolves once the client has closed its end, or the drain deadline shut it (`waiting`). A
/// client that sends more (a pipelined request) is alive, so the watch stops without consuming
/// anything (then only the drain deadline ends it: its shutdown is not seen on a socket with
/// bytes to read).
async fn client_gone(stream: &TcpStream, waiting: &Cell<Waiting>) {
    loop {
        if stream.readable(false).await.is_err() {
            return;
        }
        match peek(stream.as_raw_fd()) {
            Ok(0) => return,
            Ok(_) => {
                while waiting.get() != Waiting::Cut {
                    monoio::time::sleep(Duration::from_millis(100)).await;
                }
                return;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// Whether a socket has bytes to read (`Ok(1)`) or was closed (`Ok(0)`), without taking any
/// and without waiting: one non-blocking `MSG_PEEK` recv (`WouldBlock`: nothing yet).
pub fn peek(fd: RawFd) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid one-byte buffer for the duration of the call; MSG_PEEK leaves
    // the data in the socket for whoever reads it later, MSG_DONTWAIT returns at once.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

pub enum HeadError {
    /// Closed, or idle past the keep-alive timeout: close quietly.
    Closed,
    Bad(CodecError),
}

/// A worker's open client connections, so that a drain can close at once those waiting for a
/// next request: callers holding them in a pool would otherwise go on starting new work on an
/// instance that is going away (and have it cut at the drain deadline).
#[derive(Default)]
pub struct OpenConnections(RefCell<Slab<(RawFd, Rc<Cell<Waiting>>)>>);

impl OpenConnections {
    /// Ends the wait of every idle connection: its read returns, and the connection closes
    /// (a request that raced the drain, read whole by then, is refused as not started, like
    /// any request completed during a drain; one cut by the shutdown is closed).
    pub fn close_idle(&self) {
        for (_, (fd, waiting)) in self.0.borrow().iter() {
            if waiting.get() == Waiting::Idle {
                waiting.set(Waiting::Shut);
                // SAFETY: the fd is open: a connection leaves the set before its socket closes.
                unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
            }
        }
    }

    /// Ends the waits on every busy connection's socket (`Client::unless_gone`): the drain
    /// deadline passed (`Shared::is_cut`). Only reading stops: the answer can still say why.
    pub fn shut_busy(&self) {
        for (_, (fd, waiting)) in self.0.borrow().iter() {
            if waiting.get() == Waiting::Busy {
                waiting.set(Waiting::Cut);
                // SAFETY: as in `close_idle`.
                unsafe { libc::shutdown(*fd, libc::SHUT_RD) };
            }
        }
    }
}

/// A connection's place in `OpenConnections`, left when it drops (before the socket closes).
struct Registered<'w> {
    set: &'w OpenConnections,
    key: usize,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.set.0.borrow_mut().remove(self.key);
    }
}

pub async fn serve(worker: Rc<Worker>, stream: TcpStream) {
    // Accepted as a drain began (after `close_idle` ran): closed as an idle one would be.
    if worker.shared.is_draining() {
        return;
    }
    let mut client = Client::new(stream, worker.listener().send_timeout);
    // Declared after `client`, so dropped before it. No await separates the drain checks (above,
    // and after each request) from `read_head` marking the connection idle, so a drain closes
    // it either there or through `close_idle`.
    let _registered = Registered {
        set: &worker.connections,
        key: (worker.connections.0.borrow_mut())
            .insert((client.stream.as_raw_fd(), client.waiting.clone())),
    };
    loop {
        // Set once a head starts to arrive: a drain waits for it as for a request in flight.
        let mut arriving = None;
        let started = || arriving = Some(worker.request_in_flight());
        let head = match read_head(&mut client, &worker.listener(), started).await {
            Ok(h) => h,
            Err(HeadError::Closed) => return,
            Err(HeadError::Bad(e)) => {
                send_error(&mut client, e.kind, e.message, None, false, None, false).await;
                drop(arriving);
                return linger(&mut client).await;
            }
        };
        client.http10 = head.minor_version == 0;
        if worker.shared.is_draining() {
            // Completed after the drain began, which does not wait for it: not started, so
            // the caller can safely send it elsewhere.
            let head_only = head.method == Method::Head;
            let message =
                "the router is draining to shut down; send the request to another instance";
            send_error(
                &mut client,
                ErrorKind::ShuttingDown,
                message,
                None,
                false,
                None,
                head_only,
            )
            .await;
            drop(arriving);
            return linger(&mut client).await;
        }
        // Taken once the head is here: the wait for it may have outlasted a reload.
        let snap = worker.snapshot();
        let in_flight = arriving.unwrap_or_else(|| worker.request_in_flight());
        let keep_alive = handle(&worker, &snap, &mut client, head).await;
        drop(in_flight);
        if !keep_alive || worker.shared.is_draining() {
            return linger(&mut client).await;
        }
        client.release_large_buffers();
    }
}

/// How long a closing connection keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(1);

/// Closing a socket with unread bytes in it answers them with a reset, which can destroy the
/// response before the client has read it (a 413 sent while the body is still coming). So the
/// write side is shut first and whatever arrives is read and dropped, until the client closes
/// or `LINGER` has passed.
async fn linger(client: &mut Client) {
    let _ = client.stream.shutdown().await;
    let deadline = Instant::now() + LINGER;
    loop {
        client.buf.clear();
        match client.read_more_by(deadline).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Reads the next request head; calls `started` when part of one is here and the rest is
/// awaited (the router counts it in flight from then on, so that a drain answers it instead of
/// exiting with it half read; a head read whole at once is counted by the caller).
pub async fn read_head(
    client: &mut Client,
    l: &Listener,
    started: impl FnOnce(),
) -> Result<Head, HeadError> {
    let mut started = Some(started);
    // Both from the first wait of their kind: empty lines trickled in do not renew the idle one.
    let mut idle_deadline = None;
    let mut deadline = None;
    // Bytes already parsed without finding the end of the head: a head trickled in byte by
    // byte is parsed again only once its blank line may have come (not once per byte, which
    // is quadratic work for the client's price of one byte), or once it is over the limit.
    let mut scanned = 0;
    // The drain deadline passed with the head still arriving.
    let mut cut = false;
    let cut_off = || {
        HeadError::Bad(CodecError {
            kind: ErrorKind::ShuttingDown,
            message: "the router shut down before the request arrived whole; it was not started",
        })
    };
    loop {
        let parse = scanned == 0
            || client.buf.len() > l.max_header_bytes
            || codec::may_end_head(&client.buf, scanned);
        if !client.buf.is_empty() && parse {
            match codec::parse_request(&client.buf, l.max_header_bytes) {
                Ok(Some((head, n))) => {
                    client.buf.drain(..n);
                    return Ok(head);
                }
                Ok(None) => {}
                Err(e) => return Err(HeadError::Bad(e)),
            }
        }
        if cut {
            return Err(cut_off());
        }
        scanned = client.buf.len();
        // Idle between requests (stray empty lines are ignored there, RFC 9112 section 2.2):
        // the keep-alive timeout; once a head started: the header timeout.
        let idle = client.buf.iter().all(|&b| b == b'\r' || b == b'\n');
        let by = if idle {
            *idle_deadline.get_or_insert_with(|| Instant::now() + l.keepalive_timeout)
        } else {
            *deadline.get_or_insert_with(|| Instant::now() + l.header_timeout)
        };
        client
            .waiting
            .set(if idle { Waiting::Idle } else { Waiting::Busy });
        if !idle {
            if let Some(f) = started.take() {
                f();
            }
        }
        let read = client.read_more_by(by).await;
        let got_bytes = matches!(read, Some(Ok(n)) if n > 0);
        let state = client.waiting.replace(Waiting::Busy);
        if state == Waiting::Shut && !got_bytes {
            return Err(HeadError::Closed);
        }
        // Bytes read with the cut may complete the head (parsed above on the next turn).
        cut |= state == Waiting::Cut;
        if cut && !got_bytes {
            return Err(cut_off());
        }
        match read {
            Some(Ok(0) | Err(_)) => return Err(HeadError::Closed),
            Some(Ok(_)) => {}
            None if idle => return Err(HeadError::Closed),
            None => {
                return Err(HeadError::Bad(CodecError {
                    kind: ErrorKind::ClientTimeout,
                    message: "request head not received in time",
                }))
            }
        }
    }
}

pub async fn read_body(
    client: &mut Client,
    head: &Head,
    l: &Listener,
) -> Result<Vec<u8>, CodecError> {
    let too_large = CodecError {
        kind: ErrorKind::BodyTooLarge,
        message: "request body exceeds the configured limit",
    };
    let timed_out = CodecError {
        kind: ErrorKind::ClientTimeout,
        message: "request body not received in time",
    };
    let closed = CodecError {
        kind: ErrorKind::MalformedHttp,
        message: "connection closed inside the request body",
    };
    if let BodyFraming::Length(n) = head.framing {
        if n > l.max_body_bytes as u64 {
            return Err(too_large);
        }
    }
    if head.expect_continue && head.has_body() && client.buf.is_empty() {
        let (res, _) = client
            .write(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())
            .await;
        res.map_err(|_| closed)?;
    }
    let deadline = Instant::now() + l.body_timeout;
    let mut decoder = ChunkedDecoder::default();
    let mut body = Vec::new();
    loop {
        match head.framing {
            BodyFraming::Empty | BodyFraming::UntilClose => return Ok(body),
            BodyFraming::Length(n) => {
                let n = n as usize;
                if client.buf.len() >= n {
                    // The common case (body arrived with the head, nothing pipelined) moves the buffer.
                    if client.buf.len() == n {
                        let mut next = std::mem::take(&mut client.spare);
                        next.clear();
                        return Ok(std::mem::replace(&mut client.buf, next));
                    }
                    return Ok(client.buf.drain(..n).collect());
                }
            }
            BodyFraming::Chunked => {
                let used = decoder.decode(&client.buf, &mut body, l.max_body_bytes as u64)?;
                client.buf.drain(..used);
                if decoder.is_done() {
                    return Ok(body);
                }
            }
        }
        match client.read_more_by(deadline).await {
            Some(Ok(0) | Err(_)) => return Err(closed),
            Some(Ok(_)) => {}
            None => return Err(timed_out),
        }
    }
}

/// Answers one request; returns whether the connection stays open.
async fn handle(worker: &Worker, snap: &Snapshot, client: &mut Client, head: Head) -> bool {
    let started = Instant::now();
    let path = head.path();
    let endpoint = Endpoint::from_path(path);
    let is_get = matches!(head.method, Method::Get | Method::Head);
    // `GET /v1/models/{id}` (ids may hold slashes: `org/model:tag`).
    let model_id = path.strip_prefix("/v1/models/").filter(|id| !id.is_empty());
    let model_body = model_id.filter(|_| is_get).map(|id| snap.model_body(id));
    let local: Option<(u16, &[u8])> = match (path, is_get) {
        ("/healthz", true) => Some((200, b"{\"status\":\"ok\"}")),
        ("/readyz", true) if worker.shared.is_draining() => {
            Some((503, b"{\"status\":\"draining\"}"))
        }
        ("/readyz", true) if snap.states.any_ready() => Some((200, b"{\"status\":\"ready\"}")),
        ("/readyz", true) => Some((503, b"{\"status\":\"no healthy backend\"}")),
        ("/v1/models", true) => Some((200, &snap.models_body)),
        _ => match &model_body {
            Some(Some(body)) => Some((200, body)),
            _ => None,
        },
    };
    let known = local.is_some()
        || endpoint.is_some()
        || model_id.is_some()
        || matches!(path, "/healthz" | "/readyz" | "/v1/models");
    let proxied = matches!((endpoint, head.method), (Some(_), Method::Post));
    // A body held back until asked for (`Expect: 100-continue`) is not asked for when the head
    // alone decides the answer: it goes out at once, and the connection closes (whether the
    // body follows is the client's choice). Other bodies of requests answered locally are
    // still read, so the next pipelined request parses.
    let held_back = head.expect_continue && client.buf.is_empty() && head.has_body() && !proxied;
    let body = if held_back {
        Vec::new()
    } else {
        match read_body(client, &head, &snap.table.listener).await {
            Ok(b) => b,
            Err(e) => {
                send_error(client, e.kind, e.message, None, false, None, false).await;
                return false;
            }
        }
    };
    let keep_alive = head.keep_alive && !held_back && !worker.shared.is_draining();
    let head_only = head.method == Method::Head;
    if (path == "/v1/models" || model_id.is_some()) && is_get {
        let keys = &worker.shared.keys;
        if let Err(msg) = crate::auth::identify(keys, snap.table.auth_required, &head) {
            return send_error(
                client,
                ErrorKind::InvalidApiKey,
                msg,
                None,
                keep_alive,
                None,
                head_only,
            )
            .await;
        }
    }
    if let (Some(id), Some(None)) = (model_id, &model_body) {
        let msg = format!("The model `{id}` does not exist or is not served by this router");
        let kind = ErrorKind::ModelNotFound;
        return send_error(client, kind, &msg, None, keep_alive, None, head_only).await;
    }
    if let Some((status, content)) = local {
        // HEAD: the length GET would have, without the body.
        let mut out = response_head(status, content.len(), keep_alive, client.http10);
        if !head_only {
            out.extend_from_slice(content);
        }
        return client.write(out).await.0.is_ok() && keep_alive;
    }
    match (endpoint, head.method) {
        (Some(endpoint), Method::Post) => {
            let keep = proxy::handle(
                worker, snap, client, &head, &body, endpoint, started, keep_alive,
            )
            .await;
            client.spare = body;
            keep
        }
        _ if known => {
            let allow: &[u8] = if endpoint.is_some() {
                b"allow: POST\r\n"
            } else {
                b"allow: GET, HEAD\r\n"
            };
            send_error(
                client,
                ErrorKind::MethodNotAllowed,
                "method not allowed on this path",
                None,
                keep_alive,
                Some(allow),
                head_only,
            )
            .await
        }
        _ => {
            let msg = format!("unknown path `{path}`; Switchyard serves /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models");
            send_error(
                client,
                ErrorKind::UnknownPath,
                &msg,
                None,
                keep_alive,
                None,
                head_only,
            )
            .await
        }
    }
}

/// A response head for a locally generated JSON body.
pub fn response_head(status: u16, len: usize, keep_alive: bool, http10: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + len);
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n",
            codec::reason(status)
        )
        .as_bytes(),
    );
    connection_header(&mut out, keep_alive, http10);
    out.extend_from_slice(b"\r\n");
    out
}

/// The `connection` header an answer needs: `close` when the connection ends after it, and
/// `keep-alive` for an HTTP/1.0 client it stays open for (1.0 closes unless told otherwise).
pub fn connection_header(out: &mut Vec<u8>, keep_alive: bool, http10: bool) {
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    } else if http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
}

/// Sends an OpenAI-shaped error; `extra` is a ready header block (ending in CRLF) or None.
/// Returns whether the connection stays open (framing errors always close it).
/// `head_only` (the answer to a HEAD request) sends the head without its body, so that the
/// next pipelined request is not read as that body.
pub async fn send_error(
    client: &mut Client,
    kind: ErrorKind,
    message: &str,
    param: Option<&str>,
    keep_alive: bool,
    extra: Option<&[u8]>,
    head_only: bool,
) -> bool {
    let keep_alive = keep_alive
        && !matches!(
            kind,
            ErrorKind::MalformedHttp
                | ErrorKind::AmbiguousLength
                | ErrorKind::UnsupportedTransferCoding
                | ErrorKind::HeaderTooLarge
                | ErrorKind::BodyTooLarge
                | ErrorKind::ClientTimeout
        );
    let body = kind.body(message, param);
    let mut out = response_head(kind.status(), body.len(), keep_alive, client.http10);
    if let Some(extra) = extra {
        let at = out.len() - 2;
        out.splice(at..at, extra.iter().copied());
    }
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    client.write(out).await.0.is_ok() && keep_alive
}
