//! HTTP/1.x codec. Owns: bytes -> request/response heads, body framing (Content-Length,
//! chunked, close-delimited), chunked decoding, and the limits on heads and bodies.
//! Must not: do I/O or know about any runtime; it is driven by `conn`/`upstream` and unit-tested
//! on byte slices split at every offset.

use switchyard_shared::error::ErrorKind;
use switchyard_shared::finder;

/// Headers beyond this many are a 431 (httparse needs a fixed array; 100 is nginx's order).
pub const MAX_HEADERS: usize = 100;
/// Largest upstream response head we accept.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// Largest chunk-size line or trailer block in a chunked body.
const MAX_CHUNK_META: usize = 8 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body (a GET without length, or a response that cannot have one).
    Empty,
    Length(u64),
    Chunked,
    /// Response body runs until the upstream closes (HTTP/1.0 style).
    UntilClose,
}

/// Header name and value as byte ranges into `Head::bytes`.
type HeaderRanges = Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>;

/// A parsed head: the head bytes, copied once, with headers as ranges into them.
#[derive(Debug, Clone)]
pub struct Head {
    bytes: Vec<u8>,
    headers: HeaderRanges,
    /// Request target (requests only).
    target: std::ops::Range<usize>,
    pub method: Method,
    /// Response status (responses only).
    pub status: u16,
    pub minor_version: u8,
    pub framing: BodyFraming,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// A Connection header names options other than `close` and `keep-alive`.
    connection_options: bool,
}

impl Head {
    /// Whether a body follows the head.
    pub fn has_body(&self) -> bool {
        !matches!(self.framing, BodyFraming::Empty | BodyFraming::Length(0))
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| self.bytes[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| &self.bytes[v.clone()])
    }

    /// The header as trimmed UTF-8, `None` when absent or not UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    }

    /// Whether a Connection header names `name`: a header for this connection only, which a
    /// proxy must not pass on (RFC 9110 §7.6.1).
    pub fn is_connection_option(&self, name: &[u8]) -> bool {
        self.connection_options
            && self
                .headers()
                .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
                .any(|(_, v)| has_token(v, name))
    }

    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (&self.bytes[n.clone()], &self.bytes[v.clone()]))
    }

    pub fn target(&self) -> &str {
        // Validated as UTF-8-free ASCII token by httparse.
        std::str::from_utf8(&self.bytes[self.target.clone()]).unwrap_or("")
    }

    /// The target without its query string.
    pub fn path(&self) -> &str {
        let t = self.target();
        t.split_once('?').map_or(t, |(p, _)| p)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecError {
    pub kind: ErrorKind,
    pub message: &'static str,
}

const fn err(kind: ErrorKind, message: &'static str) -> CodecError {
    CodecError { kind, message }
}

/// Headers that describe one hop and never travel through the proxy (RFC 9110 §7.6.1).
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    lower_name(name, &mut [0; NAME_BUF]).is_some_and(is_hop_by_hop_lowered)
}

/// `is_hop_by_hop` for a name already in lower case.
pub fn is_hop_by_hop_lowered(lower: &[u8]) -> bool {
    matches!(
        lower,
        b"connection"
            | b"keep-alive"
            | b"proxy-connection"
            | b"transfer-encoding"
            | b"te"
            | b"trailer"
            | b"upgrade"
            | b"proxy-authorization"
            | b"proxy-authenticate"
    )
}

/// Room for the longest header name matched exactly anywhere (`proxy-authorization`).
pub const NAME_BUF: usize = 24;

/// `name` in lower case, copied into `buf`; `None` when it is longer than any name matched
/// exactly. Lets a name be classified by one `match` (length first, then bytes) instead of a
/// case-insensitive comparison per known name, which was a tenth of a cache hit's instructions.
pub fn lower_name<'b>(name: &[u8], buf: &'b mut [u8; NAME_BUF]) -> Option<&'b [u8]> {
    let lower = buf.get_mut(..name.len())?;
    lower.copy_from_slice(name);
    lower.make_ascii_lowercase();
    Some(lower)
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

struct Framing {
    length: Option<u64>,
    chunked: bool,
    connection_close: bool,
    connection_keep_alive: bool,
    connection_options: bool,
    expect_continue: bool,
    hosts: usize,
}

