//! switchboard: a multi-tenant gateway for the Model Context Protocol.

pub mod app;
pub mod audit;
pub mod auth;
pub mod cipher;
pub mod config;
pub mod http;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod shutdown;
pub mod store;
pub mod tenants;
pub mod upstream;
