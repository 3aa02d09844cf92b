//! The upload pipeline, shared by every writer (client upload, async upload, import, later remote
//! fetch, thumbnails, transfers):
//!
//! 1. stream the body to a temp file in the target datastore while hashing and counting, enforcing the
//!    size limit as bytes arrive: the receiving task copies chunks into pooled blocks, a worker
//!    thread hashes them, another writes them ([`crate::blockfile`]); without a free block, the
//!    chunks themselves go to the worker, bounded in number;
//! 2. fsync, then place it at its content-addressed location (skipped when the object exists);
//! 3. under a per-hash advisory lock: insert the object row (`ON CONFLICT DO NOTHING`), make sure a new
//!    object really is in place, and insert (or complete) the media row, all in one transaction.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use config::MediaKind;
use futures_util::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit, mpsc};

use crate::blockfile::{BlockWriter, Filled, Filler, PooledBlock};
use crate::{Error, LOCK_HASH, Media, ObjectRef, Store, ids, now_ms};

/// Whether this content is quarantined: some media with it is, or it was when purged (read under
/// the hash lock).
const CONTENT_QUARANTINED: &str =
    "SELECT EXISTS (SELECT 1 FROM media WHERE sha256 = $1 AND quarantined)
         OR EXISTS (SELECT 1 FROM quarantined_content WHERE sha256 = $1)";

pub(crate) const SELECT_OBJECT: &str =
    "SELECT size_bytes, datastore_id, location FROM objects WHERE sha256 = $1";
pub(crate) const INSERT_OBJECT: &str =
    "INSERT INTO objects (sha256, size_bytes, datastore_id, location, created_ts)
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sha256) DO NOTHING RETURNING 1";
const INSERT_MEDIA: &str =
    "INSERT INTO media (origin, media_id, kind, sha256, content_type, upload_name, user_id,
                        created_ts, quarantined, requires_auth)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING";
/// A preview image's media row, unless this origin's previews already have one for the content
/// (`$4`); taken with the hash lock held, so identical images racing make one row.
const INSERT_PREVIEW_IMAGE: &str =
    "INSERT INTO media (origin, media_id, kind, sha256, content_type, upload_name, user_id,
                        created_ts, quarantined, requires_auth)
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10
     WHERE NOT EXISTS (SELECT 1 FROM preview_images WHERE origin = $1 AND sha256 = $4)
     ON CONFLICT DO NOTHING";
const COMPLETE_PENDING: &str =
    "UPDATE media SET sha256 = $3, content_type = $4, upload_name = $5, expires_ts = NULL
     WHERE origin = $1 AND media_id = $2 AND sha256 IS NULL AND user_id = $6 AND expires_ts > $7";

pub(crate) fn object_from_row(sha256: &str, r: &tokio_postgres::Row) -> ObjectRef {
    ObjectRef {
        sha256: sha256.to_owned(),
        size: u64::try_from(r.get::<_, i64>(0)).unwrap_or(0),
        datastore_id: r.get(1),
        location: r.get(2),
    }
}

/// Received bytes (in KiB) waiting for an upload's worker thread: enough to keep it busy while the
/// network delivers the next chunks.
const UPLOAD_KIB_IN_FLIGHT: u32 = 2 * 1024;
/// The worker frees finished chunks once this many bytes of them are done (or it has nothing else
/// to do): half the budget, so that the task receives the next half meanwhile.
const RELEASE_EVERY: usize = UPLOAD_KIB_IN_FLIGHT as usize * 1024 / 2;
/// The same for all uploads at once, so that memory stays bounded whatever their number.
const ALL_KIB_IN_FLIGHT: u32 = 8 * 1024;
static ALL_IN_FLIGHT: Semaphore = Semaphore::const_new(ALL_KIB_IN_FLIGHT as usize);

