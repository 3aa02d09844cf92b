//! What a media operation means, with no HTTP types: an upload with its limits and quotas, an
//! asynchronous upload's reservation, a download that waits for a pending upload, and the
//! recurring jobs. `server` maps HTTP onto this; remote fetches, thumbnails and previews plug in
//! here.
//!
//! Every operation takes the config snapshot of its request, so that one request sees one config
//! from start to end, whatever a reload does meanwhile.

pub mod archives;
mod body;
mod counts;
mod download;
mod inflight;
pub mod jobs;
mod previews;
mod quota;
mod remote;
pub mod tasks;
mod thumbnails;
mod upload;

use std::sync::Arc;

pub use counts::Counts;
pub use download::Wait;
pub use previews::{PreviewParams, Setup as PreviewSetup};
pub use remote::{Fetch, Found, Live, load_signers};
pub use thumbnail::Method;
pub use thumbnails::{Thumb, ThumbnailParams, workers as thumbnail_workers};
pub use upload::{Created, Upload};

/// Why a media operation did not happen. `Store` errors keep their own meaning (limits, quotas,
/// pending states, outages); the others are this layer's.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    /// A parameter is malformed; the message says which and why.
    #[error("{0}")]
    InvalidParam(String),
    /// No such media here (the message says what was looked for).
    #[error("{0}")]
    NotFound(String),
    #[error("the content has not been uploaded yet")]
    NotYetUploaded,
    #[error("the media id expired before any content was uploaded")]
    Expired,
    #[error("this media has been quarantined")]
    Quarantined,
    /// The client stopped sending the body for `connections.bodyTimeoutSeconds`.
    #[error("no data received for {0} s")]
    BodyStalled(u64),
    /// Remote media could not be fetched (the message says from where and why).
    #[error("{0}")]
    Remote(String),
    /// Remote media is larger than `downloads.maxBytes`.
    #[error("the remote media is larger than {0} bytes")]
    RemoteTooLarge(u64),
    /// The source cannot be thumbnailed (the message says why and what).
    #[error(transparent)]
    Thumbnail(thumbnail::Error),
    /// The source's format is not one the config thumbnails.
    #[error("{0}")]
    CannotThumbnail(String),
    /// The source is larger than `thumbnails.maxSourceBytes`.
    #[error("the media is larger than thumbnails.maxSourceBytes ({0} bytes)")]
    ThumbnailSourceTooLarge(u64),
    /// URL previews are off (`urlPreviews.enabled`).
    #[error("URL previews are not enabled on this server")]
    PreviewsDisabled,
    /// The URL, or where it leads, is not one previews may reach (the message says why).
    #[error("{0}")]
    PreviewDenied(String),
    /// The page could not be fetched (the message says why).
    #[error("{0}")]
    PreviewFailed(String),
    /// Not now: a shared operation failed for a reason only its message keeps (store errors
    /// are not shared), or the host is busy. Worth trying again.
    #[error("{0}")]
    Unavailable(String),
    /// A fault of this server (the message is for its log).
    #[error("{0}")]
    Internal(String),
}

/// At most this many media wait for their access time to be written (more, and the next are
/// recorded when next served).
const ACCESSES_HELD: usize = 100_000;

impl Service {
    /// Notes that a media was served (its access time, for purges of what nobody uses).
    pub fn accessed(&self, origin: &str, media_id: &str) {
        let mut set = self.accessed.lock().unwrap_or_else(|p| p.into_inner());
        if set.len() < ACCESSES_HELD {
            set.insert((origin.to_owned(), media_id.to_owned()));
        }
    }

    /// Writes the access times noted since the last flush.
    pub async fn flush_accesses(&self) -> Result<u64, Error> {
        let noted: Vec<(String, String)> = {
            let mut set = self.accessed.lock().unwrap_or_else(|p| p.into_inner());
            set.drain().collect()
        };
        if noted.is_empty() {
            return Ok(0);
        }
        let now = store::now_ms();
        let mut written = 0;
        for batch in noted.chunks(5_000) {
            written += self.store.record_access(batch, now).await?;
        }
        Ok(written)
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Store(store::Error::Io(e))
    }
}

impl Error {
    /// Whether trying again later may succeed: the database or a datastore was unreachable.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Store(e) => e.is_unavailable(),
            Error::Unavailable(_) => true,
            _ => false,
        }
    }
}

/// The media operations, over one store.
#[derive(Clone)]
pub struct Service {
    store: store::Store,
    thumbnails: Arc<thumbnails::Thumbnailer>,
    previews: Arc<previews::Previewer>,
    /// `None`: remote media is never fetched (tests of local media only).
    remote: Option<Arc<remote::Remote>>,
    /// Woken when a task was recorded, so the runner starts it at once.
    tasks_wanted: Arc<tokio::sync::Notify>,
    /// Media served since the last flush of access times.
    accessed: Arc<std::sync::Mutex<std::collections::HashSet<(String, String)>>>,
}

impl Service {
    /// A service that never fetches remote media (tests of local media only).
    pub fn new(store: store::Store) -> Service {
        Service {
            store,
            thumbnails: Arc::new(thumbnails::Thumbnailer::new(2)),
            previews: Arc::new(previews::Previewer::new(2)),
            remote: None,
            tasks_wanted: Arc::default(),
            accessed: Arc::default(),
        }
    }

    /// A service that fetches remote media with `client`, signed by `signers` (see
    /// [`load_signers`]), at most `workers` fetches at once (`downloads.numWorkers`), and makes
    /// at most `thumbnail_workers` thumbnails at once ([`thumbnail_workers`]) and at most
    /// `preview_workers` URL previews (`urlPreviews.numWorkers`; previews need
    /// [`Service::configure_previews`]).
    pub fn with_federation(
        store: store::Store,
        client: federation::Client,
        signers: std::collections::HashMap<String, federation::Signer>,
        workers: usize,
        thumbnail_workers: usize,
        preview_workers: usize,
    ) -> Service {
        Service {
            store,
            thumbnails: Arc::new(thumbnails::Thumbnailer::new(thumbnail_workers)),
            previews: Arc::new(previews::Previewer::new(preview_workers)),
            remote: Some(Arc::new(remote::Remote::new(client, signers, workers))),
            tasks_wanted: Arc::default(),
            accessed: Arc::default(),
        }
    }

    /// A reloaded config's signers; every remote server gets a fresh chance.
    pub fn reconfigure(&self, signers: std::collections::HashMap<String, federation::Signer>) {
        if let Some(r) = &self.remote {
            r.reconfigure(signers);
        }
    }

    /// Remote media fetched over federation since start, by origin.
    pub fn remote_downloads(&self) -> Vec<(Vec<String>, u64)> {
        self.remote
            .as_ref()
            .map(|r| r.downloaded.snapshot())
            .unwrap_or_default()
    }

    /// `server` sent a request we verified: it is up, whatever its backoff said.
    pub fn server_is_up(&self, server: &str) {
        if let Some(r) = &self.remote {
            r.server_is_up(&self.store, server);
        }
    }

    pub fn store(&self) -> &store::Store {
        &self.store
    }
}
