//! The `switchboard` binary: parse flags and environment, set up logging, run.

use clap::{Parser, Subcommand};
use switchboard::config::{Config, MigrateConfig, RawConfig};
use tokio_util::sync::CancellationToken;

/// jemalloc instead of glibc's malloc: a tool call through the gateway allocates and frees
/// many short-lived buffers on two threads, and glibc's malloc was a quarter of the gateway's
/// samples under load (consolidating free chunks above all). In A/B runs jemalloc cut the
/// CPU per call by ~14% (REST) and ~15% (`/mcp`), for 17–19 MB more with 1,000 active tenants
/// (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A multi-tenant gateway for the Model Context Protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: RawConfig,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gateway (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Exit 0 when this container's gateway answers `GET /live` with 200, else 1 (for
    /// Docker's HEALTHCHECK: the runtime image has no curl). Liveness, not readiness: a
    /// database outage, which tool calls are served through, must not get it restarted.
    Healthcheck,
}

fn main() -> anyhow::Result<()> {
    // A missing .env is normal; a malformed one is not. dotenvy's parse error quotes the
    // line, which may hold a secret: only where on it the parse stopped is told.
    match dotenvy::dotenv() {
        Err(dotenvy::Error::LineParse(_, at)) => {
            anyhow::bail!("could not read .env: a line does not parse (at character {at} of it)")
        }
        Err(err) if !err.not_found() => anyhow::bail!("could not read .env: {err}"),
        _ => {}
    }
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Serve) {
        // Before validation: checking health must not need (or generate) any secret.
        Command::Healthcheck => std::process::exit(healthcheck(cli.config.host, cli.config.port)),
        // Only the store: a pipeline step or init container needs no secret for it.
        Command::Migrate => {
            let config = cli
                .config
                .for_migrate()
                .unwrap_or_else(|err| config_error(err));
            switchboard::logging::init(config.log_format).unwrap_or_else(|err| config_error(err));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(migrate(config))
        }
        Command::Serve => {
            let (config, generated) = cli
                .config
                .validate()
                .unwrap_or_else(|err| config_error(err));
            switchboard::logging::init(config.log_format).unwrap_or_else(|err| config_error(err));
            if !generated.names.is_empty() {
                // Printed once, to the terminal, not through the log pipeline.
                eprintln!(
                    "WARNING: development mode generated {} and saved them to the dev secrets \
                     file; set them explicitly in production:",
                    generated.names.join(", ")
                );
                if generated.names.contains(&"ADMIN_API_KEY") {
                    eprintln!("  ADMIN_API_KEY={}", config.admin_api_key.expose());
                }
            }
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(threads) = config.worker_threads {
                runtime.worker_threads(threads.get());
            }
            runtime.enable_all().build()?.block_on(serve(config))
        }
    }
}

/// A setting that does not validate: said on stderr (logging is not set up yet), exit 2.
fn config_error(err: switchboard::config::ConfigError) -> ! {
    eprintln!("switchboard: configuration error: {err}");
    std::process::exit(2);
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    // Its own target, so that a log filter can keep this line alone: whoever starts the
    // binary on port 0 reads the port from it (the load tool, tests/drain.rs).
    tracing::info!(target: "switchboard::listening", address = %listener.local_addr()?, "listening");
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        switchboard::shutdown::signal().await;
        on_signal.cancel();
        // A second signal is an operator's "stop now": the drain is cut short.
        switchboard::shutdown::signal().await;
        tracing::warn!("a second signal: exiting without finishing the drain");
        std::process::exit(130);
    });
    switchboard::app::run(config, listener, shutdown).await
}

async fn migrate(config: MigrateConfig) -> anyhow::Result<()> {
    let store =
        switchboard::store::open(config.database_url.as_deref(), config.database_pool_size).await?;
    let applied = store.migrate().await?;
    tracing::info!(?applied, backend = store.backend(), "migrations applied");
    Ok(())
}

/// `GET http://{host}:{port}/live` with a short timeout (loopback when listening on every
/// address): 0 on 200, 1 otherwise.
fn healthcheck(host: std::net::IpAddr, port: u16) -> i32 {
    let host = match host {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        other => other,
    };
    let ready = async {
        // Never through a proxy from the environment (one set for the upstreams' egress):
        // no proxy reaches this container's own loopback.
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .no_proxy()
            .build()?;
        let url = format!("http://{}/live", std::net::SocketAddr::new(host, port));
        anyhow::Ok(client.get(url).send().await?.status() == reqwest::StatusCode::OK)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime.map(|rt| rt.block_on(ready)) {
        Ok(Ok(true)) => 0,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flags (and their variables) are the same before and after the subcommand:
    /// `docker run … migrate --database-url …` and `switchboard serve --port 8080` work.
    #[test]
    fn flags_work_after_the_subcommand_too() {
        for args in [
            ["switchboard", "--port", "8080", "serve"],
            ["switchboard", "serve", "--port", "8080"],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert_eq!(cli.config.port, 8080, "{args:?}");
            assert!(matches!(cli.command, Some(Command::Serve)));
        }
        let cli = Cli::try_parse_from(["switchboard", "healthcheck", "--port", "9"]).unwrap();
        assert_eq!(cli.config.port, 9);
    }
}
