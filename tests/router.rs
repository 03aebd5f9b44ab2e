//! End-to-end tests: the real router in front of real simulator processes.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

fn two_tier() -> (Proc, Proc, Proc) {
    let small = sim("small", &["--record"]);
    let large = sim("large", &["--record"]);
    let r = router(&config_for(
        &[("small", small.url()), ("large", large.url())],
        "",
    ));
    (small, large, r)
}

#[test]
fn chat_completions_embeddings_and_models_pass_through() {
    let (_small, _large, r) = two_tier();
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        &chat("Summarise this: the meeting moved to Friday."),
        "x-switchyard-service: billing\r\n",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-switchyard-category"), Some("summarisation"));
    assert_eq!(resp.header("x-switchyard-tier"), Some("small"));
    assert_eq!(resp.header("x-switchyard-backend"), Some("small"));
    assert_eq!(resp.header("x-switchyard-model"), Some("small-model"));
    assert_eq!(resp.header("x-switchyard-attempts"), Some("1"));
    assert!(resp
        .header("x-switchyard-rule")
        .unwrap()
        .starts_with("category"));
    assert_eq!(
        resp.header("x-switchyard-request-id").map(str::len),
        Some(16)
    );
    let v = resp.json();
    assert_eq!(v["model"], "small-model");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let resp = post(
        r.addr,
        "/v1/completions",
        r#"{"model":"large-model","prompt":"Once upon a time"}"#,
        "",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["object"], "text_completion");
    assert_eq!(
        (
            resp.header("x-switchyard-backend"),
            resp.header("x-switchyard-rule")
        ),
        (Some("large"), Some("model"))
    );

    let resp = post(
        r.addr,
        "/v1/embeddings",
        r#"{"model":"small-model","input":["a","b"]}"#,
        "",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["data"].as_array().unwrap().len(), 2);
    // An unknown name (routed by classifying, by default) has no prompt to classify here:
    // the error says the name is unknown, not that it is chosen by classifying.
    let unknown = post(
        r.addr,
        "/v1/embeddings",
        r#"{"model":"unknown-emb","input":"x"}"#,
        "",
    );
    let message = unknown.error(404)["message"].as_str().unwrap().to_string();
    assert!(message.contains("is not served here"), "{message}");

    let models = get(r.addr, "/v1/models").json();
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "auto",
        "fast",
        "smart",
        "small",
        "large",
        "small-model",
        "large-model",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    // One model, as the SDKs' `models.retrieve` asks for it.
    let one = get(r.addr, "/v1/models/small-model");
    assert_eq!(one.status, 200);
    assert_eq!(
        (one.json()["id"].as_str(), one.json()["object"].as_str()),
        (Some("small-model"), Some("model"))
    );
    assert_eq!(
        get(r.addr, "/v1/models/auto").json()["owned_by"],
        "switchyard"
    );
    let unknown = get(r.addr, "/v1/models/no-such-model");
    assert_eq!(unknown.error(404)["code"], "model_not_found");
    let posted = post(r.addr, "/v1/models/small-model", "{}", "");
    assert_eq!(posted.status, 405);
    assert_eq!(get(r.addr, "/healthz").status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(r.addr, "/readyz").status != 200 {
        assert!(Instant::now() < deadline, "never ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn body_reaches_the_backend_unchanged_except_model() {
    let (small, _large, r) = two_tier();
    let body = r#"{"model":"fast","messages":[{"role":"user","content":"Extract the date: due 2024-05-01"}],"tools":[{"type":"function","function":{"name":"get","parameters":{"type":"object","properties":{"x":{"type":"integer"}}}}}],"tool_choice":"auto","response_format":{"type":"json_schema","json_schema":{"name":"d","schema":{"type":"object"}}},"seed":42,"logprobs":true,"top_logprobs":3,"user":"u-1","x_vendor":{"nested":[1,2.5,"s",null]},"temperature":0}"#;
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        body,
        "authorization: Bearer client-secret\r\napi-key: client-secret\r\nx-api-key: client-secret\r\nx-goog-api-key: client-secret\r\nx-switchyard-service: svc\r\nx-custom: kept\r\nconnection: keep-alive, x-hop\r\nx-hop: client-secret\r\n",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let recorded = get(small.addr, "/sim/last-request").text();
    let (head, received) = recorded.split_once("\n\n").unwrap();
    assert_eq!(received, body.replace("\"fast\"", "\"small-model\""));
    assert!(head.contains("x-custom: kept"));
    assert!(
        !head.to_lowercase().contains("client-secret"),
        "client credentials must not reach backends: {head}"
    );
    assert!(!head.contains("x-switchyard-service"));
}

#[test]
fn streaming_hides_only_the_usage_chunk_the_router_asked_for() {
    let slow = sim(
        "slow",
        &["--tokens-per-second", "20", "--completion-tokens", "6"],
    );
    let r = router(&config_for(&[("slow", slow.url())], ""));
    let mut c = Conn::open(r.addr);
    let body =
        r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hello there"}]}"#;
    c.send(&post_raw("/v1/chat/completions", body, ""));
    let resp = c.read_response().unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    let text = resp.text();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"usage\""),
        "the usage chunk the router asked for is hidden: {text}"
    );
    assert_eq!(
        text.matches("data:").count(),
        7,
        "6 tokens and [DONE]: {text}"
    );
    // The caller asked for usage itself: it is passed on.
    let body = r#"{"model":"auto","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    c.send(&post_raw("/v1/chat/completions", body, ""));
    let text = c.read_response().unwrap().text();
    assert!(
        text.contains("\"usage\":{") && text.contains("\"choices\":[]"),
        "{text}"
    );
}

#[test]
fn failover_on_refused_500_429_and_slow_first_byte() {
    let good = sim("good", &[]);
    let dead_port = free_port();
    let failing = sim("failing", &["--error-rate", "1", "--error-status", "500"]);
    let limited = sim("limited", &["--error-rate", "1", "--error-status", "429"]);
    let slow = sim("slow", &["--latency-ms", "3000"]);
    let backends = [
        ("dead", format!("http://127.0.0.1:{dead_port}")),
        ("failing", failing.url()),
        ("limited", limited.url()),
        ("slow", slow.url()),
        ("good", good.url()),
    ];
    // Ejection off: every request walks the whole chain of failing tiers up to `good`.
    let config = config_for(&backends, "[routing]\nmax_attempts = 5\n")
        .replace("interval_ms = 100", "interval_ms = 0")
        .replace("eject_after_failures = 2", "eject_after_failures = 1000");
    // Only the slow backend gets a first-byte timeout shorter than its latency.
    let slow_url = format!("url = \"{}\"\n", slow.url());
    let config = config.replacen(&slow_url, &format!("{slow_url}first_byte_timeout_ms = 300\n"), 1).replace(
        "models = [{ name = \"slow-model\", input_per_mtok = 1.0, output_per_mtok = 2.0 }]\nfirst_byte_timeout_ms = 3000\n",
        "models = [{ name = \"slow-model\", input_per_mtok = 1.0, output_per_mtok = 2.0 }]\n",
    );
    let r = router(&config);
    for (i, tier) in ["dead", "failing", "limited", "slow"]
        .into_iter()
        .enumerate()
    {
        // Pinned to a failing tier, the request moves up tier by tier and succeeds on `good`.
        let resp = post(
            r.addr,
            "/v1/chat/completions",
            &chat("hi"),
            &format!("x-switchyard-tier: {tier}\r\n"),
        );
        assert_eq!(resp.status, 200, "tier {tier}: {}", resp.text());
        assert_eq!(
            resp.header("x-switchyard-backend"),
            Some("good"),
            "tier {tier}"
        );
        assert_eq!(
            resp.header("x-switchyard-attempts"),
            Some((5 - i).to_string().as_str()),
            "tier {tier}"
        );
    }
    // With no attempt left, the backend's own 429 reaches the caller unchanged.
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        r#"{"model":"limited-model","messages":[{"role":"user","content":"x"}]}"#,
        "",
    );
    assert_eq!(resp.status, 429, "{}", resp.text());
}

#[test]
fn failing_backend_is_ejected_then_recovers() {
    let good = sim("good", &[]);
    let port = free_port();
    let backends = [
        ("flaky", format!("http://127.0.0.1:{port}")),
        ("good", good.url()),
    ];
    let r = router(&config_for(&backends, ""));
    let pinned = "x-switchyard-tier: flaky\r\n";
    // Refused connections eject it after two failures (and active checks fail too) ...
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = post(r.addr, "/v1/chat/completions", &chat("hi"), pinned);
        assert_eq!(resp.status, 200);
        if resp.header("x-switchyard-attempts") == Some("1") {
            assert_eq!(resp.header("x-switchyard-backend"), Some("good"));
            break;
        }
        assert!(Instant::now() < deadline, "never ejected");
    }
    // ... and once it answers again, a health check lets a probe through and traffic returns.
    let _flaky = sim_on(port, "flaky", &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = post(r.addr, "/v1/chat/completions", &chat("hi"), pinned);
        if resp.header("x-switchyard-backend") == Some("flaky") {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Both said in the log.
    let err = stop_router(r);
    assert!(err.contains("backend `flaky` ejected for"), "{err}");
    assert!(
        err.contains("backend `flaky` passes its health check again")
            || err.contains("backend `flaky` answered its probe"),
        "{err}"
    );
}

/// Two backends, `name` (run with `sim_args`) and `good`, each its own tier; callers pin the
/// first. Stalls count after 1 s; an ejection lasts 5 s.
fn stall_setup(name: &str, sim_args: &[&str], extra: &str) -> (Proc, Proc, Proc) {
    let watched = sim(name, sim_args);
    let good = sim("good", &[]);
    let config = config_for(&[(name, watched.url()), ("good", good.url())], extra)
        .replacen(
            "interval_ms = 100\n",
            "interval_ms = 0\nstall_after_ms = 1000\n",
            1,
        )
        .replacen("base_ejection_ms = 300\n", "base_ejection_ms = 5000\n", 1)
        .replacen("max_ejection_ms = 2000\n", "max_ejection_ms = 10000\n", 1);
    (router(&config), watched, good)
}

/// Callers that send `body` pinned to `tier`, wait `patience`, and leave; one after the
/// other (eject_after_failures = 2), so that each wait is a silence of its own.
fn impatient_callers(r: &Proc, tier: &str, body: &str, patience: Duration) {
    for _ in 0..2 {
        let mut c = Conn::open(r.addr);
        c.send(&post_raw(
            "/v1/chat/completions",
            body,
            &format!("x-switchyard-tier: {tier}\r\n"),
        ));
        std::thread::sleep(patience);
        drop(c);
        std::thread::sleep(Duration::from_millis(400));
    }
}

/// Who answers a short request pinned to `tier` now, and in how many attempts.
fn who_answers(r: &Proc, tier: &str) -> (Option<String>, Option<String>) {
    let body = r#"{"model":"auto","max_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        body,
        &format!("x-switchyard-tier: {tier}\r\n"),
    );
    assert_eq!(resp.status, 200);
    let h = |name| resp.header(name).map(str::to_string);
    (h("x-switchyard-backend"), h("x-switchyard-attempts"))
}

