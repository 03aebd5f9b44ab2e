//! The response cache end to end: what is stored, what is served, and what never is.

mod common;

use common::*;
use std::time::{Duration, Instant};

const DETERMINISTIC: &str = r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"Extract the invoice number: INV-2291"}]}"#;
/// The same request with other key order, whitespace, requested alias and `user`.
const SAME_AGAIN: &str = r#"{ "messages": [ {"content": "Extract the invoice number: INV-2291", "role": "user"} ],
    "user": "someone-else", "temperature": 0, "model": "auto" }"#;

fn cached_router(extra: &str) -> (Proc, Proc) {
    let s = sim("s", &[]);
    let r = router(&config_for(
        &[("s", s.url())],
        &format!("[usage]\nlog_events = true\n{extra}"),
    ));
    (s, r)
}

#[test]
fn a_stored_answer_is_served_without_the_upstream() {
    let (s, r) = cached_router("");
    let first = post(
        r.addr,
        "/v1/chat/completions",
        DETERMINISTIC,
        "x-switchyard-service: etl\r\n",
    );
    assert_eq!(
        (first.status, first.header("x-switchyard-cache")),
        (200, Some("stored")),
        "{}",
        first.text()
    );
    assert_eq!(first.header("age"), None);
    drop(s); // The backend is gone: only the cache can answer now.
    let hit = post(
        r.addr,
        "/v1/chat/completions",
        SAME_AGAIN,
        "x-switchyard-service: etl\r\n",
    );
    assert_eq!(
        (hit.status, hit.header("x-switchyard-cache")),
        (200, Some("hit")),
        "{}",
        hit.text()
    );
    assert_eq!(hit.body, first.body, "byte for byte");
    assert!(hit.header("age").unwrap().parse::<u64>().is_ok());
    assert_eq!(hit.header("x-switchyard-attempts"), Some("0"));
    assert_eq!(hit.header("x-switchyard-model"), Some("s-model"));
    // Another tenant never sees it, and a changed parameter is another request.
    let other = post(
        r.addr,
        "/v1/chat/completions",
        DETERMINISTIC,
        "x-switchyard-service: billing\r\n",
    );
    assert_ne!(other.header("x-switchyard-cache"), Some("hit"));
    let changed = DETERMINISTIC.replace("\"temperature\":0", "\"temperature\":0,\"seed\":3");
    assert_ne!(
        post(
            r.addr,
            "/v1/chat/completions",
            &changed,
            "x-switchyard-service: etl\r\n"
        )
        .header("x-switchyard-cache"),
        Some("hit")
    );
    // The hit cost nothing and records what it saved.
    let err = stop_router(r);
    let events: Vec<serde_json::Value> = usage_events(&err);
    // Found by kind: events from different workers may arrive in either order.
    let find = |cache: &str| {
        let mut etl = events
            .iter()
            .filter(|e| e["service"] == "etl" && e["cache"] == cache);
        let event = etl
            .next()
            .unwrap_or_else(|| panic!("no {cache} event: {err}"));
        assert!(etl.next().is_none(), "one etl {cache} event: {err}");
        event
    };
    let (stored, hit) = (find("stored"), find("hit"));
    assert!(stored["cost_micros"].as_u64().unwrap() > 0);
    assert_eq!(hit["cost_micros"], 0);
    assert_eq!(hit["saved_micros"], stored["cost_micros"]);
    assert!(err.contains("1 cache hits saved $0.0"), "{err}");
    assert!(
        err.contains("cache etl/extraction: 1 hits, 1 misses, 1 stored"),
        "{err}"
    );
    assert!(err.contains("response cache: 1 entries"), "{err}");
}

