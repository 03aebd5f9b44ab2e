//! The one error taxonomy of the request path. Owns: mapping an error kind to its HTTP status,
//! OpenAI `error.type`/`error.code`, retry policy and the JSON error body.
//! Must not: carry secrets (messages are shown to clients verbatim).

use std::fmt::Write as _;

/// Whether a failed attempt may move to the next target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The failure says nothing about the request itself: another target may succeed.
    Yes,
    /// The request is at fault (or already answered): another target would fail the same way.
    No,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed HTTP framing; the connection is closed after the reply.
    MalformedHttp,
    /// Both Content-Length and Transfer-Encoding, or an invalid length: request smuggling risk.
    AmbiguousLength,
    /// A transfer coding other than `chunked` alone; the connection is closed after the reply.
    UnsupportedTransferCoding,
    HeaderTooLarge,
    BodyTooLarge,
    InvalidJson,
    /// Well-formed JSON that breaks the endpoint's schema (missing or mistyped field).
    InvalidRequest,
    UnknownPath,
    MethodNotAllowed,
    ModelNotFound,
    /// Every target of the route is ejected or at its concurrency cap, some ejected.
    NoHealthyTarget,
    /// Every target of the route is healthy but at its concurrency cap.
    TargetsFull,
    UpstreamConnect,
    UpstreamTimeout,
    /// The upstream answered with something that is not HTTP/1.x.
    UpstreamProtocol,
    /// The upstream answered 429 or 5xx and no other target was left to try.
    UpstreamStatus,
    /// The upstream connection broke after the response started.
    UpstreamBroken,
    ClientTimeout,
    ShuttingDown,
    /// No tier's worst-case cost fits the caller's remaining daily budget.
    BudgetExceeded,
    /// Auth is on and the request has no valid API key.
    InvalidApiKey,
    /// The service's requests-per-minute limit.
    RequestRateLimited,
    /// The service's tokens-per-minute limit.
    TokenRateLimited,
}

impl ErrorKind {
    /// (status, OpenAI `error.type`, `error.code`, retry).
    pub fn describe(self) -> (u16, &'static str, &'static str, Retry) {
        use ErrorKind::*;
        match self {
            MalformedHttp => (400, "invalid_request_error", "malformed_http", Retry::No),
            AmbiguousLength => (400, "invalid_request_error", "ambiguous_length", Retry::No),
            UnsupportedTransferCoding => (
                501,
                "invalid_request_error",
                "unsupported_transfer_coding",
                Retry::No,
            ),
            HeaderTooLarge => (431, "invalid_request_error", "header_too_large", Retry::No),
            BodyTooLarge => (413, "invalid_request_error", "body_too_large", Retry::No),
            InvalidJson => (400, "invalid_request_error", "invalid_json", Retry::No),
            InvalidRequest => (400, "invalid_request_error", "invalid_request", Retry::No),
            UnknownPath => (404, "invalid_request_error", "unknown_url", Retry::No),
            MethodNotAllowed => (
                405,
                "invalid_request_error",
                "method_not_allowed",
                Retry::No,
            ),
            ModelNotFound => (404, "invalid_request_error", "model_not_found", Retry::No),
            NoHealthyTarget => (503, "api_error", "no_healthy_upstream", Retry::No),
            TargetsFull => (503, "api_error", "upstream_at_capacity", Retry::No),
            UpstreamConnect => (502, "api_error", "upstream_connect_failed", Retry::Yes),
            UpstreamTimeout => (504, "api_error", "upstream_timeout", Retry::Yes),
            UpstreamProtocol => (502, "api_error", "upstream_protocol_error", Retry::Yes),
            UpstreamStatus => (502, "api_error", "upstream_error", Retry::Yes),
            UpstreamBroken => (502, "api_error", "upstream_stream_broken", Retry::No),
            ClientTimeout => (408, "invalid_request_error", "request_timeout", Retry::No),
            ShuttingDown => (503, "api_error", "shutting_down", Retry::No),
            BudgetExceeded => (429, "insufficient_quota", "budget_exceeded", Retry::No),
            InvalidApiKey => (401, "invalid_request_error", "invalid_api_key", Retry::No),
            RequestRateLimited => (429, "requests", "rate_limit_exceeded", Retry::No),
            TokenRateLimited => (429, "tokens", "rate_limit_exceeded", Retry::No),
        }
    }

    pub fn status(self) -> u16 {
        self.describe().0
    }

    pub fn retry(self) -> Retry {
        self.describe().3
    }

    /// The `error` object as JSON, without the `{"error": ...}` wrapper (SSE error events reuse it).
    pub fn error_object(self, message: &str, param: Option<&str>) -> String {
        let (_, kind, code, _) = self.describe();
        let mut out = String::with_capacity(96 + message.len());
        out.push_str("{\"message\":");
        push_json_string(&mut out, message);
        let _ = write!(out, ",\"type\":\"{kind}\",\"param\":");
        match param {
            Some(p) => push_json_string(&mut out, p),
            None => out.push_str("null"),
        }
        let _ = write!(out, ",\"code\":\"{code}\"}}");
        out
    }

    /// The full OpenAI-shaped body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(self, message: &str, param: Option<&str>) -> String {
        format!("{{\"error\":{}}}", self.error_object(message, param))
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_body_is_openai_shaped_json() {
        use ErrorKind::*;
        for kind in [
            MalformedHttp,
            AmbiguousLength,
            UnsupportedTransferCoding,
            HeaderTooLarge,
            BodyTooLarge,
            InvalidJson,
            InvalidRequest,
            UnknownPath,
            MethodNotAllowed,
            ModelNotFound,
            NoHealthyTarget,
            TargetsFull,
            UpstreamConnect,
            UpstreamTimeout,
            UpstreamProtocol,
            UpstreamStatus,
            UpstreamBroken,
            ClientTimeout,
            ShuttingDown,
        ] {
            let body = kind.body("bad \"thing\"\n\u{1}", Some("messages"));
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let e = &v["error"];
            assert_eq!(e["message"], "bad \"thing\"\n\u{1}");
            assert_eq!(e["param"], "messages");
            assert_eq!(e["type"], kind.describe().1);
            assert_eq!(e["code"], kind.describe().2);
            assert!(kind.status() >= 400);
        }
    }

    #[test]
    fn statuses_follow_the_contract() {
        assert_eq!(ErrorKind::HeaderTooLarge.status(), 431);
        assert_eq!(ErrorKind::BodyTooLarge.status(), 413);
        assert_eq!(ErrorKind::ModelNotFound.status(), 404);
        assert_eq!(ErrorKind::NoHealthyTarget.status(), 503);
        assert_eq!(ErrorKind::UnsupportedTransferCoding.status(), 501);
        assert_eq!(ErrorKind::UpstreamConnect.retry(), Retry::Yes);
        assert_eq!(ErrorKind::InvalidJson.retry(), Retry::No);
        let body = ErrorKind::InvalidJson.body("x", None);
        assert!(body.contains("\"param\":null"));
    }
}
