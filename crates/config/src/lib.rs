//! The `media-repo.yaml` model: matrix-media-repo's configuration schema, key names and key order.
//!
//! `mmrctl render` writes this model and `mmrctl serve` reads it, so the two can never disagree. The
//! file stays loadable by upstream matrix-media-repo too: field names and section order follow its
//! sample config. Defaults are upstream's code defaults, so a partial file behaves as it would there.

mod datastore;
mod lenient;
mod lines;
mod model;
mod validate;

pub use datastore::{Datastore, DatastoreKind, DatastoreOpts, FileOpts, MediaKind, S3Opts};
pub use model::*;
pub use validate::Problem;

use std::path::Path;

/// Why a config file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{source_name}: {message}")]
    Parse {
        source_name: String,
        message: String,
    },
    #[error("{path} is not valid: {}", join(problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

fn join(problems: &[Problem]) -> String {
    let problems: Vec<String> = problems.iter().map(ToString::to_string).collect();
    problems.join("; ")
}

/// A loaded config and the keys it had that this model does not know (reported, never silently
/// dropped).
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub unknown_keys: Vec<UnknownKey>,
}

/// A key the model does not know: its dotted path, and the line it is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownKey {
    pub path: String,
    pub line: Option<usize>,
}

impl std::fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(line) => write!(f, "`{}` (line {line})", self.path),
            None => write!(f, "`{}`", self.path),
        }
    }
}

impl Config {
    /// Parses YAML text. `source_name` (usually the file path) prefixes every error message.
    pub fn from_yaml(text: &str, source_name: &str) -> Result<Loaded, Error> {
        let mut unknown_keys = Vec::new();
        let de = serde_norway::Deserializer::from_str(text);
        let mut note_unknown = |path: serde_ignored::Path<'_>| unknown_keys.push(path.to_string());
        let ignoring = serde_ignored::Deserializer::new(de, &mut note_unknown);
        let config: Config = serde_path_to_error::deserialize(ignoring).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = if path.is_empty() || path == "." {
                inner.to_string()
            } else {
                format!("at `{path}`: {inner}")
            };
            Error::Parse {
                source_name: source_name.to_owned(),
                message,
            }
        })?;
        let unknown_keys = if unknown_keys.is_empty() {
            Vec::new()
        } else {
            let lines = lines::key_lines(text);
            unknown_keys
                .into_iter()
                .map(|path| {
                    // `serde_ignored` marks an `Option`'s content with a `?` segment.
                    let plain: Vec<&str> = path.split('.').filter(|s| *s != "?").collect();
                    let line = lines.get(&plain.join(".")).copied();
                    UnknownKey { path, line }
                })
                .collect()
        };
        Ok(Loaded {
            config,
            unknown_keys,
        })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Loaded, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Reads, parses and validates a config file: what every command that runs on it starts with.
    pub fn load_valid(path: &Path) -> Result<Loaded, Error> {
        let loaded = Self::load(path)?;
        let problems = loaded.config.validate();
        if problems.is_empty() {
            Ok(loaded)
        } else {
            Err(Error::Invalid {
                path: path.display().to_string(),
                problems,
            })
        }
    }

    /// Serializes in matrix-media-repo's key order.
    pub fn to_yaml(&self) -> String {
        // Serializing plain structs, strings and numbers cannot fail.
        serde_norway::to_string(self).unwrap_or_else(|e| unreachable!("config serializes: {e}"))
    }

    /// The homeserver entry serving `server_name`, if any.
    pub fn homeserver(&self, server_name: &str) -> Option<&Homeserver> {
        self.homeservers.iter().find(|hs| hs.name == server_name)
    }
}