const STREAM: &str =
    r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

#[test]
fn a_hung_backend_is_ejected_when_callers_give_up_first() {
    // `stuck` takes requests but answers none within the callers' patience, far shorter than
    // its first-byte timeout (3 s): only callers leaving can tell.
    let (r, _stuck, _good) = stall_setup("stuck", &["--latency-ms", "20000"], "");
    impatient_callers(&r, "stuck", &chat("hi"), Duration::from_millis(2500));
    let answer = (Some("good".to_string()), Some("1".to_string()));
    assert_eq!(who_answers(&r, "stuck"), answer, "stuck is ejected");
}

#[test]
fn a_backend_that_hangs_mid_stream_is_ejected_when_callers_give_up() {
    // `stuck` sends a head and a few chunks, then nothing; its idle timeout (60 s) is far
    // longer than the callers' patience.
    let (r, _stuck, _good) = stall_setup("stuck", &["--stall-rate", "1.0"], "");
    impatient_callers(&r, "stuck", STREAM, Duration::from_millis(2500));
    let answer = (Some("good".to_string()), Some("1".to_string()));
    assert_eq!(who_answers(&r, "stuck"), answer, "stuck is ejected");
}

#[test]
fn callers_leaving_a_flowing_stream_or_not_reading_are_no_stall() {
    // A stream that flows (20 tokens a second, for 10 s) while its callers leave.
    let (r, _slow, _good) = stall_setup(
        "slow",
        &["--tokens-per-second", "20", "--completion-tokens", "200"],
        "",
    );
    impatient_callers(&r, "slow", STREAM, Duration::from_millis(2500));
    let answer = (Some("slow".to_string()), Some("1".to_string()));
    assert_eq!(who_answers(&r, "slow"), answer, "slow is not ejected");
    // Callers that stop reading a large stream: the router's writes to them time out after
    // 1.5 s, while it reads nothing more from the backend; the backend is not to blame.
    let (r, _flood, _good) = stall_setup(
        "flood",
        &["--completion-tokens", "100000"],
        "[listener]\nsend_timeout_ms = 1500\n",
    );
    impatient_callers(&r, "flood", STREAM, Duration::from_millis(2000));
    let answer = (Some("flood".to_string()), Some("1".to_string()));
    assert_eq!(who_answers(&r, "flood"), answer, "flood is not ejected");
}

#[test]
fn midstream_failure_ends_with_an_error_event() {
    let s = sim("s", &["--completion-tokens", "8"]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let body = r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut c = Conn::open(r.addr);
    c.send(&post_raw(
        "/v1/chat/completions",
        body,
        "x-sim-fault: reset-after-head\r\n",
    ));
    let resp = c.read_response().unwrap();
    assert_eq!(resp.status, 200);
    let text = resp.text();
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "upstream_stream_broken", "{text}");
    assert!(
        text.contains("\"s\""),
        "events before the failure were relayed: {text}"
    );
    // The stream ended cleanly (terminating chunk), so the connection still works.
    c.send(&post_raw("/v1/chat/completions", &chat("again"), ""));
    assert_eq!(c.read_response().unwrap().status, 200);
}

#[test]
fn bad_input_gets_clear_errors() {
    let s = sim("s", &[]);
    let config = config_for(&[("s", s.url())], "[routing]\nunknown_model = \"reject\"\n[listener]\nmax_body_bytes = 4096\nmax_header_bytes = 2048\n");
    let r = router(&config);
    let raw = |bytes: &[u8]| {
        let mut c = Conn::open(r.addr);
        c.send(bytes);
        let resp = c.read_response().expect("a response");
        (resp, c)
    };
    let (resp, mut c) = raw(b"GARBAGE\x01\x02 / HTTP/1.1\r\n\r\n");
    resp.error(400);
    assert!(c.is_closed(), "malformed HTTP closes the connection");
    // Service names label spend and metrics: short and printable only (and an empty one, a
    // caller's unset variable, is not taken for no name).
    for name in ["has spaces", &"x".repeat(129), ""] {
        let resp = post(
            r.addr,
            "/v1/chat/completions",
            &chat("hi"),
            &format!("x-switchyard-service: {name}\r\n"),
        );
        resp.error(400);
        assert!(resp.text().contains("1 to 128"), "{}", resp.text());
    }
    let body = chat("hi");
    let not_utf8 = [
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: {}\r\nx-switchyard-service: ", body.len()).as_bytes(),
        b"\xff\xfe\r\n\r\n",
        body.as_bytes(),
    ]
    .concat();
    let (resp, _) = raw(&not_utf8);
    resp.error(400);
    assert!(resp.text().contains("1 to 128"), "{}", resp.text());
    let (resp, _) = raw(format!(
        "GET /healthz HTTP/1.1\r\nhost: t\r\nx-big: {}\r\n\r\n",
        "a".repeat(4000)
    )
    .as_bytes());
    resp.error(431);
    let (resp, mut c) =
        raw(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 5000000\r\n\r\n");
    assert_eq!(resp.error(413)["code"], "body_too_large");
    assert!(c.is_closed());
    let (resp, _) = raw(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n");
    resp.error(400);
    let big_chunked = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n1388\r\n{}\r\n0\r\n\r\n", "a".repeat(5000));
    raw(big_chunked.as_bytes()).0.error(413);
    // A chunked body within the limit is decoded and routed.
    let body = chat("hello");
    let (a, b) = body.split_at(10);
    let chunked = format!("POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n", a.len(), b.len());
    assert_eq!(raw(chunked.as_bytes()).0.status, 200);
    let cases: [(&str, &str, u16, &str); 9] = [
        ("/v1/chat/completions", "{not json", 400, "invalid_json"),
        // The fields of a request object written as an array, in order: once a worker panic.
        (
            "/v1/chat/completions",
            r#"[null,true,{"include_usage":false},[{"role":"user","content":"x"}],null,null,null,null,null,null,null,null,null,null,null]"#,
            400,
            "invalid_request",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"auto"}"#,
            400,
            "invalid_request",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"auto","messages":"hi"}"#,
            400,
            "invalid_request",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"auto","stream":"yes","messages":[{"role":"user","content":"x"}]}"#,
            400,
            "invalid_request",
        ),
        (
            "/v1/completions",
            r#"{"model":"auto","prompt":{"x":1}}"#,
            400,
            "invalid_request",
        ),
        (
            "/v1/embeddings",
            r#"{"model":"s-model"}"#,
            400,
            "invalid_request",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-nope","messages":[{"role":"user","content":"x"}]}"#,
            404,
            "model_not_found",
        ),
        // Nothing to classify: `auto` on embeddings needs a named model or a rule.
        (
            "/v1/embeddings",
            r#"{"model":"auto","input":"x"}"#,
            404,
            "model_not_found",
        ),
    ];
    // All on one keep-alive connection: request errors do not close it.
    let mut c = Conn::open(r.addr);
    for (path, body, status, code) in cases {
        c.send(&post_raw(path, body, ""));
        let resp = c
            .read_response()
            .expect("connection stays open after a request error");
        assert_eq!(resp.error(status)["code"], code, "{path} {body}");
    }
    c.send(b"GET /v1/chat/completions HTTP/1.1\r\nhost: t\r\n\r\n");
    let resp = c.read_response().unwrap();
    resp.error(405);
    assert_eq!(resp.header("allow"), Some("POST"));
    // HEAD answers with the length GET would have.
    c.send(b"HEAD /healthz HTTP/1.1\r\nhost: t\r\n\r\n");
    let resp = c.read_head_response().unwrap();
    let get = get(r.addr, "/healthz");
    assert_eq!(
        resp.header("content-length"),
        Some(get.body.len().to_string().as_str())
    );
    // The absolute form of a target routes by its path.
    c.send(&post_raw(
        &format!("http://{}/v1/chat/completions", r.addr),
        &chat("x"),
        "",
    ));
    assert_eq!(c.read_response().unwrap().status, 200);
    c.send(b"GET /nope HTTP/1.1\r\nhost: t\r\n\r\n");
    c.read_response().unwrap().error(404);
    c.send(&post_raw(
        "/v1/chat/completions",
        &chat("x"),
        "x-switchyard-priority: urgent\r\n",
    ));
    c.read_response().unwrap().error(400);
    c.send(&post_raw(
        "/v1/chat/completions",
        &chat("x"),
        "x-switchyard-tier: huge\r\n",
    ));
    c.read_response().unwrap().error(400);
    c.send(&post_raw(
        "/v1/chat/completions",
        &chat("x"),
        "x-switchyard-category: poetry\r\n",
    ));
    c.read_response().unwrap().error(400);
}

#[test]
fn no_healthy_target_is_503_with_retry_after() {
    let port = free_port();
    let r = router(&config_for(
        &[("dead", format!("http://127.0.0.1:{port}"))],
        "",
    ));
    // Failures eject the only backend; then there is nothing to try.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let resp = post(r.addr, "/v1/chat/completions", &chat("hi"), "");
        if resp.status == 503 {
            assert_eq!(resp.error(503)["code"], "no_healthy_upstream");
            assert!(resp.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
            break;
        }
        assert_eq!(resp.error(502)["code"], "upstream_connect_failed");
        // The error names what failed.
        assert_eq!(
            (
                resp.header("x-switchyard-backend"),
                resp.header("x-switchyard-tier")
            ),
            (Some("dead"), Some("dead"))
        );
        assert!(Instant::now() < deadline, "never ejected");
    }
    assert_eq!(get(r.addr, "/readyz").status, 503);
}