#[test]
fn stored_answers_are_served_while_their_backend_is_full() {
    // One request at a time: a slow one in flight leaves no slot for anything else. Callers
    // marked interactive want nothing from the cache.
    let s = sim("s", &[]);
    let fresh = "[[rules]]\nname = \"fresh\"\ntier = \"s\"\ncache_ttl_secs = 0\nmatch = { priority = [\"interactive\"] }\n";
    let r = router(&config_for(&[("s", s.url())], fresh).replace(
        "first_byte_timeout_ms = 3000",
        "first_byte_timeout_ms = 8000\nmax_concurrency = 1",
    ));
    let first = post(r.addr, "/v1/chat/completions", DETERMINISTIC, "");
    assert_eq!(first.header("x-switchyard-cache"), Some("stored"));
    let addr = r.addr;
    let slow = std::thread::spawn(move || {
        post(
            addr,
            "/v1/chat/completions",
            &chat("take your time"),
            "x-sim-fault: slow-first-byte=5000\r\n",
        )
        .status
    });
    eventually("the slow request holds the slot", || {
        upstream_calls(&s) == 2
    });
    // The stored answer needs no backend.
    let hit = post(r.addr, "/v1/chat/completions", SAME_AGAIN, "");
    assert_eq!(
        (hit.status, hit.header("x-switchyard-cache")),
        (200, Some("hit")),
        "{}",
        hit.text()
    );
    assert_eq!(hit.body, first.body);
    // Not for a request whose rule says "not cached".
    let fresh = post(
        r.addr,
        "/v1/chat/completions",
        SAME_AGAIN,
        "x-switchyard-priority: interactive\r\n",
    );
    assert_eq!(fresh.status, 503, "{}", fresh.text());
    // Anything not stored still waits for a slot that is not there.
    let other = DETERMINISTIC.replace("INV-2291", "INV-2292");
    let miss = post(r.addr, "/v1/chat/completions", &other, "");
    assert_eq!(miss.status, 503, "{}", miss.text());
    assert_eq!(slow.join().unwrap(), 200);
}

#[test]
fn the_query_string_and_forwarded_headers_split_the_key() {
    let (_s, r) = cached_router("");
    let cache_of = |path: &str, headers: &str| {
        let resp = post(r.addr, path, DETERMINISTIC, headers);
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.header("x-switchyard-cache").map(str::to_owned)
    };
    let path = "/v1/chat/completions";
    assert_eq!(cache_of(path, "").as_deref(), Some("stored"));
    // Both reach the backend and may change its answer (Azure's api-version, beta features).
    assert_eq!(
        cache_of("/v1/chat/completions?api-version=2", "").as_deref(),
        Some("stored")
    );
    assert_eq!(
        cache_of(path, "OpenAI-Beta: assistants=v2\r\n").as_deref(),
        Some("stored")
    );
    // Tracing, client identification and the SDK's retry count cannot: still the same answer.
    assert_eq!(
        cache_of(
            path,
            "user-agent: other/1.0\r\nx-stainless-retry-count: 2\r\ntraceparent: 00-1-2-01\r\n"
        )
        .as_deref(),
        Some("hit")
    );
    assert_eq!(
        cache_of("/v1/chat/completions?api-version=2", "").as_deref(),
        Some("hit")
    );
    assert_eq!(
        cache_of(path, "openai-beta: assistants=v2\r\n").as_deref(),
        Some("hit")
    );
}

#[test]
fn only_deterministic_complete_successes_are_stored() {
    let (_s, r) = cached_router("");
    let sampled = DETERMINISTIC.replace("\"temperature\":0", "\"temperature\":0.7");
    for _ in 0..2 {
        assert_eq!(
            post(r.addr, "/v1/chat/completions", &sampled, "").header("x-switchyard-cache"),
            None
        );
    }
    // A backend error is never stored.
    for _ in 0..2 {
        let resp = post(
            r.addr,
            "/v1/chat/completions",
            DETERMINISTIC,
            "x-sim-fault: status=400\r\n",
        );
        assert_eq!(
            (resp.status, resp.header("x-switchyard-cache")),
            (400, Some("miss"))
        );
    }
    assert_eq!(
        post(r.addr, "/v1/chat/completions", DETERMINISTIC, "").header("x-switchyard-cache"),
        Some("stored")
    );
}

