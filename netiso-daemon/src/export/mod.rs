//! Everything that leaves netiso: log lines (and, later, metrics and the query API).

pub mod auth;
pub mod http;
pub mod log;
pub mod metrics;
pub mod tls;
pub mod trust;
