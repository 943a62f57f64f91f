//! One file per group of endpoints; `http::router` mounts them.

pub mod audit;
pub mod auth;
pub mod health;
pub mod metrics;
pub mod tenants;
pub mod tool;
