//! Response-cache keys. Owns: deciding whether a request is deterministic enough to cache, and
//! the canonical key bytes that identify its answer (tenant, endpoint, target model, stream
//! flag, and every body field but a short list that cannot change the output).
//! Must not: hash (the cache does) or look at responses.

use crate::openai::Text;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Bodies nested deeper than this are never cached. Each level is parsed again for its
/// members, so the depth bounds the work per byte as well as the recursion.
const MAX_DEPTH: usize = 32;

/// Whether JSON text nests objects and arrays deeper than `max` (one pass, strings skipped).
fn nests_deeper_than(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Body fields left out of the key: they cannot change the model's output.
/// `model` is replaced by the resolved target model, which is in the key on its own. Of
/// `stream_options`, only `include_usage` is left out (see `without_include_usage`).
pub const IGNORED_FIELDS: [&str; 2] = ["model", "user"];

/// What identifies a cached answer besides the body.
pub struct KeyScope<'a> {
    /// The caller's service; empty when the config lets tenants share entries.
    pub service: &'a str,
    pub endpoint: &'a str,
    pub target_model: &'a str,
    /// What else reaches the backend and can change its answer: the query string and the
    /// forwarded headers (the data plane's `request_variant`); empty for most requests.
    pub variant: &'a [u8],
}

/// An object's members in source order, keys decoded, values left as raw JSON.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                // Keys as `Text`: a bare `Cow` key would be copied even without escapes.
                while let Some((k, v)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
                    out.push((k.0, v));
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> Members<'a> {
    /// Sorted by key; `None` when a key repeats (backends disagree on which one wins, so such
    /// a body is never cached).
    fn sorted(mut self) -> Option<Vec<(Cow<'a, str>, &'a RawValue)>> {
        self.0.sort_by(|a, b| a.0.cmp(&b.0));
        if self.0.windows(2).any(|w| w[0].0 == w[1].0) {
            return None;
        }
        Some(self.0)
    }
}

fn as_f64(raw: Option<&&RawValue>) -> Option<f64> {
    raw.and_then(|r| r.get().parse().ok())
}

/// The exact request bytes with everything else that decides its route (`parts`, which must
/// not contain NUL): a request sent again byte for byte finds its answer through this without
/// being parsed, classified or canonicalised (see the response cache's shortcuts).
pub fn request_key(parts: &[&[u8]], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 128);
    out.extend_from_slice(b"raw\0");
    for part in parts {
        out.extend_from_slice(part);
        out.push(0);
    }
    out.extend_from_slice(body);
    out
}

/// The canonical key bytes for `body`, or `None` when the request is not deterministic:
/// `temperature` must be explicitly 0 (or `top_k` 1) and `n` absent or 1. Embeddings are
/// deterministic by nature.
pub fn key(scope: &KeyScope<'_>, body: &[u8], embeddings: bool) -> Option<Vec<u8>> {
    if nests_deeper_than(body, MAX_DEPTH) {
        return None;
    }
    let fields = serde_json::from_slice::<Members<'_>>(body).ok()?.sorted()?;
    let get = |name: &str| {
        fields
            .binary_search_by(|(k, _)| (**k).cmp(name))
            .ok()
            .map(|i| &fields[i].1)
    };
    let zero_temperature = as_f64(get("temperature")) == Some(0.0);
    let top_k_one = as_f64(get("top_k")) == Some(1.0);
    let single = get("n").is_none_or(|n| as_f64(Some(n)) == Some(1.0));
    if !(embeddings || (zero_temperature || top_k_one) && single) {
        return None;
    }
    let stream = get("stream").is_some_and(|s| s.get() == "true");
    let mut out = Vec::with_capacity(body.len() + 64);
    // NUL separators: none of these parts can contain a NUL that JSON would not escape.
    for part in [
        &b"v2"[..],
        scope.service.as_bytes(),
        scope.endpoint.as_bytes(),
        scope.target_model.as_bytes(),
        scope.variant,
        if stream { b"stream" } else { b"whole" },
    ] {
        out.extend_from_slice(part);
        out.push(0);
    }
    let stream_options = match get("stream_options") {
        Some(v) => without_include_usage(v)?,
        None => None,
    };
    let kept = fields.iter().filter_map(|(k, v)| match &**k {
        name if IGNORED_FIELDS.contains(&name) => None,
        "stream_options" => stream_options.as_deref().map(|s| (k.clone(), s)),
        _ => Some((k.clone(), *v)),
    });
    write_members(&mut out, kept, 0)?;
    Some(out)
}

