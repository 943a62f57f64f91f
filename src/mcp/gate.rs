//! The gate in front of `/mcp/{tenantId}`: authenticates every request before rmcp sees it
//! (401 with `WWW-Authenticate: Bearer`, 403 for another tenant's credential or a disabled
//! tenant), so no session exists for a refused caller; keeps a session to the tenant that
//! opened it (the tenant sealed in its id, [`super::sealed`], when another replica opened
//! it); records a session's end (`DELETE`) in the store, and never rebuilds a session the
//! store records as ended; reserves a session slot for an `initialize`, a session rebuilt
//! here or a `subscriptions/listen` stream, refusing past the caps; and spends the tenant's
//! rate limit on an `initialize`. A POST's answer holds the drain open until
//! it has been sent.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use rmcp::model::{InitializeRequestParams, ProtocolVersion};

use super::fast_path::{self, FastPath};
use super::sealed::{self, SessionSeal, CLOCK_SKEW_ALLOWED, SESSION_ID_LIFETIME};
use super::sessions::{self, with_pending, LimitError, Pending, Reservation, SessionLimits};
use crate::auth::{AuthContext, Authenticator, TenantCredentials};
use crate::http::error::{ApiError, ErrorReport};
use crate::http::extract::{api_key_header, bearer, ApiPath};
use crate::http::middleware::RequestId;
use crate::store::{answered_within, STORE_WAIT};

/// What the gate needs: the credential checker, the session bounds, the session id seal,
/// the body limit.
#[derive(Clone)]
pub struct Gate {
    pub auth: Arc<Authenticator>,
    pub limits: Arc<SessionLimits>,
    pub seal: SessionSeal,
    pub max_body_bytes: usize,
    /// For the audit trail of refused credentials, and the record of ended sessions.
    pub store: crate::store::SharedStore,
    pub audit: crate::audit::AuditWriter,
    /// The callers' budget of refused credentials (the token endpoints' limit).
    pub auth_limiter: Arc<crate::http::ratelimit::AuthLimiter>,
    /// For the drain: a POST's answer counts as in flight until it has been sent.
    pub lifecycle: Arc<crate::shutdown::Lifecycle>,
    /// The tenants' rate limits, which an `initialize` spends from.
    pub tenants: crate::tenants::runtime::TenantRuntime,
    /// Plain `tools/call`s in sessions open here, served without rmcp.
    pub fast: Arc<FastPath>,
    /// A tenth of the sessions' idle timeout: the fast path serves a session's calls only
    /// while rmcp has seen one of its requests within it.
    pub fast_within: std::time::Duration,
    /// The sessions, for those that a tenant change announced while they opened may have
    /// to end ([`check_again_if_changed`]).
    pub sessions: Arc<super::sessions::BoundedSessions>,
}

/// How many tenant changes had been told before the request's credentials were read
/// ([`crate::tenants::ChangeFeed::changes_told`]).
#[derive(Clone, Copy)]
struct ChangesSeen(u64);

const SESSION_HEADER: &str = "mcp-session-id";

pub async fn gate(
    State(gate): State<Arc<Gate>>,
    ApiPath(tenant_id): ApiPath<String>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = crate::http::ratelimit::peer_of(req.extensions());
    let creds = TenantCredentials {
        bearer: bearer(req.headers()),
        api_key: api_key_header(req.headers()),
        cached_only: gate.auth_limiter.is_blocked(req.headers(), peer),
    };
    let seen = ChangesSeen(gate.tenants.changes().changes_told());
    let context = match gate.auth.tenant(&tenant_id, creds, true).await {
        Ok(context) => context,
        Err(err) => {
            let parts = (req.headers(), req.extensions());
            return crate::http::extract::refuse_credential(
                err,
                &gate.auth_limiter,
                parts,
                &gate.audit,
                &tenant_id,
            )
            .into_response();
        }
    };
    tracing::Span::current().record("tenant_id", context.tenant_id.as_str());
    req.extensions_mut().insert(context);
    req.extensions_mut().insert(seen);
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .map(|v| v.to_str().ok().map(str::to_owned));
    let response = match session {
        Some(Some(id)) if req.method() == Method::POST => {
            post_in_session(&gate, &tenant_id, &id, req, next)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        }
        Some(Some(id)) => with_session(&gate, &tenant_id, &id, false, req, next)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Some(None) => no_session().into_response(),
        None if req.method() == Method::POST => post_without_session(&gate, &tenant_id, req, next)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        None => next.run(req).await,
    };
    in_contract_form(response, gate.lifecycle.is_draining()).await
}

