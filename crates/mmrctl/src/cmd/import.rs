//! `mmrctl import synapse|dendrite`, and MMR's `import_synapse`/`import_dendrite` command lines when
//! `mmrctl` runs under those names.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use import::{Homeserver, Mode, Progress, Report};
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressStyle};
use tracing::field::{Field, Visit};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields};
use tracing_subscriber::fmt::time::{FormatTime as _, SystemTime};
use tracing_subscriber::fmt::{FmtContext, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

const AFTER_HELP: &str = "\
Exit status: 0 when every item was imported (or verified), 1 when some items failed (each is listed \
with its reason; rerun to retry them: what is imported is kept and checked), 2 when the import could \
not run (database unreachable, bad config or flags).

Run as `import_synapse` or `import_dendrite` (a link to mmrctl), it takes matrix-media-repo's flags: \
-dbName -dbHost -dbPort -dbUsername -dbPassword -serverName -baseUrl -config -workers \
(and -mediaDirectory, -verify).";

#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    source: SourceCommand,
}

#[derive(clap::Subcommand)]
enum SourceCommand {
    /// Import a Synapse's media: `local_media_repository` rows and the files under its
    /// `media_store_path`.
    #[command(after_help = AFTER_HELP)]
    Synapse(Box<Common>),
    /// Import a Dendrite's media: `mediaapi_media_repository` rows and the files under its
    /// `media_api.base_path`.
    #[command(after_help = AFTER_HELP)]
    Dendrite(Box<Common>),
}

#[derive(clap::Args)]
struct Common {
    /// The import writes where `mmrctl serve` reads.
    #[command(flatten)]
    config: crate::ConfigArg,
    /// The homeserver's database server (a host name, an address, or a Unix socket directory).
    #[arg(long, default_value = "localhost", value_name = "HOST")]
    db_host: String,
    #[arg(long, default_value_t = 5432, value_name = "PORT")]
    db_port: u16,
    #[arg(long, default_value = "matrix", value_name = "USER")]
    db_user: String,
    /// The homeserver's database [default: synapse; dendrite_mediaapi for Dendrite].
    #[arg(long, value_name = "NAME")]
    db_name: Option<String>,
    /// The database password. Left out, it is read from --db-password-file, then PGPASSWORD, then
    /// asked for on a terminal.
    #[arg(long, value_name = "PASSWORD")]
    db_password: Option<String>,
    /// A file whose first line is the database password.
    #[arg(long, value_name = "PATH", conflicts_with = "db_password")]
    db_password_file: Option<PathBuf>,
    /// The homeserver's name, the origin of its media [default: the config's only homeserver].
    #[arg(long, value_name = "NAME")]
    server_name: Option<String>,
    /// Synapse's `media_store_path` or Dendrite's `media_api.base_path` [default: ./media_store,
    /// else /matrix/synapse/storage/media-store for Synapse].
    #[arg(long, value_name = "DIR")]
    media_path: Option<PathBuf>,
    /// An admin's access token: files missing on disk are fetched from the homeserver's
    /// authenticated download endpoint with it.
    #[arg(
        long,
        env = "MMRCTL_ACCESS_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    access_token: Option<String>,
    /// The homeserver's client API, for fetching [default: the config's csApi for the server].
    #[arg(long, value_name = "URL")]
    base_url: Option<String>,
    /// Items imported at once [default: 4 per core, at most the database pool's size].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=256))]
    workers: Option<u32>,
    /// Also import the homeserver's cache of remote media (as `remote_media`).
    #[arg(long)]
    include_remote: bool,
    /// Also import Synapse's URL-preview cache.
    #[arg(long)]
    include_url_cache: bool,
    /// Report what would be imported; write nothing.
    #[arg(long, conflicts_with = "verify")]
    dry_run: bool,
    /// Only check: every row imported, every object's size and SHA-256 right.
    #[arg(long)]
    verify: bool,
    /// Accepted for matrix-media-repo compatibility and ignored: mmrctl needs no machine id.
    #[arg(long, env = "MACHINE_ID", value_name = "ID")]
    machine_id: Option<String>,
    /// Seconds between progress log lines when stderr is not a terminal.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", hide = true)]
    log_every: f64,
}

