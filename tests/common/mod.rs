//! Shared test harness: the gateway on port 0, fresh databases, real upstream MCP servers
//! and the pinned third-party peers. Each integration test crate compiles this module on
//! its own, so items a given crate does not use are expected.
#![allow(dead_code)]

pub mod database;
pub mod gateway;
pub mod mcp_client;
pub mod peers;
pub mod private_postgres;
pub mod upstream;
