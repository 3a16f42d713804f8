//! The `volley` command line: parses arguments and hands over to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use volley::config::{Config, LogFormat};

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
    /// Drive a server that speaks the volley protocol with many clients and report
    /// delivered events/s, loss and end-to-end latency percentiles.
    Bench(BenchArgs),
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

#[derive(clap::Args)]
struct BenchArgs {
    /// broadcast | fanout | idle | sse
    #[arg(value_enum)]
    scenario: volley::bench::Scenario,
    /// Server to drive, or several cluster nodes comma-separated (ignored with --compare
    /// or --spawn).
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',')]
    addr: Vec<std::net::SocketAddr>,
    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Topics (fanout).
    #[arg(long, default_value_t = 100)]
    topics: usize,
    /// Publisher connections.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Publishes per second over all publishers, open loop, latency from each publish's
    /// scheduled time (0: saturate, 64 unacknowledged per publisher: deep queues).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Bytes of each event's data.
    #[arg(long, default_value_t = 64)]
    payload_bytes: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of publishing before measuring.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Subscriber event loops.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Closed loop: at most N undelivered events per subscriber in flight.
    #[arg(long, value_name = "N")]
    closed_loop: Option<u64>,
    /// One row per offered rate (open loop), then each server's capacity: the highest rate
    /// up to which every rate tried was delivered in full with p99 at or under --slo-ms.
    #[arg(long, value_delimiter = ',', value_name = "R1,R2,...")]
    sweep: Vec<u64>,
    /// The latency bound of the capacity rule, milliseconds (p99).
    #[arg(long, default_value_t = 50)]
    slo_ms: u64,
    /// CPUs for spawned servers (taskset list, e.g. `0` or `0-1`).
    #[arg(long)]
    server_cpus: Option<String>,
    /// CPUs for this harness (e.g. `1`).
    #[arg(long)]
    client_cpus: Option<String>,
    /// The server's pid (for memory per connection in `idle`).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Start this volley binary on a free port and measure it.
    #[arg(long)]
    spawn: bool,
    /// Start volley and the peer baseline and print volley/peer ratios.
    #[arg(long)]
    compare: bool,
    /// Also start this other volley build (say, the previous release) the same way, after
    /// this one, and print this/baseline ratios.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The peer baseline binary (build: cargo build --release --manifest-path benches/peers/Cargo.toml).
    #[arg(long, default_value = "benches/peers/target/release/volley-peer")]
    peer: PathBuf,
    /// Each server is measured twice in the run: subscribers without, then with
    /// permessage-deflate offered (the second row is named `<server>+deflate`).
    #[arg(long)]
    deflate: bool,
    /// Spawned volley servers are measured twice in the run: subscribers over plain TCP,
    /// then over TLS (`<server>+tls`; a test CA made for the run, publishers stay plain).
    /// The handshake scenario measures only the TLS row.
    #[arg(long)]
    tls: bool,
    /// Each server is also measured with this many joins and leaves a second on presence
    /// topics during the run (`<server>+churn`; 64 connections subscribing and unsubscribing).
    #[arg(long, default_value_t = 0)]
    churn: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

