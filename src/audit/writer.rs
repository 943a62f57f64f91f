//! Writes the audit events that do not go through a tenant's audit buffer: admin actions,
//! tokens issued, refused credentials, and the events of calls whose actor is gone (the
//! events of its closed buffer, and a crashed actor's batch in flight). An admin action or
//! an issued token is written at once; one the store refuses (the database is down) waits
//! in a bounded queue that one task writes in batches and retries, so an outage loses none
//! of them. Refused credentials go straight on that queue (`crate::audit::refusal`): one
//! write of their own each would hold a store connection per refusal. Only a full queue, or a store still
//! refusing when the process stops, drops events, and those are counted
//! (`switchboard_audit_dropped_total`) and logged. The queue's events take their bytes from
//! the budget the tenants' audit buffers take theirs from ([`AuditBudget`]): past it, a new
//! event is dropped as at a full queue. Refused credentials, which anyone can
//! cause, may take only a share of the queue, and so may the tenants' tool-call events (of
//! actors that stopped in an outage, every tenant's at once), so that neither can push out
//! the events of admin actions and issued tokens.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::{held_bytes, AuditBudget};
use crate::shutdown::Lifecycle;
use crate::store::{AuditRecord, SharedStore, StoreError};

/// Events waiting for the store at most; past it, new ones are dropped and counted.
const QUEUE: usize = 10_000;
/// Of those, refused credentials (`auth.refused`) at most: anyone can cause them, at the
/// per-address auth limit from every address they have.
const REFUSALS_QUEUED: usize = QUEUE / 10;
/// Of those, tenants' tool calls and tool lists at most (the events of an actor that
/// stopped, or of a call whose tenant had none): in an outage every stopping actor hands
/// its buffer here.
const CALLS_QUEUED: usize = QUEUE * 3 / 4;
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
    /// The events of each kind with a share of the queue in it.
    shares: Arc<Shares>,
    /// The bytes the queue's events hold, shared with every tenant's audit buffer.
    budget: Arc<AuditBudget>,
}

impl AuditWriter {
    /// Starts the task that writes queued events. It runs until [`Self::close`], then
    /// writes what is left, retrying for at most `grace`.
    pub fn start(
        store: SharedStore,
        lifecycle: &Lifecycle,
        grace: Duration,
        budget: Arc<AuditBudget>,
    ) -> Self {
        let (queue, queued) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        let shares = Arc::new(Shares::default());
        let queued = Queued {
            events: queued,
            shares: shares.clone(),
            budget: budget.clone(),
        };
        lifecycle
            .tasks
            .spawn(write_queued(store.clone(), queued, stop.clone(), grace));
        Self {
            store,
            queue,
            writes: TaskTracker::new(),
            stop,
            shares,
            budget,
        }
    }

    /// The budget of bytes the queue takes its events' from, as the tenants' audit buffers
    /// do.
    pub fn budget(&self) -> &Arc<AuditBudget> {
        &self.budget
    }

    /// Writes `event` now, in a write of its own that the caller waits for; when the store
    /// refuses it, it is queued and written later. For rare events only (admin actions,
    /// issued tokens): each holds a store connection while it is written.
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
    /// crashed tenant actor's batch write, which holds `charged` bytes of the budget until
    /// then). [`Self::close`] waits for it like a write.
    pub fn queue_later(
        &self,
        later: impl Future<Output = Vec<AuditRecord>> + Send + 'static,
        charged: usize,
    ) {
        let me = self.clone();
        self.writes.spawn(async move {
            let events = later.await;
            me.queue_all_charged(events, charged);
        });
    }

    /// Queues `events`, which hold `charged` bytes of the budget between them (a batch
    /// taken from a tenant buffer): each takes its share, as the buffer reckoned it, and
    /// what is left goes back.
    pub(crate) fn queue_all_charged(&self, events: Vec<AuditRecord>, charged: usize) {
        let mut left = charged;
        for event in events {
            let bytes = held_bytes(&event).min(left);
            left -= bytes;
            self.queue_charged(event, bytes);
        }
        self.budget.give(left);
    }

    /// Hands `event` to the writing task without waiting for the store.
    pub fn queue(&self, event: AuditRecord) {
        self.queue_charged(event, 0);
    }

