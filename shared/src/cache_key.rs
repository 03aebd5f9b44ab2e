//! Response-cache keys. Owns: deciding whether a request is deterministic enough to cache, and
//! the canonical key bytes that identify its answer (tenant, endpoint, target model, stream
//! flag, and every body field but a short list that cannot change the output).
//! Must not: hash (the cache does) or look at responses.

use serde_json::Value;
use std::io::Write;

/// Body fields left out of the key: they cannot change the model's output.
/// `model` is replaced by the resolved target model, which is in the key on its own.
pub const IGNORED_FIELDS: [&str; 3] = ["model", "user", "stream_options"];

/// What identifies a cached answer besides the body.
pub struct KeyScope<'a> {
    /// The caller's service; empty when the config lets tenants share entries.
    pub service: &'a str,
    pub endpoint: &'a str,
    pub target_model: &'a str,
}

/// The canonical key bytes for `body`, or `None` when the request is not deterministic:
/// `temperature` must be explicitly 0 (or `top_k` 1) and `n` absent or 1. Embeddings are
/// deterministic by nature.
pub fn key(scope: &KeyScope<'_>, body: &[u8], embeddings: bool) -> Option<Vec<u8>> {
    let Value::Object(fields) = serde_json::from_slice::<Value>(body).ok()? else {
        return None;
    };
    let zero_temperature = fields.get("temperature").and_then(Value::as_f64) == Some(0.0);
    let top_k_one = fields.get("top_k").and_then(Value::as_f64) == Some(1.0);
    let single = fields.get("n").is_none_or(|n| n.as_f64() == Some(1.0));
    if !(embeddings || (zero_temperature || top_k_one) && single) {
        return None;
    }
    let stream = fields
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut out = Vec::with_capacity(body.len() + 64);
    // NUL separators: none of these parts can contain a NUL that JSON would not escape.
    for part in [
        &b"v1"[..],
        scope.service.as_bytes(),
        scope.endpoint.as_bytes(),
        scope.target_model.as_bytes(),
        if stream { b"stream" } else { b"whole" },
    ] {
        out.extend_from_slice(part);
        out.push(0);
    }
    let mut keys: Vec<&String> = fields
        .keys()
        .filter(|k| !IGNORED_FIELDS.contains(&k.as_str()))
        .collect();
    keys.sort();
    out.push(b'{');
    for (i, k) in keys.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_canonical(&mut out, &Value::String(k.clone()));
        out.push(b':');
        write_canonical(&mut out, &fields[k.as_str()]);
    }
    out.push(b'}');
    Some(out)
}

/// Compact JSON with object keys sorted at every depth, whatever order the map keeps.
fn write_canonical(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, &Value::String(k.clone()));
                out.push(b':');
                write_canonical(out, &map[k.as_str()]);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(out, item);
            }
            out.push(b']');
        }
        scalar => {
            let _ = out.write_all(scalar.to_string().as_bytes());
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
        ] {
            assert_ne!(k(&with(field)).unwrap(), base, "{field} must split the key");
        }
        assert_ne!(
            k(&BASE.replace("Extract the date", "Extract the time")).unwrap(),
            base,
            "messages split the key"
        );
    }

    #[test]
    fn tenant_endpoint_and_target_model_split_the_key() {
        let key_for = |service, endpoint, target_model| {
            key(
                &KeyScope {
                    service,
                    endpoint,
                    target_model,
                },
                BASE.as_bytes(),
                false,
            )
            .unwrap()
        };
        let base = key_for("a", "/v1/chat/completions", "m");
        assert_ne!(base, key_for("b", "/v1/chat/completions", "m"));
        assert_ne!(base, key_for("a", "/v1/completions", "m"));
        assert_ne!(base, key_for("a", "/v1/chat/completions", "m2"));
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
