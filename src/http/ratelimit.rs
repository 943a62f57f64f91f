//! The per-client-address limit against key guessing (`AUTH_RATE_LIMIT` requests per
//! second, `AUTH_RATE_BURST`): every request to the token endpoints, and every refused
//! credential on a tenant or admin route or `/metrics`, spends from it. An address whose
//! refused credentials ran its budget out is blocked until it refills: no admin credential
//! or metrics token is checked for it (so a right guess of `ADMIN_API_KEY` is refused with
//! 429 as well), and a tenant API key it sends is looked up only in the credential cache,
//! never in the store, so that guessing keys cannot drive database reads at any rate an
//! anonymous caller likes.
//! Token requests spend without blocking: a client exchanging many keys is not guessing.
//!
//! The client address is the socket peer, or the right-most `X-Forwarded-For` address (the
//! one the proxy in front added, without the port some proxies add) when `TRUST_PROXY` is
//! set (only behind a proxy you run).
//! An IPv6 address counts by its /64 prefix, the block one host is usually given, so that
//! a host cannot dodge its limit (or grow the table) by changing address. Per-tenant limits
//! are not here: the tenant actor owns them.
//!
//! The tables have a cap of about [`MOST_TRACKED`] addresses, against a caller with many
//! addresses (a botnet, an IPv6 block larger than a /64): when they are full, the addresses
//! that are back to a full budget are forgotten at once (at most once a second; otherwise
//! every minute); if that leaves them full, every address counts against one shared budget
//! until there is room again, and once refused credentials run that out, every address is
//! blocked as one. So the gateway's memory stays bounded, and guessing stays limited, at a
//! price while such an attack lasts: token requests, admin requests and tenant API keys
//! not in the credential cache may get 429 from any address. Calls with a JWT or a cached
//! API key go on as before.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// About the most addresses the limiter tracks at once (some 5 MB; it may overshoot by a
/// request per worker thread, and the shared budget is one more): once the tables are full
/// an address is forgotten as soon as its budget is full again, two seconds after its last
/// request at most with the defaults, so it takes tens of thousands of new addresses a
/// second to keep them full.
pub const MOST_TRACKED: usize = 100_000;

/// How often, at most, full tables are cleaned up at once (from a request).
const RETAIN_FULL_EVERY: Duration = Duration::from_secs(1);

/// What an address spends from: its own budget, or, while the tables are full, the one that
/// every address shares then.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Counted {
    Address(IpAddr),
    Shared,
}

pub struct AuthLimiter {
    limiter: DefaultKeyedRateLimiter<Counted>,
    /// What ran its budget out on refused credentials (an address, or the shared budget),
    /// and until when.
    blocked: Mutex<HashMap<Counted, Instant>>,
    /// Whether `blocked` may hold an address: false, as it is unless someone is guessing,
    /// every tenant request skips its lock.
    any_blocked: AtomicBool,
    trust_proxy: bool,
    /// The cap on addresses tracked ([`MOST_TRACKED`]; smaller in tests).
    most_tracked: usize,
    /// When full tables were last cleaned up at once, in ms since `started`.
    retained_full_at: AtomicU64,
    started: Instant,
}

impl AuthLimiter {
    pub fn new(config: &Config) -> Self {
        let rate = NonZeroU32::new(config.auth_rate_limit).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.auth_rate_burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Self::with(quota, config.trust_proxy, MOST_TRACKED)
    }

