//! Extractors that turn a request into typed input or an [`ApiError`]: JSON bodies with the
//! contract's 400/413/415 answers (naming the field, never echoing a value), and the admin
//! and tenant credential guards, which run before any handler touches a tenant.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::middleware::RequestId;
use super::ratelimit::{peer_of, AuthLimiter};
use crate::audit::AuditWriter;
use crate::auth::{AuthContext, AuthError, Authenticator, TenantCredentials};

/// A JSON body. `Content-Type` must be `application/json`; errors follow API.md.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let measured = MeasuredJson::from_request(req, state).await?;
        Ok(ApiJson(measured.body))
    }
}

/// A JSON body, as [`ApiJson`], with its size in bytes as read (also when it came in
/// chunks, with no `Content-Length`): for the audit trail's `requestBytes`.
pub struct MeasuredJson<T> {
    pub body: T,
    pub bytes: usize,
}

impl<S, T> FromRequest<S> for MeasuredJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::invalid_request("the request body could not be read")
            }
        })?;
        let body = parse_json(&bytes)?;
        Ok(MeasuredJson {
            body,
            bytes: bytes.len(),
        })
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
        .unwrap_or(false)
}

/// Parses `bytes` as `T`; the message names the field, and the expected type where serde
/// gives it (not for an enum's field: "invalid type" alone), never the value that was sent
/// (it might be a secret in the wrong place).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() && path != "." && is_well_formed(bytes) {
            // serde_json reads anything but a string or an object where an enum belongs
            // (`"upstreamTransport":5`) as a syntax error; in a well-formed document it is a
            // field of the wrong type, named as any other.
            return ApiError::InvalidRequest(format!("field `{path}`: invalid type"));
        }
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::InvalidJson(format!(
                "malformed JSON at line {} column {}",
                inner.line(),
                inner.column()
            ));
        }
        ApiError::InvalidRequest(describe_data_error(&path, &inner.to_string()))
    })?;
    de.end()
        .map_err(|_| ApiError::InvalidJson("trailing characters after the JSON value".into()))?;
    Ok(value)
}

/// Whether `bytes` are one JSON document, whatever its shape (read again only when a typed
/// read failed with a syntax error).
fn is_well_formed(bytes: &[u8]) -> bool {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fn describe_data_error(path: &str, message: &str) -> String {
    // serde's message ends with " at line L column C"; drop it, the path says where. Both
    // splits are from the right: a quoted value sent by the caller comes before serde's own
    // words, and may contain them.
    let message = message
        .rsplit_once(" at line ")
        .map_or(message, |(message, _)| message);
    let at = if path == "." {
        String::new()
    } else {
        format!("field `{path}`: ")
    };
    // These name the field themselves, and quote no value the caller sent.
    if message.starts_with("missing field")
        || message.starts_with("unknown field")
        || message.starts_with("duplicate field")
    {
        return format!("{at}{message}");
    }
    match message.rsplit_once(", expected ") {
        Some((kind, expected)) => {
            // "invalid type: string \"…\"", "unknown variant `…`": keep the kind only.
            let kind = kind
                .split([':', '`'])
                .next()
                .map(str::trim_end)
                .unwrap_or("invalid value");
            format!("{at}{kind}, expected {expected}")
        }
        None => format!("{at}invalid value"),
    }
}

/// What a credential header that is not visible ASCII counts as: a credential sent that
/// matches nothing. Ignoring it would let the other credential alone through, where API.md
/// says that when both are sent, both must be valid.
const UNREADABLE: &str = "\u{0}";

/// The one line of credential header `name`, if sent. Sent twice, it counts as a wrong
/// credential, as one that is not visible ASCII does: which of the two a proxy in between
/// would pass on, or check, is not ours to guess.
fn credential_line<'a>(headers: &'a HeaderMap, name: &header::HeaderName) -> Option<&'a str> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?;
    if lines.next().is_some() {
        return Some(UNREADABLE);
    }
    Some(first.to_str().unwrap_or(UNREADABLE))
}

/// The `Authorization: Bearer` value, if any. An empty one counts as none, as it did for
/// the old service; one that is not visible ASCII, or a header sent twice, counts as a
/// wrong one.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = credential_line(headers, &header::AUTHORIZATION)?;
    if value == UNREADABLE {
        return Some(UNREADABLE);
    }
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The `x-api-key` value, if any; empty counts as none, not visible ASCII (or the header
/// sent twice) as a wrong key.
pub fn api_key_header(headers: &HeaderMap) -> Option<&str> {
    static X_API_KEY: header::HeaderName = header::HeaderName::from_static("x-api-key");
    let value = credential_line(headers, &X_API_KEY)?;
    Some(value.trim()).filter(|v| !v.is_empty())
}

/// Query parameters. A value of the wrong type is the contract's 400 `invalid_request` in
/// JSON, naming the parameter and never echoing the value (axum's own answer is plain text).
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::InvalidRequest(describe_query_error(
                &rejection.body_text(),
            ))),
        }
    }
}

