//! The replica count of a fleet on PostgreSQL, for fleet-wide rate limits. Each replica
//! upserts its row in `replicas` every [`BEAT`] and counts the rows seen within
//! [`WINDOW`]; the count goes into an atomic that the tenant actors read to take 1/N of
//! a tenant's limit. A replica announces joining and leaving on `switchboard_replicas`,
//! so the others recount at once instead of at their next beat; one that dies without
//! leaving drops out of the count after [`WINDOW`].

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Client;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::change_feed::REPLICAS_CHANNEL;
use super::postgres::PostgresStore;
use super::StoreResult;

/// How often a replica renews its row.
pub const BEAT: Duration = Duration::from_secs(5);
/// A replica not seen for this long no longer counts (three missed beats).
pub const WINDOW: Duration = Duration::from_secs(15);
/// Rows older than this are deleted, so the table does not grow with every restart.
const FORGET_SECS: f64 = 3600.0;

/// Beats until `shutdown`, then removes this replica's row and tells the others.
pub(super) async fn heartbeat(
    store: PostgresStore,
    replica_id: String,
    count: Arc<AtomicU32>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    tracing::info!(%replica_id, "joining the fleet");
    let mut announced = false;
    loop {
        // Bounded, as the leave below is: a database that stops answering must not keep
        // this task, and with it the gateway's shutdown, waiting.
        match super::answered_within(BEAT, beat(&store, &replica_id, !announced)).await {
            Ok(n) => {
                announced = true;
                let n = u32::try_from(n).unwrap_or(u32::MAX).max(1);
                if count.swap(n, Ordering::Relaxed) != n {
                    tracing::info!(replicas = n, "fleet size changed");
                }
                crate::metrics::fleet_replicas(n);
            }
            // Keep the last count: a database blip should not double every limit.
            Err(e) => tracing::warn!(error = %e, "replica heartbeat failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = changed.notified() => {}
            _ = tokio::time::sleep(BEAT) => {}
        }
    }
    if let Err(e) = super::answered_within(BEAT, leave(&store, &replica_id)).await {
        tracing::warn!(error = %e, "could not leave the fleet; the row expires on its own");
    }
}

/// Renews this replica's row (announcing it when `announce`) and returns the live count.
async fn beat(store: &PostgresStore, replica_id: &str, announce: bool) -> StoreResult<i64> {
    // A checkout: the heartbeat gives up on a beat that takes longer than BEAT.
    let client = store.checkout().await?;
    let count = beat_on(&client, replica_id, announce).await;
    client.release();
    count
}

async fn beat_on(client: &Client, replica_id: &str, announce: bool) -> StoreResult<i64> {
    let db = super::postgres::db_err;
    client
        .execute(
            "INSERT INTO replicas (replica_id, seen_at) VALUES ($1, now()) \
             ON CONFLICT (replica_id) DO UPDATE SET seen_at = now()",
            &[&replica_id],
        )
        .await
        .map_err(db)?;
    if announce {
        client
            .execute(
                "SELECT pg_notify($1, $2)",
                &[&REPLICAS_CHANNEL, &replica_id],
            )
            .await
            .map_err(db)?;
    }
    client
        .execute(
            "DELETE FROM replicas WHERE seen_at < now() - make_interval(secs => $1)",
            &[&FORGET_SECS],
        )
        .await
        .map_err(db)?;
    let row = client
        .query_one(
            "SELECT COUNT(*) FROM replicas WHERE seen_at > now() - make_interval(secs => $1)",
            &[&WINDOW.as_secs_f64()],
        )
        .await
        .map_err(db)?;
    row.try_get(0).map_err(db)
}

async fn leave(store: &PostgresStore, replica_id: &str) -> StoreResult<()> {
    let client = store.checkout().await?;
    let left = leave_on(&client, replica_id).await;
    client.release();
    left
}

async fn leave_on(client: &Client, replica_id: &str) -> StoreResult<()> {
    let db = super::postgres::db_err;
    client
        .execute("DELETE FROM replicas WHERE replica_id = $1", &[&replica_id])
        .await
        .map_err(db)?;
    client
        .execute(
            "SELECT pg_notify($1, $2)",
            &[&REPLICAS_CHANNEL, &replica_id],
        )
        .await
        .map_err(db)?;
    tracing::info!(%replica_id, "left the fleet");
    Ok(())
}
