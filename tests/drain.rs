//! Graceful drain of the real binary: SIGTERM while 200 tool calls are in flight. Every
//! call that got a 2xx has its audit row after the exit, no answer is cut off, `/ready`
//! is 503 during the drain, new work gets 503 `draining`, and the exit code is 0. And an
//! audit event the database still holds up as the process stops is said lost before it
//! exits, within its drain bound.

mod common;
#[path = "../src/bin/switchboard-load/listening.rs"]
mod listening;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::database::{locking, side_connection, wait_for_lock_waiter, FreshDatabase};
use common::upstream::TestUpstream;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ADMIN_KEY: &str = "drain-admin-key-0123456789abcdef";
const CALLS: usize = 200;

/// Starts the binary on port 0 on `database_url` and returns once it logged the address it
/// listens on; its output keeps being read (into `logs`) so it never blocks on a full pipe.
async fn start_binary(
    dir: &std::path::Path,
    database_url: &str,
    drain_secs: u32,
    logs: tokio::sync::mpsc::UnboundedSender<String>,
) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .current_dir(dir)
        .env_clear()
        .args(["--host", "127.0.0.1", "--port", "0"])
        .env("APP_ENV", "production")
        .env("LOG_FORMAT", "json")
        .env("DATABASE_URL", database_url)
        .env("ADMIN_API_KEY", ADMIN_KEY)
        .env("JWT_SECRET", "drain-jwt-secret-0123456789abcdef0123456789")
        .env("ENCRYPTION_KEY", "ab".repeat(32))
        .env("TENANT_RATE_LIMIT", "100000")
        .env("TENANT_RATE_BURST", "100000")
        .env("DRAIN_TIMEOUT_SECS", drain_secs.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let stderr = child.stderr.take().context("stderr")?;
    let (address_tx, address_rx) = tokio::sync::oneshot::channel();
    let mut address_tx = Some(address_tx);
    tokio::spawn(async move {
        let mut out = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = out.next_line().await {
            if let Some(address) = listening::listening_address(&line) {
                if let Some(tx) = address_tx.take() {
                    let _ = tx.send(address);
                }
            }
            let _ = logs.send(line);
        }
    });
    tokio::spawn(async move {
        let mut err = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = err.next_line().await {
            eprintln!("switchboard stderr: {line}");
        }
    });
    let address = tokio::time::timeout(Duration::from_secs(30), address_rx)
        .await
        .context("the binary did not start listening")??;
    Ok((child, address))
}

