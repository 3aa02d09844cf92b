//! URL previews: one row per (origin, URL, time bucket, language), holding the preview's JSON or,
//! for a while, why it failed. Rows are written with `ON CONFLICT`, so concurrent fetches of one
//! URL (on any instance) never fail on the key (MMR #649): the first success stays, a failure is
//! replaced by a later success, never the reverse.
//!
//! The images previews show are media rows of the origin, attributed to no user, one per content
//! ([`crate::Target::PreviewImage`]; `preview_images` maps content to that row).

use crate::{Error, Media, NewMedia, Store, now_ms};

/// Which preview: the homeserver whose users asked (its `mxc://` URIs are in it), the URL, the
/// start of its time bucket and the language asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PreviewKey {
    pub origin: String,
    pub url: String,
    pub bucket_ts: i64,
    pub language: String,
}

/// A preview as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredPreview {
    /// The preview's JSON.
    Found(String),
    /// Why it failed: a kind the caller defined, and its message; remembered until `until` (ms).
    Failed {
        kind: String,
        message: String,
        until: i64,
    },
}

const SELECT: &str = "SELECT preview, error_kind, error, expires_ts FROM url_previews
     WHERE origin = $1 AND url = $2 AND bucket_ts = $3 AND language = $4";
/// A success replaces a failure, never another success.
const PUT_FOUND: &str = "INSERT INTO url_previews
         (origin, url, bucket_ts, language, preview, created_ts)
     VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT (origin, url, bucket_ts, language) DO UPDATE
         SET preview = EXCLUDED.preview, error_kind = NULL, error = NULL, expires_ts = NULL,
             created_ts = EXCLUDED.created_ts
         WHERE url_previews.preview IS NULL";
/// A failure replaces only a failure.
const PUT_FAILED: &str = "INSERT INTO url_previews
         (origin, url, bucket_ts, language, error_kind, error, expires_ts, created_ts)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
     ON CONFLICT (origin, url, bucket_ts, language) DO UPDATE
         SET error_kind = EXCLUDED.error_kind, error = EXCLUDED.error,
             expires_ts = EXCLUDED.expires_ts, created_ts = EXCLUDED.created_ts
         WHERE url_previews.preview IS NULL";

impl Store {
    /// The stored preview for `key`; a failure whose time ran out is not one.
    pub async fn preview(&self, key: &PreviewKey) -> Result<Option<StoredPreview>, Error> {
        let client = self.client().await?;
        let select = client.prepare_cached(SELECT).await?;
        let row = client
            .query_opt(
                &select,
                &[&key.origin, &key.url, &key.bucket_ts, &key.language],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if let Some(json) = row.get::<_, Option<String>>(0) {
            return Ok(Some(StoredPreview::Found(json)));
        }
        let until: i64 = row.get::<_, Option<i64>>(3).unwrap_or(0);
        if until <= now_ms() {
            return Ok(None);
        }
        Ok(Some(StoredPreview::Failed {
            kind: row.get::<_, Option<String>>(1).unwrap_or_default(),
            message: row.get::<_, Option<String>>(2).unwrap_or_default(),
            until,
        }))
    }

    /// Records what a fetch for `key` ended with (see the module's rules on conflicts).
    pub async fn put_preview(
        &self,
        key: &PreviewKey,
        preview: &StoredPreview,
    ) -> Result<(), Error> {
        let client = self.client().await?;
        let now = now_ms();
        let k = [
            &key.origin as &(dyn tokio_postgres::types::ToSql + Sync),
            &key.url,
            &key.bucket_ts,
            &key.language,
        ];
        match preview {
            StoredPreview::Found(json) => {
                let put = client.prepare_cached(PUT_FOUND).await?;
                client
                    .execute(&put, &[k[0], k[1], k[2], k[3], json, &now])
                    .await?;
            }
            StoredPreview::Failed {
                kind,
                message,
                until,
            } => {
                let put = client.prepare_cached(PUT_FAILED).await?;
                client
                    .execute(&put, &[k[0], k[1], k[2], k[3], kind, message, until, &now])
                    .await?;
            }
        }
        Ok(())
    }

    /// Deletes previews made before `before_ms` (`urlPreviews.expireAfterDays`), and failures
    /// whose time ran out; they are fetched again when asked for. The images stay: they are media
    /// that messages may show. Returns how many rows went.
    pub async fn expire_previews(&self, before_ms: i64) -> Result<u64, Error> {
        let client = self.client().await?;
        let mut total = 0;
        loop {
            // In batches, so that one statement never holds many row locks.
            let n = client
                .execute(
                    "DELETE FROM url_previews WHERE ctid IN (
                         SELECT ctid FROM url_previews
                         WHERE created_ts < $1 OR (expires_ts IS NOT NULL AND expires_ts < $2)
                         LIMIT 1000)",
                    &[&before_ms, &now_ms()],
                )
                .await?;
            total += n;
            if n < 1000 {
                return Ok(total);
            }
        }
    }

    /// Ends a [`crate::Target::PreviewImage`] upload's transaction (the hash lock held, the
    /// object row in place): the new media row is mapped to its content, or, when the origin's
    /// previews already had that content (`existed`), that row is the answer.
    pub(crate) async fn preview_image(
        &self,
        tx: deadpool_postgres::Transaction<'_>,
        new: &NewMedia,
        sha256: &str,
        media_id: &str,
        existed: bool,
    ) -> Result<Media, Error> {
        let media_id = if existed {
            tx.query_one(
                "SELECT media_id FROM preview_images WHERE origin = $1 AND sha256 = $2",
                &[&new.origin, &sha256],
            )
            .await?
            .get::<_, String>(0)
        } else {
            tx.execute(
                "INSERT INTO preview_images (origin, sha256, media_id) VALUES ($1, $2, $3)",
                &[&new.origin, &sha256, &media_id],
            )
            .await?;
            media_id.to_owned()
        };
        tx.commit().await?;
        self.media(&new.origin, &media_id)
            .await?
            .ok_or_else(|| Error::Io(std::io::Error::other("a preview image's row vanished")))
    }
}
