//! The media store: media rows in Postgres, content-addressed objects in datastores, and the one
//! upload pipeline every writer uses.
//!
//! Invariants (see ARCHITECTURE.md):
//! - a row never points at a missing object: objects are placed before the row that references them
//!   commits, and re-checked under the per-hash lock when the object row is new;
//! - an object is deleted only when no row references it, decided inside the database under the same
//!   per-hash advisory lock;
//! - no upload is held in memory: bodies stream to a temp file in the target datastore.

pub mod admin;
pub mod archives;
mod blockfile;
mod check;
mod datastore;
pub mod ids;
mod jobs;
pub mod objects;
mod pipeline;
mod previews;
mod s3;
mod schema;
pub mod shared;
mod streamcopy;
mod tasks;
mod thumbnails;
mod transfer;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use config::MediaKind;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::broadcast;
use tokio_postgres::NoTls;

pub use check::CheckReport;
pub use datastore::{BackendError, Datastore, Datastores, Probe, Reader, Space};
pub use jobs::JobLock;
pub use pipeline::{Limits, NewMedia, Quota, Target, Uploaded};
pub use previews::{PreviewKey, StoredPreview};
pub use s3::operation_counts as s3_operation_counts;
pub use tasks::TaskRow;
pub use thumbnails::{StoredThumbnail, ThumbnailKey};
pub use transfer::TransferReport;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    Config(String),
    /// Shown with Postgres's own message (tokio-postgres alone says only "db error").
    #[error("database: {}", describe_pg(.0))]
    Database(tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(deadpool_postgres::PoolError),
    /// Connecting at start-up, or applying the schema, failed; `retryable` is false when waiting
    /// cannot help (no such database, authentication failed, not allowed to connect or create).
    #[error("PostgreSQL at {target}: {detail}")]
    Setup {
        target: String,
        detail: String,
        retryable: bool,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("i/o: {0}")]
    Io(std::io::Error),
    #[error(
        "the database schema is version {found}, newer than this mmrctl knows ({known}); upgrade mmrctl"
    )]
    SchemaTooNew { found: i32, known: i32 },
    #[error("no datastore accepts {0:?} media")]
    NoDatastore(MediaKind),
    #[error("object {location} is missing from datastore `{datastore}`")]
    ObjectMissing { datastore: String, location: String },
    #[error("datastore `{0}` is referenced by media but not configured")]
    UnknownDatastore(String),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("the upload is larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("the upload is smaller than {min} bytes")]
    TooSmall { min: u64 },
    #[error("the upload was interrupted: {0}")]
    Aborted(String),
    #[error("media id already in use")]
    MediaIdTaken,
    #[error("no pending media with that id")]
    PendingNotFound,
    #[error("the pending media id has expired")]
    PendingExpired,
    #[error("another user reserved this media id")]
    PendingOtherUser,
    #[error("this media id already has content")]
    CannotOverwrite,
    /// The content is quarantined (some media with these bytes is): it is not stored again
    /// under another id, whoever sends it, until an administrator lifts the quarantine.
    #[error("this content has been quarantined")]
    ContentQuarantined,
    #[error("too many pending uploads ({0})")]
    TooManyPending(u32),
    #[error("the user's quota of {0} files is reached")]
    QuotaFiles(u64),
    #[error("the upload would exceed the user's quota of {0} bytes")]
    QuotaBytes(u64),
    #[error("the content hashes to {actual}, not the expected {expected}")]
    HashMismatch { expected: String, actual: String },
    /// Redis (the `redis` section) did not answer in time.
    #[error("redis: {0}")]
    Redis(String),
}

impl Error {
    /// Text the database cannot store (a NUL character, say): the request's fault, a 400.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::Database(e) if is_bad_text(e))
    }

    /// A datastore's disk (or quota) is full: the operator must make room (a 507).
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::Io(e) => is_full(e),
            _ => false,
        }
    }

    /// Failures of the database or a datastore that may pass (worth a 503 and a retry).
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Database(e) => is_transient_pg(e),
            Error::Pool(_) => true,
            Error::Setup { retryable, .. } => *retryable,
            Error::Backend(e) => e.transient,
            Error::Redis(_) => true,
            _ => false,
        }
    }
}

