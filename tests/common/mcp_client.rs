//! Clients of the gateway's `/mcp/{tenantId}` endpoint for tests: rmcp's own client (with a
//! handler that signals tool-list changes on a `Notify`), and raw JSON-RPC over reqwest.

use std::sync::Arc;

use anyhow::Context;
use rmcp::model::ClientConfig;
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::Value;
use tokio::sync::Notify;

/// A client handler that wakes `changed` on `notifications/tools/list_changed`.
#[derive(Clone, Default)]
pub struct Watcher {
    pub changed: Arc<Notify>,
}

impl ClientHandler for Watcher {
    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.changed.notify_one();
    }

    fn get_info(&self) -> ClientConfig {
        ClientConfig::default()
    }
}

pub type McpClient = RunningService<RoleClient, Watcher>;

/// Connects rmcp's Streamable HTTP client to `url` with `Authorization: Bearer <token>`.
pub async fn connect(url: &str, token: &str) -> anyhow::Result<(McpClient, Arc<Notify>)> {
    let watcher = Watcher::default();
    let changed = watcher.changed.clone();
    let config = StreamableHttpClientTransportConfig::with_uri(url.to_owned()).auth_header(token);
    let transport = StreamableHttpClientTransport::from_config(config);
    let client = watcher.serve(transport).await.context("connect")?;
    Ok((client, changed))
}

/// One raw HTTP answer: status, headers, and the JSON-RPC messages of its body (one JSON
/// body, or the `data:` lines of an event stream).
pub struct Raw {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub messages: Vec<Value>,
    pub text: String,
}

impl Raw {
    /// The first message that answers a request (has `result` or `error`).
    pub fn answer(&self) -> Value {
        self.messages
            .iter()
            .find(|m| m.get("result").is_some() || m.get("error").is_some())
            .cloned()
            .unwrap_or(Value::Null)
    }
}

/// Sends `method` with `headers` and an optional JSON body; MCP's Accept header included.
pub async fn raw(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> anyhow::Result<Raw> {
    let mut req = http
        .request(method, url)
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let messages = if text.trim_start().starts_with('{') {
        vec![serde_json::from_str(&text)?]
    } else {
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str(d.trim()).ok())
            .collect()
    };
    Ok(Raw {
        status,
        headers,
        messages,
        text,
    })
}
