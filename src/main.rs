//! The `volley` command line: parses arguments and hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use volley::config::Config;

/// volley: a real-time message broker (WebSocket, SSE and HTTP on one port).
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the broker (defaults: 127.0.0.1:8080, one shard per core, no auth).
    Serve {
        /// Address to listen on, e.g. 0.0.0.0:8080 (overrides the file and VOLLEY_LISTEN).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Number of reactor threads (0 = one per core).
        #[arg(long)]
        shards: Option<usize>,
        /// TOML configuration file; every key can also be set as VOLLEY_<KEY>.
        #[arg(long)]
        config: Option<PathBuf>,
        /// `memory` (one node) or `redis://host:6379` to share one ordered log between nodes.
        #[arg(long)]
        engine: Option<String>,
    },
    /// Show the effective configuration.
    Config {
        /// Print it as TOML.
        #[arg(long)]
        print: bool,
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn load(file: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    Config::load(file, std::env::vars()).map_err(|e| {
        eprintln!("volley: {e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { listen, shards, config, engine } => {
            let mut config = match load(config.as_deref()) {
                Ok(c) => c,
                Err(code) => return code,
            };
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(shards) = shards {
                config.shards = shards;
            }
            if let Some(engine) = engine {
                config.engine = engine;
            }
            let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
            match volley::reactor::serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("volley: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Config { config, .. } => match load(config.as_deref()) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}