#[test]
fn bypass_refresh_and_bad_controls() {
    let (_s, r) = cached_router("");
    let cache = |extra: &str| {
        post(r.addr, "/v1/chat/completions", DETERMINISTIC, extra)
            .header("x-switchyard-cache")
            .map(String::from)
    };
    assert_eq!(
        cache("x-switchyard-cache: bypass\r\n").as_deref(),
        Some("bypass")
    );
    assert_eq!(
        cache("cache-control: no-cache\r\n").as_deref(),
        Some("bypass")
    );
    assert_eq!(
        cache("").as_deref(),
        Some("stored"),
        "bypass stored nothing"
    );
    assert_eq!(cache("").as_deref(), Some("hit"));
    assert_eq!(
        cache("x-switchyard-cache: refresh\r\n").as_deref(),
        Some("stored"),
        "refresh skips the lookup"
    );
    assert_eq!(
        cache("cache-control: max-age=0, no-store\r\n").as_deref(),
        Some("bypass")
    );
    post(
        r.addr,
        "/v1/chat/completions",
        DETERMINISTIC,
        "x-switchyard-cache: sometimes\r\n",
    )
    .error(400);
}

#[test]
fn entries_expire_and_the_cache_can_be_off() {
    let (_s, r) = cached_router("[cache.category_ttl_secs]\nextraction = 3\n");
    let status = || {
        post(r.addr, "/v1/chat/completions", DETERMINISTIC, "")
            .header("x-switchyard-cache")
            .map(String::from)
    };
    let asked = Instant::now();
    assert_eq!(status().as_deref(), Some("stored"));
    assert_eq!(status().as_deref(), Some("hit"));
    // Stored again once expired, and not before its category's TTL.
    eventually("the entry expires", || {
        status().as_deref() == Some("stored")
    });
    assert!(asked.elapsed() >= Duration::from_secs(3), "expired early");
    let (_s2, off) = cached_router("[cache]\nenabled = false\n");
    for _ in 0..2 {
        assert_eq!(
            post(off.addr, "/v1/chat/completions", DETERMINISTIC, "").header("x-switchyard-cache"),
            None
        );
    }
}

#[test]
fn services_may_share_entries_when_configured() {
    let (_s, r) = cached_router("[cache]\nshare_across_services = true\n");
    assert_eq!(
        post(
            r.addr,
            "/v1/chat/completions",
            DETERMINISTIC,
            "x-switchyard-service: a\r\n"
        )
        .header("x-switchyard-cache"),
        Some("stored")
    );
    assert_eq!(
        post(
            r.addr,
            "/v1/chat/completions",
            DETERMINISTIC,
            "x-switchyard-service: b\r\n"
        )
        .header("x-switchyard-cache"),
        Some("hit")
    );
}

#[test]
fn streams_are_stored_whole_and_replayed_as_streams() {
    let (_s, r) = cached_router("");
    let streamed = DETERMINISTIC.replace("\"temperature\":0", "\"temperature\":0,\"stream\":true");
    // A stream cut short is never stored.
    let broken = post(
        r.addr,
        "/v1/chat/completions",
        &streamed,
        "x-sim-fault: reset-after-head\r\n",
    );
    assert!(broken.text().contains("\"error\""));
    let id = |r: &Response| r.header("x-switchyard-request-id").unwrap().to_string();
    let mut ids = vec![id(&broken)];
    let first = post(r.addr, "/v1/chat/completions", &streamed, "");
    ids.push(id(&first));
    assert_eq!(
        first.header("x-switchyard-cache"),
        Some("miss"),
        "the head leaves before the stream is complete"
    );
    let hit = post(r.addr, "/v1/chat/completions", &streamed, "");
    ids.push(id(&hit));
    assert_eq!(
        (hit.header("x-switchyard-cache"), hit.header("content-type")),
        (Some("hit"), Some("text/event-stream"))
    );
    assert_eq!(hit.header("transfer-encoding"), Some("chunked"));
    assert_eq!(
        hit.text(),
        first.text(),
        "the replay is the stream the caller saw"
    );
    assert!(hit.text().ends_with("data: [DONE]\n\n") && !hit.text().contains("\"usage\""));
    // A caller who asks for usage gets the chunk from the same entry.
    let with_usage = streamed.replace(
        "\"stream\":true",
        "\"stream\":true,\"stream_options\":{\"include_usage\":true}",
    );
    let hit = post(r.addr, "/v1/chat/completions", &with_usage, "");
    ids.push(id(&hit));
    assert_eq!(
        hit.header("x-switchyard-cache"),
        Some("hit"),
        "stream_options is not part of the key"
    );
    assert!(hit.text().contains("\"usage\":{"), "{}", hit.text());
    // A whole answer is never served from a stream entry, nor the other way round.
    let whole = post(r.addr, "/v1/chat/completions", DETERMINISTIC, "");
    ids.push(id(&whole));
    assert_eq!(whole.header("x-switchyard-cache"), Some("stored"));
    // Events in the order of the requests (workers may send them in another).
    let events: Vec<serde_json::Value> = usage_events(&stop_router(r));
    let caches: Vec<&str> = ids
        .iter()
        .map(|id| {
            let e = events.iter().find(|e| e["request_id"] == id.as_str());
            e.and_then(|e| e["cache"].as_str()).unwrap_or("no event")
        })
        .collect();
    assert_eq!(caches, ["miss", "stored", "hit", "hit", "stored"]);
    assert_eq!(events.len(), 5);
}

