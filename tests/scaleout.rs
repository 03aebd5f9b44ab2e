//! One control plane, remote data planes: snapshots follow, usage arrives once, budgets are
//! leased, and a data plane keeps serving while its control plane is away.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn addr() -> SocketAddr {
    format!("127.0.0.1:{}", free_port()).parse().unwrap()
}

/// Runs `switchyard <args>` in `dir` and waits until `port` listens.
fn spawn(dir: &Path, args: &[&str], port: SocketAddr) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(dir)
        .env("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(port, &mut child);
    Proc {
        child,
        addr: port,
        admin: None,
        dir: Some(dir.to_path_buf()),
    }
}

fn control(dir: &Path, admin: SocketAddr) -> Proc {
    let config = dir.join("switchyard.toml");
    spawn(
        dir,
        &[
            "control",
            "--config",
            config.to_str().unwrap(),
            "--admin-listen",
            &admin.to_string(),
        ],
        admin,
    )
}

fn cli(admin: SocketAddr, command: &str, rest: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg(command)
        .args(["--admin", &format!("http://{admin}")])
        .args(rest)
        .env("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Requests of `service` in today's spend, summed over its rows.
fn spent_requests(admin: SocketAddr, service: &str) -> u64 {
    cli(admin, "spend", &["--service", service])
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some(service))
        .map(|l| l.split_whitespace().nth(5).unwrap().parse::<u64>().unwrap())
        .sum()
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
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
        "[budgets.services.etl]\ndaily_usd = 1.0\n[budgets.services.tight]\ndaily_usd = 0.000001\n",
    );
    std::fs::write(dir.join("switchyard.toml"), &base).unwrap();
    let admin = addr();
    let c = control(&dir, admin);
    let data_dir = dir.join("dp");
    std::fs::create_dir_all(&data_dir).unwrap();
    let listen = addr();
    let dp = spawn(
        &data_dir,
        &[
            "data",
            "--control",
            &format!("http://{admin}"),
            "--listen",
            &listen.to_string(),
            "--workers",
            "2",
            "--name",
            "dp1",
        ],
        listen,
    );
    let ask = |service: &str| {
        post(
            listen,
            "/v1/chat/completions",
            &chat("hello"),
            &format!("x-switchyard-service: {service}\r\n"),
        )
    };
    // Budgets come from leases the control plane grants.
    eventually("the etl budget lease arrives", || ask("etl").status == 200);
    for _ in 0..4 {
        let r = ask("etl");
        assert_eq!(
            (r.status, r.header("x-switchyard-config-version")),
            (200, Some("1"))
        );
    }
    ask("tight").error(429);
    eventually("usage reaches the control plane", || {
        spent_requests(admin, "etl") >= 5
    });

    // A new config reaches the data plane.
    let changed = dir.join("v2.toml");
    std::fs::write(&changed, base.clone() + "[routing]\nmax_attempts = 2\n").unwrap();
    cli(admin, "config", &["apply", changed.to_str().unwrap()]);
    eventually("version 2 reaches the data plane", || {
        ask("other").header("x-switchyard-config-version") == Some("2")
    });
    // Reported (every 200 ms) and on disk (every 250 ms) before the kill.
    std::thread::sleep(Duration::from_millis(1200));
    let before = spent_requests(admin, "etl");
    let other_before = spent_requests(admin, "other");

    // The control plane dies: the data plane serves on, buffering its usage.
    drop(c);
    for _ in 0..5 {
        assert_eq!(ask("etl").status, 200);
    }
    let c = control(&dir, admin);
    eventually("buffered usage arrives after the reconnect", || {
        spent_requests(admin, "etl") >= before + 5
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(spent_requests(admin, "etl"), before + 5, "counted once");
    assert_eq!(spent_requests(admin, "other"), other_before);
    drop((dp, c));
}
