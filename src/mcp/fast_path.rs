//! The fast path of a `tools/call` in a session open here: the gate serves it itself,
//! through the same call, tenant runtime, limits and audit as rmcp's handler
//! ([`super::handler::serve_call`]), and answers it with one JSON-RPC message as JSON, which
//! MCP allows for any request and which clients must accept. It skips what rmcp's server
//! costs every call in a session: the session worker, the service loop, a task per request
//! and an SSE stream with its resumption cache (README, Performance: what it saved).
//!
//! Only the plainest call takes it; anything else goes to rmcp as before, which validates
//! and answers it as it always did:
//! - the session is open here, for the tenant that asks, and not ending; and rmcp saw one
//!   of its requests less than a tenth of its idle timeout ago (a session's idle timer
//!   restarts only on rmcp's requests, so the first call past that goes through rmcp);
//! - the client accepts both answers' types and sends JSON (rmcp refuses anything else);
//! - no `MCP-Protocol-Version`, or a known one with sessions (before 2026-07-28, so no
//!   standard headers for rmcp to check against the body);
//! - the body is one JSON-RPC 2.0 `tools/call` request with nothing in `_meta` but a
//!   progress token (which rmcp's client sends with every request; no per-request protocol
//!   version) and no multi-round-trip fields.
//!
//! Upstream progress for a client that asked for it, or a call that runs for a second,
//! turns the answer into an event stream (a priming event, the progress, readdressed to the
//! client's token, then the result; keep-alives while it is quiet), as rmcp's server
//! answers; a call with no progress that ends sooner is answered with JSON. Such a stream's
//! events have ids, and are kept ([`super::replay`]): a client whose connection broke
//! resumes it with a `GET` and `Last-Event-ID`. A client that goes away does not cancel its
//! call (MCP: a disconnection is not a cancel; `notifications/cancelled` is).
//!
//! A call served here is not known to rmcp: the client's `notifications/cancelled` for it
//! cancels it through [`InFlight`] (rmcp ignores the notice, as it does for any id it does
//! not know).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use futures::FutureExt as _;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, JsonRpcVersion2_0, ProtocolVersion,
    RequestId, ServerJsonRpcMessage, ServerResult,
};
use rmcp::ErrorData;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::handler::{serve_call, CallSettings, Caller};
use super::progress::{self, ProgressRelay};
use super::replay::{Replay, Replays};
use crate::auth::AuthContext;
use crate::http::error::ApiError;
use crate::http::middleware::RequestId as HttpRequestId;
use crate::tenants::runtime::TenantRuntime;

const JSON: &str = "application/json";
const EVENT_STREAM: &str = "text/event-stream";

/// A `tools/call` the fast path serves: its JSON-RPC id and its params.
pub struct Call {
    id: RequestId,
    params: CallToolRequestParams,
}

/// Whether a request's headers let the fast path serve it: it accepts JSON and event
/// streams, sends JSON, and names no protocol version, or one with sessions.
pub fn headers_allow(headers: &HeaderMap) -> bool {
    let (json, event_stream) = accepted(headers);
    json && event_stream && sends_json(headers) && version_has_sessions(headers)
}

/// Whether rmcp surely refuses a POST for its headers (415: it does not send JSON, as
/// rmcp reads `Content-Type`; 406: its `Accept` cannot name JSON or event streams, as
/// neither appears in it at all). Only surely: a header this module would not read (a
/// quoted parameter, a `q` of 0) rmcp may still take.
pub fn surely_refused(headers: &HeaderMap) -> bool {
    let names = |media_type: &str| {
        headers.get_all(header::ACCEPT).iter().any(|value| {
            value
                .as_bytes()
                .windows(media_type.len())
                .any(|part| part.eq_ignore_ascii_case(media_type.as_bytes()))
        })
    };
    !sends_json(headers) || !names(JSON) || !names(EVENT_STREAM)
}

/// Whether a request sends JSON, as rmcp reads its `Content-Type`.
fn sends_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| essence(value).eq_ignore_ascii_case(JSON))
}

/// Whether a request accepts an event stream (as a resume must).
fn accepts_event_stream(headers: &HeaderMap) -> bool {
    accepted(headers).1
}

