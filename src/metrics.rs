//! Every metric the gateway exports: names, labels and the helpers that record them, so
//! the set stays in one place and its label sets stay bounded. The Prometheus recorder is
//! installed once per process ([`install`]; tests start many gateways in one process) and
//! rendered by `GET /metrics`; there is no exporter HTTP listener of its own. A thread of
//! its own folds the histograms' samples into their buckets every [`UPKEEP_EVERY`]: the
//! recorder holds each sample until then (or until a scrape), so a gateway nobody scraped
//! grew by about 50 bytes per tool call, some 1.5 GB an hour at 9,000 calls a second.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Histogram};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// HTTP requests by `route` (the route template as [`route_label`] writes it, never the raw path), `method`, `status`.
pub const HTTP_REQUESTS: &str = "switchboard_http_requests_total";
pub const HTTP_DURATION: &str = "switchboard_http_request_duration_seconds";
/// Tool calls by `tenant`, `tool` and `outcome` (the audit outcomes), REST and MCP alike.
pub const TOOL_CALLS: &str = "switchboard_tool_calls_total";
/// Time spent waiting on upstream MCP servers for a tool call, by `outcome`.
pub const UPSTREAM_DURATION: &str = "switchboard_upstream_duration_seconds";
pub const ACTOR_STARTS: &str = "switchboard_actor_starts_total";
pub const ACTOR_STOPS: &str = "switchboard_actor_stops_total";
pub const ACTOR_RESTARTS: &str = "switchboard_actor_restarts_total";
/// Tenant actors running now.
pub const ACTIVE_TENANTS: &str = "switchboard_active_tenants";
/// Tenants by the `state` of their upstream connection (`stopped`, `connecting`, `ready`,
/// `failing`): those with an actor, or restarting after a crash.
pub const TENANT_UPSTREAMS: &str = "switchboard_tenant_upstreams";
/// Downstream MCP sessions open now.
pub const MCP_SESSIONS: &str = "switchboard_mcp_sessions";
/// Requests refused by a rate limit, by `scope` (`tenant` or `auth`).
pub const RATE_LIMITED: &str = "switchboard_rate_limited_total";
pub const AUDIT_PENDING: &str = "switchboard_audit_pending";
pub const AUDIT_DROPPED: &str = "switchboard_audit_dropped_total";
/// Upstream progress notifications dropped because their caller fell too far behind.
pub const PROGRESS_DROPPED: &str = "switchboard_progress_dropped_total";
/// PostgreSQL pool connections, by `state` (`in_use`, `idle`); absent on SQLite.
pub const DB_POOL_CONNECTIONS: &str = "switchboard_db_pool_connections";
/// Replicas sharing the PostgreSQL database, as the heartbeat last counted them.
pub const FLEET_REPLICAS: &str = "switchboard_fleet_replicas";
/// Reconnects of the fleet's change listener (PostgreSQL `LISTEN`).
pub const CHANGE_LISTENER_RECONNECTS: &str = "switchboard_change_listener_reconnects_total";
/// The label value that stands for every tenant or tool past the series cap.
pub const OTHER: &str = "other";

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder's upkeep runs (see the module doc).
const UPKEEP_EVERY: Duration = Duration::from_secs(2);

/// Upkeeps run so far in this process.
static UPKEEPS: AtomicU64 = AtomicU64::new(0);

/// Installs the Prometheus recorder as the global recorder, once per process, and returns
/// the handle that renders it. A later call returns the same handle. The recorder's upkeep
/// runs on a thread of its own, so that it outlives any one runtime (tests run several).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was installed already; /metrics stays empty");
            }
            let upkeep = handle.clone();
            let started = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                    UPKEEPS.fetch_add(1, Ordering::Relaxed);
                });
            if let Err(error) = started {
                tracing::error!(%error, "no metrics upkeep thread: histograms grow until scraped");
            }
            handle
        })
        .clone()
}

/// Label values kept per kind (tenants, a tenant's tools): the first `cap` distinct values
/// get their own series, later ones share [`OTHER`].
struct Bounded {
    seen: Mutex<HashSet<String>>,
    /// `None`: [`SERIES_CAP`], the configured cap.
    cap: Option<usize>,
}

impl Bounded {
    fn new() -> Self {
        Self {
            seen: Mutex::new(HashSet::new()),
            cap: None,
        }
    }

    /// Whether `value` has (or now gets) a series of its own.
    fn admits(&self, value: &str) -> bool {
        let cap = self
            .cap
            .unwrap_or_else(|| SERIES_CAP.load(Ordering::Relaxed));
        let Ok(mut seen) = self.seen.lock() else {
            return false;
        };
        if seen.contains(value) {
            return true;
        }
        if seen.len() < cap {
            seen.insert(value.to_owned());
            return true;
        }
        false
    }

    fn label(&self, value: &str) -> String {
        if self.admits(value) {
            value.to_owned()
        } else {
            OTHER.to_owned()
        }
    }
}

