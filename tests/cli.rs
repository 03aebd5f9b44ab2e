//! The command line: config validation, the busy-port check, the epoll driver, classify.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

/// Runs the CLI in the temporary directory, so nothing it writes lands in the checkout.
fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap()
}

fn write_config(text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "switchyard-cli-{}-{}.toml",
        std::process::id(),
        free_port()
    ));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_config_prints_the_table_or_every_error() {
    let good = write_config(&config_for(&[("a", "http://127.0.0.1:9".to_string())], ""));
    let out = switchyard(&["check-config", good.to_str().unwrap()]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(": OK") && text.contains("0 a: a/a-model"),
        "{text}"
    );

    let bad = write_config("[listener]\nadress = \"x\"\n");
    let out = switchyard(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(bad.to_str().unwrap()) && err.contains("adress"),
        "{err}"
    );

    let wrong = write_config(&config_for(
        &[("a", "ftp://x".to_string())],
        "[categories]\ncode = \"nope\"\n",
    ));
    let err =
        String::from_utf8_lossy(&switchyard(&["check-config", wrong.to_str().unwrap()]).stderr)
            .into_owned();
    assert!(
        err.contains("backends[0] (a).url") && err.contains("categories.code: unknown tier `nope`"),
        "{err}"
    );
    let missing = switchyard(&["check-config", "/nonexistent/switchyard.toml"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read"));

    // A CA file that looks like PEM but holds no usable certificate fails here, not at start.
    let ca = good.with_file_name("ca.pem");
    std::fs::write(
        &ca,
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let tls = write_config(
        &config_for(&[("a", "https://127.0.0.1:9".to_string())], "").replace(
            "first_byte_timeout_ms",
            &format!("tls_ca_file = \"{}\"\nfirst_byte_timeout_ms", ca.display()),
        ),
    );
    let out = switchyard(&["check-config", tls.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(tls.to_str().unwrap())
            && err.contains("tls_ca_file")
            && err.contains("certificate"),
        "{err}"
    );
}

#[test]
fn output_to_a_reader_that_went_away_is_no_failure() {
    let good = write_config(&config_for(&[("a", "http://127.0.0.1:9".to_string())], ""));
    // A pipe whose reading end is closed before anything is written (`| head -0`).
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check-config", good.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_busy_port_fails_loudly_instead_of_sharing() {
    let s = sim("s", &[]);
    let config = config_for(&[("s", s.url())], "[listener]\nio_driver = \"epoll\"\n");
    let first = router(&config);
    // The epoll driver serves like io_uring does.
    assert_eq!(
        post(first.addr, "/v1/chat/completions", &chat("hello"), "").status,
        200
    );
    let path = write_config(&config);
    let out = switchyard(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--listen",
        &first.addr.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("cannot listen on {}", first.addr)),
        "{err}"
    );
    // More workers than request ids can tell apart: refused before anything starts.
    let out = switchyard(&[
        "serve",
        "--config",
        path.to_str().unwrap(),
        "--workers",
        "2000",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("from 1 to 1024"), "{err}");
}

#[test]
fn admin_options_may_follow_the_action() {
    // Parsed (clap would exit 2): the file is read and found missing.
    let out = switchyard(&[
        "config",
        "apply",
        "/nonexistent.toml",
        "--admin",
        "http://127.0.0.1:1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("/nonexistent.toml: cannot read"), "{err}");
}

#[test]
fn the_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/switchyard.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check-config", example])
        .env("OPENAI_API_KEY", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn classify_reads_jsonl_and_writes_one_line_each() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("classify")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = r#"{"id":"a","messages":[{"role":"user","content":"Translate into French: good morning"}]}"#;
    let rest = concat!(
        r#"{"id":7,"body":{"model":"auto","messages":[{"role":"user","content":"Write a Python function that merges two sorted lists."}]}}"#,
        "\n",
        r#"{"id":"c","body":{"model":"auto","prompt":"Translate into German: thank you"}}"#,
        "\n",
        "\n",
        r#"{"id":"bad"}"#,
        "\n",
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&[first.as_bytes(), b"\n\xff\xfe not UTF-8\n", rest.as_bytes()].concat())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "a bad line fails the run but not the others"
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // One line per input line (the blank one aside), a bad one as an error.
    assert_eq!(lines.len(), 5);
    assert!(lines[1]["error"].as_str().unwrap().contains("not UTF-8"));
    assert_eq!(
        (lines[3]["id"].as_str(), lines[3]["category"].as_str()),
        (Some("c"), Some("translation")),
        "a completion's body is classified by its prompt"
    );
    assert_eq!(lines[4]["id"], "bad");
    assert!(lines[4]["error"].as_str().unwrap().contains("messages"));
    let lines = [&lines[0], &lines[2]];
    assert_eq!(
        (
            lines[0]["id"].as_str(),
            lines[0]["category"].as_str(),
            lines[0]["tier_rank"].as_u64()
        ),
        (Some("a"), Some("translation"), Some(0))
    );
    assert_eq!(
        (lines[1]["id"].as_u64(), lines[1]["category"].as_str()),
        (Some(7), Some("code"))
    );
    for key in ["confidence", "rule", "tier"] {
        assert!(lines[1].get(key).is_some(), "{key}");
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 2: not UTF-8") && err.contains("line 6"),
        "{err}"
    );
}

#[test]
fn classify_needs_no_backend_secrets() {
    // `a-extra` is served but in no tier.
    let config = write_config(
        &config_for(&[("a", "http://127.0.0.1:9".to_string())], "")
            .replace(
                "first_byte_timeout_ms",
                "api_key_env = \"SWITCHYARD_TEST_NEVER_SET\"\nfirst_byte_timeout_ms",
            )
            .replace("}]", "}, { name = \"a-extra\" }]"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["classify", "--config", config.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            concat!(
                r#"{"id":1,"messages":[{"role":"user","content":"hi"}]}"#,
                "\n",
                r#"{"id":2,"body":{"model":"a-extra","messages":[{"role":"user","content":"hi"}]}}"#
            )
            .as_bytes(),
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["tier"], "a");
    // A model in no tier: no tier to name (not the cheapest one).
    assert!(
        lines[1]["tier"].is_null() && lines[1]["tier_rank"].is_null(),
        "{}",
        lines[1]
    );
}

#[test]
fn serving_raises_the_open_files_limit_to_the_hard_limit() {
    let s = sim("s", &[]);
    // A data directory of its own: other tests' routers started in the same directory would
    // hold the default one.
    let data = std::env::temp_dir().join(format!("switchyard-nofile-{}", free_port()));
    let storage = format!("[storage]\ndata_dir = \"{}\"\n", data.display());
    let path = write_config(&config_for(&[("s", s.url())], &storage));
    let addr = free_addr();
    let mut child = Command::new("bash")
        .args([
            "-c",
            r#"ulimit -Sn 256 && exec "$0" serve --config "$1" --listen "$2" --admin-listen "$3""#,
            env!("CARGO_BIN_EXE_switchyard"),
            path.to_str().unwrap(),
            &addr.to_string(),
            &free_addr().to_string(),
        ])
        .current_dir(std::env::temp_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(_)) = child.try_wait() {
            let out = child.wait_with_output().unwrap();
            panic!("exited: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(std::time::Instant::now() < deadline, "never listened");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    // "Max open files  SOFT  HARD  files"
    assert_eq!(fields[3], fields[4], "{line}");
}
