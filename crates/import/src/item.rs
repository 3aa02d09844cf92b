//! One item: check it if the store has it, else stream its file (or fetch it) into the store.

use std::path::PathBuf;
use std::pin::Pin;

use bytes::Bytes;
use config::MediaKind;
use futures_util::{Stream, StreamExt as _};
use store::objects::{CheckDepth, ObjectCheck};
use store::{Limits, NewMedia, Store, Target};
use tokio_util::io::ReaderStream;

use crate::{Fetch, Mode};

/// One media row of the homeserver.
#[derive(Debug, Clone)]
pub(crate) struct Item {
    pub(crate) origin: String,
    pub(crate) media_id: String,
    pub(crate) kind: MediaKind,
    pub(crate) content_type: String,
    pub(crate) upload_name: Option<String>,
    pub(crate) user_id: String,
    pub(crate) created_ts: Option<i64>,
    pub(crate) quarantined: bool,
    pub(crate) requires_auth: bool,
    /// What the homeserver's row says.
    pub(crate) size: u64,
    /// Hex, when the homeserver recorded it.
    pub(crate) sha256: Option<String>,
    /// Where the file should be; `None` without a media directory (fetch only).
    pub(crate) path: Option<PathBuf>,
    /// The id and origin can be served as an mxc URI.
    pub(crate) valid: bool,
    /// The store has a row with this id.
    pub(crate) present: bool,
}

impl Item {
    pub(crate) fn mxc(&self) -> String {
        format!("mxc://{}/{}", self.origin, self.media_id)
    }
}

/// Why an item failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("file missing: {path} (and no access token to fetch it from the homeserver)")]
    FileMissing { path: String },
    #[error("file missing: {path}; fetching it from the homeserver failed: {error}")]
    FetchFailed { path: String, error: String },
    #[error("size mismatch: the database says {expected} bytes, {what} has {actual}")]
    SizeMismatch {
        expected: u64,
        actual: String,
        what: String,
    },
    #[error("SHA-256 mismatch: the database says {expected}, {what} hashes to {actual}")]
    HashMismatch {
        expected: String,
        actual: String,
        what: String,
    },
    #[error("unreadable: {what}: {error}")]
    Unreadable { what: String, error: String },
    #[error("the media id or origin is not valid in an mxc URI; not importable")]
    InvalidId,
    #[error("not in the media repo")]
    NotImported,
    #[error("in the media repo, but {0}")]
    Differs(String),
    #[error("the media repo's store failed: {0}")]
    Store(String),
    #[error(
        "its content is quarantined in the media repo (other media with the same bytes is); \
         it is imported once the quarantine is lifted"
    )]
    ContentQuarantined,
}

/// How an item went.
#[derive(Debug)]
pub(crate) enum Outcome {
    Imported {
        bytes: u64,
        deduplicated: bool,
        fetched: bool,
    },
    /// Already in the store, and checked.
    Already {
        quarantine_updated: bool,
    },
    WouldImport {
        bytes: u64,
    },
    Failed(Reason),
}

/// Fetches files from the homeserver's authenticated download endpoint.
pub(crate) struct Fetcher {
    client: outbound::Client,
    base_url: String,
    auth: String,
}

impl Fetcher {
    pub(crate) fn new(fetch: &Fetch) -> Result<Fetcher, outbound::Error> {
        Ok(Fetcher {
            client: outbound::Client::new(
                concat!("mmrctl-import/", env!("CARGO_PKG_VERSION")),
                None,
            )?,
            base_url: fetch.base_url.trim_end_matches('/').to_owned(),
            auth: format!("Bearer {}", fetch.access_token),
        })
    }

    fn url(&self, item: &Item) -> String {
        // Origin and id are checked (`Item::valid`): nothing in them needs escaping in a path.
        let mut url = format!(
            "{}/_matrix/client/v1/media/download/{}/{}?allow_redirect=false",
            self.base_url, item.origin, item.media_id
        );
        if item.quarantined {
            url.push_str("&admin_unsafely_bypass_quarantine=true");
        }
        url
    }

    async fn get(&self, item: &Item) -> Result<outbound::Response, String> {
        let url = self.url(item);
        let response = self
            .client
            .send(
                outbound::Method::GET,
                &url,
                outbound::Purpose::import(item.size),
                |r| r.header(outbound::header::AUTHORIZATION, &self.auth),
            )
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        if !status.is_success() {
            let body: String = response.snippet(4096).await.chars().take(200).collect();
            return Err(format!("{url}: HTTP {status}: {}", body.trim()));
        }
        Ok(response)
    }
}

type Body = Pin<Box<dyn Stream<Item = Result<Bytes, String>> + Send>>;

/// Where an item's bytes come from.
struct Opened {
    body: Body,
    /// The file's path or the URL, for messages.
    source: String,
    fetched: bool,
}

