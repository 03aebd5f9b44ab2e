//! `switchyard`: the command line. Owns: parsing arguments, loading config (or the demo),
//! and handing over to the planes. Must not: contain routing or serving logic.

mod demo;

use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use switchyard_shared::config;
use switchyard_shared::openai::{Endpoint, RequestView};
use switchyard_shared::routing::{Plan, Priority, RequestFacts, RoutingTable};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Self-hosted LLM cost-optimising router",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router (the default command).
    Serve(ServeArgs),
    /// Classify JSONL from stdin: each line `{"id", "messages"}` or `{"id", "body"}`.
    Classify {
        /// Config whose classifier keywords and tiers to use; default: the demo config.
        #[arg(long)]
        config: Option<String>,
    },
    /// Validate a config file and print the resolved routing table.
    CheckConfig { file: String },
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// Config file; without one, a demo starts (local Ollama/vLLM if found, else simulated backends).
    #[arg(long)]
    config: Option<String>,
    /// Override `listener.address`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `listener.workers`.
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(args),
        Some(Command::CheckConfig { file }) => match config::load_file(&file) {
            Ok(table) => {
                print!("{file}: OK\n{}", table.describe());
                ExitCode::SUCCESS
            }
            Err(errors) => fail(&errors),
        },
        Some(Command::Classify { config }) => classify(config),
    }
}

fn fail(errors: &[String]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    ExitCode::FAILURE
}

fn serve(args: ServeArgs) -> ExitCode {
    let (loaded, demo) = match &args.config {
        Some(path) => (config::load_file(path), None),
        None => match demo::build() {
            Ok(d) => (
                config::load_str(&d.config, "<demo config>", &|_| None),
                Some(d.description),
            ),
            Err(e) => return fail(&[format!("cannot start the demo backends: {e}")]),
        },
    };
    let mut table = match loaded {
        Ok(t) => t,
        Err(errors) => return fail(&errors),
    };
    if let Some(addr) = args.listen {
        table.listener.address = addr;
    }
    if let Some(n) = args.workers {
        table.listener.workers = n.max(1);
    }
    let workers = table.listener.workers;
    let code = switchyard_controlplane::serve(table, |dp| {
        println!(
            "Switchyard {} listening on http://{} ({workers} workers, {} I/O driver)",
            env!("CARGO_PKG_VERSION"),
            dp.address,
            dp.driver
        );
        if let Some(d) = &demo {
            println!("{d}");
        }
        println!(
            "Try it:\n  curl -s http://{}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\":\"auto\",\"messages\":[{{\"role\":\"user\",\"content\":\"Summarise: the meeting moved to Friday.\"}}]}}' -i",
            dp.address
        );
        let _ = std::io::stdout().flush();
    });
    ExitCode::from(code as u8)
}

fn classify(config_path: Option<String>) -> ExitCode {
    let table = match &config_path {
        Some(path) => config::load_file(path),
        None => config::load_str(
            &demo::SIMULATED
                .replace("{LOCAL}", "127.0.0.1:1")
                .replace("{CLOUD}", "127.0.0.1:2"),
            "<demo config>",
            &|_| None,
        ),
    };
    let table = match table {
        Ok(t) => t,
        Err(errors) => return fail(&errors),
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut failed = false;
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = match line {
            Ok(l) if l.trim().is_empty() => continue,
            Ok(l) => l,
            Err(e) => return fail(&[format!("stdin: {e}")]),
        };
        match classify_line(&table, &line) {
            Ok(result) => {
                let _ = writeln!(out, "{result}");
            }
            Err(e) => {
                eprintln!("error: line {}: {e}", n + 1);
                failed = true;
            }
        }
    }
    let _ = out.flush();
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn classify_line(table: &RoutingTable, line: &str) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
    let body = match (v.get("body"), v.get("messages")) {
        (Some(body), _) => body.to_string(),
        (None, Some(messages)) => serde_json::json!({ "messages": messages }).to_string(),
        (None, None) => return Err("needs `messages` or `body`".into()),
    };
    let view =
        RequestView::parse(Endpoint::ChatCompletions, body.as_bytes()).map_err(|e| e.message)?;
    let c = table.classifier.classify(&view.prompt());
    let facts = RequestFacts {
        service: "default",
        priority: Priority::Normal,
        model: view.model.as_deref().unwrap_or("auto"),
        path: Endpoint::ChatCompletions.path(),
        pinned_tier: None,
        category: c.category,
        alternative: c.alternative,
        long_context: c.long_context,
        classified: true,
    };
    let rank = match table.decide(&facts).map_err(|e| format!("{e:?}"))?.plan {
        Plan::FromTier(rank) => rank,
        Plan::Targets(ids) => ids
            .first()
            .and_then(|&id| table.tiers.iter().position(|t| t.targets.contains(&id)))
            .unwrap_or(0),
    };
    Ok(serde_json::json!({
        "id": id,
        "category": c.category.as_str(),
        "confidence": c.confidence,
        "rule": c.rule,
        "alternative": c.alternative.map(|a| a.as_str()),
        "long_context": c.long_context,
        "tier": table.tiers[rank].name,
        "tier_rank": rank,
    }))
}