/// `stream_options` without `include_usage`, canonical, or `None` when nothing else is in it:
/// whether the caller sees the usage chunk is settled on replay (the router adds or hides it),
/// while other options (vLLM's `continuous_usage_stats`, OpenAI's `include_obfuscation`)
/// change the chunks themselves. The outer `None`: not cacheable (a repeated key).
fn without_include_usage(v: &RawValue) -> Option<Option<Box<RawValue>>> {
    if !v.get().starts_with('{') {
        return Some(Some(v.to_owned()));
    }
    let members = serde_json::from_str::<Members<'_>>(v.get())
        .ok()?
        .sorted()?;
    let mut rest = members
        .into_iter()
        .filter(|(k, _)| k != "include_usage")
        .peekable();
    if rest.peek().is_none() {
        return Some(None);
    }
    let mut text = Vec::new();
    write_members(&mut text, rest, 1)?;
    RawValue::from_string(String::from_utf8(text).ok()?)
        .ok()
        .map(Some)
}

fn write_members<'a>(
    out: &mut Vec<u8>,
    members: impl Iterator<Item = (Cow<'a, str>, &'a RawValue)>,
    depth: usize,
) -> Option<()> {
    out.push(b'{');
    for (i, (k, v)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, &k).ok()?;
        out.push(b':');
        write_canonical(out, v, depth + 1)?;
    }
    out.push(b'}');
    Some(())
}

