//! Server-sent-event relay filter. Owns: splitting a decoded `text/event-stream` body into
//! whole events as bytes arrive, reading `usage` from the events that carry it, and hiding the
//! usage-only chunk the router asked for on the caller's behalf.
//! Must not: delay an event once its terminating blank line has arrived, or alter an event.

use switchyard_shared::finder;
use switchyard_shared::openai::{parse_usage, TokenUsage};

/// The most of one unfinished event held back (LLM events are a few hundred bytes).
const MAX_PENDING_EVENT: usize = 8 * 1024 * 1024;

#[derive(Debug, Default)]
pub struct SseFilter {
    pending: Vec<u8>,
    /// Offset in `pending` where the current (unfinished) line starts.
    line_start: usize,
    /// How much of `pending` has been searched for line ends: a long line is searched once,
    /// not again with every piece of it that arrives.
    scanned: usize,
    /// The last bytes ended with a CR taken as a line end: an LF first in the next ones is
    /// the rest of that CRLF, not a line end of its own.
    after_cr: bool,
    /// Drop the final `choices: []` usage chunk (the caller did not ask for it).
    hide_usage_chunk: bool,
    pub usage: Option<TokenUsage>,
    pub saw_done: bool,
    /// The upstream sent an `error` event itself.
    pub saw_error: bool,
    /// `data:` lines in the events passed on (servers send one per token event, and `[DONE]`).
    pub data_lines_passed: u64,
    /// A choice finished with `stop` or `length`...
    finished: bool,
    /// ...and none finished any other way (tool calls, content filter, ...).
    finished_otherwise: bool,
}

impl SseFilter {
    pub fn new(hide_usage_chunk: bool) -> Self {
        SseFilter {
            hide_usage_chunk,
            ..Default::default()
        }
    }

    /// Takes decoded body bytes; appends every event they complete to `out`, verbatim.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.pending.is_empty() {
            // The usual case, whole events per read: passed on from `data` itself, and only an
            // unfinished rest is kept.
            let (end, line_start) = self.pass_events(data, 0, 0, out);
            self.pending.extend_from_slice(&data[end..]);
            self.line_start = line_start - end;
        } else {
            let mut pending = std::mem::take(&mut self.pending);
            pending.extend_from_slice(data);
            let scan = self.scanned.max(self.line_start);
            let (end, line_start) = self.pass_events(&pending, self.line_start, scan, out);
            pending.drain(..end);
            self.line_start = line_start - end;
            self.pending = pending;
        }
        self.scanned = self.pending.len();
        // An event that does not end is passed on as it is rather than held without bound;
        // the filter only misses what it would have read in it.
        if self.pending.len() > MAX_PENDING_EVENT {
            out.append(&mut self.pending);
            self.reset_line();
        }
    }

    /// Passes on the complete events of `buf`, whose current line starts at `line_start` and
    /// has been searched for its end up to `scan`; returns where the unfinished rest starts and
    /// where its last line starts.
    fn pass_events(
        &mut self,
        buf: &[u8],
        mut line_start: usize,
        mut scan: usize,
        out: &mut Vec<u8>,
    ) -> (usize, usize) {
        let mut event_start = 0;
        if scan < buf.len() && std::mem::take(&mut self.after_cr) && buf[scan] == b'\n' {
            scan += 1;
            line_start = scan;
        }
        // Lines end with LF, CRLF or CR, as the event-stream format allows.
        while let Some(i) = memchr::memchr2(b'\n', b'\r', &buf[scan..]) {
            let line_end = scan + i;
            let line = &buf[line_start..line_end];
            line_start = line_end + 1;
            if buf[line_end] == b'\r' {
                match buf.get(line_start) {
                    Some(b'\n') => line_start += 1,
                    Some(_) => {}
                    // Taken as a line end now: an event must not wait for the next bytes.
                    None => self.after_cr = true,
                }
            }
            scan = line_start;
            // A blank line ends the event.
            if line.is_empty() {
                let event = &buf[event_start..line_start];
                if self.keep_event(event) {
                    out.extend_from_slice(event);
                }
                event_start = line_start;
            }
        }
        (event_start, line_start)
    }

    /// Bytes of the unfinished event held back.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// The body ended: an unterminated last event is read like the others and passed on as
    /// it is (clients differ on whether they take it).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let last = std::mem::take(&mut self.pending);
        if self.keep_event(&last) {
            out.extend_from_slice(&last);
        }
        self.reset_line();
    }

    fn reset_line(&mut self) {
        self.line_start = 0;
        self.scanned = 0;
        self.after_cr = false;
    }

    fn keep_event(&mut self, event: &[u8]) -> bool {
        let mut keep = true;
        let mut data_lines = 0;
        // Line ends are LF, CR or CRLF (the LF of a CRLF then yields an empty line); the last
        // line of an unterminated event has none.
        let mut rest = Some(event);
        let lines = std::iter::from_fn(|| {
            let r = rest?;
            match memchr::memchr2(b'\n', b'\r', r) {
                Some(end) => {
                    rest = Some(&r[end + 1..]);
                    Some(&r[..end])
                }
                None => {
                    rest = None;
                    Some(r)
                }
            }
        });
        for line in lines {
            let Some(data) = line.strip_prefix(b"data:") else {
                continue;
            };
            data_lines += 1;
            let data = data.strip_prefix(b" ").unwrap_or(data).trim_ascii_end();
            if data == b"[DONE]" {
                self.saw_done = true;
            } else if data
                .strip_prefix(b"{")
                .is_some_and(|d| d.trim_ascii_start().starts_with(b"\"error\""))
            {
                self.saw_error = true;
            } else if let Some(reason) = finish_reason(data) {
                if reason == b"stop" || reason == b"length" {
                    self.finished = true;
                } else {
                    self.finished_otherwise = true;
                }
            }
            if finder!(b"\"usage\"").find(data).is_some() {
                if let Some(u) = parse_usage(data) {
                    self.usage = Some(u);
                    let usage_only = value_after(data, finder!(b"\"choices\""))
                        .and_then(|v| v.strip_prefix(b"["))
                        .is_some_and(|v| v.trim_ascii_start().starts_with(b"]"));
                    keep = !(self.hide_usage_chunk && usage_only);
                }
            }
        }
        if keep {
            self.data_lines_passed += data_lines;
        }
        keep
    }

    /// The stream ended the way a complete answer does: `[DONE]`, no error event, and every
    /// finished choice stopped normally. Only such streams are cached.
    pub fn ended_normally(&self) -> bool {
        self.saw_done && !self.saw_error && self.finished && !self.finished_otherwise
    }
}