/// Whether a request's `Accept` takes JSON, and event streams; neither if it has a quoted
/// parameter (rmcp's to read).
fn accepted(headers: &HeaderMap) -> (bool, bool) {
    let (mut json, mut event_stream) = (false, false);
    for value in headers.get_all(header::ACCEPT) {
        // A quoted parameter (which may hold a comma) is rmcp's to read.
        let Some(value) = value.to_str().ok().filter(|v| !v.contains('"')) else {
            return (false, false);
        };
        for accepted in value.split(',').filter(|accepted| !refused(accepted)) {
            let essence = essence(accepted);
            json |= essence.eq_ignore_ascii_case(JSON);
            event_stream |= essence.eq_ignore_ascii_case(EVENT_STREAM);
        }
    }
    (json, event_stream)
}

/// Whether a request names no protocol version (rmcp then takes 2025-03-26) or a known one
/// with sessions (before 2026-07-28).
pub fn version_has_sessions(headers: &HeaderMap) -> bool {
    match headers.get("mcp-protocol-version") {
        None => true,
        Some(value) => ProtocolVersion::KNOWN_VERSIONS
            .iter()
            .any(|known| known.as_str().as_bytes() == value.as_bytes() && known.has_initialize()),
    }
}

/// Whether an `Accept` entry says `q=0`: that type is not acceptable.
fn refused(accepted: &str) -> bool {
    accepted.split(';').skip(1).any(|parameter| {
        parameter.split_once('=').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("q")
                && value.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
        })
    })
}

/// A media type without its parameters.
fn essence(media_type: &str) -> &str {
    media_type
        .split_once(';')
        .map_or(media_type, |(essence, _)| essence)
        .trim()
}

/// `body` as a call the fast path serves, or `None` (for rmcp).
pub fn call_in(body: &[u8]) -> Option<Call> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        #[allow(dead_code)] // Present and "2.0", or the body is not taken.
        jsonrpc: JsonRpcVersion2_0,
        id: RequestId,
        #[serde(borrow)]
        method: Cow<'a, str>,
        params: CallToolRequestParams,
        // rmcp refuses a message with both a method and a result or an error, whatever
        // their values: so must the fast path.
        #[serde(default)]
        result: Sent,
        #[serde(default)]
        error: Sent,
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    if envelope.result.0 || envelope.error.0 {
        return None;
    }
    let params = envelope.params;
    // rmcp's client puts a progress token into every request; anything else in `_meta`
    // (a per-request protocol version, say) is rmcp's to check.
    let plain_meta = params.meta.as_ref().is_none_or(|meta| {
        meta.0 .0.keys().all(|key| key == "progressToken") && meta.get_progress_token().is_some()
    });
    let plain = envelope.method == "tools/call"
        && plain_meta
        && params.input_responses.is_none()
        && params.request_state.is_none();
    plain.then_some(Call {
        id: envelope.id,
        params,
    })
}

/// Whether a member of a JSON object was sent at all, whatever its value (`null` too).
#[derive(Default)]
struct Sent(bool);

impl<'de> Deserialize<'de> for Sent {
    fn deserialize<D: serde::Deserializer<'de>>(value: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(value)?;
        Ok(Self(true))
    }
}

/// The calls the fast path is serving, by session and JSON-RPC id, so that the client's
/// `notifications/cancelled` reaches them; and their event streams, kept for resumption.
#[derive(Default)]
pub struct InFlight {
    calls: Mutex<Calls>,
    /// Tells apart two calls a client sent with one id, so that the first to end does
    /// not take the other's entry with it.
    serial: AtomicU64,
    pub replays: Replays,
}

/// Each call's serial, tenant and cancellation, by session id and JSON-RPC id.
type Calls = HashMap<(String, RequestId), (u64, String, CancellationToken)>;

/// One call's entry in [`InFlight`], removed when the call ends.
struct Entry {
    in_flight: Arc<InFlight>,
    key: (String, RequestId),
    serial: u64,
    cancelled: CancellationToken,
}