/// rmcp answers some malformed requests itself, in plain text (no JSON, no request id):
/// those answers get the error form of API.md, as every other error of the service. Its
/// JSON-RPC errors (JSON, which MCP clients read) and every success pass unchanged.
async fn in_contract_form(response: Response, draining: bool) -> Response {
    let status = response.status();
    let plain = !response.headers().contains_key(header::CONTENT_TYPE)
        || response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.to_str().is_ok_and(|v| v.starts_with("text/plain")));
    let ours = response.extensions().get::<ErrorReport>().is_some();
    if !(status.is_client_error() || status.is_server_error()) || !plain || ours {
        return response;
    }
    let allow = response.headers().get(header::ALLOW).cloned();
    let text = axum::body::to_bytes(response.into_body(), 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let error = match status {
        // rmcp's own words ("Bad Request: Session ID is required"): what to mend.
        StatusCode::BAD_REQUEST => ApiError::InvalidRequest(text),
        StatusCode::NOT_FOUND => no_session(),
        StatusCode::NOT_ACCEPTABLE => ApiError::NotAcceptable(text),
        // rmcp says 415 for a body that is not a JSON-RPC message; its text quotes the body.
        StatusCode::UNSUPPORTED_MEDIA_TYPE if text.starts_with("fail to deserialize") => {
            ApiError::InvalidJson("the body is not a JSON-RPC message".into())
        }
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        // Past the drain timeout rmcp's sessions are cancelled, and a call still running
        // without a session gets rmcp's plain 500: for the client it is the drain's 503.
        _ if status.is_server_error() && draining => ApiError::Draining,
        _ => ApiError::Internal(format!("the MCP server answered {status}: {text}")),
    };
    let mut response = error.into_response();
    if let Some(allow) = allow {
        response.headers_mut().insert(header::ALLOW, allow);
    }
    response
}

/// The MCP "session not found" answer: the client initialises again.
fn no_session() -> ApiError {
    ApiError::NotFound("no such MCP session".into())
}

/// A request in a session. A session is used only by the tenant that opened it; to any other
/// it does not exist. One not open on this replica is rebuilt here (by rmcp, through our
/// session store and manager) if its id opens, names this tenant, and its client has not
/// ended it.
async fn with_session(
    gate: &Gate,
    tenant_id: &str,
    id: &str,
    initialize: bool,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let ending = req.method() == Method::DELETE;
    if let Some(owner) = gate.limits.owner_hearing(id, tenant_id) {
        if owner != tenant_id {
            return Err(no_session());
        }
        if ending {
            return end(gate, sessions::digest(id), req, next).await;
        }
        // The rest of a stream the fast path answered, whose client's connection broke.
        if req.method() == Method::GET {
            if let Some(resumed) = gate.fast.resume(id, tenant_id, req.headers()) {
                return Ok(resumed);
            }
        }
        let post = req.method() == Method::POST;
        // What rmcp refuses (a 4xx), or serves without the session (a 2026-07-28 request,
        // a resume from an id that is not rmcp's), never reaches the session, nor restarts
        // its idle timer.
        let in_session = fast_path::version_has_sessions(req.headers()) && !resumes_elsewhere(&req);
        let response = next.run(req).await;
        if in_session && response.status().is_success() {
            gate.limits.seen_by_rmcp(id);
        }
        return Ok(answered(gate, post, response));
    }
    let digest = sessions::digest(id);
    if gate.limits.was_ended(&digest) {
        return Err(no_session());
    }
    match gate.seal.open(id) {
        Some(claims) if claims.tenant == tenant_id => {}
        _ => return Err(no_session()),
    }
    // Ending a session needs no copy of it here.
    if ending {
        return end(gate, digest, req, next).await;
    }
    // A slot first: a tenant at its cap costs the store nothing.
    let reservation = reserve(gate, tenant_id)?.under_key(&credential_key(&req));
    // Ended through another replica, or before this one restarted: the store remembers. A
    // 2026-07-28 request is served without the session it names, and needs no answer;
    // but rmcp takes an `initialize` into the session it names whatever the version.
    // Within `STORE_WAIT`: a database that does not answer is 503, not a 504 an upstream
    // would be blamed for, with the slot held till then.
    let asked = |digest| gate.store.ended_sessions(std::slice::from_ref(digest));
    if (initialize || fast_path::version_has_sessions(req.headers()))
        && !answered_within(STORE_WAIT, asked(&digest))
            .await?
            .is_empty()
    {
        gate.limits.ended(digest);
        return Err(no_session());
    }
    let post = req.method() == Method::POST;
    let seen = req.extensions().get::<ChangesSeen>().copied();
    let response = with_pending(Pending::restore(reservation), next.run(req)).await;
    check_again_if_changed(gate, tenant_id, seen);
    Ok(answered(gate, post, response))
}

