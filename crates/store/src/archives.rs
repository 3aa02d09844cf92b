//! GDPR exports: an entity's (a user's or a server's) media written as tar.gz parts, each part an
//! object in the `archives` datastore, listed under a secret export id.

use std::path::Path;

use config::MediaKind;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;

use crate::{Error, LOCK_HASH, Media, Store, ids, now_ms};

/// Temp files and directories of exports being written (a crash's are cleaned up with the
/// other stale temp files).
pub const EXPORT_TEMP_PREFIX: &str = "mmrctl-export-";

/// One part of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportPart {
    pub index: i32,
    pub file_name: String,
    pub object: crate::ObjectRef,
}

/// An export and its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    pub export_id: String,
    pub entity: String,
    pub created_ts: i64,
    pub parts: Vec<ExportPart>,
}

impl Store {
    /// Records a new export of `entity` (a user id, or a server name); returns its id, which is
    /// the secret that fetches it (48 random characters).
    pub async fn create_export(&self, entity: &str) -> Result<String, Error> {
        let export_id = secret_id()?;
        self.client()
            .await?
            .execute(
                "INSERT INTO exports (export_id, entity, created_ts) VALUES ($1, $2, $3)",
                &[&export_id, &entity, &now_ms()],
            )
            .await?;
        Ok(export_id)
    }