/// Reads the framing headers; rejects what could desynchronise us from a peer (RFC 9112 §6.3).
/// `minor_version`: an HTTP/1.0 message with Transfer-Encoding has faulty framing (§6.1).
fn framing(headers: &[httparse::Header<'_>], minor_version: u8) -> Result<Framing, CodecError> {
    let mut f = Framing {
        length: None,
        chunked: false,
        connection_close: false,
        connection_keep_alive: false,
        connection_options: false,
        expect_continue: false,
        hosts: 0,
    };
    let mut saw_te = false;
    let mut unsupported_te = false;
    for h in headers {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .map(str::trim)
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .ok_or(err(ErrorKind::AmbiguousLength, "invalid Content-Length"))?;
            // Only digits: a value that does not fit is simply too large.
            let n = v
                .parse::<u64>()
                .map_err(|_| err(ErrorKind::BodyTooLarge, "Content-Length exceeds the limit"))?;
            if f.length.is_some_and(|old| old != n) {
                return Err(err(
                    ErrorKind::AmbiguousLength,
                    "conflicting Content-Length headers",
                ));
            }
            f.length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // `chunked` alone, once: another coding (gzip, ...) would reach the backend still
            // encoded, and chunked twice is invalid (RFC 9112 §6.1).
            unsupported_te |= saw_te || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked");
            saw_te = true;
            f.chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") {
            f.connection_close |= has_token(h.value, b"close");
            f.connection_keep_alive |= has_token(h.value, b"keep-alive");
            f.connection_options |= h.value.split(|&b| b == b',').any(|t| {
                let t = t.trim_ascii();
                !t.is_empty()
                    && !t.eq_ignore_ascii_case(b"close")
                    && !t.eq_ignore_ascii_case(b"keep-alive")
            });
        } else if name.eq_ignore_ascii_case(b"expect") {
            f.expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"host") {
            f.hosts += 1;
        }
    }
    // Both framings is the smuggling case (400), whatever the coding; decided after the loop
    // so that the order of the headers does not change the answer.
    if saw_te && f.length.is_some() {
        return Err(err(
            ErrorKind::AmbiguousLength,
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if unsupported_te {
        return Err(err(
            ErrorKind::UnsupportedTransferCoding,
            "unsupported Transfer-Encoding: only `chunked` is accepted",
        ));
    }
    if saw_te && minor_version == 0 {
        return Err(err(
            ErrorKind::MalformedHttp,
            "Transfer-Encoding in an HTTP/1.0 message",
        ));
    }
    Ok(f)
}

impl Framing {
    /// The connection stays open: HTTP/1.1 unless `close`, HTTP/1.0 only if `keep-alive`.
    fn keep_alive(&self, minor_version: u8) -> bool {
        !self.connection_close && (minor_version > 0 || self.connection_keep_alive)
    }
}

fn collect(buf: &[u8], len: usize, headers: &[httparse::Header<'_>]) -> (Vec<u8>, HeaderRanges) {
    let base = buf.as_ptr() as usize;
    let range = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        start..start + s.len()
    };
    let ranges = headers
        .iter()
        .map(|h| (range(h.name.as_bytes()), range(h.value)))
        .collect();
    (buf[..len].to_vec(), ranges)
}

/// Whether `buf` may hold the blank line that ends a head (CRLF or bare LF line ends) in the
/// bytes from `from` on (a line end split across reads is looked at again).
pub fn may_end_head(buf: &[u8], from: usize) -> bool {
    let start = from.saturating_sub(2).min(buf.len());
    memchr::memchr_iter(b'\n', &buf[start..]).any(|i| {
        let rest = &buf[start + i + 1..];
        rest.first() == Some(&b'\n') || rest.starts_with(b"\r\n")
    })
}

/// Parses a request head from the start of `buf`. `Ok(None)`: need more bytes.
/// On success returns the head and its length in `buf`.
pub fn parse_request(buf: &[u8], max_head: usize) -> Result<Option<(Head, usize)>, CodecError> {
    // Uninitialised slots: zeroing 100 headers (3.2 KB) cost more than parsing a small head.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) if n <= max_head => n,
        Ok(httparse::Status::Complete(_)) => {
            return Err(err(ErrorKind::HeaderTooLarge, "request head too large"))
        }
        Ok(httparse::Status::Partial) if buf.len() > max_head => {
            return Err(err(ErrorKind::HeaderTooLarge, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(err(ErrorKind::HeaderTooLarge, "too many headers"))
        }
        Err(_) => return Err(err(ErrorKind::MalformedHttp, "malformed request head")),
    };
    let minor_version = req.version.unwrap_or(1);
    let f = framing(req.headers, minor_version)?;
    // RFC 9112 §3.2: exactly one Host in HTTP/1.1.
    if minor_version == 1 && f.hosts != 1 {
        return Err(err(
            ErrorKind::MalformedHttp,
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let method = match req.method.unwrap_or("") {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        _ => Method::Other,
    };
    let mut path = req.path.unwrap_or("/");
    if !path.is_ascii() {
        return Err(err(ErrorKind::MalformedHttp, "request target is not ASCII"));
    }
    // Absolute form (`POST http://host/v1/...`, RFC 9112 §3.2.2): the path is what routes.
    if let Some((scheme, rest)) = path.split_once("://") {
        if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
            // No path (`http://host`): an empty one, still a slice of `buf` (it is stored as
            // offsets), which no endpoint matches.
            path = rest.find('/').map_or(&rest[rest.len()..], |i| &rest[i..]);
        }
    }
    let target_start = path.as_ptr() as usize - buf.as_ptr() as usize;
    let (bytes, headers) = collect(buf, len, req.headers);
    let framing = match (f.chunked, f.length) {
        (true, _) => BodyFraming::Chunked,
        (false, Some(n)) => BodyFraming::Length(n),
        (false, None) => BodyFraming::Empty,
    };
    Ok(Some((
        Head {
            bytes,
            headers,
            target: target_start..target_start + path.len(),
            method,
            status: 0,
            minor_version,
            framing,
            keep_alive: f.keep_alive(minor_version),
            expect_continue: f.expect_continue && minor_version == 1,
            connection_options: f.connection_options,
        },
        len,
    )))
}

/// Parses an upstream response head. `request_was_head` suppresses the body (RFC 9112 §6.3).
pub fn parse_response(
    buf: &[u8],
    request_was_head: bool,
) -> Result<Option<(Head, usize)>, CodecError> {
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        Ok(httparse::Status::Complete(n)) if n <= MAX_RESPONSE_HEAD => n,
        Ok(httparse::Status::Partial) if buf.len() <= MAX_RESPONSE_HEAD => return Ok(None),
        // Complete or not, past the limit (one read can bring a whole head of any size).
        Ok(_) => {
            return Err(err(
                ErrorKind::UpstreamProtocol,
                "upstream response head too large",
            ))
        }
        Err(_) => {
            return Err(err(
                ErrorKind::UpstreamProtocol,
                "malformed upstream response head",
            ))
        }
    };
    let status = resp.code.unwrap_or(0);
    // httparse takes any three digits; a client may take none outside these (RFC 9110 15).
    if !(100..=599).contains(&status) {
        return Err(err(
            ErrorKind::UpstreamProtocol,
            "upstream response status is not a valid HTTP status (100-599)",
        ));
    }
    let minor_version = resp.version.unwrap_or(1);
    let f = framing(resp.headers, minor_version).map_err(|e| CodecError {
        kind: ErrorKind::UpstreamProtocol,
        ..e
    })?;
    let framing =
        if request_was_head || status == 204 || status == 304 || (100..200).contains(&status) {
            BodyFraming::Empty
        } else if f.chunked {
            BodyFraming::Chunked
        } else if let Some(n) = f.length {
            BodyFraming::Length(n)
        } else {
            BodyFraming::UntilClose
        };
    let keep_alive = framing != BodyFraming::UntilClose && f.keep_alive(minor_version);
    let (bytes, headers) = collect(buf, len, resp.headers);
    Ok(Some((
        Head {
            bytes,
            headers,
            target: 0..0,
            method: Method::Other,
            status,
            minor_version,
            framing,
            keep_alive,
            expect_continue: false,
            connection_options: f.connection_options,
        },
        len,
    )))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Whether what has arrived of a chunk-size line can be one: it starts with a hex digit and
/// holds no control byte before its CR. httparse alone takes an empty size as 0 (the last
/// chunk) and a bare LF inside an extension; a parser in front of us that ends the line there
/// would see other chunk boundaries than we do, a way to smuggle requests.
fn plain_size_line(rest: &[u8]) -> bool {
    let line = rest.split(|&b| b == b'\r').next().unwrap_or(rest);
    rest.first().is_none_or(u8::is_ascii_hexdigit) && !line.iter().any(is_control)
}

/// A control byte other than tab: nothing a line of a chunked body may hold.
fn is_control(b: &u8) -> bool {
    (*b < 0x20 && *b != b'\t') || *b == 0x7f
}

/// Whether what has arrived of a trailer line (`line`, up to its CRLF when `ended`) can be a
/// field line: a token name, a colon, and no control byte (a bare CR or LF included) that a
/// parser before us could end the line at, so that the next request hides in the trailers.
fn plain_trailer_line(line: &[u8], ended: bool) -> bool {
    // The CR of a CRLF still on its way is not part of the line yet.
    let line = if ended {
        line
    } else {
        line.strip_suffix(b"\r").unwrap_or(line)
    };
    let name_ok = |name: &[u8]| {
        !name.is_empty()
            && name
                .iter()
                .all(|b| b.is_ascii_graphic() && !b"\"(),/:;<=>?@[\\]{}".contains(b))
    };
    !line.iter().any(is_control)
        && match line.iter().position(|&b| b == b':') {
            Some(colon) => name_ok(&line[..colon]),
            None => !ended && name_ok(line),
        }
}

/// Incremental chunked-body decoder: feed it whatever arrived, it appends payload bytes to
/// `out` and says how much input it consumed; leftover input is a partial line to keep.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    decoded: u64,
    /// Bytes of trailer lines so far (bounded like a size line).
    trailers: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            decoded: 0,
            trailers: 0,
        }
    }
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from `input` into `out`, stopping once more than `limit` payload bytes would
    /// be decoded (then `Err(BodyTooLarge)`). Returns the bytes of `input` consumed.
    pub fn decode(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: u64,
    ) -> Result<usize, CodecError> {
        let bad = err(ErrorKind::MalformedHttp, "malformed chunked body");
        let mut at = 0;
        loop {
            let rest = &input[at..];
            match self.state {
                ChunkState::Done => return Ok(at),
                ChunkState::Size if !plain_size_line(rest) => return Err(bad),
                ChunkState::Size => match httparse::parse_chunk_size(rest) {
                    Ok(httparse::Status::Complete((n, size))) => {
                        at += n;
                        self.state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                        if self.decoded.saturating_add(size) > limit {
                            return Err(err(
                                ErrorKind::BodyTooLarge,
                                "chunked body exceeds the limit",
                            ));
                        }
                    }
                    Ok(httparse::Status::Partial) if rest.len() > MAX_CHUNK_META => {
                        return Err(bad)
                    }
                    Ok(httparse::Status::Partial) => return Ok(at),
                    Err(_) => return Err(bad),
                },
                ChunkState::Data(left) => {
                    if rest.is_empty() {
                        return Ok(at);
                    }
                    let take = (left as usize).min(rest.len());
                    out.extend_from_slice(&rest[..take]);
                    at += take;
                    self.decoded += take as u64;
                    self.state = if take as u64 == left {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left - take as u64)
                    };
                }
                ChunkState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(at);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(bad);
                    }
                    at += 2;
                    self.state = ChunkState::Size;
                }
                ChunkState::Trailers => match finder!(b"\r\n").find(rest) {
                    // An empty line ends the trailer section; trailer fields are dropped.
                    Some(0) => {
                        at += 2;
                        self.state = ChunkState::Done;
                    }
                    Some(i) => {
                        self.trailers += i + 2;
                        if !plain_trailer_line(&rest[..i], true) || self.trailers > MAX_CHUNK_META {
                            return Err(bad);
                        }
                        at += i + 2;
                    }
                    None if rest.is_empty() => return Ok(at),
                    None if rest.len() + self.trailers > MAX_CHUNK_META => return Err(bad),
                    None if rest == b"\r" => return Ok(at),
                    None if !plain_trailer_line(rest, false) => return Err(bad),
                    None => return Ok(at),
                },
            }
        }
    }
}