/// What the exit status says.
const EXIT_ITEMS_FAILED: u8 = 1;
const EXIT_FATAL: u8 = 2;

pub(crate) fn run(args: &Args) -> anyhow::Result<ExitCode> {
    init_logging();
    let (homeserver, common) = match &args.source {
        SourceCommand::Synapse(c) => (Homeserver::Synapse, c),
        SourceCommand::Dendrite(c) => (Homeserver::Dendrite, c),
    };
    match run_import(homeserver, common) {
        Ok(code) => Ok(code),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "Import failed");
            Ok(ExitCode::from(EXIT_FATAL))
        }
    }
}

fn run_import(homeserver: Homeserver, args: &Common) -> anyhow::Result<ExitCode> {
    match &args.machine_id {
        Some(id) => tracing::info!(
            machine_id = id.as_str(),
            "The machine id is ignored: mmrctl needs none (media ids are random and the database's \
             primary key keeps them unique across instances)"
        ),
        None => tracing::info!(
            "No machine id needed: media ids are random and the database's primary key keeps them \
             unique across instances"
        ),
    }
    if homeserver == Homeserver::Dendrite && args.include_url_cache {
        bail!(
            "--include-url-cache is for Synapse: Dendrite keeps no URL-preview cache in its media table"
        );
    }

    let config = config::Config::load_valid(&args.config.config)
        .context("the media repo's config")?
        .config;
    let server_name = server_name(&config, args.server_name.as_deref())?;
    // Absolute, so that messages name the files unambiguously.
    let media_path = media_path(homeserver, args)?.map(|p| std::fs::canonicalize(&p).unwrap_or(p));
    let fetch = match &args.access_token {
        None => None,
        Some(token) => {
            let base_url = match &args.base_url {
                Some(url) => url.clone(),
                None => config
                    .homeserver(&server_name)
                    .map(|h| h.cs_api.clone())
                    .filter(|u| !u.is_empty())
                    .with_context(|| {
                        format!("no csApi for {server_name} in the config: pass --base-url")
                    })?,
            };
            Some(import::Fetch {
                base_url,
                access_token: token.clone(),
            })
        }
    };
    let db_name = args.db_name.clone().unwrap_or_else(|| {
        match homeserver {
            Homeserver::Synapse => "synapse",
            Homeserver::Dendrite => "dendrite_mediaapi",
        }
        .to_owned()
    });
    let mut database = tokio_postgres::Config::new();
    database
        .host(&args.db_host)
        .port(args.db_port)
        .user(&args.db_user)
        .dbname(&db_name)
        .application_name("mmrctl-import");
    if let Some(password) = password(args, &db_name)? {
        database.password(password);
    }
    let pool = config.database.pool.max_connections.max(1) as usize;
    let workers = args.workers.map_or_else(
        || {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            (cores * 4).clamp(4, 32).min(pool.max(4))
        },
        |w| w as usize,
    );
    let mode = if args.verify {
        Mode::Verify
    } else if args.dry_run {
        Mode::DryRun
    } else {
        Mode::Import
    };
    let options = import::Options {
        homeserver,
        database,
        server_name: server_name.clone(),
        media_path: media_path.clone(),
        fetch,
        workers,
        include_remote: args.include_remote,
        include_url_cache: args.include_url_cache,
        mode,
    };
    tracing::info!(
        source = homeserver.name(),
        database = format!(
            "{}@{}:{}/{db_name}",
            args.db_user, args.db_host, args.db_port
        ),
        server_name = server_name.as_str(),
        media_path = media_path.as_deref().map_or_else(
            || "(none: fetching every file)".to_owned(),
            |p| p.display().to_string()
        ),
        workers,
        mode = format!("{mode:?}"),
        "Starting import"
    );

    // Each item in flight uses at most two blocking threads (reading its file, writing the object):
    // a pool sized to that keeps few threads, and so few allocator heaps.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(workers * 2 + 2)
        .build()?;
    let log_every = Duration::from_secs_f64(args.log_every.max(0.05));
    let report = runtime.block_on(async {
        let store = store::Store::open(&config)
            .await
            .context("cannot open the media repo's store (its database and datastores)")?;
        let progress = Arc::new(Progress::default());
        let cancel = progress.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("Interrupted: finishing the items in flight; rerun to resume");
                cancel.cancel();
            }
        });
        let display = ProgressDisplay::start(progress.clone(), mode, log_every);
        let result = import::run(&store, &options, progress).await;
        display.stop().await;
        result.map_err(anyhow::Error::from)
    })?;
    runtime.shutdown_timeout(Duration::from_secs(2));
    Ok(summarize(&report))
}

