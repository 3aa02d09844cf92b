//! Matrix signing keys for the media repo.
//!
//! - [`KeyFile`]: Synapse's, Dendrite's and matrix-media-repo's key file formats, read with
//!   detection and written in any of them.
//! - [`SigningKey`], [`KeyId`]: an ed25519 key and its `ed25519:<version>` id.
//! - [`sign_request`], [`sign_json`], [`verify_json`], [`canonical_json`]: X-Matrix request
//!   signing and signed JSON, for the media repo's outbound federation requests.
//! - [`manage`]: what `mmrctl keys` does to files: generate, convert, merge into the homeserver's
//!   key file (with a backup, crash-safe, idempotent), revoke.
//!
//! See `docs/keys.md` for the design.

mod format;
mod fsio;
mod json;
mod key;
pub mod manage;
mod xmatrix;

use std::path::PathBuf;

pub use format::{KeyFile, KeyFormat, ParseError, Problem};
pub use fsio::{Checkpoint, Step, backup_path, temp_path};
pub use json::{
    CanonicalJsonError, SignatureError, canonical_json, sign_json, signature, verify_json,
};
pub use key::{ALGORITHM, KeyId, KeyIdError, SigningKey};
pub use manage::Homeserver;
pub use xmatrix::{request_json, sign_request};

/// Why a key operation failed. Nothing was written unless the error says so ([`Error::Stopped`]
/// and [`Error::Io`] during a write leave the files as a crash at that point would: a rerun
/// converges).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Parse(#[from] ParseError),

    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: no such file. {hint}", path.display())]
    Missing { path: PathBuf, hint: String },

    #[error(
        "{} is {}, but {homeserver} reads {}",
        path.display(),
        found.describe(),
        homeserver.key_format().describe()
    )]
    WrongFormat {
        path: PathBuf,
        found: KeyFormat,
        homeserver: Homeserver,
    },

    #[error(
        "{} holds {count} keys; a media repo key file holds exactly one (the key the media repo \
         signs with)",
        path.display()
    )]
    NotOneKey { path: PathBuf, count: usize },

    #[error(
        "{}:{line}: a different key under the same key id {id} as the media repo key in {}: \
         one id must name one key. Generate a new media repo key (`mmrctl keys generate`) or \
         remove the other one (`mmrctl keys revoke`)",
        path.display(),
        media_repo_key.display()
    )]
    SameIdDifferentKey {
        path: PathBuf,
        line: usize,
        id: KeyId,
        media_repo_key: PathBuf,
    },

    #[error(
        "{} already holds {} besides the homeserver's own key {homeserver_key_id}, and the media \
         repo key {} is {media_key_id}, another key: most likely an earlier media repo key (its key \
         file was generated again). A third key is not added. Either remove the old key first \
         with `mmrctl keys revoke --key-id {}` (it prints the config that keeps its old \
         signatures verifiable), or replace it in one go: `mmrctl keys merge ... \
         --replace-key-id {}`",
        path.display(),
        list(others),
        media_repo_key.display(),
        others[0],
        others[0]
    )]
    OtherKeys {
        path: PathBuf,
        homeserver_key_id: KeyId,
        others: Vec<KeyId>,
        media_key_id: KeyId,
        media_repo_key: PathBuf,
    },

    #[error(
        "{}:{line}: {id} is the homeserver's own key (the first, which signs its events and \
         requests); it is never removed or replaced here",
        path.display()
    )]
    FirstKey {
        path: PathBuf,
        line: usize,
        id: KeyId,
    },

    #[error("{}: no key {id} (the file holds {})", path.display(), list(present))]
    KeyNotFound {
        path: PathBuf,
        id: KeyId,
        present: Vec<KeyId>,
    },

    #[error("{} already exists: not overwriting it (`--force` replaces it)", path.display())]
    Exists { path: PathBuf },

    #[error("{0}")]
    Usage(String),

    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),

    #[error("stopped at a checkpoint: {0:?}")]
    Stopped(Step),
}

fn list(ids: &[KeyId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
