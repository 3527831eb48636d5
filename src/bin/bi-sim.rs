//! `bi-sim`: the simulated Cube-compatible BI platform as its own HTTP server,
//! for multi-instance set-ups and tests. The simulator itself lives in
//! `analytics_gateway::sim`; this binary only reads its settings, sets up
//! logging, binds and serves until Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use analytics_gateway::sim::{self, SimConfig, Simulator};
use anyhow::Context as _;
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory as _, Parser};
use tracing_subscriber::EnvFilter;

/// A simulated Cube-compatible BI platform with deterministic data.
#[derive(Debug, Parser)]
#[command(name = "bi-sim", version)]
struct Cli {
    /// Address to listen on.
    #[arg(long, env = "BI_SIM_LISTEN", default_value = "127.0.0.1:4100")]
    listen: SocketAddr,

    /// How long every /load answer takes, in milliseconds.
    #[arg(long, env = "BI_SIM_LATENCY_MS", default_value_t = 2000)]
    latency_ms: u64,

    /// Cube's API secret: set, every /load must carry a token signed with it
    /// whose security context names the customer its queries filter on.
    #[arg(long, env = "BI_SIM_API_SECRET", hide_env_values = true)]
    api_secret: Option<String>,

    /// The security-context claim that names the customer.
    #[arg(
        long,
        env = "BI_SIM_SECURITY_CONTEXT_CLAIM",
        default_value = "customerId"
    )]
    security_context_claim: String,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error)
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) =>
        {
            error.exit()
        }
        Err(error) => {
            eprintln!("bi-sim: {}", config_error_line(&error));
            return ExitCode::from(2);
        }
    };

    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("bi-sim: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The first line of clap's error, naming the environment variable of the
/// offending setting too: clap names only the flag, but in deployments the
/// bad value usually comes from the environment.
fn config_error_line(error: &clap::Error) -> String {
    let rendered = error.to_string();
    let first_line = rendered.lines().next().unwrap_or("invalid configuration");
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return first_line.to_owned();
    };
    let command = Cli::command();
    let setting = command.get_arguments().find_map(|arg| {
        let long = arg.get_long()?;
        let env = arg.get_env()?;
        invalid
            .starts_with(&format!("--{long}"))
            .then(|| format!("--{long} or {}", env.to_string_lossy()))
    });
    match setting {
        Some(setting) => format!("{first_line} (set by {setting})"),
        None => first_line.to_owned(),
    }
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {} (BI_SIM_LISTEN)", cli.listen))?;
    let address = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let security = cli
        .api_secret
        .filter(|secret| !secret.is_empty())
        .map(|secret| sim::SimSecurity {
            secret,
            claim: cli.security_context_claim,
        });
    if security.is_some() {
        tracing::info!("bi-sim checks the security context of every token");
    }
    let simulator = Simulator::new(SimConfig {
        latency: Duration::from_millis(cli.latency_ms),
        security,
    });
    tracing::info!("bi-sim listening on http://{address}/cubejs-api/v1");
    sim::serve(listener, simulator, analytics_gateway::shutdown_signal())
        .await
        .context("serving HTTP")?;
    tracing::info!("bi-sim stopped");
    Ok(())
}
