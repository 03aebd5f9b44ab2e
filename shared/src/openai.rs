//! Views of OpenAI-compatible request and response bodies. Owns: validating a request body
//! against its endpoint, pulling out what routing and classification need, rewriting `model`
//! (and `stream_options` when the router needs usage) by splicing bytes, and reading `usage`.
//! Must not: re-serialise a body; every byte except the spliced values passes untouched.

use crate::classifier::Prompt;
use crate::error::{push_json_string, ErrorKind};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::ops::Range;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn from_path(path: &str) -> Option<Endpoint> {
        match path {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        }
    }

    pub fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    fn required_field(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "messages",
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings => "input",
        }
    }
}

/// A request error with the offending parameter, ready for the OpenAI error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    pub kind: ErrorKind,
    pub message: String,
    /// A field name (`messages`), or the path to a nested one (`messages[0].content`).
    pub param: Option<std::borrow::Cow<'static, str>>,
}

impl RequestError {
    fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        RequestError {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            param: Some(param.into()),
        }
    }

    fn from_serde(e: serde_json::Error) -> Self {
        let kind = match e.classify() {
            serde_json::error::Category::Data => ErrorKind::InvalidRequest,
            _ => ErrorKind::InvalidJson,
        };
        let message = match kind {
            ErrorKind::InvalidJson => format!("request body is not valid JSON: {e}"),
            _ => format!("invalid request body: {e}"),
        };
        RequestError {
            kind,
            message,
            param: None,
        }
    }
}

/// The field a type error in `text` is in (`max_tokens`), by parsing it again with the path
/// tracked: only once it failed, as tracking costs on every request.
fn field_of_error<'a, T: Deserialize<'a>>(text: &'a str) -> Option<String> {
    let mut de = serde_json::Deserializer::from_str(text);
    let path = serde_path_to_error::deserialize::<_, T>(&mut de)
        .err()?
        .path()
        .to_string();
    (path != ".").then_some(path)
}

/// `T` from a JSON object only. A derived `Deserialize` also takes an array of the fields in
/// order, which the API does not allow (and which the `model` rewrite, splicing after the
/// first `{`, must never meet).
struct ObjectOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ObjectOnly<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
            .map(ObjectOnly)
    }
}

/// A JSON string as text: borrowed from the body unless it has escapes. (A bare `Cow<str>`,
/// or one inside an `Option` or as a map key, always deserializes owned; only a
/// `#[serde(borrow)]` field of type `Cow<str>` itself borrows.)
#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct Text<'a>(#[serde(borrow)] pub(crate) Cow<'a, str>);

/// `raw` (a JSON string) as text; see [`Text`].
fn text_of<'a>(raw: &'a RawValue) -> serde_json::Result<Cow<'a, str>> {
    serde_json::from_str::<Text<'a>>(raw.get()).map(|t| t.0)
}

/// A field that is there, `null` included (a plain `Option` reads `null` as absent): the
/// rewrite must replace such a value, not add its key a second time.
fn present<'a, D: serde::Deserializer<'a>>(d: D) -> Result<Option<&'a RawValue>, D::Error> {
    <&'a RawValue>::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct Top<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    model: Option<&'a RawValue>,
    stream: Option<bool>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow)]
    messages: Option<&'a RawValue>,
    #[serde(borrow)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow)]
    input: Option<&'a RawValue>,
    #[serde(borrow)]
    tools: Option<&'a RawValue>,
    #[serde(borrow)]
    functions: Option<&'a RawValue>,
    #[serde(borrow)]
    response_format: Option<&'a RawValue>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_k: Option<f64>,
    n: Option<u64>,
    best_of: Option<u64>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow)]
    role: Cow<'a, str>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Part<'a> {
    #[serde(borrow, default)]
    text: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct StreamOptions<'a> {
    /// Raw, so that the rewrite can set it in place; `Some` when present, `null` too.
    #[serde(borrow, default, deserialize_with = "present")]
    include_usage: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ResponseFormat<'a> {
    #[serde(borrow, rename = "type")]
    kind: Cow<'a, str>,
}

/// What the router needs from a request body; spans index into that body.
#[derive(Debug, Default)]
pub struct RequestView<'a> {
    /// The requested model; `None` when the body has no `model` (routed like `auto`).
    pub model: Option<Cow<'a, str>>,
    /// Byte range of the `model` value (quotes included).
    model_span: Option<Range<usize>>,
    pub stream: bool,
    /// The caller asked for the final usage chunk itself (`stream_options.include_usage`).
    pub caller_wants_usage: bool,
    /// Byte range of the `stream_options` value, and of its `include_usage` value.
    stream_options_span: Option<Range<usize>>,
    include_usage_span: Option<Range<usize>>,
    pub system: Cow<'a, str>,
    pub last_user: Cow<'a, str>,
    pub earlier_turns: usize,
    pub has_tools: bool,
    pub json_output: bool,
    pub max_tokens: Option<u64>,
    /// How many answers the backend generates (and charges for): `n`, or the legacy
    /// completions' `best_of` when larger, for each prompt of a prompt array.
    pub choices: u64,
    pub total_chars: usize,
    /// `temperature` explicitly 0 (or `top_k` 1) and `n` absent or 1: the same request gets
    /// the same answer, so it may be cached.
    pub deterministic: bool,
}

