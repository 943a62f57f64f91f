//! Clients of the gateway's `/mcp/{tenantId}` endpoint for tests: rmcp's own client (with a
//! handler that signals tool-list changes on a `Notify`), and raw JSON-RPC over reqwest
//! ([`raw`], and [`RawMcp`], which speaks 2025-11-25 sessions and 2026-07-28 session-less
//! requests as a client would, and keeps a `subscriptions/listen` stream open).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{Stream, StreamExt};
use rmcp::model::ClientConfig;
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{json, Value};
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

    /// The `params` of every `notifications/progress` in the body, in order.
    pub fn progress(&self) -> Vec<Value> {
        self.messages
            .iter()
            .filter(|m| m["method"] == "notifications/progress")
            .map(|m| m["params"].clone())
            .collect()
    }

    /// Where the answer is among the messages (to check what came before it).
    pub fn answer_position(&self) -> Option<usize> {
        self.messages
            .iter()
            .position(|m| m.get("result").is_some() || m.get("error").is_some())
    }
}

fn request(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> reqwest::RequestBuilder {
    let mut req = http
        .request(method, url)
        .header("accept", "application/json, text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(body) = body {
        req = req.json(body);
    }
    req
}

/// Sends `method` with `headers` and an optional JSON body; MCP's Accept header included.
pub async fn raw(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> anyhow::Result<Raw> {
    read(request(http, method, url, headers, body).send().await?).await
}

/// An answer, read whole.
async fn read(resp: reqwest::Response) -> anyhow::Result<Raw> {
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let messages = if text.trim_start().starts_with('{') {
        vec![serde_json::from_str(&text)?]
    } else {
        text.lines().filter_map(event_data).collect()
    };
    Ok(Raw {
        status,
        headers,
        messages,
        text,
    })
}

/// The ids of the first `n` events of an event-stream answer (reading no further than the
/// chunk that completes them).
pub async fn first_event_ids(
    resp: &mut reqwest::Response,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let mut text = String::new();
    loop {
        // Whole events only: each ends with a blank line.
        let whole = text.rfind("\n\n").map_or("", |end| &text[..end]);
        let ids: Vec<String> = whole
            .lines()
            .filter_map(|line| line.strip_prefix("id:"))
            .map(|id| id.trim().to_owned())
            .collect();
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
        let chunk = resp
            .chunk()
            .await?
            .context("the stream ended before its events")?;
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// The JSON-RPC message of one event-stream line, if it is a `data:` line that carries one
/// (not a priming event, a comment or an id).
fn event_data(line: &str) -> Option<Value> {
    let data = line.strip_prefix("data:")?;
    serde_json::from_str(data.trim()).ok()
}

/// The protocol revision of the sessions opened here.
pub const SESSIONS: &str = "2025-11-25";

/// A 2025-11-25 `initialize` request (id 1) from a client named `client`.
pub fn initialize_request(client: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": SESSIONS, "capabilities": {},
        "clientInfo": {"name": client, "version": "1"}}})
}
/// The protocol revision of the session-less requests sent here.
pub const SESSION_LESS: &str = "2026-07-28";

/// Raw JSON-RPC over HTTP to one tenant's `/mcp/{tenantId}`, with one credential.
pub struct RawMcp {
    http: reqwest::Client,
    pub url: String,
    auth: String,
}

impl RawMcp {
    pub fn new(http: &reqwest::Client, url: &str, credential: &str) -> Self {
        Self {
            http: http.clone(),
            url: url.to_owned(),
            auth: format!("Bearer {credential}"),
        }
    }

    /// POSTs `body` with this client's credential and `headers`.
    pub async fn post(&self, headers: &[(&str, &str)], body: &Value) -> anyhow::Result<Raw> {
        let mut all = vec![
            ("authorization", self.auth.as_str()),
            ("content-type", "application/json"),
        ];
        all.extend_from_slice(headers);
        raw(
            &self.http,
            reqwest::Method::POST,
            &self.url,
            &all,
            Some(body),
        )
        .await
    }

    /// Opens a 2025-11-25 session (`initialize`, then `notifications/initialized`) and
    /// returns its id, or the error body of a refused `initialize`.
    pub async fn open_session(&self) -> anyhow::Result<Result<String, Value>> {
        let got = self.post(&[], &initialize_request("raw-http")).await?;
        if got.status != reqwest::StatusCode::OK {
            return Ok(Err(serde_json::from_str(&got.text)?));
        }
        let id = got.headers["mcp-session-id"].to_str()?.to_owned();
        let answer = got.answer();
        assert_eq!(
            answer["result"]["protocolVersion"], SESSIONS,
            "{}",
            got.text
        );
        assert_eq!(answer["result"]["serverInfo"]["name"], "switchboard");
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let got = self.in_session(&id, &initialized).await?;
        assert_eq!(got.status, reqwest::StatusCode::ACCEPTED, "{}", got.text);
        Ok(Ok(id))
    }

    /// POSTs `message` in session `id`.
    pub async fn in_session(&self, id: &str, message: &Value) -> anyhow::Result<Raw> {
        let headers = [("mcp-session-id", id), ("mcp-protocol-version", SESSIONS)];
        self.post(&headers, message).await
    }

    /// A request in session `id` with `MCP-Protocol-Version: version`, this client's
    /// credential and `body` (as JSON).
    fn session_request(
        &self,
        method: reqwest::Method,
        id: &str,
        version: &str,
        body: Option<&Value>,
    ) -> reqwest::RequestBuilder {
        let headers = [
            ("authorization", self.auth.as_str()),
            ("mcp-session-id", id),
            ("mcp-protocol-version", version),
        ];
        request(&self.http, method, &self.url, &headers, body)
    }

    /// `message` POSTed in session `id`, its answer not yet read.
    pub async fn in_session_unread(
        &self,
        id: &str,
        message: &Value,
    ) -> anyhow::Result<reqwest::Response> {
        let req = self.session_request(reqwest::Method::POST, id, SESSIONS, Some(message));
        Ok(req.send().await?)
    }

    /// The `GET` stream of session `id` (its server-initiated messages), as it answered.
    pub async fn session_stream(&self, id: &str) -> anyhow::Result<reqwest::Response> {
        let req = self.session_request(reqwest::Method::GET, id, SESSIONS, None);
        Ok(req.send().await?)
    }

    /// The rest of an event stream of session `id` after the event `last_event_id`: a
    /// `GET` with `Last-Event-ID`, read whole.
    pub async fn resume(&self, id: &str, last_event_id: &str) -> anyhow::Result<Raw> {
        let req = self
            .session_request(reqwest::Method::GET, id, SESSIONS, None)
            .header("last-event-id", last_event_id);
        read(req.send().await?).await
    }

    /// `DELETE` of session `id` sent with `MCP-Protocol-Version: version`.
    pub async fn delete_with_version(&self, id: &str, version: &str) -> anyhow::Result<Raw> {
        let req = self.session_request(reqwest::Method::DELETE, id, version, None);
        read(req.send().await?).await
    }

    /// Ends session `id` with `DELETE`.
    pub async fn close_session(&self, id: &str) -> anyhow::Result<reqwest::StatusCode> {
        Ok(self.delete_with_version(id, SESSIONS).await?.status)
    }

    /// One 2026-07-28 request without a session: `params` get the `_meta` every such request
    /// carries (kept beside any `_meta` they have, such as a `progressToken`), and the
    /// request gets the `Mcp-Method` (and `Mcp-Name`) headers.
    pub async fn session_less(&self, id: u64, method: &str, params: Value) -> anyhow::Result<Raw> {
        let (headers, body) = session_less_request(id, method, params);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.post(&headers, &body).await
    }

    /// The same, answered by a stream that stays open (`subscriptions/listen`): read it
    /// message by message.
    pub async fn session_less_stream(
        &self,
        id: u64,
        method: &str,
        params: Value,
    ) -> anyhow::Result<EventStream> {
        self.session_less_stream_with(id, method, params, &[]).await
    }

    /// The same, with `extra` headers (a stray `Mcp-Session-Id`, say).
    pub async fn session_less_stream_with(
        &self,
        id: u64,
        method: &str,
        params: Value,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<EventStream> {
        let (headers, body) = session_less_request(id, method, params);
        let mut all = vec![
            ("authorization", self.auth.as_str()),
            ("content-type", "application/json"),
        ];
        all.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
        all.extend_from_slice(extra);
        let resp = request(
            &self.http,
            reqwest::Method::POST,
            &self.url,
            &all,
            Some(&body),
        )
        .send()
        .await?;
        Ok(EventStream {
            status: resp.status(),
            headers: resp.headers().clone(),
            body: Box::pin(resp.bytes_stream()),
            pending: String::new(),
        })
    }
}

/// The headers and body of a 2026-07-28 session-less request.
fn session_less_request(
    id: u64,
    method: &str,
    params: Value,
) -> (Vec<(&'static str, String)>, Value) {
    let mut params = match params {
        Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    let meta = params
        .entry("_meta")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("_meta is an object");
    meta.insert(
        "io.modelcontextprotocol/protocolVersion".into(),
        json!(SESSION_LESS),
    );
    meta.insert(
        "io.modelcontextprotocol/clientInfo".into(),
        json!({"name": "raw-http", "version": "1"}),
    );
    meta.insert(
        "io.modelcontextprotocol/clientCapabilities".into(),
        json!({}),
    );
    let mut headers = vec![
        ("mcp-protocol-version", SESSION_LESS.to_owned()),
        ("mcp-method", method.to_owned()),
    ];
    if let Some(name) = params.get("name").and_then(Value::as_str) {
        headers.push(("mcp-name", name.to_owned()));
    }
    let body = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    (headers, body)
}

/// An event-stream answer read as it arrives.
pub struct EventStream {
    pub status: reqwest::StatusCode,
    pub headers: reqwest::header::HeaderMap,
    body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    /// Received text not yet split into whole lines.
    pending: String,
}

impl EventStream {
    /// The next JSON-RPC message, waiting at most `wait`: `Ok(None)` when the stream ended,
    /// an error when nothing came in time.
    pub async fn next_message(&mut self, wait: Duration) -> anyhow::Result<Option<Value>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(end) = self.pending.find('\n') {
                let line: String = self.pending.drain(..=end).collect();
                if let Some(message) = event_data(&line) {
                    return Ok(Some(message));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.body.next())
                .await
                .context("no message on the stream in time")?;
            match chunk {
                Some(bytes) => self.pending.push_str(&String::from_utf8_lossy(&bytes?)),
                None => return Ok(None),
            }
        }
    }
}