#[test]
fn callers_cannot_invent_service_names_without_end() {
    let sim = sim("small", &[]);
    let r = router_on_workers(
        &config_for(
            &[("small", sim.url())],
            "[usage]\nlog_events = true\nmax_services = 2\n[budgets.services.billing]\ndaily_usd = 5.0\n",
        ),
        2,
    );
    let ask = |service: &str| {
        let header = format!("x-switchyard-service: {service}\r\n");
        post(r.addr, "/v1/chat/completions", &chat("hi"), &header)
    };
    assert_eq!(ask("etl").status, 200);
    assert_eq!(ask("search").status, 200);
    let refused = ask("request-7f3a");
    assert!(
        refused.error(400)["message"]
            .as_str()
            .unwrap()
            .contains("usage.max_services"),
        "{}",
        refused.text()
    );
    // Names accepted before, the default and names the config mentions still work, on any
    // worker (each request opens its own connection).
    for service in ["etl", "search", "etl", "search", "billing"] {
        assert_eq!(ask(service).status, 200, "{service}");
    }
    assert_eq!(
        post(r.addr, "/v1/chat/completions", &chat("hi"), "").status,
        200
    );
    let err = stop_router(r);
    let services: Vec<String> = usage_events(&err)
        .iter()
        .map(|e| e["service"].as_str().unwrap().to_string())
        .collect();
    assert!(
        services.contains(&"(over-max-services)".to_string()),
        "{err}"
    );
    assert!(!services.iter().any(|s| s.starts_with("request-")), "{err}");
}

#[test]
fn an_unreachable_backend_is_not_tried_again_for_another_of_its_models() {
    let dead_port = free_port();
    a_failed_backend_is_not_tried_again(&format!("http://127.0.0.1:{dead_port}"));
}

#[test]
fn a_backend_too_slow_to_answer_is_not_tried_again_for_another_of_its_models() {
    // Accepts connections (the kernel does, in its backlog) but never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    a_failed_backend_is_not_tried_again(&format!("http://{}", silent.local_addr().unwrap()));
}

/// With two attempts, a connect failure or a first-byte timeout on `bad` must go to `good`,
/// not to `bad`'s other model; picks are random, so many requests make a wrong second pick
/// all but certain.
fn a_failed_backend_is_not_tried_again(bad_url: &str) {
    let good = sim("good", &[]);
    let config = format!(
        r#"
[health]
interval_ms = 0
eject_after_failures = 1000
[routing]
max_attempts = 2
[[backends]]
name = "bad"
url = "{bad_url}"
first_byte_timeout_ms = 50
models = [{{ name = "m1" }}, {{ name = "m2" }}]
[[backends]]
name = "good"
url = "{}"
models = [{{ name = "g" }}]
[[tiers]]
name = "small"
targets = ["bad/m1", "bad/m2", "good/g"]
"#,
        good.url()
    );
    let r = router(&config);
    for i in 0..20 {
        let resp = post(r.addr, "/v1/chat/completions", &chat("hi"), "");
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert_eq!(resp.header("x-switchyard-backend"), Some("good"));
    }
}

#[test]
fn a_backend_error_relayed_costs_nothing_and_is_not_estimated() {
    let failing = sim("failing", &["--error-rate", "1", "--error-status", "503"]);
    let config = config_for(
        &[("failing", failing.url())],
        "[usage]\nlog_events = true\n[routing]\nmax_attempts = 1\n",
    )
    .replace("interval_ms = 100", "interval_ms = 0");
    let r = router(&config);
    let resp = post(r.addr, "/v1/chat/completions", &chat("hi"), "");
    assert_eq!(resp.error(503)["type"], "server_error");
    let err = stop_router(r);
    let events = usage_events(&err);
    assert_eq!(events.len(), 1, "{err}");
    assert_eq!(
        (
            &events[0]["status"],
            &events[0]["cost_micros"],
            &events[0]["tokens_estimated"]
        ),
        (&503.into(), &0.into(), &false.into()),
        "{err}"
    );
}

#[test]
fn a_backend_error_is_relayed_when_the_targets_left_are_full() {
    let failing = sim("failing", &["--error-rate", "1", "--error-status", "503"]);
    let slow = sim("slow", &["--latency-ms", "5000"]);
    let config = format!(
        r#"
[health]
interval_ms = 0
eject_after_failures = 1000
[[backends]]
name = "failing"
url = "{}"
models = [{{ name = "f" }}]
[[backends]]
name = "slow"
url = "{}"
max_concurrency = 1
models = [{{ name = "s" }}]
[[tiers]]
name = "small"
targets = ["failing/f"]
[[tiers]]
name = "large"
targets = ["slow/s"]
"#,
        failing.url(),
        slow.url()
    );
    let r = router(&config);
    let addr = r.addr;
    // Takes `slow`'s only slot for 5 s.
    let holder = std::thread::spawn(move || {
        post(
            addr,
            "/v1/chat/completions",
            &chat("hi"),
            "x-switchyard-tier: large\r\n",
        )
        .status
    });
    eventually("the holder is upstream", || upstream_calls(&slow) == 1);
    // `failing` answers 503; `slow` is the only target left and has no room: the caller gets
    // the backend's own answer, not a router error about it.
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        &chat("hi"),
        "x-switchyard-tier: small\r\n",
    );
    let e = resp.error(503);
    assert!(
        e["message"].as_str().unwrap().contains("simulated failure"),
        "{}",
        resp.text()
    );
    // With nothing failed, a full backend is told apart from an unhealthy one.
    let full = post(
        r.addr,
        "/v1/chat/completions",
        &chat("hi"),
        "x-switchyard-tier: large\r\n",
    );
    assert_eq!(full.error(503)["code"], "upstream_at_capacity");
    assert_eq!(full.header("retry-after"), Some("1"));
    assert_eq!(holder.join().unwrap(), 200);
}

/// A router (one worker, so one connection pool) in front of one backend the test plays
/// itself on the returned listener (health checks off, so the only connections are requests').
fn router_with_hand_rolled_backend(name: &str, extra: &str) -> (TcpListener, Proc) {
    router_with_hand_rolled_backend_settings(name, "", extra)
}

/// The same with `settings` (lines) added to the backend's own table.
fn router_with_hand_rolled_backend_settings(
    name: &str,
    settings: &str,
    extra: &str,
) -> (TcpListener, Proc) {
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", backend.local_addr().unwrap());
    let config = config_for(&[(name, url)], extra)
        .replace("interval_ms = 100", "interval_ms = 0")
        .replace(
            "first_byte_timeout_ms = 3000",
            &format!("first_byte_timeout_ms = 3000\n{settings}"),
        );
    (backend, router_on_workers(&config, 1))
}

/// The backend's side of the next request: accepted and read.
fn accept_request(backend: &TcpListener) -> std::net::TcpStream {
    let (mut upstream, _) = backend.accept().unwrap();
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 65536];
    assert!(upstream.read(&mut buf).unwrap() > 0);
    upstream
}

/// A JSON chat answer saying `content`, as a backend writes it.
fn chat_answer(content: &str) -> String {
    let body = format!(
        r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"stop"}}]}}"#
    );
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// A router with two tiers: `broken`, a hand-rolled backend, then `good`, a simulator; the
/// first is never ejected, so every request pinned to it goes there first.
fn router_with_broken_then_good(workers: usize) -> (TcpListener, Proc, Proc) {
    let good = sim("good", &[]);
    let broken = TcpListener::bind("127.0.0.1:0").unwrap();
    let broken_url = format!("http://{}", broken.local_addr().unwrap());
    let config = config_for(&[("broken", broken_url), ("good", good.url())], "")
        .replace("interval_ms = 100", "interval_ms = 0")
        .replace("eject_after_failures = 2", "eject_after_failures = 1000");
    (broken, router_on_workers(&config, workers), good)
}

#[test]
fn identical_streams_fail_over_together_when_the_first_event_breaks_off() {
    let (broken, r, _good) = router_with_broken_then_good(2);
    // Every connection gets a head and half an event, and is closed a moment later (while
    // the identical requests wait on the first).
    broken.set_nonblocking(true).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let backend = std::thread::spawn(move || {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let Ok((mut conn, _)) = broken.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            std::thread::spawn(move || {
                conn.set_nonblocking(false).unwrap();
                let _ = conn.read(&mut [0u8; 65536]);
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n10\r\ndata: {\"id\":\"x\",\r\n");
                std::thread::sleep(Duration::from_millis(300));
            });
        }
    });
    let addr = r.addr;
    let body = r#"{"model":"auto","stream":true,"temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
    let callers: Vec<_> = (0..3)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(if i == 0 { 0 } else { 50 }));
            std::thread::spawn(move || {
                post(
                    addr,
                    "/v1/chat/completions",
                    body,
                    "x-switchyard-tier: broken\r\n",
                )
            })
        })
        .collect();
    for caller in callers {
        let resp = caller.join().unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.header("x-switchyard-backend"),
            Some("good"),
            "{}",
            resp.text()
        );
        let text = resp.text();
        assert!(
            !text.contains("error") && !streamed_text(&resp.body).is_empty(),
            "{text}"
        );
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    backend.join().unwrap();
}

