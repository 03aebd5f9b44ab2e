//! `switchyard`: the command line. Owns: parsing arguments, loading config (or the demo),
//! and handing over to the planes. Must not: contain routing or serving logic.

mod demo;

use clap::{Args, Parser, Subcommand};
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use switchyard_controlplane::{client, token_from_env, TokenSource};
use switchyard_dataplane::snapshot::tls_configs;
use switchyard_shared::config::{self, MAX_WORKERS};
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
    /// Run only the control plane (config, spend, budgets, keys, admin API) for remote data planes.
    Control(ServeArgs),
    /// Run only a data plane, following the control plane at --control.
    Data(DataArgs),
    /// Classify JSONL from stdin: each line `{"id", "messages"}` or `{"id", "body"}`.
    Classify {
        /// Config whose classifier keywords and tiers to use; default: the demo config.
        #[arg(long)]
        config: Option<String>,
    },
    /// Validate a config file and print the resolved routing table.
    CheckConfig { file: String },
    /// Show the running router's config version, traffic, cache and backends.
    Status(AdminArgs),
    /// Show spend per service, category, tier and model for a day.
    Spend {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this service.
        #[arg(long, default_value = "")]
        service: String,
        /// YYYY-MM-DD in the budget time zone; default: today.
        #[arg(long, default_value = "")]
        day: String,
    },
    /// Show today's budgets, or set or clear one.
    Budgets {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: Option<BudgetAction>,
    },
    /// Validate or apply a config on the running router.
    Config {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Create, list or revoke API keys (used when `auth.required` is on).
    Keys {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Manage the running router's response cache.
    Cache {
        #[command(flatten)]
        admin: AdminArgs,
        #[command(subcommand)]
        action: CacheAction,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Create a key for SERVICE; it is printed once and stored only as a hash.
    Create {
        service: String,
        /// Let the key name any service in `x-switchyard-service`.
        #[arg(long)]
        any_service: bool,
    },
    List,
    /// Revoke the key(s) whose id starts with ID (at least 6 hex digits).
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum CacheAction {
    /// Drop every stored answer.
    Purge,
}

#[derive(Args, Clone)]
struct DataArgs {
    /// The control plane's admin API, e.g. http://10.0.0.5:8081 (token:
    /// $SWITCHYARD_DATA_PLANE_TOKEN, else $SWITCHYARD_ADMIN_TOKEN or <--data-dir>/admin-token).
    #[arg(long)]
    control: String,
    #[arg(long, default_value = "switchyard-data")]
    data_dir: String,
    /// Override `listener.address` of the control plane's config.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `listener.workers` (1 to 1024).
    #[arg(long, value_parser = parse_workers)]
    workers: Option<usize>,
    /// This data plane's name at the control plane; default: hostname and process id.
    #[arg(long)]
    name: Option<String>,
    /// Usage records held until reported (sent every 200 ms; more while the control plane is
    /// unreachable); beyond this many, records are dropped and counted.
    #[arg(long, default_value_t = 1_000_000)]
    usage_buffer: usize,
}

#[derive(Subcommand)]
enum BudgetAction {
    /// Set a daily budget in USD (kept across restarts; wins over the config file's).
    Set {
        service: String,
        daily_usd: f64,
        #[arg(long, default_value = "")]
        category: String,
    },
    /// Remove a budget set with `set`, returning to the config file's.
    Clear {
        service: String,
        #[arg(long, default_value = "")]
        category: String,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Check a config against the running router without applying it.
    Validate { file: String },
    /// Apply a config: all of it, atomically, or nothing if it has errors.
    Apply { file: String },
}

/// How the CLI reaches the control API.
#[derive(Args, Clone)]
struct AdminArgs {
    /// Control API address; default `$SWITCHYARD_ADMIN_URL`, else http://127.0.0.1:8081.
    /// (Global: also after the action, as in `config apply FILE --admin URL`.)
    #[arg(long, global = true)]
    admin: Option<String>,
    /// Where to find `admin-token` when `$SWITCHYARD_ADMIN_TOKEN` is unset.
    #[arg(long, default_value = "switchyard-data", global = true)]
    data_dir: String,
}

impl AdminArgs {
    fn resolve(&self) -> Result<client::Admin, String> {
        let url = self
            .admin
            .clone()
            .or_else(|| std::env::var("SWITCHYARD_ADMIN_URL").ok())
            .unwrap_or_else(|| "http://127.0.0.1:8081".into());
        let token = match token_from_env("SWITCHYARD_ADMIN_TOKEN") {
            Some(t) => t,
            None => {
                let path = std::path::Path::new(&self.data_dir).join("admin-token");
                std::fs::read_to_string(&path)
                    .map(|t| t.trim().to_string())
                    .map_err(|e| {
                        format!(
                            "no admin token: set SWITCHYARD_ADMIN_TOKEN or pass --data-dir ({}: {e})",
                            path.display()
                        )
                    })?
            }
        };
        Ok(client::Admin { url, token })
    }
}

#[derive(Args, Clone, Default)]
struct ServeArgs {
    /// Config file; without one, a demo starts (local Ollama/vLLM if found, else simulated backends).
    #[arg(long)]
    config: Option<String>,
    /// Override `listener.address`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Override `listener.workers` (1 to 1024).
    #[arg(long, value_parser = parse_workers)]
    workers: Option<usize>,
    /// Override `admin.address` (the control API and /metrics; ignored when `admin.enabled`
    /// is false).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve, true),
        Some(Command::Serve(args)) => serve(args, true),
        Some(Command::Control(args)) => serve(args, false),
        Some(Command::Data(args)) => data(args),
        Some(Command::CheckConfig { file }) => match config::load_file(&file) {
            // TLS material (CA files) is loaded too, as serving would.
            Ok(table) => match tls_configs(&table) {
                Ok(_) => print_out(&format!("{file}: OK\n{}", table.describe())),
                Err(e) => fail(&[format!("{file}: {e}")]),
            },
            Err(errors) => fail(&errors),
        },
        Some(Command::Classify { config }) => classify(config),
        Some(Command::Status(admin)) => admin_call(&admin, client::Command::Status),
        Some(Command::Spend {
            admin,
            service,
            day,
        }) => admin_call(&admin, client::Command::Spend { service, day }),
        Some(Command::Budgets { admin, action }) => {
            let command = match action {
                None => client::Command::Budgets,
                Some(BudgetAction::Set {
                    service,
                    daily_usd,
                    category,
                }) => client::Command::SetBudget {
                    service,
                    category,
                    daily_usd: Some(daily_usd),
                },
                Some(BudgetAction::Clear { service, category }) => client::Command::SetBudget {
                    service,
                    category,
                    daily_usd: None,
                },
            };
            admin_call(&admin, command)
        }
        Some(Command::Keys { admin, action }) => admin_call(
            &admin,
            match action {
                KeyAction::Create {
                    service,
                    any_service,
                } => client::Command::CreateKey {
                    service,
                    any_service,
                },
                KeyAction::List => client::Command::ListKeys,
                KeyAction::Revoke { id } => client::Command::RevokeKey { id },
            },
        ),
        Some(Command::Cache {
            admin,
            action: CacheAction::Purge,
        }) => admin_call(&admin, client::Command::PurgeCache),
        Some(Command::Config { admin, action }) => {
            let (file, apply) = match action {
                ConfigAction::Validate { file } => (file, false),
                ConfigAction::Apply { file } => (file, true),
            };
            let toml = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) => return fail(&[format!("{file}: cannot read: {e}")]),
            };
            let source = file;
            admin_call(
                &admin,
                if apply {
                    client::Command::ApplyConfig { toml, source }
                } else {
                    client::Command::ValidateConfig { toml, source }
                },
            )
        }
    }
}

fn admin_call(admin: &AdminArgs, command: client::Command) -> ExitCode {
    match admin.resolve().and_then(|a| client::run(&a, command)) {
        Ok(out) => print_out(&out),
        Err(e) => fail(&[e]),
    }
}

/// Writes a command's output; a reader that went away (`| head`) is no failure of the command.
fn print_out(text: &str) -> ExitCode {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(&[format!("stdout: {e}")]),
        _ => ExitCode::SUCCESS,
    }
}