/// Appends one chunk in chunked framing (nothing for empty data: that would end the body).
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    use std::io::Write;
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The status line's reason phrase; empty for a code without a registered one (allowed).
pub fn reason(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 8192;

    /// Feeds `input` split at every offset and checks the parse only completes once whole.
    fn parse_split(input: &[u8]) -> (Head, usize) {
        for cut in 0..input.len() {
            if let Ok(Some((_, n))) = parse_request(&input[..cut], LIMIT) {
                assert!(n <= cut);
                continue;
            }
        }
        parse_request(input, LIMIT).unwrap().unwrap()
    }

    #[test]
    fn request_head_parses_at_every_split() {
        let raw = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nX-Switchyard-Service: etl\r\n\r\n{\"a\":\"b\"}xyz";
        let (head, n) = parse_split(raw);
        assert_eq!(n, raw.len() - 12);
        assert_eq!(head.method, Method::Post);
        assert_eq!(head.path(), "/v1/chat/completions");
        assert_eq!(head.target(), "/v1/chat/completions?x=1");
        assert_eq!(head.framing, BodyFraming::Length(12));
        assert_eq!(head.header_str("x-switchyard-service"), Some("etl"));
        assert!(head.keep_alive);
        for cut in 0..n {
            assert!(
                parse_request(&raw[..cut], LIMIT).unwrap().is_none(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn pipelined_requests_parse_one_after_another() {
        let raw =
            b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
        let (a, n) = parse_request(raw, LIMIT).unwrap().unwrap();
        let (b, m) = parse_request(&raw[n..], LIMIT).unwrap().unwrap();
        assert_eq!((a.path(), b.path()), ("/healthz", "/v1/models"));
        assert_eq!(n + m, raw.len());
        assert!(a.keep_alive && !b.keep_alive);
    }

    #[test]
    fn headers_named_by_connection_are_options_of_this_connection() {
        let h = |raw: &[u8]| parse_request(raw, LIMIT).unwrap().unwrap().0;
        let head = h(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Hop\r\nconnection: x-two\r\nX-Hop: 1\r\n\r\n");
        assert!(head.is_connection_option(b"x-hop") && head.is_connection_option(b"X-TWO"));
        assert!(!head.is_connection_option(b"host") && head.keep_alive);
        let head = h(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert!(!head.connection_options && !head.is_connection_option(b"close"));
        let (resp, _) = parse_response(
            b"HTTP/1.1 200 OK\r\nconnection: x-secret\r\ncontent-length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(resp.is_connection_option(b"x-secret"));
    }

    #[test]
    fn keep_alive_follows_version_and_connection() {
        let h = |raw: &[u8]| parse_request(raw, LIMIT).unwrap().unwrap().0;
        assert!(!h(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(h(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(!h(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: foo, close\r\n\r\n").keep_alive);
        assert!(
            h(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .expect_continue
        );
    }

    #[test]
    fn bad_heads_get_the_right_error() {
        let e = |raw: &[u8]| parse_request(raw, LIMIT).unwrap_err().kind;
        assert_eq!(
            e(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ErrorKind::AmbiguousLength
        );
        assert_eq!(
            e(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            ErrorKind::AmbiguousLength
        );
        assert_eq!(
            e(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n"),
            ErrorKind::AmbiguousLength
        );
        assert_eq!(
            e(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1e3\r\n\r\n"),
            ErrorKind::AmbiguousLength
        );
        for coding in [
            &b"gzip"[..],
            b"gzip, chunked",
            b"chunked, chunked",
            b"chunked\r\nTransfer-Encoding: chunked",
            b"chunked\r\nTransfer-Encoding: gzip",
        ] {
            let head = [
                &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "[..],
                coding,
                b"\r\n\r\n",
            ]
            .concat();
            assert_eq!(
                e(&head),
                ErrorKind::UnsupportedTransferCoding,
                "{}",
                String::from_utf8_lossy(coding)
            );
        }
        // Both framings is a 400 whatever the coding and the order of the headers.
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: gzip\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        ] {
            assert_eq!(e(head), ErrorKind::AmbiguousLength);
        }
        let chunked = parse_request(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked \r\n\r\n",
            LIMIT,
        );
        assert!(chunked.unwrap().unwrap().0.framing == BodyFraming::Chunked);
        assert_eq!(
            e(b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n"),
            ErrorKind::MalformedHttp
        );
        assert_eq!(e(b"\x00\x01garbage\r\n\r\n"), ErrorKind::MalformedHttp);
        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(e(&many), ErrorKind::HeaderTooLarge);
        let big = [
            b"GET / HTTP/1.1\r\nHost: a\r\nx: ".as_slice(),
            &vec![b'a'; LIMIT],
        ]
        .concat();
        assert_eq!(
            e(&big),
            ErrorKind::HeaderTooLarge,
            "a partial head over the limit fails early"
        );
        // Exactly at the limit still parses.
        let mut exact = b"GET / HTTP/1.1\r\nHost: a\r\nx: ".to_vec();
        exact.resize(LIMIT - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&exact, LIMIT).unwrap().unwrap().1, LIMIT);
        exact.insert(20, b'a');
        assert_eq!(e(&exact), ErrorKind::HeaderTooLarge);
    }

    fn decode_split(body: &[u8], limit: u64) -> Result<Vec<u8>, CodecError> {
        // Feed in pieces of every size from 1 up, keeping unconsumed bytes like a connection does.
        let mut results = Vec::new();
        for step in 1..=body.len().max(1) {
            let mut dec = ChunkedDecoder::default();
            let (mut out, mut pending) = (Vec::new(), Vec::new());
            let mut result = Ok(());
            for piece in body.chunks(step) {
                pending.extend_from_slice(piece);
                match dec.decode(&pending, &mut out, limit) {
                    Ok(n) => {
                        pending.drain(..n);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            results.push(result.map(|_| {
                assert!(dec.is_done(), "step {step}");
                out
            }));
        }
        let first = results[0].clone();
        assert!(results.iter().all(|r| *r == first));
        first
    }

    #[test]
    fn chunked_bodies_decode_at_every_split() {
        let body = b"4\r\nWiki\r\n6;ext=1\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n";
        assert_eq!(
            decode_split(body, 1 << 20).unwrap(),
            b"Wikipedia in \r\n\r\nchunks."
        );
        assert_eq!(decode_split(b"0\r\n\r\n", 10).unwrap(), b"");
    }

    #[test]
    fn chunked_errors_and_limits() {
        assert_eq!(
            decode_split(b"4\r\nWikiXX0\r\n\r\n", 100).unwrap_err().kind,
            ErrorKind::MalformedHttp
        );
        for bad in [
            &b"zz\r\n"[..],
            b"\r\n",
            b"5;ext\nhello\r\n0\r\n\r\n",
            b"5;a=\x01\r\nhello\r\n0\r\n\r\n",
            b" 5\r\nhello\r\n0\r\n\r\n",
            // A bare LF in the trailers: another parser sees a second request there.
            b"0\r\n\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n",
            b"0\r\nX-T: v\nGET /x HTTP/1.1\r\n\r\n",
            b"0\r\nnot a field\r\n\r\n",
            b"0\r\nX-T: a\rb\r\n\r\n",
        ] {
            let e = decode_split(bad, 100).unwrap_err();
            assert_eq!(
                e.kind,
                ErrorKind::MalformedHttp,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            decode_split(b"5 ;name=\"v\"\r\nhello\r\n0\r\n\r\n", 100).unwrap(),
            b"hello",
            "extensions are still read past"
        );
        assert_eq!(
            decode_split(b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", 9)
                .unwrap_err()
                .kind,
            ErrorKind::BodyTooLarge
        );
        assert_eq!(
            decode_split(b"5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n", 10).unwrap(),
            b"helloworld"
        );
        assert_eq!(
            decode_split(b"5\r\nhello\r\n0\r\nX-Trace: a\r\nEmpty:\r\n\r\n", 10).unwrap(),
            b"hello",
            "trailer fields are read past"
        );
    }

    #[test]
    fn request_lines_and_hosts_per_rfc_9112() {
        let e = |raw: &[u8]| parse_request(raw, LIMIT).unwrap_err().kind;
        let h = |raw: &[u8]| parse_request(raw, LIMIT).unwrap().unwrap().0;
        assert_eq!(e(b"GET / HTTP/1.1\r\n\r\n"), ErrorKind::MalformedHttp);
        assert_eq!(
            e(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            ErrorKind::MalformedHttp
        );
        assert_eq!(h(b"GET /healthz HTTP/1.0\r\n\r\n").path(), "/healthz");
        assert_eq!(
            e(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ErrorKind::MalformedHttp
        );
        assert!(!h(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n").keep_alive);
        assert_eq!(
            e(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n"),
            ErrorKind::BodyTooLarge
        );
        assert_eq!(
            e(b"GET /\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n"),
            ErrorKind::MalformedHttp
        );
        let absolute =
            h(b"POST http://router:8080/v1/chat/completions?x=1 HTTP/1.1\r\nHost: router\r\n\r\n");
        assert_eq!(
            (absolute.path(), absolute.target()),
            ("/v1/chat/completions", "/v1/chat/completions?x=1")
        );
        // No path at all: an empty one, which no endpoint matches.
        for target in [&b"http://router"[..], b"https://router?x=1", b"http://"] {
            let head = [&b"POST "[..], target, b" HTTP/1.1\r\nHost: router\r\n\r\n"].concat();
            assert_eq!(h(&head).path(), "", "{}", String::from_utf8_lossy(target));
        }
    }

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for from in 0..head.len() {
            assert!(may_end_head(head, from), "from {from}");
        }
        assert!(!may_end_head(&head[..head.len() - 1], 0));
        assert!(may_end_head(b"GET / HTTP/1.0\n\n", 14));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
    }

    #[test]
    fn response_framing() {
        let r = |raw: &[u8], head: bool| parse_response(raw, head).unwrap().unwrap().0;
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false).framing,
            BodyFraming::Length(5)
        );
        assert_eq!(
            r(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .framing,
            BodyFraming::Chunked
        );
        let close = r(b"HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!(
            (close.framing, close.keep_alive),
            (BodyFraming::UntilClose, false)
        );
        assert_eq!(
            r(b"HTTP/1.1 204 No Content\r\n\r\n", false).framing,
            BodyFraming::Empty
        );
        assert_eq!(
            r(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).framing,
            BodyFraming::Empty
        );
        assert_eq!(
            r(
                b"HTTP/1.1 500 x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                false
            )
            .status,
            500
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n", false)
            .unwrap()
            .is_none());
        assert_eq!(
            parse_response(b"SSH-2.0-OpenSSH\r\n\r\n", false)
                .unwrap_err()
                .kind,
            ErrorKind::UpstreamProtocol
        );
        // Three digits, but no HTTP status.
        for status in ["099", "600", "999"] {
            let raw = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
            assert!(parse_response(raw.as_bytes(), false).is_err(), "{status}");
        }
        // A head over the limit that arrived whole in one read.
        let big = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\nContent-Length: 0\r\n\r\n",
            "a".repeat(MAX_RESPONSE_HEAD)
        );
        let e = parse_response(big.as_bytes(), false).unwrap_err();
        assert_eq!(e.message, "upstream response head too large");
    }

    #[test]
    fn chunk_encoding_round_trips() {
        let mut out = Vec::new();
        encode_chunk(&mut out, b"hello world, this is 31 bytes!!");
        encode_chunk(&mut out, b"");
        out.extend_from_slice(LAST_CHUNK);
        let mut dec = ChunkedDecoder::default();
        let mut body = Vec::new();
        assert_eq!(dec.decode(&out, &mut body, 100).unwrap(), out.len());
        assert_eq!(body, b"hello world, this is 31 bytes!!");
        assert!(is_hop_by_hop(b"Transfer-Encoding") && !is_hop_by_hop(b"content-type"));
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    /// Valid messages with bytes flipped, inserted and cut: no parser may panic, and whatever
    /// a parser consumes stays within its input.
    #[test]
    fn mutated_input_never_panics() {
        let seeds: [&[u8]; 5] = [
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            b"5\r\nhello\r\n1;x=y\r\n!\r\n0\r\nTrailer: v\r\n\r\n",
            b"GET /v1/models?x=1 HTTP/1.0\r\nConnection: keep-alive\r\nExpect: 100-continue\r\n\r\n",
            b"POST https://r/v1/embeddings HTTP/1.1\r\nHost: r\r\n\r\n",
        ];
        // Seeded so that failures reproduce.
        let mut rng = fastrand::Rng::with_seed(0x5eed_1234_abcd_0001);
        for round in 0..20_000 {
            let mut input = seeds[round % seeds.len()].to_vec();
            for _ in 0..1 + rng.usize(..6) {
                let at = rng.usize(..input.len() + 1);
                match rng.usize(..4) {
                    0 if at < input.len() => input[at] = rng.u8(..),
                    1 => input.insert(
                        at,
                        [b'\r', b'\n', b':', b' ', b'0', b'f', 0xff][rng.usize(..7)],
                    ),
                    2 => input.truncate(at),
                    _ => input.insert(at, rng.u8(..)),
                }
            }
            if let Ok(Some((head, n))) = parse_request(&input, 1024) {
                assert!(n <= input.len() && head.path().len() <= head.target().len());
            }
            if let Ok(Some((_, n))) = parse_response(&input, round % 2 == 0) {
                assert!(n <= input.len());
            }
            let mut out = Vec::new();
            if let Ok(n) = ChunkedDecoder::default().decode(&input, &mut out, 64) {
                assert!(n <= input.len() && out.len() <= 64);
            }
        }
    }
}
