//! Memory of the MCP endpoint, in a test binary of its own so that no other test's
//! allocations share the process whose resident memory it reads: 200 sessions opened,
//! used and closed leave it flat, and every closed session gives its slot back.

mod common;

use anyhow::Context as _;
use common::gateway::{CreatedTenant, TestGateway};
use common::mcp_client::connect;
use common::upstream::TestUpstream;
use rmcp::model::CallToolRequestParams;
use serde_json::json;

async fn tenant_on(gw: &TestGateway, upstream_url: &str) -> anyhow::Result<CreatedTenant> {
    gw.create_tenant(
        json!({"integrationKey": "k", "integrationAppToken": "upstream-secret",
                            "upstreamUrl": upstream_url}),
    )
    .await
}

fn echo(text: &str) -> CallToolRequestParams {
    let args = json!({ "text": text });
    CallToolRequestParams::new("echo").with_arguments(args.as_object().cloned().unwrap_or_default())
}

/// This process's resident memory; an error, not zero, when it cannot be read.
fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("no resident field in /proc/self/statm")?
        .parse()?;
    anyhow::ensure!(pages > 0, "resident memory read as 0");
    Ok(pages * 4096)
}

#[tokio::test]
async fn two_hundred_sessions_opened_and_closed_leave_memory_flat() -> anyhow::Result<()> {
    const LIMIT_MB: f64 = 20.0;
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = tenant_on(&gw, &upstream.url).await?;
    let url = gw.url(&format!("/mcp/{}", t.id));
    let cycle = |n: usize| {
        let url = url.clone();
        let key = t.api_key.clone();
        async move {
            for _ in 0..n {
                let (client, _) = connect(&url, &key).await?;
                client.peer().call_tool(echo("m")).await?;
                client.cancel().await?;
            }
            anyhow::Ok(())
        }
    };
    cycle(30).await?; // warm-up: allocator pools, connection pools, the tenant actor
    let before = rss_bytes()?;
    cycle(200).await?;
    let after = rss_bytes()?;
    let growth_mb = (after as f64 - before as f64) / (1024.0 * 1024.0);
    println!(
        "RSS before {before} B, after {after} B, growth {growth_mb:.2} MB (limit {LIMIT_MB} MB)"
    );
    assert!(
        growth_mb < LIMIT_MB,
        "200 sessions grew RSS by {growth_mb:.2} MB"
    );
    // 230 sessions of one tenant passed its cap of 100: every closed session gave its slot back.
    gw.stop().await
}
