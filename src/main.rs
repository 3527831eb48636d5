use analytics_gateway::config::Config;
use anyhow::Context;

// The hot path (a cached hit) is mostly building and serialising JSON: many
// small allocations, which mimalloc serves markedly faster than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::from_env_or_exit();
    let telemetry = analytics_gateway::telemetry::init(&config.telemetry, &config.instance_id);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("GATEWAY_LISTEN: cannot listen on {}", config.listen))?;
    let served =
        analytics_gateway::run(config, listener, analytics_gateway::shutdown_signal()).await;
    // Spans of the last requests are still queued: export them before exiting.
    telemetry.shutdown().await;
    served?;
    Ok(())
}
