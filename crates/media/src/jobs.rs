//! Recurring work: a runner that `mmrctl serve` owns, with each job that touches shared state run
//! by one instance at a time across every instance on the database, at most `tasks.numWorkers`
//! jobs at once (read at start), and everything cancelled and awaited when the server stops.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use store::admin::Selection;

use crate::{Error, Service};

/// A temp file nothing wrote to for this long was left by a crash (a live upload writes at least
/// every `connections.bodyTimeoutSeconds`, and placing a file on S3 takes far less).
const STALE_TEMP_FILE: Duration = Duration::from_secs(24 * 3600);

/// How often access times are written (`purge/old` and `purge_media_cache` go by them).
const ACCESS_FLUSH: Duration = Duration::from_secs(60);

/// For tests of the runner: each job holds its lock this long (seconds) before it runs, so that who
/// holds it can be seen and the holder killed.
const HOLD_VAR: &str = "MMRCTL_TEST_JOB_HOLD_SECONDS";

/// One recurring job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// Asynchronous uploads reserved with `/create` whose time ran out without content; and
    /// file deletions a crash interrupted (`pending_deletions`).
    ExpireReservations,
    /// Temp files a crash left in the datastores.
    StaleTempFiles,
    /// `thumbnails.expireAfterDays`: thumbnails older than that are deleted (made again when
    /// asked for), and their objects when nothing else uses them.
    ExpireThumbnails,
    /// `urlPreviews.expireAfterDays`: previews older than that are deleted (fetched again when
    /// asked for), and remembered failures whose time ran out.
    ExpirePreviews,
    /// `downloads.expireAfterDays`: remote media cached longer than that is deleted (fetched
    /// again when asked for), with its thumbnails.
    ExpireRemoteMedia,
    /// GDPR exports older than [`EXPORTS_KEPT_DAYS`] are deleted with their parts.
    ExpireExports,
}

/// How long a GDPR export stays downloadable.
pub const EXPORTS_KEPT_DAYS: u32 = 7;

impl Job {
    pub const ALL: [Job; 6] = [
        Job::ExpireReservations,
        Job::StaleTempFiles,
        Job::ExpireThumbnails,
        Job::ExpirePreviews,
        Job::ExpireRemoteMedia,
        Job::ExpireExports,
    ];

    /// The job's name, in logs and in its lock.
    pub fn name(self) -> &'static str {
        match self {
            Job::ExpireReservations => "expire-reservations",
            Job::StaleTempFiles => "stale-temp-files",
            Job::ExpireThumbnails => "expire-thumbnails",
            Job::ExpirePreviews => "expire-previews",
            Job::ExpireRemoteMedia => "expire-remote-media",
            Job::ExpireExports => "expire-exports",
        }
    }

    /// Whether every instance runs the job for itself: temp files sit in each instance's own
    /// directories, and deleting one twice is harmless.
    fn everywhere(self) -> bool {
        matches!(self, Job::StaleTempFiles)
    }

    /// How long from one run to the next.
    pub fn every(self, config: &Config) -> Duration {
        match self {
            // As often as reservations can expire, within [1 s, 10 min].
            Job::ExpireReservations => {
                Duration::from_secs(config.uploads.max_age_seconds.clamp(1, 600))
            }
            Job::StaleTempFiles
            | Job::ExpireThumbnails
            | Job::ExpirePreviews
            | Job::ExpireRemoteMedia
            | Job::ExpireExports => Duration::from_secs(3600),
        }
    }

    /// Runs the job once; says what it did.
    pub async fn run(self, service: &Service, config: &Config) -> Result<String, Error> {
        let store = service.store();
        Ok(match self {
            Job::ExpireReservations => {
                let n = store.delete_expired_reservations().await?;
                let files = store.finish_pending_deletions().await?;
                let shared = store.expire_shared().await?;
                format!(
                    "{n} expired reservations deleted, {files} interrupted file deletions finished, {shared} idle shared buckets and notes deleted"
                )
            }
            Job::StaleTempFiles => {
                let n = store.delete_stale_temp_files(STALE_TEMP_FILE).await?;
                format!("{n} stale temp files deleted")
            }
            Job::ExpireThumbnails => match config.thumbnails.expire_after_days {
                0 => "thumbnails do not expire (thumbnails.expireAfterDays is 0)".to_owned(),
                days => {
                    let before = days_ago(days);
                    let n = store.expire_thumbnails(before).await?;
                    format!("{n} thumbnails older than {days} days deleted")
                }
            },
            Job::ExpirePreviews => {
                // 0 keeps previews (MMR's meaning); expired failures go either way.
                let days = config.url_previews.expire_after_days;
                let before = match days {
                    0 => i64::MIN,
                    d => days_ago(d),
                };
                let n = store.expire_previews(before).await?;
                format!("{n} URL previews deleted (urlPreviews.expireAfterDays: {days})")
            }
            Job::ExpireRemoteMedia => match config.downloads.expire_after_days {
                0 => "remote media does not expire (downloads.expireAfterDays is 0)".to_owned(),
                days => {
                    let before = days_ago(days);
                    let n = store
                        .purge(&Selection::Remote { before_ts: before }, None, |_| {})
                        .await?
                        .media;
                    format!("{n} remote media cached over {days} days ago deleted")
                }
            },
            Job::ExpireExports => {
                let n = store.expire_exports(days_ago(EXPORTS_KEPT_DAYS)).await?;
                format!("{n} exports older than {EXPORTS_KEPT_DAYS} days deleted")
            }
        })
    }
}