impl InFlight {
    /// Enters a call of `tenant`; it is cancelled by its client or when `sessions` is (the
    /// drain's end).
    fn enter(
        self: &Arc<Self>,
        session: &str,
        tenant: &str,
        id: &RequestId,
        sessions: &CancellationToken,
    ) -> Entry {
        let serial = self.serial.fetch_add(1, Ordering::Relaxed);
        let cancelled = sessions.child_token();
        let key = (session.to_owned(), id.clone());
        let value = (serial, tenant.to_owned(), cancelled.clone());
        self.lock().insert(key.clone(), value);
        Entry {
            in_flight: self.clone(),
            key,
            serial,
            cancelled,
        }
    }

    /// Cancels the call with JSON-RPC id `id` that `tenant` sent in `session`, if the fast
    /// path serves one.
    pub fn cancel(&self, session: &str, tenant: &str, id: RequestId) {
        if let Some((_, owner, cancelled)) = self.lock().get(&(session.to_owned(), id)) {
            if owner == tenant {
                cancelled.cancel();
            }
        }
    }

    /// Cancels every call the fast path serves in `session` (which ended: rmcp cancels the
    /// requests of a session it closes), and forgets its streams. A scan: sessions end far
    /// less often than calls.
    pub fn cancel_session(&self, session: &str) {
        for ((call_session, _), (_, _, cancelled)) in self.lock().iter() {
            if call_session == session {
                cancelled.cancel();
            }
        }
        self.replays.forget_session(session);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut calls = self.in_flight.lock();
        if calls
            .get(&self.key)
            .is_some_and(|(serial, _, _)| *serial == self.serial)
        {
            calls.remove(&self.key);
        }
    }
}

/// How long a call may run before its answer turns from JSON into an event stream: its
/// headers go out then, so that `REQUEST_TIMEOUT_MS` (which ends at the headers) does not
/// cut a call its upstream is still allowed to run, and keep-alives keep proxies from
/// taking a quiet connection for a dead one. At most half `REQUEST_TIMEOUT_MS`.
const JSON_WITHIN: Duration = Duration::from_secs(1);

/// What the fast path serves calls with.
pub struct FastPath {
    pub runtime: TenantRuntime,
    pub settings: CallSettings,
    pub in_flight: Arc<InFlight>,
    /// Cancelled when MCP sessions close (the drain's end): so are the calls served here.
    pub sessions: CancellationToken,
    /// Which sessions are open here (a call entered as its session ends is cancelled).
    pub limits: Arc<super::sessions::SessionLimits>,
}

/// A call's answer to come, with everything it needs owned, so that a task can finish it.
type Answer = Pin<Box<dyn Future<Output = Result<CallToolResult, ErrorData>> + Send>>;

/// A call the fast path is running, with what its answer needs.
struct Running {
    answer: Answer,
    /// Its upstream progress, readdressed to the client.
    answered: mpsc::Receiver<ServerJsonRpcMessage>,
    id: RequestId,
    cancelled: CancellationToken,
}

/// A call not yet answered, or handed to a task of its own. If the request goes first
/// (hyper drops it when its client's connection breaks), the call runs on to its end in a
/// task of its own (MCP: a disconnection is not a cancel), audited with its real outcome;
/// its answer has nobody to go to, as the client got no event id to resume from.
struct Unanswered {
    running: Option<Running>,
    fast: Arc<FastPath>,
    lifecycle: Arc<crate::shutdown::Lifecycle>,
}

