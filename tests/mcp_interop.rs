//! Third-party MCP clients against the gateway on loopback: the official Python SDK (PyPI
//! `mcp`, tests/peers/mcp_client.py) and the MCP Inspector CLI (npm
//! `@modelcontextprotocol/inspector --cli`), both pinned and installed by
//! `tests/peers/install.sh`. Each lists the tenant's tools and calls one, and is refused
//! with a wrong or foreign credential. A missing peer FAILS the test, naming the fix.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::Context;
use common::gateway::TestGateway;
use common::upstream::TestUpstream;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn require(path: &Path, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        path.exists(),
        "{what} is not installed ({} missing): run tests/peers/install.sh",
        path.display()
    );
    Ok(())
}

async fn run(program: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .current_dir(root())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(std::time::Duration::from_secs(120), child)
        .await
        .context("peer client timed out")?
        .with_context(|| format!("could not run {}", program.display()))
}

fn python() -> anyhow::Result<PathBuf> {
    let python = root().join(".venv/bin/python");
    require(&python, "the Python MCP SDK (.venv)")?;
    Ok(python)
}

async fn python_client(url: &str, token: &str) -> anyhow::Result<(bool, Value)> {
    let script = root().join("tests/peers/mcp_client.py");
    let out = run(
        &python()?,
        &[script.to_str().context("path")?, url, token, "from python"],
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or("null");
    let value = serde_json::from_str(line).with_context(|| {
        format!(
            "python client printed {stdout:?}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.success(), value))
}

fn inspector() -> anyhow::Result<PathBuf> {
    let bin = root().join("tests/peers/inspector/node_modules/.bin/mcp-inspector");
    require(
        &bin,
        "the MCP Inspector CLI (tests/peers/inspector/node_modules)",
    )?;
    Ok(bin)
}

async fn inspector_cli(url: &str, token: &str, extra: &[&str]) -> anyhow::Result<(bool, String)> {
    let auth = format!("Authorization: Bearer {token}");
    let mut args = vec!["--cli", url, "--transport", "http", "--header", &auth];
    args.extend_from_slice(extra);
    let out = run(&inspector()?, &args).await?;
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

struct Fixture {
    gw: TestGateway,
    _upstream: TestUpstream,
    url: String,
    key: String,
    foreign_key: String,
}

async fn fixture() -> anyhow::Result<Fixture> {
    let upstream = TestUpstream::with_tools(&["extra"]).await?;
    let gw = TestGateway::start().await?;
    let body =
        json!({"integrationKey": "k", "integrationAppToken": "t", "upstreamUrl": upstream.url});
    let tenant = gw.create_tenant(body.clone()).await?;
    let other = gw.create_tenant(body).await?;
    let url = gw.url(&format!("/mcp/{}", tenant.id));
    Ok(Fixture {
        gw,
        _upstream: upstream,
        url,
        key: tenant.api_key,
        foreign_key: other.api_key,
    })
}

#[tokio::test]
async fn python_sdk_client_lists_calls_and_is_refused_with_a_bad_credential() -> anyhow::Result<()>
{
    python()?;
    let f = fixture().await?;
    let (ok, out) = python_client(&f.url, &f.key).await?;
    assert!(ok, "python client failed: {out}");
    assert_eq!(out["serverName"], "switchboard", "{out}");
    assert_eq!(
        out["tools"],
        json!(["add", "echo", "extra", "fail", "progress", "sleep", "whoami"]),
        "{out}"
    );
    assert_eq!(out["call"]["content"][0]["text"], "from python", "{out}");
    assert_eq!(
        out["call"]["structuredContent"],
        json!({"echo": "from python"}),
        "{out}"
    );
    assert_ne!(out["call"]["isError"], json!(true), "{out}");
    for bad in [format!("{}x", f.key), f.foreign_key.clone()] {
        let (ok, out) = python_client(&f.url, &bad).await?;
        assert!(!ok, "a bad credential must be refused: {out}");
        // The SDK reports the refusal as a failed request without its status; the client
        // script records the status of every response, so a crash or a 5xx cannot pass
        // for a refusal. Which of 401 and 403 is checked in tests/mcp_endpoint.rs.
        let err = out["error"].as_str().unwrap_or_default();
        assert!(!err.is_empty(), "{out}");
        let statuses = out["statuses"].as_array().cloned().unwrap_or_default();
        assert!(
            !statuses.is_empty() && statuses.iter().all(|s| s == 401 || s == 403),
            "refused with 401 or 403 only: {out}"
        );
        println!("python client refused as expected: {err} {statuses:?}");
        assert!(!err.contains(&bad), "no secret echoed: {out}");
    }
    f.gw.stop().await
}

#[tokio::test]
async fn inspector_cli_lists_calls_and_is_refused_with_a_bad_credential() -> anyhow::Result<()> {
    inspector()?;
    let f = fixture().await?;
    let (ok, listed) = inspector_cli(&f.url, &f.key, &["--method", "tools/list"]).await?;
    assert!(ok, "inspector tools/list failed: {listed}");
    for tool in ["\"echo\"", "\"extra\"", "\"fail\""] {
        assert!(listed.contains(tool), "{tool} missing from: {listed}");
    }
    let call = [
        "--method",
        "tools/call",
        "--tool-name",
        "echo",
        "--tool-arg",
        "text=from-inspector",
    ];
    let (ok, called) = inspector_cli(&f.url, &f.key, &call).await?;
    assert!(ok, "inspector tools/call failed: {called}");
    assert!(called.contains("from-inspector"), "{called}");
    let fail = ["--method", "tools/call", "--tool-name", "fail"];
    let (_, failed) = inspector_cli(&f.url, &f.key, &fail).await?;
    assert!(
        failed.contains("isError") && failed.contains("true"),
        "{failed}"
    );
    for bad in [format!("{}x", f.key), f.foreign_key.clone()] {
        let (ok, out) = inspector_cli(&f.url, &bad, &["--method", "tools/list"]).await?;
        assert!(!ok, "a bad credential must be refused: {out}");
        // The Inspector names a 401 (it would start OAuth) and a 403 alike: auth_required.
        // A crash or a 5xx would not read so.
        assert!(out.contains("\"auth_required\""), "{out}");
        assert!(!out.contains("\"echo\""), "{out}");
    }
    f.gw.stop().await
}
