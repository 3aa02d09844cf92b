//! The upload pipeline, shared by every writer (client upload, async upload, import, later remote
//! fetch, thumbnails, transfers):
//!
//! 1. stream the body to a temp file in the target datastore while hashing and counting, enforcing the
//!    size limit as bytes arrive, on a blocking thread fed through a bounded channel;
//! 2. fsync, then place it at its content-addressed location (skipped when the object exists);
//! 3. under a per-hash advisory lock: insert the object row (`ON CONFLICT DO NOTHING`), make sure a new
//!    object really is in place, and insert (or complete) the media row, all in one transaction.

use std::io::Write as _;
use std::path::PathBuf;

use bytes::Bytes;
use config::MediaKind;
use futures_util::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use crate::{Error, Media, ObjectRef, Store, ids, now_ms};

/// Chunks buffered between the network and the writer thread: the upload's whole memory footprint.
const CHANNEL_CHUNKS: usize = 8;

#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// 0 means no limit.
    pub max_bytes: u64,
    pub min_bytes: u64,
}

/// The media row an upload creates.
#[derive(Debug, Clone)]
pub struct NewMedia {
    pub origin: String,
    pub kind: MediaKind,
    pub content_type: String,
    pub upload_name: Option<String>,
    pub user_id: String,
    pub requires_auth: bool,
    pub quarantined: bool,
    /// `None` keeps "now".
    pub created_ts: Option<i64>,
}

/// Which media row the content goes to.
#[derive(Debug, Clone)]
pub enum Target {
    /// A new row with a freshly generated id.
    NewId,
    /// A new row with this id (imports, remote media).
    Id(String),
    /// The pending MSC2246 row with this id.
    Pending(String),
}

/// The outcome of an upload.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub media: Media,
    /// The content was already stored: no new object was written.
    pub deduplicated: bool,
    pub size: u64,
}

struct Written {
    temp: tempfile::TempPath,
    sha256: String,
    size: u64,
}

impl Store {
    /// Streams `body` into the store and records it. Nothing is left behind on failure: the temp file
    /// is removed, no row is written, and an object placed for it is removed unless a row uses it.
    pub async fn upload<S, E>(
        &self,
        new: NewMedia,
        target: Target,
        body: S,
        limits: Limits,
    ) -> Result<Uploaded, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let ds = self
            .datastores
            .for_kind(new.kind)
            .ok_or(Error::NoDatastore(new.kind))?;
        let written = write_temp(ds.temp_dir().to_path_buf(), body, limits).await?;
        if written.size < limits.min_bytes {
            return Err(Error::TooSmall {
                min: limits.min_bytes,
            });
        }

        // The common dedup case: the object exists, nothing to place.
        let existing = self.object(&written.sha256).await?;
        let placed = match existing {
            Some(_) => None,
            None => Some(ds.place(&written.temp, &written.sha256).await?),
        };

