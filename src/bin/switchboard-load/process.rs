//! The gateway as its own process (the real `switchboard` binary, as it runs in
//! production): every measurement drives it, and memory and start-up must not include
//! the load tool's own.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::listening;

/// The admin key every child gateway is given.
pub const ADMIN_KEY: &str = "load-admin-key-0123456789abcdef";

/// How long a child may take to become ready before the run fails.
const READY_LIMIT: Duration = Duration::from_secs(20);

/// How to start a child gateway: the binary, and its worker thread count when not the
/// default (`WORKER_THREADS`).
#[derive(Clone, Debug)]
pub struct Launch {
    pub bin: PathBuf,
    pub workers: Option<std::num::NonZeroUsize>,
}

pub struct ChildGateway {
    pub base: String,
    pub child: Child,
    pub ready_after: Duration,
    _dir: tempfile::TempDir,
}

/// `switchboard` next to this binary (both are built by `cargo build --bins`).
pub fn gateway_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("switchboard");
    anyhow::ensure!(
        bin.exists(),
        "{} not found: build with --bins",
        bin.display()
    );
    Ok(bin)
}

impl ChildGateway {
    /// Spawns the gateway on a fresh SQLite file and waits until `/ready` answers 200.
    pub async fn spawn(launch: &Launch, upstream_url: &str) -> anyhow::Result<Self> {
        let bin = &launch.bin;
        let dir = tempfile::tempdir()?;
        let started = Instant::now();
        let mut command = Command::new(bin);
        command.env_clear();
        if let Some(workers) = launch.workers {
            command.env("WORKER_THREADS", workers.to_string());
        }
        let mut child = command
            .env("APP_ENV", "development")
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env(
                "DATABASE_URL",
                format!("sqlite://{}", dir.path().join("sb.db").display()),
            )
            .env("DEV_SECRETS_FILE", dir.path().join("secrets"))
            .env("ADMIN_API_KEY", ADMIN_KEY)
            .env("JWT_SECRET", "load-jwt-secret-0123456789abcdef0123456789")
            .env("ENCRYPTION_KEY", "07".repeat(32))
            .env("UPSTREAM_MCP_URL", upstream_url)
            .env("TENANT_RATE_LIMIT", "1000000")
            .env("TENANT_RATE_BURST", "1000000")
            .env("AUTH_RATE_LIMIT", "1000000")
            .env("AUTH_RATE_BURST", "1000000")
            // Limits out of the way: the load tool measures the path, not the limiters.
            .env("TENANT_MAX_IN_FLIGHT", "1024")
            // Errors, and the line that tells the port.
            .env("RUST_LOG", "error,switchboard::listening=info")
            .env("LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawn {}", bin.display()))?;
        let address = listening_address(&mut child).await?;
        let base = format!("http://{address}");
        let ready_after = wait_ready(&base, started).await?;
        Ok(Self {
            base,
            child,
            ready_after,
            _dir: dir,
        })
    }

    /// Resident memory of the child, from `/proc/<pid>/status` (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let pid = self.child.id().context("child exited")?;
        switchboard::http::routes::health::resident_memory_bytes_of(&pid.to_string())
            .context("VmRSS")
    }

    /// CPU time the child has used so far (see [`cpu_time`]).
    pub fn cpu_time(&self) -> anyhow::Result<Duration> {
        cpu_time(&self.child.id().context("child exited")?.to_string())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// CPU time (user + system, all threads) process `pid` (or `self`) has used so far, from
/// `/proc/<pid>/stat`, whose clock ticks are USER_HZ (100 per second on Linux).
pub fn cpu_time(pid: &str) -> anyhow::Result<Duration> {
    const USER_HZ: u64 = 100;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; count fields after its `)`.
    let after_name = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the name.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("stat field")?.parse::<u64>()?)
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / USER_HZ))
}

/// The address the child logs that it listens on. Its output is read on to the end after
/// that, so it never blocks on a full pipe.
async fn listening_address(child: &mut Child) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("child stdout")?;
    let (found, address) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut found = Some(found);
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(address) = listening::listening_address(&line) {
                if let Some(found) = found.take() {
                    let _ = found.send(address);
                }
            }
        }
    });
    tokio::time::timeout(READY_LIMIT, address)
        .await
        .context("the gateway did not log its address in time")?
        .context("the gateway exited before it listened")
}

/// Polls `/ready` every 2 ms until it answers 200; the time since `started`.
async fn wait_ready(base: &str, started: Instant) -> anyhow::Result<Duration> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()?;
    let url = format!("{base}/ready");
    while started.elapsed() < READY_LIMIT {
        if let Ok(resp) = http.get(&url).send().await {
            if resp.status().is_success() {
                return Ok(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    anyhow::bail!("the gateway was not ready within {READY_LIMIT:?}")
}
