//! Operations on media rows and objects beyond the upload pipeline: which of a batch of media ids
//! exist, how an object in a datastore compares with its row, quarantining a row, and deleting an
//! object once nothing references it.

use std::collections::HashSet;

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio_util::io::ReaderStream;

use crate::{Datastore, Error, LOCK_HASH, ObjectRef, Store};

/// Records a file to delete once the transaction that dropped its object row commits.
pub(crate) const RECORD_DELETION: &str =
    "INSERT INTO pending_deletions (datastore_id, location, sha256) VALUES ($1, $2, $3)
     ON CONFLICT DO NOTHING";

/// Records a file about to be placed, owned by this database session (see schema 4).
const RECORD_PLACEMENT: &str =
    "INSERT INTO placements (datastore_id, location, sha256, owner_pid, owner_started)
     SELECT $1, $2, $3, pid, backend_start FROM pg_stat_get_activity(pg_backend_pid())
     ON CONFLICT DO NOTHING";
/// Forgets a placement (its object row was committed, or the file was removed).
pub(crate) const FORGET_PLACEMENT: &str =
    "DELETE FROM placements WHERE datastore_id = $1 AND location = $2";

/// How thoroughly [`Store::check_object`] looks at an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckDepth {
    /// The object is there with the recorded size (a ranged read around its last byte).
    Size,
    /// Every byte is read: size and SHA-256 must match the row.
    Content,
}

/// What [`Store::check_object`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectCheck {
    Ok,
    /// The datastore has nothing at the object's location.
    Missing,
    /// The stored bytes are not as long as the row says.
    WrongSize {
        expected: u64,
        actual: u64,
    },
    /// The stored bytes do not hash to the object's name.
    WrongHash {
        actual: String,
    },
}

impl Store {
    /// The ids among `media_ids` that have a media row of `origin` (whether complete or pending).
    pub async fn existing_media(
        &self,
        origin: &str,
        media_ids: &[String],
    ) -> Result<HashSet<String>, Error> {
        if media_ids.is_empty() {
            return Ok(HashSet::new());
        }
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT media_id FROM media WHERE origin = $1 AND media_id = ANY($2)",
                &[&origin, &media_ids],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Compares an object's bytes in its datastore with its row.
    pub async fn check_object(
        &self,
        object: &ObjectRef,
        depth: CheckDepth,
    ) -> Result<ObjectCheck, Error> {
        match depth {
            CheckDepth::Size => self.check_size(object).await,
            CheckDepth::Content => self.check_content(object).await,
        }
    }

    async fn check_size(&self, object: &ObjectRef) -> Result<ObjectCheck, Error> {
        // Read up to two bytes from the last one: exactly one comes back when the size is right.
        let start = object.size.saturating_sub(1);
        let reader = match self.read(object, start, Some(2)).await {
            Ok(r) => r,
            Err(Error::ObjectMissing { .. }) => return Ok(ObjectCheck::Missing),
            Err(e) => return Err(e),
        };
        let mut got = 0u64;
        let mut chunks = ReaderStream::new(reader);
        while let Some(chunk) = chunks.next().await {
            got += chunk?.len() as u64;
        }
        let expected_tail = u64::from(object.size > 0);
        if got == expected_tail {
            return Ok(ObjectCheck::Ok);
        }
        // Wrong: read it all to say by how much (rare, so the cost does not matter).
        self.check_content(object).await
    }

    async fn check_content(&self, object: &ObjectRef) -> Result<ObjectCheck, Error> {
        let reader = match self.read(object, 0, None).await {
            Ok(r) => r,
            Err(Error::ObjectMissing { .. }) => return Ok(ObjectCheck::Missing),
            Err(e) => return Err(e),
        };
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut chunks = ReaderStream::with_capacity(reader, 256 * 1024);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        if size != object.size {
            return Ok(ObjectCheck::WrongSize {
                expected: object.size,
                actual: size,
            });
        }
        let actual = hex::encode(hasher.finalize());
        Ok(if actual == object.sha256 {
            ObjectCheck::Ok
        } else {
            ObjectCheck::WrongHash { actual }
        })
    }

    /// Quarantines a media row (an import carrying over a quarantine the homeserver added after an
    /// earlier run). Returns whether a row changed.
    pub async fn quarantine_media(&self, origin: &str, media_id: &str) -> Result<bool, Error> {
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE media SET quarantined = TRUE WHERE origin = $1 AND media_id = $2 AND NOT quarantined",
                &[&origin, &media_id],
            )
            .await?;
        Ok(n > 0)
    }