/// The `--server-name`, else the config's only homeserver; it must be one the media repo serves.
fn server_name(config: &config::Config, given: Option<&str>) -> anyhow::Result<String> {
    let names: Vec<&str> = config.homeservers.iter().map(|h| h.name.as_str()).collect();
    let name = match (given, names.as_slice()) {
        (Some(name), _) => name.to_owned(),
        (None, [only]) => (*only).to_owned(),
        (None, []) => {
            bail!("the media repo's config lists no homeservers: add one, or pass --server-name")
        }
        (None, _) => bail!(
            "the media repo serves several homeservers ({}): pass --server-name",
            names.join(", ")
        ),
    };
    if config.homeserver(&name).is_none() {
        bail!(
            "`{name}` is not one of the media repo's homeservers ({}): its media would be unreachable. \
             Add it to the config's `homeservers`, or pass the right --server-name",
            names.join(", ")
        );
    }
    Ok(name)
}

/// `--media-path`, else the first default that exists; `None` (fetch everything) only with a token.
fn media_path(homeserver: Homeserver, args: &Common) -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = &args.media_path {
        return Ok(Some(path.clone()));
    }
    let candidates: &[&str] = match homeserver {
        Homeserver::Synapse => &["media_store", "/matrix/synapse/storage/media-store"],
        Homeserver::Dendrite => &["media_store"],
    };
    if let Some(found) = candidates.iter().find(|c| Path::new(c).is_dir()) {
        return Ok(Some(PathBuf::from(found)));
    }
    if args.access_token.is_some() {
        tracing::warn!(
            looked_in = candidates.join(", "),
            "No media directory: every file is fetched from the homeserver"
        );
        return Ok(None);
    }
    let setting = match homeserver {
        Homeserver::Synapse => "Synapse's media_store_path",
        Homeserver::Dendrite => "Dendrite's media_api.base_path",
    };
    bail!(
        "no media directory ({} do not exist): pass --media-path ({setting}), or --access-token with \
         an admin's token to fetch the files from the homeserver",
        candidates.join(", ")
    )
}

/// --db-password, --db-password-file, PGPASSWORD, then a prompt on a terminal; else none (trust or
/// peer authentication).
fn password(args: &Common, db_name: &str) -> anyhow::Result<Option<String>> {
    if let Some(p) = &args.db_password {
        return Ok(Some(p.clone()));
    }
    if let Some(file) = &args.db_password_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read the password file {}", file.display()))?;
        return Ok(Some(text.lines().next().unwrap_or("").to_owned()));
    }
    if let Some(p) = std::env::var_os("PGPASSWORD") {
        return Ok(Some(p.to_string_lossy().into_owned()));
    }
    if std::io::stdin().is_terminal() {
        let prompt = format!(
            "Password for {}@{}:{}/{db_name} (empty for none): ",
            args.db_user, args.db_host, args.db_port
        );
        let p = rpassword::prompt_password(prompt).context("cannot read the password")?;
        return Ok(Some(p).filter(|p| !p.is_empty()));
    }
    Ok(None)
}

