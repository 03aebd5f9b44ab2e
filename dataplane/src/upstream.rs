//! Upstream connections. Owns: connecting (TCP_NODELAY, timeouts, rustls with webpki roots and
//! SNI for https), the per-core keep-alive pool, sending one request and reading its response
//! head, and reading the response body by its framing.
//! Must not: decide where to send (balancer/proxy do), or pool a connection whose I/O was
//! cancelled or whose response was not read to its end.

use crate::codec::{self, BodyFraming, ChunkedDecoder, Head};
use crate::resolve::Resolved;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::time::Sleep;
use std::cell::{Cell, RefCell};
use std::io;
use std::net::ToSocketAddrs;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_shared::error::ErrorKind;
use switchyard_shared::routing::{Backend, Scheme};

/// Read buffer growth step; SSE events and JSON answers are a few KiB at most.
const READ_CHUNK: usize = 16 * 1024;
/// Idle pooled connections kept per backend per core.
const POOL_MAX_IDLE: usize = 256;
/// Pooled connections idle longer than this are closed instead of reused: servers drop idle
/// keep-alive connections (uvicorn after 5 s by default), and a stale one costs a retry.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

pub enum Conn {
    Plain(TcpStream),
    /// With its TCP socket's descriptor (the TLS stream does not lend its socket out).
    Tls(Box<monoio_rustls::ClientTlsStream<TcpStream>>, RawFd),
}

impl Conn {
    fn fd(&self) -> RawFd {
        match self {
            Conn::Plain(s) => s.as_raw_fd(),
            Conn::Tls(_, fd) => *fd,
        }
    }