/// The time (ms) `days` days ago: where an `expireAfterDays` cuts.
fn days_ago(days: u32) -> i64 {
    store::now_ms() - i64::from(days) * 86_400_000
}

/// The running jobs, and whatever else runs for as long as the server does.
pub struct Runner {
    tasks: JoinSet<()>,
}

impl Runner {
    /// Starts every job, each first right away; `config` gives the config in force (it changes on
    /// reload).
    pub fn start(
        service: Service,
        config: impl Fn() -> Arc<Config> + Send + Sync + 'static,
    ) -> Runner {
        let config = Arc::new(config);
        let workers = Arc::new(Semaphore::new(config().tasks.num_workers.max(1) as usize));
        let hold = std::env::var(HOLD_VAR)
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs);
        let mut tasks = JoinSet::new();
        {
            let service = service.clone();
            tasks.spawn(async move { service.store().maintain().await });
        }
        {
            let (service, workers) = (service.clone(), workers.clone());
            tasks.spawn(async move { run_tasks(service, workers).await });
        }
        {
            // Every instance writes the access times it noted.
            let service = service.clone();
            tasks.spawn(async move {
                loop {
                    tokio::time::sleep(ACCESS_FLUSH).await;
                    if let Err(e) = service.flush_accesses().await {
                        tracing::warn!(error = %e, "access times not recorded");
                    }
                }
            });
        }
        for job in Job::ALL {
            let (service, config, workers) = (service.clone(), config.clone(), workers.clone());
            tasks.spawn(async move {
                loop {
                    if let Ok(_permit) = workers.acquire().await {
                        run_once(job, &service, &config(), hold).await;
                    }
                    tokio::time::sleep(job.every(&config())).await;
                }
            });
        }
        Runner { tasks }
    }

    /// Runs `task` beside the jobs, for as long as the server does (stopped with them).
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Stops the jobs and waits until they have: a running one is cancelled where it is, which
    /// every job is built to survive (each step is one statement or one file, and a later run
    /// carries on), so that stopping never waits on a long run.
    pub async fn stop(mut self) {
        self.tasks.shutdown().await;
    }
}

/// Runs the unfinished background tasks no instance runs: at start, when woken (a task was
/// recorded or given input here, or announced by another instance), and every [`crate::tasks::RESUME_EVERY`] (one whose instance died). Each runs
/// with a worker's permit; cancelled with the runner, they stay unfinished and resume later.
async fn run_tasks(service: Service, workers: Arc<Semaphore>) {
    // The tasks running here, each with whether it was asked for again meanwhile: a wake that
    // came while a run was reading its input (an import's next part) must not be lost.
    let running = Arc::new(std::sync::Mutex::new(HashMap::<i64, bool>::new()));
    let mut set = JoinSet::new();
    let mut announced = service.store().subscribe_tasks();
    loop {
        match service.store().tasks(true).await {
            Ok(rows) => {
                for row in rows {
                    match running
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(row.id)
                    {
                        Entry::Occupied(mut asked_again) => {
                            asked_again.insert(true);
                            continue;
                        }
                        Entry::Vacant(v) => {
                            v.insert(false);
                        }
                    }
                    let (service, workers, running) =
                        (service.clone(), workers.clone(), running.clone());
                    set.spawn(async move {
                        let id = row.id;
                        if let Ok(_permit) = workers.acquire().await {
                            service.run_task(row).await;
                        }
                        let asked_again = running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&id);
                        if asked_again == Some(true) {
                            service.wake_local_tasks();
                        }
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list background tasks; trying again later")
            }
        }
        while set.try_join_next().is_some() {}
        tokio::select! {
            () = tokio::time::sleep(crate::tasks::RESUME_EVERY) => {}
            () = service.tasks_wanted() => {}
            // Lagging only means several announcements: one look serves them all.
            _ = announced.recv() => {}
        }
    }
}

/// One run: when the job is one instance's at a time, only with its lock (else another instance
/// is running it), and stopped if the lock is lost midway.
async fn run_once(job: Job, service: &Service, config: &Config, hold: Option<Duration>) {
    let name = job.name();
    let mut lock = if job.everywhere() {
        None
    } else {
        match service.store().try_lock_job(name).await {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => {
                tracing::debug!(job = name, "running on another instance");
                return;
            }
            Err(e) => {
                tracing::warn!(job = name, error = %e, "cannot take the job's lock; trying again later");
                return;
            }
        }
    };
    tracing::info!(job = name, "job started");
    let run = async {
        if let Some(hold) = hold {
            tokio::time::sleep(hold).await;
        }
        job.run(service, config).await
    };
    let lost = async {
        match &mut lock {
            Some(lock) => lock.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        result = run => match result {
            Ok(did) => tracing::info!(job = name, result = %did, "job finished"),
            Err(e) => tracing::warn!(job = name, error = %e, "job failed; it runs again later"),
        },
        () = lost => {
            tracing::warn!(job = name, "the job's lock was lost (its database session ended): run stopped");
        }
    }
    if let Some(lock) = lock {
        lock.release().await;
    }
}
