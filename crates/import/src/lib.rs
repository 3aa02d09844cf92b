//! Imports the media a Synapse or a Dendrite holds into the media repo's store.
//!
//! Rows come from the homeserver's database (Synapse `local_media_repository`, and `remote_media_cache`
//! when asked; Dendrite `mediaapi_media_repository`), read in keyset-paginated pages. Files come from
//! the homeserver's media directory, or, where one is missing, from the homeserver's authenticated
//! download endpoint with an admin token. Every item goes through the store's one upload pipeline
//! under its original media id, so it is deduplicated and placed like any upload.
//!
//! - **Resumable**: ids already in the store are checked (size, hash, object present), not written.
//! - **Per-item errors never stop a run**: they are retried once and reported with their reason.
//! - **Nothing half-written**: the expected size and (when the source knows it) SHA-256 are enforced
//!   while streaming, so a short, long or corrupt file fails before any row is written.
//! - **Flat memory**: one page of rows and a bounded queue (a few items per worker) at a time.

mod item;
mod source;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;

pub use item::Reason;
use item::{Fetcher, Item, Outcome};
use source::Source;

/// The homeserver whose media is imported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Homeserver {
    Synapse,
    Dendrite,
}

impl Homeserver {
    pub fn name(self) -> &'static str {
        match self {
            Homeserver::Synapse => "Synapse",
            Homeserver::Dendrite => "Dendrite",
        }
    }
}

/// What a run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Import what is missing, check what is already there.
    #[default]
    Import,
    /// Report what would be imported; write nothing.
    DryRun,
    /// Only check: every row present, every object's size and SHA-256 right.
    Verify,
}

/// Where missing files are fetched from: the homeserver's client API, with an admin's token (a
/// server admin may fetch quarantined media).
#[derive(Debug, Clone)]
pub struct Fetch {
    pub base_url: String,
    pub access_token: String,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub homeserver: Homeserver,
    /// The homeserver's database.
    pub database: tokio_postgres::Config,
    /// The homeserver's name: the origin of its local media.
    pub server_name: String,
    /// Synapse's `media_store_path` or Dendrite's `media_api.base_path`; `None` fetches every file.
    pub media_path: Option<PathBuf>,
    pub fetch: Option<Fetch>,
    pub workers: usize,
    /// Also import cached remote media (as `remote_media`).
    pub include_remote: bool,
    /// Also import Synapse's URL-preview cache media.
    pub include_url_cache: bool,
    pub mode: Mode,
}

/// Fatal errors: the run could not start or could not go on. Per-item problems are [`Reason`]s in
/// the [`Report`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to the {homeserver} database {target}: {message}")]
    Connect {
        homeserver: &'static str,
        target: String,
        message: String,
    },
    #[error("reading the {homeserver} database failed ({what}): {message}")]
    Query {
        homeserver: &'static str,
        what: &'static str,
        message: String,
    },
    /// The database is not what was expected (wrong database, wrong server name).
    #[error("{0}")]
    Source(String),
    #[error("media directory {path}: {message}")]
    MediaDir { path: String, message: String },
    #[error("the media repo's store: {0}")]
    Store(#[from] store::Error),
    #[error("HTTP client: {0}")]
    Http(String),
}

/// Live counters, for a progress bar or periodic log lines; [`Progress::cancel`] stops a run after
/// the items in flight.
#[derive(Debug, Default)]
pub struct Progress {
    total_items: AtomicU64,
    total_bytes: AtomicU64,
    done_items: AtomicU64,
    done_bytes: AtomicU64,
    failed: AtomicU64,
    retrying: AtomicBool,
    cancelled: AtomicBool,
}

/// A copy of [`Progress`]'s counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub total_items: u64,
    pub total_bytes: u64,
    pub done_items: u64,
    pub done_bytes: u64,
    pub failed: u64,
    /// The run is retrying failed items (the counters no longer move towards the totals).
    pub retrying: bool,
}

impl Progress {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            total_items: self.total_items.load(Ordering::Relaxed),
            total_bytes: self.total_bytes.load(Ordering::Relaxed),
            done_items: self.done_items.load(Ordering::Relaxed),
            done_bytes: self.done_bytes.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retrying: self.retrying.load(Ordering::Relaxed),
        }
    }

    /// Stops handing out items; those in flight finish.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }
}

