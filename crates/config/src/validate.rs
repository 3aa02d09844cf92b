//! Checks a parsed config for what the type system cannot express.

use std::collections::HashSet;
use std::fmt;

use crate::{Config, DatastoreKind, DatastoreOpts, MediaKind};

/// One thing wrong with a config: `key` is the dotted path of the offending value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.message)
    }
}

const LOG_LEVELS: [&str; 7] = ["panic", "fatal", "error", "warn", "info", "debug", "trace"];

impl Config {
    /// Every problem found; empty when the config is usable.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: String, message: String| problems.push(Problem { key, message });

        if !LOG_LEVELS.contains(&self.repo.log_level.to_ascii_lowercase().as_str()) {
            problem(
                "repo.logLevel".into(),
                format!(
                    "`{}` is not one of {}",
                    self.repo.log_level,
                    LOG_LEVELS.join(", ")
                ),
            );
        }
        if !self.database.postgres.starts_with("postgres://")
            && !self.database.postgres.starts_with("postgresql://")
        {
            problem(
                "database.postgres".into(),
                "must be a URL of the form postgres://user:password@host:port/database".into(),
            );
        }
        if self.database.pool.max_connections == 0 {
            problem(
                "database.pool.maxConnections".into(),
                "must be at least 1".into(),
            );
        }
        if self.homeservers.is_empty() {
            problem(
                "homeservers".into(),
                "at least one homeserver must be configured".into(),
            );
        }
        let mut names = HashSet::new();
        for (i, hs) in self.homeservers.iter().enumerate() {
            if hs.name.is_empty() {
                problem(format!("homeservers[{i}].name"), "must not be empty".into());
            } else if !names.insert(hs.name.as_str()) {
                problem(
                    format!("homeservers[{i}].name"),
                    format!("`{}` is listed twice", hs.name),
                );
            }
            if !hs.cs_api.starts_with("http://") && !hs.cs_api.starts_with("https://") {
                problem(
                    format!("homeservers[{i}].csApi"),
                    format!("`{}` must be an http:// or https:// URL", hs.cs_api),
                );
            }
        }

        let mut ids = HashSet::new();
        for (i, ds) in self.datastores.iter().enumerate() {
            if ds.id.is_empty() {
                problem(format!("datastores[{i}].id"), "must not be empty".into());
            } else if !ids.insert(ds.id.as_str()) {
                problem(
                    format!("datastores[{i}].id"),
                    format!("`{}` is used twice", ds.id),
                );
            }
            match (&ds.kind, &ds.opts) {
                (DatastoreKind::File, DatastoreOpts::File(opts)) if opts.path.is_empty() => {
                    problem(
                        format!("datastores[{i}].opts.path"),
                        "must not be empty".into(),
                    )
                }
                (DatastoreKind::S3, DatastoreOpts::S3(opts)) => {
                    for (key, value) in [
                        ("endpoint", &opts.endpoint),
                        ("bucketName", &opts.bucket_name),
                        ("accessKeyId", &opts.access_key_id),
                        ("accessSecret", &opts.access_secret),
                    ] {
                        if value.is_empty() {
                            problem(
                                format!("datastores[{i}].opts.{key}"),
                                "must not be empty".into(),
                            );
                        }
                    }
                }
                _ => {}
            }
        }
        for kind in MediaKind::ALL {
            if !self.datastores.iter().any(|ds| ds.accepts(kind)) {
                problem(
                    "datastores".into(),
                    format!(
                        "no datastore accepts `{}`: list it in some datastore's forKinds",
                        kind.as_str()
                    ),
                );
            }
        }
        if self.uploads.max_bytes > 0 && self.uploads.min_bytes > self.uploads.max_bytes {
            problem(
                "uploads.minBytes".into(),
                "is larger than uploads.maxBytes".into(),
            );
        }
        if self.uploads.reported_max_bytes < -1 {
            problem(
                "uploads.reportedMaxBytes".into(),
                "must be -1, 0 or a positive size".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.thumbnails.still_frame) {
            problem(
                "thumbnails.stillFrame".into(),
                "must be between 0 and 1".into(),
            );
        }
        if self.metrics.enabled
            && self.metrics.port == self.repo.port
            && self.metrics.bind_address == self.repo.bind_address
        {
            problem(
                "metrics.port".into(),
                "is the same address as repo.port".into(),
            );
        }
        let c = &self.connections;
        for (key, value) in [
            ("maxConnections", c.max_connections),
            ("headerReadTimeoutSeconds", c.header_read_timeout_seconds),
            ("idleTimeoutSeconds", c.idle_timeout_seconds),
            ("bodyTimeoutSeconds", c.body_timeout_seconds),
            ("sendTimeoutSeconds", c.send_timeout_seconds),
        ] {
            if value == 0 {
                problem(format!("connections.{key}"), "must be at least 1".into());
            }
        }
        if c.max_header_bytes < 1024 {
            problem(
                "connections.maxHeaderBytes".into(),
                "must be at least 1024 (requests carry tokens and signatures in headers)".into(),
            );
        }
        problems
    }
}