fn span_of(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// Adds `text` to `out`, newline-separated. The first piece is kept as it came (borrowed from
/// the body when it has no escapes), so a single-part prompt is never copied.
fn append<'a>(out: &mut Cow<'a, str>, text: Cow<'a, str>) {
    if out.is_empty() {
        *out = text;
    } else if !text.is_empty() {
        let joined = out.to_mut();
        joined.push('\n');
        joined.push_str(&text);
    }
}

/// Appends the text of a message `content` (a string, an array of parts, or null) and
/// returns its length.
fn push_content<'a>(
    out: &mut Cow<'a, str>,
    content: Option<&'a RawValue>,
) -> Result<usize, RequestError> {
    let Some(raw) = content else { return Ok(0) };
    match raw.get().as_bytes().first() {
        Some(b'"') => {
            let text = text_of(raw).map_err(RequestError::from_serde)?;
            let len = text.len();
            append(out, text);
            Ok(len)
        }
        Some(b'[') => {
            let parts: Vec<ObjectOnly<Part<'a>>> =
                serde_json::from_str(raw.get()).map_err(|e| {
                    RequestError::invalid(
                        format!("message content parts must be objects: {e}"),
                        "messages",
                    )
                })?;
            let mut len = 0;
            for text in parts.into_iter().filter_map(|p| p.0.text.map(|t| t.0)) {
                len += text.len();
                append(out, text);
            }
            Ok(len)
        }
        Some(b'n') => Ok(0),
        _ => Err(RequestError::invalid(
            "message content must be a string, an array of parts or null",
            "messages",
        )),
    }
}

