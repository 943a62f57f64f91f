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
//! So an event is buffered, written, or counted as dropped (the buffer's bound, the writer's
//! full queue): never lost uncounted.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};

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
}

#[derive(Default)]
struct Buffered {
    events: VecDeque<AuditRecord>,
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
}

impl AuditBuffer {
    pub fn new(capacity: usize, batch: usize, writer: AuditWriter) -> Self {
        let capacity = capacity.max(1);
        Self {
            state: Mutex::default(),
            capacity,
            batch: batch.clamp(1, capacity),
            writer,
        }
    }

    // A poisoned lock is used as it is: every change under it is one whole `VecDeque`
    // operation, so a panic cannot leave half an event behind.
    fn lock(&self) -> MutexGuard<'_, Buffered> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn append(&self, event: AuditRecord) -> Appended {
        let mut state = self.lock();
        if state.closed {
            drop(state);
            self.writer.queue(event);
            return Appended::HandedOver;
        }
        // Counted under the lock, before a write can take the event and count it written.
        if state.events.len() >= self.capacity {
            state.events.pop_front();
            crate::metrics::audit_dropped(1);
        } else {
            crate::metrics::audit_pending(1);
        }
        state.events.push_back(event);
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
        state.events.drain(..n).collect()
    }

    /// Every event held (the stopping actor's last writes), put back unless written.
    pub(super) fn take_all(&self) -> Taken<'_> {
        Taken {
            buffer: self,
            events: self.lock().events.drain(..).collect(),
        }
    }

    /// Puts events whose write failed back in front, in their order, for the next attempt.
    /// Should the buffer be closed already, they go to the audit writer. The bound holds as
    /// it does for an append: past it the oldest are dropped, and counted.
    pub(super) fn put_back(&self, events: Vec<AuditRecord>) {
        let mut state = self.lock();
        if state.closed {
            drop(state);
            self.hand_to_writer(events);
            return;
        }
        for event in events.into_iter().rev() {
            state.events.push_front(event);
        }
        let over = state.events.len().saturating_sub(self.capacity);
        if over > 0 {
            state.events.drain(..over);
            crate::metrics::audit_dropped(over as u64);
            crate::metrics::audit_pending(-(over as i64));
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
    /// crashed), or is ending with events its stop could not write.
    pub(super) fn close(&self) {
        let left: Vec<AuditRecord> = {
            let mut state = self.lock();
            state.closed = true;
            state.events.drain(..).collect()
        };
        self.hand_to_writer(left);
    }

    fn hand_to_writer(&self, events: Vec<AuditRecord>) {
        // The writer counts them as waiting again.
        crate::metrics::audit_pending(-(events.len() as i64));
        for event in events {
            self.writer.queue(event);
        }
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

    /// The write succeeded: how many events it wrote.
    pub fn written(mut self) -> usize {
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
        let lifecycle = Lifecycle::new(CancellationToken::new());
        let writer = AuditWriter::start(store.clone(), &lifecycle, Duration::from_secs(1));
        (AuditBuffer::new(capacity, batch, writer), store)
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
