//! What the recurring jobs need from the store: a lock that one instance at a time holds across
//! every instance on the database, and the clean-ups themselves.

use std::path::Path;
use std::time::{Duration, SystemTime};

use tokio_postgres::NoTls;

use crate::{Error, Store, now_ms};

/// Temp files of these prefixes are the pipeline's and transfers' (a datastore's `tempPath` may be
/// a directory shared with other programs: nothing else in it is touched).
const TEMP_PREFIXES: [&str; 2] = ["upload-", "transfer-"];

/// A job's lock, held by a database session of its own: released when this is dropped, and by
/// the database when the instance holding it dies (its connection closes), so that another
/// instance takes the job over.
pub struct JobLock {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for JobLock {
    fn drop(&mut self) {
        // Ends the session, and with it the lock.
        self.connection.abort();
    }
}

impl Store {
    /// The lock of job `name` if no instance holds it, else `None`.
    pub async fn try_lock_job(&self, name: &str) -> Result<Option<JobLock>, Error> {
        let (client, connection) = self.pg.connect(NoTls).await?;
        let connection = tokio::spawn(async move {
            let _ = connection.await;
        });
        let lock = JobLock { client, connection };
        let row = lock
            .client
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('mmrctl job ' || $1, 2))",
                &[&name],
            )
            .await?;
        Ok(row.get::<_, bool>(0).then_some(lock))
    }

    /// Deletes the reservations of asynchronous uploads that expired without content; returns how
    /// many. Each user's pending count drops with them.
    pub async fn delete_expired_reservations(&self) -> Result<u64, Error> {
        Ok(self
            .client()
            .await?
            .execute(
                "DELETE FROM media WHERE sha256 IS NULL AND expires_ts <= $1",
                &[&now_ms()],
            )
            .await?)
    }

    /// Deletes the pipeline's and transfers' temp files that nothing wrote to for `older_than` (a
    /// crash left them: a live upload writes far more often, or fails); returns how many.
    pub async fn delete_stale_temp_files(&self, older_than: Duration) -> Result<u64, Error> {
        let dirs: Vec<_> = self
            .datastores
            .iter()
            .map(|ds| ds.temp_dir().to_path_buf())
            .collect();
        let deleted = tokio::task::spawn_blocking(move || {
            let cutoff = SystemTime::now()
                .checked_sub(older_than)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            let mut deleted = 0;
            for dir in dirs {
                deleted += delete_stale_in(&dir, cutoff)?;
            }
            Ok::<_, std::io::Error>(deleted)
        })
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))??;
        Ok(deleted)
    }
}

fn delete_stale_in(dir: &Path, cutoff: SystemTime) -> std::io::Result<u64> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut deleted = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let ours = name
            .to_str()
            .is_some_and(|n| TEMP_PREFIXES.iter().any(|p| n.starts_with(p)));
        let meta = entry.metadata()?;
        if ours && meta.is_file() && meta.modified()? < cutoff {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_old_temp_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let old = SystemTime::now() - Duration::from_secs(3 * 86_400);
        let make = |name: &str, modified: SystemTime| {
            let f = std::fs::File::create(dir.path().join(name)).unwrap();
            f.set_modified(modified).unwrap();
        };
        make("upload-stale", old);
        make("transfer-stale", old);
        make("upload-fresh", SystemTime::now());
        make("someone-elses", old);
        std::fs::create_dir(dir.path().join("upload-dir")).unwrap();
        let cutoff = SystemTime::now() - Duration::from_secs(86_400);
        assert_eq!(delete_stale_in(dir.path(), cutoff).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["someone-elses", "upload-dir", "upload-fresh"]);
        assert_eq!(
            delete_stale_in(&dir.path().join("gone"), cutoff).unwrap(),
            0
        );
    }
}
