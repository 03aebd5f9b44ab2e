//! The demo default for `switchyard serve` without a config: use a local Ollama or vLLM if
//! one answers, otherwise start simulated backends inside the process.
//! Must not: be used when the operator gave a config file.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The embedded demo config; `{LOCAL}` and `{CLOUD}` become the simulators' addresses.
/// Prices are illustrative: a local 8B/32B pair and a frontier cloud model.
pub const SIMULATED: &str = r#"
[[backends]]
name = "local-sim"
url = "http://{LOCAL}"
models = [
  { name = "small-8b", input_per_mtok = 0.05, output_per_mtok = 0.10 },
  { name = "medium-32b", input_per_mtok = 0.30, output_per_mtok = 0.60 },
]

[[backends]]
name = "cloud-sim"
url = "http://{CLOUD}"
models = [{ name = "frontier-large", input_per_mtok = 2.50, cached_input_per_mtok = 1.25, output_per_mtok = 10.00 }]

[[tiers]]
name = "small"
targets = ["local-sim/small-8b"]

[[tiers]]
name = "medium"
targets = ["local-sim/medium-32b"]

[[tiers]]
name = "large"
targets = ["cloud-sim/frontier-large"]
"#;

pub struct Demo {
    pub config: String,
    /// What the banner says about where answers come from.
    pub description: String,
}

/// Model ids from `GET {path}` on a local port, or `None` if nothing OpenAI-like answers fast.
fn probe_models(port: u16, path: &str) -> Option<Vec<String>> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    // Chunked bodies: the JSON object sits between the first `{` and the last `}`.
    let json = &body[body.find('{')?..=body.rfind('}')?];
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let ids: Vec<String> = v["data"]
        .as_array()?
        .iter()
        .filter_map(|m| m["id"].as_str().map(String::from))
        .collect();
    (!ids.is_empty()).then_some(ids)
}

/// Embedding models answer only /v1/embeddings: served by name, kept out of the chat tier.
/// Known by their names (Ollama's and Hugging Face's embedding models say so, or are of
/// these families).
fn is_embedding_model(id: &str) -> bool {
    let id = id.to_ascii_lowercase();
    ["embed", "bge-", "bge:", "minilm", "e5-"]
        .iter()
        .any(|marker| id.contains(marker))
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

pub fn build() -> std::io::Result<Demo> {
    let mut found = Vec::new();
    for (name, port) in [("ollama", 11434u16), ("vllm", 8000)] {
        if let Some(models) = probe_models(port, "/v1/models") {
            found.push((name, port, models));
        }
    }
    let targets: Vec<String> = found
        .iter()
        .flat_map(|(name, _, models)| {
            models
                .iter()
                .filter(|m| !is_embedding_model(m))
                .map(move |m| toml_string(&format!("{name}/{m}")))
        })
        .collect();
    // Embedding models alone make no chat tier: the simulated demo then.
    if !targets.is_empty() {
        let mut config = String::new();
        for (name, port, models) in &found {
            let list: Vec<String> = models
                .iter()
                .map(|m| format!("{{ name = {} }}", toml_string(m)))
                .collect();
            config.push_str(&format!("[[backends]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:{port}/\"\nmodels = [{}]\n\n", list.join(", ")));
        }
        config.push_str(&format!(
            "[[tiers]]\nname = \"local\"\ntargets = [{}]\n",
            targets.join(", ")
        ));
        let description = found
            .iter()
            .map(|(n, p, m)| format!("{n} on 127.0.0.1:{p} ({})", m.join(", ")))
            .collect::<Vec<_>>()
            .join("; ");
        return Ok(Demo {
            config,
            description: format!("found local backends: {description}"),
        });
    }
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut local = switchyard_sim::SimConfig::named("local-sim", any);
    local.models = vec!["small-8b".into(), "medium-32b".into()];
    local.tokens_per_second = 40.0;
    let mut cloud = switchyard_sim::SimConfig::named("cloud-sim", any);
    cloud.models = vec!["frontier-large".into()];
    cloud.tokens_per_second = 80.0;
    cloud.latency_ms = 150;
    let local = switchyard_sim::spawn(local)?;
    let cloud = switchyard_sim::spawn(cloud)?;
    Ok(Demo {
        config: SIMULATED.replace("{LOCAL}", &local.to_string()).replace("{CLOUD}", &cloud.to_string()),
        description: format!(
            "DEMO MODE: no config file and no Ollama (127.0.0.1:11434) or vLLM (127.0.0.1:8000) answered,\n\
             so answers come from SIMULATED backends inside this process (local-sim on {local}, cloud-sim on {cloud}).\n\
             Point Switchyard at real models with `switchyard serve --config switchyard.toml` (see examples/switchyard.toml)."
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_models_are_known_by_name() {
        for id in [
            "nomic-embed-text:latest",
            "mxbai-embed-large",
            "BAAI/bge-m3",
            "bge:latest",
            "all-minilm",
            "intfloat/e5-large-v2",
            "text-embedding-3-small",
        ] {
            assert!(is_embedding_model(id), "{id}");
        }
        for id in [
            "llama3.1:8b",
            "qwen2.5-coder:32b",
            "mistral-nemo",
            "gemma2:27b",
            "deepseek-r1:14b",
        ] {
            assert!(!is_embedding_model(id), "{id}");
        }
    }
}