pub(crate) async fn process(
    store: &Store,
    mode: Mode,
    fetcher: Option<&Fetcher>,
    item: &Item,
) -> Outcome {
    if !item.valid {
        return Outcome::Failed(Reason::InvalidId);
    }
    match (mode, item.present) {
        (Mode::Verify, false) => Outcome::Failed(Reason::NotImported),
        (Mode::Verify, true) => check_existing(store, item, CheckDepth::Content, false).await,
        (Mode::DryRun, true) => check_existing(store, item, CheckDepth::Size, false).await,
        (Mode::Import, true) => check_existing(store, item, CheckDepth::Size, true).await,
        (Mode::DryRun, false) => match open(fetcher, item, true).await {
            Ok(_) => Outcome::WouldImport { bytes: item.size },
            Err(reason) => Outcome::Failed(reason),
        },
        (Mode::Import, false) => import(store, fetcher, item).await,
    }
}

/// Opens the item's file, or fetches it when the file is missing. Sizes are compared before any byte
/// is read; `probe_only` (dry runs) does not fetch.
async fn open(fetcher: Option<&Fetcher>, item: &Item, probe_only: bool) -> Result<Opened, Reason> {
    let mut missing = None;
    if let Some(path) = &item.path {
        let shown = path.display().to_string();
        let (p, size) = (path.clone(), item.size);
        // Allocated here rather than on the blocking thread, so buffers come from the runtime
        // threads' few malloc arenas (freed on other threads, blocking-thread arenas would grow).
        let buf = if size <= SMALL_FILE {
            Vec::with_capacity(usize::try_from(size).unwrap_or(0) + 1)
        } else {
            Vec::new()
        };
        let local = tokio::task::spawn_blocking(move || open_local(&p, size, buf))
            .await
            .map_err(|e| Reason::Unreadable {
                what: shown.clone(),
                error: e.to_string(),
            })?;
        let body: Body = match local {
            Local::Small(bytes) => Box::pin(futures_util::stream::iter([Ok(bytes)])),
            Local::File(file) => Box::pin(
                ReaderStream::with_capacity(tokio::fs::File::from_std(file), 64 * 1024)
                    .map(|r| r.map_err(|e| e.to_string())),
            ),
            Local::Missing => {
                missing = Some(shown.clone());
                Box::pin(futures_util::stream::empty())
            }
            Local::WrongSize(len) => {
                return Err(Reason::SizeMismatch {
                    expected: item.size,
                    actual: format!("{len} bytes"),
                    what: shown,
                });
            }
            Local::Failed(error) => return Err(Reason::Unreadable { what: shown, error }),
        };
        if missing.is_none() {
            return Ok(Opened {
                body,
                source: shown,
                fetched: false,
            });
        }
    }
    let shown_missing = missing.unwrap_or_else(|| "(no media directory)".to_owned());
    let Some(fetcher) = fetcher else {
        return Err(Reason::FileMissing {
            path: shown_missing,
        });
    };
    if probe_only {
        return Ok(Opened {
            body: Box::pin(futures_util::stream::empty()),
            source: fetcher.url(item),
            fetched: true,
        });
    }
    let response = fetcher
        .get(item)
        .await
        .map_err(|error| Reason::FetchFailed {
            path: shown_missing.clone(),
            error,
        })?;
    let url = fetcher.url(item);
    if let Some(len) = response.content_length()
        && len != item.size
    {
        return Err(Reason::SizeMismatch {
            expected: item.size,
            actual: format!("{len} bytes"),
            what: url,
        });
    }
    let body = response.stream().map(|r| r.map_err(|e| e.to_string()));
    Ok(Opened {
        body: Box::pin(body),
        source: url,
        fetched: true,
    })
}

/// Files up to this size are read in one go (one trip to the blocking pool instead of several);
/// larger ones stream.
const SMALL_FILE: u64 = 256 * 1024;

/// A local file, opened and sized on a blocking thread.
enum Local {
    Small(Bytes),
    File(std::fs::File),
    Missing,
    WrongSize(u64),
    Failed(String),
}

fn open_local(path: &std::path::Path, expected: u64, mut buf: Vec<u8>) -> Local {
    use std::io::Read as _;
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Local::Missing,
        Err(e) => return Local::Failed(e.to_string()),
    };
    let meta = match file.metadata() {
        Ok(m) => m,
        Err(e) => return Local::Failed(e.to_string()),
    };
    if !meta.is_file() {
        return Local::Failed("not a regular file".to_owned());
    }
    if meta.len() != expected {
        return Local::WrongSize(meta.len());
    }
    if expected > SMALL_FILE {
        return Local::File(file);
    }
    match file.take(SMALL_FILE + 1).read_to_end(&mut buf) {
        Ok(_) => Local::Small(Bytes::from(buf)),
        Err(e) => Local::Failed(e.to_string()),
    }
}

