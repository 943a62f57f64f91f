//! The per-client-address limit against key guessing (`AUTH_RATE_LIMIT` requests per
//! second, `AUTH_RATE_BURST`): every request to the token endpoints, and every refused
//! credential on a tenant route, spends from it. The client address is the socket peer, or
//! the right-most `X-Forwarded-For` address (the one the proxy in front added) when
//! `TRUST_PROXY` is set (only behind a proxy you run). Per-tenant limits are not here: the
//! tenant actor owns them.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::error::ApiError;
use crate::config::Config;
use crate::shutdown::Lifecycle;

/// How often addresses that are back to a full burst are forgotten.
const RETAIN_EVERY: Duration = Duration::from_secs(60);

pub struct AuthLimiter {
    limiter: DefaultKeyedRateLimiter<IpAddr>,
    trust_proxy: bool,
}

impl AuthLimiter {
    pub fn new(config: &Config) -> Self {
        let rate = NonZeroU32::new(config.auth_rate_limit).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.auth_rate_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            trust_proxy: config.trust_proxy,
        }
    }

    /// Checks one request from `client`; `Err` holds how long to wait.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&client)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Spends one request of the caller's budget: the client address from `headers` and
    /// the socket `peer`, as [`Self::client_of`] says. Past it, 429 `rate_limited`.
    pub fn admit(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        self.check(self.client_of(headers, peer))
            .map_err(|retry_after| {
                crate::metrics::rate_limited("auth");
                ApiError::RateLimited { retry_after }
            })
    }

    /// Addresses tracked now (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }

    /// Forgets, every minute until shutdown, the addresses whose limit is back to full,
    /// so the table holds only recent callers.
    pub fn spawn_cleanup(self: &Arc<Self>, lifecycle: &Lifecycle) {
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (me, token) = (Arc::downgrade(self), lifecycle.token.clone());
        lifecycle.tasks.spawn(async move {
            let mut tick = tokio::time::interval(RETAIN_EVERY);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let Some(me) = me.upgrade() else { break };
                me.limiter.retain_recent();
                me.limiter.shrink_to_fit();
            }
        });
    }

    /// The address a request counts against.
    pub fn client_of(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> IpAddr {
        if self.trust_proxy {
            if let Some(ip) = forwarded_for(headers) {
                return ip;
            }
        }
        peer.map(|p| p.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

/// The right-most address of `X-Forwarded-For`: the one the trusted proxy in front appended
/// (the peer it saw). Everything left of it came from the client, which can write anything
/// there to dodge its limit.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers.get("x-forwarded-for")?.to_str().ok()?;
    value.rsplit(',').next()?.trim().parse().ok()
}

/// The socket address of the request's peer, when the server recorded it.
pub fn peer_of(extensions: &axum::http::Extensions) -> Option<SocketAddr> {
    extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)
}

/// Taken first by the token endpoints (before their body is read): refuses a request past
/// its address's limit with 429 `rate_limited`. An extractor rather than a layer, so no
/// other route pays for it.
pub struct WithinAuthLimit;

impl<S> FromRequestParts<S> for WithinAuthLimit
where
    S: Send + Sync,
    Arc<AuthLimiter>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let limiter = Arc::<AuthLimiter>::from_ref(state);
        limiter.admit(&parts.headers, peer_of(&parts.extensions))?;
        Ok(WithinAuthLimit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let mut config = Config::for_tests();
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        let peer = Some(SocketAddr::from(([127, 0, 0, 1], 4000)));
        let direct = AuthLimiter::new(&config);
        assert_eq!(
            direct.client_of(&headers, peer),
            IpAddr::from([127, 0, 0, 1])
        );
        config.trust_proxy = true;
        let proxied = AuthLimiter::new(&config);
        // The address the trusted proxy appended, not what the client wrote before it.
        assert_eq!(
            proxied.client_of(&headers, peer),
            IpAddr::from([10, 0, 0, 1])
        );
    }

    #[test]
    fn the_burst_is_allowed_then_refused_with_a_wait() {
        let mut config = Config::for_tests();
        config.auth_rate_limit = 1;
        config.auth_rate_burst = 3;
        let limiter = AuthLimiter::new(&config);
        let ip = IpAddr::from([192, 0, 2, 1]);
        for _ in 0..3 {
            assert!(limiter.check(ip).is_ok());
        }
        let wait = limiter.check(ip).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limiter.check(IpAddr::from([192, 0, 2, 2])).is_ok());
        assert_eq!(limiter.tracked(), 2);
    }
}