#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// 0 means no limit.
    pub max_bytes: u64,
    pub min_bytes: u64,
    /// The uploader's quota, checked again when the media row is recorded, under a per-user lock,
    /// so that concurrent uploads cannot all pass a check made before any of them finished.
    pub quota: Option<Quota>,
    /// The SHA-256 the content must have (imports know it): a body that hashes otherwise is
    /// refused before it is placed.
    pub expected_sha256: Option<[u8; 32]>,
    /// The content is read right after it is stored (a thumbnail, served to whoever asked):
    /// written through the page cache, so that serving it does not read it back from disk.
    pub read_soon: bool,
}

/// Per-user limits; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub max_files: u64,
    pub max_bytes: u64,
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
    /// An image a URL preview found: one media row per content per origin, shared by every
    /// preview that shows it (a new row, with a fresh id, only for content not seen yet).
    PreviewImage,
}

/// The outcome of an upload.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub media: Media,
    /// The content was already stored: no new object was written.
    pub deduplicated: bool,
    pub size: u64,
}

pub(crate) struct Written {
    pub(crate) temp: tempfile::TempPath,
    pub(crate) sha256: String,
    pub(crate) size: u64,
}

/// Refuses the upload when recording it would take the user past `quota`. The user's lock (the
/// one `create_pending` takes) is held until the transaction ends, so the count and the insert
/// that follows cannot interleave with another upload of the same user. It is taken before the
/// per-hash lock, in every transaction that takes both.
async fn check_quota(
    tx: &deadpool_postgres::Transaction<'_>,
    user_id: &str,
    quota: Quota,
    size: u64,
) -> Result<(), Error> {
    let (lock, usage) = tokio::try_join!(
        tx.prepare_cached(crate::LOCK_USER),
        tx.prepare_cached(crate::USAGE)
    )?;
    // Pipelined: one round trip; the count runs once the lock is held.
    let now = now_ms();
    let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&user_id];
    let usage_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&user_id, &now];
    let (_, row) = tokio::try_join!(
        tx.execute(&lock, &lock_params),
        tx.query_one(&usage, &usage_params)
    )?;
    let usage = crate::usage_from_row(&row);
    if quota.max_files > 0 && usage.files >= quota.max_files {
        return Err(Error::QuotaFiles(quota.max_files));
    }
    if quota.max_bytes > 0 && usage.bytes.saturating_add(size) > quota.max_bytes {
        return Err(Error::QuotaBytes(quota.max_bytes));
    }
    Ok(())
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
        if let Some(expected) = limits.expected_sha256.map(hex::encode)
            && expected != written.sha256
        {
            return Err(Error::HashMismatch {
                expected,
                actual: written.sha256,
            });
        }

        // The common dedup case: the object exists, nothing to place.
        let existing = self.object(&written.sha256).await?;
        let placed = match existing {
            Some(_) => None,
            None => Some(
                self.place_recorded(ds, &written.temp, &written.sha256)
                    .await?,
            ),
        };

        let result = self
            .record(
                &new,
                &target,
                &written,
                ds.id(),
                placed.as_deref(),
                limits.quota,
            )
            .await;
        if result.is_err()
            && let Some(location) = &placed
        {
            self.remove_if_unreferenced(ds.id(), &written.sha256, location)
                .await;
            self.forget_placement(ds.id(), location).await;
        }
        result.map(|media| Uploaded {
            media,
            deduplicated: existing.is_some(),
            size: written.size,
        })
    }

    pub(crate) async fn object(&self, sha256: &str) -> Result<Option<ObjectRef>, Error> {
        let client = self.client().await?;
        let select = client.prepare_cached(SELECT_OBJECT).await?;
        let row = client.query_opt(&select, &[&sha256]).await?;
        Ok(row.map(|r| object_from_row(sha256, &r)))
    }

    /// Records the object and the media row in one transaction, under the per-hash lock. The
    /// statements are pipelined: one round trip between `BEGIN` and `COMMIT`.
    async fn record(
        &self,
        new: &NewMedia,
        target: &Target,
        written: &Written,
        ds_id: &str,
        placed: Option<&str>,
        quota: Option<Quota>,
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
        // `all` names no kind of media; a row records what it is.
        let kind = match new.kind {
            MediaKind::All => MediaKind::LocalMedia,
            k => k,
        }
        .as_str();
        let location = placed.map_or_else(|| ds.location_for(&written.sha256), ToOwned::to_owned);
        let sha256 = written.sha256.as_str();
        let mut client = self.client().await?;
        let insert_sql = match target {
            Target::PreviewImage => INSERT_PREVIEW_IMAGE,
            _ => INSERT_MEDIA,
        };
        let (
            lock,
            quarantine,
            insert_object,
            select_object,
            insert_media,
            complete_pending,
            notify,
            forget_placement,
        ) = tokio::try_join!(
            client.prepare_cached(LOCK_HASH),
            client.prepare_cached(CONTENT_QUARANTINED),
            client.prepare_cached(INSERT_OBJECT),
            client.prepare_cached(SELECT_OBJECT),
            client.prepare_cached(insert_sql),
            client.prepare_cached(COMPLETE_PENDING),
            client.prepare_cached("SELECT pg_notify($1, $2)"),
            client.prepare_cached(crate::objects::FORGET_PLACEMENT),
        )?;
        for _attempt in 0..3 {
            let media_id = match target {
                Target::NewId | Target::PreviewImage => {
                    ids::new_media_id().map_err(|e| Error::Io(std::io::Error::other(e)))?
                }
                Target::Id(id) | Target::Pending(id) => id.clone(),
            };
            let tx = client.transaction().await?;
            if let Some(quota) = quota.filter(|q| q.max_files > 0 || q.max_bytes > 0) {
                check_quota(&tx, &new.user_id, quota, written.size).await?;
            }
            let media_rows = async {
                match target {
                    Target::NewId | Target::Id(_) | Target::PreviewImage => {
                        tx.execute(
                            &insert_media,
                            &[
                                &new.origin,
                                &media_id,
                                &kind,
                                &sha256,
                                &new.content_type,
                                &new.upload_name,
                                &new.user_id,
                                &created,
                                &new.quarantined,
                                &new.requires_auth,
                            ],
                        )
                        .await
                    }
                    Target::Pending(_) => {
                        tx.execute(
                            &complete_pending,
                            &[
                                &new.origin,
                                &media_id,
                                &sha256,
                                &new.content_type,
                                &new.upload_name,
                                &new.user_id,
                                &now,
                            ],
                        )
                        .await
                    }
                }
            };
            // In order on the server: lock, object row (new or existing), then the media row that
            // references it.
            let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&sha256];
            let object_params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&sha256, &size, &ds_id, &location, &now];
            // The placement's record goes with the object row that now references the file.
            let forget = async {
                match placed {
                    Some(_) => tx.execute(&forget_placement, &[&ds_id, &location]).await,
                    None => Ok(0),
                }
            };
            let (_, quarantined, inserted, object_row, media_rows, _) = tokio::try_join!(
                tx.query_one(&lock, &lock_params),
                tx.query_one(&quarantine, &lock_params),
                tx.query_opt(&insert_object, &object_params),
                tx.query_one(&select_object, &lock_params),
                media_rows,
                forget,
            )?;
            // An import may bring quarantined media over as quarantined; nothing else stores
            // quarantined content (the transaction is rolled back).
            if quarantined.get::<_, bool>(0) && !new.quarantined {
                return Err(Error::ContentQuarantined);
            }
            let object = object_from_row(sha256, &object_row);
            if inserted.is_some() {
                // A purge of the previous object with this hash may have removed the file we linked
                // before it committed; under the lock, what is there now stays there.
                if placed.is_none() || !ds.exists(&location).await? {
                    ds.place(&written.temp, sha256).await?;
                }
            }
            if let Target::PreviewImage = target {
                return self
                    .preview_image(tx, new, sha256, &media_id, media_rows == 0)
                    .await;
            }
            if media_rows == 0 {
                drop(tx);
                match target {
                    // A generated id collided: draw another.
                    Target::NewId | Target::PreviewImage => continue,
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
                tx.query_one(&notify, &[&crate::NOTIFY_CHANNEL, &key])
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
    pub(crate) async fn remove_if_unreferenced(&self, ds_id: &str, sha256: &str, location: &str) {
        let Some(ds) = self.datastores.get(ds_id) else {
            return;
        };
        if let Err(e) = self.delete_unreferenced(ds, sha256, location).await {
            tracing::warn!(error = %e, sha256, "could not remove an unused object; the consistency check will find it");
        }
    }
}

/// Streams the body to a temp file in `dir`, receiving, hashing and writing overlapping: in pooled
/// blocks when the pool has one ([`write_temp_filled`]), else chunk by chunk through the page cache
/// ([`write_temp_chunks`]). Either way the memory in flight is bounded per upload and for all
/// uploads at once.
pub(crate) async fn write_temp<S, E>(
    dir: PathBuf,
    body: S,
    limits: Limits,
) -> Result<Written, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let filler = if limits.read_soon {
        None
    } else {
        Filler::start()
    };
    match filler {
        Some((filler, returns)) => write_temp_filled(dir, body, limits, filler, returns).await,
        None => write_temp_chunks(dir, body, limits).await,
    }
}