impl<'a> RequestView<'a> {
    /// Validates `body` for `endpoint` and extracts the routing view. One JSON pass for the
    /// body, one more over `messages` only.
    pub fn parse(endpoint: Endpoint, body: &'a [u8]) -> Result<RequestView<'a>, RequestError> {
        // Checked whole: serde skips the strings of fields it does not read without checking
        // them, and those reach the backend too (JSON text is UTF-8, RFC 8259 section 8.1).
        let text = std::str::from_utf8(body).map_err(|e| RequestError {
            kind: ErrorKind::InvalidJson,
            message: format!(
                "request body is not valid JSON: not UTF-8 at byte {}",
                e.valid_up_to()
            ),
            param: None,
        })?;
        let ObjectOnly(top): ObjectOnly<Top<'a>> = serde_json::from_str(text).map_err(|e| {
            let mut error = RequestError::from_serde(e);
            if error.kind == ErrorKind::InvalidRequest {
                error.param = field_of_error::<ObjectOnly<Top<'a>>>(text).map(Into::into);
            }
            error
        })?;
        let mut view = RequestView::default();
        if let Some(raw) = top.model {
            // `null` routes like an absent model; its value is still what the rewrite replaces.
            view.model_span = Some(span_of(body, raw));
            if raw.get() != "null" {
                let model = text_of(raw)
                    .map_err(|_| RequestError::invalid("`model` must be a string", "model"))?;
                view.model = Some(model);
            }
        }
        view.stream = top.stream.unwrap_or(false);
        if let Some(raw) = top.stream_options {
            if raw.get() != "null" {
                let ObjectOnly(opts): ObjectOnly<StreamOptions> = serde_json::from_str(raw.get())
                    .map_err(|e| {
                    let message = if raw.get().starts_with('{') {
                        // An object, with a member twice, say.
                        format!("`stream_options`: {e}")
                    } else {
                        "`stream_options` must be an object".to_string()
                    };
                    RequestError::invalid(message, "stream_options")
                })?;
                if let Some(usage) = opts.include_usage {
                    if !matches!(usage.get(), "true" | "false" | "null") {
                        return Err(RequestError::invalid(
                            "`stream_options.include_usage` must be a boolean",
                            "stream_options",
                        ));
                    }
                    view.caller_wants_usage = usage.get() == "true";
                    view.include_usage_span = Some(span_of(body, usage));
                }
            }
            view.stream_options_span = Some(span_of(body, raw));
        }
        // Present and not empty (`[ ]` is as empty as `[]`).
        view.has_tools = [top.tools, top.functions]
            .into_iter()
            .flatten()
            .map(RawValue::get)
            .any(|v| v != "null" && v.strip_prefix('[').map(str::trim_start) != Some("]"));
        if let Some(raw) = top.response_format {
            if let Ok(ObjectOnly(rf)) =
                serde_json::from_str::<ObjectOnly<ResponseFormat>>(raw.get())
            {
                view.json_output = rf.kind.starts_with("json");
            }
        }
        view.max_tokens = top.max_completion_tokens.or(top.max_tokens);
        let per_prompt = top.n.unwrap_or(1).max(top.best_of.unwrap_or(1)).max(1);
        view.deterministic = (top.temperature == Some(0.0) || top.top_k == Some(1.0))
            && top.n.is_none_or(|n| n == 1);
        let required = match endpoint {
            Endpoint::ChatCompletions => top.messages,
            Endpoint::Completions => top.prompt,
            Endpoint::Embeddings => top.input,
        };
        let field = endpoint.required_field();
        let Some(raw) = required.filter(|r| r.get() != "null") else {
            return Err(RequestError::invalid(
                format!("missing required parameter `{field}`"),
                field,
            ));
        };
        let prompts = match endpoint {
            Endpoint::ChatCompletions => view.read_messages(raw).map(|()| 1)?,
            Endpoint::Completions => view.read_prompt(raw, "prompt")?,
            Endpoint::Embeddings => view.read_prompt(raw, "input")?,
        };
        view.choices = per_prompt.saturating_mul(prompts);
        Ok(view)
    }

    fn read_messages(&mut self, raw: &'a RawValue) -> Result<(), RequestError> {
        let messages: Vec<ObjectOnly<Message<'a>>> =
            serde_json::from_str(raw.get()).map_err(|e| {
                RequestError::invalid(
                    format!("`messages` must be an array of objects with a string `role`: {e}"),
                    "messages",
                )
            })?;
        if messages.is_empty() {
            return Err(RequestError::invalid(
                "`messages` must not be empty",
                "messages",
            ));
        }
        let last_user = messages.iter().rposition(|m| m.0.role == "user");
        for (i, ObjectOnly(m)) in messages.iter().enumerate() {
            let chars = match m.role.as_ref() {
                "system" | "developer" => push_content(&mut self.system, m.content)?,
                _ if Some(i) == last_user => push_content(&mut self.last_user, m.content)?,
                _ => {
                    if last_user.is_some_and(|u| i < u) {
                        self.earlier_turns += 1;
                    }
                    push_content(&mut Cow::Borrowed(""), m.content)?
                }
            };
            self.total_chars += chars;
        }
        Ok(())
    }

    /// Reads `prompt` / `input`; returns how many prompts it holds (an array of strings or of
    /// token-id lists is one prompt per item; a single token-id list is one prompt). The
    /// shapes the API takes: a string, or a non-empty array of strings, of token ids
    /// (non-negative integers) or of token-id arrays, one kind throughout.
    fn read_prompt(&mut self, raw: &'a RawValue, field: &'static str) -> Result<u64, RequestError> {
        let invalid = || {
            RequestError::invalid(
                format!("`{field}` must be a string, or a non-empty array of strings, of token ids or of token-id arrays"),
                field,
            )
        };
        let is_token = |v: &RawValue| v.get().bytes().all(|b| b.is_ascii_digit());
        let mut prompts = 1;
        match raw.get().as_bytes().first() {
            Some(b'"') => {
                let text = text_of(raw).map_err(RequestError::from_serde)?;
                append(&mut self.last_user, text);
            }
            // Arrays of strings are joined; token-id arrays carry no text to classify.
            Some(b'[') => {
                let items: Vec<&'a RawValue> =
                    serde_json::from_str(raw.get()).map_err(RequestError::from_serde)?;
                // The kind of each item: its first byte (a quote, a bracket; a digit as `0`).
                let kind = |item: &RawValue| match item.get().as_bytes()[0] {
                    b'0'..=b'9' => b'0',
                    b => b,
                };
                let first = items.first().map(|i| kind(i)).ok_or_else(invalid)?;
                for item in &items {
                    let ok = kind(item) == first
                        && match first {
                            b'"' => true,
                            b'0' => is_token(item),
                            b'[' => serde_json::from_str::<Vec<&RawValue>>(item.get()).is_ok_and(
                                |ids| !ids.is_empty() && ids.iter().all(|v| is_token(v)),
                            ),
                            _ => false,
                        };
                    if !ok {
                        return Err(invalid());
                    }
                }
                if first == b'"' {
                    for item in &items {
                        let text = text_of(item).map_err(RequestError::from_serde)?;
                        append(&mut self.last_user, text);
                    }
                }
                prompts = match first {
                    b'"' | b'[' => items.len() as u64,
                    _ => 1,
                };
            }
            _ => return Err(invalid()),
        }
        self.total_chars = self.last_user.len();
        Ok(prompts)
    }

    pub fn prompt(&self) -> Prompt<'_> {
        Prompt {
            system: &self.system,
            last_user: &self.last_user,
            earlier_turns: self.earlier_turns,
            has_tools: self.has_tools,
            json_output: self.json_output,
            max_tokens: self.max_tokens,
            total_chars: self.total_chars,
        }
    }

    /// Whether the router must ask the upstream for the final usage chunk and hide it again.
    pub fn needs_injected_usage(&self, endpoint: Endpoint) -> bool {
        self.stream && !self.caller_wants_usage && endpoint != Endpoint::Embeddings
    }

    /// Appends the body to send upstream to `out`: `model` set to `target_model`, and
    /// `stream_options.include_usage` set when `inject_usage`. All other bytes are copied
    /// unchanged.
    pub fn rewrite_into(
        &self,
        out: &mut Vec<u8>,
        body: &[u8],
        target_model: &str,
        inject_usage: bool,
    ) {
        let mut model_json = String::with_capacity(target_model.len() + 2);
        push_json_string(&mut model_json, target_model);
        // Splices in body order; insertions of absent keys go right after the opening brace.
        let open = body.iter().position(|&b| b == b'{').map_or(0, |i| i + 1);
        let empty_object = body[open..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let sep = if empty_object { "" } else { "," };
        let mut edits: [(Range<usize>, Cow<str>); 2] =
            [(0..0, Cow::Borrowed("")), (0..0, Cow::Borrowed(""))];
        edits[0] = match &self.model_span {
            Some(span) => (span.clone(), Cow::Owned(model_json)),
            None => (
                open..open,
                Cow::Owned(format!("\"model\":{model_json}{sep}")),
            ),
        };
        if inject_usage {
            // Only `include_usage` is written: the caller's other options stay as they came.
            let usage: (Range<usize>, &'static str) =
                match (&self.stream_options_span, &self.include_usage_span) {
                    (_, Some(value)) => (value.clone(), "true"),
                    (Some(span), None) if &body[span.clone()] == b"null" => {
                        (span.clone(), "{\"include_usage\":true}")
                    }
                    (Some(span), None) => {
                        let inside = span.start + 1;
                        let empty = body[inside..span.end - 1]
                            .iter()
                            .all(u8::is_ascii_whitespace);
                        let member = if empty {
                            "\"include_usage\":true"
                        } else {
                            "\"include_usage\":true,"
                        };
                        (inside..inside, member)
                    }
                    (None, None) => (open..open, "\"stream_options\":{\"include_usage\":true},"),
                };
            edits[1] = (usage.0, Cow::Borrowed(usage.1));
        }
        edits.sort_by_key(|(r, _)| r.start);
        out.reserve(body.len() + 64);
        let mut at = 0;
        for (range, text) in &edits {
            if range.is_empty() && text.is_empty() {
                continue;
            }
            out.extend_from_slice(&body[at..range.start]);
            out.extend_from_slice(text.as_bytes());
            at = range.end;
        }
        out.extend_from_slice(&body[at..]);
    }

    /// [`rewrite_into`](Self::rewrite_into) into a new buffer.
    pub fn rewrite(&self, body: &[u8], target_model: &str, inject_usage: bool) -> Vec<u8> {
        let mut out = Vec::new();
        self.rewrite_into(&mut out, body, target_model, inject_usage);
        out
    }
}

/// Token counts from a response's `usage` object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub cached: u64,
    pub completion: u64,
}