static SERIES_CAP: AtomicUsize = AtomicUsize::new(1000);
static TENANTS: LazyLock<Bounded> = LazyLock::new(Bounded::new);
/// Tenant and tool together: a tool name is a label only for the tenants it was admitted
/// for, so the series are bounded by the cap, not by the cap of tenants times that of tools.
static TENANT_TOOLS: LazyLock<Bounded> = LazyLock::new(Bounded::new);

/// The `tenant` and `tool` labels of a call: each within its cap.
fn tool_call_labels(
    tenants: &Bounded,
    tenant_tools: &Bounded,
    tenant_id: &str,
    tool: &str,
) -> (String, String) {
    let tool_label = if tenant_tools.admits(&format!("{tenant_id}\n{tool}")) {
        tool.to_owned()
    } else {
        OTHER.to_owned()
    };
    (tenants.label(tenant_id), tool_label)
}

/// Sets the cap on tenant and tool label values (`METRICS_MAX_TENANT_SERIES`).
pub fn set_series_cap(cap: usize) {
    SERIES_CAP.store(cap, Ordering::Relaxed);
}

/// The `route` label of a route template: `/api/tenant/{tenantId}/tool` becomes
/// `/api/tenant/:tenantId/tool`, since braces inside label values trip some scrapers'
/// parsers (prometheus-parse skips such lines).
pub fn route_label(template: &str) -> String {
    template.replace('{', ":").replace('}', "")
}

/// One HTTP request answered; `route` is the route template, never the raw path.
pub fn http_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    // Any method name can arrive, from anyone: only the standard ones get series of their
    // own, or the recorder would keep one per name for ever.
    let method = if is_standard_method(method) {
        method
    } else {
        OTHER
    };
    let (count, duration) = HTTP_SERIES.get(route, method, status, || {
        let labels = [
            ("route", route_label(route)),
            ("method", method.to_owned()),
            ("status", status.to_string()),
        ];
        let handles = (
            metrics::counter!(HTTP_REQUESTS, &labels),
            metrics::histogram!(HTTP_DURATION, &labels),
        );
        (handles, true)
    });
    count.increment(1);
    duration.record(elapsed.as_secs_f64());
}

fn is_standard_method(method: &str) -> bool {
    matches!(
        method,
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS"
    )
}

/// One tool call finished with `outcome` (an audit outcome: `ok`, `tool_error`, ...).
pub fn tool_call(tenant_id: &str, tool: &str, outcome: &'static str) {
    let count = TOOL_SERIES.get(tenant_id, tool, outcome, || {
        let (tenant_label, tool_label) = tool_call_labels(&TENANTS, &TENANT_TOOLS, tenant_id, tool);
        // Past the series cap a tenant or tool shares `other`: not kept, so the cache
        // stays as bounded as the series.
        let own = tenant_label == tenant_id && tool_label == tool;
        let labels = [
            ("tenant", tenant_label),
            ("tool", tool_label),
            ("outcome", outcome.to_owned()),
        ];
        (metrics::counter!(TOOL_CALLS, &labels), own)
    });
    count.increment(1);
    if outcome == "rate_limited" {
        rate_limited("tenant");
    }
}

/// The upstream part of one tool call.
pub fn upstream_latency(outcome: &'static str, elapsed: Duration) {
    let duration = UPSTREAM_SERIES.get("", "", outcome, || {
        let handle = metrics::histogram!(UPSTREAM_DURATION, "outcome" => outcome);
        (handle, true)
    });
    duration.record(elapsed.as_secs_f64());
}

/// Handles of the series recorded on every request, looked up in the recorder once:
/// otherwise each call builds the series' key (label strings, a hash) again. Keyed by two
/// strings and a small copyable part, so that a lookup allocates nothing. `make` says
/// whether its handle may be kept; nothing is kept before the recorder is installed, so
/// no handle of the no-op recorder stays.
struct SeriesCache<P, V> {
    map: RwLock<SeriesMap<P, V>>,
}

type SeriesMap<P, V> = HashMap<String, HashMap<String, HashMap<P, V>>>;