async fn import(store: &Store, fetcher: Option<&Fetcher>, item: &Item) -> Outcome {
    let opened = match open(fetcher, item, false).await {
        Ok(o) => o,
        Err(reason) => return Outcome::Failed(reason),
    };
    let body = opened.body;
    let new = NewMedia {
        origin: item.origin.clone(),
        kind: item.kind,
        content_type: item.content_type.clone(),
        upload_name: item.upload_name.clone(),
        user_id: item.user_id.clone(),
        requires_auth: item.requires_auth,
        quarantined: item.quarantined,
        created_ts: item.created_ts,
    };
    // Exactly the recorded size: a longer body fails as it streams, a shorter one before any row is
    // written. (0 means "no limit" for the maximum: an empty file was already checked by size.)
    let limits = Limits {
        max_bytes: item.size,
        min_bytes: item.size,
        quota: None,
        // The pipeline hashes the body anyway: it compares, too.
        expected_sha256: item
            .sha256
            .as_deref()
            .and_then(|h| <[u8; 32]>::try_from(hex::decode(h).ok()?).ok()),
        read_soon: false,
    };
    match store
        .upload(new, Target::Id(item.media_id.clone()), body, limits)
        .await
    {
        Ok(uploaded) => Outcome::Imported {
            bytes: uploaded.size,
            deduplicated: uploaded.deduplicated,
            fetched: opened.fetched,
        },
        // Imported meanwhile (another run, or a duplicate row): check it like a rerun would.
        Err(store::Error::MediaIdTaken) => {
            check_existing(store, item, CheckDepth::Size, true).await
        }
        Err(store::Error::TooLarge { .. }) => Outcome::Failed(Reason::SizeMismatch {
            expected: item.size,
            actual: "more bytes".to_owned(),
            what: opened.source,
        }),
        Err(store::Error::TooSmall { .. }) => Outcome::Failed(Reason::SizeMismatch {
            expected: item.size,
            actual: "fewer bytes".to_owned(),
            what: opened.source,
        }),
        Err(store::Error::HashMismatch { expected, actual }) => {
            Outcome::Failed(Reason::HashMismatch {
                expected,
                actual,
                what: opened.source,
            })
        }
        Err(store::Error::Aborted(error)) => Outcome::Failed(Reason::Unreadable {
            what: opened.source,
            error,
        }),
        Err(store::Error::ContentQuarantined) => Outcome::Failed(Reason::ContentQuarantined),
        Err(e) => Outcome::Failed(Reason::Store(e.to_string())),
    }
}

/// Compares what the store holds under the item's id with the homeserver's row; `update` carries a
/// quarantine over (never lifts one).
async fn check_existing(store: &Store, item: &Item, depth: CheckDepth, update: bool) -> Outcome {
    let media = match store.media(&item.origin, &item.media_id).await {
        Ok(Some(m)) => m,
        Ok(None) => return Outcome::Failed(Reason::NotImported),
        Err(e) => return Outcome::Failed(Reason::Store(e.to_string())),
    };
    let Some(object) = &media.object else {
        return Outcome::Failed(Reason::Differs(
            "it is a pending upload without content".to_owned(),
        ));
    };
    if object.size != item.size {
        return Outcome::Failed(Reason::Differs(format!(
            "with {} bytes where the homeserver has {}",
            object.size, item.size
        )));
    }
    if let Some(sha256) = &item.sha256
        && *sha256 != object.sha256
    {
        return Outcome::Failed(Reason::Differs(format!(
            "with SHA-256 {} where the homeserver has {sha256}",
            object.sha256
        )));
    }
    match store.check_object(object, depth).await {
        Ok(ObjectCheck::Ok) => {}
        Ok(ObjectCheck::Missing) => {
            return Outcome::Failed(Reason::Differs(format!(
                "its object {} is missing from datastore `{}`",
                object.location, object.datastore_id
            )));
        }
        Ok(ObjectCheck::WrongSize { expected, actual }) => {
            return Outcome::Failed(Reason::Differs(format!(
                "its object {} in datastore `{}` has {actual} bytes instead of {expected}",
                object.location, object.datastore_id
            )));
        }
        Ok(ObjectCheck::WrongHash { actual }) => {
            return Outcome::Failed(Reason::Differs(format!(
                "its object {} in datastore `{}` hashes to {actual}",
                object.location, object.datastore_id
            )));
        }
        Err(e) => return Outcome::Failed(Reason::Store(e.to_string())),
    }
    let mut quarantine_updated = false;
    if item.quarantined && !media.quarantined {
        if !update {
            return Outcome::Failed(Reason::Differs(
                "not quarantined, while the homeserver has it quarantined".to_owned(),
            ));
        }
        match store.quarantine_media(&item.origin, &item.media_id).await {
            Ok(changed) => quarantine_updated = changed,
            Err(e) => return Outcome::Failed(Reason::Store(e.to_string())),
        }
    }
    Outcome::Already { quarantine_updated }
}