/// A session opened (or rebuilt) under credentials read before a tenant change was
/// announced may have been bound after that change's check of the tenant's sessions
/// (`end_sessions_of_changed_tenants`) ran, and missed by it: it is checked again, in a
/// task of its own (a store read, which must not hold up the answer). Only then: for the
/// rare request that overlaps a change.
fn check_again_if_changed(gate: &Gate, tenant_id: &str, seen: Option<ChangesSeen>) {
    let published = gate.tenants.changes().published();
    if seen.is_some_and(|ChangesSeen(seen)| seen == published) {
        return;
    }
    let (sessions, store, tenant_id) = (
        gate.sessions.clone(),
        gate.store.clone(),
        tenant_id.to_owned(),
    );
    tokio::spawn(async move { sessions.end_for_old_credentials(&tenant_id, &store).await });
}

/// Whether `req` is a `GET` whose `Last-Event-ID` is not one of rmcp's event ids (`<index>`
/// or `<index>/<request>`): rmcp answers such a resume with an empty stream, without
/// asking the session (so its idle timer does not restart). Unreadable counts as not rmcp's.
fn resumes_elsewhere(req: &Request) -> bool {
    if req.method() != Method::GET {
        return false;
    }
    let Some(id) = req.headers().get("last-event-id") else {
        return false;
    };
    let Ok(id) = id.to_str() else {
        return true;
    };
    let (index, request) = match id.split_once('/') {
        Some((index, request)) => (index, Some(request)),
        None => (id, None),
    };
    let rmcps_own = index.parse::<usize>().is_ok()
        && request.is_none_or(|request| request.parse::<u64>().is_ok());
    !rmcps_own
}

/// Ends for its client (`DELETE`) the session whose id has `digest`. The end is recorded in
/// the store first, so that no replica rebuilds the session from its id (this one after a
/// restart included) and, on PostgreSQL, in the same transaction every other replica is
/// told to end its copy. If it cannot be recorded the session stays open and the client may
/// try again (503).
async fn end(gate: &Gate, digest: String, req: Request, next: Next) -> Result<Response, ApiError> {
    // What rmcp would refuse after the end was recorded is refused before: an error answer
    // leaves the session open.
    if let Some(refusal) = refused_delete(req.headers()) {
        return Ok(refusal);
    }
    let now = chrono::Utc::now();
    // Past the id's lifetime it no longer opens, so its record is no longer needed (kept
    // longer by as much as replicas' clocks may be apart).
    let kept_secs = SESSION_ID_LIFETIME.as_secs() + CLOCK_SKEW_ALLOWED.as_secs();
    let forget_before = now - chrono::Duration::seconds(kept_secs as i64);
    // In a task of its own, so that it runs to its end even if the client hangs up (or
    // the request timeout cuts it) once the store may have the end on record: this
    // replica must not go on serving a session the fleet has ended.
    let (store, limits) = (gate.store.clone(), gate.limits.clone());
    let ending = async move {
        // Bounded as well: the client is told 503 and may try again (on PostgreSQL the
        // statement given up on is cancelled, so no end is recorded after that answer).
        let recorded = store.end_session(&digest, now, forget_before);
        answered_within(STORE_WAIT, recorded).await?;
        // Remembered before rmcp closes this replica's copy, if it has one: a request of
        // the session being rebuilt here meanwhile then finds it ended (see
        // `SessionLimits::bind`), rather than bind a copy after the close.
        limits.ended(digest);
        let response = next.run(req).await;
        Ok::<_, ApiError>(response)
    };
    tokio::spawn(ending.in_current_span())
        .await
        .map_err(|err| ApiError::Internal(format!("ending an MCP session: {err}")))?
}