#[test]
fn a_kept_connection_the_backend_wrote_on_while_idle_is_not_reused() {
    let (backend, r) = router_with_hand_rolled_backend("chatty", "");
    let addr = r.addr;
    let ask = move |content: &'static str| {
        std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat(content), ""))
    };
    let first = ask("one");
    let mut kept = accept_request(&backend);
    kept.write_all(chat_answer("one").as_bytes()).unwrap();
    assert_eq!(
        first.join().unwrap().json()["choices"][0]["message"]["content"],
        "one"
    );
    // What some servers send on an idle keep-alive connection before closing it (HAProxy),
    // or a stray answer: read as the next request's answer, it would go to another caller.
    kept.write_all(
        b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let second = ask("two");
    backend.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let fresh = loop {
        match backend.accept() {
            Ok((conn, _)) => break Some(conn),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    let Some(mut fresh) = fresh else {
        let resp = second.join().unwrap();
        panic!(
            "no new connection; the caller got {} {}",
            resp.status,
            resp.text()
        );
    };
    fresh.set_nonblocking(false).unwrap();
    fresh
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert!(fresh.read(&mut [0u8; 65536]).unwrap() > 0);
    fresh.write_all(chat_answer("two").as_bytes()).unwrap();
    let resp = second.join().unwrap();
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["choices"][0]["message"]["content"], "two");
}

#[test]
fn a_backend_that_fails_after_its_head_before_any_answer_is_failed_over() {
    let (broken, r, _good) = router_with_broken_then_good(1);
    let addr = r.addr;
    let heads = [
        // A stream's head, then the connection closes before the first event.
        (
            r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
        ),
        // A head without a length, and the close that should end the body at once.
        (
            r#"{"model":"auto","messages":[{"role":"user","content":"hi"}]}"#,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n",
        ),
        // The same for a cacheable stream, with half an event (nobody follows it yet).
        (
            r#"{"model":"auto","stream":true,"temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: {\"\r\n",
        ),
        // A JSON head and a few bytes of a body it says is longer, for a cacheable request
        // (read whole before anything is sent; others are relayed as they come).
        (
            r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 300\r\n\r\n{\"id\":",
        ),
    ];
    for (body, sent) in heads {
        let client = std::thread::spawn(move || {
            post(
                addr,
                "/v1/chat/completions",
                body,
                "x-switchyard-tier: broken\r\n",
            )
        });
        let mut upstream = accept_request(&broken);
        upstream.write_all(sent.as_bytes()).unwrap();
        drop(upstream);
        let resp = client.join().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            (
                resp.header("x-switchyard-backend"),
                resp.header("x-switchyard-attempts")
            ),
            (Some("good"), Some("2"))
        );
        assert!(!resp.text().contains("error"), "{}", resp.text());
    }
    // The operator is told why (once a second per backend: the second failure came sooner).
    let err = stop_router(r);
    assert!(
        err.contains("attempt on backend `broken` failed (request ")
            && err.contains("closed the connection mid-response"),
        "{err}"
    );
}

#[test]
fn a_request_the_backend_acknowledged_is_not_resent_when_it_closes() {
    let (backend, r) = router_with_hand_rolled_backend("interim", "");
    let addr = r.addr;
    let ask =
        move || std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat("hi"), ""));
    let first = ask();
    let mut kept = accept_request(&backend);
    kept.write_all(chat_answer("one").as_bytes()).unwrap();
    assert_eq!(first.join().unwrap().status, 200);
    // On the kept connection: the request read, a 100 Continue, then the backend goes away.
    // It has the request, so sending it again would run it twice.
    let second = ask();
    kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(kept.read(&mut [0u8; 65536]).unwrap() > 0);
    kept.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
    drop(kept);
    let resp = second.join().unwrap();
    let message = resp.error(502)["message"].to_string();
    assert!(message.contains("after taking the request"), "{message}");
    backend.set_nonblocking(true).unwrap();
    assert!(backend.accept().is_err(), "the request was sent again");
}

/// The caller's answer to a chat request with `body` when the hand-rolled backend sends back
/// `answer` (a whole raw response, or part of one) and then closes.
fn answered_with(backend: &TcpListener, addr: SocketAddr, body: &str, answer: &[u8]) -> Response {
    let body = body.to_string();
    let client = std::thread::spawn(move || post(addr, "/v1/chat/completions", &body, ""));
    let mut upstream = accept_request(backend);
    upstream.write_all(answer).unwrap();
    drop(upstream);
    client.join().unwrap()
}

#[test]
fn a_backend_that_stops_reading_times_out_like_a_silent_one() {
    // Connections are queued (the kernel accepts them) but nothing reads them: a 16 MiB body
    // fills the socket buffers and the write to the backend can never finish.
    let (_backend, r) = router_with_hand_rolled_backend("deaf", "");
    let content = "x".repeat(16 << 20);
    let started = Instant::now();
    let resp = post(r.addr, "/v1/chat/completions", &chat(&content), "");
    let e = resp.error(504);
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("did not take the request"),
        "{}",
        resp.text()
    );
    // The backend's first-byte timeout (3 s, plus the time to take 16 MiB in), not forever.
    assert!(started.elapsed() < Duration::from_secs(18));
}

#[test]
fn headers_a_backend_names_in_connection_stay_between_it_and_the_router() {
    let (backend, r) = router_with_hand_rolled_backend("h", "");
    let body = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\nconnection: keep-alive, x-secret\r\nx-secret: 1\r\nx-kept: 2\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = answered_with(&backend, r.addr, &chat("hi"), answer.as_bytes());
    assert_eq!(resp.status, 200);
    assert_eq!(
        (resp.header("x-secret"), resp.header("x-kept")),
        (None, Some("2"))
    );
}

#[test]
fn a_backend_that_takes_a_request_and_goes_away_is_a_protocol_error() {
    let (backend, r) = router_with_hand_rolled_backend("crashy", "");
    let addr = r.addr;
    let client = std::thread::spawn(move || post(addr, "/v1/chat/completions", &chat("hi"), ""));
    let upstream = accept_request(&backend);
    // Well past the window in which a closed kept connection is taken for a stale one.
    std::thread::sleep(Duration::from_millis(1000));
    drop(upstream);
    let resp = client.join().unwrap();
    let e = resp.error(502);
    assert_eq!(e["code"], "upstream_protocol_error");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("after taking the request"),
        "{}",
        resp.text()
    );
}

/// One chunk of chunked framing.
fn chunk(data: &str) -> String {
    format!("{:x}\r\n{data}\r\n", data.len())
}

/// A stream's last events, each a chunk of its own, and the end of the chunked body.
fn write_last_events(upstream: &mut std::net::TcpStream, events: &[&str]) {
    let mut rest: String = events.iter().map(|e| chunk(&format!("{e}\n\n"))).collect();
    rest.push_str("0\r\n\r\n");
    upstream.write_all(rest.as_bytes()).unwrap();
}

#[test]
fn each_streamed_event_reaches_the_caller_before_the_backend_sends_the_next() {
    // The backend sends an event only once the caller has the one before: a router that held
    // events back (buffered) would stall this stream, whatever the machine's speed.
    let (backend, r) = router_with_hand_rolled_backend("h", "");
    let addr = r.addr;
    let (seen, events_seen) = std::sync::mpsc::channel::<usize>();
    let caller = std::thread::spawn(move || {
        let mut c = Conn::open(addr);
        let body =
            r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
        c.send(&post_raw("/v1/chat/completions", body, ""));
        let mut received = Vec::new();
        c.read_response_with(|data| {
            received.extend_from_slice(data);
            let _ = seen.send(received.windows(5).filter(|w| w == b"data:").count());
        })
        .expect("a response")
    });
    let mut upstream = accept_request(&backend);
    let head =
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
    upstream.write_all(head.as_bytes()).unwrap();
    for k in 1..=5 {
        let event = format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"t{k} \"}},\"finish_reason\":null}}]}}\n\n"
        );
        upstream.write_all(chunk(&event).as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let n = events_seen
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("event {k} never reached the caller on its own"));
            if n >= k {
                break;
            }
        }
    }
    let end = [
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}"#,
        "data: [DONE]",
    ];
    write_last_events(&mut upstream, &end);
    let resp = caller.join().unwrap();
    assert_eq!(resp.status, 200);
    let text = resp.text();
    assert_eq!(streamed_text(&resp.body), "t1 t2 t3 t4 t5 ", "{text}");
    assert!(
        text.ends_with("data: [DONE]\n\n") && !text.contains("\"usage\""),
        "{text}"
    );
}

/// A deterministic stream asked for twice, the second time while the backend is half way
/// through answering the first: `finish` is what the backend sends then. Returns the first
/// caller's answer and the follower's.
fn a_stream_and_its_follower(
    finish: impl FnOnce(&mut std::net::TcpStream),
) -> (Response, Response) {
    let (first, follower, mut upstream, _router) = a_stream_followed_half_way("");
    finish(&mut upstream);
    drop(upstream);
    (first.join().unwrap(), follower.join().unwrap())
}

/// The callers of `a_stream_and_its_follower` (the first, the follower) once the follower has
/// the first event, the backend's side of the stream and the router (config `extra`).
fn a_stream_followed_half_way(
    extra: &str,
) -> (
    std::thread::JoinHandle<Response>,
    std::thread::JoinHandle<Response>,
    std::net::TcpStream,
    Proc,
) {
    let (backend, r) = router_with_hand_rolled_backend("h", extra);
    let body = r#"{"model":"auto","stream":true,"temperature":0,"messages":[{"role":"user","content":"What is the weather in Paris?"}]}"#;
    let addr = r.addr;
    let first = std::thread::spawn(move || post(addr, "/v1/chat/completions", body, ""));
    let mut upstream = accept_request(&backend);
    let opening = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":"Let me check."},"finish_reason":null}]}"#;
    upstream
        .write_all(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{}",
                chunk(&format!("{opening}\n\n"))
            )
            .as_bytes(),
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The backend goes on once the follower has the first event (it follows the stream).
    let follower = caller_past_first_bytes(
        addr,
        "/v1/chat/completions",
        body.to_string(),
        "the second request follows the first",
    );
    (first, follower, upstream, r)
}

#[test]
fn a_followed_stream_is_ended_for_all_its_callers_at_the_drain_deadline() {
    // The backend sends one more event (read with a follower there), then goes silent; the
    // drain deadline (1 s) ends the stream for both callers.
    let (first, follower, mut upstream, r) =
        a_stream_followed_half_way("[listener]\ndrain_timeout_ms = 1000\n");
    let more = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" Sunny."},"finish_reason":null}]}"#;
    upstream
        .write_all(chunk(&format!("{more}\n\n")).as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    stop_router(r);
    for resp in [first.join().unwrap(), follower.join().unwrap()] {
        let text = resp.text();
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        let event: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap())
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(event["error"]["code"], "shutting_down", "{text}");
    }
    drop(upstream);
}