fn parse_workers(arg: &str) -> Result<usize, String> {
    match arg.parse() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
        _ => Err(format!("must be a number from 1 to {MAX_WORKERS}")),
    }
}

fn fail(errors: &[String]) -> ExitCode {
    for e in errors {
        eprintln!("error: {e}");
    }
    ExitCode::FAILURE
}

/// The command line's `--listen`, `--workers` and `--admin-listen`, applied to every config.
fn overrides(
    listen: Option<SocketAddr>,
    workers: Option<usize>,
    admin: Option<SocketAddr>,
) -> Box<dyn Fn(&mut RoutingTable) + Send + Sync> {
    Box::new(move |table: &mut RoutingTable| {
        if let Some(addr) = listen {
            table.listener.address = addr;
        }
        if let Some(n) = workers {
            table.listener.workers = n;
        }
        if let (Some(addr), Some(_)) = (admin, table.admin.address) {
            table.admin.address = Some(addr);
        }
    })
}

fn banner(ready: &switchyard_controlplane::Ready, demo: Option<&str>) {
    if let Some(dp) = ready.dataplane {
        println!(
            "Switchyard {} listening on http://{} ({} workers, {} I/O driver, config version {})",
            env!("CARGO_PKG_VERSION"),
            dp.address,
            dp.shared.snapshot.load().table.listener.workers,
            dp.driver,
            ready.config_version
        );
        if dp.uring_refused {
            println!(
                "  io_uring is refused here (container runtimes' default seccomp profiles block it): \
                 epoll costs more CPU per request; allow io_uring_setup, io_uring_enter and \
                 io_uring_register to use io_uring"
            );
        }
    } else {
        println!(
            "Switchyard {} control plane (config version {})",
            env!("CARGO_PKG_VERSION"),
            ready.config_version
        );
    }
    match &ready.admin {
        Some((addr, TokenSource::Env(name))) => {
            println!("Control API (gRPC) and /metrics on http://{addr}; admin token from ${name}")
        }
        Some((addr, TokenSource::File(path))) => println!(
            "Control API (gRPC) and /metrics on http://{addr}; admin token in {}",
            path.display()
        ),
        None => {}
    }
    if let Some(d) = demo {
        println!("{d}");
    }
    if let Some(dp) = ready.dataplane {
        // With keys required, the command needs one (`switchyard keys create SERVICE`).
        let key = if dp.shared.snapshot.load().table.auth_required {
            " -H \"authorization: Bearer $SWITCHYARD_KEY\""
        } else {
            ""
        };
        println!(
            "Try it:\n  curl -s http://{}/v1/chat/completions -H 'content-type: application/json'{key} \\\n    -d '{{\"model\":\"auto\",\"messages\":[{{\"role\":\"user\",\"content\":\"Summarise: the meeting moved to Friday.\"}}]}}' -i",
            dp.address
        );
        if !key.is_empty() {
            println!("  (with SWITCHYARD_KEY set to a key from `switchyard keys create SERVICE`)");
        }
    }
    let _ = std::io::stdout().flush();
}

