//! Opening an upstream session: the HTTP client, the transport the tenant asked for, and the
//! MCP `initialize` handshake over it.
//!
//! Every session gets its own `reqwest::Client` and its own rmcp transport and peer, so no
//! connection pool, session id, or rmcp response cache is ever shared between tenants. Only
//! the TLS settings (root certificates, verifier) are built once and shared: they hold no
//! tenant state, and each client's own copy cost ~100 KB (README, Performance).

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use rmcp::{
    service::{ClientInitializeError, RoleClient, RunningService},
    transport::{
        common::client_side_sse::ExponentialBackoff,
        streamable_http_client::StreamableHttpClientTransportConfig, StreamableHttpClientTransport,
    },
    ServiceExt,
};
use tokio_util::sync::CancellationToken;

use super::{
    error::{init_client_error_status, Redaction},
    events::EventForwarder,
    progress::{Ordered, ProgressRoutes},
    renewal::RenewalWatch,
    sse::SseTransport,
    TransportKind, UpstreamError, UpstreamTarget,
};

/// A running rmcp client session, whichever transport carries it.
pub(super) type Session = RunningService<RoleClient, EventForwarder>;

/// Ordinary POSTs one Streamable HTTP session may have in flight (rmcp's default is 16), or
/// the tenant's `TENANT_MAX_IN_FLIGHT` if that is more. A POST stops counting once the
/// server opens an SSE answer, but JSON-answering servers hold it for the whole call, and
/// the tenant actor wants many concurrent calls on one session.
const MAX_CONCURRENT_POSTS: usize = 256;
/// Idle pooled connections kept per upstream host, and for how long. As many as the POSTs a
/// session may have in flight: with fewer, every call past that count closed its connection
/// on return and the next one opened a new one (at 64 callers, `connect` alone was 2% of the
/// gateway's samples; README, Performance). Idle ones close after the timeout.
const POOL_IDLE_PER_HOST: usize = MAX_CONCURRENT_POSTS;
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Redirects one upstream request follows at most (see [`same_origin_redirects`]).
const MAX_REDIRECTS: usize = 3;
/// The longest wait between two reconnects of a Streamable HTTP server-to-client stream.
const MAX_STREAM_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// Builds the HTTP client of one upstream session. No total request timeout: it would cut the
/// long-lived SSE streams. Each call's deadline is enforced per request in [`super::client`].
pub(super) fn http_client(connect_timeout: Duration) -> Result<reqwest::Client, UpstreamError> {
    reqwest::Client::builder()
        .tls_backend_preconfigured(shared_tls()?)
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
        .tcp_keepalive(Duration::from_secs(30))
        .redirect(same_origin_redirects())
        // A Referer would carry the URL's query (`integrationKey`, a custom URL's key).
        .referer(false)
        .build()
        .map_err(|error| UpstreamError::Connect(format!("HTTP client: {}", error.without_url())))
}

/// The redirects an upstream request follows: at most [`MAX_REDIRECTS`], each a 307 or 308
/// (which keep the method and the body) to the origin the request was sent to. A redirect
/// elsewhere would take the call's arguments and session id to another host (and let an
/// upstream have the gateway read a host its URL could not name), and a 301, 302 or 303
/// would turn the POST into a GET; either is answered as it is, as an HTTP error.
fn same_origin_redirects() -> reqwest::redirect::Policy {
    use reqwest::StatusCode;
    reqwest::redirect::Policy::custom(|attempt| {
        let same_origin = attempt
            .previous()
            .first()
            .is_some_and(|first| first.origin() == attempt.url().origin());
        let keeps_the_body = matches!(
            attempt.status(),
            StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT
        );
        if !(same_origin && keeps_the_body) {
            attempt.stop()
        } else if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error("too many redirects")
        } else {
            attempt.follow()
        }
    })
}

/// The process's one TLS client configuration: the platform's root certificates through
/// rustls-platform-verifier (what reqwest builds by default, per client), HTTP/1.1 by ALPN.
/// Clones share the verifier and the session-resumption cache.
fn shared_tls() -> Result<rustls::ClientConfig, UpstreamError> {
    static TLS: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = rustls_platform_verifier::Verifier::new(provider.clone())
            .map_err(|e| format!("TLS roots: {e}"))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    })
    .clone()
    .map_err(UpstreamError::Connect)
}

