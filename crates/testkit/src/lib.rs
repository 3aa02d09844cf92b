//! Test support shared by the crates' integration tests: the Python tools venv that
//! `cargo xtask test` prepares, a real Synapse started in a temp dir ([`Synapse`]), a throwaway
//! PostgreSQL database per test ([`TestDb`]), an S3-compatible server ([`S3Server`], moto) and a
//! small blocking HTTP client ([`http`]).
//!
//! Everything here panics on failure, with instructions when a tool or service is missing: a test
//! that cannot run fails, it is never skipped.
#![allow(clippy::print_stderr)] // Tests report progress on stderr (the harness captures it).

mod db;
mod hmac;
pub mod http;
mod s3;
mod synapse;
mod tools;

pub use db::{PgUrl, TestDb, database_url, parse_url};
/// The PostgreSQL client [`TestDb::client`] returns.
pub use postgres;
pub use s3::{ACCESS_KEY_ID, ACCESS_SECRET, S3Object, S3Server};
pub use synapse::{Database, Synapse, SynapseBuilder};
pub use tools::{python, tool, tools_bin};
