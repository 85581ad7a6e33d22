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
            Ok(_) => {
                println!("ok");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve(arg) => {
            let config = match load(arg) {
                Ok(c) => c,
                Err(code) => return code,
            };
            sessiongate::telemetry::init(&config.log);
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}
