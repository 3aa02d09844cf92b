//! Thumbnail rows: one per (media, box, method, animated), each pointing at an object like a media
//! row does (never a media row of its own: MMR #648 came from that). A thumbnail equal to other
//! content is that content's object; a source served as its own thumbnail is a row pointing at
//! the source's object, so that the next request needs no decoding to learn it.

use bytes::Bytes;
use config::MediaKind;

use crate::pipeline::{INSERT_OBJECT, SELECT_OBJECT, object_from_row, write_temp};
use crate::{Error, LOCK_HASH, Limits, ObjectRef, Store, now_ms};

/// Which thumbnail: the box it was asked for (after bucketing), not its output size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ThumbnailKey {
    pub origin: String,
    pub media_id: String,
    pub width: u32,
    pub height: u32,
    pub method: &'static str,
    pub animated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredThumbnail {
    pub content_type: String,
    pub object: ObjectRef,
}

const SELECT: &str = "SELECT t.content_type, t.sha256, o.size_bytes, o.datastore_id, o.location
     FROM thumbnails t JOIN objects o ON o.sha256 = t.sha256
     WHERE t.origin = $1 AND t.media_id = $2 AND t.width = $3 AND t.height = $4
       AND t.method = $5 AND t.animated = $6";
const INSERT: &str = "INSERT INTO thumbnails
         (origin, media_id, width, height, method, animated, content_type, sha256, created_ts)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING";

