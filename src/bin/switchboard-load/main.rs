//! `switchboard-load`: measures what the gateway adds on top of its upstream. It starts a
//! small rmcp echo server on loopback in this process and the real `switchboard` binary
//! as a child process, drives tool calls at a fixed concurrency for a fixed time straight
//! to the upstream (rmcp client: the baseline), through REST and through `/mcp` (rmcp
//! client), and prints requests/s, p50/p99/p99.9 and the ratios; then memory, cold start,
//! a slow-call burst and start-up. `--short` is the CI mode.

mod clients;
mod drive;
mod listening;
mod measure;
mod process;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

use clients::Protocol;
use drive::{drive, ms, Stats};

#[derive(Parser, Debug)]
#[command(about = "Load and latency measurements of switchboard against its upstream")]
struct Args {
    /// A few seconds in all, with small tenant counts (for CI: checks that it runs).
    #[arg(long)]
    short: bool,
    /// Seconds each throughput run lasts.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Rounds of throughput runs; each round runs every path once, in turn, so a slow
    /// spell of a shared machine falls on all paths alike. Ratios are per-round medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent callers of the throughput runs (a second set of runs uses 1).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Registered idle tenants for the memory reading.
    #[arg(long, default_value_t = 10_000)]
    idle_tenants: usize,
    /// Tenants with a live upstream session for the memory reading.
    #[arg(long, default_value_t = 1_000)]
    active_tenants: usize,
    /// The gateway binary to measure (default: `switchboard` next to this tool), to
    /// compare two builds on one machine.
    #[arg(long)]
    gateway: Option<std::path::PathBuf>,
    /// The gateway's worker threads (its `WORKER_THREADS`); default: its own default, one
    /// per CPU.
    #[arg(long)]
    gateway_workers: Option<std::num::NonZeroUsize>,
    /// Only the throughput runs, and only these paths (for profiling one path).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Path>,
}

/// The ways a tool call is made in the throughput runs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// Straight to the upstream with rmcp's default client (`serve()`: an `initialize`
    /// handshake, a 2025-11-25 session, answers as Server-Sent Events), which is also how the
    /// gateway talks to its upstream. The baseline of every target.
    Direct,
    /// Straight to the upstream with 2026-07-28 session-less requests (`server/discover`,
    /// then plain JSON answers): a second baseline, rmcp's other lifecycle (measured no
    /// cheaper than `direct`: README, Performance).
    DirectStateless,
    Rest,
    /// rmcp's default client on the gateway's `/mcp/{tenantId}` (a session).
    Mcp,
    /// A 2026-07-28 session-less client on the gateway's `/mcp/{tenantId}`.
    McpStateless,
    /// A `GET` of a route the gateway does not have: one HTTP round trip to its process
    /// through its whole middleware stack, answered 404 by the router with no credential,
    /// store or upstream. Not a tool call: the floor under what a gateway in a process of
    /// its own adds to a call (one more hop each way).
    Hop,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.short {
        args.duration = args.duration.min(0.5);
        args.rounds = 1;
        args.idle_tenants = args.idle_tenants.min(100);
        args.active_tenants = args.active_tenants.min(20);
    }
    let duration = Duration::from_secs_f64(args.duration);
    let warmup = duration.mul_f64(0.1).min(Duration::from_secs(1));
    let upstream = upstream::EchoUpstream::start().await?;
    let launch = process::Launch {
        bin: match &args.gateway {
            Some(path) => path.clone(),
            None => process::gateway_binary()?,
        },
        workers: args.gateway_workers,
    };
    let gw = clients::Gateway::start(&launch, &upstream.url).await?;
    let tenant = clients::create_tenant(&gw.http, &gw.base, &gw.admin_key, &upstream.url).await?;
    let paths = if args.only.is_empty() {
        vec![
            Path::Direct,
            Path::DirectStateless,
            Path::Rest,
            Path::Mcp,
            Path::McpStateless,
            Path::Hop,
        ]
    } else {
        args.only.clone()
    };
    for callers in [args.concurrency, 1] {
        let run = Run {
            gw: &gw,
            tenant: &tenant,
            upstream: &upstream.url,
            warmup,
            duration,
        };
        throughput(&run, &paths, callers, args.rounds.max(1)).await?;
    }
    if !args.only.is_empty() {
        return Ok(());
    }
    let samples = if args.short { 1 } else { 5 };
    let cold = measure::cold_start(&gw, &upstream.url, samples).await?;
    println!(
        "cold first_call_ms={} warm_call_ms={} upstream_initialize_and_call_ms={} extra_over_upstream_ms={:.3}",
        ms(cold.cold), ms(cold.warm), ms(cold.upstream_own),
        // Signed: a cold call below the upstream's own would be a measurement to doubt.
        ms_f(cold.cold) - ms_f(cold.upstream_own)
    );
    let burst = measure::burst(&gw, &tenant, &upstream.url, 100, 100, samples).await?;
    println!(
        "burst calls=100 tool_ms=100 all_done_ms={} first_ms={} direct_ms={}",
        ms(burst.median),
        ms(burst.first),
        ms(burst.direct)
    );
    drop(gw);
    let startup = measure::startup(&launch, &upstream.url, samples).await?;
    println!("startup ready_ms={}", ms(startup));
    let mem = measure::memory(
        &launch,
        &upstream.url,
        args.idle_tenants,
        args.active_tenants,
    )
    .await?;
    let mb = |b: u64| format!("{:.1}", b as f64 / (1024.0 * 1024.0));
    println!("memory empty_rss_mb={}", mb(mem.empty_rss));
    println!(
        "memory idle_tenants={} rss_mb={}",
        mem.idle_tenants,
        mb(mem.idle_rss)
    );
    println!(
        "memory active_tenants={} registered_tenants={} rss_mb={}",
        mem.active_tenants,
        mem.idle_tenants,
        mb(mem.active_rss)
    );
    Ok(())
}

