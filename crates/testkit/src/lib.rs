//! Test support shared by the crates' integration tests: the Python tools venv that
//! `cargo xtask test` prepares, a real Synapse started in a temp dir ([`Synapse`]), a throwaway
//! PostgreSQL database per test ([`TestDb`]), an S3-compatible server ([`S3Server`], moto), two
//! federating Synapses behind nginx with TLS ([`Federation`]) and a small blocking HTTP client
//! ([`http`]).
//!
//! Everything here panics on failure, with instructions when a tool or service is missing: a test
//! that cannot run fails, it is never skipped.
#![allow(clippy::print_stderr)] // Tests report progress on stderr (the harness captures it).

mod caddy;
mod db;
pub mod dns;
mod faultproxy;
mod fedharness;
mod hmac;
pub mod http;
mod nginx;
mod pgserver;
mod prometheus;
mod redis;
mod s3;
mod synapse;
mod tls;
mod tools;

pub use caddy::{Caddy, caddy_bin};
pub use db::{PgUrl, TestDb, database_url, parse_url};
pub use dns::DnsServer;
pub use faultproxy::{Fault, FaultProxy};
pub use fedharness::{
    Federation, FederationBuilder, Front, Homeserver, HomeserverSetup, Webserver,
};
pub use nginx::{Nginx, nginx_bin};
pub use pgserver::PgServer;
/// The PostgreSQL client [`TestDb::client`] returns.
pub use postgres;
pub use prometheus::Prometheus;
pub use redis::RedisServer;
pub use s3::{ACCESS_KEY_ID, ACCESS_SECRET, S3Object, S3Server};
pub use synapse::{Database, Synapse, SynapseBuilder, free_port};
pub use tls::TestCerts;
pub use tools::{promtool_bin, python, tool, tools_bin};
