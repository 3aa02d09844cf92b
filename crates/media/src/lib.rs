//! What a media operation means, with no HTTP types: an upload with its limits and quotas, an
//! asynchronous upload's reservation, a download that waits for a pending upload, and the
//! recurring jobs. `server` maps HTTP onto this; remote fetches, thumbnails and previews plug in
//! here.
//!
//! Every operation takes the config snapshot of its request, so that one request sees one config
//! from start to end, whatever a reload does meanwhile.

mod body;
mod download;
pub mod jobs;
mod quota;
mod upload;

pub use download::Wait;
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
}

/// The media operations, over one store.
#[derive(Clone)]
pub struct Service {
    store: store::Store,
}

impl Service {
    pub fn new(store: store::Store) -> Service {
        Service { store }
    }

    pub fn store(&self) -> &store::Store {
        &self.store
    }
}