#[derive(Deserialize)]
struct UsageFields {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

/// The most tokens of one kind a usage figure may say: a backend's figures are capped far above
/// any real answer, so that pricing and budget arithmetic on them cannot overflow.
pub const MAX_TOKENS: u64 = 1 << 40;

/// Reads `usage` from a whole JSON response or SSE `data:` payload. `None` when absent or
/// null (then the caller estimates).
///
/// Only the `usage` value is parsed: the last `"usage":` key is found by a byte search (inside a
/// JSON string its quotes would be escaped, so an unescaped match is a key), which is a tenth of
/// the cost of parsing the whole answer.
pub fn parse_usage(json: &[u8]) -> Option<TokenUsage> {
    let mut end = json.len();
    let value = loop {
        let at = crate::finder!(rev b"\"usage\"").rfind(&json[..end])?;
        let rest = json[at + 7..].trim_ascii_start();
        if at > 0 && json[at - 1] == b'\\' || rest.first() != Some(&b':') {
            end = at;
            continue;
        }
        break rest[1..].trim_ascii_start();
    };
    let mut values = serde_json::Deserializer::from_slice(value).into_iter::<Option<UsageFields>>();
    let u = values.next()?.ok()??;
    let prompt = u.prompt_tokens.min(MAX_TOKENS);
    Some(TokenUsage {
        prompt,
        completion: u.completion_tokens.min(MAX_TOKENS),
        // Cached tokens are some of the prompt's: no more of them, whatever a backend says.
        cached: u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
            .min(prompt),
    })
}

/// Whether a complete 200 answer to `endpoint` ended normally: embeddings carry `data`, and
/// completions carry choices whose every `finish_reason` is `stop` or `length`; an answer with
/// an `error` never qualifies (some gateways send errors with status 200). Only such answers
/// are cached.
pub fn completed_normally(endpoint: Endpoint, body: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Choice<'a> {
        #[serde(borrow, default)]
        finish_reason: Option<Text<'a>>,
    }
    #[derive(Deserialize)]
    struct Answer<'a> {
        #[serde(borrow, default)]
        choices: Option<Vec<Choice<'a>>>,
        #[serde(default)]
        data: Option<serde::de::IgnoredAny>,
        #[serde(default)]
        error: Option<serde::de::IgnoredAny>,
    }
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return false;
    };
    if answer.error.is_some() {
        return false;
    }
    match endpoint {
        Endpoint::Embeddings => answer.data.is_some(),
        Endpoint::ChatCompletions | Endpoint::Completions => {
            answer.choices.is_some_and(|choices| {
                !choices.is_empty()
                    && choices.iter().all(|c| {
                        matches!(
                            c.finish_reason.as_ref().map(|t| &*t.0),
                            Some("stop" | "length")
                        )
                    })
            })
        }
    }
}