// Not `#[from]`: the message already carries the cause, and a source would repeat it in chains.
/// ENOSPC, or EDQUOT (Linux's 122; std has no kind of its own for it).
pub(crate) fn is_full(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(122)
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        Error::Database(e)
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Error {
        match e {
            deadpool_postgres::PoolError::Backend(e) => Error::Database(e),
            e => Error::Pool(e),
        }
    }
}

/// Postgres's message and SQLSTATE for server errors, else the error with its causes.
fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
    }
    error_chain(e)
}

/// An error and its sources, `: `-separated (what went wrong down to the socket, without an
/// SDK's debug dumps).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Text the database refuses to store (a NUL, an invalid encoding): the request's fault.
fn is_bad_text(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        *c == SqlState::CHARACTER_NOT_IN_REPERTOIRE || *c == SqlState::UNTRANSLATABLE_CHARACTER
    })
}

/// Whether a database error may pass by itself (an allow-list: anything else is a fault that
/// waiting cannot fix). With a SQLSTATE: the connection failed (class 08), the server is out of
/// resources (53), shutting down or starting (57P01-57P03), or the transaction lost a race
/// (40001, 40P01). Without: this side of the connection failed (refused, reset, closed, timed
/// out); authentication, TLS or configuration failures are not transient.
fn is_transient_pg(e: &tokio_postgres::Error) -> bool {
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08")
            || c.starts_with("53")
            || matches!(c, "57P01" | "57P02" | "57P03" | "40001" | "40P01");
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<std::io::Error>() {
            return true;
        }
        cause = c.source();
    }
    e.is_closed() || e.to_string() == "timeout waiting for server"
}

/// `host:port, database `name` as `user``, for errors about connecting.
fn connect_target(pg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match pg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg.get_user().unwrap_or("(none)");
    let db = pg.get_dbname().unwrap_or(user);
    format!("{host}:{port}, database `{db}` as user `{user}`")
}

/// Now, in milliseconds since the Unix epoch (how rows record time).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Content, as one object row describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectRef {
    pub sha256: String,
    pub size: u64,
    pub datastore_id: String,
    pub location: String,
}

/// What an mxc:// URI names.
#[derive(Debug, Clone, PartialEq)]
pub struct Media {
    pub origin: String,
    pub media_id: String,
    pub kind: MediaKind,
    pub content_type: String,
    pub upload_name: Option<String>,
    pub user_id: String,
    pub created_ts: i64,
    pub quarantined: bool,
    pub requires_auth: bool,
    /// Set while an MSC2246 upload is pending.
    pub expires_ts: Option<i64>,
    /// `None` while pending.
    pub object: Option<ObjectRef>,
}

impl Media {
    pub fn mxc(&self) -> String {
        format!("mxc://{}/{}", self.origin, self.media_id)
    }
}

/// A user's uploads, for quotas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub bytes: u64,
    pub files: u64,
    pub pending: u64,
}

/// The pool's state, for metrics.
#[derive(Debug, Clone, Copy)]
pub struct PoolStatus {
    pub max_size: usize,
    pub size: usize,
    pub available: usize,
    pub waiting: usize,
}

#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// For connections of their own: `LISTEN`, and the session locks of jobs.
    pg: tokio_postgres::Config,
    datastores: Arc<Datastores>,
    uploads: broadcast::Sender<String>,
    /// Logouts announced by any instance (see [`Store::announce_logout`]).
    logouts: broadcast::Sender<String>,
    /// Background tasks asked for by any instance (see [`Store::announce_tasks`]).
    tasks: broadcast::Sender<String>,
    max_idle: usize,
    lock_sessions: jobs::LockSessions,
    /// Where instances share buckets and failures when not in Postgres.
    redis: Option<Arc<shared::Redis>>,
}

pub(crate) const NOTIFY_CHANNEL: &str = "mmrctl_media_uploaded";
/// Logouts, so that every instance drops the tokens from its cache.
const LOGOUT_CHANNEL: &str = "mmrctl_logouts";
/// Background tasks to look at (one created, an import's part added), so that whichever
/// instance runs or waits on it looks now.
const TASKS_CHANNEL: &str = "mmrctl_tasks";
/// What logout subscribers get when announcements may have been missed (the listening
/// connection was lost): drop every cached token.
pub const LOGOUTS_MISSED: &str = "missed";
/// Serialises everything that creates or deletes the object with this hash.
pub(crate) const LOCK_HASH: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";
/// Serialises one user's quota checks with what they count (uploads, `/create`).
pub(crate) const LOCK_USER: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 1))";

