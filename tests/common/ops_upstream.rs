//! A tiny real MCP upstream for the operations tests: `echo` (answers its arguments as
//! text) and `sleep` (waits `ms` milliseconds, then answers), served over Streamable HTTP
//! on a loopback port 0. Stops when dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ContentBlock, ListToolsResult, PaginatedRequestParams,
    ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{RequestContext, RoleServer};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, ServerHandler};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct OpsServer {
    /// Counts `sleep` calls that started, so tests wait on it instead of sleeping.
    sleeps: Arc<watch::Sender<usize>>,
}

fn object_schema() -> Arc<serde_json::Map<String, serde_json::Value>> {
    let schema = serde_json::json!({ "type": "object" });
    Arc::new(schema.as_object().cloned().unwrap_or_default())
}

impl ServerHandler for OpsServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(vec![
            Tool::new("echo", "answers its arguments", object_schema()),
            Tool::new("sleep", "waits `ms` milliseconds", object_schema()),
        ]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, ErrorData> {
        let args = request.arguments.unwrap_or_default();
        let text = match request.name.as_ref() {
            "echo" => serde_json::Value::Object(args).to_string(),
            "sleep" => {
                self.sleeps.send_modify(|n| *n += 1);
                let ms = args.get("ms").and_then(|v| v.as_u64()).unwrap_or(200);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                format!("slept {ms}ms")
            }
            _ => return Err(ErrorData::invalid_params("no such tool", None)),
        };
        Ok(CallToolResult::success(vec![ContentBlock::text(text)]).into())
    }
}

pub struct OpsUpstream {
    pub url: String,
    stop: CancellationToken,
    sleeps: watch::Receiver<usize>,
}

impl OpsUpstream {
    pub async fn start() -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let config = StreamableHttpServerConfig::default()
            .with_sse_keep_alive(None)
            .with_cancellation_token(stop.child_token());
        let (sleeps, started) = watch::channel(0usize);
        let server = OpsServer {
            sleeps: Arc::new(sleeps),
        };
        let service: StreamableHttpService<OpsServer, LocalSessionManager> =
            StreamableHttpService::new(move || Ok(server.clone()), Default::default(), config);
        let router = axum::Router::new().nest_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let until = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(until.cancelled_owned())
                .await;
        });
        Ok(Self {
            url: format!("http://{addr}/mcp"),
            stop,
            sleeps: started,
        })
    }

    /// Waits until at least `n` `sleep` calls have started.
    pub async fn sleeps_started(&self, n: usize) -> anyhow::Result<()> {
        let mut rx = self.sleeps.clone();
        rx.wait_for(|started| *started >= n).await?;
        Ok(())
    }
}

impl Drop for OpsUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
