//! A tenant's buffer of tool-call audit events: its callers append to it, its actor writes
//! it to the store in batches. It sits beside the actor, as the [`super::lane`] does, not in
//! the actor's mailbox:
//!
//! - an event costs its caller a short lock, not a message that wakes the actor (the actor
//!   is woken when a batch is full, writes the next full one as soon as a write ends, and
//!   otherwise a batch on each tick);
//! - when the actor crashes, ractor drops its mailbox with every message in it, but this
//!   buffer is whole, and is handed to the process's [`AuditWriter`] ("closed"). A closed
//!   buffer gives each later event to the writer too.
//!
//! So an event is buffered, written, or counted as dropped (the buffer's bounds, the
//! writer's full queue): never lost uncounted.
//!
//! Two bounds hold: each buffer's count of events (`AUDIT_BUFFER_SIZE`), and the bytes all of
//! a process's buffers hold together with the writer's queue ([`AuditBudget`],
//! `AUDIT_BUFFER_BYTES`), since during a database outage every tenant's buffer fills at
//! once. Past either, the appending tenant's oldest events go first; past the bytes, the
//! new event too when that tenant holds none.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::audit::budget::{held_bytes, AuditBudget};
use crate::audit::AuditWriter;
use crate::store::AuditRecord;

pub struct AuditBuffer {
    state: Mutex<Buffered>,
    /// Events held at most; past it the oldest is dropped, and counted.
    capacity: usize,
    /// Events per write; the append that fills a batch asks for the actor.
    batch: usize,
    /// Where events go once the buffer is closed.
    writer: AuditWriter,
    /// The process's bound on what all buffers hold, shared with every other tenant's.
    budget: Arc<AuditBudget>,
}

/// An event and the bytes of the budget it holds.
struct Held {
    event: AuditRecord,
    bytes: usize,
}

#[derive(Default)]
struct Buffered {
    events: VecDeque<Held>,
    /// The bytes of `events`.
    bytes: usize,
    /// The bytes of the events taken for a write and not yet settled: still charged to
    /// the budget, so that a failed write puts them back whatever other tenants took
    /// meanwhile (one write at a time per buffer).
    in_flight: usize,
    closed: bool,
}

/// What [`AuditBuffer::append`] did with an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Appended {
    /// Buffered, for the actor's next write.
    Held,
    /// Buffered, and it filled a batch: the caller wakes the actor to write it.
    BatchFull,
    /// Given to the audit writer: the actor is gone.
    HandedOver,
    /// Dropped, and counted: the process's buffers hold all the bytes they may, and this
    /// tenant's none of them.
    Dropped,
}

impl AuditBuffer {
    /// A buffer whose bytes come from `writer`'s budget, which the events it hands over
    /// keep holding there.
    pub fn new(capacity: usize, batch: usize, writer: AuditWriter) -> Self {
        let capacity = capacity.max(1);
        Self {
            state: Mutex::default(),
            capacity,
            batch: batch.clamp(1, capacity),
            budget: writer.budget().clone(),
            writer,
        }
    }

    /// Takes the first `n` events out for a write: their bytes stay charged, as in flight,
    /// until [`Self::settled`], [`Self::put_back`] or [`Self::hand_over_in_flight`].
    fn take(state: &mut Buffered, n: usize) -> Vec<AuditRecord> {
        state
            .events
            .drain(..n)
            .map(|held| {
                state.bytes -= held.bytes;
                state.in_flight += held.bytes;
                held.event
            })
            .collect()
    }

    /// Drops the oldest event held, if any, and counts it.
    fn drop_oldest(&self, state: &mut Buffered) -> bool {
        let Some(oldest) = state.events.pop_front() else {
            return false;
        };
        state.bytes -= oldest.bytes;
        self.budget.give(oldest.bytes);
        crate::metrics::audit_dropped(1);
        crate::metrics::audit_pending(-1);
        true
    }