/// Compact JSON with object keys sorted at every depth. Strings and numbers keep their source
/// spelling: two spellings of one value only miss the cache, they never share an answer.
fn write_canonical(out: &mut Vec<u8>, v: &RawValue, depth: usize) -> Option<()> {
    // Checked up front by `key`; kept here so the recursion is bounded on its own.
    if depth > MAX_DEPTH {
        return None;
    }
    let text = v.get();
    match text.as_bytes().first()? {
        b'{' => {
            let members = serde_json::from_str::<Members<'_>>(text).ok()?.sorted()?;
            write_members(out, members.into_iter(), depth)
        }
        b'[' => {
            let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
            out.push(b'[');
            for (i, item) in items.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item, depth + 1)?;
            }
            out.push(b']');
            Some(())
        }
        _ => {
            out.extend_from_slice(text.as_bytes());
            Some(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"Extract the date"}]}"#;

    fn k(body: &str) -> Option<Vec<u8>> {
        key(
            &KeyScope {
                service: "svc",
                endpoint: "/v1/chat/completions",
                target_model: "m",
                variant: b"",
            },
            body.as_bytes(),
            false,
        )
    }

    fn with(field: &str) -> String {
        BASE.replacen('{', &format!("{{{field},"), 1)
    }

    #[test]
    fn only_deterministic_requests_have_a_key() {
        assert!(k(BASE).is_some());
        assert!(
            k(&BASE.replace("\"temperature\":0,", "")).is_none(),
            "temperature must be explicit"
        );
        assert!(k(&BASE.replace("\"temperature\":0", "\"temperature\":0.7")).is_none());
        assert!(k(&BASE.replace("\"temperature\":0", "\"temperature\":0.0")).is_some());
        assert!(k(&BASE.replace("\"temperature\":0", "\"top_k\":1")).is_some());
        assert!(k(&with("\"n\":2")).is_none());
        assert!(k(&with("\"n\":1")).is_some());
        assert!(k("[1]").is_none() && k("{bad").is_none());
        let scope = KeyScope {
            service: "s",
            endpoint: "/v1/embeddings",
            target_model: "e",
            variant: b"",
        };
        assert!(
            key(&scope, br#"{"input":"x"}"#, true).is_some(),
            "embeddings are deterministic"
        );
    }

    #[test]
    fn key_order_whitespace_and_ignored_fields_do_not_split_the_key() {
        let reordered = r#"{ "messages" : [ { "content":"Extract the date", "role":"user" } ],
            "temperature": 0, "model": "fast", "user": "u-7", "stream_options": {"include_usage": true} }"#;
        assert_eq!(k(BASE), k(reordered));
    }

    #[test]
    fn every_generation_parameter_splits_the_key() {
        let base = k(BASE).unwrap();
        for field in [
            r#""stop":["\n"]"#,
            r#""seed":1"#,
            r#""tools":[{"type":"function","function":{"name":"f"}}]"#,
            r#""tool_choice":"auto""#,
            r#""response_format":{"type":"json_object"}"#,
            r#""logit_bias":{"50256":-100}"#,
            r#""presence_penalty":0.5"#,
            r#""frequency_penalty":0.5"#,
            r#""max_tokens":5"#,
            r#""top_p":0.5"#,
            r#""logprobs":true"#,
            r#""x_vendor_option":1"#,
            r#""stream":true"#,
            r#""stream_options":{"continuous_usage_stats":true}"#,
            r#""stream_options":{"include_usage":true,"include_obfuscation":false}"#,
        ] {
            assert_ne!(k(&with(field)).unwrap(), base, "{field} must split the key");
        }
        // Only `include_usage` is left out of `stream_options`, at any key order.
        assert_eq!(
            k(&with(
                r#""stream_options":{"include_usage":true,"continuous_usage_stats":true}"#
            )),
            k(&with(
                r#""stream_options":{"continuous_usage_stats":true,"include_usage":false}"#
            ))
        );
        assert_eq!(
            k(&with(r#""stream_options":{"include_usage":false}"#)),
            k(BASE)
        );
        assert!(
            k(&with(r#""stream_options":{"a":1,"a":2}"#)).is_none(),
            "repeated key"
        );
        assert_ne!(
            k(&BASE.replace("Extract the date", "Extract the time")).unwrap(),
            base,
            "messages split the key"
        );
    }

    #[test]
    fn tenant_endpoint_target_model_and_variant_split_the_key() {
        let key_for = |service, endpoint, target_model, variant: &[u8]| {
            key(
                &KeyScope {
                    service,
                    endpoint,
                    target_model,
                    variant,
                },
                BASE.as_bytes(),
                false,
            )
            .unwrap()
        };
        let base = key_for("a", "/v1/chat/completions", "m", b"");
        assert_ne!(base, key_for("b", "/v1/chat/completions", "m", b""));
        assert_ne!(base, key_for("a", "/v1/completions", "m", b""));
        assert_ne!(base, key_for("a", "/v1/chat/completions", "m2", b""));
        assert_ne!(
            base,
            key_for("a", "/v1/chat/completions", "m", b"api-version=1")
        );
    }

    #[test]
    fn repeated_keys_and_other_spellings_never_share_an_answer() {
        assert!(k(&with(r#""seed":1,"seed":2"#)).is_none(), "repeated key");
        assert!(
            k(&with(r#""response_format":{"type":"a","type":"b"}"#)).is_none(),
            "repeated nested key"
        );
        // Another spelling of the same value is a miss, not a wrong hit.
        assert_ne!(k(&with(r#""seed":1"#)), k(&with(r#""seed":1.0"#)));
        // Escaped keys are decoded before they are compared or left out.
        assert_eq!(k(BASE), k(&with(r#""\u0075ser":"x""#)));
    }

    #[test]
    fn absurd_nesting_is_not_cached_and_does_not_overflow() {
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(k(&with(&format!(r#""tools":{deep}"#))).is_none());
        let fine = format!("{}1{}", "[".repeat(20), "]".repeat(20));
        assert!(k(&with(&format!(r#""tools":{fine}"#))).is_some());
        // Brackets inside strings are text, not nesting.
        let text = format!(r#""stop":["{}\"{}"]"#, "[".repeat(100), "{".repeat(100));
        assert!(k(&with(&text)).is_some());
    }

    #[test]
    fn nested_objects_are_canonical_too() {
        let a = with(
            r#""response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"b":1,"a":2}}}"#,
        );
        let b = with(
            r#""response_format":{"json_schema":{"schema":{"a":2,"b":1},"name":"x"},"type":"json_schema"}"#,
        );
        assert_eq!(k(&a), k(&b));
    }
}