/// Why rmcp refuses a `DELETE` by its `MCP-Protocol-Version`: a version it does not know
/// (400), or one without sessions (2026-07-28 on: 405, with `Allow: POST` as rmcp says it).
/// With no header it takes the 2025-03-26 default, which has them.
fn refused_delete(headers: &axum::http::HeaderMap) -> Option<Response> {
    let value = headers.get("mcp-protocol-version")?;
    let known = value.to_str().ok().and_then(|value| {
        ProtocolVersion::KNOWN_VERSIONS
            .iter()
            .find(|known| known.as_str() == value)
    });
    match known {
        None => Some(
            ApiError::invalid_request(
                "MCP-Protocol-Version: not a protocol version this server knows",
            )
            .into_response(),
        ),
        Some(version) if !version.has_initialize() => {
            let mut response = ApiError::MethodNotAllowed.into_response();
            let allow = axum::http::HeaderValue::from_static("POST");
            response.headers_mut().insert(header::ALLOW, allow);
            Some(response)
        }
        Some(_) => None,
    }
}

/// Spends one request of the authenticated tenant's rate limit on opening a session: a
/// tenant churning sessions is held to its rate, as its calls are. Ending one does not
/// spend: clients send their `DELETE` once, so refusing it would leave the session open
/// until it idles out, and each end was paid for by its `initialize`. Only the limit
/// refuses: if the tenant's actor cannot be asked (restarting), the session opens as it
/// did before sessions were counted.
async fn spend_rate_limit(
    gate: &Gate,
    tenant: Option<crate::store::TenantRecord>,
) -> Result<(), ApiError> {
    let Some(tenant) = tenant else {
        return Ok(());
    };
    match gate.tenants.spend_rate_limit(&tenant).await {
        Err(crate::tenants::messages::CallError::RateLimited { retry_after }) => {
            Err(ApiError::RateLimited { retry_after })
        }
        _ => Ok(()),
    }
}

/// The tenant the request authenticated as (owned: a request is not `Sync`, so no borrow of
/// it may be held across an await of the gate's future, which must be `Send`).
fn authenticated(req: &Request) -> Option<crate::store::TenantRecord> {
    let context = req.extensions().get::<crate::auth::AuthContext>()?;
    Some(context.tenant.clone())
}

/// The API key hash of the tenant record the request authenticated with: a session opened
/// under it ends when the key is rotated.
fn credential_key(req: &Request) -> Vec<u8> {
    let context = req.extensions().get::<crate::auth::AuthContext>();
    context.map_or_else(Vec::new, |context| context.tenant.api_key_hash.clone())
}

fn reserve(gate: &Gate, tenant_id: &str) -> Result<Reservation, ApiError> {
    gate.limits.reserve(tenant_id).map_err(|err| match err {
        LimitError::Total => ApiError::unavailable("too many open MCP sessions on this server"),
        // The tenant's own limit (API.md's 429); the process's is its capacity (503).
        LimitError::Tenant => {
            crate::metrics::rate_limited("tenant");
            ApiError::TooManySessions {
                retry_after: std::time::Duration::from_secs(5),
            }
        }
    })
}

/// A POST with a session id. rmcp serves a 2026-07-28 `subscriptions/listen` as the
/// session-less stream it is, whatever session id comes with it: it counts as a listen
/// stream (a slot for as long as it is open, and not in flight for the drain), never as a
/// request of the session, or a tenant could open such streams past every cap.
async fn post_in_session(
    gate: &Gate,
    tenant_id: &str,
    id: &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (mut req, body) = read_body(gate, req).await?;
    if fast_path::headers_allow(req.headers())
        && gate.limits.serves_itself(id, tenant_id, gate.fast_within)
    {
        if let Some(call) = fast_path::call_in(&body) {
            let request_id = req.extensions().get::<RequestId>().cloned();
            let context = req.extensions_mut().remove::<AuthContext>();
            drop(req);
            let Some(context) = context else {
                return Err(ApiError::Internal("no tenant for an MCP call".into()));
            };
            // Held by the answer until sent; a call that goes on in a task of its own (an
            // event stream, whose client's connection may break) holds the drain too.
            let held = gate.lifecycle.begin_request();
            let response = gate
                .fast
                .serve(id, context, request_id, call, &gate.lifecycle)
                .await;
            return Ok(hold_until_sent(response, held));
        }
    }
    match opening(&body) {
        // rmcp takes a listen without 2026-07-28 `_meta` into the session it names: that
        // session is another tenant's no more here than anywhere.
        // One the id's seal names, too: a session being ended or rebuilt here has no owner
        // in the limits for that while.
        Opening::Listen
            if gate
                .limits
                .owner(id)
                .is_some_and(|owner| owner != tenant_id)
                || gate
                    .seal
                    .open(id)
                    .is_some_and(|claims| claims.tenant != tenant_id) =>
        {
            Err(no_session())
        }
        Opening::Listen => listen(gate, tenant_id, req, next).await,
        Opening::Cancel(request_id) => {
            // For a call the fast path serves; rmcp ignores an id it does not know.
            gate.fast.in_flight.cancel(id, tenant_id, request_id);
            with_session(gate, tenant_id, id, false, req, next).await
        }
        Opening::Session(_) => with_session(gate, tenant_id, id, true, req, next).await,
        Opening::Nothing => with_session(gate, tenant_id, id, false, req, next).await,
    }
}