    // A poisoned lock is used as it is: every change under it is one whole `VecDeque`
    // operation, so a panic cannot leave half an event behind.
    fn lock(&self) -> MutexGuard<'_, Buffered> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn append(&self, event: AuditRecord) -> Appended {
        // Reckoned before the lock: it walks the event's detail.
        let bytes = held_bytes(&event);
        let mut state = self.lock();
        if state.closed {
            drop(state);
            self.writer.queue(event);
            return Appended::HandedOver;
        }
        // Within this tenant's own share first, its oldest going. A batch in flight counts
        // too (it may come back: a failed write), and cannot be dropped: an event that would
        // not fit beside it even with every held one gone goes itself, and none of them.
        if state.in_flight + bytes > self.budget.tenant_most() {
            crate::metrics::audit_dropped(1);
            return Appended::Dropped;
        }
        while state.bytes + state.in_flight + bytes > self.budget.tenant_most() {
            if !self.drop_oldest(&mut state) {
                crate::metrics::audit_dropped(1);
                return Appended::Dropped;
            }
        }
        // Then room in the whole budget: this tenant's oldest go while what it holds, with
        // what is free, could still make room; else the new event goes, and none of the old
        // for nothing.
        while !self.budget.take(bytes) {
            if state.bytes < self.budget.shortfall(bytes) || !self.drop_oldest(&mut state) {
                crate::metrics::audit_dropped(1);
                return Appended::Dropped;
            }
        }
        // Counted under the lock, before a write can take the event and count it written.
        if state.events.len() >= self.capacity {
            self.drop_oldest(&mut state);
        }
        crate::metrics::audit_pending(1);
        state.bytes += bytes;
        state.events.push_back(Held { event, bytes });
        if state.events.len() == self.batch {
            Appended::BatchFull
        } else {
            Appended::Held
        }
    }

    /// The oldest events, a batch at most, for a write.
    pub(super) fn take_batch(&self) -> Vec<AuditRecord> {
        let mut state = self.lock();
        let n = state.events.len().min(self.batch);
        Self::take(&mut state, n)
    }

    /// The write of the events taken last ended, written or lost: their bytes go back to
    /// the budget.
    pub(super) fn settled(&self) {
        let mut state = self.lock();
        self.budget.give(std::mem::take(&mut state.in_flight));
    }

    /// Every event held (the stopping actor's last writes), put back unless written.
    pub(super) fn take_all(&self) -> Taken<'_> {
        let mut state = self.lock();
        let n = state.events.len();
        Taken {
            buffer: self,
            events: Self::take(&mut state, n),
        }
    }

    /// Puts the events taken last, whose write failed, back in front, in their order, for
    /// the next attempt; their bytes were never given back. Should the buffer be closed
    /// already, they go to the audit writer. The count bound holds as it does for an
    /// append: past it the oldest are dropped, and counted.
    pub(super) fn put_back(&self, events: Vec<AuditRecord>) {
        let mut state = self.lock();
        if state.closed {
            let charged = std::mem::take(&mut state.in_flight);
            drop(state);
            self.hand_to_writer(events, charged);
            return;
        }
        for event in events.into_iter().rev() {
            let bytes = held_bytes(&event).min(state.in_flight);
            state.in_flight -= bytes;
            state.bytes += bytes;
            state.events.push_front(Held { event, bytes });
        }
        let over = state.events.len().saturating_sub(self.capacity);
        for _ in 0..over {
            self.drop_oldest(&mut state);
        }
    }

    /// Whether a whole batch waits.
    pub(super) fn has_batch(&self) -> bool {
        self.lock().events.len() >= self.batch
    }

    pub(super) fn len(&self) -> usize {
        self.lock().events.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().events.is_empty()
    }

    /// Hands every event held to the audit writer, which retries while the store refuses
    /// and is flushed at shutdown, and sends it every later one: the actor is gone (it
    /// crashed), or is ending with events its stop could not write. The events held go
    /// with their bytes; a batch in flight keeps its own until it settles here
    /// ([`Self::settled`], [`Self::put_back`]) or is handed over with its write
    /// ([`Self::hand_over_in_flight`]).
    pub(super) fn close(&self) {
        let left: Vec<Held> = {
            let mut state = self.lock();
            state.closed = true;
            state.bytes = 0;
            state.events.drain(..).collect()
        };
        crate::metrics::audit_pending(-(left.len() as i64));
        for held in left {
            self.writer.queue_charged(held.event, held.bytes);
        }
    }

    /// The bytes of the batch in flight, still charged, for whoever takes over its write
    /// (the audit writer, for a closing actor): they go with its events if it fails, so
    /// that no other tenant can take them between.
    pub(super) fn hand_over_in_flight(&self) -> usize {
        std::mem::take(&mut self.lock().in_flight)
    }

    /// Events of a closed buffer to the writer, with `charged` bytes between them.
    fn hand_to_writer(&self, events: Vec<AuditRecord>, charged: usize) {
        // The writer counts them as waiting again.
        crate::metrics::audit_pending(-(events.len() as i64));
        self.writer.queue_all_charged(events, charged);
    }
}