/// What every throughput run shares.
struct Run<'a> {
    gw: &'a clients::Gateway,
    tenant: &'a clients::Tenant,
    upstream: &'a str,
    warmup: Duration,
    duration: Duration,
}

/// `rounds` rounds of runs at `callers` over `paths`; then the ratios against direct,
/// each the median of the rounds' own ratios.
async fn throughput(
    run: &Run<'_>,
    paths: &[Path],
    callers: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    let mut results: Vec<Vec<Stats>> = vec![Vec::new(); paths.len()];
    for round in 1..=rounds {
        for (i, &path) in paths.iter().enumerate() {
            let stats = one_run(run, path, callers, round).await?;
            results[i].push(stats);
        }
    }
    for baseline in [Path::Direct, Path::DirectStateless] {
        if let Some(base) = paths.iter().position(|p| *p == baseline) {
            report_ratios(&results, paths, base, callers, rounds);
        }
    }
    if let Some(hop) = paths.iter().position(|p| *p == Path::Hop) {
        let median_ms = |f: &dyn Fn(&Stats) -> Duration| {
            median_f(&results[hop].iter().map(|s| ms_f(f(s))).collect::<Vec<_>>())
        };
        println!(
            "floor callers={callers} path=hop rounds={rounds} p50_ms={:.3} p99_ms={:.3}",
            median_ms(&|s| s.p50),
            median_ms(&|s| s.p99),
        );
    }
    Ok(())
}

/// Each gateway path against the baseline at `base`: throughput ratio and added p50/p99,
/// each the median of the rounds' own values.
fn report_ratios(
    results: &[Vec<Stats>],
    paths: &[Path],
    base: usize,
    callers: usize,
    rounds: usize,
) {
    let gateway_paths = paths
        .iter()
        .enumerate()
        .filter(|(_, p)| matches!(p, Path::Rest | Path::Mcp | Path::McpStateless));
    for (i, &path) in gateway_paths {
        let per_round = |f: &dyn Fn(&Stats, &Stats) -> f64| -> Vec<f64> {
            results[i]
                .iter()
                .zip(&results[base])
                .map(|(s, d)| f(s, d))
                .collect()
        };
        let ratios = per_round(&|s, d| s.rps / d.rps.max(1e-9));
        let p50 = per_round(&|s, d| ms_f(s.p50) - ms_f(d.p50));
        let p99 = per_round(&|s, d| ms_f(s.p99) - ms_f(d.p99));
        println!(
            "ratio callers={callers} path={} rounds={rounds} throughput_vs_{}={:.3} (range {:.3}..{:.3}) added_p50_ms={:.3} added_p99_ms={:.3}",
            name(path),
            name(paths[base]).replace('-', "_"),
            median_f(&ratios),
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
            median_f(&p50),
            median_f(&p99),
        );
    }
}

