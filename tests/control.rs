//! The control plane end to end: the admin API through the `switchyard` CLI, live reloads
//! under traffic, budgets that downgrade and refuse, metrics, and spend that survives kill -9.

mod common;

use common::*;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn cli_with_token(r: &Proc, token: &str, command: &str, rest: &[&str]) -> (bool, String, String) {
    admin_cli(r.admin.unwrap(), token, command, rest)
}

fn cli(r: &Proc, command: &str, rest: &[&str]) -> (bool, String, String) {
    cli_with_token(r, ADMIN_TOKEN, command, rest)
}

fn write_temp(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchyard-control-{}-{}-{name}",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

/// Replaces a file in one step (a watcher never reads it half written), with the given
/// modification time if any.
fn replace_file(path: &std::path::Path, text: &str, modified: Option<std::time::SystemTime>) {
    let new = path.with_extension("new");
    std::fs::write(&new, text).unwrap();
    if let Some(stamp) = modified {
        std::fs::File::options()
            .write(true)
            .open(&new)
            .unwrap()
            .set_modified(stamp)
            .unwrap();
    }
    std::fs::rename(&new, path).unwrap();
}

fn config_version(r: &Response) -> u64 {
    r.header("x-switchyard-config-version")
        .expect("config version header")
        .parse()
        .unwrap()
}

fn metrics(admin: SocketAddr, token: Option<&str>) -> Response {
    let mut c = Conn::open(admin);
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    c.send(format!("GET /metrics HTTP/1.1\r\nhost: test\r\n{auth}\r\n").as_bytes());
    c.read_response().expect("a response")
}

#[test]
fn apply_config_under_traffic_never_fails_a_request() {
    let s = sim("s", &[]);
    let base = config_for(&[("s", s.url())], "");
    let r = router(&base);
    let stop = Arc::new(AtomicBool::new(false));
    // Per client: every status seen, and the config version of its latest answer.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, seen, addr) = (stop.clone(), seen.clone(), r.addr);
            std::thread::spawn(move || {
                let mut last = 0;
                let mut c = Conn::open(addr);
                while !stop.load(Ordering::Relaxed) {
                    c.send(&post_raw("/v1/chat/completions", &chat("hello"), ""));
                    let resp = c.read_response().expect("an answer on the same connection");
                    last = config_version(&resp);
                    seen.lock().unwrap().push((resp.status, last));
                }
                last
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let bad = write_temp(
        "bad.toml",
        &(base.clone() + "[categories]\ncode = \"nope\"\n"),
    );
    let (ok, _, err) = cli(&r, "config", &["apply", bad.to_str().unwrap()]);
    assert!(
        !ok && err.contains("categories.code: unknown tier `nope`"),
        "{err}"
    );
    assert!(err.contains("version 1 stays in effect"), "{err}");
    let (ok, out, err) = cli(&r, "config", &["validate", bad.to_str().unwrap()]);
    assert!(
        !ok && out.is_empty() && err.contains("unknown tier"),
        "{err}"
    );
    let moved = write_temp(
        "moved.toml",
        &(base.clone() + "[cache]\nmax_bytes = 1000000\n"),
    );
    let (ok, _, err) = cli(&r, "config", &["apply", moved.to_str().unwrap()]);
    assert!(
        !ok && err.contains("cache.max_bytes: cannot change while running"),
        "{err}"
    );

    let good = write_temp(
        "good.toml",
        &(base.clone() + "[routing]\nmax_attempts = 2\n"),
    );
    let (ok, out, err) = cli(&r, "config", &["validate", good.to_str().unwrap()]);
    assert!(ok && out.starts_with("valid"), "{out}{err}");
    let (ok, out, err) = cli(&r, "config", &["apply", good.to_str().unwrap()]);
    assert!(
        ok && out.contains("config version 2 in effect"),
        "{out}{err}"
    );
    std::thread::sleep(Duration::from_secs(1));
    // New connections land on every worker: all of them serve the new version.
    for _ in 0..8 {
        let resp = post(r.addr, "/v1/chat/completions", &chat("hello"), "");
        assert_eq!((resp.status, config_version(&resp)), (200, 2));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        assert_eq!(
            c.join().unwrap(),
            2,
            "a kept-alive connection sees the new version"
        );
    }
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 20, "traffic flowed: {}", seen.len());
    assert!(
        seen.iter().all(|(status, _)| *status == 200),
        "no request failed"
    );
    assert!(seen.iter().any(|(_, v)| *v == 1) && seen.iter().any(|(_, v)| *v == 2));
    let (ok, out, _) = cli(&r, "status", &[]);
    assert!(ok && out.contains("config version 2"), "{out}");
}

#[test]
fn the_config_file_reloads_on_change_and_on_sighup() {
    let s = sim("s", &[]);
    let base = config_for(&[("s", s.url())], "");
    let r = router(&base);
    let path = r.dir.as_ref().unwrap().join("switchyard.toml");
    let version = || {
        let mut c = Conn::open(r.addr);
        c.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
        match c.read_response() {
            Some(resp) => config_version(&resp),
            None => {
                // The router's stderr so far, through its pipe (Linux /proc).
                let err = Command::new("timeout")
                    .args(["1", "cat", &format!("/proc/{}/fd/2", r.child.id())])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                panic!("no response; router stderr:\n{err}");
            }
        }
    };
    assert_eq!(version(), 1);
    // A connection kept alive across the reload, idle while it happens.
    let mut kept = Conn::open(r.addr);
    kept.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
    assert_eq!(config_version(&kept.read_response().unwrap()), 1);
    replace_file(
        &path,
        &(base.clone() + "[routing]\nmax_attempts = 2\n"),
        None,
    );
    eventually("the changed file is applied", || version() == 2);
    // Its next request is served under the config in effect when it arrives.
    kept.send(&post_raw("/v1/chat/completions", &chat("hi"), ""));
    assert_eq!(config_version(&kept.read_response().unwrap()), 2);
    // A broken file is refused and the running config stays.
    let reloads = |outcome: &str| {
        let page = metrics(r.admin.unwrap(), Some(ADMIN_TOKEN)).text();
        page.contains(&format!(
            "switchyard_config_reloads_total{{outcome=\"{outcome}\"}} 1"
        ))
    };
    eventually("the reload is counted", || reloads("applied"));
    let fixed = base.clone() + "[routing]\nmax_attempts = 3\n";
    replace_file(&path, &fixed.replace("[routing]", "[routing "), None);
    eventually("the broken file is refused", || reloads("refused"));
    assert_eq!(version(), 2);
    // Same length and modification time: only SIGHUP can notice this change.
    let stamp = std::fs::metadata(&path).unwrap().modified().unwrap();
    replace_file(&path, &fixed, Some(stamp));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(version(), 2, "the watcher cannot tell");
    assert!(Command::new("kill")
        .args(["-HUP", &r.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    eventually("SIGHUP applies the file", || version() == 3);
    // A config applied through the API lasts until the file is reloaded, which says so.
    let other = r.dir.as_ref().unwrap().join("other.toml");
    std::fs::write(&other, base.clone() + "[routing]\nmax_attempts = 4\n").unwrap();
    let (ok, out, err) = cli(&r, "config", &["apply", other.to_str().unwrap()]);
    assert!(ok && version() == 4, "{out}{err}");
    assert!(Command::new("kill")
        .args(["-HUP", &r.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    eventually("SIGHUP puts the file back", || version() == 5);
    let err = stop_router(r);
    assert!(err.contains("reload (file changed) refused"), "{err}");
    assert!(
        err.contains("reload (SIGHUP): config version 3 in effect"),
        "{err}"
    );
    assert!(
        err.contains("config version 5 in effect, replacing version 4 from"),
        "{err}"
    );
}

#[test]
fn a_backend_added_by_a_reload_is_checked_at_once() {
    let (s, t) = (sim("s", &[]), sim("t", &[]));
    // Checks every 10 s: the reload must not wait for the next round.
    let config = |backends: &[(&str, String)]| {
        config_for(backends, "").replace("interval_ms = 100", "interval_ms = 10000")
    };
    let r = router(&config(&[("s", s.url())]));
    let healthy = |name: &str| {
        metrics(r.admin.unwrap(), Some(ADMIN_TOKEN))
            .text()
            .contains(&format!(
                "switchyard_backend_healthy{{backend=\"{name}\"}} 1"
            ))
    };
    eventually("the first backend is checked", || healthy("s"));
    let added = write_temp("added.toml", &config(&[("s", s.url()), ("t", t.url())]));
    let (ok, out, err) = cli(&r, "config", &["apply", added.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    let applied = Instant::now();
    while !healthy("t") {
        assert!(
            applied.elapsed() < Duration::from_secs(3),
            "the added backend is still not checked"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_admin_api_and_metrics_need_the_token() {
    let s = sim("s", &["--completion-tokens", "5"]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let (ok, _, err) = cli_with_token(&r, "wrong", "status", &[]);
    assert!(
        !ok && err.contains("not this control plane's admin token"),
        "{err}"
    );
    assert_eq!(metrics(r.admin.unwrap(), None).status, 401);
    assert_eq!(metrics(r.admin.unwrap(), Some("wrong")).status, 401);
    // Any other plain HTTP request without the token: a 401 too, not a gRPC error on a 200.
    let mut c = Conn::open(r.admin.unwrap());
    c.send(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 401);

    for _ in 0..3 {
        let resp = post(
            r.addr,
            "/v1/chat/completions",
            &chat("Summarise: the meeting moved to Friday."),
            "x-switchyard-service: billing\r\n",
        );
        assert_eq!(resp.status, 200);
    }
    let needles = [
        "switchyard_requests_total{service=\"billing\",category=\"summarisation\",tier=\"s\",backend=\"s\",status=\"200\"} 3",
        "switchyard_tokens_total{service=\"billing\",category=\"summarisation\",tier=\"s\",model=\"s-model\",kind=\"completion\"} 15",
        "switchyard_request_duration_seconds_count{service=\"billing\",tier=\"s\"} 3",
        "switchyard_backend_healthy{backend=\"s\"} 1",
        "switchyard_config_version 1",
        "switchyard_usage_events_dropped 0",
    ];
    let mut text = String::new();
    eventually("the metrics count the three requests", || {
        let page = metrics(r.admin.unwrap(), Some(ADMIN_TOKEN));
        assert_eq!(page.status, 200);
        text = page.text();
        needles.iter().all(|n| text.contains(n))
    });
    let (ok, out, err) = cli(&r, "spend", &["--service", "billing"]);
    assert!(ok, "{err}");
    let row = out.lines().find(|l| l.contains("billing")).expect(&out);
    assert!(
        row.contains("summarisation") && row.contains("s-model"),
        "{out}"
    );
    assert_eq!(row.split_whitespace().nth(5), Some("3"), "{out}");
    let (ok, out, _) = cli(&r, "status", &[]);
    assert!(
        ok && out.contains("requests 3") && out.contains("backend s: up"),
        "{out}"
    );
    let (ok, out, _) = cli(&r, "spend", &["--day", "yesterday"]);
    assert!(!ok && out.is_empty());
}

/// Two tiers: `cheap` at 1 USD per 1M tokens and `big` at 100.
fn priced_tiers(cheap: &str, big: &str, extra: &str) -> String {
    format!(
        r#"
[[backends]]
name = "cheap"
url = "{}"
models = [{{ name = "cheap-model", input_per_mtok = 1.0, output_per_mtok = 1.0 }}]
[[backends]]
name = "big"
url = "{}"
models = [{{ name = "big-model", input_per_mtok = 100.0, output_per_mtok = 100.0 }}]
[[tiers]]
name = "small"
targets = ["cheap/cheap-model"]
[[tiers]]
name = "large"
targets = ["big/big-model"]
[usage]
log_events = true
{extra}"#,
        cheap, big
    )
}

const BIG_REQUEST: &str = r#"{"model":"auto","max_tokens":100,"messages":[{"role":"user","content":"Prove that there are infinitely many primes."}]}"#;

#[test]
fn after_a_downgrade_the_last_cheap_target_s_own_error_reaches_the_caller() {
    let cheap = sim("cheap", &["--error-rate", "1", "--error-status", "500"]);
    let big = sim("big", &[]);
    let r = router(&priced_tiers(
        &cheap.url(),
        &big.url(),
        "[budgets.services.etl]\ndaily_usd = 0.01\n",
    ));
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        BIG_REQUEST,
        "x-switchyard-service: etl\r\nx-switchyard-tier: large\r\n",
    );
    // Nothing is left to fail over to: the large tier is what the budget refused.
    assert_eq!(resp.header("x-switchyard-budget"), Some("downgraded"));
    assert_eq!(resp.header("x-switchyard-attempts"), Some("1"));
    let e = resp.error(500);
    assert_eq!(e["type"], "server_error", "{}", resp.text());
    assert!(e["message"].as_str().unwrap().contains("simulated failure"));
}

#[test]
fn a_budget_that_stops_failover_is_the_reason_given() {
    let big = sim("big", &[]);
    // The small tier's only backend is down; the large one is past the budget.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let r = router(&priced_tiers(
        &dead,
        &big.url(),
        "[budgets.services.etl]\ndaily_usd = 0.01\n[health]\ninterval_ms = 0\n",
    ));
    let resp = post(
        r.addr,
        "/v1/chat/completions",
        BIG_REQUEST,
        "x-switchyard-service: etl\r\nx-switchyard-tier: small\r\n",
    );
    let e = resp.error(429);
    assert_eq!(e["code"], "budget_exceeded", "{}", resp.text());
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("earlier attempt failed") && message.contains("cheap"),
        "{message}"
    );
    let err = stop_router(r);
    let events = usage_events(&err);
    assert_eq!(events.len(), 1, "{err}");
    assert_eq!(events[0]["refused_by"], "budget");
    assert_eq!(events[0]["attempts"], 1);
}

#[test]
fn a_budget_set_mid_day_counts_what_was_spent_before_it() {
    let (cheap, big) = (sim("cheap", &[]), sim("big", &[]));
    let r = router(&priced_tiers(&cheap.url(), &big.url(), ""));
    let send = || {
        post(
            r.addr,
            "/v1/chat/completions",
            BIG_REQUEST,
            "x-switchyard-service: etl\r\nx-switchyard-tier: large\r\n",
        )
    };
    // Without a budget: a large-tier answer costs a few thousand micro-dollars.
    assert_eq!(send().status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cli(&r, "spend", &["--service", "etl"]).1.contains("etl") {
        assert!(
            Instant::now() < deadline,
            "the answer's spend never reached the ledger"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out, err) = cli(&r, "budgets", &["set", "etl", "0.001"]);
    assert!(ok, "{out}{err}");
    // $0.001 is below what etl spent today: even the cheap tier (a few hundred) is refused.
    let resp = send();
    let e = resp.error(429);
    assert_eq!(e["code"], "budget_exceeded", "{}", resp.text());
}

#[test]
fn a_budget_downgrades_to_a_cheaper_tier_then_refuses() {
    let (cheap, big) = (sim("cheap", &[]), sim("big", &[]));
    // The big tier's worst case is (body bytes + 100) * 100 micro-dollars, about 0.022 USD.
    let r = router(&priced_tiers(
        &cheap.url(),
        &big.url(),
        "[budgets.services.etl]\ndaily_usd = 0.01\n[budgets.services.broke]\ndaily_usd = 0.0001\n",
    ));
    let send = |service: &str| {
        post(
            r.addr,
            "/v1/chat/completions",
            BIG_REQUEST,
            &format!("x-switchyard-service: {service}\r\nx-switchyard-tier: large\r\n"),
        )
    };
    let rich = send("rich");
    assert_eq!(
        (
            rich.status,
            rich.header("x-switchyard-tier"),
            rich.header("x-switchyard-budget")
        ),
        (200, Some("large"), None)
    );
    let etl = send("etl");
    assert_eq!(
        (
            etl.status,
            etl.header("x-switchyard-tier"),
            etl.header("x-switchyard-budget")
        ),
        (200, Some("small"), Some("downgraded")),
        "{}",
        etl.text()
    );
    assert_eq!(etl.header("x-switchyard-backend"), Some("cheap"));
    let broke = send("broke");
    broke.error(429);
    assert!(broke.text().contains("budget_exceeded"), "{}", broke.text());
    assert!(
        broke.text().contains("insufficient_quota"),
        "{}",
        broke.text()
    );
    std::thread::sleep(Duration::from_millis(100));
    let (ok, out, err) = cli(&r, "budgets", &[]);
    assert!(ok, "{err}");
    assert!(
        out.contains("etl: $0.0") && out.contains("of $0.010000 spent"),
        "{out}"
    );
    // An API-set budget wins over the config's and is in force at once. (rich spent a few
    // thousand micro-dollars above: what is left is short of the large tier's worst case.)
    let (ok, out, err) = cli(&r, "budgets", &["set", "rich", "0.015"]);
    assert!(
        ok && out.contains("rich: ") && out.contains("of $0.015000") && out.contains("(api)"),
        "{out}{err}"
    );
    assert_eq!(
        send("rich").header("x-switchyard-budget"),
        Some("downgraded")
    );
    let (ok, _, _) = cli(&r, "budgets", &["clear", "rich"]);
    assert!(ok);
    // Again: nothing left to clear, and the CLI says so.
    let (ok, _, err) = cli(&r, "budgets", &["clear", "rich"]);
    assert!(
        !ok && err.contains("no budget set through the API"),
        "{err}"
    );
    assert_eq!(send("rich").header("x-switchyard-tier"), Some("large"));
    let (ok, _, err) = cli(
        &r,
        "budgets",
        &["set", "rich", "1", "--category", "nonsense"],
    );
    assert!(!ok && err.contains("unknown category"), "{err}");
    let (ok, _, err) = cli(&r, "budgets", &["set", "a b", "1"]);
    assert!(!ok && err.contains("1 to 128"), "{err}");
    let err = stop_router(r);
    let events = usage_events(&err);
    let downgraded = events
        .iter()
        .filter(|e| e["budget_downgraded"] == true)
        .count();
    let refused = events
        .iter()
        .filter(|e| e["refused_by"] == "budget")
        .count();
    assert_eq!((downgraded, refused), (2, 1), "{err}");
}

#[test]
fn a_budget_downgrade_takes_a_cheaper_target_of_the_same_tier_first() {
    let (cheap, big, mid) = (sim("cheap", &[]), sim("big", &[]), sim("mid", &[]));
    // The large tier also holds `mid` at 2 USD per 1M tokens (worst case about 0.0004 USD),
    // weighted so that the balancer almost always picks `big` first.
    let extra = format!(
        r#"[[backends]]
name = "mid"
url = "{}"
weight = 1
models = [{{ name = "mid-model", input_per_mtok = 2.0, output_per_mtok = 2.0 }}]
[budgets.services.etl]
daily_usd = 0.01
"#,
        mid.url()
    );
    let config = priced_tiers(&cheap.url(), &big.url(), "")
        .replace("url = \"", "weight = 10000\nurl = \"")
        .replace(
            "targets = [\"big/big-model\"]",
            "targets = [\"big/big-model\", \"mid/mid-model\"]",
        )
        + &extra;
    let r = router(&config);
    let mut downgraded = 0;
    for _ in 0..3 {
        let resp = post(
            r.addr,
            "/v1/chat/completions",
            BIG_REQUEST,
            "x-switchyard-service: etl\r\nx-switchyard-tier: large\r\n",
        );
        assert_eq!(
            (
                resp.status,
                resp.header("x-switchyard-tier"),
                resp.header("x-switchyard-backend"),
            ),
            (200, Some("large"), Some("mid")),
            "{}",
            resp.text()
        );
        // Unless the balancer drew `mid` first (one time in 10,001), `big` was refused.
        downgraded += usize::from(resp.header("x-switchyard-budget") == Some("downgraded"));
    }
    assert!(downgraded >= 1);
}

#[test]
fn concurrent_requests_never_spend_past_the_budget() {
    let (cheap, big) = (
        sim("cheap", &["--completion-tokens", "90"]),
        sim("big", &["--completion-tokens", "90"]),
    );
    let limit_micros = 100_000;
    let r = router(&priced_tiers(
        &cheap.url(),
        &big.url(),
        "[budgets]\nlease_usd = 0.001\n[budgets.services.etl]\ndaily_usd = 0.1\n",
    ));
    let addr = r.addr;
    // 64 at once (connected first, then sent together), each slow enough that all are in
    // flight together: their worst cases, reserved together, are far over the budget.
    let together = Arc::new(std::sync::Barrier::new(64));
    let answers: Vec<_> = (0..64)
        .map(|_| {
            let together = together.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(addr);
                together.wait();
                c.send(&post_raw(
                    "/v1/chat/completions",
                    BIG_REQUEST,
                    "x-switchyard-service: etl\r\nx-switchyard-tier: large\r\nx-sim-fault: slow-first-byte=1500\r\n",
                ));
                c.read_response().unwrap().status
            })
        })
        .collect();
    let statuses: Vec<u16> = answers.into_iter().map(|a| a.join().unwrap()).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let served = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        served > 0 && served < 64,
        "the budget binds: {served} served"
    );
    let err = stop_router(r);
    let spent: u64 = usage_events(&err)
        .iter()
        .filter(|e| e["service"] == "etl")
        .map(|e| e["cost_micros"].as_u64().unwrap())
        .sum();
    assert!(
        spent > 0 && spent <= limit_micros,
        "spent {spent} of {limit_micros}"
    );
}

#[test]
fn spend_and_budgets_survive_kill_9() {
    let s = sim("s", &["--completion-tokens", "5"]);
    let config = config_for(&[("s", s.url())], "");
    let r = router(&config);
    for _ in 0..5 {
        let resp = post(
            r.addr,
            "/v1/chat/completions",
            &chat("hello"),
            "x-switchyard-service: etl\r\n",
        );
        assert_eq!(resp.status, 200);
    }
    let (ok, _, err) = cli(&r, "budgets", &["set", "etl", "0.000001"]);
    assert!(ok, "{err}");
    // Settled ...
    let mut before = String::new();
    eventually("the five requests reach the ledger", || {
        before = cli(&r, "spend", &["--service", "etl"]).1;
        before.contains(" 5 ")
    });
    // ... and more than a second before the kill: it must be on disk.
    std::thread::sleep(Duration::from_millis(1500));
    let dir = r.dir.clone().unwrap();
    let mut r = r;
    r.child.kill().unwrap(); // SIGKILL: no drain, no final flush.
    r.child.wait().unwrap();
    drop(r);
    let r = start_router(&dir, &dir.join("switchyard.toml"), free_addr(), 2);
    let (ok, after, err) = cli(&r, "spend", &["--service", "etl"]);
    assert!(ok, "{err}");
    assert_eq!(after, before);
    assert!(after.contains("etl"), "{after}");
    let (_, budgets, _) = cli(&r, "budgets", &[]);
    assert!(
        budgets.contains("etl: ") && budgets.contains("of $0.000001 spent"),
        "{budgets}"
    );
    // The restored spend is over the restored budget: nothing more is spent today.
    let refused = post(
        r.addr,
        "/v1/chat/completions",
        &chat("hello"),
        "x-switchyard-service: etl\r\n",
    );
    refused.error(429);
    let resp = post(r.addr, "/v1/chat/completions", &chat("hello"), "");
    assert_eq!(
        config_version(&resp),
        2,
        "config versions continue across restarts"
    );
}

#[test]
fn purge_empties_the_response_cache() {
    let s = sim("s", &[]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let body = r#"{"model":"auto","temperature":0,"messages":[{"role":"user","content":"Extract the date: 1 May"}]}"#;
    assert_eq!(
        post(r.addr, "/v1/chat/completions", body, "").header("x-switchyard-cache"),
        Some("stored")
    );
    assert_eq!(
        post(r.addr, "/v1/chat/completions", body, "").header("x-switchyard-cache"),
        Some("hit")
    );
    let (ok, out, err) = cli(&r, "cache", &["purge"]);
    assert!(ok && out.starts_with("purged 1 entries"), "{out}{err}");
    assert_eq!(
        post(r.addr, "/v1/chat/completions", body, "").header("x-switchyard-cache"),
        Some("stored")
    );
}

#[test]
fn api_keys_decide_the_service_and_survive_a_restart() {
    let s = sim("s", &[]);
    let config = config_for(
        &[("s", s.url())],
        "[auth]\nrequired = true\n[usage]\nlog_events = true\n[budgets.services.broke]\ndaily_usd = 0.000001\n",
    );
    let r = router(&config);
    let (ok, out, err) = cli(&r, "keys", &["create", "etl"]);
    assert!(ok, "{err}");
    let key = out.lines().next().unwrap().to_string();
    assert!(key.starts_with("sy-") && key.len() > 40, "{out}");
    let (ok, out, _) = cli(&r, "keys", &["create", "gateway", "--any-service"]);
    assert!(ok);
    let gateway = out.lines().next().unwrap().to_string();
    let ask = |headers: &str| post(r.addr, "/v1/chat/completions", &chat("hello"), headers);

    let missing = ask("x-switchyard-service: etl\r\n");
    missing.error(401);
    assert!(
        missing.text().contains("invalid_api_key"),
        "{}",
        missing.text()
    );
    ask("authorization: Bearer sy-guess\r\n").error(401);
    let mut models = Conn::open(r.addr);
    models.send(b"GET /v1/models HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!(models.read_response().unwrap().status, 401);
    models.send(
        format!("GET /v1/models HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {key}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(models.read_response().unwrap().status, 200);

    // The key decides the service; the header cannot dodge it.
    let own = ask(&format!(
        "authorization: Bearer {key}\r\nx-switchyard-service: someone-else\r\n"
    ));
    assert_eq!(own.status, 200, "{}", own.text());
    let acting = ask(&format!(
        "authorization: Bearer {gateway}\r\nx-switchyard-service: billing\r\n"
    ));
    assert_eq!(acting.status, 200);
    // Nor can it pin a tier past the operator's rules; a key allowed to act for any service can.
    let rule = |key: &str| {
        let resp = ask(&format!(
            "authorization: Bearer {key}\r\nx-switchyard-tier: s\r\n"
        ));
        assert_eq!(resp.status, 200, "{}", resp.text());
        resp.header("x-switchyard-rule").map(str::to_string)
    };
    assert_ne!(rule(&key).as_deref(), Some("header:x-switchyard-tier"));
    assert_eq!(rule(&gateway).as_deref(), Some("header:x-switchyard-tier"));

    // A key of a service without budget cannot spend another's: its service is its key's.
    let (ok, out, _) = cli(&r, "keys", &["create", "broke"]);
    assert!(ok);
    let broke = out.lines().next().unwrap().to_string();
    ask(&format!(
        "authorization: Bearer {broke}\r\nx-switchyard-service: etl\r\n"
    ))
    .error(429);

    let (ok, list, _) = cli(&r, "keys", &["list"]);
    assert!(
        ok && list.contains(" etl created") && list.contains("gateway (any service)"),
        "{list}"
    );
    assert!(!list.contains(&key), "listings never show a key");
    let gateway_id = list
        .lines()
        .find(|l| l.contains("gateway"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let (ok, out, _) = cli(&r, "keys", &["revoke", &gateway_id]);
    assert!(ok && out.contains("revoked 1"), "{out}");
    ask(&format!("authorization: Bearer {gateway}\r\n")).error(401);

    let dir = r.dir.clone().unwrap();
    let err = stop_router(r);
    let mut services: Vec<String> = usage_events(&err)
        .iter()
        .filter(|e| e["status"] == 200)
        .map(|e| e["service"].as_str().unwrap().to_string())
        .collect();
    services.sort();
    assert_eq!(services, ["billing", "etl", "etl", "gateway"], "{err}");
    assert_eq!(
        usage_events(&err)
            .iter()
            .filter(|e| e["refused_by"] == "auth")
            .count(),
        3
    );
    let r = start_router(&dir, &dir.join("switchyard.toml"), free_addr(), 2);
    let again = post(
        r.addr,
        "/v1/chat/completions",
        &chat("hello"),
        &format!("authorization: Bearer {key}\r\n"),
    );
    assert_eq!(again.status, 200, "keys are kept in the data directory");
}

#[test]
fn rate_limits_refuse_with_retry_after_per_service() {
    let s = sim("s", &[]);
    let r = router(&config_for(
        &[("s", s.url())],
        "[rate_limits.services.etl]\nrequests_per_minute = 5\n[rate_limits.services.big]\ntokens_per_minute = 100\n",
    ));
    let ask = |service: &str, body: &str| {
        post(
            r.addr,
            "/v1/chat/completions",
            body,
            &format!("x-switchyard-service: {service}\r\n"),
        )
    };
    // Spread over several connections, so both workers take part.
    for i in 0..5 {
        assert_eq!(ask("etl", &chat("hello")).status, 200, "request {i}");
    }
    let refused = ask("etl", &chat("hello"));
    refused.error(429);
    assert!(
        refused.text().contains("rate_limit_exceeded") && refused.text().contains("\"requests\"")
    );
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&wait), "{wait}");
    assert_eq!(
        ask("other", &chat("hello")).status,
        200,
        "other services are not limited"
    );
    let greedy =
        r#"{"model":"auto","max_tokens":500,"messages":[{"role":"user","content":"hello"}]}"#;
    let refused = ask("big", greedy);
    refused.error(429);
    assert!(refused.text().contains("\"tokens\""), "{}", refused.text());
    // 500 tokens can never fit a limit of 100 per minute: no Retry-After to wait for.
    assert!(
        refused.text().contains("can never be admitted"),
        "{}",
        refused.text()
    );
    assert_eq!(refused.header("retry-after"), None);
    assert_eq!(ask("big", &chat("hello")).status, 200);
    eventually("status counts both refusals", || {
        cli(&r, "status", &[]).1.contains("rate limited 2")
    });
    let page = metrics(r.admin.unwrap(), Some(ADMIN_TOKEN)).text();
    assert!(
        page.contains("switchyard_rate_limited_total{service=\"etl\",limit=\"requests\"} 1"),
        "{page}"
    );
    assert!(
        page.contains("switchyard_rate_limited_total{service=\"big\",limit=\"tokens\"} 1"),
        "{page}"
    );
}

#[test]
fn rate_limited_requests_are_accepted_again_after_the_window() {
    let s = sim("s", &["--completion-tokens", "100"]);
    let r = router(&config_for(
        &[("s", s.url())],
        "[rate_limits.services.etl]\nrequests_per_minute = 60\n[rate_limits.services.big]\ntokens_per_minute = 12000\n",
    ));
    let mut c = Conn::open(r.addr);
    let mut ask = |service: &str, body: &str| {
        c.send(&post_raw(
            "/v1/chat/completions",
            body,
            &format!("x-switchyard-service: {service}\r\n"),
        ));
        c.read_response().unwrap()
    };
    // A minute's allowance of requests, then a refusal that says to wait a second.
    let mut served = 0;
    let started = Instant::now();
    let refused = loop {
        let resp = ask("etl", &chat("hello"));
        if resp.status != 200 {
            break resp;
        }
        served += 1;
        assert!(served <= 600, "the limit never bit");
    };
    // The minute's 60, and one more for each second the loop took (the allowance refills).
    let refilled = started.elapsed().as_secs() as usize + 1;
    assert!(
        (60..=61 + refilled).contains(&served),
        "{served} in {:?}",
        started.elapsed()
    );
    refused.error(429);
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(wait, 1);
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(
        ask("etl", &chat("hello")).status,
        200,
        "accepted after Retry-After"
    );
    // Tokens: each request admits about 100 + prompt, and is charged what it used.
    let body =
        r#"{"model":"auto","max_tokens":100,"messages":[{"role":"user","content":"hello"}]}"#;
    let mut served = 0;
    let refused = loop {
        let resp = ask("big", body);
        if resp.status != 200 {
            break resp;
        }
        served += 1;
        assert!(served <= 200, "the token limit never bit");
    };
    assert!(served >= 50, "{served}");
    assert!(refused.text().contains("\"tokens\""), "{}", refused.text());
    let wait: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    std::thread::sleep(Duration::from_secs(wait) + Duration::from_millis(100));
    assert_eq!(ask("big", body).status, 200, "accepted after Retry-After");
}

/// Micro-dollars of a `$0.000135`-style amount.
fn micros(usd: &str) -> u64 {
    let (whole, frac) = usd.trim_start_matches('$').split_once('.').unwrap();
    whole.parse::<u64>().unwrap() * 1_000_000 + frac.parse::<u64>().unwrap()
}

#[test]
fn kill_9_during_traffic_keeps_the_spend_clients_saw() {
    let s = sim("s", &["--completion-tokens", "7"]);
    let r = router(&config_for(&[("s", s.url())], ""));
    let stop = Arc::new(AtomicBool::new(false));
    // Per answered request: when it was answered and what it cost, from the usage it carried.
    // config_for prices: 1 USD/1M input, 2 USD/1M output => prompt + 2 * completion micros.
    let answered = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, answered, addr) = (stop.clone(), answered.clone(), r.addr);
            std::thread::spawn(move || {
                let mut c = Conn::open(addr);
                while !stop.load(Ordering::Relaxed) {
                    c.send(&post_raw(
                        "/v1/chat/completions",
                        &chat("hello"),
                        "x-switchyard-service: etl\r\n",
                    ));
                    let Some(resp) = c.read_response() else { break };
                    let u = &resp.json()["usage"];
                    let cost = u["prompt_tokens"].as_u64().unwrap()
                        + 2 * u["completion_tokens"].as_u64().unwrap();
                    answered.lock().unwrap().push((Instant::now(), cost));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    let dir = r.dir.clone().unwrap();
    let mut r = r;
    let killed_at = Instant::now();
    r.child.kill().unwrap(); // SIGKILL, with requests in flight
    r.child.wait().unwrap();
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    drop(r);
    let answered = answered.lock().unwrap();
    let settled_before: u64 = answered
        .iter()
        // A second as promised, and half a second for a loaded machine.
        .filter(|(at, _)| *at + Duration::from_millis(1500) < killed_at)
        .map(|(_, cost)| cost)
        .sum();
    let all: u64 = answered.iter().map(|(_, cost)| cost).sum();
    assert!(answered.len() > 100, "traffic flowed: {}", answered.len());
    let r = start_router(&dir, &dir.join("switchyard.toml"), free_addr(), 2);
    let (ok, out, err) = cli(&r, "spend", &["--service", "etl"]);
    assert!(ok, "{err}");
    let stored = micros(
        out.lines()
            .last()
            .unwrap()
            .split_whitespace()
            .last()
            .unwrap(),
    );
    assert!(
        stored >= settled_before && stored <= all,
        "stored {stored}, settled a second before the kill {settled_before}, observed {all}"
    );
}