/// An item that failed, with why.
#[derive(Debug, Clone)]
pub struct Failure {
    /// `mxc://origin/media_id`.
    pub mxc: String,
    pub reason: Reason,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub mode: Mode,
    /// Rows of the source that were considered.
    pub items: u64,
    /// Imported now (new media rows).
    pub imported: u64,
    pub imported_bytes: u64,
    /// Of those, content the store already had (no new object).
    pub deduplicated: u64,
    /// Of those, files fetched from the homeserver because they were missing on disk.
    pub fetched: u64,
    /// Already in the store and checked (in verify mode: verified).
    pub already_imported: u64,
    /// Quarantines added on the homeserver since an earlier run, carried over now.
    pub quarantine_updated: u64,
    /// Dry run: what would be imported.
    pub would_import: u64,
    pub would_import_bytes: u64,
    /// Rows left out: pending uploads (no content yet).
    pub skipped_pending: u64,
    /// Rows left out: Synapse's URL-preview cache (unless asked for).
    pub skipped_url_cache: u64,
    /// Rows left out: cached remote media (unless asked for).
    pub skipped_remote: u64,
    /// Items that failed once and succeeded on the retry.
    pub recovered_on_retry: u64,
    pub failures: Vec<Failure>,
    /// Stopped early ([`Progress::cancel`]).
    pub interrupted: bool,
}

impl Report {
    pub fn succeeded(&self) -> bool {
        self.failures.is_empty() && !self.interrupted
    }
}

/// Rows read from the source per query.
const PAGE: i64 = 500;