/// Ten identical deterministic requests at once; returns the statuses and cache headers, how
/// many reached the upstream, and how long the ten took (the processes' start-up not counted).
fn burst(sim_args: &[&str], extra_header: &str) -> (Vec<(u16, Option<String>)>, u64, Duration) {
    let s = sim("s", sim_args);
    // Two workers: the ten connections spread over both, so coalescing must work across them.
    let r = router_on_workers(&config_for(&[("s", s.url())], ""), 2);
    let addr = r.addr;
    let started = std::time::Instant::now();
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let extra = extra_header.to_string();
            std::thread::spawn(move || {
                let resp = post(addr, "/v1/chat/completions", DETERMINISTIC, &extra);
                (
                    resp.status,
                    resp.header("x-switchyard-cache").map(String::from),
                )
            })
        })
        .collect();
    let results = threads.into_iter().map(|t| t.join().unwrap()).collect();
    (results, upstream_calls(&s), started.elapsed())
}

#[test]
fn concurrent_identical_misses_make_one_upstream_call() {
    let (results, calls, _) = burst(&["--latency-ms", "300"], "");
    assert_eq!(calls, 1, "{results:?}");
    assert!(results.iter().all(|(status, _)| *status == 200));
    let stored = results
        .iter()
        .filter(|(_, c)| c.as_deref() == Some("stored"))
        .count();
    let hits = results
        .iter()
        .filter(|(_, c)| c.as_deref() == Some("hit"))
        .count();
    assert_eq!((stored, hits), (1, 9), "{results:?}");
}

/// A deterministic streamed request.
fn deterministic_stream() -> String {
    DETERMINISTIC.replace("\"temperature\"", "\"stream\":true,\"temperature\"")
}