impl<P: Hash + Eq + Copy, V: Clone> SeriesCache<P, V> {
    fn new() -> Self {
        Self {
            map: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, a: &str, b: &str, part: P, make: impl FnOnce() -> (V, bool)) -> V {
        let found = self
            .map
            .read()
            .ok()
            .and_then(|map| map.get(a)?.get(b)?.get(&part).cloned());
        if let Some(handle) = found {
            return handle;
        }
        let (handle, keep) = make();
        if keep && HANDLE.get().is_some() {
            if let Ok(mut map) = self.map.write() {
                let by_b = map.entry(a.to_owned()).or_default();
                by_b.entry(b.to_owned())
                    .or_default()
                    .insert(part, handle.clone());
            }
        }
        handle
    }
}

static HTTP_SERIES: LazyLock<SeriesCache<u16, (Counter, Histogram)>> =
    LazyLock::new(SeriesCache::new);
static TOOL_SERIES: LazyLock<SeriesCache<&'static str, Counter>> = LazyLock::new(SeriesCache::new);
static UPSTREAM_SERIES: LazyLock<SeriesCache<&'static str, Histogram>> =
    LazyLock::new(SeriesCache::new);

/// A request refused by the `scope` limit (`tenant` or `auth`).
pub fn rate_limited(scope: &'static str) {
    metrics::counter!(RATE_LIMITED, "scope" => scope).increment(1);
}

/// A downstream MCP session opened (`+1`) or closed (`-1`); for the MCP module.
pub fn mcp_sessions(delta: i64) {
    metrics::gauge!(MCP_SESSIONS).increment(delta as f64);
}

pub fn actor_started() {
    metrics::counter!(ACTOR_STARTS).increment(1);
}

pub fn actor_stopped() {
    metrics::counter!(ACTOR_STOPS).increment(1);
}

pub fn actor_restarted() {
    metrics::counter!(ACTOR_RESTARTS).increment(1);
}

/// `n` audit events entered (positive) or left (negative) a tenant's buffer.
pub fn audit_pending(delta: i64) {
    metrics::gauge!(AUDIT_PENDING).increment(delta as f64);
}

pub fn audit_dropped(n: u64) {
    metrics::counter!(AUDIT_DROPPED).increment(n);
}

pub fn progress_dropped(n: u64) {
    metrics::counter!(PROGRESS_DROPPED).increment(n);
}

pub fn fleet_replicas(n: u32) {
    metrics::gauge!(FLEET_REPLICAS).set(f64::from(n));
}

pub fn change_listener_reconnected() {
    metrics::counter!(CHANGE_LISTENER_RECONNECTS).increment(1);
}

/// Gauges read at scrape time rather than kept up to date on every change.
pub fn sample(
    active_tenants: usize,
    by_state: &[(crate::tenants::status::ConnectionState, usize)],
    pool: Option<(usize, usize)>,
) {
    metrics::gauge!(ACTIVE_TENANTS).set(active_tenants as f64);
    for (state, count) in by_state {
        metrics::gauge!(TENANT_UPSTREAMS, "state" => state.as_str()).set(*count as f64);
    }
    if let Some((size, available)) = pool {
        let in_use = size.saturating_sub(available);
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set(in_use as f64);
        metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(available as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_labels_have_no_braces() {
        assert_eq!(
            route_label("/api/tenant/{tenantId}/tool"),
            "/api/tenant/:tenantId/tool"
        );
    }

    fn capped(cap: usize) -> Bounded {
        Bounded {
            cap: Some(cap),
            ..Bounded::new()
        }
    }

    #[test]
    fn labels_past_the_cap_become_other() {
        let kind = capped(2);
        assert_eq!(kind.label("a"), "a");
        assert_eq!(kind.label("b"), "b");
        assert_eq!(kind.label("c"), OTHER);
        assert_eq!(kind.label("a"), "a");
    }

    #[test]
    fn tool_call_series_are_bounded_by_the_cap_not_its_square() {
        let (tenants, tenant_tools) = (capped(3), capped(3));
        let mut series = HashSet::new();
        for tenant in ["t1", "t2", "t3"] {
            for tool in ["a", "b", "c"] {
                series.insert(tool_call_labels(&tenants, &tenant_tools, tenant, tool));
            }
        }
        let own_tool = series.iter().filter(|(_, tool)| tool != OTHER).count();
        assert_eq!(own_tool, 3, "{series:?}");
        // At most one `other` tool series per tenant label besides.
        assert!(series.len() <= 3 + 3, "{series:?}");
        // A tool admitted for one tenant is no label for another.
        let (_, tool) = tool_call_labels(&tenants, &tenant_tools, "t3", "a");
        assert_eq!(tool, OTHER);
    }

    #[test]
    fn the_recorders_upkeep_runs_without_a_scrape() {
        install();
        let before = UPKEEPS.load(Ordering::Relaxed);
        let deadline = std::time::Instant::now() + UPKEEP_EVERY * 3;
        while UPKEEPS.load(Ordering::Relaxed) == before {
            assert!(std::time::Instant::now() < deadline, "no upkeep ran");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn cached_series_keep_counting_and_odd_methods_share_one_series() {
        let handle = install();
        for _ in 0..3 {
            tool_call("series-cache-tenant", "echo", "ok");
            http_request("/series-cache", "GET", 200, Duration::from_millis(1));
            http_request("/series-cache", "BREW", 200, Duration::from_millis(1));
        }
        let text = handle.render();
        let count = |needle: &str| {
            text.lines()
                .find(|l| l.contains(needle) && !l.starts_with('#'))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        assert_eq!(count("tenant=\"series-cache-tenant\""), Some(3.0), "{text}");
        let other = format!("{HTTP_REQUESTS}{{route=\"/series-cache\",method=\"other\"");
        assert_eq!(count(&other), Some(3.0), "{text}");
        assert!(
            !text.contains("BREW"),
            "any method name would grow the series: {text}"
        );
        let cache = HTTP_SERIES.map.read().unwrap();
        let methods = &cache["/series-cache"];
        assert!(methods.contains_key("GET"));
        assert!(
            !methods.contains_key("BREW"),
            "any method name would grow the cache"
        );
    }
}
