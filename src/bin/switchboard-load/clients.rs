//! The three ways the load tool calls the echo tool: rmcp's client straight to the
//! upstream (the baseline), the gateway's REST route, and rmcp's client on the gateway's
//! `/mcp/{tenantId}`; and the in-process gateway and admin API they need.

use std::time::Duration;

use anyhow::Context;
use rmcp::model::{CallToolRequestParams, ClientConfig};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};
use switchboard::config::Config;
use tokio_util::sync::CancellationToken;

pub type McpClient = RunningService<RoleClient, ClientConfig>;

/// The gateway, in this process, on a loopback port over a temporary SQLite file.
pub struct Gateway {
    pub base: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

/// A tenant created through the admin API.
#[derive(Clone)]
pub struct Tenant {
    pub id: String,
    pub api_key: String,
}

impl Gateway {
    pub async fn start(upstream_url: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::for_tests();
        config.database_url = Some(format!("sqlite://{}", dir.path().join("sb.db").display()));
        config.upstream_mcp_url = url::Url::parse(upstream_url)?;
        // Limits out of the way: the load tool measures the path, not the rate limiter.
        config.tenant_rate_limit = 1_000_000;
        config.tenant_rate_burst = 1_000_000;
        config.auth_rate_limit = 1_000_000;
        config.auth_rate_burst = 1_000_000;
        config.tenant_max_in_flight = 1024;
        let admin_key = config.admin_api_key.expose().to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let app = switchboard::app::App::build(config, shutdown.clone()).await?;
        tokio::spawn(app.serve(listener));
        Ok(Self {
            base: format!("http://{addr}"),
            admin_key,
            http: http_client(),
            shutdown,
            _dir: dir,
        })
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A reqwest client that keeps enough idle connections for every worker.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_default()
}

/// `POST /api/tenants` on the gateway at `base`, with `upstream_url` as the tenant's upstream.
pub async fn create_tenant(
    http: &reqwest::Client,
    base: &str,
    admin_key: &str,
    upstream_url: &str,
) -> anyhow::Result<Tenant> {
    let body = json!({"name": "load", "integrationKey": "load",
        "integrationAppToken": "load-token", "upstreamUrl": upstream_url});
    let resp = http
        .post(format!("{base}/api/tenants"))
        .bearer_auth(admin_key)
        .json(&body)
        .send()
        .await?;
    anyhow::ensure!(
        resp.status().as_u16() == 201,
        "create tenant: {}",
        resp.status()
    );
    let created: Value = resp.json().await?;
    Ok(Tenant {
        id: created["tenantId"].as_str().context("tenantId")?.to_owned(),
        api_key: created["apiKey"].as_str().context("apiKey")?.to_owned(),
    })
}

/// One REST tool call of `tool` with `args`; true on a 200.
pub async fn rest_call(
    http: &reqwest::Client,
    base: &str,
    tenant: &Tenant,
    tool: &str,
    args: Value,
) -> bool {
    let sent = http
        .post(format!("{base}/api/tenant/{}/tool", tenant.id))
        .header("x-api-key", &tenant.api_key)
        .json(&json!({"method": tool, "params": args}))
        .send()
        .await;
    match sent {
        Ok(resp) if resp.status().is_success() => resp.bytes().await.is_ok(),
        _ => false,
    }
}

/// rmcp's Streamable HTTP client on `url` (initialize done), with an optional bearer.
pub async fn mcp_connect(url: &str, bearer: Option<&str>) -> anyhow::Result<McpClient> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(token) = bearer {
        config = config.auth_header(token);
    }
    let transport = StreamableHttpClientTransport::with_client(http_client(), config);
    ClientConfig::default()
        .serve(transport)
        .await
        .context("MCP initialize")
}

/// One `tools/call` of `echo` on an rmcp client; true when answered without error.
pub async fn mcp_echo(peer: &rmcp::Peer<RoleClient>) -> bool {
    let args = json!({"text": "hello"});
    let Value::Object(args) = args else {
        return false;
    };
    let params = CallToolRequestParams::new("echo").with_arguments(args);
    matches!(peer.call_tool(params).await, Ok(r) if r.is_error != Some(true))
}