#[test]
fn a_followed_stream_reaches_its_follower_as_its_first_caller_got_it() {
    // Complete, but not cacheable (tool calls): the follower gets it all, and no error.
    let (first, follower) = a_stream_and_its_follower(|upstream| {
        let events = [
            r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"weather","arguments":"{}"}}]},"finish_reason":null}]}"#,
            r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}"#,
            r#"data: {"id":"c","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}"#,
            "data: [DONE]",
        ];
        write_last_events(upstream, &events);
    });
    assert_eq!(follower.header("x-switchyard-cache"), Some("hit"));
    assert!(
        first.text().ends_with("data: [DONE]\n\n"),
        "{}",
        first.text()
    );
    assert_eq!(follower.text(), first.text());
    // Cut off upstream half way through an event: the follower's last event is the error,
    // whole (the half event is dropped, as for the first caller).
    let (first, follower) = a_stream_and_its_follower(|upstream| {
        let half = r#"data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"#;
        upstream.write_all(chunk(half).as_bytes()).unwrap();
    });
    for resp in [&first, &follower] {
        let text = resp.text();
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        let event: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap())
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(event["error"]["code"], "upstream_stream_broken", "{text}");
        assert!(!text.contains("Hel"), "{text}");
    }
}

#[test]
fn an_answer_read_whole_that_breaks_off_is_a_502_and_still_priced() {
    // Deterministic, so read whole before it is sent (to be stored); the backend sends a
    // tenth of its body and closes.
    let (backend, r) = router_with_hand_rolled_backend("h", "[usage]\nlog_events = true\n");
    let body = r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"Extract the date: 2024-05-01"}]}"#;
    let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":\"x\",";
    answered_with(&backend, r.addr, body, answer).error(502);
    let err = stop_router(r);
    let events = usage_events(&err);
    assert_eq!(events.len(), 1, "{err}");
    let e = &events[0];
    assert_eq!(
        (e["status"].as_u64(), e["tokens_estimated"].as_bool()),
        (Some(502), Some(true)),
        "{e}"
    );
    // Nothing was answered, but the backend took the prompt: that is counted (estimated).
    assert!(
        e["prompt_tokens"].as_u64() > Some(0) && e["cost_micros"].as_u64() > Some(0),
        "{e}"
    );
}

#[test]
fn a_backend_can_be_left_unasked_for_stream_usage() {
    for (settings, asked) in [("", true), ("stream_usage = false", false)] {
        let extra = "[usage]\nlog_events = true\n";
        let (backend, r) = router_with_hand_rolled_backend_settings("strict", settings, extra);
        let addr = r.addr;
        let body = r#"{"model":"auto","stream":true,"temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
        let client = std::thread::spawn(move || post(addr, "/v1/chat/completions", body, ""));
        let (mut upstream, _) = backend.accept().unwrap();
        upstream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut request = Vec::new();
        while !request.ends_with(b"}") {
            let mut buf = [0u8; 65536];
            let n = upstream.read(&mut buf).unwrap();
            assert!(n > 0);
            request.extend_from_slice(&buf[..n]);
        }
        let request = String::from_utf8_lossy(&request).into_owned();
        assert_eq!(request.contains("include_usage"), asked, "{request}");
        let events = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\n\r\n{events}",
            events.len()
        );
        upstream.write_all(answer.as_bytes()).unwrap();
        assert_eq!(client.join().unwrap().status, 200);
        // A stream without the usage chunk could not serve a caller who asks for one: it
        // is not stored.
        let err = stop_router(r);
        let stored = if asked { "stored" } else { "miss" };
        assert_eq!(usage_events(&err)[0]["cache"], stored, "{err}");
    }
}

#[test]
fn an_untyped_answer_to_a_stream_request_has_its_usage_counted() {
    // Nothing says whether it is JSON or a stream: passed on as it came, its usage read.
    let sse = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}]}\n\n\
data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}\n\ndata: [DONE]\n\n";
    let json = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1}}"#;
    for answer in [sse, json] {
        let (backend, r) =
            router_with_hand_rolled_backend("untyped", "[usage]\nlog_events = true\n");
        let body = r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
        let raw = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        let resp = answered_with(&backend, r.addr, body, raw.as_bytes());
        assert_eq!(resp.status, 200);
        assert!(resp.text().contains("\"Hi\""), "{}", resp.text());
        let err = stop_router(r);
        let e = &usage_events(&err)[0];
        assert_eq!(
            (e["prompt_tokens"].as_u64(), e["completion_tokens"].as_u64()),
            (Some(3), Some(1)),
            "{e}"
        );
    }
}

#[test]
fn usage_at_the_end_of_a_large_answer_is_read() {
    let (backend, r) = router_with_hand_rolled_backend("big", "[usage]\nlog_events = true\n");
    let content = "a".repeat(6 << 20);
    let body = format!(
        r#"{{"id":"x","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}}}"#
    );
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let resp = answered_with(&backend, r.addr, &chat("hi"), answer.as_bytes());
    assert_eq!((resp.status, resp.body.len()), (200, body.len()));
    let err = stop_router(r);
    let events = usage_events(&err);
    let e = &events[0];
    assert_eq!(
        (
            e["prompt_tokens"].as_u64(),
            e["completion_tokens"].as_u64(),
            e["tokens_estimated"].as_bool()
        ),
        (Some(5), Some(7), Some(false)),
        "{e}"
    );
}

#[test]
fn a_chunked_answer_is_stored_and_served_with_its_length() {
    let (backend, r) = router_with_hand_rolled_backend("chunky", "");
    let body = r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"Extract the date: 2024-05-01"}]}"#;
    let answer = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"2024-05-01"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}"#;
    let (a, b) = answer.split_at(40);
    let chunked = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let first = answered_with(&backend, r.addr, body, chunked.as_bytes());
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-switchyard-cache"), Some("stored"));
    assert_eq!(
        first.header("content-length"),
        Some(answer.len().to_string().as_str())
    );
    assert_eq!(first.text(), answer);
    let second = post(r.addr, "/v1/chat/completions", body, "");
    assert_eq!(second.header("x-switchyard-cache"), Some("hit"));
    assert_eq!(second.text(), answer);
}

#[test]
fn a_chunked_answer_too_large_to_store_is_relayed_whole() {
    let (backend, r) = router_with_hand_rolled_backend("chunky", "");
    let body =
        r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"Repeat x"}]}"#;
    let addr = r.addr;
    let client = std::thread::spawn(move || post(addr, "/v1/chat/completions", body, ""));
    let mut upstream = accept_request(&backend);
    // 5 MiB of JSON in 64 KiB chunks: over the 4 MiB an answer may take in the cache.
    let content = "x".repeat(5 << 20);
    let answer = format!(
        r#"{{"choices":[{{"message":{{"content":"{content}"}},"finish_reason":"stop"}}]}}"#
    );
    let writer = std::thread::spawn(move || {
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
            .unwrap();
        for piece in answer.as_bytes().chunks(64 << 10) {
            upstream
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .unwrap();
            upstream.write_all(piece).unwrap();
            upstream.write_all(b"\r\n").unwrap();
        }
        upstream.write_all(b"0\r\n\r\n").unwrap();
        answer
    });
    let resp = client.join().unwrap();
    let answer = writer.join().unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-switchyard-cache"), Some("miss"));
    assert_eq!(resp.header("transfer-encoding"), Some("chunked"));
    assert!(
        resp.body == answer.as_bytes(),
        "the body arrives whole and in order"
    );
}

#[test]
fn the_simulator_resets_connections_when_told() {
    let s = sim("s", &[]);
    let mut c = Conn::open(s.addr);
    c.send(&post_raw(
        "/v1/chat/completions",
        &chat("hi"),
        "x-sim-fault: reset-before-head\r\n",
    ));
    let mut buf = [0u8; 64];
    let err = c
        .stream
        .read(&mut buf)
        .expect_err("a reset, not an orderly close");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[test]
fn pooled_connections_left_idle_under_a_busier_one_are_closed() {
    let (backend, r) = router_with_hand_rolled_backend("pool", "");
    // Two requests at once: the worker's pool ends up with two connections.
    let mut clients: Vec<Conn> = (0..2).map(|_| Conn::open(r.addr)).collect();
    for c in &mut clients {
        c.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
    }
    let mut upstreams: Vec<std::net::TcpStream> =
        (0..2).map(|_| accept_request(&backend)).collect();
    for u in &mut upstreams {
        u.write_all(ANSWER).unwrap();
    }
    for c in &mut clients {
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    // Answers one request on whichever pooled connection it arrives; returns that one's index.
    let serve_next = |upstreams: &mut [std::net::TcpStream]| -> usize {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (i, u) in upstreams.iter_mut().enumerate() {
                u.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
                let mut buf = [0u8; 65536];
                if matches!(u.read(&mut buf), Ok(n) if n > 0) {
                    u.write_all(ANSWER).unwrap();
                    return i;
                }
            }
            assert!(Instant::now() < deadline, "no request arrived");
        }
    };
    // One request every 2.5 s: the connection on top serves them, the other idles past the
    // pool's idle timeout (4 s) and is closed when the busy one goes back.
    let mut busy = None;
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(2500));
        let mut c = Conn::open(r.addr);
        c.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
        let used = serve_next(&mut upstreams);
        assert!(
            busy.is_none_or(|b| b == used),
            "the most recent connection is reused"
        );
        busy = Some(used);
        assert_eq!(c.read_response().unwrap().status, 200);
    }
    assert_closed_within(&mut upstreams[1 - busy.unwrap()], Duration::from_secs(2));
}

/// A complete, minimal JSON answer from a hand-rolled backend.
const ANSWER: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";

/// The router closes its end of `upstream` within `limit`.
fn assert_closed_within(upstream: &mut std::net::TcpStream, limit: Duration) {
    upstream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 16];
    let n = upstream.read(&mut buf).unwrap_or(usize::MAX);
    assert_eq!(n, 0, "the router did not close the connection");
}

#[test]
fn a_pooled_connection_without_traffic_is_closed_after_the_idle_timeout() {
    let (backend, r) = router_with_hand_rolled_backend("quiet", "");
    let mut c = Conn::open(r.addr);
    c.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
    let mut upstream = accept_request(&backend);
    upstream.write_all(ANSWER).unwrap();
    assert_eq!(c.read_response().unwrap().status, 200);
    // No more requests: the worker's sweep (every 4 s) closes it once it idled 4 s.
    let start = Instant::now();
    assert_closed_within(&mut upstream, Duration::from_secs(12));
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "not before it idled"
    );
}

