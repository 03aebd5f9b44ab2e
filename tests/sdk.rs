//! The official OpenAI Python SDK against the router (non-streaming, streaming, errors).
//! `.ci/run` installs the SDK; elsewhere the test says it skipped when python3 or the SDK is
//! missing.

mod common;

use common::*;
use std::process::Command;

#[test]
fn openai_python_sdk_works_through_the_router() {
    let has_sdk = Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_sdk {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install the openai SDK (pip install openai)"
        );
        eprintln!("skipped: python3 with the `openai` package is not installed");
        return;
    }
    let small = sim("sim-small", &[]);
    let large = sim("sim-large", &[]);
    let config = config_for(
        &[("sim-small", small.url()), ("sim-large", large.url())],
        "[routing]\nunknown_model = \"reject\"\n",
    );
    let r = router(&config);
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_sdk.py"))
        .arg(r.url())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
