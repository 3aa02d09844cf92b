//! Moving objects from one datastore to another (file to S3 and back), one object at a time, while
//! the server keeps serving them.
//!
//! For each object row of the source store: copy the bytes into a temp file of the target (hashing
//! them: a copy that does not match its SHA-256 is refused), place it, then under the object's
//! advisory lock point the row at the target (re-placing it if it vanished meanwhile), commit, and
//! finally delete the source object under the lock unless a row references it again. A row points at
//! an object that exists at every step; stopping anywhere leaves at most an unreferenced copy (the
//! next run places over it; `datastores check` reports it), and a rerun continues with what is left.

use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{Datastore, Error, ObjectRef, Store};

/// Object rows read per query.
const BATCH: i64 = 100;

/// Where a transfer stands, after each object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    /// Objects moved by this run.
    pub moved: u64,
    pub bytes: u64,
    /// Objects that could not be moved and stay where they are, with why.
    pub failed: Vec<(String, String)>,
    /// Objects in the source store when the run started.
    pub total: u64,
}

impl Store {
    /// Moves every object of datastore `from` to datastore `to`; `progress` is called after each
    /// object. Transient failures (the database or a store unreachable) stop the run: run it again
    /// later to continue. An object that cannot be moved for good (missing or corrupt in the
    /// source) is skipped and listed in the report.
    pub async fn transfer(
        &self,
        from: &str,
        to: &str,
        mut progress: impl FnMut(&TransferReport, &ObjectRef),
    ) -> Result<TransferReport, Error> {
        if from == to {
            return Err(Error::Config(format!(
                "cannot transfer datastore `{from}` to itself"
            )));
        }
        let source = self.datastores.named(from)?;
        let target = self.datastores.named(to)?;
        // A run a crash stopped may have left a moved object's source behind.
        self.finish_pending_deletions().await?;

        let total: i64 = self
            .client()
            .await?
            .query_one(
                "SELECT COUNT(*) FROM objects WHERE datastore_id = $1",
                &[&from],
            )
            .await?
            .get(0);
        let mut report = TransferReport {
            total: u64::try_from(total).unwrap_or(0),
            ..TransferReport::default()
        };
        let mut after = String::new();
        loop {
            let objects = self.objects_page(from, &after, BATCH).await?;
            if objects.is_empty() {
                return Ok(report);
            }
            for object in objects {
                after.clone_from(&object.sha256);
                match self.move_object(&object, source, target).await {
                    Ok(true) => {
                        report.moved += 1;
                        report.bytes += object.size;
                    }
                    // Changed or purged meanwhile: nothing to move.
                    Ok(false) => {}
                    Err(e) if e.is_unavailable() => return Err(e),
                    Err(e) => {
                        tracing::warn!(sha256 = %object.sha256, error = %e, "object not transferred");
                        report.failed.push((object.sha256.clone(), e.to_string()));
                    }
                }
                progress(&report, &object);
            }
        }
    }

    /// Moves one object; `false` when its row no longer points at the source.
    async fn move_object(
        &self,
        object: &ObjectRef,
        source: &Datastore,
        target: &Datastore,
    ) -> Result<bool, Error> {
        let temp = copy_to_temp(object, source, target).await?;
        let placed = self.place_recorded(target, &temp, &object.sha256).await?;
        let moved = self
            .switch_object(object, source, target, &temp, &placed)
            .await;
        if moved.is_err() {
            self.forget_placement(target.id(), &placed).await;
        }
        moved
    }

    /// Points the object's row at its copy in `target` (placed at `placed`), and records the
    /// source's file for deletion; `false` when its row no longer points at the source.
    async fn switch_object(
        &self,
        object: &ObjectRef,
        source: &Datastore,
        target: &Datastore,
        temp: &std::path::Path,
        placed: &str,
    ) -> Result<bool, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.execute(crate::LOCK_HASH, &[&object.sha256]).await?;
        let updated = tx
            .execute(
                "UPDATE objects SET datastore_id = $4, location = $5
                 WHERE sha256 = $1 AND datastore_id = $2 AND location = $3",
                &[
                    &object.sha256,
                    &object.datastore_id,
                    &object.location,
                    &target.id(),
                    &placed,
                ],
            )
            .await?;
        if updated == 0 {
            drop(tx);
            self.delete_unreferenced(target, &object.sha256, placed)
                .await?;
            self.forget_placement(target.id(), placed).await;
            return Ok(false);
        }
        // As in the pipeline: under the lock, what is there now stays there.
        if !target.exists(placed).await? {
            target.place(temp, &object.sha256).await?;
        }
        tx.execute(
            crate::objects::RECORD_DELETION,
            &[&source.id(), &object.location, &object.sha256],
        )
        .await?;
        tx.execute(crate::objects::FORGET_PLACEMENT, &[&target.id(), &placed])
            .await?;
        tx.commit().await?;
        self.finish_deletion(source.id(), &object.sha256, &object.location)
            .await?;
        Ok(true)
    }
}

/// Streams the source object into a temp file of the target, checking its size and SHA-256.
async fn copy_to_temp(
    object: &ObjectRef,
    source: &Datastore,
    target: &Datastore,
) -> Result<tempfile::TempPath, Error> {
    let dir = target.temp_dir().to_path_buf();
    let temp = tokio::task::spawn_blocking(move || {
        tempfile::Builder::new()
            .prefix(crate::jobs::TRANSFER_PREFIX)
            .tempfile_in(dir)
    })
    .await
    .map_err(|e| Error::Io(std::io::Error::other(e)))??;
    let (file, path) = temp.into_parts();
    let mut out = tokio::io::BufWriter::with_capacity(256 * 1024, tokio::fs::File::from_std(file));
    let mut reader = source.open(&object.location, 0, None).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).await?;
        size += n as u64;
    }
    out.flush().await?;
    out.into_inner().sync_all().await?;
    let sha256 = hex::encode(hasher.finalize());
    if sha256 != object.sha256 || size != object.size {
        return Err(Error::Corrupt(format!(
            "object {} in datastore `{}` holds {size} bytes hashing to {sha256}, not the {} bytes \
             its row records",
            object.location, object.datastore_id, object.size
        )));
    }
    Ok(path)
}
