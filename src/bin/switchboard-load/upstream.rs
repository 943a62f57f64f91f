//! The load tool's upstream: a small, fast rmcp MCP server on a loopback port with two
//! tools, `echo` (returns its text) and `sleep` (waits `ms` milliseconds). It is kept
//! minimal on purpose, so that what the load tool measures on top of it is the gateway.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::serve::ListenerExt;
use axum::Router;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    JsonObject, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// A running echo upstream; stops when dropped.
pub struct EchoUpstream {
    pub url: String,
    ct: CancellationToken,
}

impl EchoUpstream {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let ct = CancellationToken::new();
        let tools = Arc::new(vec![
            tool(
                "echo",
                "Returns its text",
                json!({"text": {"type": "string"}}),
            ),
            tool(
                "sleep",
                "Sleeps ms milliseconds",
                json!({"ms": {"type": "integer"}}),
            ),
        ]);
        let mcp = StreamableHttpService::new(
            move || {
                Ok(Echo {
                    tools: tools.clone(),
                })
            },
            Arc::new(LocalSessionManager::default()),
            StreamableHttpServerConfig::default()
                .with_allowed_hosts(["localhost", "127.0.0.1"])
                .with_json_response(true)
                .with_cancellation_token(ct.child_token()),
        );
        let router = Router::new().nest_service("/mcp", mcp);
        // Without TCP_NODELAY a small answer written in two parts waits for the delayed
        // ACK (~40 ms on Linux): that would measure the kernel, not the server.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let stop = ct.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
        });
        Ok(Self {
            url: format!("http://{addr}/mcp"),
            ct,
        })
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.ct.cancel();
    }
}

fn tool(name: &'static str, description: &'static str, properties: Value) -> Tool {
    let mut schema = JsonObject::new();
    schema.insert("type".into(), json!("object"));
    schema.insert("properties".into(), properties);
    Tool::new(name, description, Arc::new(schema))
}

#[derive(Clone)]
struct Echo {
    tools: Arc<Vec<Tool>>,
}

impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("load-echo", "0.0.0"))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(self.tools.to_vec()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        let result = match request.name.as_ref() {
            "echo" => {
                let text = args.get("text").and_then(Value::as_str).unwrap_or_default();
                CallToolResult::success(vec![ContentBlock::text(text.to_owned())])
            }
            "sleep" => {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                CallToolResult::success(vec![ContentBlock::text(format!("slept {ms} ms"))])
            }
            other => {
                return Err(ErrorData::invalid_params(
                    format!("unknown tool: {other}"),
                    None,
                ))
            }
        };
        Ok(result.into())
    }
}