/// Runs an import (or a dry run, or a verification) into `store`.
pub async fn run(
    store: &store::Store,
    options: &Options,
    progress: Arc<Progress>,
) -> Result<Report, Error> {
    if let Some(dir) = &options.media_path {
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::MediaDir {
                    path: dir.display().to_string(),
                    message: "not a directory".to_owned(),
                });
            }
            Err(e) => {
                return Err(Error::MediaDir {
                    path: dir.display().to_string(),
                    message: e.to_string(),
                });
            }
        }
    }
    let source = Source::connect(options).await?;
    source.check_server_name().await?;
    let totals = source.totals().await?;
    progress.total_items.store(totals.items, Ordering::Relaxed);
    progress.total_bytes.store(totals.bytes, Ordering::Relaxed);
    tracing::info!(
        items = totals.items,
        bytes = totals.bytes,
        skipped_pending = totals.pending,
        skipped_url_cache = totals.url_cache,
        skipped_remote = totals.remote,
        "Found media to {}",
        match options.mode {
            Mode::Import => "import",
            Mode::DryRun => "consider (dry run)",
            Mode::Verify => "verify",
        }
    );

    let fetcher = options
        .fetch
        .as_ref()
        .map(Fetcher::new)
        .transpose()
        .map_err(|e| Error::Http(e.to_string()))?;
    let workers = options.workers.max(1);
    let ctx = Arc::new(Ctx {
        store: store.clone(),
        mode: options.mode,
        fetcher,
        progress: progress.clone(),
        tally: Tally::default(),
        failed: Mutex::new(Vec::new()),
    });

    // The first pass: the producer pages through the source, the workers import.
    let (tx, rx) = mpsc::channel::<Item>(workers * 4);
    let producer = tokio::spawn(produce(source, store.clone(), tx, progress.clone()));
    run_workers(&ctx, rx, workers, false).await;
    let produced = producer
        .await
        .map_err(|e| Error::Source(format!("the reader task failed: {e}")))?;

    // The retry: every failed item once more, now that the rest is done.
    let first_failures = std::mem::take(&mut *lock(&ctx.failed));
    if !first_failures.is_empty() && !progress.is_cancelled() {
        tracing::info!(items = first_failures.len(), "Retrying failed items once");
        progress.retrying.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (tx, rx) = mpsc::channel::<Item>(workers * 4);
        let feeder = tokio::spawn(async move {
            for (item, _) in first_failures {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        run_workers(&ctx, rx, workers, true).await;
        let _ = feeder.await;
    } else {
        lock(&ctx.failed).extend(first_failures);
    }
    // A failure to read the source is fatal, but only after what was read has been imported.
    produced?;

    let t = &ctx.tally;
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut failures: Vec<Failure> = std::mem::take(&mut *lock(&ctx.failed))
        .into_iter()
        .map(|(item, reason)| Failure {
            mxc: item.mxc(),
            reason,
        })
        .collect();
    failures.sort_by(|a, b| a.mxc.cmp(&b.mxc));
    Ok(Report {
        mode: options.mode,
        items: totals.items,
        imported: load(&t.imported),
        imported_bytes: load(&t.imported_bytes),
        deduplicated: load(&t.deduplicated),
        fetched: load(&t.fetched),
        already_imported: load(&t.already),
        quarantine_updated: load(&t.quarantine_updated),
        would_import: load(&t.would_import),
        would_import_bytes: load(&t.would_import_bytes),
        skipped_pending: totals.pending,
        skipped_url_cache: totals.url_cache,
        skipped_remote: totals.remote,
        recovered_on_retry: load(&t.recovered),
        failures,
        interrupted: progress.is_cancelled(),
    })
}

/// What the workers share.
struct Ctx {
    store: store::Store,
    mode: Mode,
    fetcher: Option<Fetcher>,
    progress: Arc<Progress>,
    tally: Tally,
    /// Items that failed (with their latest reason).
    failed: Mutex<Vec<(Item, Reason)>>,
}

#[derive(Debug, Default)]
struct Tally {
    imported: AtomicU64,
    imported_bytes: AtomicU64,
    deduplicated: AtomicU64,
    fetched: AtomicU64,
    already: AtomicU64,
    quarantine_updated: AtomicU64,
    would_import: AtomicU64,
    would_import_bytes: AtomicU64,
    recovered: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Pages through the source, marks the ids the store already has, and queues the items.
async fn produce(
    mut source: Source,
    store: store::Store,
    tx: mpsc::Sender<Item>,
    progress: Arc<Progress>,
) -> Result<(), Error> {
    loop {
        if progress.is_cancelled() {
            return Ok(());
        }
        let Some(mut items) = source.next_page(PAGE).await? else {
            return Ok(());
        };
        mark_present(&store, &mut items).await?;
        for item in items {
            if tx.send(item).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// One query per origin in the page: which of these ids the store has.
async fn mark_present(store: &store::Store, items: &mut [Item]) -> Result<(), Error> {
    let mut start = 0;
    while start < items.len() {
        let origin = items[start].origin.clone();
        let end = items[start..]
            .iter()
            .position(|i| i.origin != origin)
            .map_or(items.len(), |n| start + n);
        let ids: Vec<String> = items[start..end]
            .iter()
            .map(|i| i.media_id.clone())
            .collect();
        let present = store.existing_media(&origin, &ids).await?;
        for item in &mut items[start..end] {
            item.present = present.contains(&item.media_id);
        }
        start = end;
    }
    Ok(())
}

async fn run_workers(ctx: &Arc<Ctx>, rx: mpsc::Receiver<Item>, workers: usize, retry: bool) {
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let ctx = ctx.clone();
        let rx = rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                if ctx.progress.is_cancelled() {
                    return;
                }
                let next = rx.lock().await.recv().await;
                let Some(item) = next else { return };
                let outcome =
                    item::process(&ctx.store, ctx.mode, ctx.fetcher.as_ref(), &item).await;
                record(&ctx, item, outcome, retry);
            }
        }));
    }
    for task in tasks {
        if let Err(e) = task.await {
            tracing::error!(error = %e, "an import worker failed");
        }
    }
}

fn record(ctx: &Ctx, item: Item, outcome: Outcome, retry: bool) {
    let t = &ctx.tally;
    let p = &ctx.progress;
    let add = |a: &AtomicU64, n: u64| {
        a.fetch_add(n, Ordering::Relaxed);
    };
    if !retry {
        add(&p.done_items, 1);
        add(&p.done_bytes, item.size);
    }
    match outcome {
        Outcome::Imported {
            bytes,
            deduplicated,
            fetched,
        } => {
            add(&t.imported, 1);
            add(&t.imported_bytes, bytes);
            add(&t.deduplicated, u64::from(deduplicated));
            add(&t.fetched, u64::from(fetched));
        }
        Outcome::Already { quarantine_updated } => {
            add(&t.already, 1);
            add(&t.quarantine_updated, u64::from(quarantine_updated));
        }
        Outcome::WouldImport { bytes } => {
            add(&t.would_import, 1);
            add(&t.would_import_bytes, bytes);
        }
        Outcome::Failed(reason) => {
            tracing::debug!(mxc = %item.mxc(), %reason, retry, "item failed");
            if !retry {
                add(&p.failed, 1);
            }
            lock(&ctx.failed).push((item, reason));
            return;
        }
    }
    if retry {
        add(&t.recovered, 1);
        p.failed.fetch_sub(1, Ordering::Relaxed);
    }
}
