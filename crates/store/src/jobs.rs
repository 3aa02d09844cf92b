//! What the recurring jobs need from the store: a lock that one instance at a time holds across
//! every instance on the database, and the clean-ups themselves.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio_postgres::NoTls;
use tokio_postgres::types::Type;

use crate::{Error, Store, now_ms};

/// Temp files of these prefixes are the pipeline's and transfers' (a datastore's `tempPath` may be
/// a directory shared with other programs: nothing else in it is touched).
pub(crate) const UPLOAD_PREFIX: &str = "mmrctl-upload-";
pub(crate) const TRANSFER_PREFIX: &str = "mmrctl-transfer-";
const TEMP_PREFIXES: [&str; 3] = [
    UPLOAD_PREFIX,
    TRANSFER_PREFIX,
    crate::archives::EXPORT_TEMP_PREFIX,
];

/// A job's lock, held by a database session of its own: released by [`JobLock::release`], and by
/// the database when the instance holding it dies (its connection closes), so that another
/// instance takes the job over.
pub struct JobLock {
    /// Taken when released: dropping the client ends the session cleanly.
    client: Option<tokio_postgres::Client>,
    /// Taken when the session goes back to the idle ones.
    connection: Option<tokio::task::JoinHandle<()>>,
    held: bool,
    idle: LockSessions,
}

/// A session for locks, not holding any.
pub(crate) struct LockSession {
    client: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<()>,
}

/// Sessions released cleanly, kept for the next lock: a new session costs the database a new
/// backend process (milliseconds), which every remote fetch and thumbnail would otherwise wait for.
pub(crate) type LockSessions = Arc<Mutex<Vec<LockSession>>>;

/// At most this many idle sessions are kept (the busy ones are bounded by the fetches, thumbnails
/// and jobs that may run at once).
const IDLE_LOCK_SESSIONS: usize = 8;

/// Lock statements go typed (`query_typed`): one round trip, no statement left to close.
const LOCK_KEY: &str = "hashtextextended('mmrctl job ' || $1, 2)";

impl JobLock {
    /// Resolves when the lock's session has ended (the database went away, say): the lock is gone
    /// then, and the run holding it must stop.
    pub async fn lost(&mut self) {
        match &mut self.connection {
            Some(connection) => {
                let _ = connection.await;
            }
            None => std::future::pending().await,
        }
    }

    /// Unlocks; the session is kept for another lock, or ends as a client should.
    pub async fn release(mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        // Every session lock it has, so that no lock can outlive its holder in a kept session.
        let clean = !self.held
            || client
                .query_typed("SELECT pg_advisory_unlock_all()", &[])
                .await
                .is_ok();
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        if clean && !client.is_closed() {
            let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
            if idle.len() < IDLE_LOCK_SESSIONS {
                idle.push(LockSession { client, connection });
                return;
            }
        }
        drop(client);
        // The client is gone: the connection says goodbye and ends (else it is aborted).
        if tokio::time::timeout(Duration::from_secs(5), &mut connection)
            .await
            .is_err()
        {
            connection.abort();
        }
    }
}

impl Drop for JobLock {
    fn drop(&mut self) {
        // Cancelled before `release`: ends the session, and with it the lock.
        if let Some(connection) = &self.connection {
            connection.abort();
        }
    }
}

impl Store {
    /// The lock of `name`, once whichever instance holds it has let it go (or died).
    pub async fn lock_job(&self, name: &str) -> Result<JobLock, Error> {
        let mut lock = self.lock_session().await?;
        if let Some(client) = &lock.client {
            client
                .query_typed(
                    &format!("SELECT pg_advisory_lock({LOCK_KEY})"),
                    &[(&name, Type::TEXT)],
                )
                .await?;
        }
        lock.held = true;
        Ok(lock)
    }

    /// The lock of job `name` if no instance holds it, else `None`.
    pub async fn try_lock_job(&self, name: &str) -> Result<Option<JobLock>, Error> {
        let mut lock = self.lock_session().await?;
        if let Some(client) = &lock.client {
            let row = client
                .query_typed_one(
                    &format!("SELECT pg_try_advisory_lock({LOCK_KEY})"),
                    &[(&name, Type::TEXT)],
                )
                .await?;
            lock.held = row.get::<_, bool>(0);
        }
        if lock.held {
            Ok(Some(lock))
        } else {
            lock.release().await;
            Ok(None)
        }
    }

    /// A database session of its own for a lock, not yet taken: an idle one, or a new one.
    async fn lock_session(&self) -> Result<JobLock, Error> {
        let kept = {
            let mut idle = self
                .lock_sessions
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // The most recently used first: the likeliest to be still open.
            std::iter::from_fn(|| idle.pop()).find(|s| !s.client.is_closed())
        };
        let LockSession { client, connection } = match kept {
            Some(session) => session,
            None => {
                let (client, connection) = self.pg.connect(NoTls).await?;
                let connection = tokio::spawn(async move {
                    let _ = connection.await;
                });
                LockSession { client, connection }
            }
        };
        Ok(JobLock {
            client: Some(client),
            connection: Some(connection),
            held: false,
            idle: self.lock_sessions.clone(),
        })
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
        make("mmrctl-upload-stale", old);
        make("mmrctl-transfer-stale", old);
        make("mmrctl-upload-fresh", SystemTime::now());
        make("upload-someone-elses", old);
        std::fs::create_dir(dir.path().join("mmrctl-upload-dir")).unwrap();
        let cutoff = SystemTime::now() - Duration::from_secs(86_400);
        assert_eq!(delete_stale_in(dir.path(), cutoff).unwrap(), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "mmrctl-upload-dir",
                "mmrctl-upload-fresh",
                "upload-someone-elses"
            ]
        );
        assert_eq!(
            delete_stale_in(&dir.path().join("gone"), cutoff).unwrap(),
            0
        );
    }
}