/// A user's usage: bytes and files uploaded, reservations pending (`$1` the user, `$2` now).
pub(crate) const USAGE: &str = "SELECT COALESCE(SUM(o.size_bytes), 0)::BIGINT,
            COUNT(m.sha256),
            COUNT(*) FILTER (WHERE m.sha256 IS NULL AND m.expires_ts > $2)
     FROM media m LEFT JOIN objects o ON o.sha256 = m.sha256
     WHERE m.user_id = $1";

pub(crate) fn usage_from_row(row: &tokio_postgres::Row) -> Usage {
    let n = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    Usage {
        bytes: n(0),
        files: n(1),
        pending: n(2),
    }
}

impl Store {
    /// Connects with a bounded pool, applies migrations, opens the datastores and starts listening for
    /// completed uploads (from any instance).
    pub async fn open(config: &config::Config) -> Result<Store, Error> {
        let pg: tokio_postgres::Config = config.database.postgres.parse().map_err(|e| {
            Error::Config(format!(
                "database.postgres is not a valid connection URL: {e}"
            ))
        })?;
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let max_size = config.database.pool.max_connections.max(1) as usize;
        let pool = Pool::builder(manager)
            .max_size(max_size)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(format!("database pool: {e}")))?;
        let datastores = Arc::new(Datastores::from_config(config)?);
        let redis = shared::Redis::from_config(config)?.map(Arc::new);
        {
            let setup = |doing: &str, e: Error| Error::Setup {
                target: connect_target(&pg),
                retryable: e.is_unavailable(),
                detail: match &e {
                    Error::Database(pg) => format!("{doing}: {}", describe_pg(pg)),
                    other => format!("{doing}: {other}"),
                },
            };
            let mut client = pool
                .get()
                .await
                .map_err(|e| setup("cannot connect", e.into()))?;
            schema::migrate(&mut client)
                .await
                .map_err(|e| setup("cannot apply the schema", e))?;
            let in_use = client
                .query("SELECT DISTINCT datastore_id FROM objects", &[])
                .await?;
            for row in in_use {
                let id: String = row.get(0);
                if datastores.get(&id).is_none() {
                    return Err(Error::UnknownDatastore(id));
                }
            }
        }
        let (uploads, _) = broadcast::channel(1024);
        let (logouts, _) = broadcast::channel(1024);
        let (tasks, _) = broadcast::channel(16);
        Ok(Store {
            pool,
            pg,
            datastores,
            uploads,
            logouts,
            tasks,
            max_idle: config.database.pool.max_idle_connections as usize,
            lock_sessions: jobs::LockSessions::default(),
            redis,
        })
    }

    /// What a long-running store needs done in the background, for as long as it runs: relaying
    /// completed uploads announced by any instance (`NOTIFY`) to the waiters here, and closing idle
    /// connections beyond `maxIdleConnections`. The server runs it among its tasks; commands that
    /// only read or write a batch do without.
    pub async fn maintain(&self) {
        tokio::join!(
            listen(
                self.pg.clone(),
                self.uploads.clone(),
                self.logouts.clone(),
                self.tasks.clone()
            ),
            trim_idle(self.pool.clone(), self.max_idle)
        );
    }

    pub fn datastores(&self) -> &Datastores {
        &self.datastores
    }

    pub fn pool_status(&self) -> PoolStatus {
        let s = self.pool.status();
        PoolStatus {
            max_size: s.max_size,
            size: s.size,
            available: s.available,
            waiting: s.waiting,
        }
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        Ok(self.pool.get().await?)
    }

    /// Tells every instance on the database (this one too) about a logout: `what` names the
    /// tokens that stopped working, in a form that is no secret (a hash, a user id).
    pub async fn announce_logout(&self, what: &str) -> Result<(), Error> {
        self.client()
            .await?
            .query_one("SELECT pg_notify($1, $2)", &[&LOGOUT_CHANNEL, &what])
            .await?;
        Ok(())
    }

    /// Tells every instance (this one too) to look at the background tasks.
    pub async fn announce_tasks(&self) -> Result<(), Error> {
        self.client()
            .await?
            .query_one("SELECT pg_notify($1, '')", &[&TASKS_CHANNEL])
            .await?;
        Ok(())
    }

    /// Subscribes to [`Store::announce_tasks`] from any instance.
    pub fn subscribe_tasks(&self) -> broadcast::Receiver<String> {
        self.tasks.subscribe()
    }

    /// Subscribes to logouts announced by any instance.
    pub fn subscribe_logouts(&self) -> broadcast::Receiver<String> {
        self.logouts.subscribe()
    }

    /// Subscribes to completed uploads (`origin/media_id`), to wake requests waiting for them.
    pub fn subscribe_uploads(&self) -> broadcast::Receiver<String> {
        self.uploads.subscribe()
    }

    pub async fn media(&self, origin: &str, media_id: &str) -> Result<Option<Media>, Error> {
        static SELECT_MEDIA: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {MEDIA_COLUMNS} FROM media m LEFT JOIN objects o ON o.sha256 = m.sha256
                 WHERE m.origin = $1 AND m.media_id = $2"
            )
        });
        let client = self.client().await?;
        // Every download asks: prepared once per connection, one round trip after that.
        let select = client.prepare_cached(&SELECT_MEDIA).await?;
        let row = client.query_opt(&select, &[&origin, &media_id]).await?;
        row.map(|r| media_from_row(&r)).transpose()
    }

    /// Opens an object's bytes, `len` bytes from `start`.
    pub async fn read(
        &self,
        object: &ObjectRef,
        start: u64,
        len: Option<u64>,
    ) -> Result<Reader, Error> {
        let ds = self
            .datastores
            .get(&object.datastore_id)
            .ok_or_else(|| Error::UnknownDatastore(object.datastore_id.clone()))?;
        ds.open(&object.location, start, len).await
    }

    /// Reserves a media id for an MSC2246 upload by `user_id`, refusing past `max_pending`.
    pub async fn create_pending(
        &self,
        origin: &str,
        user_id: &str,
        expires_ts: i64,
        requires_auth: bool,
        max_pending: u32,
    ) -> Result<String, Error> {
        let mut client = self.client().await?;
        for _ in 0..3 {
            let tx = client.transaction().await?;
            // One user's creates are serialized, so the count below cannot be raced past.
            tx.execute(LOCK_USER, &[&user_id]).await?;
            if max_pending > 0 {
                let pending: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM media WHERE user_id = $1 AND sha256 IS NULL AND expires_ts > $2",
                        &[&user_id, &now_ms()],
                    )
                    .await?
                    .get(0);
                if pending >= i64::from(max_pending) {
                    return Err(Error::TooManyPending(max_pending));
                }
            }
            let media_id = ids::new_media_id().map_err(|e| Error::Io(std::io::Error::other(e)))?;
            let inserted = tx
                .execute(
                    "INSERT INTO media (origin, media_id, kind, user_id, created_ts, requires_auth, expires_ts)
                     VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                    &[&origin, &media_id, &MediaKind::LocalMedia.as_str(), &user_id, &now_ms(), &requires_auth, &expires_ts],
                )
                .await?;
            if inserted == 1 {
                tx.commit().await?;
                return Ok(media_id);
            }
        }
        Err(Error::MediaIdTaken)
    }

    /// Checks that `user_id` may upload into the pending id now (before reading the body).
    pub async fn check_pending(
        &self,
        origin: &str,
        media_id: &str,
        user_id: &str,
    ) -> Result<(), Error> {
        match self.media(origin, media_id).await? {
            None => Err(Error::PendingNotFound),
            Some(m) => pending_state(&m, user_id),
        }
    }

    pub async fn usage(&self, user_id: &str) -> Result<Usage, Error> {
        let client = self.client().await?;
        let usage = client.prepare_cached(USAGE).await?;
        Ok(usage_from_row(
            &client.query_one(&usage, &[&user_id, &now_ms()]).await?,
        ))
    }

    /// A page of the objects in datastore `id`, in hash order after `after` (start with "").
    pub(crate) async fn objects_page(
        &self,
        id: &str,
        after: &str,
        limit: i64,
    ) -> Result<Vec<ObjectRef>, Error> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT sha256, size_bytes, location FROM objects
                 WHERE datastore_id = $1 AND sha256 > $2 ORDER BY sha256 LIMIT $3",
                &[&id, &after, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ObjectRef {
                sha256: r.get(0),
                size: u64::try_from(r.get::<_, i64>(1)).unwrap_or(0),
                datastore_id: id.to_owned(),
                location: r.get(2),
            })
            .collect())
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }
}

