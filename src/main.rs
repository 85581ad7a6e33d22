//! The `sessiongate` binary: parses the command line and hands over to
//! the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sessiongate::config::{self, Config};

#[derive(Parser)]
#[command(name = "sessiongate", version, about = "An edge session gateway")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve(ConfigArg),
    /// Validate the config without touching the network; prints `ok`.
    Check(ConfigArg),
    /// Apply the durable store's migrations and exit.
    Migrate(ConfigArg),
    /// Policy plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Load a plugin, run its init with CONFIG, and show what each of its
    /// hooks decides for a sample session and request.
    Try(TryArgs),
}

#[derive(clap::Args)]
struct TryArgs {
    /// The plugin (.wasm: a component, or a core module built with the SDK).
    file: PathBuf,
    /// The plugin's config, as a JSON object.
    #[arg(long, default_value = "{}")]
    config: String,
    /// Override fields of the sample session (JSON object: user_id,
    /// created_at, last_seen_at, expires_at, attributes).
    #[arg(long)]
    session: Option<String>,
    /// Override fields of the sample request (JSON object: method, path,
    /// host, client_addr, user_agent).
    #[arg(long)]
    request: Option<String>,
    /// The time the hooks are told it is (ms since the Unix epoch).
    #[arg(long)]
    now: Option<i64>,
}

#[derive(clap::Args, Default)]
struct ConfigArg {
    /// The configuration file.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
}

fn load(arg: ConfigArg) -> Result<Config, ExitCode> {
    Config::load(&config::config_path(arg.config)).map_err(|e| {
        eprintln!("{e}");
        ExitCode::FAILURE
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(ConfigArg::default()));
    match command {
        Command::Check(arg) => match load(arg) {
            Ok(config) => {
                sessiongate::telemetry::init_stderr("warn");
                // Compiles every plugin and runs its init: no network.
                let metrics = std::sync::Arc::new(sessiongate::metrics::Metrics::new());
                match sessiongate::policy::chains::ChainSet::load(
                    sessiongate::policy::chains::ChainConfigs::of(&config),
                    config.plugins.log_lines_per_second,
                    metrics,
                ) {
                    Ok(_) => match sessiongate::server::check_tls(&config) {
                        // Reads every certificate and key and checks each
                        // pair as a start would.
                        Ok(_) => {
                            println!("ok");
                            ExitCode::SUCCESS
                        }
                        Err(e) => {
                            eprintln!("{e}");
                            ExitCode::FAILURE
                        }
                    },
                    Err(e) => {
                        let (key, error) = e.config_key();
                        eprintln!("{}: key `{key}`: {error}", config.source);
                        ExitCode::FAILURE
                    }
                }
            }
            Err(code) => code,
        },
        Command::Plugin(PluginCommand::Try(args)) => {
            sessiongate::telemetry::init_stderr("warn");
            let report = sessiongate::tools::try_plugin(
                &args.file,
                &args.config,
                args.session.as_deref(),
                args.request.as_deref(),
                args.now,
            );
            match report {
                Ok(report) => {
                    println!("{report}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("sessiongate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(arg) => {
            let mut config = match load(arg) {
                Ok(c) => c,
                Err(code) => return code,
            };
            sessiongate::telemetry::init(&config.log);
            // Unset: a worker per core.
            let workers = config
                .server
                .worker_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            config.server.worker_threads = Some(workers);
            runtime().block_on(async {
                match sessiongate::server::run(config).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        tracing::error!("{e}");
                        eprintln!("sessiongate: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::Migrate(arg) => {
            let config = match load(arg) {
                Ok(c) => c,
                Err(code) => return code,
            };
            runtime().block_on(async {
                match sessiongate::server::migrate(&config).await {
                    Ok(()) => {
                        println!("migrations applied to {}", config.redacted_database_url());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("sessiongate: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
    }
}

/// The main runtime: one thread. With one worker it serves the proxy
/// listener too (every task on one thread, with no work-stealing queues,
/// cross-thread wake-ups or idle-worker bookkeeping: measured in
/// BENCHMARKS.md). With more, `server::start` gives each worker a thread
/// and a current-thread runtime of its own, and this one keeps the admin
/// API, the signals and the background tasks.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}