async fn create_tenant(
    http: &reqwest::Client,
    base: &str,
    upstream: &str,
) -> anyhow::Result<(String, String)> {
    let created: Value = http
        .post(format!("{base}/api/tenants"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"integrationKey": "drain", "integrationAppToken": "upstream-token", "upstreamUrl": upstream}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = created["tenantId"].as_str().context("tenantId")?.to_owned();
    let key = created["apiKey"].as_str().context("apiKey")?.to_owned();
    Ok((id, key))
}

/// How long each call sleeps upstream: long enough that the probes of the drain (`/ready`,
/// a late call) are answered while the calls are still in flight, on a slow machine too.
const SLEEP_MS: u64 = 1500;

/// One tool call; `Ok((status, body))` only when the whole answer arrived.
async fn sleep_call(
    http: reqwest::Client,
    url: String,
    key: String,
    request_id: String,
) -> anyhow::Result<(StatusCode, Value)> {
    let resp = http
        .post(url)
        .header("x-api-key", key)
        .header("x-request-id", request_id)
        .json(&json!({"method": "sleep", "params": {"ms": SLEEP_MS}}))
        .send()
        .await?;
    let status = resp.status();
    let body: Value = serde_json::from_slice(&resp.bytes().await?)?;
    Ok((status, body))
}

async fn sigterm(pid: u32) -> anyhow::Result<()> {
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .await?;
    anyhow::ensure!(killed.success(), "kill -TERM {pid}: {killed}");
    Ok(())
}

fn audited_request_ids(db: &std::path::Path) -> anyhow::Result<HashSet<String>> {
    let conn = rusqlite::Connection::open(db)?;
    let mut stmt = conn.prepare(
        "SELECT request_id FROM audit_events WHERE action = 'tool.call' AND request_id IS NOT NULL",
    )?;
    let ids = stmt
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<HashSet<_>, _>>()?;
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_loses_nothing_and_exits_zero() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let dir = tempfile::tempdir()?;
    let (logs_tx, mut logs) = tokio::sync::mpsc::unbounded_channel();
    let database = format!("sqlite://{}", dir.path().join("sb.db").display());
    let (mut child, address) = start_binary(dir.path(), &database, 20, logs_tx).await?;
    let base = format!("http://{address}");
    let http = reqwest::Client::new();
    let (tenant, key) = create_tenant(&http, &base, &upstream.url).await?;
    let url = format!("{base}/api/tenant/{tenant}/tool");
    // Warm up: the tenant's actor connects and caches its tools.
    let warm = sleep_call(http.clone(), url.clone(), key.clone(), "warm-up".into()).await?;
    assert_eq!(warm.0, StatusCode::OK, "{warm:?}");

    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let request_id = format!("drain-{i}");
            let call = sleep_call(http.clone(), url.clone(), key.clone(), request_id.clone());
            tokio::spawn(async move { (request_id, call.await) })
        })
        .collect();
    upstream.wait_for_calls(CALLS + 1).await?;
    let pid = child.id().context("pid")?;
    sigterm(pid).await?;

    // Readiness turns 503 at once (the process answers probes while it drains).
    let probe = reqwest::Client::new();
    let mut ready_503 = false;
    for _ in 0..100 {
        let status = probe.get(format!("{base}/ready")).send().await?.status();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            ready_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(ready_503, "/ready was not 503 during the drain");
    let (status, body) = sleep_call(probe.clone(), url.clone(), key.clone(), "late".into()).await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"]["code"], "draining");

    let mut ok_ids = HashSet::new();
    for call in calls {
        let (request_id, result) = call.await?;
        let (status, body) = result.with_context(|| format!("{request_id} was cut off"))?;
        assert_eq!(status, StatusCode::OK, "{request_id}: {body}");
        assert_eq!(
            body["content"][0]["text"],
            format!("slept {SLEEP_MS} ms").as_str()
        );
        ok_ids.insert(request_id);
    }
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    let audited = audited_request_ids(&dir.path().join("sb.db"))?;
    let missing: Vec<_> = ok_ids.difference(&audited).collect();
    assert!(missing.is_empty(), "no audit row for {missing:?}");
    assert_eq!(ok_ids.len(), CALLS);
    let mut lines = Vec::new();
    while let Ok(line) = logs.try_recv() {
        lines.push(line);
    }
    assert!(lines.iter().any(|l| l.contains("shutdown requested")));
    assert!(lines.iter().any(|l| l.contains("\"stopped\"")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_event_the_database_holds_up_at_the_stop_is_said_lost_before_the_exit(
) -> anyhow::Result<()> {
    // The tenant's `tenant.create` event is refused (a constraint no row meets), so it
    // waits in the audit writer's queue; then a lock holds up the writer's retry, as a
    // database that stopped answering would. On SIGTERM the process must still exit within
    // its drain bound, and say (log, count) that the event was lost: before, the retry in
    // progress kept the writer from its stop until the process exited without a word.
    let database = FreshDatabase::create().await?;
    let dir = tempfile::tempdir()?;
    let (logs_tx, mut logs) = tokio::sync::mpsc::unbounded_channel();
    let (mut child, address) = start_binary(dir.path(), &database.url, 1, logs_tx).await?;
    let http = reqwest::Client::new();
    // It listens before it has migrated the database: ready says it has.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(http.get(format!("http://{address}/ready")).send().await, Ok(r) if r.status() == StatusCode::OK)
    {
        anyhow::ensure!(Instant::now() < deadline, "the binary did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db = side_connection(&database.url).await?;
    db.batch_execute("ALTER TABLE audit_events ADD CONSTRAINT refuse_all CHECK (false) NOT VALID")
        .await?;
    create_tenant(
        &http,
        &format!("http://{address}"),
        "http://127.0.0.1:9/mcp",
    )
    .await?;
    let locker = locking(&database.url, "audit_events").await?;
    wait_for_lock_waiter(&db, "audit_events").await?;

    sigterm(child.id().context("pid")?).await?;
    let exit = tokio::time::timeout(Duration::from_secs(8), child.wait()).await;
    locker.batch_execute("COMMIT").await?;
    let exit = exit.context("the process did not exit within its drain bounds")??;
    assert_eq!(exit.code(), Some(0), "exit status {exit:?}");
    // Until the output's end (the reader drops its sender there).
    let mut lines = Vec::new();
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), logs.recv()).await {
        lines.push(line);
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("audit events lost on stop") && l.contains("\"events\":1")),
        "no word of the lost event: {lines:#?}"
    );
    Ok(())
}