fn bench(args: BenchArgs) -> std::io::Result<()> {
    if let Some(cpus) = &args.client_cpus {
        volley::bench::pin_this_process(cpus)?;
    }
    let mut options = volley::bench::Options {
        addrs: args.addr.clone(),
        scenario: args.scenario,
        connections: args.connections,
        topics: args.topics,
        publishers: args.publishers,
        rate: args.rate,
        closed_loop: args.closed_loop,
        payload_bytes: args.payload_bytes,
        duration: std::time::Duration::from_secs_f64(args.duration),
        warmup: std::time::Duration::from_secs_f64(args.warmup),
        threads: args.threads,
        server_pid: args.server_pid,
        deflate: false,
        tls: None,
        churn: 0,
    };
    let pki = if args.tls { Some(volley::bench::Pki::new("bench")?) } else { None };
    let mut servers = Vec::new();
    if args.spawn || args.compare || args.baseline.is_some() {
        servers.push(("volley", std::env::current_exe()?, true));
        if let Some(baseline) = &args.baseline {
            servers.push(("baseline", baseline.clone(), true));
        }
        if args.compare {
            servers.push(("peer", args.peer.clone(), false));
        }
    }
    let rates = if args.sweep.is_empty() { vec![args.rate] } else { args.sweep.clone() };
    // (deflate offered, over TLS, churn) per row of a server.
    let mut variants = vec![(false, false, 0)];
    if args.deflate {
        variants.push((true, false, 0));
    }
    if args.tls {
        if args.scenario == volley::bench::Scenario::Handshake {
            variants.clear();
        }
        variants.push((false, true, 0));
    }
    if args.churn > 0 {
        variants.push((false, false, args.churn));
    }
    let mut rows = Vec::new();
    // Interleaved: each rate runs on every server before the next rate, so a noisy minute
    // on a shared machine lands on both.
    for &rate in &rates {
        options.rate = rate;
        for &(deflate, tls, churn) in &variants {
            options.deflate = deflate;
            options.churn = churn;
            let suffix = match (deflate, tls, churn) {
                (true, _, _) => "+deflate",
                (_, true, _) => "+tls",
                (_, _, 1..) => "+churn",
                _ => "",
            };
            if servers.is_empty() && !tls {
                let name = args.addr.iter().map(ToString::to_string).collect::<Vec<_>>().join(",");
                rows.push((rate, volley::bench::run(&options, &format!("{name}{suffix}"))?));
            }
            for (name, binary, is_volley) in &servers {
                // The peer has no TLS.
                if tls && !is_volley {
                    continue;
                }
                let server = volley::bench::spawn(binary, *is_volley, args.server_cpus.as_deref(), pki.as_ref())?;
                options.addrs = vec![server.addr];
                options.server_pid = Some(server.pid());
                options.tls = match (tls, server.tls_addr, &pki) {
                    (true, Some(addr), Some(pki)) => {
                        Some(volley::bench::TlsTarget { addrs: vec![addr], config: pki.client_config()? })
                    }
                    _ => None,
                };
                rows.push((rate, volley::bench::run(&options, &format!("{name}{suffix}"))?));
            }
        }
    }
    let reports: Vec<_> = rows.iter().map(|(_, r)| r.clone()).collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reports).unwrap_or_default());
        return Ok(());
    }
    if args.sweep.is_empty() {
        print!("{}", volley::bench::table(&reports));
        return Ok(());
    }
    print!("{}", volley::bench::table(&[]));
    for (_, report) in &rows {
        print!("{}", volley::bench::row(report));
    }
    let slo = std::time::Duration::from_millis(args.slo_ms);
    let mut names: Vec<&str> = Vec::new();
    for (_, report) in &rows {
        if !names.contains(&report.server.as_str()) {
            names.push(&report.server);
        }
    }
    println!();
    for name in names {
        let of = rows.iter().filter(|(_, r)| r.server == name).map(|(rate, r)| (*rate, r));
        match volley::bench::capacity(of, options.duration, slo) {
            Some(rate) => println!("capacity of {name} at p99 <= {} ms: {rate} publishes/s", args.slo_ms),
            None => println!("capacity of {name} at p99 <= {} ms: below every rate tried", args.slo_ms),
        }
    }
    Ok(())
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
            // Unusable certificate files stop the broker like any bad setting (exit 2).
            if !config.tls_cert.is_empty()
                && let Err(e) = volley::tls::Certificates::load(&config.tls_cert, &config.tls_key)
            {
                eprintln!("volley: {e}");
                return ExitCode::from(2);
            }
            let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            // Colour codes only for a terminal (NO_COLOR still wins): a file or a journal
            // would keep them as noise.
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(colour);
            match config.log_format {
                LogFormat::Human => logs.init(),
                LogFormat::Json => logs.json().init(),
            }
            match volley::reactor::serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("volley: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Bench(args) => match bench(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("volley bench: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Config { config, .. } => match load(config.as_deref()) {
            Ok(c) => {
                print!("{}", c.to_toml());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
    }
}