    /// The media of `entity` (uploaded by the user, or of the server) after `after` (origin,
    /// media id) in that order, at most `limit`; pending uploads left out.
    pub async fn entity_media(
        &self,
        entity: &str,
        after: (&str, &str),
        limit: i64,
    ) -> Result<Vec<Media>, Error> {
        let column = if entity.starts_with('@') {
            "m.user_id"
        } else {
            "m.origin"
        };
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {} FROM media m JOIN objects o ON o.sha256 = m.sha256
                     WHERE {column} = $1 AND (m.origin, m.media_id) > ($2, $3)
                     ORDER BY m.origin, m.media_id LIMIT $4",
                    crate::MEDIA_COLUMNS
                ),
                &[&entity, &after.0, &after.1, &limit],
            )
            .await?;
        rows.iter().map(crate::media_from_row).collect()
    }

    /// Stores the finished part `index` of an export from the file at `path` (in the archives
    /// datastore's temp directory) as an object, and lists it. Idempotent for one index.
    pub async fn put_export_part(
        &self,
        export_id: &str,
        index: i32,
        file_name: &str,
        path: &Path,
    ) -> Result<(), Error> {
        self.put_archive_part(
            path,
            "INSERT INTO export_parts (export_id, part_index, file_name, sha256)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (export_id, part_index) DO UPDATE SET file_name = $3, sha256 = $4",
            &[&export_id, &index, &file_name],
        )
        .await
    }

    /// Places the file at `path` in the archives datastore as an object, and runs `list` (whose
    /// last parameter is the object's SHA-256, after `params`) in the same transaction.
    async fn put_archive_part(
        &self,
        path: &Path,
        list: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<(), Error> {
        let ds = self
            .datastores
            .for_kind(MediaKind::Archives)
            .ok_or(Error::NoDatastore(MediaKind::Archives))?;
        let (sha256, size) = hash_file(path).await?;
        let location = self.place_recorded(ds, path, &sha256).await?;
        let recorded = async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            tx.query_one(LOCK_HASH, &[&sha256]).await?;
            let inserted = tx
                .query_opt(
                    crate::pipeline::INSERT_OBJECT,
                    &[&sha256, &(size as i64), &ds.id(), &location, &now_ms()],
                )
                .await?;
            // As in the pipeline: under the lock, what is there now stays there.
            if inserted.is_some() && !ds.exists(&location).await? {
                ds.place(path, &sha256).await?;
            }
            let mut all = params.to_vec();
            all.push(&sha256);
            tx.execute(list, &all).await?;
            tx.execute(crate::objects::FORGET_PLACEMENT, &[&ds.id(), &location])
                .await?;
            tx.commit().await?;
            Ok::<_, Error>(())
        }
        .await;
        if recorded.is_err() {
            self.remove_if_unreferenced(ds.id(), &sha256, &location)
                .await;
            self.forget_placement(ds.id(), &location).await;
        }
        recorded
    }

    /// Records a new import through the admin API; returns its id (a secret, as an export's).
    pub async fn create_import(&self) -> Result<String, Error> {
        let import_id = secret_id()?;
        self.client()
            .await?
            .execute(
                "INSERT INTO imports (import_id, created_ts) VALUES ($1, $2)",
                &[&import_id, &now_ms()],
            )
            .await?;
        Ok(import_id)
    }

    /// Adds the archive part at `path` to an open import; returns false when there is no such
    /// open import.
    pub async fn add_import_part(&self, import_id: &str, path: &Path) -> Result<bool, Error> {
        let open = self
            .client()
            .await?
            .query_opt(
                "SELECT 1 FROM imports WHERE import_id = $1 AND NOT closed",
                &[&import_id],
            )
            .await?
            .is_some();
        if open {
            self.put_archive_part(
                path,
                "INSERT INTO import_parts (import_id, part_index, sha256)
                 SELECT $1, COALESCE(MAX(part_index), 0) + 1, $2 FROM import_parts WHERE import_id = $1",
                &[&import_id],
            )
            .await?;
        }
        Ok(open)
    }

    /// Closes an import: no more parts; returns false when there is no such import.
    pub async fn close_import(&self, import_id: &str) -> Result<bool, Error> {
        let n = self
            .client()
            .await?
            .execute(
                "UPDATE imports SET closed = TRUE WHERE import_id = $1",
                &[&import_id],
            )
            .await?;
        Ok(n > 0)
    }

    /// An import's parts as objects, and whether it is closed; `None` when there is no such
    /// import.
    pub async fn import_parts(
        &self,
        import_id: &str,
    ) -> Result<Option<(Vec<crate::ObjectRef>, bool)>, Error> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT closed FROM imports WHERE import_id = $1",
                &[&import_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let parts = client
            .query(
                "SELECT o.sha256, o.size_bytes, o.datastore_id, o.location
                 FROM import_parts p JOIN objects o ON o.sha256 = p.sha256
                 WHERE p.import_id = $1 ORDER BY p.part_index",
                &[&import_id],
            )
            .await?;
        Ok(Some((
            parts.iter().map(object_from_row).collect(),
            row.get(0),
        )))
    }

    /// Deletes a finished import's parts (and their objects unless something else uses them).
    pub async fn delete_import(&self, import_id: &str) -> Result<(), Error> {
        self.drop_parts("import_parts", "import_id", import_id)
            .await?;
        self.client()
            .await?
            .execute("DELETE FROM imports WHERE import_id = $1", &[&import_id])
            .await?;
        Ok(())
    }

    pub async fn export(&self, export_id: &str) -> Result<Option<Export>, Error> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt(
                "SELECT entity, created_ts FROM exports WHERE export_id = $1",
                &[&export_id],
            )
            .await?
        else {
            return Ok(None);
        };
        let parts = client
            .query(
                "SELECT p.part_index, p.file_name, o.sha256, o.size_bytes, o.datastore_id, o.location
                 FROM export_parts p JOIN objects o ON o.sha256 = p.sha256
                 WHERE p.export_id = $1 ORDER BY p.part_index",
                &[&export_id],
            )
            .await?;
        Ok(Some(Export {
            export_id: export_id.to_owned(),
            entity: row.get(0),
            created_ts: row.get(1),
            parts: parts
                .iter()
                .map(|r| ExportPart {
                    index: r.get(0),
                    file_name: r.get(1),
                    object: crate::ObjectRef {
                        sha256: r.get(2),
                        size: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                        datastore_id: r.get(4),
                        location: r.get(5),
                    },
                })
                .collect(),
        }))
    }

    /// Every export, newest first: id, entity, creation time, parts and bytes.
    pub async fn exports(&self) -> Result<Vec<(String, String, i64, i64, i64)>, Error> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT e.export_id, e.entity, e.created_ts, COUNT(p.sha256),
                        COALESCE(SUM(o.size_bytes), 0)::BIGINT
                 FROM exports e
                 LEFT JOIN export_parts p ON p.export_id = e.export_id
                 LEFT JOIN objects o ON o.sha256 = p.sha256
                 GROUP BY e.export_id ORDER BY e.created_ts DESC",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect())
    }

    /// Deletes an export, its parts, and their objects unless something else uses them. Returns
    /// false when there was no such export.
    pub async fn delete_export(&self, export_id: &str) -> Result<bool, Error> {
        self.clear_export_parts(export_id).await?;
        let n = self
            .client()
            .await?
            .execute("DELETE FROM exports WHERE export_id = $1", &[&export_id])
            .await?;
        Ok(n > 0)
    }

    /// Deletes the parts of an export (and their objects unless something else uses them).
    pub async fn clear_export_parts(&self, export_id: &str) -> Result<(), Error> {
        self.drop_parts("export_parts", "export_id", export_id)
            .await
    }

    /// Deletes the rows of `table` whose `column` is `id`, one part at a time under its hash lock,
    /// and each part's object unless something else uses it.
    async fn drop_parts(&self, table: &str, column: &str, id: &str) -> Result<(), Error> {
        let parts = self
            .contents(
                &format!("SELECT sha256 FROM {table} WHERE {column} = $1"),
                &[&id],
            )
            .await?;
        let delete = format!("DELETE FROM {table} WHERE {column} = $1 AND sha256 = $2");
        for sha256 in &parts {
            self.under_content_lock(sha256, async |tx| {
                Ok(tx.execute(&delete, &[&id, sha256]).await?)
            })
            .await?;
        }
        Ok(())
    }

    /// Deletes the exports made before `before_ms`; returns how many.
    pub async fn expire_exports(&self, before_ms: i64) -> Result<u64, Error> {
        let ids = self
            .contents(
                "SELECT export_id FROM exports WHERE created_ts < $1",
                &[&before_ms],
            )
            .await?;
        for id in &ids {
            self.delete_export(id).await?;
        }
        Ok(ids.len() as u64)
    }

    /// The temp directory of the archives datastore (where export parts are written).
    pub fn archives_temp_dir(&self) -> Result<std::path::PathBuf, Error> {
        self.datastores
            .for_kind(MediaKind::Archives)
            .map(|ds| ds.temp_dir().to_path_buf())
            .ok_or(Error::NoDatastore(MediaKind::Archives))
    }
}

/// 48 characters from the OS RNG: an id that is also the secret that grants access.
fn secret_id() -> Result<String, Error> {
    let random = || ids::new_media_id().map_err(|e| Error::Io(std::io::Error::other(e)));
    Ok(format!("{}{}", random()?, random()?))
}

fn object_from_row(r: &tokio_postgres::Row) -> crate::ObjectRef {
    crate::ObjectRef {
        sha256: r.get(0),
        size: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
        datastore_id: r.get(2),
        location: r.get(3),
    }
}

async fn hash_file(path: &Path) -> Result<(String, u64), Error> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}