/// Lists the failures, then one summary line; returns the exit status.
fn summarize(r: &Report) -> ExitCode {
    let failure_msg = match r.mode {
        Mode::Verify => "Verify problem",
        Mode::DryRun => "Would fail",
        Mode::Import => "Not imported",
    };
    for f in &r.failures {
        tracing::error!(mxc = f.mxc.as_str(), reason = %f.reason, "{failure_msg}");
    }
    let failed = r.failures.len();
    match r.mode {
        Mode::Import => {
            macro_rules! summary {
                ($level:expr, $msg:literal) => {
                    tracing::event!(
                        $level,
                        imported = r.imported,
                        bytes = r.imported_bytes,
                        deduplicated = r.deduplicated,
                        fetched = r.fetched,
                        already_imported = r.already_imported,
                        quarantine_updated = r.quarantine_updated,
                        recovered_on_retry = r.recovered_on_retry,
                        failed,
                        skipped_pending = r.skipped_pending,
                        skipped_url_cache = r.skipped_url_cache,
                        skipped_remote = r.skipped_remote,
                        $msg
                    )
                };
            }
            if r.interrupted {
                summary!(tracing::Level::ERROR, "Import interrupted; rerun to resume");
                ExitCode::from(EXIT_ITEMS_FAILED)
            } else if failed > 0 {
                summary!(tracing::Level::ERROR, "Import finished with errors");
                ExitCode::from(EXIT_ITEMS_FAILED)
            } else {
                summary!(tracing::Level::INFO, "Import completed");
                ExitCode::SUCCESS
            }
        }
        Mode::DryRun => {
            if failed > 0 || r.interrupted {
                tracing::error!(
                    would_import = r.would_import,
                    bytes = r.would_import_bytes,
                    already_imported = r.already_imported,
                    problems = failed,
                    interrupted = r.interrupted,
                    "Dry run found problems; nothing was written"
                );
                ExitCode::from(EXIT_ITEMS_FAILED)
            } else {
                tracing::info!(
                    would_import = r.would_import,
                    bytes = r.would_import_bytes,
                    already_imported = r.already_imported,
                    skipped_pending = r.skipped_pending,
                    skipped_url_cache = r.skipped_url_cache,
                    skipped_remote = r.skipped_remote,
                    "Dry run completed; nothing was written"
                );
                ExitCode::SUCCESS
            }
        }
        Mode::Verify => {
            if failed > 0 || r.interrupted {
                tracing::error!(
                    verified = r.already_imported,
                    problems = failed,
                    interrupted = r.interrupted,
                    "Verify failed"
                );
                ExitCode::from(EXIT_ITEMS_FAILED)
            } else {
                tracing::info!(verified = r.already_imported, "Verify passed");
                ExitCode::SUCCESS
            }
        }
    }
}

// --- Progress -------------------------------------------------------------------------------

/// The progress bar while it is shown: log lines are written around it.
static BAR: OnceLock<ProgressBar> = OnceLock::new();

struct ProgressDisplay {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressDisplay {
    /// A bar (items, bytes, rate, ETA) when stderr is a terminal; else a log line every `every`.
    fn start(progress: Arc<Progress>, mode: Mode, every: Duration) -> ProgressDisplay {
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let started = Instant::now();
        let what = match mode {
            Mode::Import => "Import progress",
            Mode::DryRun => "Dry run progress",
            Mode::Verify => "Verify progress",
        };
        let task = if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} items, {msg}, ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let bar = BAR.get_or_init(|| bar).clone();
            tokio::spawn(async move {
                loop {
                    let s = progress.snapshot();
                    bar.set_length(s.total_items);
                    bar.set_position(s.done_items);
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let mut msg = format!(
                        "{} of {}, {:.0} items/s ({}/s)",
                        HumanBytes(s.done_bytes),
                        HumanBytes(s.total_bytes),
                        s.done_items as f64 / secs,
                        HumanBytes((s.done_bytes as f64 / secs) as u64)
                    );
                    if s.failed > 0 {
                        let _ = write!(msg, ", {} failed", s.failed);
                    }
                    if s.retrying {
                        msg.push_str(", retrying failures");
                    }
                    bar.set_message(msg);
                    tokio::select! {
                        () = stopped.notified() => break,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                bar.finish_and_clear();
            })
        } else {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = stopped.notified() => break,
                        () = tokio::time::sleep(every) => {}
                    }
                    let s = progress.snapshot();
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    let rate = s.done_items as f64 / secs;
                    let left = s.total_items.saturating_sub(s.done_items);
                    let eta = if rate > 0.0 && !s.retrying {
                        format!(
                            "{}",
                            HumanDuration(Duration::from_secs_f64(left as f64 / rate))
                        )
                    } else {
                        "unknown".to_owned()
                    };
                    tracing::info!(
                        items = s.done_items,
                        total_items = s.total_items,
                        bytes = s.done_bytes,
                        total_bytes = s.total_bytes,
                        failed = s.failed,
                        items_per_s = format!("{rate:.1}"),
                        bytes_per_s = (s.done_bytes as f64 / secs) as u64,
                        eta,
                        retrying = s.retrying,
                        "{what}"
                    );
                }
            })
        };
        ProgressDisplay { stop, task }
    }

    async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