/// Checks a received chunk against the size limit.
fn receive<E: std::fmt::Display>(
    bytes: Result<Bytes, E>,
    received: &mut u64,
    limits: Limits,
) -> Result<Bytes, Error> {
    let bytes = bytes.map_err(|e| Error::Aborted(e.to_string()))?;
    *received += bytes.len() as u64;
    if limits.max_bytes > 0 && *received > limits.max_bytes {
        return Err(Error::TooLarge {
            max: limits.max_bytes,
        });
    }
    Ok(bytes)
}

/// [`write_temp`] with blocks from the pool: this task copies each chunk into a block as it arrives
/// (and frees it), a blocking thread hashes full blocks and hands them to the [`BlockWriter`]; the
/// blocks in flight bound the memory.
async fn write_temp_filled<S, E>(
    dir: PathBuf,
    body: S,
    limits: Limits,
    mut filler: Filler,
    returns: UnboundedSender<PooledBlock>,
) -> Result<Written, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Filled>();
    let worker = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let (file, temp) = temp_file(&dir)?;
        let mut hasher = Sha256::new();
        let mut out = BlockWriter::for_filled(file, returns);
        let mut tail = None;
        while let Some(filled) = rx.blocking_recv() {
            hasher.update(filled.bytes());
            match filled.into_full() {
                Ok(full) => out.append_filled(full)?,
                Err(last) => {
                    tail = Some(last);
                    break;
                }
            }
        }
        // Acknowledged only once durable.
        out.finish(tail)?;
        Ok((temp, hex::encode(hasher.finalize())))
    });

    let mut received = 0u64;
    let mut body = std::pin::pin!(body);
    let streamed: Result<(), Error> = async {
        'body: while let Some(bytes) = body.next().await {
            let bytes = receive(bytes, &mut received, limits)?;
            let mut data = &bytes[..];
            while !data.is_empty() {
                if let Some(full) = filler.fill(&mut data) {
                    // On failure the worker has stopped; its error is reported below.
                    if tx.send(full).is_err() || !filler.next_block().await {
                        break 'body;
                    }
                }
            }
        }
        if let Some(tail) = filler.tail() {
            let _ = tx.send(tail);
        }
        Ok(())
    }
    .await;
    drop(tx);
    finish_temp(worker.await, streamed, received)
}