fn pending_state(m: &Media, user_id: &str) -> Result<(), Error> {
    if m.object.is_some() {
        Err(Error::CannotOverwrite)
    } else if m.user_id != user_id {
        Err(Error::PendingOtherUser)
    } else if m.expires_ts.is_some_and(|t| t <= now_ms()) {
        Err(Error::PendingExpired)
    } else {
        Ok(())
    }
}

/// The kind a media row records (never `all`).
fn kind_of_row(name: &str) -> Result<MediaKind, Error> {
    MediaKind::from_name(name)
        .filter(|k| *k != MediaKind::All)
        .ok_or_else(|| Error::Corrupt(format!("unknown media kind `{name}`")))
}

/// What [`media_from_row`] reads, from `media m` and `objects o`.
pub(crate) const MEDIA_COLUMNS: &str =
    "m.origin, m.media_id, m.kind, m.content_type, m.upload_name, m.user_id, m.created_ts,
     m.quarantined, m.requires_auth, m.expires_ts, o.sha256, o.size_bytes, o.datastore_id, o.location";

pub(crate) fn media_from_row(r: &tokio_postgres::Row) -> Result<Media, Error> {
    let sha256: Option<String> = r.get(10);
    let object = sha256.map(|sha256| ObjectRef {
        sha256,
        size: u64::try_from(r.get::<_, i64>(11)).unwrap_or(0),
        datastore_id: r.get(12),
        location: r.get(13),
    });
    Ok(Media {
        origin: r.get(0),
        media_id: r.get(1),
        kind: kind_of_row(r.get(2))?,
        content_type: r.get(3),
        upload_name: r.get(4),
        user_id: r.get(5),
        created_ts: r.get(6),
        quarantined: r.get(7),
        requires_auth: r.get(8),
        expires_ts: r.get(9),
        object,
    })
}