fn data(args: DataArgs) -> ExitCode {
    switchyard_dataplane::panics::exit_on_uncontained_panic();
    let admin = AdminArgs {
        admin: Some(args.control.clone()),
        data_dir: args.data_dir.clone(),
    };
    // A data plane needs only the data-plane token, when the control plane has one.
    let control = match token_from_env("SWITCHYARD_DATA_PLANE_TOKEN") {
        Some(token) => client::Admin {
            url: args.control.clone(),
            token,
        },
        None => match admin.resolve() {
            Ok(a) => a,
            Err(e) => {
                return fail(&[format!(
                    "set $SWITCHYARD_DATA_PLANE_TOKEN to the control plane's data-plane token ({e})"
                )])
            }
        },
    };
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "data-plane".into());
        format!("{host}-{}", std::process::id())
    });
    let start = switchyard_controlplane::remote::RemoteStart {
        control,
        name,
        overrides: overrides(args.listen, args.workers, None),
        buffer: args.usage_buffer,
    };
    let code = switchyard_controlplane::remote::serve_data(start, |ready| banner(ready, None));
    ExitCode::from(code as u8)
}

fn serve(args: ServeArgs, local: bool) -> ExitCode {
    switchyard_dataplane::panics::exit_on_uncontained_panic();
    let (toml, source, file, demo) = match &args.config {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => (text, path.clone(), Some(path.into()), None),
            Err(e) => return fail(&[format!("{path}: cannot read: {e}")]),
        },
        None => match demo::build() {
            Ok(d) => (
                d.config,
                "<demo config>".to_string(),
                None,
                Some(d.description),
            ),
            Err(e) => return fail(&[format!("cannot start the demo backends: {e}")]),
        },
    };
    let start = switchyard_controlplane::Start {
        toml,
        source,
        file,
        overrides: overrides(args.listen, args.workers, args.admin_listen),
    };
    let code = switchyard_controlplane::serve(start, local, |ready| banner(ready, demo.as_deref()));
    ExitCode::from(code as u8)
}