/// The string value of the first `"finish_reason"` in an event payload (`None` when absent or null).
fn finish_reason(data: &[u8]) -> Option<&[u8]> {
    let value = value_after(data, finder!(b"\"finish_reason\""))?.strip_prefix(b"\"")?;
    Some(&value[..memchr::memchr(b'"', value)?])
}

/// What follows the first `key` (a quoted name) and its colon, whitespace allowed around the
/// colon as JSON allows (Python's `json.dumps` writes `"key": value`).
fn value_after<'d>(data: &'d [u8], key: &memchr::memmem::Finder<'_>) -> Option<&'d [u8]> {
    let at = key.find(data)?;
    let rest = data[at + key.needle().len()..].trim_ascii_start();
    Some(rest.strip_prefix(b":")?.trim_ascii_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &[u8] =
        b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\r\n\r\n\
: keep-alive comment\n\n\
data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\n\n\
data: [DONE]\n\n";

    fn run(hide: bool, step: usize) -> (Vec<u8>, SseFilter) {
        let mut f = SseFilter::new(hide);
        let mut out = Vec::new();
        for piece in STREAM.chunks(step) {
            f.feed(piece, &mut out);
        }
        f.finish(&mut out);
        (out, f)
    }

    #[test]
    fn events_pass_verbatim_and_usage_is_read_at_any_split() {
        for step in 1..STREAM.len() {
            let (out, f) = run(false, step);
            assert_eq!(out, STREAM, "step {step}");
            assert_eq!(
                f.usage,
                Some(TokenUsage {
                    prompt: 7,
                    cached: 0,
                    completion: 2
                })
            );
            assert!(f.saw_done && !f.saw_error);
        }
    }

    #[test]
    fn a_normal_end_is_recognised() {
        let (_, f) = run(false, 5);
        assert!(f.ended_normally());
        let mut f = SseFilter::new(false);
        let mut out = Vec::new();
        f.feed(
            b"data: {\"choices\":[{\"finish_reason\": \"tool_calls\"}]}\n\ndata: [DONE]\n\n",
            &mut out,
        );
        assert!(!f.ended_normally(), "tool calls are not cached");
        let mut f = SseFilter::new(false);
        f.feed(
            b"data: {\"choices\":[{\"finish_reason\":\"stop\"}]}\n\n",
            &mut out,
        );
        assert!(!f.ended_normally(), "no [DONE]: cut short");
        assert_eq!(finish_reason(br#"{"finish_reason":null}"#), None);
    }

    #[test]
    fn injected_usage_chunk_is_hidden() {
        for step in [1, 7, STREAM.len()] {
            let (out, f) = run(true, step);
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("prompt_tokens"), "{text}");
            assert!(text.contains("\"Hi\"") && text.ends_with("data: [DONE]\n\n"));
            assert_eq!(f.usage.unwrap().prompt, 7);
        }
    }

    #[test]
    fn data_lines_passed_count_token_events_only() {
        // Content that looks like a field is not a line; the hidden usage chunk is not passed.
        let (_, f) = run(true, 3);
        assert_eq!(f.data_lines_passed, 3, "two token events and [DONE]");
        let mut f = SseFilter::new(false);
        f.feed(
            b"data: {\"choices\":[{\"delta\":{\"content\":\"data: x\"}}]}\n\n",
            &mut Vec::new(),
        );
        assert_eq!(f.data_lines_passed, 1);
    }

    #[test]
    fn json_written_with_spaces_is_read_the_same() {
        // Python's `json.dumps` defaults, as some OpenAI-compatible servers send them.
        let stream = b"data: {\"choices\": [{\"delta\": {}, \"finish_reason\": \"stop\"}]}\n\n\
data: {\"choices\": [ ], \"usage\": {\"prompt_tokens\": 7, \"completion_tokens\": 2}}\n\n\
data: [DONE]\n\n";
        let mut f = SseFilter::new(true);
        let mut out = Vec::new();
        f.feed(stream, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("prompt_tokens"), "{text}");
        assert!(f.ended_normally() && f.usage.is_some());
        let mut f = SseFilter::new(false);
        f.feed(
            b"data: { \"error\": {\"message\": \"x\"}}\n\n",
            &mut Vec::new(),
        );
        assert!(f.saw_error);
    }

    #[test]
    fn events_are_released_as_soon_as_complete() {
        let mut f = SseFilter::new(false);
        let mut out = Vec::new();
        f.feed(b"data: {\"a\":1}\n", &mut out);
        assert!(out.is_empty());
        f.feed(b"\ndata: {\"b\"", &mut out);
        assert_eq!(out, b"data: {\"a\":1}\n\n");
        f.feed(b":2}\n\n", &mut out);
        assert_eq!(out, b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\n");
        f.feed(b"data: {\"error\":{\"message\":\"x\"}}\n\n", &mut out);
        assert!(f.saw_error);
    }

    #[test]
    fn lines_may_end_with_cr_alone_or_mixed() {
        // The same events as STREAM with CR line ends, then with all three kinds mixed.
        let cr: Vec<u8> = String::from_utf8_lossy(STREAM)
            .replace("\r\n", "\n")
            .replace('\n', "\r")
            .into_bytes();
        let mixed = String::from_utf8_lossy(STREAM)
            .replacen("\n\n", "\r\r", 1)
            .replacen("\n\n", "\r\n\r", 2)
            .into_bytes();
        for stream in [cr, mixed] {
            for step in 1..stream.len() {
                let mut f = SseFilter::new(true);
                let mut out = Vec::new();
                for piece in stream.chunks(step) {
                    f.feed(piece, &mut out);
                }
                assert!(f.pending.is_empty(), "every event ended (step {step})");
                f.finish(&mut out);
                let text = String::from_utf8(out).unwrap();
                assert!(!text.contains("prompt_tokens"), "step {step}: {text:?}");
                assert!(text.contains("\"Hi\"") && f.saw_done && f.ended_normally());
                assert_eq!(f.usage.unwrap().prompt, 7);
                assert_eq!(f.data_lines_passed, 3, "step {step}");
            }
        }
        // An event whose blank line is a CR that ends a read goes on at once; the LF after
        // it in the next read is not another blank line.
        let mut f = SseFilter::new(false);
        let mut out = Vec::new();
        f.feed(b"data: {\"a\":1}\r\r", &mut out);
        assert_eq!(out, b"data: {\"a\":1}\r\r");
        f.feed(b"\ndata: {\"b\":2}\n", &mut out);
        assert_eq!(out, b"data: {\"a\":1}\r\r");
        f.feed(b"\n", &mut out);
        assert_eq!(out, b"data: {\"a\":1}\r\r\ndata: {\"b\":2}\n\n");
    }

    #[test]
    fn an_unterminated_last_event_is_read_like_the_others() {
        let stream: &[u8] = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}";
        for hide in [true, false] {
            let mut f = SseFilter::new(hide);
            let mut out = Vec::new();
            f.feed(stream, &mut out);
            f.finish(&mut out);
            assert_eq!(f.usage.unwrap().prompt, 3);
            assert_eq!(
                out.ends_with(b"}}"),
                !hide,
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
    }

    #[test]
    fn an_event_that_never_ends_is_passed_on_not_held() {
        let mut f = SseFilter::new(false);
        let mut out = Vec::new();
        let piece = [b'x'; 64 * 1024];
        let mut sent = 0;
        while sent <= 2 * MAX_PENDING_EVENT {
            f.feed(&piece, &mut out);
            sent += piece.len();
            assert!(f.pending.len() <= MAX_PENDING_EVENT);
        }
        assert!(!out.is_empty());
        f.feed(b"\n\ndata: [DONE]\n\n", &mut out);
        f.finish(&mut out);
        assert_eq!(out.len(), sent + 16, "every byte passes, in order");
        assert!(out.ends_with(b"\n\ndata: [DONE]\n\n") && f.saw_done);
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    #[test]
    fn arbitrary_bytes_never_panic_and_pass_through() {
        let mut rng = fastrand::Rng::with_seed(0x9e37_79b9_7f4a_7c15);
        let alphabet = b"data: {\"usage\":}[]\n\r x";
        for _ in 0..2_000 {
            let input: Vec<u8> = (0..rng.usize(..300))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let mut f = SseFilter::new(false);
            let mut out = Vec::new();
            for piece in input.chunks(rng.usize(1..=7)) {
                f.feed(piece, &mut out);
            }
            f.finish(&mut out);
            assert_eq!(out, input, "without hiding, every byte passes through");
        }
    }
}
