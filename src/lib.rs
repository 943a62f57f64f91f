//! switchboard: a multi-tenant gateway for the Model Context Protocol.

pub mod config;
