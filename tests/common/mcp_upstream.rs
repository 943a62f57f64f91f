//! A small upstream MCP server for the MCP endpoint tests: rmcp's Streamable HTTP server in
//! axum on 127.0.0.1:0. Tools: `echo` (text and structuredContent), `fail` (`isError`), and
//! any extra names given (they answer their own name). `set_tools` changes the list and sends
//! `notifications/tools/list_changed` to every session. Kept minimal so it can give way to
//! the shared upstream of tests/common/upstream.rs.

use std::sync::{Arc, Mutex};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, InitializeRequestParams,
    InitializeResult, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
    Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, Peer, RoleServer, ServerHandler};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Shared {
    tools: Mutex<Vec<String>>,
    peers: Mutex<Vec<Peer<RoleServer>>>,
}

#[derive(Clone)]
struct Upstream(Arc<Shared>);

pub struct McpUpstream {
    pub url: String,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

fn tool(name: &str) -> Tool {
    let schema = json!({"type": "object", "properties": {"text": {"type": "string"}}});
    let schema = schema.as_object().cloned().unwrap_or_default();
    Tool::new(
        name.to_owned(),
        format!("the {name} tool"),
        Arc::new(schema),
    )
}

impl McpUpstream {
    /// Serves `echo`, `fail` and `extra` tools.
    pub async fn start(extra: &[&str]) -> anyhow::Result<Self> {
        let shared = Arc::new(Shared::default());
        *shared.tools.lock().unwrap() = ["echo", "fail"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        let stop = CancellationToken::new();
        let handler = Upstream(shared.clone());
        let config = StreamableHttpServerConfig::default()
            .with_sse_keep_alive(None)
            .with_cancellation_token(stop.child_token());
        let service: StreamableHttpService<Upstream, LocalSessionManager> =
            StreamableHttpService::new(move || Ok(handler.clone()), Default::default(), config);
        let router = axum::Router::new().nest_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/mcp", listener.local_addr()?);
        let token = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Ok(Self { url, shared, stop })
    }

    /// Replaces the extra tools and tells every session that the list changed.
    pub async fn set_tools(&self, extra: &[&str]) {
        *self.shared.tools.lock().unwrap() = ["echo", "fail"]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect();
        let peers = self.shared.peers.lock().unwrap().clone();
        for peer in peers {
            let _ = peer.notify_tool_list_changed().await;
        }
    }
}

impl McpUpstream {
    /// Changes the extra tools (`new_0`, `new_1`, ...) until `heard` is notified, at most
    /// five rounds of 3 s; true once heard. A downstream listener subscribes in a task of its
    /// own, so a change announced before that lands is not a bug: each round changes again.
    pub async fn change_tools_until_heard(&self, heard: &tokio::sync::Notify) -> bool {
        for round in 0..5 {
            self.set_tools(&[&format!("new_{round}")]).await;
            let wait = tokio::time::timeout(std::time::Duration::from_secs(3), heard.notified());
            if wait.await.is_ok() {
                return true;
            }
        }
        false
    }
}

impl Drop for McpUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ServerHandler for Upstream {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_tool_list_changed()
                .build(),
        )
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        context.peer.set_peer_info(request.clone());
        self.0.peers.lock().unwrap().push(context.peer.clone());
        self.negotiate_initialize(&request)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let names = self.0.tools.lock().unwrap().clone();
        Ok(ListToolsResult::with_all_items(
            names.iter().map(|n| tool(n)).collect(),
        ))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let text = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("text"))
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_owned();
        let result = match request.name.as_ref() {
            "echo" => {
                let mut r = CallToolResult::success(vec![ContentBlock::text(text.clone())]);
                r.structured_content = Some(json!({ "echoed": text }));
                r
            }
            "fail" => CallToolResult::error(vec![ContentBlock::text("the fail tool failed")]),
            other => CallToolResult::success(vec![ContentBlock::text(other.to_owned())]),
        };
        Ok(result.into())
    }
}
