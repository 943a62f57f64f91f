//! Reference MCP servers from npm (`tests/peers/package.json`, installed with
//! `npm ci --prefix tests/peers`), run as child processes on a free loopback port so that our
//! client is checked against an implementation we did not write. A missing install fails the
//! test with instructions; it never skips silently.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{bail, Context as _};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// How long a peer may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `@modelcontextprotocol/server-everything`; killed when dropped.
pub struct EverythingServer {
    pub port: u16,
    _child: Child,
}

/// Which transport `server-everything` serves.
#[derive(Clone, Copy)]
pub enum EverythingMode {
    /// `POST/GET/DELETE /mcp`.
    StreamableHttp,
    /// `GET /sse` + `POST /message`.
    Sse,
}

impl EverythingServer {
    pub async fn start(mode: EverythingMode) -> anyhow::Result<Self> {
        let entry =
            peers_dir().join("node_modules/@modelcontextprotocol/server-everything/dist/index.js");
        if !entry.exists() {
            bail!(
                "the reference MCP server is not installed ({} is missing): run \
                 `npm ci --prefix tests/peers` first",
                entry.display()
            );
        }
        let port = free_port()?;
        let (arg, ready) = match mode {
            EverythingMode::StreamableHttp => ("streamableHttp", "listening on port"),
            EverythingMode::Sse => ("sse", "running on port"),
        };
        let mut child = Command::new("node")
            .arg(&entry)
            .arg(arg)
            .env("PORT", port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting node (is Node.js installed?)")?;
        let stderr = child.stderr.take().context("the child's stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        // The server says on stderr when it listens; no polling of the port.
        let wait = async {
            while let Some(line) = lines.next_line().await? {
                if line.contains(ready) {
                    return Ok(());
                }
            }
            bail!("server-everything exited before listening")
        };
        tokio::time::timeout(START_TIMEOUT, wait)
            .await
            .context("server-everything did not start listening in time")??;
        // Keep draining stderr so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            port,
            _child: child,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

fn peers_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers")
}

/// A port that was free a moment ago: bind port 0 on loopback, read it, release it.
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