impl Unanswered {
    /// Runs the call to its end in a task of its own, and puts its progress and then its
    /// result into `replay` if it has one (a stream kept for a while for its client to
    /// resume). A client that goes away does not cancel it; its session's end and the
    /// drain's end do. It counts as in flight for the drain until it ends; a panic in it
    /// ends it with an internal error.
    fn finish_in_task(&mut self, replay: Option<Arc<Replay>>) {
        let Some(Running {
            answer,
            mut answered,
            id,
            cancelled,
        }) = self.running.take()
        else {
            return;
        };
        let held = self.lifecycle.begin_request();
        let fast = self.fast.clone();
        let mut answer = std::panic::AssertUnwindSafe(answer)
            .catch_unwind()
            .map(|ended| {
                ended.unwrap_or_else(|_| {
                    tracing::error!("an MCP call panicked: answered as an internal error");
                    Err(ErrorData::internal_error(
                        "the call failed in the gateway",
                        None,
                    ))
                })
            });
        let finish = async move {
            let progress = |message: &ServerJsonRpcMessage| {
                if let Some(replay) = &replay {
                    replay.progress(message);
                }
            };
            let result = loop {
                tokio::select! {
                    biased;
                    result = &mut answer => break result,
                    Some(message) = answered.recv() => progress(&message),
                }
            };
            while let Ok(message) = answered.try_recv() {
                progress(&message);
            }
            if let Some(replay) = &replay {
                match told(&fast.sessions, &cancelled, result) {
                    Some(told) => fast
                        .in_flight
                        .replays
                        .end(replay, &answer_message(id, told)),
                    None => fast.in_flight.replays.end_unanswered(replay),
                }
            }
            drop(held);
        };
        tokio::spawn(finish.in_current_span());
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        // Within a runtime: hyper drops a request on its connection's task.
        if self.running.is_some() && tokio::runtime::Handle::try_current().is_ok() {
            self.finish_in_task(None);
        }
    }
}

impl FastPath {
    /// Serves `call` in `session` for the tenant of `ctx`. The answer is the call's
    /// JSON-RPC result or error as JSON; or, once the upstream reports progress to a
    /// client that asked for it (`_meta.progressToken`), or once the call has run for
    /// [`JSON_WITHIN`], an event stream: that progress, readdressed to the client's token,
    /// then the result (as rmcp's server answers).
    pub async fn serve(
        self: &Arc<Self>,
        session: &str,
        ctx: AuthContext,
        request_id: Option<HttpRequestId>,
        call: Call,
        lifecycle: &Arc<crate::shutdown::Lifecycle>,
    ) -> Response {
        let id = call.id.clone();
        let request_started = request_id.as_ref().map(|id| id.started);
        let (messages, answered) = mpsc::channel(progress::QUEUE);
        let progress = match call
            .params
            .meta
            .as_ref()
            .and_then(|m| m.get_progress_token())
        {
            Some(token) => ProgressRelay::into_answer(token, messages.clone()),
            None => (None, None),
        };
        let tenant = ctx.tenant_id.clone();
        let entry = self
            .in_flight
            .enter(session, &tenant, &call.id, &self.sessions);
        // A session that ended between the gate's look and the entry above: its end's
        // scan of the calls in flight did not see this one.
        if !self.limits.is_open(session) {
            entry.cancelled.cancel();
        }
        let cancelled = entry.cancelled.clone();
        let fast = self.clone();
        let answer: Answer = Box::pin(async move {
            // In a session: answered within a second, never cut off by the timeout.
            let caller = Caller {
                request_id: request_id.as_ref(),
                cut_off_by_timeout: false,
            };
            serve_call(
                &fast.runtime,
                &ctx,
                caller,
                call.params,
                fast.settings,
                progress,
                &entry.cancelled,
            )
            .await
        });
        // The timeout layer counts from the request's start (its body read, its credential
        // checked): the headers go out well before it can fire.
        let started = request_started.unwrap_or_else(Instant::now);
        let left =
            (started + self.settings.request_timeout).saturating_duration_since(Instant::now());
        let json_within = JSON_WITHIN.min(left / 2);
        // The relay puts progress into `messages` before the call ends, through its own
        // sender: with it gone, `answered` ends.
        drop(messages);
        let mut unanswered = Unanswered {
            running: Some(Running {
                answer,
                answered,
                id,
                cancelled,
            }),
            fast: self.clone(),
            lifecycle: lifecycle.clone(),
        };
        let Some(Running {
            answer, answered, ..
        }) = unanswered.running.as_mut()
        else {
            unreachable!("the call was put there just above");
        };
        let replays = &self.in_flight.replays;
        tokio::select! {
            biased;
            result = answer => {
                let Some(mut running) = unanswered.running.take() else {
                    unreachable!("taken only here and below");
                };
                let (id, cancelled) = (running.id, running.cancelled);
                let message = told(&self.sessions, &cancelled, result)
                    .map(|told| answer_message(id, told));
                if let (Some(message), true) = (&message, running.answered.is_empty()) {
                    return json(message);
                }
                // Progress came just before the result: all of it, then the result. A call
                // the client cancelled gets a stream with its progress and no result.
                let replay = replays.open(session, &tenant);
                while let Ok(progress) = running.answered.try_recv() {
                    replay.progress(&progress);
                }
                match &message {
                    Some(message) => replays.end(&replay, message),
                    None => replays.end_unanswered(&replay),
                }
                replays.stream(replay)
            }
            Some(first) = answered.recv() => {
                let replay = replays.open(session, &tenant);
                replay.progress(&first);
                unanswered.finish_in_task(Some(replay.clone()));
                replays.stream(replay)
            }
            _ = tokio::time::sleep(json_within) => {
                let replay = replays.open(session, &tenant);
                unanswered.finish_in_task(Some(replay.clone()));
                replays.stream(replay)
            }
        }
    }