impl Drop for AuditBuffer {
    /// A buffer is closed before it goes (see `TenantState`); one that was not gives its
    /// events to the writer all the same, and its bytes back (those of a batch in flight
    /// too: nothing can settle it here any more).
    fn drop(&mut self) {
        self.close();
        self.budget.give(self.hand_over_in_flight());
    }
}

/// Events taken for a write. Dropped before [`Taken::written`] (the write failed, or its
/// future was dropped mid-write), they go back in front of the buffer, or to the writer
/// once it is closed.
pub(super) struct Taken<'a> {
    buffer: &'a AuditBuffer,
    events: Vec<AuditRecord>,
}

impl Taken<'_> {
    pub fn events(&self) -> &[AuditRecord] {
        &self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The write succeeded: how many events it wrote (their bytes go back to the budget).
    pub fn written(mut self) -> usize {
        self.buffer.settled();
        std::mem::take(&mut self.events).len()
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if !self.events.is_empty() {
            self.buffer.put_back(std::mem::take(&mut self.events));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::shutdown::Lifecycle;
    use crate::store::{sqlite::SqliteStore, AuditQuery, SharedStore};

    fn event(n: u32) -> AuditRecord {
        crate::audit::event(Some("t"), "tool.call", "t", "success", Some(&n.to_string()))
    }

    fn numbers(events: &[AuditRecord]) -> Vec<u32> {
        events
            .iter()
            .filter_map(|e| e.request_id.as_deref()?.parse().ok())
            .collect()
    }

    async fn buffer(capacity: usize, batch: usize) -> (AuditBuffer, SharedStore) {
        let store: SharedStore = Arc::new(SqliteStore::open(":memory:").await.unwrap());
        store.migrate().await.unwrap();
        let (writer, _) = writer_within(store.clone(), usize::MAX);
        (AuditBuffer::new(capacity, batch, writer), store)
    }

    /// A writer on `store` whose queue and buffers hold `most` bytes at most, and its budget.
    fn writer_within(store: SharedStore, most: usize) -> (AuditWriter, Arc<AuditBudget>) {
        let lifecycle = Lifecycle::new(CancellationToken::new());
        let budget = Arc::new(AuditBudget::new(most));
        let grace = Duration::from_secs(1);
        (
            AuditWriter::start(store, &lifecycle, grace, budget.clone()),
            budget,
        )
    }

    /// An event whose detail makes it about 4 KiB in memory.
    fn big_event(n: u32) -> AuditRecord {
        let mut event = event(n);
        event.detail = Some(serde_json::json!({ "arguments": { "text": "a".repeat(4096) } }));
        event
    }

    #[test]
    fn an_events_detail_is_reckoned_as_the_values_it_holds() {
        let mut held = event(1);
        let plain = held_bytes(&held);
        // About 2,000 bytes as JSON, a thousand values in memory.
        held.detail = Some(serde_json::json!({ "arguments": { "a": vec![0; 1000] } }));
        let values = 1000 * std::mem::size_of::<serde_json::Value>();
        assert!(held_bytes(&held) - plain >= values, "{}", held_bytes(&held));
    }

    #[tokio::test]
    async fn the_bytes_all_buffers_hold_are_bounded_the_appending_tenants_oldest_first() {
        let (_, store) = buffer(1, 1).await;
        let size = held_bytes(&big_event(1));
        // Two events' worth for the buffers, with the writer's own part on top.
        let (writer, budget) = writer_within(store, 2 * size + size / 2);
        let a = AuditBuffer::new(100, 100, writer.clone());
        let b = AuditBuffer::new(100, 100, writer);
        for n in 1..=3 {
            assert_eq!(a.append(big_event(n)), Appended::Held);
        }
        assert_eq!(a.len(), 2, "the third took the place of the first");
        assert_eq!(budget.held(), 2 * size);
        assert_eq!(
            b.append(big_event(10)),
            Appended::Dropped,
            "another tenant holds every byte, this one none"
        );
        // An event that could not fit even in all this tenant holds drops none of it.
        let mut huge = big_event(4);
        huge.detail = Some(serde_json::json!({ "text": "a".repeat(3 * size) }));
        assert_eq!(a.append(huge), Appended::Dropped);
        assert_eq!(a.len(), 2);
        // Events taken for a write stay charged until it ends: a failed write puts them
        // back whatever another tenant tried meanwhile.
        let batch = a.take_batch();
        assert_eq!(numbers(&batch), [2, 3]);
        assert_eq!(budget.held(), 2 * size);
        assert_eq!(b.append(big_event(11)), Appended::Dropped);
        a.put_back(batch);
        assert_eq!(a.len(), 2, "nothing of the failed write lost");
        // A write that ends gives the bytes back.
        assert_eq!(numbers(&a.take_batch()), [2, 3]);
        a.settled();
        assert_eq!(budget.held(), 0);
        assert_eq!(b.append(big_event(12)), Appended::Held);
        assert_eq!(budget.held(), held_bytes(&big_event(12)));
        // A closed buffer hands its events to the writer with their bytes, which the
        // writer gives back once they are written.
        b.close();
        assert_eq!(b.len(), 0);
        assert_eq!(budget.held(), held_bytes(&big_event(12)), "handed over");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while budget.held() > 0 {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_tenant_holds_at_most_its_share_of_the_bytes_its_own_oldest_going_first() {
        let store: SharedStore = Arc::new(SqliteStore::open(":memory:").await.unwrap());
        // A share of 7 MiB, events of about 1 MiB each.
        let (writer, budget) = writer_within(store, 64 << 20);
        let share = budget.tenant_most();
        assert_eq!(share, 7 << 20);
        let large = |n: u32| {
            let mut event = event(n);
            event.detail = Some(serde_json::json!({ "text": "a".repeat(1 << 20) }));
            event
        };
        let size = held_bytes(&large(1));
        let a = AuditBuffer::new(100, 100, writer.clone());
        let b = AuditBuffer::new(100, 100, writer.clone());
        for n in 1..=20 {
            assert_eq!(a.append(large(n)), Appended::Held);
        }
        assert_eq!(a.len(), share / size, "only its newest within its share");
        let batch = a.take_batch();
        assert_eq!(numbers(&batch)[0], 21 - (share / size) as u32);
        assert!(budget.held() <= share);
        // Its batch in flight counts in its share: nothing more fits beside it until the
        // write ends, and a failed one comes back within the share.
        assert_eq!(a.append(large(21)), Appended::Dropped);
        a.put_back(batch);
        assert!(budget.held() <= share);
        assert_eq!(
            b.append(large(30)),
            Appended::Held,
            "the others' room is left"
        );
        // One event larger than the share is not held, and drops none of the others.
        let mut huge = event(40);
        huge.detail = Some(serde_json::json!({ "text": "a".repeat(share) }));
        assert_eq!(b.append(huge), Appended::Dropped);
        assert_eq!(b.len(), 1);
    }

    #[tokio::test]
    async fn an_event_that_cannot_fit_beside_the_batch_in_flight_drops_none_held() {
        let store: SharedStore = Arc::new(SqliteStore::open(":memory:").await.unwrap());
        let (writer, budget) = writer_within(store, 64 << 20);
        let share = budget.tenant_most();
        let large = |n: u32, text: usize| {
            let mut event = event(n);
            event.detail = Some(serde_json::json!({ "text": "a".repeat(text) }));
            event
        };
        let size = held_bytes(&large(1, 1 << 20));
        let a = AuditBuffer::new(100, 100, writer);
        for n in 1..=3 {
            assert_eq!(a.append(large(n, 1 << 20)), Appended::Held);
        }
        let _in_flight = a.take_batch();
        for n in 4..=6 {
            assert_eq!(a.append(event(n)), Appended::Held);
        }
        // Within the share on its own, not beside the three in flight.
        let too_large = large(7, share - 2 * size);
        assert!(held_bytes(&too_large) < share);
        assert_eq!(a.append(too_large), Appended::Dropped);
        assert_eq!(a.len(), 3, "the held events were dropped for nothing");
    }

    #[tokio::test]
    async fn a_tenant_keeps_its_events_when_dropping_them_could_not_make_room() {
        // No tables: the writer's queue keeps what it takes, as in an outage.
        let store: SharedStore = Arc::new(SqliteStore::open(":memory:").await.unwrap());
        let size = held_bytes(&big_event(1));
        let (writer, budget) = writer_within(store, 2 * size + size / 4);
        let a = AuditBuffer::new(100, 100, writer.clone());
        let b = AuditBuffer::new(100, 100, writer.clone());
        assert_eq!(b.append(big_event(10)), Appended::Held);
        for n in 1..=3 {
            assert_eq!(a.append(event(n)), Appended::Held);
        }
        // The queue takes past the buffers' part, which its own part lets it (for an
        // admin action's event: a tool call's takes only from the buffers' part).
        let mut admin = big_event(20);
        admin.action = "tenant.update".into();
        writer.queue(admin);
        assert!(
            budget.shortfall(0) > 0,
            "the queue holds some of the buffers' part"
        );
        // What this tenant holds could not make room: it keeps it, and the new one goes.
        assert_eq!(a.append(event(4)), Appended::Dropped);
        assert_eq!(a.len(), 3);
    }

    /// Two tenants' buffers on a writer with room for two big events in the buffers and
    /// half of one more for its queue, on a store with no tables: the writer's queue keeps
    /// what it takes, as in an outage. The first tenant holds a batch of two in flight.
    async fn two_tenants_one_batch_in_flight() -> (
        AuditBuffer,
        AuditBuffer,
        Vec<AuditRecord>,
        AuditWriter,
        Arc<AuditBudget>,
        SharedStore,
    ) {
        let store: SharedStore = Arc::new(SqliteStore::open(":memory:").await.unwrap());
        let size = held_bytes(&big_event(1));
        let (writer, budget) = writer_within(store.clone(), 2 * size + size / 2);
        let a = AuditBuffer::new(100, 100, writer.clone());
        let b = AuditBuffer::new(100, 100, writer.clone());
        for n in 1..=2 {
            assert_eq!(a.append(big_event(n)), Appended::Held);
        }
        let batch = a.take_batch();
        assert_eq!(budget.held(), 2 * size);
        (a, b, batch, writer, budget, store)
    }

    #[tokio::test]
    async fn a_batch_in_flight_keeps_its_bytes_through_a_close_and_its_failed_write() {
        let (a, b, batch, _writer, budget, _store) = two_tenants_one_batch_in_flight().await;
        let held = budget.held();
        a.close();
        assert_eq!(
            budget.held(),
            held,
            "the batch in flight still holds its bytes"
        );
        assert_eq!(
            b.append(big_event(10)),
            Appended::Dropped,
            "none free meanwhile"
        );
        // Its write failed: the events go to the writer with the bytes they held.
        a.put_back(batch);
        assert_eq!(budget.held(), held);
        assert_eq!(b.append(big_event(11)), Appended::Dropped);
    }

    #[tokio::test]
    async fn a_batch_in_flight_handed_to_the_writer_keeps_its_bytes_until_it_settles() {
        let (a, b, batch, writer, budget, store) = two_tenants_one_batch_in_flight().await;
        let held = budget.held();
        // As a closing actor does with its write in flight.
        a.close();
        let charged = a.hand_over_in_flight();
        assert_eq!(charged, held);
        let (failed, outcome) = tokio::sync::oneshot::channel::<()>();
        writer.queue_later(
            async move {
                let _ = outcome.await;
                batch
            },
            charged,
        );
        // The writer's task waits on the outcome now.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            b.append(big_event(10)),
            Appended::Dropped,
            "none free meanwhile"
        );
        failed.send(()).unwrap();
        // The failed batch is queued with its own bytes: still none free for another.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(budget.held(), held);
        assert_eq!(b.append(big_event(11)), Appended::Dropped);
        drop(a);
        assert_eq!(
            budget.held(),
            held,
            "a dropped buffer gives back only what it holds"
        );
        // The store back: the writer writes the batch, and its bytes come back.
        store.migrate().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while budget.held() > 0 {
            assert!(Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let query = AuditQuery {
            tenant_id: "t".into(),
            limit: 10,
            ..Default::default()
        };
        let mut written = numbers(&store.list_audit(&query).await.unwrap());
        written.sort_unstable();
        assert_eq!(written, [1, 2]);
    }

    #[tokio::test]
    async fn the_append_that_fills_a_batch_asks_for_the_actor_and_the_bound_drops_the_oldest() {
        let (buffer, _) = buffer(5, 3).await;
        let appended: Vec<Appended> = (1..=6).map(|n| buffer.append(event(n))).collect();
        use Appended::{BatchFull, Held};
        assert_eq!(appended, [Held, Held, BatchFull, Held, Held, Held]);
        assert_eq!(buffer.len(), 5, "the sixth event dropped the first");
        assert!(buffer.has_batch());
        let batch = buffer.take_batch();
        assert_eq!(numbers(&batch), [2, 3, 4]);
        assert!(!buffer.has_batch());
        // A failed write goes back in front of what came meanwhile, in its order; past the
        // bound of five the oldest goes, as for an append.
        assert_eq!(buffer.append(event(7)), BatchFull);
        buffer.put_back(batch);
        assert_eq!(buffer.len(), 5);
        // Taken for a write that did not end (failed, or cut off): all back, in order.
        drop(buffer.take_all());
        let all = buffer.take_all();
        assert_eq!(numbers(all.events()), [3, 4, 5, 6, 7]);
        assert_eq!(all.written(), 5);
        assert!(buffer.is_empty());
    }

    #[tokio::test]
    async fn a_closed_buffer_hands_what_it_holds_and_every_later_event_to_the_writer() {
        let (buffer, store) = buffer(10, 5).await;
        buffer.append(event(1));
        buffer.append(event(2));
        buffer.close();
        assert!(buffer.is_empty());
        assert_eq!(buffer.append(event(3)), Appended::HandedOver);
        buffer.put_back(vec![event(4)]);
        assert!(buffer.is_empty(), "nothing stays in a closed buffer");
        let query = AuditQuery {
            tenant_id: "t".into(),
            limit: 10,
            ..Default::default()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut written = numbers(&store.list_audit(&query).await.unwrap());
            written.sort_unstable();
            if written == [1, 2, 3, 4] {
                break;
            }
            assert!(Instant::now() < deadline, "written: {written:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