#[test]
fn identical_streams_follow_the_first_as_it_arrives() {
    // 30 tokens at 10 a second: the answer takes about 3 s.
    let s = sim(
        "s",
        &["--tokens-per-second", "10", "--completion-tokens", "30"],
    );
    let r = router_on_workers(&config_for(&[("s", s.url())], ""), 2);
    let addr = r.addr;
    let started = std::time::Instant::now();
    let threads: Vec<_> = (0..3)
        .map(|i| {
            let body = deterministic_stream();
            std::thread::spawn(move || {
                // The first leads; the others join while it streams.
                std::thread::sleep(Duration::from_millis(500 * i));
                let mut c = Conn::open(addr);
                c.send(&post_raw("/v1/chat/completions", &body, ""));
                let mut first_data = None;
                let resp = c
                    .read_response_with(|_| {
                        first_data.get_or_insert_with(|| started.elapsed());
                    })
                    .unwrap();
                (resp, first_data.unwrap(), started.elapsed())
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(upstream_calls(&s), 1, "one upstream call for all three");
    let leader_text = streamed_text(&results[0].0.body);
    assert!(!leader_text.is_empty());
    for (i, (resp, first_data, done)) in results.iter().enumerate() {
        assert_eq!(resp.status, 200);
        let expected = if i == 0 { "miss" } else { "hit" };
        assert_eq!(
            resp.header("x-switchyard-cache"),
            Some(expected),
            "request {i}"
        );
        assert_eq!(streamed_text(&resp.body), leader_text, "request {i}");
        assert!(!String::from_utf8_lossy(&resp.body).contains("\"error\""));
        if i > 0 {
            // Followed live: its first bytes came long before the answer was whole.
            assert!(
                *first_data + Duration::from_millis(800) < *done,
                "request {i}: {first_data:?} {done:?}"
            );
        }
    }
}

#[test]
fn a_followed_stream_goes_on_when_its_first_caller_leaves() {
    let s = sim(
        "s",
        &["--tokens-per-second", "10", "--completion-tokens", "30"],
    );
    let r = router(&config_for(&[("s", s.url())], ""));
    let addr = r.addr;
    let mut leader = Conn::open(addr);
    leader.send(&post_raw(
        "/v1/chat/completions",
        &deterministic_stream(),
        "",
    ));
    eventually("the first request is upstream", || upstream_calls(&s) == 1);
    let follower = caller_past_first_bytes(
        addr,
        "/v1/chat/completions",
        deterministic_stream(),
        "the second request follows the first",
    );
    // The first caller gives up mid-stream; the one following it must still get it all.
    drop(leader);
    let resp = follower.join().unwrap();
    assert_eq!(resp.header("x-switchyard-cache"), Some("hit"));
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    assert!(
        body.ends_with("data: [DONE]\n\n") && !body.contains("\"error\""),
        "{body}"
    );
    assert_eq!(upstream_calls(&s), 1);
    // And the answer was stored for later callers.
    let again = post(addr, "/v1/chat/completions", &deterministic_stream(), "");
    assert_eq!(again.header("x-switchyard-cache"), Some("hit"));
    assert_eq!(streamed_text(&again.body), streamed_text(&resp.body));
}

#[test]
fn an_answer_others_wait_for_is_fetched_when_its_first_caller_leaves() {
    let s = sim("s", &["--latency-ms", "1500"]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let addr = r.addr;
    let mut leader = Conn::open(addr);
    leader.send(&post_raw("/v1/chat/completions", DETERMINISTIC, ""));
    eventually("the first request is upstream", || upstream_calls(&s) == 1);
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let resp = post(addr, "/v1/chat/completions", DETERMINISTIC, "");
                (
                    resp.status,
                    resp.header("x-switchyard-cache").map(String::from),
                )
            })
        })
        .collect();
    // Time for the three to join the wait (the answer is 1.5 s away), then the first caller
    // gives up: its call goes on for them, rather than each of them calling again.
    std::thread::sleep(Duration::from_millis(400));
    drop(leader);
    for w in waiters {
        assert_eq!(w.join().unwrap(), (200, Some("hit".into())));
    }
    assert_eq!(upstream_calls(&s), 1);
}

#[test]
fn a_followed_stream_too_large_to_store_still_reaches_its_followers_whole() {
    // About 150 KB of events over about 2 s: over the 64 KiB an entry may take here.
    let s = sim(
        "s",
        &["--tokens-per-second", "500", "--completion-tokens", "1000"],
    );
    let r = router(&config_for(
        &[("s", s.url())],
        "[cache]\nmax_entry_bytes = 65536\n",
    ));
    let addr = r.addr;
    let body =
        deterministic_stream().replace("\"temperature\"", "\"max_tokens\":1000,\"temperature\"");
    let first = {
        let body = body.clone();
        std::thread::spawn(move || post(addr, "/v1/chat/completions", &body, ""))
    };
    eventually("the first request is upstream", || upstream_calls(&s) == 1);
    let follower = post(addr, "/v1/chat/completions", &body, "");
    let first = first.join().unwrap();
    assert_eq!(follower.header("x-switchyard-cache"), Some("hit"));
    let text = String::from_utf8_lossy(&follower.body);
    assert!(text.ends_with("data: [DONE]\n\n") && !text.contains("\"error\""));
    assert_eq!(streamed_text(&follower.body), streamed_text(&first.body));
    assert_eq!(upstream_calls(&s), 1);
}

#[test]
fn a_zero_ttl_means_not_cached() {
    let (s, r) = cached_router("[cache]\nttl_secs = 0\n");
    for _ in 0..2 {
        let resp = post(r.addr, "/v1/chat/completions", DETERMINISTIC, "");
        assert_eq!(
            (resp.status, resp.header("x-switchyard-cache")),
            (200, None)
        );
    }
    assert_eq!(upstream_calls(&s), 2);
}

#[test]
fn when_the_coalesced_call_fails_each_waiter_goes_on_its_own() {
    let (results, calls, took) = burst(&["--latency-ms", "1000"], "x-sim-fault: status=400\r\n");
    // One wait for the failed leader (1 s), then all nine in parallel (1 s): far from the
    // 10 s that ten calls in a row would take.
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert!(
        results
            .iter()
            .all(|(status, cache)| *status == 400 && cache.as_deref() == Some("miss")),
        "{results:?}"
    );
    assert_eq!(calls, 10, "nobody was served another request's failure");
}

#[test]
fn a_leader_that_fails_over_leads_the_key_of_its_new_target() {
    let bad = sim("bad", &["--error-rate", "1", "--error-status", "500"]);
    let good = sim("good", &["--latency-ms", "2500"]);
    let config = config_for(&[("bad", bad.url()), ("good", good.url())], "")
        .replace("interval_ms = 100", "interval_ms = 0");
    let r = router(&config);
    let addr = r.addr;
    // The first request fails on `bad` and fails over to `good`; the second, pinned to `good`
    // while the first waits for it, asks for the same key and must wait for that answer.
    let ask = move |tier: &'static str| {
        std::thread::spawn(move || {
            let resp = post(
                addr,
                "/v1/chat/completions",
                DETERMINISTIC,
                &format!("x-switchyard-tier: {tier}\r\n"),
            );
            (
                resp.status,
                resp.header("x-switchyard-cache").map(String::from),
            )
        })
    };
    let leader = ask("bad");
    eventually("the leader has failed over to good", || {
        upstream_calls(&good) == 1
    });
    let follower = ask("good");
    assert_eq!(leader.join().unwrap(), (200, Some("stored".into())));
    assert_eq!(follower.join().unwrap(), (200, Some("hit".into())));
    assert_eq!(upstream_calls(&good), 1);
}