/// Connects with the transport `target` asks for and runs `initialize`, within
/// `target.connect_timeout` per attempt. Returns the session and the transport actually used.
pub(super) async fn open(
    target: &UpstreamTarget,
    handler: EventForwarder,
    progress: &ProgressRoutes,
    ct: CancellationToken,
) -> Result<(Session, TransportKind), UpstreamError> {
    let http = http_client(target.connect_timeout)?;
    match target.transport {
        TransportKind::StreamableHttp => {
            let session = streamable(target, http, handler, progress, ct).await?;
            Ok((session, TransportKind::StreamableHttp))
        }
        TransportKind::Sse => {
            let session = sse(target, http, handler, progress, ct).await?;
            Ok((session, TransportKind::Sse))
        }
        TransportKind::Auto => {
            match streamable(target, http.clone(), handler.clone(), progress, ct.clone()).await {
                Ok(session) => Ok((session, TransportKind::StreamableHttp)),
                Err(Attempt::Http4xx(status)) => {
                    tracing::debug!(
                        status,
                        "upstream refused Streamable HTTP; trying legacy SSE"
                    );
                    let session = sse(target, http, handler, progress, ct).await?;
                    Ok((session, TransportKind::Sse))
                }
                Err(Attempt::Failed(error)) => Err(error),
            }
        }
    }
}

/// How a Streamable HTTP attempt failed: `Http4xx` is the cue to try legacy SSE.
enum Attempt {
    Http4xx(u16),
    Failed(UpstreamError),
}

impl From<Attempt> for UpstreamError {
    fn from(attempt: Attempt) -> Self {
        match attempt {
            Attempt::Http4xx(status) => {
                UpstreamError::Connect(format!("upstream answered initialize with HTTP {status}"))
            }
            Attempt::Failed(error) => error,
        }
    }
}

async fn streamable(
    target: &UpstreamTarget,
    http: reqwest::Client,
    handler: EventForwarder,
    progress: &ProgressRoutes,
    ct: CancellationToken,
) -> Result<Session, Attempt> {
    let mut config = StreamableHttpClientTransportConfig::with_uri(target.url.as_str())
        .auth_header(target.token.expose())
        .max_concurrent_requests(MAX_CONCURRENT_POSTS.max(target.max_in_flight));
    // rmcp doubles the delay between reconnects of the server-to-client stream without bound;
    // capped, the stream comes back soon after an upstream restart.
    let mut backoff = ExponentialBackoff::default();
    backoff.max_delay = Some(MAX_STREAM_RECONNECT_DELAY);
    config.retry_config = Arc::new(backoff);
    // This attempt's own token: given up (timed out, failed, or this future dropped), its
    // POSTs end with it; `ct` itself may still serve a legacy SSE attempt (`auto`).
    let attempt = ct.child_token();
    let given_up = attempt.clone().drop_guard();
    let http = RenewalWatch::new(http, handler.events(), attempt.clone());
    let transport = StreamableHttpClientTransport::with_client(http, config);
    let handshake = handler.serve_with_ct(Ordered::new(transport, progress.clone()), attempt);
    match tokio::time::timeout(target.connect_timeout, handshake).await {
        Ok(Ok(session)) => {
            given_up.disarm();
            Ok(session)
        }
        Ok(Err(error)) => Err(classify(error, &Redaction::new(&target.url, &target.token))),
        Err(_) => Err(Attempt::Failed(unanswered_handshake(target))),
    }
}

/// A handshake with no answer within `UPSTREAM_CONNECT_TIMEOUT_MS`: the upstream could not
/// be reached (502 `upstream_error`, and a failure towards marking the tenant failing), not
/// a call that ran out of `UPSTREAM_TIMEOUT_MS` (504).
fn unanswered_handshake(target: &UpstreamTarget) -> UpstreamError {
    UpstreamError::Connect(format!(
        "no answer to the handshake within {} ms",
        target.connect_timeout.as_millis()
    ))
}

fn classify(error: ClientInitializeError, redaction: &Redaction) -> Attempt {
    match init_client_error_status(&error) {
        // 401 and 403 are about the token, not the transport: SSE would fail the same way.
        Some(status) if status != 401 && status != 403 => Attempt::Http4xx(status),
        _ => Attempt::Failed(UpstreamError::from_init(error, redaction)),
    }
}

async fn sse(
    target: &UpstreamTarget,
    http: reqwest::Client,
    handler: EventForwarder,
    progress: &ProgressRoutes,
    ct: CancellationToken,
) -> Result<Session, UpstreamError> {
    let timeout = target.connect_timeout;
    let redaction = Redaction::new(&target.url, &target.token);
    let handshake = async {
        let post_timeout = target.call_timeout + timeout;
        let transport = SseTransport::connect(
            http,
            &target.url,
            target.token.clone(),
            timeout,
            post_timeout,
        )
        .await
        .map_err(|error| {
            if let Some(throttled) = super::error::throttled(&error) {
                return throttled;
            }
            let failed = super::error::described(&error);
            UpstreamError::Connect(redaction.apply(&format!("legacy SSE: {failed}")))
        })?;
        handler
            .serve_with_ct(Ordered::new(transport, progress.clone()), ct)
            .await
            .map_err(|error| UpstreamError::from_init(error, &redaction))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(result) => result,
        Err(_) => Err(unanswered_handshake(target)),
    }
}
