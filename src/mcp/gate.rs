//! The gate in front of `/mcp/{tenantId}`: authenticates every request before rmcp sees it
//! (401 with `WWW-Authenticate: Bearer`, 403 for another tenant's credential or a disabled
//! tenant), so no session exists for a refused caller; keeps a session to the tenant that
//! opened it; and reserves a session slot for an `initialize`, refusing past the caps.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::sessions::{with_reservation, LimitError, SessionLimits};
use crate::auth::{Authenticator, TenantCredentials};
use crate::http::error::ApiError;
use crate::http::extract::{api_key_header, bearer};
use crate::http::middleware::RequestId;

/// What the gate needs: the credential checker, the session bounds, the body limit.
#[derive(Clone)]
pub struct Gate {
    pub auth: Arc<Authenticator>,
    pub limits: Arc<SessionLimits>,
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
        // A session is used only by the tenant that opened it; to any other it does not exist.
        Some(id) => match id.and_then(|id| gate.limits.owner(&id)) {
            Some(owner) if owner == tenant_id => next.run(req).await,
            _ => ApiError::NotFound("no such MCP session".into()).into_response(),
        },
        None if req.method() == Method::POST => post_without_session(&gate, &tenant_id, req, next)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        None => next.run(req).await,
    }
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
    let opens_session = is_initialize(&bytes);
    let req = Request::from_parts(parts, Body::from(bytes));
    if !opens_session {
        return Ok(next.run(req).await);
    }
    let reservation = gate.limits.reserve(tenant_id).map_err(|err| match err {
        LimitError::Total => ApiError::unavailable("too many open MCP sessions on this server"),
        LimitError::Tenant => {
            ApiError::unavailable("this tenant has too many open MCP sessions; close some")
        }
    })?;
    Ok(with_reservation(reservation, next.run(req)).await)
}

/// Whether `body` is a JSON-RPC `initialize` request (not a batch, not a notification).
fn is_initialize(body: &Bytes) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe {
        method: Option<String>,
        id: Option<serde_json::Value>,
    }
    serde_json::from_slice::<Probe>(body)
        .is_ok_and(|p| p.method.as_deref() == Some("initialize") && p.id.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_initialize_request_opens_a_session() {
        let init = br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{}}"#;
        assert!(is_initialize(&Bytes::from_static(init)));
        let list = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
        assert!(!is_initialize(&Bytes::from_static(list)));
        let note = br#"{"jsonrpc":"2.0","method":"initialize"}"#;
        assert!(!is_initialize(&Bytes::from_static(note)));
        assert!(!is_initialize(&Bytes::from_static(b"[1,2]")));
        assert!(!is_initialize(&Bytes::from_static(b"not json")));
    }
}