#[test]
fn waiters_released_by_a_leader_that_failed_over_skip_the_backend_that_failed_it() {
    let bad = sim(
        "bad",
        &[
            "--error-rate",
            "1",
            "--error-status",
            "500",
            "--latency-ms",
            "2000",
        ],
    );
    let good = sim("good", &[]);
    let config = config_for(&[("bad", bad.url()), ("good", good.url())], "")
        .replace("interval_ms = 100", "interval_ms = 0");
    let r = router(&config);
    let addr = r.addr;
    let ask = move || {
        std::thread::spawn(move || {
            let resp = post(
                addr,
                "/v1/chat/completions",
                DETERMINISTIC,
                "x-switchyard-tier: bad\r\n",
            );
            (
                resp.status,
                resp.header("x-switchyard-backend").map(String::from),
            )
        })
    };
    // The leader waits 2 s for `bad`'s 500 and fails over up the tiers to `good`, whose
    // model makes another key: the three waiting for the first key are released then, and
    // would each wait on `bad` again (one failure does not eject it).
    let leader = ask();
    eventually("the leader is on bad", || upstream_calls(&bad) == 1);
    let waiters: Vec<_> = (0..3).map(|_| ask()).collect();
    for w in std::iter::once(leader).chain(waiters) {
        assert_eq!(w.join().unwrap(), (200, Some("good".into())));
    }
    assert_eq!(upstream_calls(&bad), 1);
}

