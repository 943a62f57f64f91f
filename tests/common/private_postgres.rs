//! `PrivatePostgres`: a PostgreSQL cluster of the test's own, in a temporary folder, so a
//! test can stop and start a database without touching the machine's shared server (other
//! tests and people use that one). `initdb` with trust auth, listening on 127.0.0.1 only on
//! a free port, its socket in the same folder. PostgreSQL refuses to run as root, so when
//! the test runs as root the server runs as the `postgres` user (through `runuser`).
//! Dropping it stops the server and removes the folder.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context};

/// Where the PostgreSQL programs are looked for, in order.
const BIN_DIRS: &[&str] = &["/usr/local/bin", "/usr/lib/postgresql/*/bin"];
const SERVER_USER: &str = "postgres";

pub struct PrivatePostgres {
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub url: String,
    dir: tempfile::TempDir,
    bin: PathBuf,
    running: bool,
    /// Server settings (`-c name=value`) beyond the defaults.
    settings: Vec<String>,
}

impl PrivatePostgres {
    /// Makes a new cluster and starts it.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(&[], &[])
    }

    /// Makes a new cluster, writes `files` (name, contents) into its data folder (owned by
    /// the server, readable by it alone: what PostgreSQL asks of a key file), and starts it
    /// with the server `settings` (`name=value`) added.
    pub fn start_with(files: &[(&str, &str)], settings: &[&str]) -> anyhow::Result<Self> {
        let bin = find_bin()?;
        let dir = tempfile::Builder::new().prefix("sb-pg-").tempdir()?;
        let port = free_port()?;
        let mut pg = Self {
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            running: false,
            settings: settings.iter().map(|s| format!("-c {s}")).collect(),
        };
        if is_root() {
            run(Command::new("chown")
                .args(["-R", SERVER_USER])
                .arg(pg.dir.path()))?;
        }
        let data = pg.data_dir();
        run(pg
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data))
        .context("initdb")?;
        for (name, contents) in files {
            let path = data.join(name);
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            if is_root() {
                run(Command::new("chown").arg(SERVER_USER).arg(&path))?;
            }
        }
        pg.start_again()?;
        Ok(pg)
    }

    /// Starts the server (again) on the same port and data folder; returns once it accepts
    /// connections (`pg_ctl -w`).
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let options = format!(
            "-h 127.0.0.1 -p {} -k {} -c fsync=off {}",
            self.port,
            self.dir.path().display(),
            self.settings.join(" ")
        );
        let log = self.dir.path().join("server.log");
        // Before the start: a server that comes up after `pg_ctl` gave up waiting must still
        // be stopped on drop (a stop of one that never started only prints a message).
        self.running = true;
        run(self
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-o", &options, "start"]))
        .with_context(|| format!("pg_ctl start (log: {})", log.display()))?;
        Ok(())
    }

    /// Stops the server the way an operator's fast shutdown does: sessions are ended.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        run(self
            .command("pg_ctl")
            .args(["-w", "-t", "30", "-m", "fast", "-D"])
            .arg(self.data_dir())
            .arg("stop"))
        .context("pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A PostgreSQL program, run as the server user when we are root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", SERVER_USER, "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        if self.running {
            let stopped = self
                .command("pg_ctl")
                .args(["-w", "-t", "10", "-m", "immediate", "-D"])
                .arg(self.data_dir())
                .arg("stop")
                .output();
            if !matches!(&stopped, Ok(out) if out.status.success()) {
                eprintln!(
                    "could not stop the private PostgreSQL on port {}",
                    self.port
                );
            }
        }
        // The TempDir removes the folder (data and socket) after this.
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// The folder holding `initdb`, `pg_ctl` and `postgres`.
fn find_bin() -> anyhow::Result<PathBuf> {
    for pattern in BIN_DIRS {
        let candidates: Vec<PathBuf> = match pattern.split_once('*') {
            None => vec![PathBuf::from(pattern)],
            Some((head, tail)) => std::fs::read_dir(head)
                .map(|entries| {
                    let mut dirs: Vec<PathBuf> = entries
                        .flatten()
                        .map(|e| e.path().join(tail.trim_start_matches('/')))
                        .collect();
                    dirs.sort();
                    dirs.reverse();
                    dirs
                })
                .unwrap_or_default(),
        };
        if let Some(dir) = candidates.into_iter().find(|d| has_programs(d)) {
            return Ok(dir);
        }
    }
    bail!("no PostgreSQL programs (initdb, pg_ctl, postgres) in {BIN_DIRS:?}")
}

fn has_programs(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|p| dir.join(p).exists())
}

/// A port nobody listens on now (bound on :0, read, released).
fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
