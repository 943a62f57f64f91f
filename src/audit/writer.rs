//! Writes the audit events that do not go through a tenant's audit buffer: admin actions,
//! tokens issued, refused credentials, and the events of calls whose actor is gone (the
//! events of its closed buffer, and a crashed actor's batch in flight). Each is written at
//! once; one the store refuses (the database is down) waits in a bounded queue that one
//! task retries, so an outage loses none of them. Only a full queue, or a store still
//! refusing when the process stops, drops events, and those are counted
//! (`switchboard_audit_dropped_total`) and logged.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::shutdown::Lifecycle;
use crate::store::{AuditRecord, SharedStore, StoreError};

/// Events waiting for the store at most; past it, new ones are dropped and counted.
const QUEUE: usize = 10_000;
/// Events one write carries at most.
const BATCH: usize = 500;
/// The pause after a refused write, doubled after each one up to [`RETRY_MOST`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MOST: Duration = Duration::from_secs(5);

/// How long one write may take before it counts as refused (a store that hangs).
pub(crate) const ATTEMPT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AuditWriter {
    store: SharedStore,
    queue: mpsc::Sender<AuditRecord>,
    /// The writes begun by `write`, each in a task of its own: one whose caller went away
    /// (a client that hung up, the request timeout) still ends, written or queued.
    writes: TaskTracker,
    stop: CancellationToken,
}

impl AuditWriter {
    /// Starts the task that writes queued events. It runs until [`Self::close`], then
    /// writes what is left, retrying for at most `grace`.
    pub fn start(store: SharedStore, lifecycle: &Lifecycle, grace: Duration) -> Self {
        let (queue, queued) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        lifecycle
            .tasks
            .spawn(write_queued(store.clone(), queued, stop.clone(), grace));
        Self {
            store,
            queue,
            writes: TaskTracker::new(),
            stop,
        }
    }

    /// Writes `event` now; when the store refuses it, it is queued and written later.
    pub async fn write(&self, event: AuditRecord) {
        let me = self.clone();
        let attempt = self.writes.spawn(async move {
            let written = append_within(&me.store, std::slice::from_ref(&event), ATTEMPT).await;
            if let Err(err) = written {
                tracing::warn!(error = %err, action = %event.action, "audit event not written; will retry");
                me.queue(event);
            }
        });
        let _ = attempt.await;
    }

    /// Queues the events `later` yields, when it does: for events still on their way (a
    /// crashed tenant actor's batch write). [`Self::close`] waits for it like a write.
    pub fn queue_later(&self, later: impl Future<Output = Vec<AuditRecord>> + Send + 'static) {
        let me = self.clone();
        self.writes.spawn(async move {
            for event in later.await {
                me.queue(event);
            }
        });
    }

    /// Hands `event` to the writing task without waiting for the store.
    pub fn queue(&self, event: AuditRecord) {
        match self.queue.try_send(event) {
            Ok(()) => crate::metrics::audit_pending(1),
            Err(refused) => {
                let action = match &refused {
                    mpsc::error::TrySendError::Full(e) | mpsc::error::TrySendError::Closed(e) => {
                        e.action.clone()
                    }
                };
                tracing::error!(%action, "audit queue full or closed: event dropped");
                crate::metrics::audit_dropped(1);
            }
        }
    }

    /// No more events come (in-flight requests and admin changes are done): the writes
    /// begun end (within `within`), then the writing task writes what is queued and ends.
    pub async fn close(&self, within: Duration) {
        self.writes.close();
        let _ = tokio::time::timeout(within, self.writes.wait()).await;
        self.stop.cancel();
    }
}

/// Writes queued events in batches, pausing longer after each refused write, until `stop`;
/// then writes what is left for at most `grace`, and counts what it could not.
async fn write_queued(
    store: SharedStore,
    mut queued: mpsc::Receiver<AuditRecord>,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut waiting: Vec<AuditRecord> = Vec::new();
    let mut pause = RETRY_FIRST;
    loop {
        if waiting.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                got = queued.recv() => match got {
                    Some(event) => waiting.push(event),
                    None => break,
                },
            }
        }
        while waiting.len() < BATCH {
            match queued.try_recv() {
                Ok(event) => waiting.push(event),
                Err(_) => break,
            }
        }
        match append_within(&store, &waiting, ATTEMPT).await {
            Ok(()) => {
                crate::metrics::audit_pending(-(waiting.len() as i64));
                waiting.clear();
                pause = RETRY_FIRST;
            }
            Err(err) => {
                tracing::warn!(error = %err, events = waiting.len(), "queued audit events not written; will retry");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RETRY_MOST);
            }
        }
    }
    queued.close();
    while let Ok(event) = queued.try_recv() {
        waiting.push(event);
    }
    let deadline = Instant::now() + grace;
    while !waiting.is_empty() {
        let n = waiting.len().min(BATCH);
        let left = deadline.saturating_duration_since(Instant::now());
        match append_within(&store, &waiting[..n], left.max(RETRY_FIRST)).await {
            Ok(()) => {
                crate::metrics::audit_pending(-(n as i64));
                waiting.drain(..n);
            }
            Err(err) if Instant::now() < deadline => {
                tracing::warn!(error = %err, "queued audit events not written on stop; retrying");
                tokio::time::sleep(RETRY_FIRST).await;
            }
            Err(err) => {
                tracing::error!(error = %err, events = waiting.len(), "audit events lost on stop");
                crate::metrics::audit_dropped(waiting.len() as u64);
                crate::metrics::audit_pending(-(waiting.len() as i64));
                waiting.clear();
            }
        }
    }
}

/// `append_audit`, refused when the store has not answered within `limit` (a lock held,
/// a connection black-holed): no write may hold up the writer, or shutdown, for ever.
pub(crate) async fn append_within(
    store: &SharedStore,
    events: &[AuditRecord],
    limit: Duration,
) -> Result<(), StoreError> {
    tokio::time::timeout(limit, store.append_audit(events))
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the audit write took too long".into(),
            ))
        })
}