    fn with(quota: Quota, trust_proxy: bool, most_tracked: usize) -> Self {
        Self {
            limiter: DefaultKeyedRateLimiter::keyed(quota),
            blocked: Mutex::new(HashMap::new()),
            any_blocked: AtomicBool::new(false),
            trust_proxy,
            most_tracked,
            retained_full_at: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Spends one request of `client`'s budget; `Err` holds how long to wait.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.spend(self.counted(client))
    }

    fn spend(&self, counted: Counted) -> Result<(), Duration> {
        self.limiter
            .check_key(&counted)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// What `client` spends from now: its own budget while the tables have room (made by
    /// forgetting the past first when they are full), the shared one otherwise.
    fn counted(&self, client: IpAddr) -> Counted {
        if self.limiter.len() >= self.most_tracked && !self.retain_full() {
            return Counted::Shared;
        }
        Counted::Address(client)
    }

    /// Forgets the past at once if that was not done in the last [`RETAIN_FULL_EVERY`]
    /// (one caller does it; the others go on meanwhile); whether the tables have room.
    fn retain_full(&self) -> bool {
        let now = self.started.elapsed().as_millis() as u64;
        let last = self.retained_full_at.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= RETAIN_FULL_EVERY.as_millis() as u64;
        if due
            && self
                .retained_full_at
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // Not shrunk: the tables fill again at once.
            self.forget_the_past(false);
        }
        self.limiter.len() < self.most_tracked
    }

    /// Spends one request of the caller's budget: the client address from `headers` and
    /// the socket `peer`, as [`Self::client_of`] says. Past it, 429 `rate_limited`.
    pub fn admit(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        self.check(self.client_of(headers, peer)).map_err(limited)
    }

    /// A refused credential (tenant or admin route, `/metrics`): spends from the caller's
    /// budget; past it, the address is blocked (see [`Self::blocked`]) until it refills, and
    /// the answer is 429.
    pub fn refused(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<ApiError> {
        let counted = self.counted(self.client_of(headers, peer));
        let wait = self.spend(counted).err()?;
        // A poisoned lock is taken as it is: the map holds only instants.
        let mut blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        blocked.insert(counted, Instant::now() + wait);
        self.any_blocked.store(true, Ordering::Release);
        Some(limited(wait))
    }

    /// 429 while the caller's address is out of budget, without spending from it. Taken
    /// before an admin credential or the metrics token is checked.
    pub fn blocked(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Result<(), ApiError> {
        match self.blocked_for(self.client_of(headers, peer)) {
            Some(retry_after) => Err(limited(retry_after)),
            None => Ok(()),
        }
    }

    /// Whether the caller's address is out of budget: a tenant route then looks its API
    /// key up in the credential cache only (`TenantCredentials::cached_only`).
    pub fn is_blocked(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> bool {
        // Every tenant request asks: the address is not worked out while nobody is blocked.
        self.any_blocked.load(Ordering::Acquire)
            && self.blocked_for(self.client_of(headers, peer)).is_some()
    }

    /// How long `client` stays blocked, if it is: its own block, or while the tables are
    /// full, the shared budget's.
    fn blocked_for(&self, client: IpAddr) -> Option<Duration> {
        if !self.any_blocked.load(Ordering::Acquire) {
            return None;
        }
        let (own, shared) = {
            let blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
            let until = |counted| blocked.get(&counted).copied();
            (until(Counted::Address(client)), until(Counted::Shared))
        };
        let now = Instant::now();
        let until = own
            .filter(|until| *until > now)
            .or(shared.filter(|_| self.limiter.len() >= self.most_tracked))?;
        let left = until.checked_duration_since(now)?;
        (!left.is_zero()).then_some(left)
    }

    /// Budgets tracked now: addresses, and the shared one (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }

    /// Blocks held now (for tests of the memory bound).
    #[cfg(test)]
    fn blocks(&self) -> usize {
        self.blocked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Forgets the addresses whose limit is back to full, and the blocks that are over; and
    /// gives the memory back if `shrink`.
    fn forget_the_past(&self, shrink: bool) {
        self.limiter.retain_recent();
        let mut blocked = self.blocked.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        blocked.retain(|_, until| *until > now);
        if shrink {
            self.limiter.shrink_to_fit();
            blocked.shrink_to_fit();
        }
        // Under the lock, so that no insert is missed between the two.
        self.any_blocked
            .store(!blocked.is_empty(), Ordering::Release);
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
                me.forget_the_past(true);
            }
        });
    }

    /// The address a request counts against (an IPv6 one by its /64 prefix).
    pub fn client_of(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> IpAddr {
        let address = self
            .trust_proxy
            .then(|| forwarded_for(headers))
            .flatten()
            .or(peer.map(|p| p.ip()))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        counted_as(address)
    }
}

/// The 429 of an address past its budget, counted.
fn limited(retry_after: Duration) -> ApiError {
    crate::metrics::rate_limited("auth");
    ApiError::RateLimited { retry_after }
}

/// An IPv4 address as it is (also when written IPv4-mapped in IPv6); an IPv6 address as its
/// /64 prefix.
fn counted_as(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !(u128::from(u64::MAX));
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// The right-most address of `X-Forwarded-For`: the one the trusted proxy in front appended
/// (the peer it saw). Everything left of it came from the client, which can write anything
/// there to dodge its limit. A proxy may append a header line of its own rather than extend
/// the client's (HAProxy's `option forwardfor` does), so it is the last line that counts.
fn forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let value = headers
        .get_all("x-forwarded-for")
        .iter()
        .next_back()?
        .to_str()
        .ok()?;
    forwarded_address(value.rsplit(',').next()?.trim())
}

/// The address of one `X-Forwarded-For` entry. Some proxies write the client's port too
/// (`203.0.113.7:51234`, `[2001:db8::1]:443`: Azure's Application Gateway does so),
/// or an IPv6 address in brackets: read as no address, such an entry would make every
/// client count as the proxy itself, one budget for all.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    if let Ok(address) = entry.parse() {
        return Some(address);
    }
    if let Ok(socket) = entry.parse::<SocketAddr>() {
        return Some(socket.ip());
    }
    let bracketed = entry.strip_prefix('[')?.strip_suffix(']')?;
    bracketed.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
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

    /// The `n`th of many client addresses, each of its own (192.0.0.0 on).
    fn nth_peer(n: u32) -> Option<SocketAddr> {
        Some(SocketAddr::from((u32::to_be_bytes(0xc000_0000 + n), 4000)))
    }

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
    fn a_forwarded_address_with_a_port_counts_as_the_address() {
        let mut config = Config::for_tests();
        config.trust_proxy = true;
        let limiter = AuthLimiter::new(&config);
        let peer = Some(SocketAddr::from(([10, 0, 0, 2], 4000)));
        let v6: IpAddr = "2001:db8::".parse().unwrap();
        for (entry, client) in [
            ("203.0.113.7:51234", IpAddr::from([203, 0, 113, 7])),
            (
                "10.1.1.1, 203.0.113.7:51234",
                IpAddr::from([203, 0, 113, 7]),
            ),
            ("[2001:db8::1]:443", v6),
            ("[2001:db8::1]", v6),
            ("2001:db8::1", v6),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", entry.parse().unwrap());
            assert_eq!(limiter.client_of(&headers, peer), client, "{entry}");
        }
        // Not an address, with or without a port: the socket peer, as before.
        for entry in [
            "unknown",
            "unknown:80",
            "[203.0.113.7]:80",
            "[]:80",
            "203.0.113.7:x",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", entry.parse().unwrap());
            assert_eq!(
                limiter.client_of(&headers, peer),
                IpAddr::from([10, 0, 0, 2]),
                "{entry}"
            );
        }
    }

    #[test]
    fn a_proxy_that_adds_its_own_header_line_is_the_one_believed() {
        let mut config = Config::for_tests();
        config.trust_proxy = true;
        let limiter = AuthLimiter::new(&config);
        let peer = Some(SocketAddr::from(([10, 0, 0, 2], 4000)));
        // The client's own line first, then the one the proxy added.
        for forged in ["6.6.6.6", "not an address"] {
            let mut headers = HeaderMap::new();
            headers.append("x-forwarded-for", forged.parse().unwrap());
            headers.append("x-forwarded-for", "203.0.113.7".parse().unwrap());
            assert_eq!(
                limiter.client_of(&headers, peer),
                IpAddr::from([203, 0, 113, 7]),
                "{forged}"
            );
        }
    }

    #[test]
    fn an_ipv6_host_counts_by_its_64_prefix() {
        let limiter = AuthLimiter::new(&Config::for_tests());
        let peer = |ip: &str| Some(SocketAddr::new(ip.parse().unwrap(), 4000));
        let headers = HeaderMap::new();
        for n in 0..1000u32 {
            let ip = format!("2001:db8:1:2:{:x}:{:x}::1", n >> 8, n & 0xff);
            assert!(limiter.admit(&headers, peer(&ip)).is_ok());
        }
        assert_eq!(limiter.tracked(), 1, "one /64, one entry");
        assert_eq!(
            limiter.client_of(&headers, peer("::ffff:192.0.2.9")),
            IpAddr::from([192, 0, 2, 9]),
            "an IPv4-mapped address counts as the IPv4 one"
        );
        assert!(limiter.admit(&headers, peer("2001:db8:1:3::1")).is_ok());
        assert_eq!(limiter.tracked(), 2);
    }

    #[test]
    fn an_address_past_its_budget_is_blocked() {
        let mut config = Config::for_tests();
        config.auth_rate_limit = 1;
        config.auth_rate_burst = 2;
        let limiter = AuthLimiter::new(&config);
        let headers = HeaderMap::new();
        let guesser = Some(SocketAddr::from(([192, 0, 2, 1], 4000)));
        let other = Some(SocketAddr::from(([192, 0, 2, 2], 4000)));
        for _ in 0..2 {
            assert!(limiter.blocked(&headers, guesser).is_ok());
            assert!(limiter.refused(&headers, guesser).is_none());
        }
        let limited = limiter.refused(&headers, guesser);
        assert!(matches!(limited, Some(ApiError::RateLimited { .. })));
        assert!(matches!(
            limiter.blocked(&headers, guesser),
            Err(ApiError::RateLimited { .. })
        ));
        assert!(limiter.blocked(&headers, other).is_ok());
        // Token requests spend the same budget, but do not block: exchanging keys is not
        // guessing them.
        assert!(limiter.admit(&headers, other).is_ok());
        assert!(limiter.admit(&headers, other).is_ok());
        assert!(limiter.admit(&headers, other).is_err());
        assert!(limiter.blocked(&headers, other).is_ok());
        assert!(!limiter.is_blocked(&headers, other));
        assert!(limiter.is_blocked(&headers, guesser));
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

    #[test]
    fn past_the_cap_new_addresses_share_one_budget() {
        // Per minute: no budget refills while the test runs, however slow the machine.
        let per_minute =
            Quota::per_minute(NonZeroU32::MIN).allow_burst(NonZeroU32::new(2).unwrap());
        let limiter = AuthLimiter::with(per_minute, false, 4);
        let headers = HeaderMap::new();
        // The first four addresses fill the tables; every later one, each a first request
        // from its address, spends from the one shared budget (a burst of two).
        let admitted = (0..1000)
            .filter(|n| limiter.admit(&headers, nth_peer(*n)).is_ok())
            .count();
        assert_eq!(admitted, 4 + 2);
        assert_eq!(limiter.tracked(), 5, "four addresses and the shared budget");
        // Refused credentials from yet more addresses block the shared budget, not each.
        for n in 1000..2000 {
            assert!(limiter.refused(&headers, nth_peer(n)).is_some());
        }
        assert_eq!(limiter.blocks(), 1);
        assert!(limiter.is_blocked(&headers, nth_peer(5000)));
        // While the tables are full, an address with a budget of its own left spends from
        // the shared one as well.
        assert!(limiter.blocked(&headers, nth_peer(0)).is_err());
        assert!(limiter.admit(&headers, nth_peer(0)).is_err());
        assert_eq!(limiter.tracked(), 5);
    }

    #[test]
    fn full_tables_forget_the_addresses_back_to_a_full_budget_at_once() {
        let per_ms = Quota::per_second(NonZeroU32::new(1000).unwrap());
        let limiter = AuthLimiter::with(per_ms, false, 4);
        let headers = HeaderMap::new();
        for n in 0..4 {
            assert!(limiter.admit(&headers, nth_peer(n)).is_ok());
        }
        assert_eq!(limiter.tracked(), 4);
        // A millisecond refills a budget of one; the next new address finds the tables
        // full, and the clean-up that makes room runs then, not a minute later.
        std::thread::sleep(Duration::from_millis(20));
        assert!(limiter.admit(&headers, nth_peer(4)).is_ok());
        assert_eq!(
            limiter.tracked(),
            1,
            "the four forgotten, the new one its own"
        );
    }
}