    /// Whether the connection is open with nothing to read, as an idle kept connection must
    /// be before it carries a request: bytes the backend wrote while it idled (a 408 sent
    /// before closing, a late or stray answer) would be read as that request's answer, and
    /// one the backend closed would fail it. One non-blocking peek.
    fn is_quiet(&self) -> bool {
        matches!(crate::conn::peek(self.fd()), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads more bytes after `buf`'s current contents; returns the count (0 = closed).
    pub async fn read_more(&mut self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let len = buf.len();
        let (res, slice) = match self {
            Conn::Plain(s) => s.read(buf.slice_mut(len..)).await,
            Conn::Tls(s, _) => s.read(buf.slice_mut(len..)).await,
        };
        (res, slice.into_inner())
    }

    pub async fn write_all(&mut self, buf: Vec<u8>) -> (io::Result<()>, Vec<u8>) {
        match self {
            Conn::Plain(s) => {
                let (res, buf) = s.write_all(buf).await;
                (res.map(|_| ()), buf)
            }
            Conn::Tls(s, _) => {
                let (res, buf) = s.write_all(buf).await;
                let res = match res {
                    Ok(_) => s.flush().await,
                    Err(e) => Err(e),
                };
                (res, buf)
            }
        }
    }
}

/// The rustls client config for a backend: the web PKI roots, plus its own CA file if set.
/// Built once per snapshot, so a connection only clones an `Arc`.
pub fn tls_config(backend: &Backend) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = &backend.tls_ca_file {
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
            format!(
                "backend `{}`: tls_ca_file `{path}`: cannot read it: {e}",
                backend.name
            )
        })?;
        for cert in certs {
            let cert = cert.map_err(|e| {
                format!(
                    "backend `{}`: tls_ca_file `{path}`: bad certificate: {e}",
                    backend.name
                )
            })?;
            roots.add(cert).map_err(|e| {
                format!(
                    "backend `{}`: tls_ca_file `{path}`: unusable CA certificate: {e}",
                    backend.name
                )
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

#[derive(Debug, Clone)]
pub struct AttemptError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AttemptError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AttemptError {
            kind,
            message: message.into(),
        }
    }
}

async fn connect(
    b: &Backend,
    tls: Option<&Arc<rustls::ClientConfig>>,
    resolved: &Resolved,
) -> Result<Conn, AttemptError> {
    let fail = |e: io::Error| {
        AttemptError::new(
            ErrorKind::UpstreamConnect,
            format!("connect to backend `{}` failed: {e}", b.name),
        )
    };
    let work = async {
        let stream = match b.host.parse::<std::net::IpAddr>() {
            Ok(ip) => TcpStream::connect_addr((ip, b.port).into()).await,
            Err(_) => {
                let addrs = match resolved.get(&b.host, b.port) {
                    Some(addrs) => addrs,
                    // Not looked up yet (a name just added): this once, on the worker.
                    None => (b.host.as_str(), b.port)
                        .to_socket_addrs()
                        .map_err(fail)?
                        .collect(),
                };
                // The first address that takes the connection (a name may resolve to an
                // IPv6 address the server does not listen on before its IPv4 one).
                let mut last = io::Error::other(format!("`{}` does not resolve", b.host));
                let mut connected = None;
                for addr in addrs.iter() {
                    match TcpStream::connect_addr(*addr).await {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                connected.ok_or(last)
            }
        }
        .map_err(fail)?;
        stream.set_nodelay(true).map_err(fail)?;
        match b.scheme {
            Scheme::Http => Ok(Conn::Plain(stream)),
            Scheme::Https => {
                let Some(tls) = tls else {
                    return Err(AttemptError::new(
                        ErrorKind::UpstreamConnect,
                        format!("backend `{}`: no TLS config", b.name),
                    ));
                };
                let name =
                    rustls::pki_types::ServerName::try_from(b.host.clone()).map_err(|e| {
                        AttemptError::new(
                            ErrorKind::UpstreamConnect,
                            format!("backend `{}`: bad TLS server name: {e}", b.name),
                        )
                    })?;
                let fd = stream.as_raw_fd();
                let tls = monoio_rustls::TlsConnector::from(tls.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| {
                        // As an io::Error it says why (an unknown issuer, a name that does not
                        // match, ...); monoio-rustls's own error says only "io error".
                        let e = io::Error::from(e);
                        AttemptError::new(
                            ErrorKind::UpstreamConnect,
                            format!("TLS handshake with backend `{}` failed: {e}", b.name),
                        )
                    })?;
                Ok(Conn::Tls(Box::new(tls), fd))
            }
        }
    };
    match monoio::time::timeout(b.connect_timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(AttemptError::new(
            ErrorKind::UpstreamTimeout,
            format!("connect to backend `{}` timed out", b.name),
        )),
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Keep-alive connections of one worker, per backend index of the current table.
#[derive(Default)]
pub struct Pool {
    idle: RefCell<Vec<Vec<Idle>>>,
    /// Config version the slots belong to; a new table starts from empty slots.
    version: std::cell::Cell<u64>,
}

impl Pool {
    fn take(&self, version: u64, backend: usize) -> Option<Conn> {
        let mut idle = self.idle.borrow_mut();
        if self.version.get() != version {
            idle.clear();
            self.version.set(version);
        }
        let slot = idle.get_mut(backend)?;
        close_expired(slot, Instant::now());
        // The others are closed as they are dropped.
        std::iter::from_fn(|| slot.pop())
            .map(|c| c.conn)
            .find(Conn::is_quiet)
    }

    /// Returns a connection whose last response was read completely.
    pub fn put(&self, version: u64, backend: usize, conn: Conn) {
        let mut idle = self.idle.borrow_mut();
        if self.version.get() != version {
            return;
        }
        if idle.len() <= backend {
            idle.resize_with(backend + 1, Vec::new);
        }
        let slot = &mut idle[backend];
        let now = Instant::now();
        close_expired(slot, now);
        if slot.len() < POOL_MAX_IDLE {
            slot.push(Idle { conn, since: now });
        }
    }

    /// Closes the connections of every backend that idled past the timeout.
    fn close_all_expired(&self, now: Instant) {
        for slot in self.idle.borrow_mut().iter_mut() {
            close_expired(slot, now);
        }
    }
}

/// Closes a slot's connections that idled past the timeout. Taken last in, first out, so the
/// oldest are at the bottom, where after a burst they would stay (holding a socket the backend
/// has closed or will) while a few on top serve the traffic.
fn close_expired(slot: &mut Vec<Idle>, now: Instant) {
    let expired = slot
        .iter()
        .take_while(|c| now.duration_since(c.since) >= POOL_IDLE_TIMEOUT)
        .count();
    slot.drain(..expired);
}

/// A worker's sweep of its pool, once per idle timeout: connections to a backend that no
/// longer gets traffic would otherwise stay open until its next request.
pub async fn sweep_pool(worker: std::rc::Rc<crate::server::Worker>) {
    while !worker.shared.is_draining() {
        monoio::time::sleep(POOL_IDLE_TIMEOUT).await;
        worker.pool.close_all_expired(Instant::now());
    }
}

/// How soon after the request went out a closed pooled connection counts as one the server
/// had already closed while idle (its FIN or reset meets our request within a round trip).
const STALE_WINDOW: Duration = Duration::from_millis(250);

/// A response whose head has arrived; the body is read through `body`.
pub struct Response {
    pub conn: Conn,
    pub head: Head,
    pub body: BodyReader,
}

/// Sends `request` (head and body, already encoded) and waits for the response head.
/// A pooled connection that fails at once, before any response byte, was probably closed by
/// the server while idle: the request is resent once on a fresh connection, invisibly to the
/// caller. One that fails later may have been working on it (a backend dying mid-generation):
/// that is an attempt's failure, not resent here, so an inference is not run twice unseen.
/// `written` is set (to when) once the request is written on the connection that answers or
/// fails for good: from then on the backend has it.
#[allow(clippy::too_many_arguments)]
pub async fn exchange(
    pool: &Pool,
    version: u64,
    backend_idx: usize,
    backend: &Backend,
    tls: Option<&Arc<rustls::ClientConfig>>,
    resolved: &Resolved,
    request: Vec<u8>,
    is_head: bool,
    written: &Cell<Option<Instant>>,
) -> Result<Response, AttemptError> {
    let mut request = request;
    if let Some(conn) = pool.take(version, backend_idx) {
        match send_on(conn, backend, request, is_head, written).await {
            Ok(r) => return Ok(r),
            Err((e, req, stale)) => {
                if !stale {
                    return Err(e);
                }
                // Written to a connection the backend had closed: it never read it.
                written.set(None);
                request = req;
            }
        }
    }
    let conn = connect(backend, tls, resolved).await?;
    send_on(conn, backend, request, is_head, written)
        .await
        .map_err(|(e, _, _)| e)
}

/// Requests up to this size fit the kernel's socket buffers (a send buffer starts at 16 KiB)
/// whether or not the backend reads: writing them never waits on the backend.
const UNTIMED_WRITE_BYTES: usize = 16 * 1024;

/// `Err((error, request, nothing_received))`: the request comes back for a resend.
async fn send_on(
    mut conn: Conn,
    backend: &Backend,
    request: Vec<u8>,
    is_head: bool,
    written: &Cell<Option<Instant>>,
) -> Result<Response, (AttemptError, Vec<u8>, bool)> {
    // The backend must take the request within the first-byte time too: one that stopped
    // reading (hung, with its accept queue still open) would hold the attempt forever. Not
    // taken whole, it was never read as a request: failing over is safe. A small request
    // cannot wait on that (the socket buffers take it whole), and is written untimed (cheaper).
    let write = if request.len() <= UNTIMED_WRITE_BYTES {
        Some(conn.write_all(request).await)
    } else {
        monoio::select! {
            biased;
            w = conn.write_all(request) => Some(w),
            _ = monoio::time::sleep(backend.first_byte_timeout) => None,
        }
    };
    let Some((res, request)) = write else {
        let msg = format!(
            "backend `{}` did not take the request within {:?}",
            backend.name, backend.first_byte_timeout
        );
        let e = AttemptError::new(ErrorKind::UpstreamTimeout, msg);
        return Err((e, Vec::new(), false));
    };
    if let Err(e) = res {
        let msg = format!("sending to backend `{}` failed: {e}", backend.name);
        return Err((
            AttemptError::new(ErrorKind::UpstreamConnect, msg),
            request,
            true,
        ));
    }
    let sent = Instant::now();
    written.set(Some(sent));
    // One timer for the whole head, beside the reads rather than wrapped around each (a
    // wrapper is one more move of the read's future per request).
    let mut deadline = std::pin::pin!(monoio::time::sleep_until(
        (sent + backend.first_byte_timeout).into()
    ));
    let mut buf = Vec::with_capacity(READ_CHUNK);
    // An interim response (100 Continue, 103 Early Hints) came: the backend has the request.
    let mut interim = false;
    loop {
        let read = monoio::select! {
            biased;
            r = conn.read_more(buf) => Ok(r),
            _ = deadline.as_mut() => Err(()),
        };
        let (res, b) = match read {
            Ok(r) => r,
            Err(()) => {
                let msg = format!(
                    "backend `{}` sent no response head within {:?}",
                    backend.name, backend.first_byte_timeout
                );
                return Err((
                    AttemptError::new(ErrorKind::UpstreamTimeout, msg),
                    request,
                    false,
                ));
            }
        };
        buf = b;
        match res {
            Ok(0) | Err(_) if buf.is_empty() => {
                // At once: a kept connection the backend had closed (resent on a fresh one).
                // Later, or after an interim response (it read the request): the backend took
                // the request and went away (crashed, restarted).
                let waited = sent.elapsed();
                let stale = waited < STALE_WINDOW && !interim;
                let (kind, msg) = if stale {
                    let msg = format!(
                        "backend `{}` closed the connection before responding",
                        backend.name
                    );
                    (ErrorKind::UpstreamConnect, msg)
                } else {
                    let msg = format!(
                        "backend `{}` closed the connection {waited:.1?} after taking the request, without responding",
                        backend.name
                    );
                    (ErrorKind::UpstreamProtocol, msg)
                };
                return Err((AttemptError::new(kind, msg), request, stale));
            }
            Ok(0) | Err(_) => {
                let msg = format!(
                    "backend `{}` closed the connection inside the response head",
                    backend.name
                );
                return Err((
                    AttemptError::new(ErrorKind::UpstreamProtocol, msg),
                    request,
                    false,
                ));
            }
            Ok(_) => {}
        }
        // Interim responses (100 Continue, 103 Early Hints) precede the real one, which may
        // have arrived in the same read.
        loop {
            match codec::parse_response(&buf, is_head) {
                Ok(None) => break,
                Ok(Some((head, n))) if (100..200).contains(&head.status) => {
                    buf.drain(..n);
                    interim = true;
                }
                Ok(Some((head, n))) => {
                    buf.drain(..n);
                    let body = BodyReader::new(head.framing, buf);
                    return Ok(Response { conn, head, body });
                }
                Err(e) => {
                    return Err((
                        AttemptError::new(
                            e.kind,
                            format!("backend `{}`: {}", backend.name, e.message),
                        ),
                        request,
                        false,
                    ))
                }
            }
        }
    }
}

/// Reads a response body by its framing, decoding chunked transfer coding.
pub struct BodyReader {
    framing: BodyFraming,
    /// Raw bytes received and not yet decoded.
    raw: Vec<u8>,
    remaining: u64,
    chunked: ChunkedDecoder,
    done: bool,
}

/// Decoded bodies are never limited: the proxy streams them through.
const NO_LIMIT: u64 = u64::MAX;

impl BodyReader {
    fn new(framing: BodyFraming, raw: Vec<u8>) -> Self {
        let remaining = match framing {
            BodyFraming::Length(n) => n,
            _ => 0,
        };
        BodyReader {
            framing,
            raw,
            remaining,
            chunked: ChunkedDecoder::default(),
            done: framing == BodyFraming::Empty
                || remaining == 0 && matches!(framing, BodyFraming::Length(_)),
        }
    }

    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn framing(&self) -> BodyFraming {
        self.framing
    }

    /// Whether the connection may be pooled: body read to its end and nothing extra sent.
    pub fn reusable(&self) -> bool {
        self.done && self.raw.is_empty() && self.framing != BodyFraming::UntilClose
    }

    /// Moves whatever decoded body bytes are already buffered into `out`, without reading.
    pub fn decode(&mut self, out: &mut Vec<u8>) -> Result<(), AttemptError> {
        match self.framing {
            BodyFraming::Empty => self.done = true,
            BodyFraming::Length(_) => {
                let take = (self.remaining as usize).min(self.raw.len());
                out.extend_from_slice(&self.raw[..take]);
                self.raw.drain(..take);
                self.remaining -= take as u64;
                self.done = self.remaining == 0;
            }
            BodyFraming::Chunked => {
                let n = self
                    .chunked
                    .decode(&self.raw, out, NO_LIMIT)
                    .map_err(|e| AttemptError::new(ErrorKind::UpstreamProtocol, e.message))?;
                self.raw.drain(..n);
                self.done = self.chunked.is_done();
            }
            BodyFraming::UntilClose => out.append(&mut self.raw),
        }
        Ok(())
    }

    /// Appends the next decoded bytes to `out`, reading from `conn` when none are buffered.
    /// Returns `Ok(false)` once the body has ended. `(idle, timer, from)`: fails when the
    /// backend sends nothing for `idle` from `from` (any bytes start the wait again), timed by
    /// `timer` (one for the whole body: moving it forward costs less than a new one per read).
    pub async fn next(
        &mut self,
        conn: &mut Conn,
        (idle, mut timer, mut from): (Duration, Pin<&mut Sleep>, Instant),
        out: &mut Vec<u8>,
    ) -> Result<bool, AttemptError> {
        loop {
            let before = out.len();
            self.decode(out)?;
            if out.len() > before {
                return Ok(true);
            }
            if self.done {
                return Ok(false);
            }
            let raw = std::mem::take(&mut self.raw);
            timer.as_mut().reset((from + idle).into());
            let (res, raw) = monoio::select! {
                biased;
                r = conn.read_more(raw) => r,
                _ = timer.as_mut() => {
                    return Err(AttemptError::new(
                        ErrorKind::UpstreamTimeout,
                        format!("backend sent nothing for {idle:?} mid-response"),
                    ))
                }
            };
            self.raw = raw;
            match res {
                Ok(0) if self.framing == BodyFraming::UntilClose => {
                    self.done = true;
                    return Ok(false);
                }
                Ok(0) => {
                    return Err(AttemptError::new(
                        ErrorKind::UpstreamBroken,
                        "backend closed the connection mid-response",
                    ))
                }
                Err(e) => {
                    return Err(AttemptError::new(
                        ErrorKind::UpstreamBroken,
                        format!("reading from backend failed mid-response: {e}"),
                    ))
                }
                // Bytes that complete nothing yet (a chunk's size line) count as heard too.
                Ok(_) => from = Instant::now(),
            }
        }
    }
}