fn dim(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

/// The row for `key`, pointing at `sha256`, unless one exists (another instance's wins).
async fn insert_row(
    tx: &deadpool_postgres::Transaction<'_>,
    key: &ThumbnailKey,
    content_type: &str,
    sha256: &str,
    created_ts: i64,
) -> Result<u64, Error> {
    Ok(tx
        .execute(
            INSERT,
            &[
                &key.origin,
                &key.media_id,
                &dim(key.width),
                &dim(key.height),
                &key.method,
                &key.animated,
                &content_type,
                &sha256,
                &created_ts,
            ],
        )
        .await?)
}

impl Store {
    pub async fn thumbnail(&self, key: &ThumbnailKey) -> Result<Option<StoredThumbnail>, Error> {
        let client = self.client().await?;
        let select = client.prepare_cached(SELECT).await?;
        let row = client
            .query_opt(
                &select,
                &[
                    &key.origin,
                    &key.media_id,
                    &dim(key.width),
                    &dim(key.height),
                    &key.method,
                    &key.animated,
                ],
            )
            .await?;
        Ok(row.map(|r| {
            let sha256: String = r.get(1);
            StoredThumbnail {
                content_type: r.get(0),
                object: ObjectRef {
                    sha256,
                    size: u64::try_from(r.get::<_, i64>(2)).unwrap_or(0),
                    datastore_id: r.get(3),
                    location: r.get(4),
                },
            }
        }))
    }

    /// Stores a made thumbnail in the `thumbnails` datastore and records its row (another
    /// instance's row for the key, recorded first, stays); returns the content's object.
    pub async fn put_thumbnail(
        &self,
        key: &ThumbnailKey,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<ObjectRef, Error> {
        let ds = self
            .datastores
            .for_kind(MediaKind::Thumbnails)
            .ok_or(Error::NoDatastore(MediaKind::Thumbnails))?;
        let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
        // Served right after it is written: through the page cache.
        let limits = Limits {
            read_soon: true,
            ..Limits::default()
        };
        let written = write_temp(ds.temp_dir().to_path_buf(), body, limits).await?;
        let placed = match self.object(&written.sha256).await? {
            Some(_) => None,
            None => Some(
                self.place_recorded(ds, &written.temp, &written.sha256)
                    .await?,
            ),
        };
        let result = self
            .record_thumbnail(key, content_type, &written, ds.id(), placed.as_deref())
            .await;
        // Removed unless the row now uses it: on failure, and when another writer's object row
        // (in another datastore, say) came first.
        if let Some(location) = &placed {
            let ours = result
                .as_ref()
                .is_ok_and(|o| o.datastore_id == ds.id() && &o.location == location);
            if !ours {
                self.remove_if_unreferenced(ds.id(), &written.sha256, location)
                    .await;
                self.forget_placement(ds.id(), location).await;
            }
        }
        result
    }

    async fn record_thumbnail(
        &self,
        key: &ThumbnailKey,
        content_type: &str,
        written: &crate::pipeline::Written,
        ds_id: &str,
        placed: Option<&str>,
    ) -> Result<ObjectRef, Error> {
        let ds = self
            .datastores
            .get(ds_id)
            .ok_or_else(|| Error::UnknownDatastore(ds_id.to_owned()))?;
        let size = i64::try_from(written.size).unwrap_or(i64::MAX);
        let sha256 = written.sha256.as_str();
        let location = placed.map_or_else(|| ds.location_for(sha256), ToOwned::to_owned);
        let now = now_ms();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.query_one(LOCK_HASH, &[&sha256]).await?;
        let inserted = tx
            .query_opt(INSERT_OBJECT, &[&sha256, &size, &ds_id, &location, &now])
            .await?;
        if inserted.is_some() && (placed.is_none() || !ds.exists(&location).await?) {
            // Under the lock: a purge of an earlier object with this hash may have removed the file.
            ds.place(&written.temp, sha256).await?;
        }
        insert_row(&tx, key, content_type, sha256, now).await?;
        if placed.is_some() {
            tx.execute(crate::objects::FORGET_PLACEMENT, &[&ds_id, &location])
                .await?;
        }
        let object_row = tx.query_one(SELECT_OBJECT, &[&sha256]).await?;
        tx.commit().await?;
        Ok(object_from_row(sha256, &object_row))
    }

    /// Records that `object` (the source's own content) is the thumbnail for `key`.
    pub async fn link_thumbnail(
        &self,
        key: &ThumbnailKey,
        content_type: &str,
        object: &ObjectRef,
    ) -> Result<(), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Under the hash lock, so that the object cannot be purged between the check and the row.
        tx.query_one(LOCK_HASH, &[&object.sha256]).await?;
        insert_row(&tx, key, content_type, &object.sha256, now_ms()).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes thumbnail rows made before `before_ms`, and with them each object no row references
    /// any more: one content at a time, rows and object in one transaction under its hash lock, so
    /// that a run stopped anywhere leaves nothing unreferenced behind. Returns how many rows went.
    pub async fn expire_thumbnails(&self, before_ms: i64) -> Result<u64, Error> {
        const BATCH: i64 = 500;
        let mut total = 0;
        loop {
            let hashes = self
                .contents(
                    "SELECT DISTINCT sha256 FROM thumbnails WHERE created_ts < $1 LIMIT $2",
                    &[&before_ms, &BATCH],
                )
                .await?;
            if hashes.is_empty() {
                return Ok(total);
            }
            for sha256 in &hashes {
                total += self
                    .under_content_lock(sha256, async |tx| {
                        Ok(tx
                            .execute(
                                "DELETE FROM thumbnails WHERE sha256 = $1 AND created_ts < $2",
                                &[sha256, &before_ms],
                            )
                            .await?)
                    })
                    .await?
                    .0;
            }
        }
    }

    /// Deletes each of `contents` (but `except`, whose lock was just held) that no row references
    /// any more; returns how many went.
    pub(crate) async fn drop_unused(
        &self,
        mut contents: Vec<String>,
        except: &str,
    ) -> Result<u64, Error> {
        contents.sort();
        contents.dedup();
        let mut dropped = 0;
        for sha256 in contents.iter().filter(|t| *t != except) {
            if self.under_content_lock(sha256, async |_| Ok(())).await?.1 {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// The contents (SHA-256) a `SELECT DISTINCT sha256 ...` query names.
    pub(crate) async fn contents(
        &self,
        select: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<String>, Error> {
        let rows = self.client().await?.query(select, params).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// Deletes the thumbnails of `media` (`(origin, media_id)`) in `tx`; returns their contents, each
/// another object that may now be unused.
pub(crate) async fn delete_thumbnails_of(
    tx: &deadpool_postgres::Transaction<'_>,
    media: &[(String, String)],
) -> Result<Vec<String>, Error> {
    let mut thumbs = Vec::new();
    for (origin, media_id) in media {
        for t in tx
            .query(
                "DELETE FROM thumbnails WHERE origin = $1 AND media_id = $2 RETURNING sha256",
                &[origin, media_id],
            )
            .await?
        {
            thumbs.push(t.get::<_, String>(0));
        }
    }
    Ok(thumbs)
}
