//! The three ways the load tool calls the echo tool: rmcp's client straight to the
//! upstream (the baseline), the gateway's REST route, and rmcp's client on the gateway's
//! `/mcp/{tenantId}`; and the gateway process and admin API they need.

use std::time::Duration;

use anyhow::Context;
use rmcp::model::{CallToolRequestParams, ClientConfig, ProtocolVersion};
use rmcp::service::{ClientLifecycleMode, ClientServiceExt, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{RoleClient, ServiceExt};
use serde_json::{json, Value};

use crate::process::{ChildGateway, Launch, ADMIN_KEY};

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
    pub async fn start(launch: &Launch, upstream_url: &str) -> anyhow::Result<Self> {
        let child = ChildGateway::spawn(launch, upstream_url).await?;
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
    // A tool error is 200 with `isError: true`: a failed call, as `mcp_call` counts it.
    match sent {
        Ok(resp) if resp.status().is_success() => match resp.bytes().await {
            Ok(body) => serde_json::from_slice::<Value>(&body)
                .is_ok_and(|answer| answer["isError"] != Value::Bool(true)),
            Err(_) => false,
        },
        _ => false,
    }
}

/// How a load-tool MCP client starts its lifecycle with the server.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    /// rmcp's `serve()`, what an rmcp client does by default: an `initialize` handshake,
    /// which the server answers with a revision that has sessions (2025-11-25), so every
    /// answer comes as Server-Sent Events on a session. The gateway talks to its upstream
    /// this way.
    Initialize,
    /// `server/discover`, then 2026-07-28 session-less requests: each call is a POST
    /// answered with plain JSON (the servers here answer JSON where they can).
    Stateless,
}

/// rmcp's Streamable HTTP client on `url` (connected), with an optional bearer, that keeps
/// up to `in_flight` requests open at once. rmcp's default is 16 and queues the rest, so 64
/// callers on a default client would be 16 requests in flight, not 64.
pub async fn mcp_connect(
    http: reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    protocol: Protocol,
    in_flight: usize,
) -> anyhow::Result<McpClient> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned())
        .max_concurrent_requests(in_flight);
    if let Some(token) = bearer {
        config = config.auth_header(token);
    }
    let transport = StreamableHttpClientTransport::with_client(http, config);
    let client = ClientConfig::default();
    let connected = match protocol {
        Protocol::Initialize => client.serve(transport).await,
        Protocol::Stateless => {
            let lifecycle = ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            };
            client.serve_with_lifecycle(transport, lifecycle).await
        }
    };
    connected.context("MCP connect")
}

/// One `tools/call` of `echo` on an rmcp client; true when answered without error.
pub async fn mcp_echo(peer: &rmcp::Peer<RoleClient>) -> bool {
    mcp_call(peer, "echo", json!({"text": "hello"})).await
}

/// One `tools/call` of `tool` on an rmcp client; true when answered without error.
pub async fn mcp_call(peer: &rmcp::Peer<RoleClient>, tool: &'static str, args: Value) -> bool {
    let Value::Object(args) = args else {
        return false;
    };
    let params = CallToolRequestParams::new(tool).with_arguments(args);
    matches!(peer.call_tool(params).await, Ok(r) if r.is_error != Some(true))
}
