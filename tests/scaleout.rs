//! One control plane, remote data planes: snapshots follow, usage arrives once, budgets are
//! leased, and a data plane keeps serving while its control plane is away.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// A backend whose key the control plane and `dp1` have in their environment, `dp2` not.
const KEY_ENV: &str = "SWITCHYARD_SCALEOUT_TEST_KEY";

fn control(dir: &Path, admin: SocketAddr) -> Proc {
    let config = dir.join("switchyard.toml");
    spawn_switchyard_with_env(
        dir,
        &[
            "control",
            "--config",
            config.to_str().unwrap(),
            "--admin-listen",
            &admin.to_string(),
        ],
        &[admin],
        &[(KEY_ENV, "sk-test")],
    )
}

fn cli(admin: SocketAddr, command: &str, rest: &[&str]) -> String {
    let (ok, out, err) = admin_cli(admin, ADMIN_TOKEN, command, rest);
    assert!(ok, "{err}");
    out
}

/// Requests of `service` in today's spend, summed over its rows.
fn spent_requests(admin: SocketAddr, service: &str) -> u64 {
    cli(admin, "spend", &["--service", service])
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(service))
        .map(|l| l.split_whitespace().nth(5).unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn remote_data_planes_follow_report_and_survive_their_control_plane() {
    let s = sim("s", &["--completion-tokens", "5"]);
    let dir = std::env::temp_dir().join(format!(
        "switchyard-scaleout-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let base = config_for(
        &[("s", s.url())],
        "[budgets]\ndefault_daily_usd = 1.0\n[budgets.services.etl]\ndaily_usd = 1.0\n[budgets.services.tight]\ndaily_usd = 0.000001\n[budgets.services.unused]\ndaily_usd = 1.0\n[budgets.services.large]\ndaily_usd = 10.0\n[rate_limits.services.capped]\nrequests_per_minute = 4\n[rate_limits.services.tpm]\ntokens_per_minute = 1000\n",
    );
    std::fs::write(dir.join("switchyard.toml"), &base).unwrap();
    let admin = free_addr();
    let c = control(&dir, admin);
    let data_plane = |name: &str| {
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir).unwrap();
        let listen = free_addr();
        let control = format!("http://{admin}");
        let args = [
            "data",
            "--control",
            &control,
            "--listen",
            &listen.to_string(),
            "--workers",
            "2",
            "--name",
            name,
        ];
        let env: &[_] = if name == "dp1" {
            &[(KEY_ENV, "sk-test")]
        } else {
            &[]
        };
        spawn_switchyard_with_env(&data_dir, &args, &[listen], env)
    };
    // Each data plane's config, as `status` shows it.
    let serves = |status: &str, name: &str, version: u64| {
        status.lines().any(|l| {
            l.starts_with(&format!("data plane `{name}` ("))
                && l.contains(&format!("serves version {version}"))
        })
    };
    let (dp1, dp2) = (data_plane("dp1"), data_plane("dp2"));
    // The data planes hold only the data-plane token: it cannot change anything.
    let (ok, _, err) = admin_cli(admin, DATA_PLANE_TOKEN, "status", &[]);
    assert!(!ok && err.contains("admin token"), "{err}");
    let (ok, _, err) = admin_cli(admin, DATA_PLANE_TOKEN, "budgets", &["set", "etl", "100"]);
    assert!(!ok && err.contains("admin token"), "{err}");
    assert!(admin_cli(admin, DATA_PLANE_TOKEN, "budgets", &[]).0);
    // The control plane alone knows nothing of the backends' health: it reports none.
    let status = cli(admin, "status", &[]);
    assert!(
        status.contains("control plane only") && !status.contains("backend s"),
        "{status}"
    );
    eventually("both data planes report version 1", || {
        let status = cli(admin, "status", &[]);
        serves(&status, "dp1", 1) && serves(&status, "dp2", 1)
    });
    let ask = |dp: &Proc, service: &str| {
        post(
            dp.addr,
            "/v1/chat/completions",
            &chat("hello"),
            &format!("x-switchyard-service: {service}\r\n"),
        )
    };
    // A service with only the default budget: its first request waits for the lease, not 429.
    let first = ask(&dp1, "fresh");
    assert_eq!(
        (first.status, first.header("x-switchyard-budget")),
        (200, None),
        "{}",
        first.text()
    );
    // Budgets come from leases the control plane grants.
    for dp in [&dp1, &dp2] {
        eventually("the etl budget lease arrives", || {
            ask(dp, "etl").status == 200
        });
        for _ in 0..4 {
            let r = ask(dp, "etl");
            assert_eq!(
                (r.status, r.header("x-switchyard-config-version")),
                (200, Some("1"))
            );
        }
        let tight = ask(dp, "tight");
        let message = tight.error(429)["message"].as_str().unwrap().to_string();
        assert!(message.contains("granted this data plane"), "{message}");
    }
    // A request whose worst case (about $2) is more than a data plane asks for at a time
    // (four $0.05 leases per worker): it asks for what it needs instead of being refused.
    let body =
        r#"{"model":"auto","max_tokens":1000000,"messages":[{"role":"user","content":"hello"}]}"#;
    let large = post(
        dp1.addr,
        "/v1/chat/completions",
        body,
        "x-switchyard-service: large\r\n",
    );
    assert_eq!(
        (large.status, large.header("x-switchyard-budget")),
        (200, None),
        "{}",
        large.text()
    );
    // A rate limit holds across data planes: the control plane grants its allowance, plus
    // the first request of each data plane on credit.
    let started = Instant::now();
    let ask_both = || {
        [&dp1, &dp2]
            .iter()
            .filter(|dp| ask(dp, "capped").status == 200)
            .count()
    };
    let mut served = 0;
    eventually("the minute's allowance of 4 is served", || {
        served += ask_both();
        served >= 4
    });
    for _ in 0..3 {
        served += ask_both();
    }
    // Then no more than the allowance and the credit (plus what refills meanwhile).
    let refilled = (started.elapsed().as_secs() / 15) as usize;
    assert!(served <= 6 + refilled, "{served} served at 4 per minute");
    // A service's first request needs more tokens than a data plane holds on credit: it waits
    // for the control plane's grant instead of a 429 (the control plane has a minute's 1,000).
    let words = "word ".repeat(150);
    let body = format!(
        r#"{{"model":"auto","max_tokens":10,"messages":[{{"role":"user","content":"{words}"}}]}}"#
    );
    for dp in [&dp1, &dp2] {
        let r = post(
            dp.addr,
            "/v1/chat/completions",
            &body,
            "x-switchyard-service: tpm\r\n",
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // Spend from both data planes adds up at the control plane.
    eventually("usage of both reaches the control plane", || {
        spent_requests(admin, "etl") >= 10
    });

    // A new config reaches both data planes.
    let changed = dir.join("v2.toml");
    let v2 = base.clone() + "[routing]\nmax_attempts = 2\n";
    std::fs::write(&changed, &v2).unwrap();
    // The apply answers once both have it in effect.
    let applied = cli(admin, "config", &["apply", changed.to_str().unwrap()]);
    assert!(
        serves(&applied, "dp1", 2) && serves(&applied, "dp2", 2),
        "{applied}"
    );
    for dp in [&dp1, &dp2] {
        assert_eq!(
            ask(dp, "other").header("x-switchyard-config-version"),
            Some("2")
        );
    }
    // A config one data plane cannot load (its environment lacks a backend's key): the
    // apply says so and fails; that data plane serves on with version 2.
    let keyed = dir.join("v3.toml");
    let backend = format!("[[backends]]\nname = \"keyed\"\nurl = \"http://127.0.0.1:9\"\napi_key_env = \"{KEY_ENV}\"\nmodels = [{{ name = \"m\" }}]\n");
    std::fs::write(&keyed, v2 + &backend).unwrap();
    let (ok, out, err) = admin_cli(
        admin,
        ADMIN_TOKEN,
        "config",
        &["apply", keyed.to_str().unwrap()],
    );
    assert!(!ok, "{out}");
    assert!(
        err.contains("config version 3 is applied, but not every data plane took it")
            && serves(&err, "dp1", 3)
            && err.contains("data plane `dp2` (")
            && err.contains("serves version 2; refused version 3:")
            && err.contains(KEY_ENV),
        "{err}"
    );
    assert_eq!(
        ask(&dp2, "other").header("x-switchyard-config-version"),
        Some("2")
    );
    let status = cli(admin, "status", &[]);
    assert!(
        serves(&status, "dp1", 3) && status.contains("refused version 3:"),
        "{status}"
    );
    // Reported (every 200 ms) and committed before the kill.
    std::thread::sleep(Duration::from_millis(1200));
    let before = spent_requests(admin, "etl");
    let other_before = spent_requests(admin, "other");

    // The control plane dies: the data planes serve on, buffering their usage.
    drop(c);
    for _ in 0..5 {
        assert_eq!(ask(&dp1, "etl").status, 200);
        assert_eq!(ask(&dp2, "etl").status, 200);
    }
    let c = control(&dir, admin);
    // Reconnected, both follow again (and take the file's config, which both can load).
    eventually(
        "both data planes follow the restarted control plane",
        || {
            let status = cli(admin, "status", &[]);
            let version = status
                .split_whitespace()
                .nth(2)
                .and_then(|v| v.trim_end_matches(';').parse().ok())
                .unwrap_or(0);
            serves(&status, "dp1", version) && serves(&status, "dp2", version)
        },
    );
    // The restarted control plane remembers what it granted: the data planes' leases still
    // count against the etl budget.
    let budgets = cli(admin, "budgets", &[]);
    let etl = budgets
        .lines()
        .find(|l| l.starts_with("etl: "))
        .expect(&budgets);
    let reserved = |line: &str| {
        line.split(", ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_string()
    };
    assert_ne!(reserved(etl), "$0.000000", "{budgets}");
    // A budget no data plane served a request of is not leased to them.
    let unused = budgets
        .lines()
        .find(|l| l.starts_with("unused: "))
        .expect(&budgets);
    assert_eq!(reserved(unused), "$0.000000", "{budgets}");
    eventually("buffered usage arrives after the reconnect", || {
        spent_requests(admin, "etl") >= before + 10
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(spent_requests(admin, "etl"), before + 10, "counted once");
    assert_eq!(spent_requests(admin, "other"), other_before);
    // A data plane that stops gives back what it was granted and did not use (a restarted
    // one would otherwise find the budget held by its predecessor until the day ends).
    let etl_reserved = || {
        let budgets = cli(admin, "budgets", &[]);
        let etl = budgets.lines().find(|l| l.starts_with("etl: ")).unwrap();
        reserved(etl)[1..].parse::<f64>().unwrap()
    };
    let held = etl_reserved();
    let err = stop_router(dp1);
    assert!(err.contains("gave back $"), "{err}");
    assert!(etl_reserved() < held, "{held} {err}");
    drop((dp2, c));
}

#[test]
fn a_data_plane_with_a_refused_token_exits_saying_so() {
    let s = sim("s", &[]);
    let dir = std::env::temp_dir().join(format!(
        "switchyard-refused-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("switchyard.toml"),
        config_for(&[("s", s.url())], ""),
    )
    .unwrap();
    let admin = free_addr();
    let _control = control(&dir, admin);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "data",
            "--control",
            &format!("http://{admin}"),
            "--listen",
            &free_addr().to_string(),
        ])
        .current_dir(&dir)
        .env("SWITCHYARD_DATA_PLANE_TOKEN", "not-the-token")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refuses this data plane"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