    /// Runs `work` in one transaction under `sha256`'s hash lock, deleting that object's row too
    /// if no media or thumbnail row references it any more; commits, then deletes its file unless
    /// an object row references it again (an upload of the same bytes meanwhile). Stopped
    /// anywhere, this leaves rows that point at their object, never a row without its object; a
    /// file whose deletion a crash interrupted is remembered (`pending_deletions`) and deleted
    /// later. Returns what `work` did, and whether the object went.
    pub(crate) async fn under_content_lock<T>(
        &self,
        sha256: &str,
        work: impl AsyncFnOnce(&deadpool_postgres::Transaction<'_>) -> Result<T, Error>,
    ) -> Result<(T, bool), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.query_one(LOCK_HASH, &[&sha256]).await?;
        let done = work(&tx).await?;
        let unused = tx
            .query_opt(
                "DELETE FROM objects o WHERE o.sha256 = $1
                   AND NOT EXISTS (SELECT 1 FROM media WHERE sha256 = $1)
                   AND NOT EXISTS (SELECT 1 FROM thumbnails WHERE sha256 = $1)
                   AND NOT EXISTS (SELECT 1 FROM export_parts WHERE sha256 = $1)
                   AND NOT EXISTS (SELECT 1 FROM import_parts WHERE sha256 = $1)
                 RETURNING datastore_id, location",
                &[&sha256],
            )
            .await?;
        let unused = match unused {
            Some(row) => {
                let (ds_id, location): (String, String) = (row.get(0), row.get(1));
                tx.execute(RECORD_DELETION, &[&ds_id, &location, &sha256])
                    .await?;
                Some((ds_id, location))
            }
            None => None,
        };
        tx.commit().await?;
        drop(client);
        let dropped = unused.is_some();
        if let Some((ds_id, location)) = unused {
            self.finish_deletion(&ds_id, sha256, &location).await?;
        }
        Ok((done, dropped))
    }

    /// Deletes a file recorded in `pending_deletions` unless an object row references it again,
    /// then forgets the record.
    pub(crate) async fn finish_deletion(
        &self,
        ds_id: &str,
        sha256: &str,
        location: &str,
    ) -> Result<(), Error> {
        if let Some(ds) = self.datastores.get(ds_id) {
            self.delete_unreferenced(ds, sha256, location).await?;
        }
        self.client()
            .await?
            .execute(
                "DELETE FROM pending_deletions WHERE datastore_id = $1 AND location = $2",
                &[&ds_id, &location],
            )
            .await?;
        Ok(())
    }

    /// Places `temp` as the object `sha256` of `ds`, recorded first so that a crash before its
    /// object row is committed leaves no file that nothing remembers; returns its location.
    /// The record goes with the object row's transaction ([`FORGET_PLACEMENT`]), or here when
    /// placing fails.
    pub(crate) async fn place_recorded(
        &self,
        ds: &Datastore,
        temp: &std::path::Path,
        sha256: &str,
    ) -> Result<String, Error> {
        let location = ds.location_for(sha256);
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
            [&ds.id(), &location, &sha256];
        let client = self.client().await?;
        let record = client.prepare_cached(RECORD_PLACEMENT).await?;
        client.execute(&record, &params).await?;
        drop(client);
        match ds.place(temp, sha256).await {
            Ok(placed) => Ok(placed),
            Err(e) => {
                self.forget_placement(ds.id(), &location).await;
                Err(e)
            }
        }
    }

    /// Forgets the record of a placement that was undone.
    pub(crate) async fn forget_placement(&self, ds_id: &str, location: &str) {
        let forgotten = match self.client().await {
            Ok(c) => c
                .execute(FORGET_PLACEMENT, &[&ds_id, &location])
                .await
                .map_err(Error::from),
            Err(e) => Err(e),
        };
        if let Err(e) = forgotten {
            tracing::debug!(error = %e, location, "placement record kept; the deletion job checks it");
        }
    }

    /// Finishes the deletions a crash interrupted, and the placements of processes that died;
    /// returns how many. A placement still in progress is skipped (its session is alive); were
    /// it not, deleting its file would still be safe, since an upload places its file again
    /// under the hash lock when it finds it gone.
    pub async fn finish_pending_deletions(&self) -> Result<u64, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT datastore_id, location, sha256 FROM pending_deletions LIMIT 10000",
                &[],
            )
            .await?;
        for row in &rows {
            self.finish_deletion(row.get(0), row.get(2), row.get(1))
                .await?;
        }
        let placed = client
            .query(
                "SELECT datastore_id, location, sha256 FROM placements p
                 WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a
                                   WHERE a.pid = p.owner_pid AND a.backend_start = p.owner_started)
                 LIMIT 10000",
                &[],
            )
            .await?;
        for row in &placed {
            let (ds_id, location, sha256): (&str, &str, &str) =
                (row.get(0), row.get(1), row.get(2));
            if let Some(ds) = self.datastores.get(ds_id) {
                self.delete_unreferenced(ds, sha256, location).await?;
            }
            client
                .execute(FORGET_PLACEMENT, &[&ds_id, &location])
                .await?;
        }
        Ok((rows.len() + placed.len()) as u64)
    }

    /// Deletes the object at `location` of `ds` unless an object row references it, deciding under
    /// the hash's lock. Returns whether it deleted.
    pub(crate) async fn delete_unreferenced(
        &self,
        ds: &Datastore,
        sha256: &str,
        location: &str,
    ) -> Result<bool, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(LOCK_HASH, &[&sha256]).await?;
        let referenced = tx
            .query_opt(
                "SELECT 1 FROM objects WHERE datastore_id = $1 AND location = $2",
                &[&ds.id(), &location],
            )
            .await?
            .is_some();
        if !referenced {
            ds.delete(location).await?;
        }
        tx.commit().await?;
        Ok(!referenced)
    }
}