// --- Logging: logfmt, as matrix-media-repo's logs (`time=… level=info msg="Import completed"`) ----

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,tokio_postgres=warn,reqwest=warn,hyper=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .event_format(Logfmt)
        .with_writer(LogWriter)
        .try_init();
}

struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut w: format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut time = String::new();
        SystemTime.format_time(&mut format::Writer::new(&mut time))?;
        let mut fields = Fields::default();
        event.record(&mut fields);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        write!(
            w,
            "time={} level={level} msg={}",
            logfmt_value(&time),
            logfmt_value(&fields.message)
        )?;
        for (key, value) in &fields.pairs {
            write!(w, " {key}={}", logfmt_value(value))?;
        }
        writeln!(w)
    }
}

#[derive(Default)]
struct Fields {
    message: String,
    pairs: Vec<(&'static str, String)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.message = value;
        } else {
            self.pairs.push((field.name(), value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

/// A logfmt value: bare when it is one plain word, else quoted with `"` and `\` escaped.
fn logfmt_value(value: &str) -> String {
    let bare = !value.is_empty()
        && value
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '=' && c != '\\');
    if bare {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes each log line to stderr in one piece, around the progress bar when one is shown.
struct LogWriter;

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter(Vec::with_capacity(256))
    }
}

struct LineWriter(Vec<u8>);

impl std::io::Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        let write = || {
            let _ = std::io::stderr().lock().write_all(&self.0);
        };
        match BAR.get() {
            Some(bar) if !bar.is_finished() => bar.suspend(write),
            _ => write(),
        }
    }
}

// --- matrix-media-repo's command lines --------------------------------------------------------

/// MMR's flags: (name, mmrctl's flag, takes a value). `None` is accepted and ignored.
const MMR_FLAGS: &[(&str, Option<&str>, bool)] = &[
    ("dbName", Some("--db-name"), true),
    ("dbHost", Some("--db-host"), true),
    ("dbPort", Some("--db-port"), true),
    ("dbUsername", Some("--db-user"), true),
    ("dbPassword", Some("--db-password"), true),
    ("serverName", Some("--server-name"), true),
    ("baseUrl", Some("--base-url"), true),
    ("config", Some("--config"), true),
    ("workers", Some("--workers"), true),
    ("mediaDirectory", Some("--media-path"), true),
    ("verify", Some("--verify"), false),
    ("migrations", None, true),
    ("h", Some("--help"), false),
    ("help", Some("--help"), false),
];

/// When `mmrctl` runs as `import_synapse` or `import_dendrite`, rewrites MMR's command line (Go flags:
/// `-name value`, `-name=value`, `--name`) into `mmrctl import synapse|dendrite ...`; mmrctl's own
/// long options pass through. Other command lines are returned as they are.
pub(crate) fn alias_args(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let program = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_owned();
    let source = match program.as_str() {
        "import_synapse" => "synapse",
        "import_dendrite" => "dendrite",
        _ => return Ok(args),
    };
    let accepted = || {
        MMR_FLAGS
            .iter()
            .filter(|(n, _, _)| *n != "h")
            .map(|(n, _, _)| format!("-{n}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut out: Vec<OsString> = vec!["mmrctl".into(), "import".into(), source.into()];
    let mut rest = args.into_iter().skip(1);
    while let Some(arg) = rest.next() {
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            out.push(arg);
            out.extend(rest);
            break;
        }
        let Some(flag) = text.strip_prefix('-').filter(|f| !f.is_empty()) else {
            out.push(arg);
            continue;
        };
        let double = flag.starts_with('-');
        let flag = flag.trim_start_matches('-');
        let (name, inline) = match flag.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (flag, None),
        };
        let Some((_, ours, takes_value)) = MMR_FLAGS.iter().find(|(n, _, _)| *n == name) else {
            if double {
                // mmrctl's own options (--media-path, --dry-run, ...).
                out.push(arg);
                continue;
            }
            return Err(format!(
                "{program}: unknown flag -{name}. It accepts matrix-media-repo's flags {} \
                 (and mmrctl's own options: see `mmrctl import {source} --help`)",
                accepted()
            ));
        };
        let value = if *takes_value {
            match inline.or_else(|| rest.next().and_then(|v| v.into_string().ok())) {
                Some(v) => Some(v),
                None => return Err(format!("{program}: flag -{name} needs a value")),
            }
        } else {
            // Go's boolean flags: -verify, -verify=true, -verify=false.
            match inline.as_deref() {
                None | Some("true" | "1" | "t" | "T" | "TRUE" | "True") => None,
                Some("false" | "0" | "f" | "F" | "FALSE" | "False") => continue,
                Some(other) => {
                    return Err(format!("{program}: -{name}={other}: not a boolean"));
                }
            }
        };
        match ours {
            Some(ours) => {
                out.push((*ours).into());
                if let Some(v) = value {
                    out.push(v.into());
                }
            }
            None => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{program}: -{name} is ignored (mmrctl's database migrations are built in)"
                );
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn strs(v: &[OsString]) -> Vec<&str> {
        v.iter().map(|s| s.to_str().unwrap()).collect()
    }

    #[test]
    fn seed_command_line_is_translated() {
        let args: Vec<OsString> = [
            "/usr/local/bin/import_synapse",
            "-dbName",
            "synapse",
            "-dbHost",
            "matrix-postgres",
            "-dbPort",
            "5432",
            "-dbUsername",
            "matrix",
            "-dbPassword",
            "postgres_connection_password",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out = alias_args(args).unwrap();
        assert_eq!(
            strs(&out),
            [
                "mmrctl",
                "import",
                "synapse",
                "--db-name",
                "synapse",
                "--db-host",
                "matrix-postgres",
                "--db-port",
                "5432",
                "--db-user",
                "matrix",
                "--db-password",
                "postgres_connection_password"
            ]
        );
    }

    #[test]
    fn go_flag_forms_and_own_options() {
        let args: Vec<OsString> = [
            "import_dendrite",
            "--serverName=example.com",
            "-verify",
            "-migrations",
            "./migrations",
            "--media-path",
            "/m",
            "-workers=3",
            "-verify=false",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(
            strs(&alias_args(args).unwrap()),
            [
                "mmrctl",
                "import",
                "dendrite",
                "--server-name",
                "example.com",
                "--verify",
                "--media-path",
                "/m",
                "--workers",
                "3"
            ]
        );
    }

    #[test]
    fn unknown_flags_list_the_accepted_ones() {
        let err =
            alias_args(vec!["import_synapse".into(), "-dbname".into(), "x".into()]).unwrap_err();
        assert!(err.contains("unknown flag -dbname"), "{err}");
        assert!(
            err.contains("-dbName -dbHost -dbPort -dbUsername -dbPassword"),
            "{err}"
        );
        let err = alias_args(vec!["import_synapse".into(), "-dbName".into()]).unwrap_err();
        assert!(err.contains("needs a value"), "{err}");
    }

    #[test]
    fn other_names_are_left_alone() {
        let args: Vec<OsString> = vec!["mmrctl".into(), "-dbName".into()];
        assert_eq!(alias_args(args.clone()).unwrap(), args);
    }

    #[test]
    fn logfmt_values() {
        assert_eq!(logfmt_value("Import completed"), "\"Import completed\"");
        assert_eq!(logfmt_value("plain"), "plain");
        assert_eq!(logfmt_value(""), "\"\"");
        assert_eq!(logfmt_value("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(logfmt_value("k=v"), "\"k=v\"");
    }
}
