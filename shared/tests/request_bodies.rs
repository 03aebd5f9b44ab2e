//! Randomly built request bodies, the shapes a client may send and many it should not: every
//! one is refused with an error or parsed, and a parsed one is rewritten into JSON that says
//! the same with only `model` (and `stream_options` where usage is asked for) changed. Cache
//! keys and the classifier take every parsed body. Nothing may panic.

use fastrand::Rng;
use serde_json::Value;
use switchyard_shared::cache_key::{self, KeyScope};
use switchyard_shared::classifier::{Classifier, ClassifierConfig};
use switchyard_shared::openai::{Endpoint, RequestView};

/// One of `items`.
fn pick<'a>(rng: &mut Rng, items: &[&'a str]) -> &'a str {
    items[rng.usize(..items.len())]
}

const KEYS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "input",
    "stream",
    "stream_options",
    "include_usage",
    "tools",
    "functions",
    "response_format",
    "type",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_k",
    "n",
    "best_of",
    "role",
    "content",
    "text",
    "user",
    "seed",
    "x-vendor",
];

const SCALARS: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-0",
    "1",
    "1.0",
    "1e400",
    "-1",
    "18446744073709551616",
    "\"\"",
    "\"auto\"",
    "\"user\"",
    "\"system\"",
    "\"json_object\"",
    "\"caf\\u00e9 {\\\"not\\\": [a brace]}\"",
    "\"\\ud83d\\ude00 emoji\"",
    "\"line\\nbreak\"",
];

/// A JSON value: objects and arrays with the API's field names, down to `depth`.
fn value(rng: &mut Rng, depth: u32, out: &mut String) {
    match if depth == 0 { 0 } else { rng.usize(..4) } {
        0 | 1 => out.push_str(pick(rng, SCALARS)),
        2 => {
            out.push('[');
            for i in 0..rng.usize(..4) {
                if i > 0 {
                    out.push(',');
                }
                value(rng, depth - 1, out);
            }
            out.push(']');
        }
        _ => object(rng, depth - 1, out),
    }
}

fn object(rng: &mut Rng, depth: u32, out: &mut String) {
    out.push('{');
    for i in 0..rng.usize(..6) {
        if i > 0 {
            out.push(',');
        }
        // Whitespace where JSON allows it, sometimes.
        let gap = if rng.usize(..3) == 0 { " " } else { "" };
        out.push_str(&format!("{gap}\"{}\"{gap}:{gap}", pick(rng, KEYS)));
        value(rng, depth, out);
    }
    out.push('}');
}

/// A body that is usually close to a valid request, often not quite.
fn body(rng: &mut Rng) -> String {
    let mut out = String::new();
    match rng.usize(..10) {
        // The top level as an array or a scalar.
        0 => value(rng, 3, &mut out),
        // A plausible request with random extra fields.
        1..=6 => {
            out.push('{');
            let mut fields = vec![
                format!(
                    "\"model\":{}",
                    pick(rng, &["\"auto\"", "null", "\"m\"", "7"])
                ),
                match rng.usize(..3) {
                    0 => "\"messages\":[{\"role\":\"user\",\"content\":\"Extract the date\"}]"
                        .to_string(),
                    1 => "\"prompt\":[\"a\",\"b\"]".to_string(),
                    _ => "\"input\":\"text\"".to_string(),
                },
            ];
            for _ in 0..rng.usize(..4) {
                let mut v = String::new();
                value(rng, 2, &mut v);
                fields.push(format!("\"{}\":{v}", pick(rng, KEYS)));
            }
            if rng.usize(..2) == 0 {
                fields.push("\"stream\":true".into());
            }
            // Any order.
            for i in (1..fields.len()).rev() {
                fields.swap(i, rng.usize(..i + 1));
            }
            out.push_str(&fields.join(","));
            out.push('}');
        }
        _ => object(rng, 3, &mut out),
    }
    // Sometimes cut short or followed by more.
    match rng.usize(..12) {
        0 => {
            let cut = rng.usize(..out.len() + 1);
            while !out.is_char_boundary(cut.min(out.len())) {
                out.pop();
            }
            out.truncate(cut.min(out.len()));
        }
        1 => out.push_str(" {}"),
        _ => {}
    }
    out
}

#[test]
fn any_body_is_refused_or_parsed_and_rewritten_faithfully() {
    let classifier = Classifier::new(&ClassifierConfig::default()).unwrap();
    let mut rng = Rng::with_seed(0x5eed_cafe_f00d_1234);
    let mut parsed = 0;
    for _ in 0..20_000 {
        let body = body(&mut rng);
        for endpoint in [
            Endpoint::ChatCompletions,
            Endpoint::Completions,
            Endpoint::Embeddings,
        ] {
            let scope = KeyScope {
                service: "s",
                endpoint: endpoint.path(),
                target_model: "t",
                variant: b"",
            };
            let _ = cache_key::key(&scope, body.as_bytes(), endpoint == Endpoint::Embeddings);
            let Ok(view) = RequestView::parse(endpoint, body.as_bytes()) else {
                continue;
            };
            parsed += 1;
            let _ = classifier.classify(&view.prompt());
            let inject = view.needs_injected_usage(endpoint);
            let out = view.rewrite(body.as_bytes(), "org/target\"1", inject);
            let shown = String::from_utf8_lossy(&out);
            let mut before = top_level(body.as_bytes()).expect("parsed, so an object");
            let mut after = top_level(&out).unwrap_or_else(|| panic!("{body}\n-> {shown}"));
            // What the rewrite writes is there once: a backend reading the last of two
            // would see another value.
            let take = |entries: &mut Vec<(String, String)>, name: &str| {
                let values: Vec<String> = entries
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .collect();
                entries.retain(|(k, _)| k != name);
                values
            };
            assert_eq!(
                take(&mut after, "model"),
                ["\"org/target\\\"1\""],
                "{shown}"
            );
            take(&mut before, "model");
            if inject {
                let options = take(&mut after, "stream_options");
                assert_eq!(options.len(), 1, "{shown}");
                let parsed: Value = serde_json::from_str(&options[0]).unwrap();
                assert_eq!(parsed["include_usage"], true, "{shown}");
                // The caller's other options as they were written, include_usage once.
                let mut after_options = top_level(options[0].as_bytes()).unwrap();
                assert_eq!(
                    take(&mut after_options, "include_usage"),
                    ["true"],
                    "{shown}"
                );
                let mut before_options = take(&mut before, "stream_options")
                    .first()
                    .and_then(|o| top_level(o.as_bytes()))
                    .unwrap_or_default();
                take(&mut before_options, "include_usage");
                assert_eq!(before_options, after_options, "{body}\n-> {shown}");
            }
            // Everything else as it came, byte for byte and in order.
            assert_eq!(before, after, "{body}\n-> {shown}");
        }
    }
    assert!(parsed > 3_000, "the bodies exercise parsing: {parsed}");
}

/// The top-level members of a JSON object as written (raw values), repeats included; `None`
/// when it is not one.
fn top_level(json: &[u8]) -> Option<Vec<(String, String)>> {
    struct Members;
    impl<'de> serde::de::Visitor<'de> for Members {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut members = Vec::new();
            while let Some((k, v)) = m.next_entry::<String, Box<serde_json::value::RawValue>>()? {
                members.push((k, v.get().to_string()));
            }
            Ok(members)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    let members = serde::Deserializer::deserialize_map(&mut de, Members).ok()?;
    de.end().ok()?;
    Some(members)
}
