//! Bad input never panics: every runtime-free piece that reads caller or upstream bytes (request
//! views and rewriting, the classifier, cache keys, usage parsing, the HTTP codec, the chunked
//! decoder, the SSE filter) is fed mutations of valid requests, heads, chunked bodies and
//! streams, split at random points. A fixed seed makes a failure reproducible;
//! `MUTATIONS=4000000 cargo test --release --test mutated_inputs` runs a longer search.

use switchyard_dataplane::codec::{parse_request, parse_response, ChunkedDecoder};
use switchyard_dataplane::sse::SseFilter;
use switchyard_shared::cache_key::{key, KeyScope};
use switchyard_shared::classifier::Classifier;
use switchyard_shared::openai::{completed_normally, parse_usage, Endpoint, RequestView};

const SEEDS: &[&[u8]] = &[
    br#"{"model":"auto","temperature":0,"messages":[{"role":"system","content":"You extract."},{"role":"user","content":"Extract the invoice number: INV-2291 \u00e9 \"q\""}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"n":1,"stop":["\n"]}"#,
    br#"{"model":"m","prompt":["a","b"],"max_tokens":5,"top_k":1,"stream":true,"stream_options":{"include_usage":true}}"#,
    br#"{"model":"e","input":["x","y"],"encoding_format":"float"}"#,
    br#"{"model":"auto","messages":[{"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"data:x"}}]}],"response_format":{"type":"json_schema","json_schema":{"name":"n","schema":{}}}}"#,
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 12\r\nx-switchyard-service: a\r\n\r\n{\"a\":1}12345",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nTrailer: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
    b"4;ext=1\r\nabcd\r\nA\r\n0123456789\r\n0\r\n\r\n",
    b"data: {\"choices\":[{\"delta\":{\"content\":\"x\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"total_tokens\":7}}\n\ndata: [DONE]\n\n",
    b"{\"choices\":[{\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4,\"prompt_tokens_details\":{\"cached_tokens\":1}}}",
];

/// Bytes that matter to JSON, HTTP and SSE, plus invalid UTF-8.
const SIGNIFICANT: &[u8] = b"{}[]\":,\\ 0123456789-+.eEtrufalsn\r\n\x00\xff\xc3\xa9u";

/// xorshift64: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn significant(&mut self) -> u8 {
        SIGNIFICANT[self.below(SIGNIFICANT.len())]
    }
}

/// One to six edits: replace, insert or delete a byte, truncate, or repeat a slice.
fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(6) {
        let at = rng.below(v.len() + 1);
        match rng.below(5) {
            0 if at < v.len() => v[at] = rng.significant(),
            1 => v.insert(at, rng.significant()),
            2 if at < v.len() => {
                v.remove(at);
            }
            3 => v.truncate(at),
            _ => {
                let end = (at + rng.below(64)).min(v.len());
                let piece = v[at..end].to_vec();
                let to = rng.below(v.len() + 1);
                v.splice(to..to, piece);
            }
        }
    }
    v
}

/// Every reader of untrusted bytes, the streaming ones fed in pieces of 1-16 bytes.
fn read_everything(input: &[u8], classifier: &Classifier, rng: &mut Rng) {
    for endpoint in [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ] {
        if let Ok(view) = RequestView::parse(endpoint, input) {
            classifier.classify(&view.prompt());
            view.rewrite(input, "target-\"m", view.needs_injected_usage(endpoint));
        }
    }
    let scope = KeyScope {
        service: "s",
        endpoint: "/v1/chat/completions",
        target_model: "m",
        variant: b"",
    };
    key(&scope, input, false);
    key(&scope, input, true);
    parse_usage(input);
    completed_normally(Endpoint::ChatCompletions, input);
    completed_normally(Endpoint::Embeddings, input);
    let _ = parse_request(input, 8192);
    let _ = parse_request(input, 16);
    let _ = parse_response(input, false);

    let mut chunked = ChunkedDecoder::default();
    let (mut decoded, mut at) = (Vec::new(), 0);
    while at < input.len() {
        let end = (at + 1 + rng.below(16)).min(input.len());
        match chunked.decode(&input[at..end], &mut decoded, 64) {
            Ok(0) | Err(_) => break,
            Ok(n) => at += n,
        }
    }

    let mut sse = SseFilter::new(true);
    let (mut relayed, mut at) = (Vec::new(), 0);
    while at < input.len() {
        let end = (at + 1 + rng.below(16)).min(input.len());
        sse.feed(&input[at..end], &mut relayed);
        at = end;
    }
    sse.finish(&mut relayed);
    sse.ended_normally();
}

#[test]
fn mutated_requests_heads_and_streams_never_panic() {
    let mutations: usize = std::env::var("MUTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let classifier = Classifier::new(&Default::default()).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..mutations {
        let input = if rng.below(10) == 0 {
            (0..rng.below(200)).map(|_| rng.next() as u8).collect()
        } else {
            let seed = SEEDS[rng.below(SEEDS.len())];
            mutate(&mut rng, seed)
        };
        let mut split = Rng(rng.next() | 1);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_everything(&input, &classifier, &mut split)
        }));
        assert!(
            outcome.is_ok(),
            "panicked on {:?}",
            String::from_utf8_lossy(&input)
        );
    }
}
