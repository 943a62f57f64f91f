//! `switchboard-load`: measures what the gateway adds on top of its upstream. It starts a
//! small rmcp echo server on loopback and the gateway in this process, drives tool calls
//! at a fixed concurrency for a fixed time straight to the upstream (rmcp client: the
//! baseline), through REST and through `/mcp` (rmcp client), and prints requests/s,
//! p50/p99/p99.9 and the ratios; then memory, cold start, a slow-call burst and start-up
//! (those on the real `switchboard` binary as a child process). `--short` is the CI mode.

mod clients;
mod drive;
mod measure;
mod process;
mod upstream;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use serde_json::json;

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
    /// Concurrent callers of the throughput runs (a second set of runs uses 1).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Registered idle tenants for the memory reading.
    #[arg(long, default_value_t = 10_000)]
    idle_tenants: usize,
    /// Tenants with a live upstream session for the memory reading.
    #[arg(long, default_value_t = 1_000)]
    active_tenants: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.short {
        args.duration = args.duration.min(0.5);
        args.idle_tenants = args.idle_tenants.min(100);
        args.active_tenants = args.active_tenants.min(20);
    }
    let duration = Duration::from_secs_f64(args.duration);
    let warmup = duration.mul_f64(0.1).min(Duration::from_secs(1));
    let upstream = upstream::EchoUpstream::start().await?;
    let gw = clients::Gateway::start(&upstream.url).await?;
    let tenant = clients::create_tenant(&gw.http, &gw.base, &gw.admin_key, &upstream.url).await?;
    for callers in [args.concurrency, 1] {
        throughput(&gw, &tenant, &upstream.url, callers, warmup, duration).await?;
    }
    let samples = if args.short { 1 } else { 5 };
    let cold = measure::cold_start(&gw, &upstream.url, samples).await?;
    println!(
        "cold first_call_ms={} warm_call_ms={} upstream_initialize_and_call_ms={} extra_over_upstream_ms={}",
        ms(cold.cold), ms(cold.warm), ms(cold.upstream_own),
        ms(cold.cold.saturating_sub(cold.upstream_own))
    );
    let burst = measure::burst(&gw, &tenant, 100, 100).await?;
    println!("burst calls=100 tool_ms=100 all_done_ms={}", ms(burst));
    drop(gw);
    let bin = process::gateway_binary()?;
    let startup = measure::startup(&bin, &upstream.url, if args.short { 1 } else { 5 }).await?;
    println!("startup ready_ms={}", ms(startup));
    let mem = measure::memory(&bin, &upstream.url, args.idle_tenants, args.active_tenants).await?;
    let mb = |b: u64| format!("{:.1}", b as f64 / (1024.0 * 1024.0));
    println!("memory empty_rss_mb={}", mb(mem.empty_rss));
    println!(
        "memory idle_tenants={} rss_mb={}",
        mem.idle_tenants,
        mb(mem.idle_rss)
    );
    println!(
        "memory active_tenants={} idle_tenants={} rss_mb={}",
        mem.active_tenants,
        mem.idle_tenants,
        mb(mem.active_rss)
    );
    Ok(())
}

/// One set of runs at `callers`: direct, REST, MCP; then the ratios against direct.
async fn throughput(
    gw: &clients::Gateway,
    tenant: &clients::Tenant,
    upstream: &str,
    callers: usize,
    warmup: Duration,
    duration: Duration,
) -> anyhow::Result<()> {
    let direct_client = clients::mcp_connect(upstream, None).await?;
    let peer = direct_client.peer().clone();
    let direct = drive(callers, warmup, duration, move || {
        let peer = peer.clone();
        async move { clients::mcp_echo(&peer).await }
    })
    .await;
    let _ = direct_client.cancel().await;
    let (http, base, t) = (gw.http.clone(), gw.base.clone(), Arc::new(tenant.clone()));
    let rest = drive(callers, warmup, duration, move || {
        let (http, base, t) = (http.clone(), base.clone(), t.clone());
        async move { clients::rest_call(&http, &base, &t, "echo", json!({"text": "hello"})).await }
    })
    .await;
    let url = format!("{}/mcp/{}", gw.base, tenant.id);
    let mcp_client = clients::mcp_connect(&url, Some(&tenant.api_key)).await?;
    let peer = mcp_client.peer().clone();
    let mcp = drive(callers, warmup, duration, move || {
        let peer = peer.clone();
        async move { clients::mcp_echo(&peer).await }
    })
    .await;
    let _ = mcp_client.cancel().await;
    for (name, s) in [("direct", &direct), ("rest", &rest), ("mcp", &mcp)] {
        report(callers, name, s);
    }
    for (name, s) in [("rest", &rest), ("mcp", &mcp)] {
        println!(
            "ratio callers={callers} path={name} throughput_vs_direct={:.3} added_p50_ms={} added_p99_ms={}",
            s.rps / direct.rps.max(1e-9),
            signed_ms(s.p50, direct.p50),
            signed_ms(s.p99, direct.p99),
        );
    }
    Ok(())
}

fn report(callers: usize, name: &str, s: &Stats) {
    println!(
        "throughput callers={callers} path={name} rps={:.0} p50_ms={} p99_ms={} p999_ms={} requests={} errors={}",
        s.rps, ms(s.p50), ms(s.p99), ms(s.p999), s.requests, s.errors
    );
}

fn signed_ms(a: Duration, b: Duration) -> String {
    format!("{:.3}", (a.as_secs_f64() - b.as_secs_f64()) * 1000.0)
}
