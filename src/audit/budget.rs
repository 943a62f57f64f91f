//! The bytes of audit events held in memory, waiting for the store: every tenant's audit
//! buffer and the audit writer's queue take them from one [`AuditBudget`]
//! (`AUDIT_BUFFER_BYTES`), since during a database outage they all fill at once.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::store::AuditRecord;

/// The bytes all of a process's tenant audit buffers and its audit writer's queue hold
/// (each event's size in memory, as [`held_bytes`] reckons it), and how many they may hold.
#[derive(Debug)]
pub struct AuditBudget {
    held: AtomicUsize,
    most: usize,
}

impl AuditBudget {
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

    /// What is left of the budget.
    pub(crate) fn free(&self) -> usize {
        self.most.saturating_sub(self.held())
    }

    /// Takes `bytes` of the budget, if that many are left.
    pub(crate) fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&after| after <= self.most)
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
