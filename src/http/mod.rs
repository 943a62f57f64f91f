//! The HTTP layer (axum): the router, its state, the middleware stack and the OpenAPI
//! description of the REST routes ([`api_routes`]) generated from the same route
//! definitions (utoipa-axum), so those routes and `/openapi.json` cannot drift apart. The
//! MCP endpoint (`/mcp/{tenantId}`) is mounted beside them and is not in the description.

pub mod error;
pub mod extract;
pub mod middleware;
pub mod no_store;
pub mod ratelimit;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::http::{header, HeaderValue, Method};
use axum::{Json, Router};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::shutdown::Lifecycle;
use crate::store::SharedStore;
use crate::tenants::admin::TenantAdmin;
use crate::tenants::runtime::TenantRuntime;
use error::ApiError;

/// What handlers can reach, behind one `Arc`: axum clones the state with every handler
/// and layer a request passes through, and a clone is then one reference count, where the
/// parts' own clones took a lock (the cancellation tokens) and a dozen atomic counts. The
/// extractors take the narrow parts they need through `FromRef` (below).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

pub struct AppParts {
    pub config: Arc<Config>,
    pub store: SharedStore,
    /// Writes the audit events that are not a tenant's calls.
    pub audit: crate::audit::AuditWriter,
    pub auth: Arc<Authenticator>,
    pub admin: Arc<TenantAdmin>,
    pub tenants: TenantRuntime,
    pub lifecycle: Arc<Lifecycle>,
    /// The per-address limit of the token endpoints.
    pub auth_limiter: Arc<ratelimit::AuthLimiter>,
    /// The probes' database check, one ping at a time.
    pub probe: Arc<routes::health::DatabaseProbe>,
}

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

impl FromRef<AppState> for Arc<Authenticator> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

impl FromRef<AppState> for Arc<ratelimit::AuthLimiter> {
    fn from_ref(state: &AppState) -> Self {
        state.auth_limiter.clone()
    }
}

impl FromRef<AppState> for crate::audit::AuditWriter {
    fn from_ref(state: &AppState) -> Self {
        state.audit.clone()
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "switchboard", description = "A multi-tenant gateway for the Model Context Protocol"),
    modifiers(&SecuritySchemes),
    components(schemas(error::ErrorBody))
)]
struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
        components.add_security_scheme(
            "apiKey",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("x-api-key"))),
        );
    }
}

/// The REST routes with their OpenAPI description.
pub fn api_routes() -> OpenApiRouter<AppState> {
    use routes::{audit, auth, health, metrics, tenants, tool};
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::live))
        .routes(routes!(health::health))
        .routes(routes!(health::ready))
        .routes(routes!(metrics::metrics))
        .routes(routes!(auth::admin_token))
        .routes(routes!(auth::tenant_token))
        .routes(routes!(tenants::create, tenants::list))
        .routes(routes!(tenants::get, tenants::update, tenants::delete))
        .routes(routes!(tenants::rotate_key))
        .routes(routes!(audit::for_admin))
        .routes(routes!(audit::for_tenant))
        .routes(routes!(tool::call))
}

/// The OpenAPI 3.1 document of the REST API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    api_routes().into_openapi()
}

/// The whole application. Layers run outside-in in the order written last-to-first:
/// the request context (id, span, drain gate, error bodies) wraps everything, so even a
/// timeout or an oversize body gets the contract's error body and a request id.
pub fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let lifecycle = state.lifecycle.clone();
    let (api, spec) = api_routes().split_for_parts();
    let spec = Arc::new(spec);
    let mcp = crate::mcp::routes(&state);
    api.merge(mcp)
        .route(
            "/openapi.json",
            axum::routing::get(move || {
                let spec = spec.clone();
                async move { Json(spec.as_ref().clone()) }
            }),
        )
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        .layer(cors(&config))
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(middleware::Edge {
                lifecycle,
                trust_proxy: config.trust_proxy,
            }),
            middleware::request_context,
        ))
}

fn cors(config: &Config) -> CorsLayer {
    // Checked at start-up (`config::cors_origins`): each is a plain origin.
    let origins: Vec<HeaderValue> = config
        .cors_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PATCH, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            axum::http::HeaderName::from_static("x-api-key"),
            axum::http::HeaderName::from_static("x-request-id"),
            axum::http::HeaderName::from_static("mcp-session-id"),
            axum::http::HeaderName::from_static("mcp-protocol-version"),
            axum::http::HeaderName::from_static("last-event-id"),
            header::IF_MATCH,
        ])
        // What a browser app must read: the request id, the MCP session, how long to wait
        // after a 429 or 503, and which credential a 401 wants.
        .expose_headers([
            axum::http::HeaderName::from_static("x-request-id"),
            axum::http::HeaderName::from_static("mcp-session-id"),
            header::RETRY_AFTER,
            header::WWW_AUTHENTICATE,
        ])
        .max_age(Duration::from_secs(600))
}
