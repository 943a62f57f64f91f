//! The load tool's measurements besides throughput: memory with many tenants (in a child
//! gateway process), a cold tenant's first call against a warm one and against the
//! upstream's own initialize + call, a burst of slow calls for one tenant, and start-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use serde_json::json;

use crate::clients::{self, Gateway, Tenant};
use crate::process::{ChildGateway, Launch, ADMIN_KEY};

/// Requests in flight while creating or activating many tenants.
const SETUP_CONCURRENCY: usize = 16;

pub struct Memory {
    pub empty_rss: u64,
    pub idle_tenants: usize,
    pub idle_rss: u64,
    pub active_tenants: usize,
    pub active_rss: u64,
}

/// RSS of a child gateway: empty, with `idle` registered tenants, then with `active` of
/// them called once (each holds a live upstream session). Idle tenants stay registered.
pub async fn memory(
    launch: &Launch,
    upstream: &str,
    idle: usize,
    active: usize,
) -> anyhow::Result<Memory> {
    let gw = ChildGateway::spawn(launch, upstream).await?;
    let http = clients::http_client();
    settle().await;
    let empty_rss = gw.rss_bytes()?;
    let base = gw.base.clone();
    let tenants: Vec<Tenant> = stream::iter(0..idle)
        .map(|_| clients::create_tenant(&http, &base, ADMIN_KEY, upstream))
        .buffer_unordered(SETUP_CONCURRENCY)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    settle().await;
    let idle_rss = gw.rss_bytes()?;
    let ok = stream::iter(tenants.iter().take(active))
        .map(|t| clients::rest_call(&http, &base, t, "echo", json!({"text": "hi"})))
        .buffer_unordered(SETUP_CONCURRENCY)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    anyhow::ensure!(
        ok == active.min(tenants.len()),
        "only {ok} tenants answered"
    );
    settle().await;
    let active_rss = gw.rss_bytes()?;
    gw.stop().await;
    Ok(Memory {
        empty_rss,
        idle_tenants: idle,
        idle_rss,
        active_tenants: active,
        active_rss,
    })
}

/// Lets allocator and tasks settle before a memory reading.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

pub struct Cold {
    pub cold: Duration,
    pub warm: Duration,
    pub upstream_own: Duration,
}

/// Medians over `samples`: a new tenant's first REST call, a warm tenant's call, and a
/// fresh rmcp client's initialize + call straight to the upstream (2025-11-25, the revision
/// with an `initialize`, as the gateway connects).
pub async fn cold_start(gw: &Gateway, upstream: &str, samples: usize) -> anyhow::Result<Cold> {
    let (mut cold, mut warm, mut own) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        let tenant = clients::create_tenant(&gw.http, &gw.base, &gw.admin_key, upstream).await?;
        let t = Instant::now();
        anyhow::ensure!(
            clients::rest_call(&gw.http, &gw.base, &tenant, "echo", json!({"text": "a"})).await
        );
        cold.push(t.elapsed());
        let t = Instant::now();
        anyhow::ensure!(
            clients::rest_call(&gw.http, &gw.base, &tenant, "echo", json!({"text": "b"})).await
        );
        warm.push(t.elapsed());
        // The HTTP client is built before the clock starts: building one loads the TLS
        // roots (~3 ms), which the gateway does once per process, not per connection. A
        // new client still has no open connection, as the gateway's new session has none.
        let http = clients::http_client();
        let t = Instant::now();
        let client =
            clients::mcp_connect(http, upstream, None, clients::Protocol::Initialize, 1).await?;
        anyhow::ensure!(clients::mcp_echo(client.peer()).await);
        own.push(t.elapsed());
        let _ = client.cancel().await;
    }
    Ok(Cold {
        cold: median(cold),
        warm: median(warm),
        upstream_own: median(own),
    })
}

pub struct Burst {
    /// The first burst, with no connection yet open for most of its calls (the load tool's
    /// to the gateway, the gateway's to the upstream).
    pub first: Duration,
    /// The median of all the bursts through the gateway.
    pub median: Duration,
    /// The median of the same bursts straight to the upstream, on one rmcp session.
    pub direct: Duration,
}

/// Wall time for `calls` concurrent calls of the `sleep` tool (`ms` each) for one tenant
/// through the gateway's REST API, `samples` times, and the same bursts straight to the
/// upstream at `upstream`.
pub async fn burst(
    gw: &Gateway,
    tenant: &Tenant,
    upstream: &str,
    calls: usize,
    ms: u64,
    samples: usize,
) -> anyhow::Result<Burst> {
    let tenant = Arc::new(tenant.clone());
    let through = bursts(samples, calls, || {
        let (http, base, tenant) = (gw.http.clone(), gw.base.clone(), tenant.clone());
        async move { clients::rest_call(&http, &base, &tenant, "sleep", json!({"ms": ms})).await }
    })
    .await?;
    let http = clients::http_client();
    let client =
        clients::mcp_connect(http, upstream, None, clients::Protocol::Initialize, calls).await?;
    let direct = bursts(samples, calls, || {
        let peer = client.peer().clone();
        async move { clients::mcp_call(&peer, "sleep", json!({"ms": ms})).await }
    })
    .await;
    let _ = client.cancel().await;
    let direct = direct?;
    Ok(Burst {
        first: through[0],
        median: median(through),
        direct: median(direct),
    })
}

/// The wall times of `samples` (at least one) bursts, one after the other, each of `calls`
/// concurrent calls made by `call`, until all have succeeded.
async fn bursts<F, Fut>(samples: usize, calls: usize, call: F) -> anyhow::Result<Vec<Duration>>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let mut times = Vec::new();
    for _ in 0..samples.max(1) {
        let t = Instant::now();
        let handles: Vec<_> = (0..calls).map(|_| tokio::spawn(call())).collect();
        for h in handles {
            anyhow::ensure!(h.await?, "a call of the burst failed");
        }
        times.push(t.elapsed());
    }
    Ok(times)
}

/// Median time from spawning the gateway binary (fresh SQLite file) to 200 on `/ready`.
pub async fn startup(launch: &Launch, upstream: &str, samples: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..samples {
        let gw = ChildGateway::spawn(launch, upstream).await?;
        times.push(gw.ready_after);
        gw.stop().await;
    }
    Ok(median(times))
}

/// The median; of an even count, the mean of the two middle values.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}
