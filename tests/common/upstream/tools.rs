//! The test upstream's MCP server: a real rmcp `ServerHandler` with a few tools (`echo`, `sleep`,
//! `fail`, `whoami`, `add`, `progress`, `extra` while toggled on, and any named by the test,
//! each answering its own name), two tools per `tools/list` page so pagination is exercised,
//! and counters of what it received.

use std::{
    borrow::Cow,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use rmcp::{
    model::{
        CallToolRequestParams, CallToolResponse, CallToolResult, CancelledNotificationParam,
        ContentBlock, Implementation, InitializeRequestParams, InitializeResult, JsonObject,
        ListToolsResult, PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities,
        ServerConfig, Tool,
    },
    service::{NotificationContext, RequestContext},
    ErrorData as McpError, Peer, RoleServer, ServerHandler,
};
use serde_json::{json, Value};
use tokio::sync::Notify;

/// Tools per `tools/list` page.
const PAGE_SIZE: usize = 2;

/// What the test upstream saw, shared by every session and both transports, and kept across
/// `stop`/`restart`.
#[derive(Default)]
pub struct State {
    pub tokens: Mutex<Vec<String>>,
    pub hang: AtomicBool,
    pub extra_tool: AtomicBool,
    /// Tools named by the test; each answers its own name.
    pub named: Mutex<Vec<String>>,
    pub calls: AtomicUsize,
    pub initializes: AtomicUsize,
    pub cancellations: AtomicUsize,
    /// Woken whenever a counter changes, for tests that wait for one.
    pub changed: Notify,
    /// Sessions that finished `initialize`, for `notifications/tools/list_changed`.
    pub peers: Mutex<Vec<Peer<RoleServer>>>,
    /// A JSON-RPC method whose POSTs get this HTTP error status, in plain text (an
    /// upstream that accepts sessions but fails that request); a 429 says `Retry-After`
    /// with the seconds given last.
    pub failing_method: Mutex<Option<(String, u16, u64)>>,
    /// JSON-RPC methods whose POSTs are never answered, not even with headers (an upstream
    /// that hangs and ignores cancellation).
    pub stalling_methods: Mutex<Vec<String>>,
    /// Every POST is stalled as above: an upstream frozen with its connections open.
    pub silent: AtomicBool,
    /// Stalled POSTs whose connection the client still holds open.
    pub stalled_open: AtomicUsize,
    /// How long a `ping` waits before it is served (0: not at all).
    pub slow_ping_ms: AtomicUsize,
    /// Session `DELETE`s received (served or still waiting).
    pub deletes: AtomicUsize,
    /// HTTP requests received, of any method and path.
    pub requests: AtomicUsize,
    /// How long a session's `DELETE` waits before it is served (0: not at all).
    pub slow_close_ms: AtomicUsize,
    /// The next `tools/list` answer that ends a listing is computed, then held until
    /// `release_list` is notified: a list that goes stale on its way.
    pub hold_next_list: AtomicBool,
    /// Every `tools/list` page names a next one (a fresh cursor each time): a list that
    /// never ends.
    pub endless_list: AtomicBool,
    /// Bytes of padding on each cursor of the endless list.
    pub endless_cursor_pad: AtomicUsize,
    /// `tools/list` requests served.
    pub lists: AtomicUsize,
    pub lists_held: AtomicUsize,
    pub release_list: Notify,
}

impl State {
    pub fn bump(&self, counter: &AtomicUsize) {
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn tools(&self) -> Vec<Tool> {
        let mut tools = vec![
            tool(
                "echo",
                "Returns its text",
                json!({"text": {"type": "string"}}),
                &["text"],
            ),
            tool(
                "sleep",
                "Sleeps ms milliseconds",
                json!({"ms": {"type": "integer"}}),
                &["ms"],
            ),
            tool("fail", "Always fails as a tool (isError)", json!({}), &[]),
            tool(
                "whoami",
                "Returns the caller's bearer token",
                json!({}),
                &[],
            ),
            tool(
                "add",
                "Adds a and b",
                json!({"a": {"type": "number"}, "b": {"type": "number"}}),
                &["a", "b"],
            ),
            tool(
                "progress",
                "Works `steps` steps of `ms` milliseconds, reporting progress after each",
                json!({"steps": {"type": "integer"}, "ms": {"type": "integer"}}),
                &[],
            ),
        ];
        if self.extra_tool.load(Ordering::SeqCst) {
            tools.push(tool(
                "extra",
                "Present after set_tools_changed",
                json!({}),
                &[],
            ));
        }
        for name in self.named() {
            tools.push(tool(name, "Answers its own name", json!({}), &[]));
        }
        tools
    }

    pub fn named(&self) -> Vec<String> {
        self.named
            .lock()
            .map(|named| named.clone())
            .unwrap_or_default()
    }
}

fn tool(
    name: impl Into<Cow<'static, str>>,
    description: &'static str,
    properties: Value,
    required: &[&str],
) -> Tool {
    let schema = json!({"type": "object", "properties": properties, "required": required});
    let schema: JsonObject = match schema {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    };
    Tool::new(name, description, Arc::new(schema))
}

/// One MCP session's handler; all sessions share [`State`].
#[derive(Clone)]
pub struct TestServer {
    state: Arc<State>,
}

impl TestServer {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }
}

impl ServerHandler for TestServer {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new("test-upstream", "0.0.0"))
    }

    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, McpError> {
        self.state.bump(&self.state.initializes);
        context.peer.set_peer_info(request.clone());
        self.negotiate_initialize(&request)
    }

    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        if let Ok(mut peers) = self.state.peers.lock() {
            peers.push(context.peer);
        }
    }

    async fn on_cancelled(
        &self,
        _notification: CancelledNotificationParam,
        _context: NotificationContext<RoleServer>,
    ) {
        self.state.bump(&self.state.cancellations);
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let tools = self.state.tools();
        let start = match request.and_then(|params| params.cursor) {
            Some(cursor) => cursor
                .split('~')
                .next()
                .unwrap_or_default()
                .parse::<usize>()
                .map_err(|_| McpError::invalid_params("bad cursor", None))?,
            None => 0,
        };
        self.state.bump(&self.state.lists);
        let end = (start + PAGE_SIZE).min(tools.len());
        let mut page = ListToolsResult::with_all_items(tools[start.min(end)..end].to_vec());
        if self.state.endless_list.load(Ordering::SeqCst) {
            let pad = self.state.endless_cursor_pad.load(Ordering::SeqCst);
            page.next_cursor = Some(format!("{}~{}", start + 1, "x".repeat(pad)));
        } else if end < tools.len() {
            page.next_cursor = Some(end.to_string());
        } else if self.state.hold_next_list.swap(false, Ordering::SeqCst) {
            let released = self.state.release_list.notified();
            self.state.bump(&self.state.lists_held);
            released.await;
        }
        Ok(page)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        self.state.bump(&self.state.calls);
        if self.state.hang.load(Ordering::SeqCst) {
            context.ct.cancelled().await;
            return Err(McpError::internal_error("cancelled", None));
        }
        let args = request.arguments.unwrap_or_default();
        let result = match request.name.as_ref() {
            "echo" => {
                let text = string_arg(&args, "text")?;
                let mut result = CallToolResult::success(vec![ContentBlock::text(text.clone())]);
                result.structured_content = Some(json!({ "echo": text }));
                result
            }
            "sleep" => {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(ms)) => {}
                    _ = context.ct.cancelled() => {
                        return Err(McpError::internal_error("cancelled", None));
                    }
                }
                CallToolResult::success(vec![ContentBlock::text(format!("slept {ms} ms"))])
            }
            "fail" => CallToolResult::error(vec![ContentBlock::text("the tool failed")]),
            "whoami" => {
                let bearer = bearer_of(&context);
                tell_log(&context, json!({ "caller": bearer })).await;
                CallToolResult::success(vec![ContentBlock::text(bearer)])
            }
            "add" => {
                let a = args.get("a").and_then(Value::as_f64).unwrap_or(0.0);
                let b = args.get("b").and_then(Value::as_f64).unwrap_or(0.0);
                CallToolResult::success(vec![ContentBlock::text((a + b).to_string())])
            }
            "progress" => {
                let steps = args.get("steps").and_then(Value::as_u64).unwrap_or(3);
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(10);
                report_progress(&context, steps, std::time::Duration::from_millis(ms)).await;
                CallToolResult::success(vec![ContentBlock::text(format!(
                    "done after {steps} steps"
                ))])
            }
            "extra" if self.state.extra_tool.load(Ordering::SeqCst) => {
                CallToolResult::success(vec![ContentBlock::text("extra")])
            }
            named if self.state.named().iter().any(|n| n == named) => {
                CallToolResult::success(vec![ContentBlock::text(named.to_owned())])
            }
            other => {
                return Err(McpError::invalid_params(
                    Cow::Owned(format!("unknown tool: {other}")),
                    None,
                ));
            }
        };
        Ok(result.into())
    }
}