/// The request with its body read (within `MAX_BODY_BYTES`), and the body.
async fn read_body(gate: &Gate, req: Request) -> Result<(Request, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, gate.max_body_bytes)
        .await
        .map_err(unread_body)?;
    Ok((Request::from_parts(parts, Body::from(bytes.clone())), bytes))
}

/// The request, its body read (within `MAX_BODY_BYTES`), and what it opens.
async fn read_opening(gate: &Gate, req: Request) -> Result<(Request, Opening), ApiError> {
    let (req, body) = read_body(gate, req).await?;
    Ok((req, opening(&body)))
}

/// 413 for a body over `MAX_BODY_BYTES`; 400 for one that could not be read (cut off).
fn unread_body(err: axum::Error) -> ApiError {
    let too_large = std::error::Error::source(&err)
        .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
    if too_large {
        ApiError::PayloadTooLarge
    } else {
        ApiError::invalid_request("the request body could not be read")
    }
}

/// A `subscriptions/listen` stream: a session slot, held until the stream ends. A stream
/// open until the client or the drain ends it is not in flight.
async fn listen(
    gate: &Gate,
    tenant_id: &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let reservation = reserve(gate, tenant_id)?;
    Ok(hold_until_sent(next.run(req).await, reservation))
}

/// A POST without a session: an `initialize` opens one (within the caps); a 2026-07-28
/// `subscriptions/listen` holds a slot for as long as its stream stays open (it is as
/// long-lived as a session, so it counts against the same caps); anything else is a
/// session-less request (protocol 2026-07-28, `server/discover`) or rmcp's own error.
async fn post_without_session(
    gate: &Gate,
    tenant_id: &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (req, opening) = read_opening(gate, req).await?;
    match opening {
        Opening::Nothing | Opening::Cancel(_) => Ok(answered(gate, true, next.run(req).await)),
        Opening::Session(params) => {
            if !sealed::params_fit(&params) {
                return Err(ApiError::invalid_request(format!(
                    "initialize: params take more than {} bytes of JSON",
                    sealed::MAX_INITIALIZE_PARAMS
                )));
            }
            // The cap first: an `initialize` refused for it opens nothing, and spends none
            // of the tenant's rate limit.
            let reservation = reserve(gate, tenant_id)?.under_key(&credential_key(&req));
            // Nor does one rmcp refuses for its headers (406, 415), which opens nothing.
            if !fast_path::surely_refused(req.headers()) {
                spend_rate_limit(gate, authenticated(&req)).await?;
            }
            let seen = req.extensions().get::<ChangesSeen>().copied();
            let response = with_pending(Pending::open(reservation, *params), next.run(req)).await;
            check_again_if_changed(gate, tenant_id, seen);
            Ok(answered(gate, true, response))
        }
        Opening::Listen => listen(gate, tenant_id, req, next).await,
    }
}

/// What a session-less POST opens that outlives its request.
enum Opening {
    /// `initialize`: a session, whose parameters are sealed into its id.
    Session(Box<InitializeRequestParams>),
    /// `subscriptions/listen`: a stream open until the client or the gateway ends it.
    Listen,
    /// `notifications/cancelled` of the request with this id.
    Cancel(rmcp::model::RequestId),
    /// Anything else (or no JSON-RPC request at all: rmcp answers that).
    Nothing,
}

/// Reads the method of `body` if it is one JSON-RPC request (not a batch, not a
/// notification). Every session-less call passes here, so `params` is skipped unread
/// unless the method is `initialize`.
fn opening(body: &Bytes) -> Opening {
    use serde::de::IgnoredAny;
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        method: Option<std::borrow::Cow<'a, str>>,
        id: Option<IgnoredAny>,
    }
    #[derive(serde::Deserialize)]
    struct Initialize {
        params: InitializeRequestParams,
    }
    #[derive(serde::Deserialize)]
    struct Cancelled {
        params: rmcp::model::CancelledNotificationParam,
    }
    let Ok(probe) = serde_json::from_slice::<Probe>(body) else {
        return Opening::Nothing;
    };
    match (probe.method.as_deref(), probe.id) {
        (Some("initialize"), Some(_)) => serde_json::from_slice::<Initialize>(body)
            .map_or(Opening::Nothing, |init| {
                Opening::Session(Box::new(init.params))
            }),
        (Some("subscriptions/listen"), Some(_)) => Opening::Listen,
        (Some("notifications/cancelled"), None) => serde_json::from_slice::<Cancelled>(body)
            .ok()
            .and_then(|cancelled| cancelled.params.request_id)
            .map_or(Opening::Nothing, Opening::Cancel),
        _ => Opening::Nothing,
    }
}

