//! Running the server: config, logging, database (with retries), listeners, reload and shutdown.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use config::Config;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::{AppState, SharedState};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] config::Error),
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Startup(String),
    #[error(transparent)]
    Store(#[from] store::Error),
}

type LogHandle = reload::Handle<EnvFilter, tracing_subscriber::Registry>;

/// Loads and validates the config; what deserves a warning is returned for logging.
fn load(path: &Path) -> Result<(Config, Vec<String>), Error> {
    let loaded = Config::load_valid(path)?;
    let mut warnings = Vec::new();
    if !loaded.unknown_keys.is_empty() {
        let keys: Vec<String> = loaded
            .unknown_keys
            .iter()
            .map(ToString::to_string)
            .collect();
        warnings.push(format!(
            "{}: unknown keys are ignored (misspelled, or from a newer version?): {}",
            path.display(),
            keys.join(", ")
        ));
    }
    let unsupported = unsupported_settings(&loaded.config);
    if !unsupported.is_empty() {
        warnings.push(format!(
            "not supported yet, so without effect: {}",
            unsupported.join(", ")
        ));
    }
    Ok((loaded.config, warnings))
}

/// Settings that upstream honours and mmrctl does not (yet): said once, at start-up.
fn unsupported_settings(c: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut note = |on: bool, what: &'static str| {
        if on {
            out.push(what);
        }
    };
    note(!c.plugins.is_empty(), "plugins");
    note(c.sentry.enabled, "sentry");
    note(c.pgo.enabled, "pgo");
    note(
        c.repo.log_directory != "-" && !c.repo.log_directory.is_empty(),
        "repo.logDirectory (logs go to stderr/journald)",
    );
    out
}

fn log_filter(level: &str) -> EnvFilter {
    let level = match level.to_ascii_lowercase().as_str() {
        "panic" | "fatal" => "error".to_owned(),
        other => other.to_owned(),
    };
    EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},tokio_postgres=warn,hyper=warn,aws_smithy_runtime=info,aws_sdk_s3=info,aws_smithy_http_client=info")))
}