    /// A client's `GET` with the `Last-Event-ID` of a stream kept here, in `session`, for
    /// `tenant`: the rest of that stream. `None` for any other (rmcp's to answer).
    pub fn resume(&self, session: &str, tenant: &str, headers: &HeaderMap) -> Option<Response> {
        let last_event_id = headers.get("last-event-id")?.to_str().ok()?;
        if !accepts_event_stream(headers) || !version_has_sessions(headers) {
            return None;
        }
        let replays = &self.in_flight.replays;
        let (replay, from) = replays.resume(session, tenant, last_event_id)?;
        Some(replays.resumed(replay, from))
    }
}

/// What the client is told of a call's `result`: `draining` for one the drain's end
/// cancelled (its token is a child of the sessions' one); nothing for one its client
/// cancelled, or whose session ended, as MCP asks of a receiver of `notifications/cancelled`
/// (and as rmcp's server does, which drops such an answer); else the result.
fn told(
    sessions: &CancellationToken,
    cancelled: &CancellationToken,
    result: Result<CallToolResult, ErrorData>,
) -> Option<Result<CallToolResult, ErrorData>> {
    match result {
        Err(_) if cancelled.is_cancelled() => sessions
            .is_cancelled()
            .then(|| Err(super::errors::draining())),
        other => Some(other),
    }
}

fn answer_message(
    id: RequestId,
    result: Result<CallToolResult, ErrorData>,
) -> ServerJsonRpcMessage {
    match result {
        Ok(result) => {
            ServerJsonRpcMessage::response(ServerResult::from(CallToolResponse::from(result)), id)
        }
        Err(error) => ServerJsonRpcMessage::error(error, Some(id)),
    }
}

