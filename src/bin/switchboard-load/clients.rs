//! The three ways the load tool calls the echo tool: rmcp's client straight to the
//! upstream (the baseline), the gateway's REST route, and rmcp's client on the gateway's
//! `/mcp/{tenantId}`; and the gateway process and admin API they need.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rmcp::model::{CallToolRequestParams, ClientConfig, ProtocolVersion};
use rmcp::service::RunningService;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};

use crate::process::{ChildGateway, ADMIN_KEY};

pub type McpClient = RunningService<RoleClient, ClientConfig>;

/// The gateway under load: the real `switchboard` binary as a child process (its own
/// runtime and allocator, as in production), over a temporary SQLite file.
pub struct Gateway {
    pub base: String,
    pub admin_key: String,
    pub http: reqwest::Client,
    pub child: ChildGateway,
}

/// A tenant created through the admin API.
#[derive(Clone)]
pub struct Tenant {
    pub id: String,
    pub api_key: String,
}

impl Gateway {
    pub async fn start(bin: &Path, upstream_url: &str) -> anyhow::Result<Self> {
        let child = ChildGateway::spawn(bin, upstream_url).await?;
        Ok(Self {
            base: child.base.clone(),
            admin_key: ADMIN_KEY.to_owned(),
            http: http_client(),
            child,
        })
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

/// The MCP revision a load-tool client asks for.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    /// rmcp's default (2026-07-28): no session, answers as JSON where the server can.
    Default,
    /// 2025-11-25, as the gateway talks to its upstream: a session, answers as SSE.
    Session,
}

/// rmcp's Streamable HTTP client on `url` (connected), with an optional bearer.
pub async fn mcp_connect(
    url: &str,
    bearer: Option<&str>,
    protocol: Protocol,
) -> anyhow::Result<McpClient> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(token) = bearer {
        config = config.auth_header(token);
    }
    let transport = StreamableHttpClientTransport::with_client(http_client(), config);
    let client = match protocol {
        Protocol::Default => ClientConfig::default(),
        Protocol::Session => {
            ClientConfig::default().with_protocol_version(ProtocolVersion::LATEST_WITH_INITIALIZE)
        }
    };
    client.serve(transport).await.context("MCP initialize")
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