fn init_logging(config: &Config) -> LogHandle {
    let (filter, handle) = reload::Layer::new(log_filter(&config.repo.log_level));
    let registry = tracing_subscriber::registry().with(filter);
    let result = if config.repo.json_logs {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else if stderr_is_journal() {
        // journald stamps each line itself and reads its priority from a `<N>` prefix.
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(SyslogPriority(
                        tracing_subscriber::fmt::format()
                            .without_time()
                            .with_ansi(false),
                    ))
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(config.repo.log_colors)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    };
    // Only fails when a subscriber is set already, and nothing else sets one.
    let _ = result;
    handle
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM` to its `device:inode`
/// (a child that inherited the variable but writes elsewhere does not match).
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", stderr.dev(), stderr.ino())
}

/// Prefixes each event with its syslog priority as sd-daemon(3) describes: `<3>` errors, `<4>`
/// warnings, `<6>` information, `<7>` debugging.
struct SyslogPriority<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for SyslogPriority<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Opens the store, retrying with backoff while the database is unreachable.
async fn open_store(config: &Config) -> Result<store::Store, Error> {
    let mut delay = Duration::from_secs(1);
    loop {
        match store::Store::open(config).await {
            Ok(store) => return Ok(store),
            Err(e) if e.is_unavailable() => {
                tracing::error!(error = %e, retry_in_s = delay.as_secs(), "the database is unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs until SIGTERM or SIGINT, then drains in-flight requests. SIGHUP reloads the config.
pub async fn serve(config_path: PathBuf) -> Result<(), Error> {
    let (config, warnings) = load(&config_path)?;
    let log = init_logging(&config);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    let store = open_store(&config).await?;
    let state: SharedState = Arc::new(AppState::new(config.clone(), store)?);

    let addr = format!("{}:{}", config.repo.bind_address, config.repo.port);
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|source| Error::Bind {
            addr: addr.clone(),
            source,
        })?;
    tracing::info!(%addr, "media repository listening");
    let limits = crate::conn::Limits::from_config(&config.connections);
    raise_open_files_limit(limits.max_connections);
    let mut background = {
        let state = state.clone();
        media::jobs::Runner::start(state.media.clone(), move || state.config())
    };
    if config.metrics.enabled {
        let maddr = format!("{}:{}", config.metrics.bind_address, config.metrics.port);
        let mlistener = TcpListener::bind(&maddr)
            .await
            .map_err(|source| Error::Bind {
                addr: maddr.clone(),
                source,
            })?;
        tracing::info!(addr = %maddr, "metrics listening");
        let app = crate::metrics_router(state.clone());
        // Same bounds as the client listener: the role binds it on every interface.
        background.spawn(crate::conn::serve(
            mlistener,
            app,
            limits,
            std::future::pending(),
            DRAIN,
        ));
    }
    background.spawn(reload_on_hangup(config_path, state.clone(), log));
    background.spawn(forget_logouts(state.clone()));
    // One signal stops both at once: requests drain while the jobs are cancelled.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop.send(true);
    });
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    tokio::join!(
        crate::conn::serve(
            listener,
            crate::router(state.clone()),
            limits,
            stopped(stopping.clone()),
            DRAIN,
        ),
        async {
            stopped(stopping).await;
            background.stop().await;
            tracing::info!("background tasks stopped");
        }
    );
    // After the last request: the access times noted since the last flush.
    if let Err(e) = state.media.flush_accesses().await {
        tracing::warn!(error = %e, "access times not recorded");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Drops from the token cache what any instance's logouts ended; everything, when some
/// announcements were missed.
async fn forget_logouts(state: SharedState) {
    let mut logouts = state.media.store().subscribe_logouts();
    loop {
        match logouts.recv().await {
            Ok(message) => state.auth.forget(&message),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => state.auth.forget_all(),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// On SIGTERM, how long requests in flight may take to finish (well within systemd's default
/// `TimeoutStopSec` of 90 s); running jobs are cancelled at once.
const DRAIN: Duration = Duration::from_secs(30);

/// Every connection is a file descriptor, and systemd's default soft limit is 1024: raise the soft
/// limit to the hard one (as Go's runtime does for matrix-media-repo), and say so when even that
/// is below `connections.maxConnections` plus room for files and the database.
fn raise_open_files_limit(max_connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    let below_hard = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) => soft < hard,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below_hard {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!(error = %e, "cannot raise the open files limit");
        }
    }
    let current = getrlimit(Resource::Nofile).current;
    let needed = max_connections as u64 + 256;
    if current.is_some_and(|c| c < needed) {
        tracing::warn!(
            limit = current,
            needed,
            "the open files limit is below connections.maxConnections plus room for files; \
             raise LimitNOFILE or lower connections.maxConnections"
        );
    }
}

async fn shutdown_signal() {
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn reload_on_hangup(path: PathBuf, state: SharedState, log: LogHandle) {
    let Ok(mut hangups) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangups.recv().await.is_some() {
        match load(&path) {
            Ok((config, warnings)) => {
                for warning in warnings {
                    tracing::warn!("{warning}");
                }
                let old = state.config();
                if old.datastores != config.datastores
                    || old.database != config.database
                    || old.connections != config.connections
                    || old.tasks != config.tasks
                    || old.federation.allowed_networks != config.federation.allowed_networks
                    || old.federation.disallowed_networks != config.federation.disallowed_networks
                    || old.federation.nameservers != config.federation.nameservers
                    || old.downloads.num_workers != config.downloads.num_workers
                {
                    tracing::warn!(
                        "datastores, database, connections, tasks, federation networks and nameservers, and \
                         downloads.numWorkers changes take effect after a restart"
                    );
                }
                if let Err(e) = log.reload(log_filter(&config.repo.log_level)) {
                    tracing::warn!(error = %e, "cannot change the log level");
                }
                state.reload(config);
                tracing::info!(file = %path.display(), "configuration reloaded; token cache flushed");
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration not reloaded: the file has errors")
            }
        }
    }
}