#[test]
fn client_disconnect_closes_the_upstream_request() {
    // A hand-rolled backend that accepts, reads the request, and waits to see it cancelled.
    let (backend, r) = router_with_hand_rolled_backend("hold", "[usage]\nlog_events = true\n");
    let mut c = Conn::open(r.addr);
    c.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
    let mut upstream = accept_request(&backend);
    let mut buf = [0u8; 4096];
    drop(c);
    let start = Instant::now();
    let n = upstream.read(&mut buf).unwrap_or(usize::MAX);
    assert_eq!(
        n, 0,
        "the router closes its upstream connection when the client leaves"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    let _ = upstream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
    // The backend read the prompt: its estimated cost counts, flagged as an estimate.
    let err = stop_router(r);
    let events = usage_events(&err);
    assert_eq!(events.len(), 1, "{err}");
    let e = &events[0];
    assert_eq!(e["status"], 499);
    assert_eq!(e["tokens_estimated"], true);
    assert_eq!(e["completion_tokens"], 0);
    assert!(e["prompt_tokens"].as_u64().unwrap() > 0, "{e}");
    assert!(e["cost_micros"].as_u64().unwrap() > 0, "{e}");
}

#[test]
fn a_client_leaving_mid_answer_closes_the_upstream_request() {
    // Whether the backend goes on streaming (the next write to the caller fails) or has gone
    // quiet in a stream or a plain body (the caller is watched for leaving), its connection is
    // closed, long before the backend's idle timeout.
    let event = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";
    let chunk = [format!("{:x}\r\n", event.len()).as_bytes(), event, b"\r\n"].concat();
    for (stream, flowing) in [(true, true), (true, false), (false, false)] {
        let (backend, r) = router_with_hand_rolled_backend("leave", "[usage]\nlog_events = true\n");
        let mut c = Conn::open(r.addr);
        let body = format!(
            r#"{{"model":"auto","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
        );
        c.send(&post_raw("/v1/chat/completions", &body, ""));
        let mut upstream = accept_request(&backend);
        if stream {
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                .unwrap();
            upstream.write_all(&chunk).unwrap();
        } else {
            upstream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"id\":")
                .unwrap();
        }
        // The caller has the first bytes of the answer, then leaves.
        let mut seen = Vec::new();
        let first = if stream { &b"data:"[..] } else { b"{\"id\":" };
        while !seen.windows(first.len()).any(|w| w == first) {
            let mut buf = [0u8; 4096];
            let n = c.stream.read(&mut buf).unwrap();
            assert!(n > 0, "the answer ended early");
            seen.extend_from_slice(&buf[..n]);
        }
        drop(c);
        if flowing {
            let start = Instant::now();
            while upstream.write_all(&chunk).is_ok() {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "the router kept reading a stream nobody reads"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        } else {
            assert_closed_within(&mut upstream, Duration::from_secs(5));
        }
        let err = stop_router(r);
        let events = usage_events(&err);
        assert_eq!(events.len(), 1, "{err}");
        assert_eq!(events[0]["status"], 499, "{err}");
    }
}

#[test]
fn a_caller_leaving_before_the_backend_has_the_request_costs_nothing() {
    // A backend that accepts and reads nothing more than a first piece: a 24 MB prompt stalls
    // in the socket buffers on its way there, and the caller leaves meanwhile.
    let (backend, r) = router_with_hand_rolled_backend("deaf", "[usage]\nlog_events = true\n");
    let mut c = Conn::open(r.addr);
    c.send(&post_raw(
        "/v1/chat/completions",
        &chat(&"word ".repeat(4_800_000)),
        "",
    ));
    let _upstream = accept_request(&backend);
    std::thread::sleep(Duration::from_millis(300));
    drop(c);
    let err = stop_router(r);
    let events = usage_events(&err);
    assert_eq!(events.len(), 1, "{err}");
    let e = &events[0];
    assert_eq!(e["status"], 499);
    assert_eq!(e["cost_micros"], 0, "{e}");
    assert_eq!(e["prompt_tokens"], 0, "{e}");
    assert_eq!(e["tokens_estimated"], false, "{e}");
}

#[test]
fn a_client_that_stops_reading_is_dropped_after_the_send_timeout() {
    // A backend that streams without end to a client that never reads: once every buffer on
    // the way is full, the router's write to the client waits; after the send timeout it
    // gives up and closes the upstream connection, instead of holding it (and its backend
    // slot) for as long as the client stays connected.
    let (backend, r) =
        router_with_hand_rolled_backend("flood", "[listener]\nsend_timeout_ms = 300\n");
    let mut client = Conn::open(r.addr);
    let body = r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    client.send(&post_raw("/v1/chat/completions", body, ""));
    let mut upstream = accept_request(&backend);
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        .unwrap();
    let event = format!(
        "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
        "x".repeat(8000)
    );
    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
    upstream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let start = Instant::now();
    let stopped = loop {
        if let Err(e) = upstream.write_all(chunk.as_bytes()) {
            break e.kind();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the router kept reading"
        );
    };
    assert!(
        matches!(
            stopped,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "the router closed its upstream connection, it did not just stop reading: {stopped:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "{:?}",
        start.elapsed()
    );
    drop(client);
}

#[test]
fn thousands_of_concurrent_keepalive_requests() {
    // This process holds 1,000 sockets (and the usual soft limit is 1,024 descriptors).
    switchyard_dataplane::server::raise_open_files_limit();
    let s = sim("s", &["--workers", "2"]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let threads: Vec<_> = (0..40)
        .map(|t| {
            let addr = r.addr;
            std::thread::spawn(move || {
                // 25 connections per thread, all open at once: 1,000 concurrent connections.
                let mut conns: Vec<Conn> = (0..25).map(|_| Conn::open(addr)).collect();
                let mut ok = 0;
                for round in 0..3 {
                    for (i, c) in conns.iter_mut().enumerate() {
                        c.send(&post_raw(
                            "/v1/chat/completions",
                            &chat(&format!("t{t} c{i} r{round}")),
                            "",
                        ));
                    }
                    for c in conns.iter_mut() {
                        let resp = c.read_response().expect("response");
                        assert_eq!(resp.status, 200, "{}", resp.text());
                        assert_eq!(resp.json()["model"], "s-model");
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(total, 3000);
}

#[test]
fn head_requests_get_heads_without_bodies_even_for_errors() {
    let s = sim("s", &[]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let mut c = Conn::open(r.addr);
    c.send(b"HEAD /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\nHEAD /nope HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut raw = Vec::new();
    let mut tmp = [0u8; 4096];
    while !raw.ends_with(b"{\"status\":\"ok\"}") {
        let n = c.stream.read(&mut tmp).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&tmp[..n]);
    }
    // Each answer to a HEAD is a head alone; the next response starts right after it.
    let mut rest = &raw[..];
    for (request_was_head, status) in [(true, 405), (true, 404), (false, 200)] {
        let (head, n) = switchyard_dataplane::codec::parse_response(rest, request_was_head)
            .unwrap()
            .unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(rest)));
        assert_eq!(head.status, status, "{}", String::from_utf8_lossy(&raw));
        rest = &rest[n..];
    }
    assert_eq!(rest, b"{\"status\":\"ok\"}");
}

#[test]
fn an_interim_response_in_the_same_read_as_the_answer_is_skipped() {
    let (backend, r) = router_with_hand_rolled_backend("early", "");
    let (answered, client_has_it) = std::sync::mpsc::channel::<()>();
    let serve = std::thread::spawn(move || {
        let mut upstream = accept_request(&backend);
        let body = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let answer = format!(
            "HTTP/1.1 103 Early Hints\r\nlink: </x>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        upstream.write_all(answer.as_bytes()).unwrap();
        // Kept open until the caller has the answer: a router that waited for more bytes
        // would answer 504 after the first-byte timeout (3 s).
        let _ = client_has_it.recv_timeout(Duration::from_secs(20));
    });
    let resp = post(r.addr, "/v1/chat/completions", &chat("hi"), "");
    let _ = answered.send(());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.json()["choices"][0]["message"]["content"], "hi");
    serve.join().unwrap();
}

#[test]
fn an_answer_cut_before_anything_was_sent_is_an_error_answer() {
    // A cacheable answer is read whole before it is sent; if the backend breaks off inside
    // it, the client has received nothing and gets an error answer, not a silent close.
    let (backend, r) = router_with_hand_rolled_backend("cut", "");
    let serve = std::thread::spawn(move || {
        let mut upstream = accept_request(&backend);
        upstream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"choices\":[")
            .unwrap();
    });
    let body = r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"hi"}]}"#;
    let resp = post(r.addr, "/v1/chat/completions", body, "");
    serve.join().unwrap();
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(
        resp.json()["error"]["code"],
        "upstream_stream_broken",
        "{}",
        resp.text()
    );
    assert_eq!(resp.header("x-switchyard-backend"), Some("cut"));
}

#[test]
fn an_oversized_body_gets_its_413_while_the_client_is_still_sending() {
    let s = sim("s", &[]);
    let r = router(&config_for(&[("s", s.url())], ""));
    for _ in 0..5 {
        let mut c = Conn::open(r.addr);
        c.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 104857600\r\n\r\n");
        let mut writer = c.stream.try_clone().unwrap();
        let pusher = std::thread::spawn(move || {
            let piece = vec![b' '; 65536];
            for _ in 0..64 {
                if writer.write_all(&piece).is_err() {
                    break;
                }
            }
        });
        // Everything is sent before the answer is read: by then the router has closed, and
        // the answer must still be there to read (no reset in its place).
        pusher.join().unwrap();
        let resp = c.read_response().expect("a response, not a reset");
        assert_eq!(resp.status, 413, "{}", resp.text());
        assert_eq!(
            resp.json()["error"]["code"],
            "body_too_large",
            "{}",
            resp.text()
        );
    }
}

#[test]
fn a_pooled_connection_that_dies_while_working_is_a_visible_failed_attempt() {
    // The backend answers once on a keep-alive connection, then takes the next request on it
    // and dies half a second later. That request may have been worked on: sending it again is
    // a failover, counted and reported, not a quiet resend.
    let (backend, r) = router_with_hand_rolled_backend("dies", "");
    let serve = std::thread::spawn(move || {
        let body = r#"{"choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let mut upstream = accept_request(&backend);
        upstream.write_all(answer.as_bytes()).unwrap();
        let mut buf = [0u8; 65536];
        assert!(upstream.read(&mut buf).unwrap() > 0, "the second request");
        // Well past the window in which a closed kept connection is taken for a stale one.
        std::thread::sleep(Duration::from_millis(1000));
        drop(upstream);
        // A new connection within a while is the request sent again; it gets the answer.
        backend.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_millis(5000);
        while Instant::now() < until {
            if let Ok((again, _)) = backend.accept() {
                let mut again = again;
                again.set_nonblocking(false).unwrap();
                again
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                assert!(again.read(&mut buf).unwrap() > 0);
                again.write_all(answer.as_bytes()).unwrap();
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    assert_eq!(
        post(r.addr, "/v1/chat/completions", &chat("one"), "").status,
        200
    );
    let second = post(r.addr, "/v1/chat/completions", &chat("two"), "");
    if serve.join().unwrap() {
        assert_eq!(second.status, 200, "{}", second.text());
        assert_eq!(
            second.header("x-switchyard-attempts"),
            Some("2"),
            "a resend is an attempt of its own"
        );
    } else {
        assert!(second.status >= 500, "{}", second.text());
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = sim("s", &[]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let mut c = Conn::open(r.addr);
    let mut all = Vec::new();
    for i in 0..5 {
        all.extend(post_raw(
            "/v1/chat/completions",
            &chat(&format!("request {i}")),
            &format!("x-switchyard-service: p{i}\r\n"),
        ));
    }
    all.extend_from_slice(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n");
    c.send(&all);
    let mut ids = Vec::new();
    for _ in 0..5 {
        let resp = c.read_response().unwrap();
        assert_eq!(resp.status, 200);
        ids.push(u64::from_str_radix(resp.header("x-switchyard-request-id").unwrap(), 16).unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(c.read_response().unwrap().text(), "{\"status\":\"ok\"}");
}

/// A simulator streaming `tokens` at `per_second`, a router in front, and a client connection
/// with that stream requested.
fn stream_in_flight(per_second: &str, tokens: &str) -> (Proc, Proc, Conn) {
    let s = sim(
        "s",
        &[
            "--tokens-per-second",
            per_second,
            "--completion-tokens",
            tokens,
        ],
    );
    let r = router(&config_for(&[("s", s.url())], ""));
    let mut c = Conn::open(r.addr);
    let body = r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    c.send(&post_raw("/v1/chat/completions", body, ""));
    (s, r, c)
}

#[test]
fn sigterm_drains_streams_in_flight_then_exits_zero() {
    // A four-second stream.
    let (_s, mut r, mut c) = stream_in_flight("20", "80");
    let pid = r.child.id().to_string();
    // Kept connections, open before the signal: one idle between requests, one with a
    // request half sent.
    let mut idle = Conn::open(r.addr);
    idle.send(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(idle.read_response().unwrap().status, 200);
    // Answered once (so accepted: a connection still in the listen queue is reset when the
    // listener closes), then a request begun, and time for the router to read it.
    let mut busy = Conn::open(r.addr);
    busy.send(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(busy.read_response().unwrap().status, 200);
    let request = post_raw("/v1/chat/completions", &chat("hi"), "");
    let (head_start, rest) = request.split_at(20);
    busy.send(head_start);
    std::thread::sleep(Duration::from_millis(1000));
    let mut signalled: Option<Instant> = None;
    let mut checked = false;
    let resp = c
        .read_response_with(|_| {
            let Some(at) = signalled else {
                signalled = Some(Instant::now());
                assert!(std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .unwrap()
                    .success());
                return;
            };
            if !checked && at.elapsed() > Duration::from_millis(150) {
                checked = true;
                // The drain closed the idle connection (its caller goes elsewhere) and not
                // the other, whose request, completed after the drain began, is refused as
                // not started (the drain would not wait for it), closing the connection.
                idle.stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                assert!(idle.is_closed(), "an idle connection outlived the drain");
                busy.send(rest);
                let refused = busy.read_response().unwrap();
                assert_eq!(refused.error(503)["code"], "shutting_down");
                assert_eq!(refused.header("connection"), Some("close"));
            }
        })
        .unwrap();
    assert!(checked, "the stream outlived the check");
    assert!(
        resp.text().ends_with("data: [DONE]\n\n"),
        "the stream in flight finished: {}",
        resp.text()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "router did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    assert!(
        std::net::TcpStream::connect(r.addr).is_err(),
        "no longer accepting"
    );
}

#[test]
fn a_drain_answers_requests_still_arriving_instead_of_exiting_with_them() {
    let s = sim("s", &[]);
    let mut r = router(&config_for(
        &[("s", s.url())],
        "[listener]\ndrain_timeout_ms = 1500\n",
    ));
    let pid = r.child.id().to_string();
    // Two requests half sent, nothing else in flight; each connection answered once first,
    // so that the router has accepted it (the listen queue is reset when the listener closes).
    let half_sent = || {
        let mut c = Conn::open(r.addr);
        c.send(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n");
        assert_eq!(c.read_response().unwrap().status, 200);
        let request = post_raw("/v1/chat/completions", &chat("hi"), "");
        c.send(&request[..20]);
        (c, request)
    };
    let (mut completed, request) = half_sent();
    let (mut abandoned, _) = half_sent();
    std::thread::sleep(Duration::from_millis(300));
    let signalled = Instant::now();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        r.child.try_wait().unwrap().is_none(),
        "exited with requests half read"
    );
    // One that arrives whole during the drain is refused as not started...
    completed.send(&request[20..]);
    let refused = completed.read_response().unwrap();
    assert_eq!(refused.error(503)["code"], "shutting_down");
    // ... and one still arriving at the drain deadline too.
    abandoned
        .stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let cut = abandoned.read_response().unwrap();
    assert_eq!(cut.error(503)["code"], "shutting_down");
    assert!(signalled.elapsed() >= Duration::from_millis(1400));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "router did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn every_request_is_one_priced_usage_event() {
    let s = sim("s", &["--completion-tokens", "5"]);
    let r = router(&config_for(
        &[("s", s.url())],
        "[usage]\nlog_events = true\n",
    ));
    let plain = post(
        r.addr,
        "/v1/chat/completions",
        &chat("hello"),
        "x-switchyard-service: billing\r\n",
    );
    let plain_usage = plain.json()["usage"].clone();
    let streamed =
        r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hello"}]}"#;
    assert_eq!(
        post(
            r.addr,
            "/v1/chat/completions",
            streamed,
            "x-switchyard-service: billing\r\n"
        )
        .status,
        200
    );
    post(
        r.addr,
        "/v1/chat/completions",
        "{bad",
        "x-switchyard-service: other\r\n",
    )
    .error(400);
    let err = stop_router(r);
    let events: Vec<serde_json::Value> = usage_events(&err);
    assert_eq!(events.len(), 3, "{err}");
    // Workers send events when each request ends, so their order across workers is not fixed.
    let find = |service: &str, streamed: bool| {
        events
            .iter()
            .find(|e| e["service"] == service && e["streamed"] == streamed)
            .unwrap_or_else(|| panic!("no event for {service} streamed={streamed}: {err}"))
    };
    let (a, b, c) = (
        find("billing", false),
        find("billing", true),
        find("other", false),
    );
    // Prices in config_for: 1 USD/1M input, 2 USD/1M output => micro-dollars = prompt + 2 * completion.
    assert_eq!(a["prompt_tokens"], plain_usage["prompt_tokens"]);
    assert_eq!(a["completion_tokens"], 5);
    assert_eq!(
        a["cost_micros"].as_u64().unwrap(),
        a["prompt_tokens"].as_u64().unwrap() + 10
    );
    assert_eq!(
        (
            a["service"].as_str(),
            a["status"].as_u64(),
            a["streamed"].as_bool()
        ),
        (Some("billing"), Some(200), Some(false))
    );
    assert_eq!(
        (
            a["tier"].as_str(),
            a["backend"].as_str(),
            a["model"].as_str()
        ),
        (Some("s"), Some("s"), Some("s-model"))
    );
    assert_eq!(a["tokens_estimated"], false);
    assert!(
        a["first_byte_us"].as_u64().unwrap() > 0
            && a["total_us"].as_u64().unwrap() >= a["first_byte_us"].as_u64().unwrap()
    );
    // The stream's usage came from the chunk the router asked for, not an estimate.
    assert_eq!(
        (
            b["streamed"].as_bool(),
            b["tokens_estimated"].as_bool(),
            b["completion_tokens"].as_u64()
        ),
        (Some(true), Some(false), Some(5))
    );
    assert!(b["cost_micros"].as_u64().unwrap() > 10);
    assert_eq!(
        (
            c["status"].as_u64(),
            c["cost_micros"].as_u64(),
            c["service"].as_str()
        ),
        (Some(400), Some(0), Some("other"))
    );
    assert!(err.contains("billing: 2 requests (0 failed)"), "{err}");
}

#[test]
fn requests_still_running_at_the_drain_deadline_are_ended_with_an_error_and_counted() {
    let s = sim(
        "s",
        &["--tokens-per-second", "2", "--completion-tokens", "40"],
    );
    let config = config_for(
        &[("s", s.url())],
        "[listener]\ndrain_timeout_ms = 1000\n[usage]\nlog_events = true\n",
    )
    .replace(
        "first_byte_timeout_ms = 3000",
        "first_byte_timeout_ms = 30000",
    );
    let r = router(&config);
    // A 20 s stream, past its first event, and a request whose answer is 20 s away.
    let stream = caller_past_first_bytes(
        r.addr,
        "/v1/chat/completions",
        STREAM.to_string(),
        "the stream started",
    );
    let addr = r.addr;
    let (go_on, next_please) = std::sync::mpsc::channel::<()>();
    let (sent, next_sent) = std::sync::mpsc::channel::<()>();
    let waiting = std::thread::spawn(move || {
        let mut c = Conn::open(addr);
        let slow = "x-sim-fault: slow-first-byte=20000\r\n";
        c.send(&post_raw("/v1/chat/completions", &chat("hi"), slow));
        // The next request sent behind it while it waits (its socket then has bytes to read).
        next_please.recv().unwrap();
        c.send(&post_raw("/v1/chat/completions", &chat("next"), ""));
        sent.send(()).unwrap();
        c.read_response().expect("an answer to the first request")
    });
    eventually("both requests reached the backend", || {
        upstream_calls(&s) == 2
    });
    go_on.send(()).unwrap();
    next_sent.recv().unwrap();
    let started = Instant::now();
    let err = stop_router(r);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "ended at the deadline, not after the 20 s answers: {:?}",
        started.elapsed()
    );
    // The stream ends with an error event and a clean end of its body.
    let streamed = stream.join().unwrap();
    let text = streamed.text();
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap())
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(event["error"]["code"], "shutting_down", "{text}");
    // The request still waiting for its answer gets a 503 that says why.
    let waited = waiting.join().unwrap();
    assert_eq!(waited.error(503)["code"], "shutting_down");
    // Both are counted: priced (the backend had them) and marked incomplete.
    let events = usage_events(&err);
    assert_eq!(events.len(), 2, "{err}");
    for e in &events {
        assert_eq!(e["incomplete"], true, "{e}");
        assert!(e["cost_micros"].as_u64().unwrap() > 0, "{e}");
    }
    let statuses: Vec<_> = events
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert!(statuses.contains(&200) && statuses.contains(&503), "{err}");
    assert!(err.contains("ending them"), "{err}");
}

#[test]
fn a_second_signal_exits_at_once() {
    let (_s, mut r, mut c) = stream_in_flight("2", "120");
    // Wait for the stream to start, so a request is in flight for the whole test.
    let mut first = [0u8; 1];
    c.stream.read_exact(&mut first).unwrap();
    let pid = r.child.id().to_string();
    for signal in ["-TERM", "-TERM"] {
        assert!(std::process::Command::new("kill")
            .args([signal, &pid])
            .status()
            .unwrap()
            .success());
        // Apart, or the two could reach the router as one (signals coalesce).
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the second signal must not wait for the 60 s stream"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // The code of the signal that ended it (128 + SIGTERM).
    assert_eq!(status.code(), Some(143));
}

#[test]
fn a_body_held_back_for_100_continue_is_asked_for_only_when_needed() {
    let s = sim("s", &[]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let body = chat("hi");
    let head = |path: &str, len: usize| {
        format!("POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\nexpect: 100-continue\r\ncontent-length: {len}\r\n\r\n")
    };
    let mut c = Conn::open(r.addr);
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c.send(head("/v1/chat/completions", body.len()).as_bytes());
    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
    let mut got = vec![0u8; interim.len()];
    c.stream.read_exact(&mut got).unwrap();
    assert_eq!(got, interim);
    c.send(body.as_bytes());
    assert_eq!(c.read_response().unwrap().status, 200);
    // Refused on its head alone: the answer comes without asking for the body, and the
    // connection closes (the body may or may not follow).
    c.send(head("/v1/nope", 10).as_bytes());
    let refused = c.read_response().unwrap();
    assert_eq!(refused.error(404)["code"], "unknown_url");
    assert_eq!(refused.header("connection"), Some("close"));
    assert!(c.is_closed());
}

#[test]
fn http10_clients_get_close_delimited_streams() {
    let s = sim("s", &[]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let body = r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut c = Conn::open(r.addr);
    c.send(
        format!(
            "POST /v1/chat/completions HTTP/1.0\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    let resp = c.read_response().unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(
        resp.header("transfer-encoding"),
        None,
        "HTTP/1.0 has no chunked coding"
    );
    assert!(resp.text().ends_with("data: [DONE]\n\n"), "{}", resp.text());
}

#[test]
fn http10_keep_alive_is_announced_and_kept() {
    let s = sim("s", &[]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let body = chat("hi");
    let mut c = Conn::open(r.addr);
    let post = format!(
        "POST /v1/chat/completions HTTP/1.0\r\nconnection: keep-alive\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    for request in [
        post.as_bytes(),
        b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
    ] {
        c.send(request);
        let resp = c.read_response().unwrap();
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.header("connection"), Some("keep-alive"));
    }
    c.send(b"GET /healthz HTTP/1.0\r\n\r\n");
    let resp = c.read_response().unwrap();
    assert_eq!(
        resp.header("connection"),
        Some("close"),
        "1.0 without keep-alive"
    );
    assert!(c.is_closed());
}

#[test]
fn a_head_or_body_sent_too_slowly_is_answered_408() {
    let s = sim("s", &[]);
    let r = router(&config_for(
        &[("s", s.url())],
        "[listener]\nheader_timeout_ms = 300\nbody_timeout_ms = 300\nkeepalive_timeout_ms = 300\n",
    ));
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n";
    for (sent, what) in [
        (head.to_string(), "request head"),
        (format!("{head}\r\n{{\"model\""), "request body"),
    ] {
        let mut c = Conn::open(r.addr);
        c.send(sent.as_bytes());
        let resp = c.read_response().expect("an answer");
        let e = resp.error(408);
        assert!(
            e["message"].as_str().unwrap().contains(what),
            "{}",
            resp.text()
        );
        assert!(c.is_closed());
    }
    // Nothing of a request, or only empty lines (ignored between requests): the keep-alive
    // timeout closes quietly.
    for sent in ["", "\r\n"] {
        let mut c = Conn::open(r.addr);
        c.send(sent.as_bytes());
        assert!(c.is_closed(), "{sent:?}");
    }
    // Empty lines trickled in do not keep a connection open past the keep-alive timeout.
    let mut c = Conn::open(r.addr);
    let mut writer = c.stream.try_clone().unwrap();
    let opened = Instant::now();
    let trickle = std::thread::spawn(move || {
        for _ in 0..100 {
            if writer.write_all(b"\r\n").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    assert!(c.is_closed());
    let open_for = opened.elapsed();
    assert!(
        open_for < Duration::from_secs(5),
        "open for {open_for:?} of a 10 s trickle"
    );
    trickle.join().unwrap();
}

#[test]
fn garbage_on_the_wire_never_takes_a_worker_down() {
    let s = sim("s", &[]);
    let r = router(&config_for(
        &[("s", s.url())],
        "[listener]\nheader_timeout_ms = 300\nbody_timeout_ms = 300\n",
    ));
    let valid = post_raw("/v1/chat/completions", &chat("hello"), "");
    let mut rng = fastrand::Rng::with_seed(0xdead_beef);
    let inserted = b"\r\n:{\"0 \x00\xff";
    for round in 0..300 {
        let mut bytes = valid.clone();
        for _ in 0..1 + round % 5 {
            let at = rng.usize(..bytes.len());
            match rng.usize(..3) {
                0 => bytes[at] = rng.u8(..),
                1 => bytes.truncate(at.max(1)),
                _ => bytes.insert(at, inserted[rng.usize(..inserted.len())]),
            }
        }
        let mut c = std::net::TcpStream::connect(r.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(&bytes);
        let _ = c.shutdown(std::net::Shutdown::Write);
        // Whatever came back must be HTTP (or nothing, for a cut request).
        let mut reply = Vec::new();
        let _ = c.read_to_end(&mut reply);
        assert!(
            reply.is_empty() || reply.starts_with(b"HTTP/1.1 "),
            "round {round}: {}",
            String::from_utf8_lossy(&reply)
        );
    }
    // Both workers still answer (a request id's top 10 bits are its worker's index; new
    // connections spread over the workers at random).
    let mut workers_seen = std::collections::HashSet::new();
    eventually("both workers answer", || {
        let resp = post(r.addr, "/v1/chat/completions", &chat("still alive?"), "");
        assert_eq!(resp.status, 200);
        let id = u64::from_str_radix(resp.header("x-switchyard-request-id").unwrap(), 16);
        workers_seen.insert(id.unwrap() >> 54);
        workers_seen.len() == 2
    });
}

#[test]
fn a_slow_client_does_not_make_a_backend_look_idle() {
    // The backend streams more than the socket buffers hold while the client pauses for longer
    // than the backend's idle timeout: the router waits on the client meanwhile (the backend
    // cannot send more then), which must not count as the backend going silent.
    let (backend, r) = router_with_hand_rolled_backend_settings("b", "idle_timeout_ms = 1500", "");
    let mut c = Conn::open(r.addr);
    let body = r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    c.send(&post_raw("/v1/chat/completions", body, ""));
    let mut upstream = accept_request(&backend);
    let streaming = std::thread::spawn(move || {
        let event = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(8000)
        );
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        let done = "data: [DONE]\n\n";
        let mut all = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..4000 {
            all.extend_from_slice(chunk.as_bytes());
        }
        all.extend_from_slice(format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len()).as_bytes());
        // 32 MB: far more than the buffers between here and the paused client.
        upstream.write_all(&all).is_ok()
    });
    let mut paused = false;
    let resp = c
        .read_response_with(|_| {
            if !paused {
                paused = true;
                std::thread::sleep(Duration::from_millis(5000));
            }
        })
        .unwrap();
    assert!(streaming.join().unwrap(), "the router stopped reading");
    let text = resp.text();
    assert!(!text.contains("\"error\""), "{}", &text[text.len() - 300..]);
    assert!(text.ends_with("data: [DONE]\n\n"));
}

#[test]
fn a_stalled_stream_times_out_into_an_error_event() {
    let s = sim("s", &["--completion-tokens", "8"]);
    let config = config_for(&[("s", s.url())], "").replace(
        "first_byte_timeout_ms = 3000",
        "first_byte_timeout_ms = 3000\nidle_timeout_ms = 300",
    );
    let r = router(&config);
    let body = r#"{"model":"auto","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let started = Instant::now();
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        body,
        "x-sim-fault: stall\r\n",
    );
    assert_eq!(resp.status, 200);
    let text = resp.text();
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    let event: serde_json::Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(event["error"]["code"], "upstream_timeout", "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the idle timeout, not the sim, ended it"
    );
}