/// Rough token count for text when a backend reports none: about 4 characters a token.
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(endpoint: Endpoint, body: &str) -> Result<RequestView<'_>, RequestError> {
        RequestView::parse(endpoint, body.as_bytes())
    }

    #[test]
    fn chat_view_extracts_routing_signals() {
        let body = r#"{"model":"auto","messages":[{"role":"system","content":"You are terse."},
            {"role":"user","content":"hi"},{"role":"assistant","content":"hello"},
            {"role":"user","content":[{"type":"text","text":"Translate"},{"type":"image_url","image_url":{"url":"x"}},{"type":"text","text":"to French"}]}],
            "tools":[{"type":"function"}],"response_format":{"type":"json_object"},"max_tokens":50,"stream":true}"#;
        let v = parse(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!(v.model.as_deref(), Some("auto"));
        assert_eq!(v.system, "You are terse.");
        assert_eq!(v.last_user, "Translate\nto French");
        assert_eq!(v.earlier_turns, 2);
        assert!(v.has_tools && v.json_output && v.stream && !v.caller_wants_usage);
        assert!(!v.deterministic);
        let tools = |t: &str| {
            let body = format!(r#"{{"tools":{t},"messages":[{{"role":"user","content":"x"}}]}}"#);
            parse(Endpoint::ChatCompletions, &body).unwrap().has_tools
        };
        assert!(
            !tools("[]") && !tools("[ \n ]") && !tools("null") && tools(r#"[{"type":"function"}]"#)
        );
        let d = |b: &str| parse(Endpoint::Completions, b).unwrap().deterministic;
        assert!(d(r#"{"prompt":"p","temperature":0}"#) && d(r#"{"prompt":"p","top_k":1,"n":1}"#));
        assert!(
            !d(r#"{"prompt":"p","temperature":0,"n":2}"#)
                && !d(r#"{"prompt":"p","temperature":null}"#)
        );
        assert_eq!(
            parse(
                Endpoint::Completions,
                r#"{"prompt":"p","temperature":"hot"}"#
            )
            .unwrap_err()
            .kind,
            ErrorKind::InvalidRequest
        );
        assert_eq!(v.max_tokens, Some(50));
        assert!(v.needs_injected_usage(Endpoint::ChatCompletions));
    }

    #[test]
    fn text_is_borrowed_from_the_body_unless_it_has_escapes() {
        let body = r#"{"model":"m\u0031","messages":[{"role":"system","content":"plain"},{"role":"user","content":"line\none"}]}"#;
        let v = parse(Endpoint::ChatCompletions, body).unwrap();
        assert_eq!(v.model.as_deref(), Some("m1"));
        assert!(matches!(v.model, Some(Cow::Owned(_))));
        assert!(matches!(v.system, Cow::Borrowed("plain")));
        assert_eq!(v.last_user, "line\none");
        let v = parse(Endpoint::Completions, r#"{"model":"m","prompt":"p"}"#).unwrap();
        assert!(matches!(v.model, Some(Cow::Borrowed("m"))));
        assert!(matches!(v.last_user, Cow::Borrowed("p")));
        let parts = r#"{"messages":[{"role":"user","content":[{"type":"text","text":"part"}]}]}"#;
        let v = parse(Endpoint::ChatCompletions, parts).unwrap();
        assert!(matches!(v.last_user, Cow::Borrowed("part")));
    }

    #[test]
    fn bad_bodies_are_classified() {
        let cases = [
            (
                Endpoint::ChatCompletions,
                "{not json",
                ErrorKind::InvalidJson,
                None,
            ),
            (Endpoint::ChatCompletions, "", ErrorKind::InvalidJson, None),
            (
                Endpoint::ChatCompletions,
                "[1,2]",
                ErrorKind::InvalidRequest,
                None,
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"x"}"#,
                ErrorKind::InvalidRequest,
                Some("messages"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"messages":"hi"}"#,
                ErrorKind::InvalidRequest,
                Some("messages"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"messages":[]}"#,
                ErrorKind::InvalidRequest,
                Some("messages"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"messages":[{"content":"x"}]}"#,
                ErrorKind::InvalidRequest,
                Some("messages"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"messages":[{"role":"user","content":5}]}"#,
                ErrorKind::InvalidRequest,
                Some("messages"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":5,"messages":[{"role":"user","content":"x"}]}"#,
                ErrorKind::InvalidRequest,
                Some("model"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"stream":"yes","messages":[{"role":"user","content":"x"}]}"#,
                ErrorKind::InvalidRequest,
                Some("stream"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"max_tokens":-1,"messages":[{"role":"user","content":"x"}]}"#,
                ErrorKind::InvalidRequest,
                Some("max_tokens"),
            ),
            (
                Endpoint::ChatCompletions,
                r#"{"model":"a","model":"b","messages":[{"role":"user","content":"x"}]}"#,
                ErrorKind::InvalidRequest,
                None,
            ),
            (
                Endpoint::Completions,
                r#"{"model":"x"}"#,
                ErrorKind::InvalidRequest,
                Some("prompt"),
            ),
            (
                Endpoint::Completions,
                r#"{"prompt":{"a":1}}"#,
                ErrorKind::InvalidRequest,
                Some("prompt"),
            ),
            (
                Endpoint::Embeddings,
                r#"{"input":null}"#,
                ErrorKind::InvalidRequest,
                Some("input"),
            ),
        ];
        for (endpoint, body, kind, param) in cases {
            let err = parse(endpoint, body).expect_err(body);
            assert_eq!(
                (err.kind, err.param.as_deref()),
                (kind, param),
                "{body}: {}",
                err.message
            );
        }
        // A trailing garbage byte is invalid JSON even after a valid object.
        assert_eq!(
            parse(Endpoint::Embeddings, r#"{"input":"x"} x"#)
                .unwrap_err()
                .kind,
            ErrorKind::InvalidJson
        );
        // Bytes that are not UTF-8, in a field the router does not read too.
        for (endpoint, body) in [
            (
                Endpoint::ChatCompletions,
                &b"{\"stop\":\"\xff\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}"[..],
            ),
            (
                Endpoint::Completions,
                b"{\"x-vendor\":\"\xc3\",\"prompt\":\"p\"}",
            ),
            (
                Endpoint::Embeddings,
                b"{\"user\":\"\xed\xa0\x80\",\"input\":\"x\"}",
            ),
        ] {
            let e = RequestView::parse(endpoint, body).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidJson, "{}", e.message);
        }
    }

    #[test]
    fn rewrite_changes_only_model() {
        let body = r#"{ "temperature":0.2, "model" : "auto", "tools":[{"type":"function","function":{"name":"f","parameters":{}}}], "seed":7, "x-vendor":{"k":[1,2]}, "messages":[{"role":"user","content":"q\u00e9"}] }"#;
        let v = parse(Endpoint::ChatCompletions, body).unwrap();
        let out = String::from_utf8(v.rewrite(body.as_bytes(), "org/m\"1", false)).unwrap();
        assert_eq!(out, body.replace("\"auto\"", "\"org/m\\\"1\""));
    }

    #[test]
    fn rewrite_inserts_missing_model_and_usage_option() {
        let body = r#"{"messages":[{"role":"user","content":"x"}],"stream":true}"#;
        let v = parse(Endpoint::ChatCompletions, body).unwrap();
        assert!(v.model.is_none());
        let out: serde_json::Value =
            serde_json::from_slice(&v.rewrite(body.as_bytes(), "m", true)).unwrap();
        assert_eq!(out["model"], "m");
        assert_eq!(out["stream_options"]["include_usage"], true);
        assert_eq!(out["messages"][0]["content"], "x");
    }

    #[test]
    fn objects_written_as_arrays_are_refused() {
        // A derived Deserialize would read these as the fields in order.
        for body in [
            r#"[null,true,{"include_usage":false},[{"role":"user","content":"x"}],null,null,null,null,null,null,null,null,null,null,null]"#,
            r#"{"messages":[["user","x"]]}"#,
            r#"{"messages":[{"role":"user","content":[["x"]]}]}"#,
            r#"{"stream":true,"stream_options":[true],"messages":[{"role":"user","content":"x"}]}"#,
        ] {
            let err = parse(Endpoint::ChatCompletions, body).unwrap_err();
            assert_eq!(
                err.kind,
                ErrorKind::InvalidRequest,
                "{body}: {}",
                err.message
            );
        }
    }

    #[test]
    fn null_model_and_stream_options_are_replaced_not_repeated() {
        let body = r#"{"model":null,"stream":true,"stream_options":null,"messages":[{"role":"user","content":"x"}]}"#;
        let v = parse(Endpoint::ChatCompletions, body).unwrap();
        assert!(v.model.is_none() && !v.caller_wants_usage);
        let out = String::from_utf8(v.rewrite(body.as_bytes(), "m", true)).unwrap();
        assert_eq!(
            out,
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"x"}]}"#
        );
    }

    #[test]
    fn rewrite_merges_existing_stream_options() {
        let body = r#"{"model":"a","stream":true,"stream_options":{"continuous_usage_stats":true},"prompt":"p"}"#;
        let v = parse(Endpoint::Completions, body).unwrap();
        assert!(v.needs_injected_usage(Endpoint::Completions));
        let out: serde_json::Value =
            serde_json::from_slice(&v.rewrite(body.as_bytes(), "b", true)).unwrap();
        assert_eq!(
            out["stream_options"],
            serde_json::json!({"continuous_usage_stats": true, "include_usage": true})
        );
        assert_eq!(out["model"], "b");
        let asked =
            r#"{"model":"a","stream":true,"stream_options":{"include_usage":true},"prompt":"p"}"#;
        assert!(!parse(Endpoint::Completions, asked)
            .unwrap()
            .needs_injected_usage(Endpoint::Completions));
        // Only include_usage is written: the caller's other options reach the backend as they
        // were spelled, even those a JSON value type would change or refuse.
        for (options, sent) in [
            (
                r#"{"x":1e400,"y":-0,"z":"\ud800"}"#,
                r#"{"include_usage":true,"x":1e400,"y":-0,"z":"\ud800"}"#,
            ),
            (
                r#"{"a":1, "include_usage" : false, "a2":2}"#,
                r#"{"a":1, "include_usage" : true, "a2":2}"#,
            ),
            (r#"{"include_usage":null}"#, r#"{"include_usage":true}"#),
            ("{ }", r#"{"include_usage":true }"#),
            ("null", r#"{"include_usage":true}"#),
        ] {
            let body =
                format!(r#"{{"model":"a","stream":true,"stream_options":{options},"prompt":"p"}}"#);
            let v = parse(Endpoint::Completions, &body).unwrap();
            let out = v.rewrite(body.as_bytes(), "a", true);
            let expected = body.replace(options, sent);
            assert_eq!(String::from_utf8_lossy(&out), expected, "{options}");
        }
        let e = parse(
            Endpoint::Completions,
            r#"{"stream":true,"stream_options":{"include_usage":"yes"},"prompt":"p"}"#,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("stream_options"));
        let twice = r#"{"stream":true,"stream_options":{"include_usage":false,"include\u005fusage":true},"prompt":"p"}"#;
        let e = parse(Endpoint::Completions, twice).unwrap_err();
        assert!(e.message.contains("duplicate field"), "{}", e.message);
    }

    #[test]
    fn prompts_and_inputs_accept_openai_shapes() {
        assert_eq!(
            parse(Endpoint::Completions, r#"{"prompt":["a","b"]}"#)
                .unwrap()
                .last_user,
            "a\nb"
        );
        assert_eq!(
            parse(Endpoint::Completions, r#"{"prompt":[1,2,3]}"#)
                .unwrap()
                .last_user,
            ""
        );
        assert_eq!(
            parse(Endpoint::Embeddings, r#"{"input":[[1,2],[3]]}"#)
                .unwrap()
                .last_user,
            ""
        );
        // One kind throughout, non-empty, token ids non-negative integers: what OpenAI takes.
        for bad in [
            r#"[true]"#,
            r#"5"#,
            r#"{}"#,
            r#"[]"#,
            r#"["a",1]"#,
            r#"[[]]"#,
            r#"[-1,1.5]"#,
            r#"[1.5]"#,
            r#"[[1],"a"]"#,
            r#"[[1,-2]]"#,
            r#"[null]"#,
        ] {
            let e = parse(Endpoint::Embeddings, &format!(r#"{{"input":{bad}}}"#)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("input"), "{bad}");
            assert!(
                e.message.contains("non-empty array"),
                "{bad}: {}",
                e.message
            );
        }
    }

    #[test]
    fn choices_count_every_answer_the_backend_generates() {
        let choices = |endpoint, body: &str| parse(endpoint, body).unwrap().choices;
        let chat = Endpoint::ChatCompletions;
        let completions = Endpoint::Completions;
        assert_eq!(
            choices(chat, r#"{"messages":[{"role":"user","content":"a"}]}"#),
            1
        );
        assert_eq!(
            choices(
                chat,
                r#"{"n":3,"messages":[{"role":"user","content":"a"}]}"#
            ),
            3
        );
        assert_eq!(choices(completions, r#"{"prompt":"a","n":2}"#), 2);
        // One answer set per prompt; best_of answers are generated (and billed) per prompt.
        assert_eq!(choices(completions, r#"{"prompt":["a","b","c"],"n":2}"#), 6);
        assert_eq!(
            choices(completions, r#"{"prompt":"a","n":2,"best_of":5}"#),
            5
        );
        assert_eq!(
            choices(completions, r#"{"prompt":[1,2,3]}"#),
            1,
            "one token-id prompt"
        );
        assert_eq!(
            choices(completions, r#"{"prompt":[[1,2],[3]],"best_of":2}"#),
            4
        );
    }

    #[test]
    fn only_normally_finished_answers_count_as_complete() {
        let chat = |body: &[u8]| completed_normally(Endpoint::ChatCompletions, body);
        let embeddings = |body: &[u8]| completed_normally(Endpoint::Embeddings, body);
        assert!(chat(
            br#"{"choices":[{"finish_reason":"stop"},{"finish_reason":"length"}]}"#
        ));
        assert!(chat(
            br#"{"choices":[{"finish_reason":"stop"}],"error":null}"#
        ));
        assert!(embeddings(
            br#"{"object":"list","data":[{"embedding":[0.1]}]}"#
        ));
        assert!(!chat(br#"{"choices":[{"finish_reason":"tool_calls"}]}"#));
        assert!(!chat(
            br#"{"choices":[{"finish_reason":"content_filter"}]}"#
        ));
        assert!(!chat(br#"{"choices":[{"finish_reason":null}]}"#));
        assert!(!chat(br#"{"choices":[]}"#));
        assert!(!chat(b"{truncated"));
        // Errors sent with status 200, and answers without what the endpoint returns.
        assert!(!chat(
            br#"{"error":{"message":"overloaded","type":"server_error"}}"#
        ));
        assert!(!chat(
            br#"{"choices":[{"finish_reason":"stop"}],"error":{"message":"x"}}"#
        ));
        assert!(!chat(br#"{"choices":null}"#));
        assert!(!chat(br#"{"object":"list","data":[]}"#));
        assert!(!embeddings(br#"{"error":{"message":"x"}}"#));
        assert!(!embeddings(br#"{"object":"list"}"#));
    }

    #[test]
    fn usage_is_read_with_cached_tokens() {
        let u = parse_usage(br#"{"id":"x","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13,"prompt_tokens_details":{"cached_tokens":4}}}"#);
        assert_eq!(
            u,
            Some(TokenUsage {
                prompt: 10,
                cached: 4,
                completion: 3
            })
        );
        assert_eq!(parse_usage(br#"{"usage":null}"#), None);
        // The word inside generated text (escaped quotes) or as a value is not the key.
        let tricky = br#"{"choices":[{"message":{"content":"my \"usage\": {\"prompt_tokens\": 99}"}}],"note":"usage","usage" : {"prompt_tokens":5,"completion_tokens":6}}"#;
        assert_eq!(
            parse_usage(tricky),
            Some(TokenUsage {
                prompt: 5,
                cached: 0,
                completion: 6
            })
        );
        assert_eq!(
            parse_usage(br#"{"choices":[{"text":"\"usage\":{\"prompt_tokens\":1}"}]}"#),
            None
        );
        assert_eq!(
            parse_usage(br#"{"usage":{"prompt_tokens":"x"}}"#),
            None,
            "wrong types are ignored, not trusted"
        );
        assert_eq!(parse_usage(b"not json"), None);
        let absurd = parse_usage(
            br#"{"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":18446744073709551615}}"#,
        )
        .unwrap();
        assert_eq!(
            (absurd.prompt, absurd.completion),
            (1 << 40, 1 << 40),
            "capped"
        );
        let over = parse_usage(
            br#"{"usage":{"prompt_tokens":10,"prompt_tokens_details":{"cached_tokens":50}}}"#,
        );
        assert_eq!(
            over.unwrap().cached,
            10,
            "no more cached than prompt tokens"
        );
        assert_eq!(estimate_tokens(9), 3);
    }

    #[test]
    fn mutated_bodies_never_panic() {
        let seed = br#"{"model":"auto","stream":true,"stream_options":{"include_usage":false},"messages":[{"role":"system","content":"s\u00e9"},{"role":"user","content":[{"type":"text","text":"a"}]}],"tools":[],"max_tokens":5,"usage":{"prompt_tokens":1}}"#;
        let mut rng = fastrand::Rng::with_seed(0x1234_5678_9abc_def1);
        let bytes = b"{}[]\",:0\"x\\\xc3";
        for _ in 0..20_000 {
            let mut body = seed.to_vec();
            for _ in 0..rng.usize(1..=4) {
                let at = rng.usize(..=body.len());
                match rng.usize(..3) {
                    0 if at < body.len() => body[at] = bytes[rng.usize(..bytes.len())],
                    1 => body.truncate(at),
                    _ => body.insert(at, rng.u8(..)),
                }
            }
            for endpoint in [
                Endpoint::ChatCompletions,
                Endpoint::Completions,
                Endpoint::Embeddings,
            ] {
                let scope = crate::cache_key::KeyScope {
                    service: "s",
                    endpoint: endpoint.path(),
                    target_model: "m",
                    variant: b"",
                };
                let _ = crate::cache_key::key(&scope, &body, endpoint == Endpoint::Embeddings);
                let _ = completed_normally(endpoint, &body);
                if let Ok(view) = RequestView::parse(endpoint, &body) {
                    let out = view.rewrite(&body, "m", true);
                    // RFC 8259 allows lone surrogate escapes that serde_json's Value rejects;
                    // compare like with like: strict input must give strict output.
                    if serde_json::from_slice::<serde_json::Value>(&body).is_ok() {
                        let v: serde_json::Value =
                            serde_json::from_slice(&out).expect("rewrite keeps JSON valid");
                        assert_eq!(v["model"], "m");
                    }
                }
            }
            let _ = parse_usage(&body);
        }
    }
}
