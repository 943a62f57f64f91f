//! Shared test harness: the gateway on port 0, fresh databases, real upstream MCP servers.
#![allow(dead_code)]

pub mod database;
pub mod gateway;
pub mod mcp_client;
pub mod mcp_upstream;
