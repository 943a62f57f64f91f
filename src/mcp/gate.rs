//! The gate in front of `/mcp/{tenantId}`: authenticates every request before rmcp sees it
//! (401 with `WWW-Authenticate: Bearer`, 403 for another tenant's credential or a disabled
//! tenant), so no session exists for a refused caller; keeps a session to the tenant that
//! opened it (the tenant sealed in its id, [`super::sealed`], when another replica opened
//! it); and reserves a session slot for an `initialize` or a session rebuilt here, refusing
//! past the caps.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use rmcp::model::InitializeRequestParams;

use super::sealed::SessionSeal;
use super::sessions::{with_pending, LimitError, Pending, Reservation, SessionLimits};
use crate::auth::{Authenticator, TenantCredentials};
use crate::http::error::ApiError;
use crate::http::extract::{api_key_header, bearer};
use crate::http::middleware::RequestId;

/// What the gate needs: the credential checker, the session bounds, the session id seal,
/// the body limit.
#[derive(Clone)]
pub struct Gate {
    pub auth: Arc<Authenticator>,
    pub limits: Arc<SessionLimits>,
    pub seal: SessionSeal,
    pub max_body_bytes: usize,
    /// For the audit trail of refused credentials.
    pub store: crate::store::SharedStore,
}

const SESSION_HEADER: &str = "mcp-session-id";

pub async fn gate(
    State(gate): State<Gate>,
    Path(tenant_id): Path<String>,
    mut req: Request,
    next: Next,
) -> Response {
    let creds = TenantCredentials {
        bearer: bearer(req.headers()),
        api_key: api_key_header(req.headers()),
    };
    let context = match gate.auth.tenant(&tenant_id, creds, true).await {
        Ok(context) => context,
        Err(err) => {
            let request_id = req.extensions().get::<RequestId>().map(|r| r.0.clone());
            crate::audit::credential_refused(&gate.store, &tenant_id, &err, request_id.as_deref())
                .await;
            return ApiError::from(err).into_response();
        }
    };
    tracing::Span::current().record("tenant_id", context.tenant_id.as_str());
    req.extensions_mut().insert(context);
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .map(|v| v.to_str().ok().map(str::to_owned));
    match session {
        Some(Some(id)) => with_session(&gate, &tenant_id, &id, req, next)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Some(None) => no_session().into_response(),
        None if req.method() == Method::POST => post_without_session(&gate, &tenant_id, req, next)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        None => next.run(req).await,
    }
}

/// The MCP "session not found" answer: the client initialises again.
fn no_session() -> ApiError {
    ApiError::NotFound("no such MCP session".into())
}

/// A request in a session. A session is used only by the tenant that opened it; to any other
/// it does not exist. One not open on this replica is rebuilt here (by rmcp, through our
/// session store and manager) if its id opens and names this tenant.
async fn with_session(
    gate: &Gate,
    tenant_id: &str,
    id: &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let ending = req.method() == Method::DELETE;
    if let Some(owner) = gate.limits.owner(id) {
        if owner != tenant_id {
            return Err(no_session());
        }
        return Ok(ended_if(gate, id, ending, next.run(req).await));
    }
    if gate.limits.was_ended(id) {
        return Err(no_session());
    }
    match gate.seal.open(id) {
        Some(claims) if claims.tenant == tenant_id => {}
        _ => return Err(no_session()),
    }
    // Ending a session needs no copy of it here.
    if ending {
        return Ok(ended_if(gate, id, true, next.run(req).await));
    }
    let reservation = reserve(gate, tenant_id)?;
    Ok(with_pending(Pending::restore(reservation), next.run(req)).await)
}

/// After a successful `DELETE`, remembers the session as ended so it is not rebuilt here.
fn ended_if(gate: &Gate, id: &str, ending: bool, response: Response) -> Response {
    if ending && response.status().is_success() {
        gate.limits.ended(id);
    }
    response
}

fn reserve(gate: &Gate, tenant_id: &str) -> Result<Reservation, ApiError> {
    gate.limits.reserve(tenant_id).map_err(|err| match err {
        LimitError::Total => ApiError::unavailable("too many open MCP sessions on this server"),
        LimitError::Tenant => {
            ApiError::unavailable("this tenant has too many open MCP sessions; close some")
        }
    })
}

/// A POST without a session: an `initialize` opens one (within the caps); anything else is
/// a session-less request (protocol 2026-07-28, `server/discover`) or rmcp's own error.
async fn post_without_session(
    gate: &Gate,
    tenant_id: &str,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, gate.max_body_bytes)
        .await
        .map_err(|_| ApiError::PayloadTooLarge)?;
    let opens_session = initialize_params(&bytes);
    let req = Request::from_parts(parts, Body::from(bytes));
    let Some(params) = opens_session else {
        return Ok(next.run(req).await);
    };
    let reservation = reserve(gate, tenant_id)?;
    Ok(with_pending(Pending::open(reservation, params), next.run(req)).await)
}

/// The parameters of `body` if it is a JSON-RPC `initialize` request (not a batch, not a
/// notification); they are sealed into the new session's id.
fn initialize_params(body: &Bytes) -> Option<InitializeRequestParams> {
    #[derive(serde::Deserialize)]
    struct Probe {
        method: Option<String>,
        id: Option<serde_json::Value>,
        params: Option<InitializeRequestParams>,
    }
    let probe = serde_json::from_slice::<Probe>(body).ok()?;
    match (probe.method.as_deref(), probe.id) {
        (Some("initialize"), Some(_)) => probe.params,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_initialize_request_opens_a_session() {
        let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{
            "protocolVersion":"2025-11-25","capabilities":{},
            "clientInfo":{"name":"t","version":"1"}}}"#;
        let params = initialize_params(&Bytes::from_static(init)).expect("initialize");
        assert_eq!(params.protocol_version.as_str(), "2025-11-25");
        let list = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        assert!(initialize_params(&Bytes::from_static(list)).is_none());
        let note = br#"{"jsonrpc":"2.0","method":"initialize","params":{}}"#;
        assert!(initialize_params(&Bytes::from_static(note)).is_none());
        assert!(initialize_params(&Bytes::from_static(b"[1,2]")).is_none());
        assert!(initialize_params(&Bytes::from_static(b"not json")).is_none());
    }
}