#[test]
fn a_target_in_two_tiers_is_named_by_the_tier_it_answered_for_everywhere() {
    let s = sim("s", &[]);
    let config = format!(
        r#"
[health]
interval_ms = 0
[usage]
log_events = true
[[backends]]
name = "s"
url = "{}"
models = [{{ name = "m" }}]
[[tiers]]
name = "small"
targets = ["s/m"]
[[tiers]]
name = "large"
targets = ["s/m"]
"#,
        s.url()
    );
    let r = router(&config);
    let ask = || {
        post(
            r.addr,
            "/v1/chat/completions",
            DETERMINISTIC,
            "x-switchyard-tier: large\r\n",
        )
    };
    let (stored, hit) = (ask(), ask());
    assert_eq!(stored.header("x-switchyard-cache"), Some("stored"));
    assert_eq!(hit.header("x-switchyard-cache"), Some("hit"));
    for resp in [&stored, &hit] {
        assert_eq!(resp.header("x-switchyard-tier"), Some("large"));
    }
    let err = stop_router(r);
    let tiers: Vec<_> = usage_events(&err)
        .into_iter()
        .map(|e| e["tier"].clone())
        .collect();
    assert_eq!(tiers, ["large", "large"], "{err}");
}

#[test]
fn a_repeated_request_takes_its_shortcut_with_the_same_answer_and_headers() {
    let (s, r) = cached_router("[rate_limits.services.etl]\nrequests_per_minute = 4\n");
    let ask = |extra: &str| {
        post(
            r.addr,
            "/v1/chat/completions",
            DETERMINISTIC,
            &format!("x-switchyard-service: etl\r\n{extra}"),
        )
    };
    assert_eq!(ask("").header("x-switchyard-cache"), Some("stored"));
    // The first hit is found by the canonical key, the second by the shortcut it left.
    let (first, second) = (ask(""), ask(""));
    for name in [
        "x-switchyard-cache",
        "x-switchyard-category",
        "x-switchyard-rule",
        "x-switchyard-tier",
        "x-switchyard-backend",
        "x-switchyard-model",
        "x-switchyard-config-version",
    ] {
        assert_eq!(first.header(name), second.header(name), "{name}");
    }
    assert_eq!(second.header("x-switchyard-cache"), Some("hit"));
    assert_eq!(first.body, second.body);
    // Shortcuts still count against the rate limit (4 a minute).
    assert_eq!(ask("").header("x-switchyard-cache"), Some("hit"));
    ask("").error(429);
    assert_eq!(upstream_calls(&s), 1);
    let err = stop_router(r);
    let hits: Vec<_> = usage_events(&err)
        .into_iter()
        .filter(|e| e["cache"] == "hit")
        .collect();
    assert_eq!(hits.len(), 3, "{err}");
    assert_eq!(hits[0]["saved_micros"], hits[1]["saved_micros"]);
    assert_eq!(hits[0]["category"], hits[1]["category"]);
}

#[test]
fn a_stored_answer_is_accounted_to_the_backend_that_made_it() {
    // One model on two backends of a tier: a hit is chosen for either, made by one.
    let (a, b) = (sim("a", &[]), sim("b", &[]));
    let config = format!(
        r#"
[health]
interval_ms = 0
[usage]
log_events = true
[[backends]]
name = "a"
url = "{}"
models = [{{ name = "m", input_per_mtok = 1.0, output_per_mtok = 2.0 }}]
[[backends]]
name = "b"
url = "{}"
models = [{{ name = "m", input_per_mtok = 1.0, output_per_mtok = 2.0 }}]
[[tiers]]
name = "t"
targets = ["a/m", "b/m"]
"#,
        a.url(),
        b.url()
    );
    let r = router(&config);
    let stored = post(r.addr, "/v1/chat/completions", DETERMINISTIC, "");
    assert_eq!(stored.header("x-switchyard-cache"), Some("stored"));
    let maker = stored.header("x-switchyard-backend").unwrap().to_string();
    for _ in 0..10 {
        let hit = post(r.addr, "/v1/chat/completions", DETERMINISTIC, "");
        assert_eq!(hit.header("x-switchyard-backend"), Some(maker.as_str()));
    }
    let err = stop_router(r);
    let hits: Vec<_> = usage_events(&err)
        .into_iter()
        .filter(|e| e["cache"] == "hit")
        .collect();
    assert_eq!(hits.len(), 10, "{err}");
    assert!(hits.iter().all(|e| e["backend"] == maker.as_str()), "{err}");
}