fn json(message: &ServerJsonRpcMessage) -> Response {
    match serde_json::to_vec(message) {
        Ok(body) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static(JSON))],
            body,
        )
            .into_response(),
        Err(err) => ApiError::Internal(format!("an MCP answer: {err}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn only_what_rmcp_would_take_in_a_session_passes_the_headers() {
        let plain = [
            ("accept", "application/json, text/event-stream"),
            ("content-type", "application/json"),
        ];
        assert!(headers_allow(&headers(&plain)));
        assert!(headers_allow(&headers(&[
            ("accept", "text/event-stream;q=0.9"),
            ("accept", "Application/JSON"),
            ("content-type", "application/json; charset=utf-8"),
            ("mcp-protocol-version", "2025-11-25"),
        ])));
        for refused in [
            headers(&[("accept", "application/json"), plain[1]]),
            headers(&[("accept", "text/event-stream"), plain[1]]),
            headers(&[
                ("accept", "application/json;q=0, text/event-stream"),
                plain[1],
            ]),
            headers(&[
                ("accept", "application/json, text/event-stream; q=0.0"),
                plain[1],
            ]),
            headers(&[
                ("accept", "application/json;x=\"a,b\", text/event-stream"),
                plain[1],
            ]),
            headers(&[plain[0], ("content-type", "text/plain")]),
            headers(&[plain[0]]),
            headers(&[plain[0], plain[1], ("mcp-protocol-version", "2026-07-28")]),
            headers(&[plain[0], plain[1], ("mcp-protocol-version", "1999-01-01")]),
        ] {
            assert!(!headers_allow(&refused), "{refused:?}");
        }
    }

    #[test]
    fn only_what_rmcp_surely_refuses_counts_as_refused_for_its_headers() {
        let json = ("content-type", "application/json");
        for refused in [
            headers(&[("accept", "application/json"), json]),
            headers(&[("accept", "text/event-stream"), json]),
            headers(&[json]),
            headers(&[("accept", "application/json, text/event-stream")]),
            headers(&[
                ("accept", "application/json, text/event-stream"),
                ("content-type", "text/plain"),
            ]),
        ] {
            assert!(surely_refused(&refused), "{refused:?}");
        }
        // What this module does not read, rmcp may take: not surely refused.
        for maybe in [
            headers(&[("accept", "application/json, text/event-stream"), json]),
            headers(&[
                (
                    "accept",
                    "application/json, text/event-stream; charset=\"utf-8\"",
                ),
                json,
            ]),
            headers(&[
                ("accept", "application/json, text/event-stream;q=0.0000"),
                json,
            ]),
            headers(&[
                ("accept", "TEXT/EVENT-STREAM"),
                ("accept", "application/json"),
                json,
            ]),
        ] {
            assert!(!surely_refused(&maybe), "{maybe:?}");
        }
    }

    #[test]
    fn only_a_plain_tools_call_is_taken() {
        let call = call_in(
            br#"{"jsonrpc":"2.0","id":7,"method":"tools/call",
                "params":{"name":"echo","arguments":{"text":"hi"}}}"#,
        )
        .expect("a plain call");
        assert_eq!(call.id, RequestId::Number(7));
        assert_eq!(call.params.name, "echo");
        let by_string =
            call_in(br#"{"jsonrpc":"2.0","id":"a","method":"tools/call","params":{"name":"x"}}"#);
        assert!(by_string.is_some());
        let with_progress = call_in(
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":"p"}}}"#,
        );
        assert!(with_progress.is_some());
        for left in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"name":"x"}}"#[..],
            br#"{"jsonrpc":"2.0","method":"tools/call","params":{"name":"x"}}"#,
            br#"{"jsonrpc":"1.0","id":1,"method":"tools/call","params":{"name":"x"}}"#,
            br#"{"id":1,"method":"tools/call","params":{"name":"x"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call"}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":1,"other":2}}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","_meta":{"progressToken":null}}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x","requestState":"s"}}"#,
            br#"[{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}]"#,
            b"not json",
            // rmcp refuses these as no JSON-RPC message at all.
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"},"result":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"},"error":null}"#,
        ] {
            assert!(call_in(left).is_none(), "{}", String::from_utf8_lossy(left));
        }
    }

    #[test]
    fn a_cancel_reaches_the_call_of_its_session_and_id_only() {
        let in_flight = Arc::new(InFlight::default());
        let sessions = CancellationToken::new();
        let one = RequestId::Number(1);
        let first = in_flight.enter("s1", "t", &one, &sessions);
        let other_session = in_flight.enter("s2", "t", &one, &sessions);
        in_flight.cancel("s1", "another tenant", one.clone());
        assert!(
            !first.cancelled.is_cancelled(),
            "only its own tenant cancels a call"
        );
        in_flight.cancel("s1", "t", one.clone());
        assert!(first.cancelled.is_cancelled());
        assert!(!other_session.cancelled.is_cancelled());
        // A second call with the same id: the first one's end leaves its entry.
        let again = in_flight.enter("s2", "t", &one, &sessions);
        drop(other_session);
        in_flight.cancel("s2", "t", one.clone());
        assert!(again.cancelled.is_cancelled());
        drop((first, again));
        assert!(in_flight.lock().is_empty());
        // The drain's end cancels every call.
        let late = in_flight.enter("s3", "t", &one, &sessions);
        sessions.cancel();
        assert!(late.cancelled.is_cancelled());
    }
}