fn classify(config_path: Option<String>) -> ExitCode {
    let table = match &config_path {
        // Classifying sends nothing anywhere: the backends' API keys need not be set.
        Some(path) => config::load_file_with(path, &|_| Some("unused".into())),
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
    for (n, line) in std::io::stdin().lock().split(b'\n').enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return fail(&[format!("stdin: {e}")]),
        };
        // A bad line fails alone: an error line in its place (the output stays one line per
        // input line; blank lines are skipped), the reason on stderr too, and exit status 1.
        let result = match std::str::from_utf8(&line) {
            Ok(l) if l.trim().is_empty() => continue,
            Ok(l) => classify_line(&table, l).map_err(|e| {
                let id = serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v.get("id").cloned());
                (id, e)
            }),
            Err(e) => Err((None, format!("not UTF-8: {e}"))),
        };
        let result = result.unwrap_or_else(|(id, e)| {
            eprintln!("error: line {}: {e}", n + 1);
            failed = true;
            serde_json::json!({ "id": id, "error": e })
        });
        if writeln!(out, "{result}").is_err() {
            // Nobody reads the answers any more (`| head`): stop reading questions.
            return if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
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
    let (body, endpoint) = match (v.get("body"), v.get("messages")) {
        (Some(body), _) => {
            // A full request body may be a completion's (a `prompt`, no `messages`).
            let endpoint = if body.get("messages").is_none() && body.get("prompt").is_some() {
                Endpoint::Completions
            } else {
                Endpoint::ChatCompletions
            };
            (body.to_string(), endpoint)
        }
        (None, Some(messages)) => (
            serde_json::json!({ "messages": messages }).to_string(),
            Endpoint::ChatCompletions,
        ),
        (None, None) => return Err("needs `messages` or `body`".into()),
    };
    let view = RequestView::parse(endpoint, body.as_bytes()).map_err(|e| e.message)?;
    let c = table.classifier.classify(&view.prompt());
    let facts = RequestFacts {
        service: "default",
        priority: Priority::Normal,
        model: view.model.as_deref().unwrap_or("auto"),
        path: endpoint.path(),
        pinned_tier: None,
        category: c.category,
        alternative: c.alternative,
        long_context: c.long_context,
        classified: true,
    };
    // None: the request names a model in no tier (it goes to that model alone).
    let rank = match table.decide(&facts).map_err(|e| format!("{e:?}"))?.plan {
        Plan::FromTier(rank) => Some(rank),
        Plan::Targets(ids) => ids
            .first()
            .and_then(|&id| table.tiers.iter().position(|t| t.targets.contains(&id))),
    };
    Ok(serde_json::json!({
        "id": id,
        "category": c.category.as_str(),
        "confidence": c.confidence,
        "rule": c.rule,
        "alternative": c.alternative.map(|a| a.as_str()),
        "long_context": c.long_context,
        "tier": rank.map(|r| &table.tiers[r].name),
        "tier_rank": rank,
    }))
}
