//! Background tasks an operator starts (a datastore transfer, a purge): recorded as rows first,
//! then run by whichever instance takes the task's lock, so that a task survives the instance
//! that started it. Every task can stop anywhere and carries on when run again: a restarted
//! server (or another instance, once the lock's session ended) resumes every unfinished task.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use store::admin::{PurgeReport, Selection};

use crate::{Error, Service};

/// How often a running task records its progress, at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How often an instance looks for unfinished tasks nobody runs (besides when woken).
pub(crate) const RESUME_EVERY: Duration = Duration::from_secs(30);

/// For tests of resuming: each step of a task (an object moved, a content purged) waits this long
/// (milliseconds), so that a server can be stopped in the middle of one.
const STEP_PAUSE_VAR: &str = "MMRCTL_TEST_TASK_STEP_MS";

fn step_pause() -> Option<Duration> {
    std::env::var(STEP_PAUSE_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}

/// What a task does; its row's `task` and `params`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Task {
    /// matrix-media-repo's `storage_migration`: every object of one datastore to another.
    StorageMigration {
        source_datastore_id: String,
        target_datastore_id: String,
        before_ts: i64,
    },
    /// A purge too large to hold a request for.
    Purge {
        selection: Selection,
        only_origin: Option<String>,
    },
    /// matrix-media-repo's `import_data`: an archive sent through the admin API, imported as
    /// its parts arrive; finished once every media of its manifest is here, or once closed.
    ImportData {
        import_id: String,
        /// The origins whose media is local (the homeservers served when it started).
        local_origins: Vec<String>,
    },
    /// matrix-media-repo's `export_data`: a GDPR export of a user's or a server's media.
    ExportData {
        export_id: String,
        entity: String,
        include_s3_urls: bool,
        part_bytes: u64,
    },
}

impl Task {
    pub fn name(&self) -> &'static str {
        match self {
            Task::StorageMigration { .. } => "storage_migration",
            Task::Purge { .. } => "purge",
            Task::ExportData { .. } => "export_data",
            Task::ImportData { .. } => "import_data",
        }
    }
}

/// What a transfer task did, as its progress.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferProgress {
    pub total: u64,
    pub moved: u64,
    pub bytes: u64,
    pub failed: u64,
}

impl Service {
    /// Records `task` and has it started (here, unless another instance is quicker); returns its id.
    pub async fn start_task(&self, task: &Task) -> Result<i64, Error> {
        let params = serde_json::to_string(task).map_err(|e| Error::Internal(e.to_string()))?;
        let id = self.store().create_task(task.name(), &params).await?;
        self.wake_tasks().await;
        Ok(id)
    }

    /// Has the runners of every instance look for unfinished tasks now: this one's at once, the
    /// others' through the database (an import's part may arrive where its task does not run).
    pub async fn wake_tasks(&self) {
        self.wake_local_tasks();
        if let Err(e) = self.store().announce_tasks().await {
            tracing::debug!(error = %e, "tasks not announced to the other instances; they look within 30 s");
        }
    }

    /// Has this instance's runner look for unfinished tasks now.
    pub(crate) fn wake_local_tasks(&self) {
        self.tasks_wanted.notify_one();
    }

    /// Resolves when someone asked for a look at the tasks ([`Service::wake_tasks`]).
    pub(crate) async fn tasks_wanted(&self) {
        self.tasks_wanted.notified().await;
    }

    /// Waits until task `id` has finished, at most `bound`; returns its row then (or as it
    /// stands when the time ran out).
    pub async fn wait_task(
        &self,
        id: i64,
        bound: Duration,
    ) -> Result<Option<store::TaskRow>, Error> {
        let start = Instant::now();
        loop {
            let row = self.store().task(id).await?;
            match &row {
                Some(r) if r.end_ts == 0 && start.elapsed() < bound => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return Ok(row),
            }
        }
    }