/// axum's text is "Failed to deserialize query string: {parameter}: {what}", where `what`
/// may quote the value: only the parameter's name is kept.
fn describe_query_error(text: &str) -> String {
    text.strip_prefix("Failed to deserialize query string: ")
        .and_then(|rest| rest.split_once(": "))
        .map(|(name, _)| format!("query parameter `{name}`: invalid value"))
        .unwrap_or_else(|| "malformed query string".to_owned())
}

/// A path parameter. One that does not decode (say, percent-encoded bytes that are not
/// UTF-8) is the contract's 400 `invalid_request` in JSON, not axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(_) => Err(ApiError::invalid_request("malformed path parameter")),
        }
    }
}

/// Proof that the caller is the operator. A refused admin credential spends from the
/// caller's address budget on the auth limiter; an address past it gets 429 without its
/// credential being checked (a right guess of the admin key included) until it refills.
pub struct Admin;

impl<S> FromRequestParts<S> for Admin
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
    Arc<AuthLimiter>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let limiter = Arc::<AuthLimiter>::from_ref(state);
        let peer = peer_of(&parts.extensions);
        limiter.blocked(&parts.headers, peer)?;
        let auth = Arc::<Authenticator>::from_ref(state);
        match auth.admin(bearer(&parts.headers)) {
            Ok(()) => Ok(Admin),
            Err(err) => Err(limiter
                .refused(&parts.headers, peer)
                .unwrap_or_else(|| err.into())),
        }
    }
}

/// The tenant of a `/api/tenant/{tenantId}/…` route, after its credentials were checked
/// against the path. A refused credential is audited (see [`refuse_credential`]); accepted
/// ones cost no extra write.
pub struct Tenant(pub AuthContext);

/// The answer to a refused tenant credential (a REST tenant route or the MCP endpoint). A
/// wrong or foreign credential spends from the caller's address budget on the auth limiter,
/// as a token request does, and is audited (`auth.refused`, under the path's tenant, so the
/// tenant sees attempts on it); past the budget it is 429 and nothing is written, so that
/// refusals cannot drive database writes at any rate an anonymous caller likes. An API
/// key the store could not be asked about (503) counts as a refused one too, with no audit
/// row (the store is what failed): else keys guessed during an outage would each cost a
/// lookup of a database that is trying to recover, and a warning, at any rate. Past the
/// budget the address is blocked as for refusals, so its keys are looked up in the cache
/// only until it refills. A JWT was verified before its lookup: not a guess, not counted.
pub fn refuse_credential(
    err: AuthError,
    limiter: &AuthLimiter,
    parts: (&HeaderMap, &axum::http::Extensions),
    audit: &AuditWriter,
    tenant_id: &str,
) -> ApiError {
    let (headers, extensions) = parts;
    match err {
        AuthError::Unauthorized | AuthError::Forbidden => {
            if let Some(limited) = limiter.refused(headers, peer_of(extensions)) {
                return limited;
            }
            let request_id = extensions.get::<RequestId>().map(|r| r.id.as_str());
            crate::audit::credential_refused(audit, tenant_id, &err, request_id);
        }
        AuthError::Unavailable if carries_api_key(headers) => {
            if let Some(limited) = limiter.refused(headers, peer_of(extensions)) {
                return limited;
            }
        }
        AuthError::Unavailable => {}
        AuthError::TenantDisabled => {}
    }
    err.into()
}

/// Whether the request sends a tenant API key (as `x-api-key`, or as a bearer token).
fn carries_api_key(headers: &HeaderMap) -> bool {
    api_key_header(headers).is_some()
        || bearer(headers).is_some_and(crate::auth::keys::looks_like_api_key)
}

