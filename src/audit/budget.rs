//! The bytes of audit events held in memory, waiting for the store: every tenant's audit
//! buffer and the audit writer's queue take them from one [`AuditBudget`]
//! (`AUDIT_BUFFER_BYTES`), since during a database outage they all fill at once; a part is
//! kept for the queue.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::store::AuditRecord;

/// The bytes all of a process's tenant audit buffers and its audit writer's queue hold
/// (each event's size in memory, as [`held_bytes`] reckons it), and how many they may hold.
/// The buffers may take all but [`Self::RESERVED`] of it; the rest is the queue's alone, so
/// that busy tenants' tool calls cannot push out admin actions, issued tokens and the
/// events of stopped actors during an outage.
#[derive(Debug)]
pub struct AuditBudget {
    held: AtomicUsize,
    most: usize,
}

impl AuditBudget {
    /// The share of the budget (one in this many bytes) only the writer's queue may take.
    pub const RESERVED: usize = 8;

    pub fn new(most: usize) -> Self {
        Self {
            held: AtomicUsize::new(0),
            most,
        }
    }

    /// What the buffers and the queue hold now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// What the tenants' buffers may hold together.
    fn buffers_most(&self) -> usize {
        self.most - self.most / Self::RESERVED
    }

    /// What one tenant's buffer may hold: a share of the buffers' part ([`Self::TENANT_SHARE`]),
    /// though never less than [`Self::TENANT_FLOOR`], so that one tenant (large events,
    /// refused calls that spend no rate limit) cannot take the room every other tenant's
    /// events need during an outage. Ordinary events meet the tenant's count bound long
    /// before this one.
    pub(crate) fn tenant_most(&self) -> usize {
        (self.buffers_most() / Self::TENANT_SHARE).max(Self::TENANT_FLOOR)
    }

    /// One tenant's buffer may hold one in this many bytes of the buffers' part...
    pub const TENANT_SHARE: usize = 8;
    /// ...or this many bytes, if more.
    pub const TENANT_FLOOR: usize = 1 << 20;

    /// How many bytes must be given back before `bytes` more fit in the buffers' part:
    /// more than `bytes` when the queue holds some of that part too.
    pub(crate) fn shortfall(&self, bytes: usize) -> usize {
        (self.held() + bytes).saturating_sub(self.buffers_most())
    }

    /// Takes `bytes` for a tenant's buffer, if that many are left of its part.
    pub(crate) fn take(&self, bytes: usize) -> bool {
        self.take_within(bytes, self.buffers_most())
    }

    /// Takes `bytes` for the writer's queue, if that many are left of the whole budget.
    pub(crate) fn take_for_queue(&self, bytes: usize) -> bool {
        self.take_within(bytes, self.most)
    }

    fn take_within(&self, bytes: usize, most: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&after| after <= most)
            })
            .is_ok()
    }

    pub(crate) fn give(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// An event's size in memory, near enough: the record, its text, and its detail as the
/// tree of values it is (a number in an array costs a whole value, not its digits).
pub(crate) fn held_bytes(event: &AuditRecord) -> usize {
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::capacity);
    std::mem::size_of::<AuditRecord>()
        + event.id.capacity()
        + event.action.capacity()
        + event.actor.capacity()
        + event.outcome.capacity()
        + text(&event.tenant_id)
        + text(&event.request_id)
        + text(&event.tool)
        + event.detail.as_ref().map_or(0, value_bytes)
}

/// What a JSON value takes in memory: itself, and what it owns. An object's entry is
/// reckoned at its key, its value and as much again as a value for the map's own node.
fn value_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    const VALUE: usize = std::mem::size_of::<Value>();
    VALUE
        + match value {
            Value::Null | Value::Bool(_) | Value::Number(_) => 0,
            Value::String(s) => s.capacity(),
            Value::Array(items) => {
                (items.capacity() - items.len()) * VALUE
                    + items.iter().map(value_bytes).sum::<usize>()
            }
            Value::Object(map) => map
                .iter()
                .map(|(key, value)| {
                    std::mem::size_of::<String>() + key.capacity() + VALUE + value_bytes(value)
                })
                .sum(),
        }
}

#[cfg(test)]
mod tests {
    use super::AuditBudget;

    #[test]
    fn the_queue_has_a_part_of_the_budget_the_buffers_cannot_take() {
        let budget = AuditBudget::new(800);
        assert!(budget.take(700));
        assert!(!budget.take(1), "the buffers' part is full");
        assert_eq!(budget.shortfall(10), 10);
        assert!(budget.take_for_queue(100), "the queue's is not");
        assert!(!budget.take_for_queue(1));
        // The buffers take only while all that is held stays within their part: with the
        // queue's 100 held too, 10 more for a buffer take 110 given back first.
        assert_eq!(budget.shortfall(10), 110);
        budget.give(110);
        assert_eq!(budget.shortfall(10), 0);
        assert!(budget.take(10));
        budget.give(700);
        assert_eq!(budget.held(), 0);
    }
}