/// One run of `path`, reported with where the CPU went per call: the gateway process
/// (nothing on direct calls) and this process (the callers and the echo upstream).
async fn one_run(run: &Run<'_>, path: Path, callers: usize, round: usize) -> anyhow::Result<Stats> {
    let cpu_before = (run.gw.child.cpu_time()?, process::cpu_time("self")?);
    let stats = match path {
        Path::Direct => mcp_run(run, run.upstream, None, Protocol::Initialize, callers).await?,
        Path::DirectStateless => {
            mcp_run(run, run.upstream, None, Protocol::Stateless, callers).await?
        }
        Path::Rest => {
            let (http, base) = (run.gw.http.clone(), run.gw.base.clone());
            let t = Arc::new(run.tenant.clone());
            drive(callers, run.warmup, run.duration, move || {
                let (http, base, t) = (http.clone(), base.clone(), t.clone());
                async move {
                    clients::rest_call(&http, &base, &t, "echo", json!({"text": "hello"})).await
                }
            })
            .await
        }
        Path::Hop => {
            let (http, url) = (
                run.gw.http.clone(),
                format!("{}/no-such-route", run.gw.base),
            );
            drive(callers, run.warmup, run.duration, move || {
                let get = http.get(&url).send();
                async move {
                    match get.await {
                        Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => {
                            resp.bytes().await.is_ok()
                        }
                        _ => false,
                    }
                }
            })
            .await
        }
        Path::Mcp | Path::McpStateless => {
            let url = format!("{}/mcp/{}", run.gw.base, run.tenant.id);
            let protocol = match path {
                Path::Mcp => Protocol::Initialize,
                _ => Protocol::Stateless,
            };
            mcp_run(run, &url, Some(&run.tenant.api_key), protocol, callers).await?
        }
    };
    let per_call = |spent: Duration| spent.as_secs_f64() * 1e6 / stats.calls_made.max(1) as f64;
    let gateway = per_call(run.gw.child.cpu_time()?.saturating_sub(cpu_before.0));
    let here = per_call(process::cpu_time("self")?.saturating_sub(cpu_before.1));
    report(callers, path, round, &stats);
    println!(
        "cpu callers={callers} path={} round={round} gateway_us_per_call={gateway:.1} callers_and_upstream_us_per_call={here:.1}",
        name(path)
    );
    Ok(stats)
}

fn ms_f(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The median; of an even count, the mean of the two middle values.
fn median_f(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A run of `echo` calls from one rmcp client on `url`.
async fn mcp_run(
    run: &Run<'_>,
    url: &str,
    bearer: Option<&str>,
    protocol: Protocol,
    callers: usize,
) -> anyhow::Result<Stats> {
    let client =
        clients::mcp_connect(clients::http_client(), url, bearer, protocol, callers).await?;
    let peer = client.peer().clone();
    let stats = drive(callers, run.warmup, run.duration, move || {
        let peer = peer.clone();
        async move { clients::mcp_echo(&peer).await }
    })
    .await;
    let _ = client.cancel().await;
    Ok(stats)
}

fn name(path: Path) -> &'static str {
    match path {
        Path::Direct => "direct",
        Path::DirectStateless => "direct-stateless",
        Path::Rest => "rest",
        Path::Mcp => "mcp",
        Path::McpStateless => "mcp-stateless",
        Path::Hop => "hop",
    }
}

fn report(callers: usize, path: Path, round: usize, s: &Stats) {
    println!(
        "throughput callers={callers} path={} round={round} rps={:.0} p50_ms={} p99_ms={} p999_ms={} requests={} errors={}",
        name(path), s.rps, ms(s.p50), ms(s.p99), ms(s.p999), s.requests, s.errors
    );
}