impl<S> FromRequestParts<S> for Tenant
where
    S: Send + Sync,
    Arc<Authenticator>: FromRef<S>,
    Arc<AuthLimiter>: FromRef<S>,
    AuditWriter: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let ApiPath(tenant_id) = ApiPath::<String>::from_request_parts(parts, state).await?;
        let auth = Arc::<Authenticator>::from_ref(state);
        let limiter = Arc::<AuthLimiter>::from_ref(state);
        let creds = TenantCredentials {
            bearer: bearer(&parts.headers),
            api_key: api_key_header(&parts.headers),
            cached_only: limiter.is_blocked(&parts.headers, peer_of(&parts.extensions)),
        };
        let context = match auth.tenant(&tenant_id, creds, false).await {
            Ok(context) => context,
            Err(err) => {
                let audit = AuditWriter::from_ref(state);
                let parts = (&parts.headers, &parts.extensions);
                return Err(refuse_credential(err, &limiter, parts, &audit, &tenant_id));
            }
        };
        tracing::Span::current().record("tenant_id", context.tenant_id.as_str());
        Ok(Tenant(context))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        integration_key: String,
        enabled: Option<bool>,
        transport: Option<Transport>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "kebab-case")]
    #[allow(dead_code)]
    enum Transport {
        StreamableHttp,
    }

    fn message(bytes: &[u8]) -> (String, String) {
        let err = parse_json::<Body>(bytes).unwrap_err();
        let (_, code, message) = err.parts();
        (code.to_owned(), message)
    }

    #[test]
    fn errors_name_the_field_and_never_echo_values() {
        let (code, msg) = message(br#"{"enabled":true}"#);
        assert_eq!(code, "invalid_request");
        assert!(msg.contains("integrationKey"), "{msg}");
        let (code, msg) = message(br#"{"integrationKey":"x","enabled":"sekrit-value"}"#);
        assert_eq!(code, "invalid_request");
        assert!(msg.contains("enabled") && !msg.contains("sekrit"), "{msg}");
        let (code, msg) = message(br#"{"integrationKey":"sekrit-value2","x":1}"#);
        assert!(
            msg.contains("unknown field `x`") && !msg.contains("sekrit"),
            "{code} {msg}"
        );
        let (code, msg) = message(br#"{"integrationKey":"x","transport":"sekrit-variant"}"#);
        assert_eq!(code, "invalid_request");
        assert!(
            msg.contains("transport") && msg.contains("unknown variant") && !msg.contains("sekrit"),
            "{msg}"
        );
        for planted in [
            r#"{"integrationKey":"x","enabled":"x, expected sekrit"}"#,
            r#"{"integrationKey":"x","enabled":"x, expected sekrit at line 1"}"#,
            r#"{"integrationKey":"x","transport":"a`, expected sekrit"}"#,
        ] {
            let (code, msg) = message(planted.as_bytes());
            assert_eq!(code, "invalid_request");
            assert!(!msg.contains("sekrit"), "{planted}: {msg}");
        }
        let (code, _) = message(br#"{"integrationKey": "#);
        assert_eq!(code, "invalid_json");
        let (code, _) = message(br#"{"integrationKey":"x""#);
        assert_eq!(code, "invalid_json");
    }

    #[test]
    fn a_wrong_typed_enum_is_named_not_malformed_json() {
        // serde_json reads anything but a string or an object where an enum belongs as a
        // syntax error, though the document is well formed.
        for wrong in ["5", "true", "[]", "{}", r#"["sse"]"#] {
            let body = format!(r#"{{"integrationKey":"x","transport":{wrong}}}"#);
            let (code, msg) = message(body.as_bytes());
            assert_eq!(code, "invalid_request", "{wrong}: {msg}");
            assert!(msg.contains("field `transport`"), "{wrong}: {msg}");
        }
        let (code, _) = message(br#"{"integrationKey":"x","transport":5"#);
        assert_eq!(code, "invalid_json", "still malformed when it is");
        let (code, _) = message(br#"{"integrationKey":"x","transport":[}"#);
        assert_eq!(code, "invalid_json", "still malformed when it is");
    }

    #[test]
    fn a_field_sent_twice_is_named() {
        let (code, msg) = message(br#"{"integrationKey":"x","integrationKey":"sekrit"}"#);
        assert_eq!(code, "invalid_request");
        assert_eq!(msg, "duplicate field `integrationKey`");
    }

    #[test]
    fn an_unreadable_credential_header_is_a_wrong_credential_not_none() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-api-key",
            HeaderValue::from_bytes(b"sbk_\xc3\xa9").unwrap(),
        );
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xc3\xa9").unwrap(),
        );
        assert_eq!(api_key_header(&headers), Some(UNREADABLE));
        assert_eq!(bearer(&headers), Some(UNREADABLE));
        headers.insert("x-api-key", HeaderValue::from_static(" "));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(api_key_header(&headers), None, "empty is none");
        assert_eq!(bearer(&headers), None, "empty is none");
    }

    #[test]
    fn query_errors_name_the_parameter_only() {
        assert_eq!(
            describe_query_error(
                "Failed to deserialize query string: limit: invalid digit found in string"
            ),
            "query parameter `limit`: invalid value"
        );
        assert_eq!(
            describe_query_error("something else"),
            "malformed query string"
        );
    }
}
