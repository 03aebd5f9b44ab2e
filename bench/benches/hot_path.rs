//! Per-request data-plane costs outside the classifier: parsing a request head, validating
//! and viewing a chat body, rewriting `model`, reading `usage` from an answer, the routing
//! decision, and SSE event scanning.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use switchyard_dataplane::codec;
use switchyard_dataplane::sse::SseFilter;
use switchyard_shared::category::Category;
use switchyard_shared::openai::{parse_usage, Endpoint, RequestView};
use switchyard_shared::routing::{Priority, RequestFacts};

const HEAD: &[u8] = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: OpenAI/Python 1.54.0\r\n\
Accept: application/json\r\nContent-Type: application/json\r\nAuthorization: Bearer sk-test\r\n\
X-Switchyard-Service: billing\r\nX-Stainless-Lang: python\r\nContent-Length: 180\r\n\r\n";

const BODY: &str = r#"{"model":"auto","temperature":0,"messages":[{"role":"system","content":"You are a precise assistant."},{"role":"user","content":"Extract the invoice number and the total from: Invoice INV-2291, total 1,234.50 EUR, due 2024-05-01."}]}"#;

const CONFIG: &str = r#"
[[backends]]
name = "a"
url = "http://127.0.0.1:1"
models = [{ name = "s" }, { name = "m" }, { name = "l" }]
[[tiers]]
name = "small"
targets = ["a/s"]
[[tiers]]
name = "medium"
targets = ["a/m"]
[[tiers]]
name = "large"
targets = ["a/l"]
[[rules]]
name = "etl"
match = { service = ["etl"], priority = ["bulk"] }
tier = "small"
"#;

fn hot_path(c: &mut Criterion) {
    c.bench_function("codec/parse_request_head", |b| {
        b.iter(|| {
            codec::parse_request(black_box(HEAD), 32 * 1024)
                .unwrap()
                .unwrap()
                .1
        })
    });
    c.bench_function("openai/parse_chat_view", |b| {
        b.iter(|| {
            RequestView::parse(Endpoint::ChatCompletions, black_box(BODY.as_bytes()))
                .unwrap()
                .total_chars
        })
    });
    let view = RequestView::parse(Endpoint::ChatCompletions, BODY.as_bytes()).unwrap();
    c.bench_function("openai/rewrite_model", |b| {
        b.iter(|| {
            view.rewrite(
                black_box(BODY.as_bytes()),
                "meta-llama/Llama-3.1-8B-Instruct",
                false,
            )
            .len()
        })
    });

    // A vLLM-style answer: `usage` last, with a nested details object.
    const ANSWER: &[u8] = br#"{"id":"chatcmpl-9f2","object":"chat.completion","created":1700000000,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"INV-2291, 1,234.50 EUR"},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":58,"total_tokens":70,"completion_tokens":12,"prompt_tokens_details":{"cached_tokens":32}}}"#;
    c.bench_function("openai/parse_usage", |b| {
        b.iter(|| parse_usage(black_box(ANSWER)).unwrap().completion)
    });

    let table = switchyard_shared::config::load_str(CONFIG, "bench", &|_| None).unwrap();
    let facts = RequestFacts {
        service: "billing",
        priority: Priority::Normal,
        model: "auto",
        path: "/v1/chat/completions",
        pinned_tier: None,
        category: Category::Extraction,
        alternative: Some(Category::Qa),
        long_context: false,
        classified: true,
    };
    // A cache lookup as the proxy does it for a deterministic 2 KiB body: canonical key, hash,
    // verify.
    let doc = "Invoice INV-2291 from ACME GmbH, due 2024-05-01, total 1,234.50 EUR. ".repeat(29);
    let cached_body = serde_json::json!({"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": format!("Extract the invoice number: {doc}")}]}).to_string();
    let scope = switchyard_shared::cache_key::KeyScope {
        service: "etl",
        endpoint: "/v1/chat/completions",
        target_model: "m",
        variant: b"",
    };
    let cache = switchyard_dataplane::cache::ResponseCache::new(64 << 20);
    let key = switchyard_shared::cache_key::key(&scope, cached_body.as_bytes(), false).unwrap();
    let request_parts: [&[u8]; 3] = [b"svc", b"/v1/chat/completions", b"1"];
    cache.put_shortcut(
        switchyard_shared::cache_key::request_key(&request_parts, cached_body.as_bytes()),
        &key,
        0,
        switchyard_shared::category::Category::Extraction,
        "rule",
        None,
        false,
        false,
        cached_body.len(),
        0,
    );
    cache.put(switchyard_dataplane::cache::Entry::new(
        key,
        std::time::Duration::from_secs(3600),
        b"application/json",
        b"{}",
        Default::default(),
        1,
        "t".into(),
        "b".into(),
        "m".into(),
    ));
    let mut group = c.benchmark_group("cache");
    group.throughput(Throughput::Bytes(cached_body.len() as u64));
    group.bench_function("lookup_hit_2kib_body", |b| {
        b.iter(|| {
            let key =
                switchyard_shared::cache_key::key(&scope, black_box(cached_body.as_bytes()), false)
                    .unwrap();
            cache.get(&key, std::time::Instant::now()).is_some()
        })
    });
    // The same request again, byte for byte: found through its shortcut, not canonicalised.
    group.bench_function("lookup_repeat_2kib_body", |b| {
        b.iter(|| {
            let request = switchyard_shared::cache_key::request_key(
                &request_parts,
                black_box(cached_body.as_bytes()),
            );
            cache
                .get_shortcut(&request, std::time::Instant::now())
                .is_some()
        })
    });
    group.finish();

    c.bench_function("routing/decide", |b| {
        b.iter(|| table.decide(black_box(&facts)).unwrap().rule.len())
    });

    // 64 token events of a typical vLLM stream, then a usage chunk and [DONE].
    let mut events: Vec<Vec<u8>> = (0..64)
        .map(|i| format!("data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" tok{i}\"}},\"finish_reason\":null}}]}}\n\n").into_bytes())
        .collect();
    events.push(b"data: {\"id\":\"chatcmpl-1\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":64}}\n\n".to_vec());
    events.push(b"data: [DONE]\n\n".to_vec());
    let stream = events.concat();
    let mut group = c.benchmark_group("sse");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("filter_stream_in_512b_reads", |b| {
        let mut out = Vec::with_capacity(stream.len());
        b.iter(|| {
            let mut f = SseFilter::new(true);
            out.clear();
            for piece in stream.chunks(512) {
                f.feed(piece, &mut out);
            }
            f.finish(&mut out);
            out.len()
        })
    });
    // As a paced backend sends them: each event read on its own.
    group.bench_function("filter_stream_event_per_read", |b| {
        let mut out = Vec::with_capacity(stream.len());
        b.iter(|| {
            let mut f = SseFilter::new(true);
            out.clear();
            for event in &events {
                f.feed(event, &mut out);
            }
            f.finish(&mut out);
            out.len()
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