/// A POST's answer (`post`), counted in flight until its body has been sent. In a session,
/// rmcp answers a request with an event stream at once and writes the result into it
/// later: the edge's count of the request ends with the headers, and without this one a
/// drain would end the session streams (and the answers in them) while calls still run.
/// Other requests (a session's `GET` stream) never hold the drain.
fn answered(gate: &Gate, post: bool, response: Response) -> Response {
    if post {
        hold_until_sent(response, gate.lifecycle.begin_request())
    } else {
        response
    }
}

/// `response` with `held` kept until its body has been sent or dropped (the client went
/// away): a listen stream's slot is given back when the stream ends, a POST's in-flight
/// count when its answer has been sent.
fn hold_until_sent(response: Response, held: impl Send + Unpin + 'static) -> Response {
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(HeldBody { body, _held: held }))
}

/// A body that keeps something (`_held`) for as long as it lives, and is otherwise the body
/// it wraps: its size too, so that an answer of known length is sent with its
/// `Content-Length` rather than in chunks.
struct HeldBody<H> {
    body: Body,
    _held: H,
}

impl<H: Unpin> http_body::Body for HeldBody<H> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delete_rmcp_would_refuse_is_refused_before_it_is_recorded() {
        let refusal = |version: Option<&str>| {
            let mut headers = axum::http::HeaderMap::new();
            if let Some(version) = version {
                headers.insert("mcp-protocol-version", version.parse().unwrap());
            }
            refused_delete(&headers).map(|response| {
                let allow = response.headers().get(header::ALLOW).cloned();
                if response.status() == StatusCode::METHOD_NOT_ALLOWED {
                    assert_eq!(allow.as_ref().map(|v| v.as_bytes()), Some(&b"POST"[..]));
                }
                response.status()
            })
        };
        assert_eq!(refusal(None), None);
        assert_eq!(refusal(Some("2025-11-25")), None);
        assert_eq!(refusal(Some("2024-11-05")), None);
        assert_eq!(refusal(Some("1999-01-01")), Some(StatusCode::BAD_REQUEST));
        assert_eq!(
            refusal(Some("2026-07-28")),
            Some(StatusCode::METHOD_NOT_ALLOWED)
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_and_one_cut_off_is_400() {
        let over = axum::body::to_bytes(Body::from(vec![b'x'; 10]), 5)
            .await
            .expect_err("over the limit");
        assert_eq!(unread_body(over).parts().0, StatusCode::PAYLOAD_TOO_LARGE);
        let broken = futures::stream::iter([Err::<Bytes, _>(std::io::Error::other("reset"))]);
        let cut = axum::body::to_bytes(Body::from_stream(broken), 5)
            .await
            .expect_err("cut off");
        assert_eq!(unread_body(cut).parts().0, StatusCode::BAD_REQUEST);
    }

    fn opening_of(body: &'static [u8]) -> Opening {
        opening(&Bytes::from_static(body))
    }

    #[test]
    fn only_an_initialize_request_opens_a_session_and_only_a_listen_request_a_stream() {
        let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},
            "clientInfo":{"name":"t","version":"1"}}}"#;
        let Opening::Session(params) = opening_of(init) else {
            panic!("initialize opens a session");
        };
        assert_eq!(params.protocol_version.as_str(), "2025-11-25");
        let listen = br#"{"jsonrpc":"2.0","id":2,"method":"subscriptions/listen",
            "params":{"notifications":{"toolsListChanged":true}}}"#;
        assert!(matches!(opening_of(listen), Opening::Listen));
        for nothing in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#,
            br#"{"jsonrpc":"2.0","method":"initialize","params":{}}"#,
            br#"{"jsonrpc":"2.0","method":"subscriptions/listen","params":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"bad":1}}"#,
            b"[1,2]",
            b"not json",
        ] {
            assert!(matches!(opening_of(nothing), Opening::Nothing));
        }
    }
}