fn temp_file(dir: &std::path::Path) -> Result<(std::fs::File, tempfile::TempPath), Error> {
    Ok(tempfile::Builder::new()
        .prefix(crate::jobs::UPLOAD_PREFIX)
        .tempfile_in(dir)?
        .into_parts())
}

/// The outcome of a temp file's worker and of receiving its body.
fn finish_temp(
    worker: Result<Result<(tempfile::TempPath, String), Error>, tokio::task::JoinError>,
    streamed: Result<(), Error>,
    received: u64,
) -> Result<Written, Error> {
    let written = worker.map_err(|e| Error::Io(std::io::Error::other(e)))?;
    // On a streaming error the temp file is dropped (deleted) here.
    streamed?;
    let (temp, sha256) = written?;
    Ok(Written {
        temp,
        sha256,
        size: received,
    })
}

/// [`write_temp`] when the pool has no block: the chunks go as they are to a thread that hashes them
/// and writes them through the page cache, bounded in number.
async fn write_temp_chunks<S, E>(dir: PathBuf, body: S, limits: Limits) -> Result<Written, Error>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Chunk>();
    let worker = tokio::task::spawn_blocking(move || -> Result<_, Error> {
        let (file, temp) = temp_file(&dir)?;
        let mut hasher = Sha256::new();
        let mut out = BlockWriter::buffered(file);
        // Chunks done with, freed (and their permits returned) together: waking the receiving task
        // for each one would cost this thread a context switch per chunk.
        let mut done = Vec::new();
        let mut done_bytes = 0;
        loop {
            let chunk = match rx.try_recv() {
                Ok(chunk) => chunk,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    // Waiting anyway: let the receiving task go on.
                    done.clear();
                    done_bytes = 0;
                    match rx.blocking_recv() {
                        Some(chunk) => chunk,
                        None => break,
                    }
                }
            };
            for piece in chunk.bytes.chunks(PIECE) {
                hasher.update(piece);
                out.write(piece)?;
            }
            done_bytes += chunk.bytes.len();
            done.push(chunk);
            if done_bytes >= RELEASE_EVERY {
                done.clear();
                done_bytes = 0;
            }
        }
        // Acknowledged only once durable.
        out.finish(None)?;
        Ok((temp, hex::encode(hasher.finalize())))
    });

    let in_flight = Arc::new(Semaphore::new(UPLOAD_KIB_IN_FLIGHT as usize));
    let mut received = 0u64;
    let mut body = std::pin::pin!(body);
    let streamed: Result<(), Error> = async {
        while let Some(bytes) = body.next().await {
            let bytes = receive(bytes, &mut received, limits)?;
            // A chunk larger than a budget takes all of it. The semaphores are never closed: no
            // error.
            let kib = u32::try_from(bytes.len().div_ceil(1024)).unwrap_or(u32::MAX);
            let closed = |e| Error::Io(std::io::Error::other(e));
            let upload_permit = in_flight
                .clone()
                .acquire_many_owned(kib.min(UPLOAD_KIB_IN_FLIGHT))
                .await
                .map_err(closed)?;
            let all_permit = ALL_IN_FLIGHT
                .acquire_many(kib.min(ALL_KIB_IN_FLIGHT))
                .await
                .map_err(closed)?;
            let chunk = Chunk {
                bytes,
                _permits: (upload_permit, all_permit),
            };
            if tx.send(chunk).is_err() {
                // The worker failed; its error is reported below.
                break;
            }
        }
        Ok(())
    }
    .await;
    drop(tx);
    finish_temp(worker.await, streamed, received)
}

/// Hashing and copying go piece by piece: a piece just hashed is still in the cache when copied.
const PIECE: usize = 64 * 1024;

/// A received chunk; its permits return when the worker is done with it.
struct Chunk {
    bytes: Bytes,
    _permits: (OwnedSemaphorePermit, SemaphorePermit<'static>),
}