    /// Runs the unfinished task `row` to its end, if this instance gets its lock.
    pub(crate) async fn run_task(&self, row: store::TaskRow) {
        let mut lock = match self.store().try_lock_job(&format!("task {}", row.id)).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(task = row.id, error = %e, "cannot take the task's lock; trying again later");
                return;
            }
        };
        // Taken after a check: another instance may have finished it meanwhile.
        let row = match self.store().task(row.id).await {
            Ok(Some(r)) if r.end_ts == 0 => r,
            _ => return lock.release().await,
        };
        tracing::info!(task = row.id, name = %row.name, "task started");
        let outcome = tokio::select! {
            outcome = self.execute(&row) => Some(outcome),
            () = lock.lost() => None,
        };
        match outcome {
            None => {
                tracing::warn!(task = row.id, "the task's lock was lost: it resumes later")
            }
            Some(Ok(Step::Waiting(progress))) => {
                tracing::debug!(task = row.id, "task waits for more input");
                if let Err(e) = self.store().set_task_progress(row.id, &progress).await {
                    tracing::debug!(task = row.id, error = %e, "progress not recorded");
                }
            }
            Some(Ok(Step::Done(progress))) => {
                tracing::info!(task = row.id, "task finished");
                self.finish(row.id, &progress, "").await;
            }
            // A transient failure leaves the task unfinished, to resume.
            Some(Err(e)) if e.is_unavailable() => {
                tracing::warn!(task = row.id, error = %e, "task interrupted; it resumes later");
            }
            Some(Err(e)) => {
                tracing::warn!(task = row.id, error = %e, "task failed");
                self.finish(row.id, &row.progress, &e.to_string()).await;
            }
        }
        lock.release().await;
    }

    async fn finish(&self, id: i64, progress: &str, error: &str) {
        if let Err(e) = self.store().finish_task(id, progress, error).await {
            tracing::warn!(task = id, error = %e, "cannot record the task's end; it runs again later");
        }
    }

    /// Does the task's work; returns its progress (JSON), final unless it waits for more input.
    async fn execute(&self, row: &store::TaskRow) -> Result<Step, Error> {
        let task: Task = serde_json::from_str(&row.params).map_err(|e| {
            Error::Internal(format!(
                "task {} has parameters this mmrctl cannot read: {e}",
                row.id
            ))
        })?;
        let store = self.store();
        let mut recorder = Recorder::new(store, row.id);
        let pause = step_pause();
        // Only under test: blocks this worker thread between steps.
        let step = || {
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        };
        match task {
            Task::StorageMigration {
                source_datastore_id,
                target_datastore_id,
                ..
            } => {
                let report = store
                    .transfer(&source_datastore_id, &target_datastore_id, |report, _| {
                        recorder.record(&transfer_progress(report));
                        step();
                    })
                    .await?;
                recorder.flush().await;
                Ok(Step::Done(to_json(&transfer_progress(&report))))
            }
            Task::Purge {
                selection,
                only_origin,
            } => {
                // A resumed purge adds to what it did before.
                let before: PurgeReport = serde_json::from_str(&row.progress).unwrap_or_default();
                let report = store
                    .purge(&selection, only_origin.as_deref(), |report| {
                        recorder.record(&add(&before, report));
                        step();
                    })
                    .await?;
                recorder.flush().await;
                Ok(Step::Done(to_json(&add(&before, &report))))
            }
            // Resumed from the start: an interrupted run's parts are replaced.
            Task::ExportData {
                export_id,
                entity,
                include_s3_urls,
                part_bytes,
            } => {
                let report = crate::archives::export(
                    store,
                    &export_id,
                    &entity,
                    part_bytes,
                    include_s3_urls,
                )
                .await?;
                Ok(Step::Done(to_json(&report)))
            }
            Task::ImportData {
                import_id,
                local_origins,
            } => self.import_data(&import_id, &local_origins).await,
        }
    }

    /// One pass over an import's parts so far.
    async fn import_data(&self, import_id: &str, local_origins: &[String]) -> Result<Step, Error> {
        let store = self.store();
        let Some((objects, closed)) = store.import_parts(import_id).await? else {
            return Ok(Step::Done("{}".to_owned()));
        };
        let scratch = tempfile::Builder::new()
            .prefix(store::archives::EXPORT_TEMP_PREFIX)
            .tempdir_in(store.archives_temp_dir()?)?;
        let mut parts = Vec::with_capacity(objects.len());
        for (i, object) in objects.iter().enumerate() {
            let path = scratch.path().join(format!("part-{i}"));
            let mut reader = store.read(object, 0, None).await?;
            let mut file = tokio::fs::File::create(&path).await?;
            tokio::io::copy(&mut reader, &mut file).await?;
            parts.push(path);
        }
        let result = crate::archives::import(store, parts, |origin| {
            local_origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
        })
        .await;
        let report = match result {
            // The manifest comes with the last part.
            Err(Error::NotFound(why)) if !closed => return Ok(Step::Waiting(to_json(&why))),
            Err(e) => return Err(e),
            Ok(report) => report,
        };
        if !report.missing.is_empty() && !closed {
            return Ok(Step::Waiting(to_json(&report)));
        }
        store.delete_import(import_id).await?;
        Ok(Step::Done(to_json(&report)))
    }
}

/// Where a task's run left it.
enum Step {
    Done(String),
    /// Unfinished until more input arrives (an import's parts): run again later.
    Waiting(String),
}

fn transfer_progress(report: &store::TransferReport) -> TransferProgress {
    TransferProgress {
        total: report.total,
        moved: report.moved,
        bytes: report.bytes,
        failed: report.failed.len() as u64,
    }
}

fn add(before: &PurgeReport, now: &PurgeReport) -> PurgeReport {
    let mut affected = before.affected.clone();
    let room = store::admin::AFFECTED_LISTED.saturating_sub(affected.len());
    affected.extend(now.affected.iter().take(room).cloned());
    PurgeReport {
        media: before.media + now.media,
        thumbnails: before.thumbnails + now.thumbnails,
        objects: before.objects + now.objects,
        affected,
    }
}

fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".to_owned())
}

/// Records a task's progress at most every [`PROGRESS_EVERY`], from a synchronous callback: the
/// write runs beside the work, and the latest state is written last.
struct Recorder {
    store: store::Store,
    id: i64,
    last: Option<Instant>,
    pending: Option<tokio::task::JoinHandle<()>>,
}

impl Recorder {
    fn new(store: &store::Store, id: i64) -> Recorder {
        Recorder {
            store: store.clone(),
            id,
            last: None,
            pending: None,
        }
    }

    fn record(&mut self, progress: &impl Serialize) {
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY)
            || self.pending.as_ref().is_some_and(|p| !p.is_finished())
        {
            return;
        }
        self.last = Some(Instant::now());
        let (store, id, json) = (self.store.clone(), self.id, to_json(progress));
        self.pending = Some(tokio::spawn(async move {
            if let Err(e) = store.set_task_progress(id, &json).await {
                tracing::debug!(task = id, error = %e, "progress not recorded");
            }
        }));
    }

    /// Waits for a write in flight, so that it cannot land after the final one.
    async fn flush(&mut self) {
        if let Some(p) = self.pending.take() {
            let _ = p.await;
        }
    }
}
