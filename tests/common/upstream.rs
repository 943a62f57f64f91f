//! [`TestUpstream`]: a real MCP server (rmcp) on a loopback port, standing in for Integration
//! App or any tenant's upstream. It serves Streamable HTTP on `/mcp` and legacy HTTP+SSE on
//! `/sse` + `/message`, records every bearer token and counts initializes, tool calls and
//! cancellations, can hang tool calls, can change its tool list (telling every session), and
//! can be stopped (every connection dropped at once) and restarted on the same port.

mod legacy_sse;
mod tools;

use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use axum::{
    extract::{Request, State as AxumState},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{any, get, post},
    Router,
};
use http::HeaderMap;
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use rmcp::transport::streamable_http_server::{
    session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use self::{legacy_sse::Legacy, tools::State};

/// How long the `wait_for_*` helpers wait before failing the test.
const WAIT: Duration = Duration::from_secs(10);

pub struct TestUpstream {
    /// The Streamable HTTP endpoint, `http://127.0.0.1:PORT/mcp`.
    pub url: String,
    /// The legacy SSE endpoint, `http://127.0.0.1:PORT/sse`.
    pub sse_url: Option<String>,
    pub addr: SocketAddr,
    state: Arc<State>,
    running: Mutex<Option<Running>>,
}

/// One run of the server: cancelling `ct` ends the accept loop, every connection and every
/// MCP session.
struct Running {
    ct: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestUpstream {
    pub async fn start() -> anyhow::Result<Self> {
        Self::with_tools(&[]).await
    }

    /// Serves its own tools plus `named` ones, each answering its own name.
    pub async fn with_tools(named: &[&str]) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        set_named(&state, named);
        let running = serve(listener, state.clone());
        Ok(Self {
            url: format!("http://{addr}/mcp"),
            sse_url: Some(format!("http://{addr}/sse")),
            addr,
            state,
            running: Mutex::new(Some(running)),
        })
    }

    /// Every bearer token received, one per HTTP request, in order.
    pub fn seen_tokens(&self) -> Vec<String> {
        self.state
            .tokens
            .lock()
            .map(|tokens| tokens.clone())
            .unwrap_or_default()
    }

    /// While on, tool calls never answer (until cancelled).
    pub fn set_hang(&self, on: bool) {
        self.state.hang.store(on, Ordering::SeqCst);
    }

    /// Session `DELETE`s wait this long before they are served (an upstream slow to end
    /// sessions).
    pub fn set_slow_close(&self, wait: Duration) {
        let ms = wait.as_millis() as usize;
        self.state.slow_close_ms.store(ms, Ordering::SeqCst);
    }

    /// The next complete `tools/list` is computed as the tools are now, and its last page
    /// held until [`Self::release_list`].
    /// From now on every `tools/list` page names a next one: a list that never ends.
    pub fn list_endlessly(&self) {
        self.state.endless_list.store(true, Ordering::SeqCst);
    }

    /// As [`Self::list_endlessly`], each cursor padded to about `bytes`.
    pub fn list_endlessly_with_cursors_of(&self, bytes: usize) {
        self.state.endless_cursor_pad.store(bytes, Ordering::SeqCst);
        self.list_endlessly();
    }

    /// `tools/list` requests served so far (each page is one).
    pub fn lists(&self) -> usize {
        self.state.lists.load(Ordering::SeqCst)
    }

    pub fn hold_next_list(&self) {
        self.state.hold_next_list.store(true, Ordering::SeqCst);
    }

    /// Waits until `n` lists in all were held by [`Self::hold_next_list`] (fails after
    /// 10 s).
    pub async fn wait_for_held_lists(&self, n: usize) -> anyhow::Result<()> {
        self.wait_until(|state| state.lists_held.load(Ordering::SeqCst) >= n)
            .await
    }

    /// Sends the held list.
    pub fn release_list(&self) {
        self.state.release_list.notify_waiters();
    }

    /// POSTs of JSON-RPC `method` get HTTP 502 (until `None`); everything else is served.
    pub fn set_failing(&self, method: Option<&str>) {
        self.set_failing_with(method, 502);
    }

    /// POSTs of JSON-RPC `method` get HTTP `status` in plain text, a 429 with
    /// `Retry-After: 7`, a 400 as an upstream on the TypeScript SDK answers a session it
    /// does not know: a JSON-RPC error -32000 with `"id": null`, a 503 as its example server
    /// answers a tool that threw: -32603 with `"id": null`; a 200 is an event stream cut
    /// off before its answer, with no event id to resume from (until `None`); everything
    /// else is served.
    pub fn set_failing_with(&self, method: Option<&str>, status: u16) {
        if let Ok(mut failing) = self.state.failing_method.lock() {
            *failing = method.map(|method| (method.to_owned(), status, 7));
        }
    }

    /// POSTs of JSON-RPC `method` get HTTP 429 with `Retry-After: {secs}`.
    pub fn set_throttling(&self, method: &str, secs: u64) {
        if let Ok(mut failing) = self.state.failing_method.lock() {
            *failing = Some((method.to_owned(), 429, secs));
        }
    }

    /// POSTs of the JSON-RPC `methods` are never answered, not even with headers, until
    /// the client gives up on them (until set to none); everything else is served.
    pub fn set_stalling(&self, methods: &[&str]) {
        if let Ok(mut stalling) = self.state.stalling_methods.lock() {
            *stalling = methods.iter().map(|method| method.to_string()).collect();
        }
    }

    /// Pings are answered only after `wait` (an upstream slow to answer while busy).
    pub fn set_slow_ping(&self, wait: Duration) {
        let ms = wait.as_millis() as usize;
        self.state.slow_ping_ms.store(ms, Ordering::SeqCst);
    }

    /// While on, no POST is answered, not even with headers: the server is frozen with its
    /// connections open (no connection breaks, nothing tells the client it is gone).
    pub fn set_silent(&self, on: bool) {
        self.state.silent.store(on, Ordering::SeqCst);
    }

    /// Stalled POSTs (see [`Self::set_stalling`]) whose connection is still open.
    pub fn stalled_open(&self) -> usize {
        self.state.stalled_open.load(Ordering::SeqCst)
    }

    /// Waits until every stalled POST has been given up by its client (fails after 10 s).
    pub async fn wait_for_no_stalled_posts(&self) -> anyhow::Result<()> {
        self.wait_until(|state| state.stalled_open.load(Ordering::SeqCst) == 0)
            .await
    }

    /// Kills the server: the listener closes and every connection is dropped at once.
    pub async fn stop(&self) {
        let running = self
            .running
            .lock()
            .ok()
            .and_then(|mut running| running.take());
        if let Some(running) = running {
            running.ct.cancel();
            let _ = running.task.await;
        }
        if let Ok(mut peers) = self.state.peers.lock() {
            peers.clear();
        }
    }

    /// Brings the server back on the same port, with no sessions.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await;
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(self.addr)?;
        let listener = socket.listen(128)?;
        let running = serve(listener, self.state.clone());
        if let Ok(mut slot) = self.running.lock() {
            *slot = Some(running);
        }
        Ok(())
    }

    /// Toggles the `extra` tool and sends `notifications/tools/list_changed` to every session.
    pub async fn set_tools_changed(&self) {
        self.state.extra_tool.fetch_xor(true, Ordering::SeqCst);
        self.announce_tools_changed().await;
    }

    /// Replaces the named tools and sends `notifications/tools/list_changed` to every session.
    pub async fn set_tools(&self, named: &[&str]) {
        set_named(&self.state, named);
        self.announce_tools_changed().await;
    }

    /// Changes the named tools (`new_0`, `new_1`, ...) until `heard` is notified, at most
    /// five rounds of 3 s; true once heard. A downstream listener subscribes in a task of its
    /// own, so a change announced before that lands is not a bug: each round changes again.
    pub async fn change_tools_until_heard(&self, heard: &tokio::sync::Notify) -> bool {
        for round in 0..5 {
            self.set_tools(&[&format!("new_{round}")]).await;
            if tokio::time::timeout(Duration::from_secs(3), heard.notified())
                .await
                .is_ok()
            {
                return true;
            }
        }
        false
    }

    async fn announce_tools_changed(&self) {
        let peers = self
            .state
            .peers
            .lock()
            .map(|peers| peers.clone())
            .unwrap_or_default();
        for peer in peers {
            let _ = peer.notify_tool_list_changed().await;
        }
    }

    pub fn calls(&self) -> usize {
        self.state.calls.load(Ordering::SeqCst)
    }

    pub fn initializes(&self) -> usize {
        self.state.initializes.load(Ordering::SeqCst)
    }

    /// HTTP requests received so far, of any method and path.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn cancellations(&self) -> usize {
        self.state.cancellations.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` `notifications/cancelled` have arrived (fails after 10 s).
    pub async fn wait_for_cancellations(&self, n: usize) -> anyhow::Result<()> {
        self.wait_until(|state| state.cancellations.load(Ordering::SeqCst) >= n)
            .await
    }

    /// Waits until at least `n` session `DELETE`s have arrived (fails after 10 s).
    pub async fn wait_for_deletes(&self, n: usize) -> anyhow::Result<()> {
        self.wait_until(|state| state.deletes.load(Ordering::SeqCst) >= n)
            .await
    }

    /// Waits until at least `n` tool calls have arrived (fails after 10 s).
    pub async fn wait_for_calls(&self, n: usize) -> anyhow::Result<()> {
        self.wait_until(|state| state.calls.load(Ordering::SeqCst) >= n)
            .await
    }

    async fn wait_until(&self, done: impl Fn(&State) -> bool) -> anyhow::Result<()> {
        let wait = async {
            loop {
                let changed = self.state.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if done(&self.state) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .map_err(|_| anyhow::anyhow!("the test upstream did not reach the expected state"))
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        if let Ok(mut running) = self.running.lock() {
            if let Some(running) = running.take() {
                running.ct.cancel();
                running.task.abort();
            }
        }
    }
}

fn set_named(state: &State, named: &[&str]) {
    if let Ok(mut slot) = state.named.lock() {
        *slot = named.iter().map(|name| name.to_string()).collect();
    }
}

/// The `Authorization: Bearer` token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::to_owned)
}

fn serve(listener: TcpListener, state: Arc<State>) -> Running {
    let ct = CancellationToken::new();
    let mcp = StreamableHttpService::new(
        {
            let state = state.clone();
            move || Ok(tools::TestServer::new(state.clone()))
        },
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default()
            .with_allowed_hosts(["localhost", "127.0.0.1"])
            .with_cancellation_token(ct.child_token()),
    );
    let router = Router::new()
        .route("/sse", get(legacy_sse::open))
        .route("/message", post(legacy_sse::post))
        .with_state(Legacy::new(state.clone(), ct.child_token()))
        .nest_service("/mcp", mcp)
        // Moved within the origin: what an upstream behind a rewritten path may answer.
        .route(
            "/moved/mcp",
            any(|| async { moved(http::StatusCode::TEMPORARY_REDIRECT) }),
        )
        .route(
            "/found/mcp",
            any(|| async { moved(http::StatusCode::FOUND) }),
        )
        .layer(axum::middleware::from_fn_with_state(state, record_token));
    let task = tokio::spawn(accept_loop(listener, router, ct.clone()));
    Running { ct, task }
}

/// A redirect to this server's `/mcp`, with `status`.
fn moved(status: http::StatusCode) -> impl axum::response::IntoResponse {
    (status, [(http::header::LOCATION, "/mcp")])
}

/// Serves connections until `ct` is cancelled, then drops them all (unlike a graceful
/// shutdown, which would wait for the long-lived SSE streams).
async fn accept_loop(listener: TcpListener, router: Router, ct: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = ct.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // rmcp writes an answer in parts: without it, each part after the first
                // waits for the client's delayed ACK (~40 ms).
                let _ = stream.set_nodelay(true);
                let service = router
                    .clone()
                    .map_request(|request: Request<hyper::body::Incoming>| {
                        request.map(axum::body::Body::new)
                    });
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                        .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}

async fn record_token(
    AxumState(state): AxumState<Arc<State>>,
    request: Request,
    next: Next,
) -> Response {
    state.bump(&state.requests);
    if let Some(token) = bearer(request.headers()) {
        if let Ok(mut tokens) = state.tokens.lock() {
            tokens.push(token);
        }
    }
    if request.method() == http::Method::DELETE {
        state.bump(&state.deletes);
    }
    let slow_close = state.slow_close_ms.load(Ordering::SeqCst);
    if request.method() == http::Method::DELETE && slow_close > 0 {
        tokio::time::sleep(Duration::from_millis(slow_close as u64)).await;
    }
    let failing = state.failing_method.lock().ok().and_then(|f| f.clone());
    let stalling = state
        .stalling_methods
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    if request.method() == http::Method::POST && state.silent.load(Ordering::SeqCst) {
        let _open = StalledPost::open(state.clone());
        std::future::pending::<()>().await;
    }
    let slow_ping = state.slow_ping_ms.load(Ordering::SeqCst) as u64;
    if request.method() != http::Method::POST
        || (failing.is_none() && stalling.is_empty() && slow_ping == 0)
    {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return http::StatusCode::BAD_REQUEST.into_response();
    };
    let method = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|m| m["method"].as_str().map(str::to_owned));
    let failing = failing.filter(|(failing, _, _)| method.as_ref() == Some(failing));
    if let Some((_, status, retry_after)) = failing {
        let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::BAD_GATEWAY);
        if status == http::StatusCode::OK {
            let stream = [(http::header::CONTENT_TYPE, "text/event-stream")];
            return (stream, ": cut off\n\n").into_response();
        }
        let unmatched = |code: i32, message: &str| {
            let error = serde_json::json!({"jsonrpc": "2.0", "id": null, "error": {
                "code": code, "message": message}});
            (status, axum::Json(error)).into_response()
        };
        if status == http::StatusCode::BAD_REQUEST {
            return unmatched(-32000, "Bad Request: No valid session ID provided");
        }
        if status == http::StatusCode::SERVICE_UNAVAILABLE {
            return unmatched(-32603, "Internal server error");
        }
        let mut answer = (status, "failing on purpose").into_response();
        if status == http::StatusCode::TOO_MANY_REQUESTS {
            answer.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(retry_after),
            );
        }
        return answer;
    }
    if method.as_deref() == Some("ping") {
        tokio::time::sleep(Duration::from_millis(slow_ping)).await;
    }
    if method
        .as_ref()
        .is_some_and(|method| stalling.contains(method))
    {
        // Counted while this future lives: hyper drops it when the client closes the
        // connection.
        let _open = StalledPost::open(state);
        std::future::pending::<()>().await;
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// One stalled POST, counted in `stalled_open` until dropped.
struct StalledPost(Arc<State>);

impl StalledPost {
    fn open(state: Arc<State>) -> Self {
        state.bump(&state.stalled_open);
        Self(state)
    }
}

impl Drop for StalledPost {
    fn drop(&mut self) {
        self.0.stalled_open.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}