/// Relays `NOTIFY` of completed uploads and of logouts to in-process subscribers; reconnects with
/// backoff.
async fn listen(
    pg: tokio_postgres::Config,
    uploads: broadcast::Sender<String>,
    logouts: broadcast::Sender<String>,
    tasks: broadcast::Sender<String>,
) {
    use futures_util::StreamExt as _;
    let mut backoff = Duration::from_millis(500);
    let mut connected_before = false;
    loop {
        match pg.connect(NoTls).await {
            Ok((client, mut connection)) => {
                backoff = Duration::from_millis(500);
                let mut messages =
                    futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                let statement = format!(
                    "LISTEN {NOTIFY_CHANNEL}; LISTEN {LOGOUT_CHANNEL}; LISTEN {TASKS_CHANNEL}"
                );
                let listen = client.batch_execute(&statement);
                // The connection must be polled for the LISTEN to complete.
                tokio::pin!(listen);
                let mut listening = false;
                loop {
                    tokio::select! {
                        r = &mut listen, if !listening => {
                            if let Err(e) = r {
                                tracing::warn!(error = %e, "cannot listen for upload notifications");
                                break;
                            }
                            listening = true;
                            // Logouts announced while no connection listened were missed.
                            if connected_before {
                                let _ = logouts.send(LOGOUTS_MISSED.to_owned());
                            }
                            connected_before = true;
                        }
                        msg = messages.next() => match msg {
                            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                                let to = match n.channel() {
                                    LOGOUT_CHANNEL => &logouts,
                                    TASKS_CHANNEL => &tasks,
                                    _ => &uploads,
                                };
                                let _ = to.send(n.payload().to_owned());
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "upload notification connection failed");
                                break;
                            }
                            None => break,
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect to listen for upload notifications")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Closes idle connections beyond `database.pool.maxIdleConnections`.
async fn trim_idle(pool: Pool, max_idle: usize) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let mut kept = 0;
        pool.retain(|_, metrics| {
            kept += 1;
            kept <= max_idle || metrics.last_used() < Duration::from_secs(60)
        });
    }
}