    /// [`Self::queue`] for an event that holds `charged` bytes of the budget already (a
    /// closed tenant buffer's): they are handed over with it, not given back first, where
    /// another tenant's event could take them.
    pub(crate) fn queue_charged(&self, event: AuditRecord, charged: usize) {
        let refusal = is_refusal(&event);
        if !self.shares.take(&event) {
            self.budget.give(charged);
            // One line per event would let the same callers flood the log as well.
            if refusal {
                tracing::debug!("audit queue's share of refused credentials full: event dropped");
            } else if self.shares.first_call_dropped() {
                tracing::error!("audit queue's share of tool calls full: their events dropped (counted in switchboard_audit_dropped_total) until it has room");
            }
            crate::metrics::audit_dropped(1);
            return;
        }
        // The event holds exactly what `Waiting::done` gives back for it. A tool call's event
        // takes only from the buffers' part, as it would have in its tenant's buffer, and so
        // does a refused credential (anyone can cause those): the queue's own part stays for
        // admin actions and issued tokens.
        let bytes = held_bytes(&event);
        let charged_in_full = match bytes.checked_sub(charged) {
            Some(0) => true,
            Some(more) if refusal || is_call(&event) => self.budget.take(more),
            Some(more) => self.budget.take_for_queue(more),
            None => {
                self.budget.give(charged - bytes);
                true
            }
        };
        if !charged_in_full {
            self.budget.give(charged);
            self.shares.give(std::slice::from_ref(&event));
            if refusal {
                tracing::debug!("audit events in memory past AUDIT_BUFFER_BYTES: event dropped");
            } else {
                tracing::error!(action = %event.action, "audit events in memory past AUDIT_BUFFER_BYTES: event dropped");
            }
            crate::metrics::audit_dropped(1);
            return;
        }
        // Counted before it is sent: the writing task may write it, and count it down,
        // before `try_send` returns.
        crate::metrics::audit_pending(1);
        if let Err(refused) = self.queue.try_send(event) {
            crate::metrics::audit_pending(-1);
            self.budget.give(bytes);
            let (mpsc::error::TrySendError::Full(event) | mpsc::error::TrySendError::Closed(event)) =
                refused;
            self.shares.give(std::slice::from_ref(&event));
            let action = event.action;
            tracing::error!(%action, "audit queue full or closed: event dropped");
            crate::metrics::audit_dropped(1);
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

/// Whether `event` is a refused credential (see [`REFUSALS_QUEUED`]).
fn is_refusal(event: &AuditRecord) -> bool {
    event.action == super::REFUSED
}

/// Whether `event` is a tenant's tool call or tool list (see [`CALLS_QUEUED`]).
fn is_call(event: &AuditRecord) -> bool {
    event.action == super::TOOL_CALL || event.action == super::TOOLS_LIST
}

/// How many events of each kind with a share of the queue are in it.
#[derive(Default)]
struct Shares {
    refusals: AtomicUsize,
    calls: AtomicUsize,
    /// Whether a tool-call event was dropped at its full share since the share last had
    /// room: logged once, not for each (an outage hands over every tenant's buffer).
    calls_full: AtomicBool,
}

impl Shares {
    /// The count `event` goes into, and its share, if its kind has one.
    fn of(&self, event: &AuditRecord) -> Option<(&AtomicUsize, usize)> {
        if is_refusal(event) {
            Some((&self.refusals, REFUSALS_QUEUED))
        } else if is_call(event) {
            Some((&self.calls, CALLS_QUEUED))
        } else {
            None
        }
    }

    /// Counts `event` in, unless its kind's share is full.
    fn take(&self, event: &AuditRecord) -> bool {
        let Some((count, most)) = self.of(event) else {
            return true;
        };
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts `events` out: written, or dropped after all.
    fn give(&self, events: &[AuditRecord]) {
        for event in events {
            if let Some((count, _)) = self.of(event) {
                count.fetch_sub(1, Ordering::AcqRel);
            }
        }
        if events.iter().any(is_call) {
            self.calls_full.store(false, Ordering::Relaxed);
        }
    }

    /// Whether this is the first tool-call event dropped at the full share since it last
    /// had room.
    fn first_call_dropped(&self) -> bool {
        !self.calls_full.swap(true, Ordering::Relaxed)
    }
}

/// The receiving end of the queue, with its counts of the kinds with a share and its budget.
struct Queued {
    events: mpsc::Receiver<AuditRecord>,
    shares: Arc<Shares>,
    budget: Arc<AuditBudget>,
}

/// Events taken from the queue and not written yet. What is left of them when the writing
/// task ends, or when it is dropped unfinished (a shutdown that stopped waiting for it drops
/// the runtime), is counted as dropped and logged: no event goes without a trace.
struct Waiting {
    events: Vec<AuditRecord>,
    shares: Arc<Shares>,
    budget: Arc<AuditBudget>,
}

impl Waiting {
    /// The first `n` events are done with: written, or counted as lost. Their bytes go back
    /// to the budget (an event is not changed while it waits, so it holds what it took).
    fn done(&mut self, n: usize) {
        self.shares.give(&self.events[..n]);
        let bytes = self.events[..n].iter().map(held_bytes).sum();
        self.budget.give(bytes);
        crate::metrics::audit_pending(-(n as i64));
        self.events.drain(..n);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let lost = self.events.len();
        if lost > 0 {
            tracing::error!(events = lost, "audit events lost on stop");
            crate::metrics::audit_dropped(lost as u64);
            self.done(lost);
        }
    }
}

/// Writes queued events in batches, pausing longer after each refused write, until `stop`;
/// then writes what is left for at most `grace` from then, and counts what it could not.
async fn write_queued(
    store: SharedStore,
    mut queued: Queued,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut waiting = Waiting {
        events: Vec::new(),
        shares: queued.shares.clone(),
        budget: queued.budget.clone(),
    };
    let mut pause = RETRY_FIRST;
    loop {
        if waiting.events.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => break,
                got = queued.events.recv() => match got {
                    Some(event) => waiting.events.push(event),
                    None => break,
                },
            }
        }
        while waiting.events.len() < BATCH {
            match queued.events.try_recv() {
                Ok(event) => waiting.events.push(event),
                Err(_) => break,
            }
        }
        // A write still waiting for the store when the process stops gives way to the
        // bounded writes below: a hung store must not take the grace with it (an event
        // written twice is stored once).
        let written = tokio::select! {
            _ = stop.cancelled() => break,
            written = append_within(&store, &waiting.events, ATTEMPT) => written,
        };
        match written {
            Ok(()) => {
                waiting.done(waiting.events.len());
                pause = RETRY_FIRST;
            }
            Err(err) => {
                tracing::warn!(error = %err, events = waiting.events.len(), "queued audit events not written; will retry");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RETRY_MOST);
            }
        }
    }
    queued.events.close();
    while let Ok(event) = queued.events.try_recv() {
        waiting.events.push(event);
    }
    // Every write and pause ends by the deadline. What is left then is counted by
    // `waiting`'s drop: here, or when the runtime drops this task because the shutdown
    // (which waits for it about as long) stopped waiting first.
    let deadline = Instant::now() + grace;
    while !waiting.events.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let n = waiting.events.len().min(BATCH);
        match append_within(&store, &waiting.events[..n], left).await {
            Ok(()) => waiting.done(n),
            Err(err) => {
                tracing::warn!(error = %err, "queued audit events not written on stop; retrying");
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(RETRY_FIRST.min(left)).await;
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
    crate::store::answered_within(limit, store.append_audit(events)).await
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::{sqlite::SqliteStore, AuditQuery};

    /// Every event of `tenant` with `action` in the store.
    async fn stored(store: &SharedStore, tenant: &str, action: &str) -> usize {
        let mut query = AuditQuery {
            tenant_id: tenant.into(),
            action: Some(action.into()),
            before_id: None,
            limit: 500,
        };
        let mut count = 0;
        loop {
            let page = store.list_audit(&query).await.unwrap();
            count += page.len();
            match page.last() {
                Some(last) if page.len() == 500 => query.before_id = Some(last.id.clone()),
                _ => return count,
            }
        }
    }

    fn unbounded() -> Arc<AuditBudget> {
        Arc::new(AuditBudget::new(usize::MAX))
    }

    fn admin_event(tenant: &str) -> AuditRecord {
        crate::audit::event(Some(tenant), "tenant.delete", "admin", "success", None)
    }

    /// A writer within `budget` on a store with no tables yet: every write fails, as in an
    /// outage, until the test migrates it.
    async fn writer_in_an_outage(budget: Arc<AuditBudget>) -> (AuditWriter, SharedStore) {
        let store: SharedStore = Arc::new(SqliteStore::open(":memory:").await.unwrap());
        let lifecycle = Lifecycle::new(CancellationToken::new());
        let writer = AuditWriter::start(store.clone(), &lifecycle, Duration::from_secs(1), budget);
        (writer, store)
    }

    /// Ends the outage, and waits until the store holds `n` events of `tenant`'s `action`.
    async fn written_after_the_outage(store: &SharedStore, tenant: &str, action: &str, n: usize) {
        store.migrate().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while stored(store, tenant, action).await < n {
            assert!(
                Instant::now() < deadline,
                "the queued {action} events were not written"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn the_queue_holds_what_the_budget_lets_it_and_gives_it_back_once_written() {
        let size = held_bytes(&admin_event("t"));
        let budget = Arc::new(AuditBudget::new(2 * size + size / 2));
        let (writer, store) = writer_in_an_outage(budget.clone()).await;
        for _ in 0..3 {
            writer.queue(admin_event("t"));
        }
        assert_eq!(budget.held(), 2 * size, "the third was past the budget");
        written_after_the_outage(&store, "t", "tenant.delete", 2).await;
        assert_eq!(stored(&store, "t", "tenant.delete").await, 2);
        let deadline = Instant::now() + Duration::from_secs(5);
        while budget.held() > 0 {
            assert!(
                Instant::now() < deadline,
                "written events still hold {} bytes",
                budget.held()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn refused_credentials_cannot_push_other_events_out_of_the_queue() {
        let (writer, store) = writer_in_an_outage(unbounded()).await;
        for _ in 0..QUEUE {
            writer.queue(crate::audit::event(
                Some("anyone"),
                crate::audit::REFUSED,
                "anonymous",
                "refused",
                None,
            ));
        }
        writer.queue(admin_event("t"));
        written_after_the_outage(&store, "t", "tenant.delete", 1).await;
        assert_eq!(
            stored(&store, "anyone", crate::audit::REFUSED).await,
            REFUSALS_QUEUED
        );
        // Written ones free their share again.
        assert_eq!(writer.shares.refusals.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn tool_calls_and_refused_credentials_take_no_bytes_of_the_queues_own_part() {
        for action in [crate::audit::TOOL_CALL, crate::audit::REFUSED] {
            let event = || crate::audit::event(Some("busy"), action, "busy", "ok", None);
            let size = held_bytes(&event());
            // The buffers' part is seven eighths: seven events' worth (the margin: an admin
            // action's name is a few bytes longer).
            let budget = Arc::new(AuditBudget::new(8 * size + 16));
            let (writer, _store) = writer_in_an_outage(budget.clone()).await;
            for _ in 0..8 {
                writer.queue(event());
            }
            assert_eq!(
                budget.held(),
                7 * size,
                "{action}: the eighth was past the buffers' part"
            );
            let mut admin = event();
            admin.action = "tenant.update".into();
            let admin_size = held_bytes(&admin);
            writer.queue(admin);
            assert_eq!(
                budget.held(),
                7 * size + admin_size,
                "{action}: an admin action takes the queue's part"
            );
        }
    }

    #[tokio::test]
    async fn tenants_tool_calls_cannot_push_admin_events_out_of_the_queue() {
        let (writer, store) = writer_in_an_outage(unbounded()).await;
        // Stopped actors' buffers, handed over with the bytes they held.
        for n in 0..QUEUE {
            let call = crate::audit::event(Some("busy"), "tool.call", "busy", "ok", None);
            let bytes = held_bytes(&call);
            if n % 2 == 0 {
                writer.queue(call);
            } else {
                assert!(writer.budget().take(bytes));
                writer.queue_charged(call, bytes);
            }
        }
        writer.queue(admin_event("t"));
        written_after_the_outage(&store, "t", "tenant.delete", 1).await;
        assert_eq!(stored(&store, "busy", "tool.call").await, CALLS_QUEUED);
        assert_eq!(writer.shares.calls.load(Ordering::Relaxed), 0);
        // Every byte back, those of the events refused at the share included.
        let deadline = Instant::now() + Duration::from_secs(5);
        while writer.budget().held() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} bytes held",
                writer.budget().held()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