/// `steps` steps of work of `step` each, with `notifications/progress` (progress 1..=steps
/// of `steps`) after each, when the request asked for progress; the answer follows the last
/// step's notification after one more step of work.
async fn report_progress(
    context: &RequestContext<RoleServer>,
    steps: u64,
    step: std::time::Duration,
) {
    let token = context.meta.get_progress_token();
    for done in 1..=steps {
        tokio::time::sleep(step).await;
        if let Some(token) = &token {
            let update = ProgressNotificationParam::new(token.clone(), done as f64)
                .with_total(steps as f64)
                .with_message(format!("step {done} of {steps}"));
            let _ = context.peer.notify_progress(update).await;
        }
    }
    tokio::time::sleep(step).await;
}

fn string_arg(args: &JsonObject, name: &str) -> Result<String, McpError> {
    args.get(name)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| McpError::invalid_params(format!("missing string argument {name}"), None))
}

/// Says `data` in a log notification (deprecated in MCP, still sent by servers out there):
/// an upstream may quote anything it was sent in one, which the gateway must not write into
/// its own log.
#[allow(deprecated)]
async fn tell_log(context: &RequestContext<RoleServer>, data: Value) {
    let said =
        rmcp::model::LoggingMessageNotificationParam::new(rmcp::model::LoggingLevel::Info, data);
    let _ = context.peer.notify_logging_message(said).await;
}

/// The bearer token of the HTTP request that carried this MCP request (empty when none).
fn bearer_of(context: &RequestContext<RoleServer>) -> String {
    context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|parts| super::bearer(&parts.headers))
        .unwrap_or_default()
}