        let result = self
            .record(&new, &target, &written, ds.id(), placed.as_deref())
            .await;
        if result.is_err()
            && let Some(location) = &placed
        {
            self.remove_if_unreferenced(ds.id(), &written.sha256, location)
                .await;
        }
        result.map(|media| Uploaded {
            media,
            deduplicated: existing.is_some(),
            size: written.size,
        })
    }

    async fn object(&self, sha256: &str) -> Result<Option<ObjectRef>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT size_bytes, datastore_id, location FROM objects WHERE sha256 = $1",
                &[&sha256],
            )
            .await?;
        Ok(row.map(|r| ObjectRef {
            sha256: sha256.to_owned(),
            size: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
            datastore_id: r.get(1),
            location: r.get(2),
        }))
    }

    async fn record(
        &self,
        new: &NewMedia,
        target: &Target,
        written: &Written,
        ds_id: &str,
        placed: Option<&str>,
    ) -> Result<Media, Error> {
        let ds = self
            .datastores
            .get(ds_id)
            .ok_or_else(|| Error::UnknownDatastore(ds_id.to_owned()))?;
        let size = i64::try_from(written.size).map_err(|_| Error::TooLarge {
            max: i64::MAX as u64,
        })?;
        let now = now_ms();
        let created = new.created_ts.unwrap_or(now);
        let mut client = self.client().await?;
        for _attempt in 0..3 {
            let tx = client.transaction().await?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                &[&written.sha256],
            )
            .await?;
            let location =
                placed.map_or_else(|| ds.location_for(&written.sha256), ToOwned::to_owned);
            let inserted = tx
                .execute(
                    "INSERT INTO objects (sha256, size_bytes, datastore_id, location, created_ts)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sha256) DO NOTHING",
                    &[&written.sha256, &size, &ds_id, &location, &now],
                )
                .await?;
            let object = if inserted == 1 {
                // A purge of the previous object with this hash may have removed the file we linked
                // before it committed; under the lock, what is there now stays there.
                if placed.is_none() || !ds.exists(&location).await? {
                    ds.place(&written.temp, &written.sha256).await?;
                }
                ObjectRef {
                    sha256: written.sha256.clone(),
                    size: written.size,
                    datastore_id: ds_id.to_owned(),
                    location,
                }
            } else {
                let row = tx
                    .query_one(
                        "SELECT size_bytes, datastore_id, location FROM objects WHERE sha256 = $1",
                        &[&written.sha256],
                    )
                    .await?;
                ObjectRef {
                    sha256: written.sha256.clone(),
                    size: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
                    datastore_id: row.get(1),
                    location: row.get(2),
                }
            };

            let media_id = match target {
                Target::NewId => {
                    ids::new_media_id().map_err(|e| Error::Io(std::io::Error::other(e)))?
                }
                Target::Id(id) | Target::Pending(id) => id.clone(),
            };
            let kind = crate::kind_str(new.kind);
            let rows = match target {
                Target::NewId | Target::Id(_) => {
                    tx.execute(
                        "INSERT INTO media (origin, media_id, kind, sha256, content_type, upload_name, user_id,
                                            created_ts, quarantined, requires_auth)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
                        &[
                            &new.origin,
                            &media_id,
                            &kind,
                            &written.sha256,
                            &new.content_type,
                            &new.upload_name,
                            &new.user_id,
                            &created,
                            &new.quarantined,
                            &new.requires_auth,
                        ],
                    )
                    .await?
                }
                Target::Pending(_) => {
                    tx.execute(
                        "UPDATE media SET sha256 = $3, content_type = $4, upload_name = $5, expires_ts = NULL
                         WHERE origin = $1 AND media_id = $2 AND sha256 IS NULL AND user_id = $6
                           AND expires_ts > $7",
                        &[
                            &new.origin,
                            &media_id,
                            &written.sha256,
                            &new.content_type,
                            &new.upload_name,
                            &new.user_id,
                            &now,
                        ],
                    )
                    .await?
                }
            };
            if rows == 0 {
                drop(tx);
                match target {
                    // A generated id collided: draw another.
                    Target::NewId => continue,
                    Target::Id(_) => return Err(Error::MediaIdTaken),
                    Target::Pending(id) => {
                        return Err(match self.media(&new.origin, id).await? {
                            None => Error::PendingNotFound,
                            Some(m) => crate::pending_state(&m, &new.user_id)
                                .err()
                                .unwrap_or(Error::CannotOverwrite),
                        });
                    }
                }
            }
            if matches!(target, Target::Pending(_)) {
                let key = format!("{}/{}", new.origin, media_id);
                tx.execute("SELECT pg_notify($1, $2)", &[&crate::NOTIFY_CHANNEL, &key])
                    .await?;
            }
            tx.commit().await?;
            return Ok(Media {
                origin: new.origin.clone(),
                media_id,
                kind: new.kind,
                content_type: new.content_type.clone(),
                upload_name: new.upload_name.clone(),
                user_id: new.user_id.clone(),
                created_ts: created,
                quarantined: new.quarantined,
                requires_auth: new.requires_auth,
                expires_ts: None,
                object: Some(object),
            });
        }
        Err(Error::MediaIdTaken)
    }

    /// Removes an object file this upload placed, unless a row now references that content.
    async fn remove_if_unreferenced(&self, ds_id: &str, sha256: &str, location: &str) {
        let result: Result<(), Error> = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&sha256]).await?;
            let referenced = tx
                .query_opt(
                    "SELECT 1 FROM objects WHERE sha256 = $1 AND datastore_id = $2 AND location = $3",
                    &[&sha256, &ds_id, &location],
                )
                .await?
                .is_some();
            if !referenced
                && let Some(ds) = self.datastores.get(ds_id) {
                    ds.delete(location).await?;
                }
            tx.commit().await?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, sha256, "could not remove an unused object; the consistency check will find it");
        }
    }
}

/// Streams the body to a temp file in `dir`: the network side stays on the async runtime, hashing and
/// writing run on a blocking thread, and the channel between them bounds memory.
async fn write_temp<S, E>(dir: PathBuf, body: S, limits: Limits) -> Result<Written, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let (tx, mut rx) = mpsc::channel::<Bytes>(CHANNEL_CHUNKS);
    let writer = tokio::task::spawn_blocking(move || -> Result<Written, Error> {
        let file = tempfile::Builder::new()
            .prefix("upload-")
            .tempfile_in(&dir)?;
        let (file, temp) = file.into_parts();
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = rx.blocking_recv() {
            hasher.update(&chunk);
            out.write_all(&chunk)?;
            size += chunk.len() as u64;
        }
        let file = out.into_inner().map_err(|e| Error::Io(e.into_error()))?;
        file.sync_all()?;
        Ok(Written {
            temp,
            sha256: hex::encode(hasher.finalize()),
            size,
        })
    });

    let mut received = 0u64;
    let mut body = std::pin::pin!(body);
    let streamed: Result<(), Error> = async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| Error::Aborted(e.to_string()))?;
            received += chunk.len() as u64;
            if limits.max_bytes > 0 && received > limits.max_bytes {
                return Err(Error::TooLarge {
                    max: limits.max_bytes,
                });
            }
            if tx.send(chunk).await.is_err() {
                // The writer failed; its error is reported below.
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))?;
    // On a streaming error the temp file is dropped (deleted) here.
    streamed?;
    written
}
