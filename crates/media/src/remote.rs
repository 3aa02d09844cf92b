//! Remote media for our users: served from the cache when we have it, else fetched over
//! federation once, however many ask at the same time, and streamed through the store pipeline
//! (de-duplicated with everything else, never whole in memory).
//!
//! What failed is remembered: the media for `downloads.failureCacheMinutes`, the server after
//! `federation.backoffAt` consecutive failures (not asked again for a while; one success, an
//! authenticated request from it, or a reload clears that). Both are shared by the instances
//! (`store::shared`: Redis or Postgres), and kept here too for when that store cannot be reached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use config::{Config, MediaKind};
use federation::Signer;
use federation::remote::{FetchError, Limits};
use futures_util::FutureExt as _;
use futures_util::StreamExt as _;
use futures_util::future::BoxFuture;
use store::{Media, NewMedia, Target};

use crate::Error;
use crate::inflight::{Inflight, Joined, Run};

/// Servers and media whose failures are remembered; beyond that the oldest are forgotten.
const MAX_REMEMBERED: u64 = 100_000;
/// The first pause of a failing server, doubled with each further failure up to `MAX_PAUSE`.
const FIRST_PAUSE: Duration = Duration::from_secs(30);
const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// What a fetch ended with, shared by everyone who waited for it.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    Fetch(FetchError),
    /// Our side failed (database, datastore): not remembered, not the remote's fault.
    Local(Arc<store::Error>),
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Fetch(FetchError::NotFound(why)) => Error::NotFound(why),
            Failure::Fetch(FetchError::NotYetUploaded) => Error::NotYetUploaded,
            Failure::Fetch(FetchError::TooLarge { max }) => Error::RemoteTooLarge(max),
            Failure::Fetch(e) => Error::Remote(e.to_string()),
            // The remote's file has content quarantined here: served as quarantined media is.
            Failure::Local(e) if matches!(*e, store::Error::ContentQuarantined) => {
                Error::Quarantined
            }
            Failure::Local(e) => match Arc::try_unwrap(e) {
                Ok(e) => Error::Store(e),
                // Shared with other waiters: the same class of answer the last one gets.
                Err(e) if e.is_unavailable() => {
                    Error::Unavailable(format!("storing the remote media failed: {e}"))
                }
                Err(e) => Error::Remote(format!("storing the remote media failed: {e}")),
            },
        }
    }
}

/// How long the client that started a fetch may take to accept each piece before it is left
/// behind (the fetch goes on for the store and everyone else).
const LIVE_PATIENCE: Duration = Duration::from_secs(10);
/// Batches queued for that client.
const LIVE_QUEUE: usize = 2;
/// The pieces that arrived together go to that client together, at most this many: its
/// connection then writes them in one call (hyper's write queue takes 16 buffers), where a call
/// per 16 KiB TLS record costs a 2-core machine a tenth of the fetch's CPU in wake-ups and
/// system calls, on both sides of the connection.
const LIVE_BATCH: usize = 16;

/// Remote media as it arrives, for the client whose request started the fetch: it need not wait
/// for the file to be stored. The body ends with an error when the transfer does not complete.
pub struct Live {
    pub content_type: String,
    pub upload_name: Option<String>,
    pub body: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>,
}

/// What a download finds: stored media, or remote media arriving.
pub enum Found {
    Stored(Media),
    Live(Live),
}

/// The sending side of a [`Live`].
struct LiveTx {
    meta: tokio::sync::oneshot::Sender<(String, Option<String>)>,
    bytes: tokio::sync::mpsc::Sender<LivePiece>,
}

/// What goes to the live client: the body ends cleanly only on `End` (a channel that closes
/// without it means the client was left behind, and its body fails).
enum LivePiece {
    Bytes(Vec<bytes::Bytes>),
    Failed(String),
    End,
}

/// Which remote media a request may have fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch<'a> {
    /// Only what is cached (legacy `allow_remote=false`, or unauthenticated media frozen).
    CachedOnly,
    /// Fetched if needed, signed as our homeserver `0`.
    As(&'a str),
}

#[derive(Debug, Clone, Copy)]
struct Health {
    failures: u32,
    paused_until: Option<Instant>,
}

type SharedFetch = Run<Result<Media, Failure>>;

pub(crate) struct Remote {
    client: federation::Client,
    /// Our homeservers' signers, from their `signingKeyPath` (reloaded with the config).
    signers: ArcSwap<HashMap<String, Signer>>,
    inflight: Inflight<(String, String), Result<Media, Failure>>,
    failed: moka::sync::Cache<(String, String), (FetchError, Instant)>,
    health: moka::sync::Cache<String, Health>,
    /// Fetches running at once (`downloads.numWorkers`, read at start-up).
    workers: tokio::sync::Semaphore,
    /// Remote media fetched, by origin.
    pub(crate) downloaded: crate::Counts,
}

/// Reads each homeserver's signing key (the media repo's own key, MMR's PEM or any format `keys`
/// reads; the first key of the file).
pub fn load_signers(config: &Config) -> Result<HashMap<String, Signer>, String> {
    let mut signers = HashMap::new();
    for hs in config
        .homeservers
        .iter()
        .filter(|h| !h.signing_key_path.is_empty())
    {
        let path = &hs.signing_key_path;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("homeservers[{}].signingKeyPath {path}: {e}", hs.name))?;
        let file = keys::KeyFile::parse(&text, path).map_err(|e| e.to_string())?;
        let key = file.first().ok_or_else(|| format!("{path} holds no key"))?;
        signers.insert(
            hs.name.clone(),
            Signer {
                origin: hs.name.clone(),
                key: key.clone(),
            },
        );
    }
    Ok(signers)
}

impl Remote {
    pub(crate) fn new(
        client: federation::Client,
        signers: HashMap<String, Signer>,
        workers: usize,
    ) -> Remote {
        Remote {
            downloaded: crate::Counts::default(),
            workers: tokio::sync::Semaphore::new(workers.max(1)),
            client,
            signers: ArcSwap::from_pointee(signers),
            inflight: Inflight::new(),
            failed: moka::sync::Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .build(),
            health: moka::sync::Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .build(),
        }
    }

    /// A reload: new signers, and every server gets a fresh chance.
    pub(crate) fn reconfigure(&self, signers: HashMap<String, Signer>) {
        self.signers.store(Arc::new(signers));
        self.health.invalidate_all();
    }

    /// `server` just proved it is up (it sent us a request we verified). The shared pause is
    /// lifted too when this instance knew of one (checking for every request would cost a query).
    pub(crate) fn server_is_up(&self, store: &store::Store, server: &str) {
        if self.health.remove(server).is_some() {
            let (store, key) = (store.clone(), backoff_key(server));
            tokio::spawn(async move { store.forget_shared(&key).await });
        }
    }

    pub(crate) async fn media(
        self: &Arc<Self>,
        store: &store::Store,
        config: &Config,
        origin: &str,
        media_id: &str,
        signer_hs: &str,
        live_ok: bool,
    ) -> Result<Found, Error> {
        if config.federation.is_ignored(origin) {
            return Err(Error::NotFound(format!(
                "Media from {origin} is not fetched here (federation.ignoredHosts)"
            )));
        }
        let key = (origin.to_owned(), media_id.to_owned());
        let remember = Duration::from_secs(u64::from(config.downloads.failure_cache_minutes) * 60);
        if let Some((failure, at)) = self.failed.get(&key) {
            if at.elapsed() < remember {
                return Err(Failure::Fetch(failure).into());
            }
            self.failed.invalidate(&key);
        }
        if let Some(Health {
            paused_until: Some(until),
            ..
        }) = self.health.get(origin)
            && until > Instant::now()
        {
            return Err(paused(
                origin,
                config,
                until.saturating_duration_since(Instant::now()),
            ));
        }
        // What another instance learnt (unreachable shared state: what this one knows decides),
        // both asked at once.
        let (failure_key, backoff_key) = (failure_key(origin, media_id), backoff_key(origin));
        let (failure, pause) = futures_util::join!(
            async {
                if remember.is_zero() {
                    return None;
                }
                store.recall_shared(&failure_key).await.ok()?
            },
            store.recall_shared(&backoff_key),
        );
        if let Some(failure) = failure
            && let Ok(failure) = serde_json::from_str::<FetchError>(&failure)
        {
            return Err(Failure::Fetch(failure).into());
        }
        if let Ok(Some(pause)) = pause {
            // Known here now, so that a request from it lifts the pause (`server_is_up`).
            self.health.insert(
                origin.to_owned(),
                Health {
                    failures: 0,
                    paused_until: None,
                },
            );
            let until_ms = pause.parse::<i64>().unwrap_or(0);
            let left = u64::try_from(until_ms - store::now_ms()).unwrap_or(0);
            return Err(paused(origin, config, Duration::from_millis(left)));
        }
        let signer = self.signers.load().get(signer_hs).cloned();
        let limits = Limits {
            max_bytes: config.downloads.max_bytes,
            timeout: Duration::from_secs(u64::from(
                config.timeouts.federation_timeout_seconds.max(1),
            )),
        };
        let requires_auth = config.repo.freeze_unauthenticated_media;
        let backoff_at = config.federation.backoff_at;
        let this = self.clone();
        let store = store.clone();
        let (live_tx, live_rx) = if live_ok {
            let (meta, meta_rx) = tokio::sync::oneshot::channel();
            let (bytes, bytes_rx) = tokio::sync::mpsc::channel(LIVE_QUEUE);
            (Some(LiveTx { meta, bytes }), Some((meta_rx, bytes_rx)))
        } else {
            (None, None)
        };
        let (fetch, started) = self.fetch_once(key.clone(), move || {
            async move {
                // At most `downloads.numWorkers` fetches at once; the others wait their turn.
                let _worker = this.workers.acquire().await;
                let (origin, media_id) = (&key.0, &key.1);
                // One fetch among all instances: the others wait for its lock, then find the
                // media stored. Without the database's lock, each instance fetches for itself.
                let lock = tokio::time::timeout(
                    limits.timeout,
                    store.lock_job(&format!("remote {origin}/{media_id}")),
                )
                .await;
                let lock = match lock {
                    Ok(Ok(lock)) => Some(lock),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "remote fetch not coordinated with other instances");
                        None
                    }
                    Err(_) => None,
                };
                if lock.is_some()
                    && let Ok(Some(media)) = store.media(origin, media_id).await
                    && media.object.is_some()
                {
                    if let Some(lock) = lock {
                        lock.release().await;
                    }
                    return Ok(media);
                }
                let result = fetch(
                    &this.client,
                    &store,
                    &key,
                    signer.as_ref(),
                    limits,
                    requires_auth,
                    live_tx,
                )
                .await;
                if let Some(lock) = lock {
                    lock.release().await;
                }
                // Once per fetch, whoever waits for it (or nobody, if they all left).
                this.record(&store, origin, media_id, &result, backoff_at, remember)
                    .await;
                if result.is_ok() {
                    this.downloaded.add(&[origin]);
                }
                result
            }
            .boxed()
        });
        if started && let Some((meta_rx, bytes_rx)) = live_rx {
            // The file as it arrives; when the fetch fails before its body starts, its outcome.
            if let Ok((content_type, upload_name)) = meta_rx.await {
                let body = futures_util::stream::unfold(Some(bytes_rx), |rx| async move {
                    let mut rx = rx?;
                    match rx.recv().await {
                        Some(LivePiece::Bytes(pieces)) => {
                            Some((pieces.into_iter().map(Ok).collect(), Some(rx)))
                        }
                        Some(LivePiece::Failed(why)) => Some((vec![Err(why)], None)),
                        Some(LivePiece::End) => None,
                        None => Some((
                            vec![Err("the transfer fell behind the fetch".to_owned())],
                            None,
                        )),
                    }
                })
                .flat_map(futures_util::stream::iter);
                return Ok(Found::Live(Live {
                    content_type,
                    upload_name,
                    body: body.boxed(),
                }));
            }
        }
        fetch.await.map(Found::Stored).map_err(Into::into)
    }

    /// Joins the fetch of `key` in progress, or starts one: whether this call started it.
    fn fetch_once(
        &self,
        key: (String, String),
        start: impl FnOnce() -> BoxFuture<'static, Result<Media, Failure>>,
    ) -> (SharedFetch, bool) {
        let stopped = |e: String| {
            Err(Failure::Fetch(FetchError::Failed(format!(
                "the fetch stopped: {e}"
            ))))
        };
        match self.inflight.join_or_start(key, usize::MAX, start, stopped) {
            Joined::Started(run) => (run, true),
            Joined::Running(run) => (run, false),
            // No bound was given, so this is not reached.
            Joined::Full => (
                futures_util::future::ready(stopped("too many fetches".into()))
                    .boxed()
                    .shared(),
                false,
            ),
        }
    }

    async fn record(
        &self,
        store: &store::Store,
        origin: &str,
        media_id: &str,
        result: &Result<Media, Failure>,
        backoff_at: u32,
        remember: Duration,
    ) {
        let failure = match result {
            Ok(_) => None,
            Err(Failure::Fetch(e)) => Some(e),
            Err(Failure::Local(_)) => return,
        };
        // What the other instances are told (failures unless they cannot be reached).
        let mut pause_for_all = None;
        let mut answered = false;
        match failure {
            Some(e) if e.is_server_failure() => {
                // One read-modify-write: concurrent failures all count.
                let health = self
                    .health
                    .entry(origin.to_owned())
                    .and_upsert_with(|previous| {
                        let failures = previous.map_or(0, |h| h.into_value().failures) + 1;
                        let mut paused_until = None;
                        if backoff_at > 0 && failures >= backoff_at {
                            let doublings = (failures - backoff_at).min(10);
                            let pause = (FIRST_PAUSE * 2u32.pow(doublings)).min(MAX_PAUSE);
                            paused_until = Some(Instant::now() + pause);
                            tracing::warn!(
                                server = origin,
                                failures,
                                pause_s = pause.as_secs(),
                                "remote server failing: pausing requests to it"
                            );
                        }
                        Health {
                            failures,
                            paused_until,
                        }
                    });
                pause_for_all = health.into_value().paused_until;
            }
            // It answered: whatever it said, it is up.
            _ => answered = self.health.remove(origin).is_some(),
        }
        let shared = match pause_for_all {
            Some(until) => {
                let pause = until.saturating_duration_since(Instant::now());
                let until_ms = store::now_ms() + pause.as_millis() as i64;
                store
                    .note_shared(&backoff_key(origin), &until_ms.to_string(), pause)
                    .await
            }
            None if answered => store.forget_shared(&backoff_key(origin)).await,
            None => Ok(()),
        };
        if let Err(e) = shared {
            tracing::debug!(server = origin, error = %e, "the server's state not shared with the other instances");
        }
        if let Some(e) = failure
            && !matches!(e, FetchError::NotYetUploaded | FetchError::Denied(_))
            && !remember.is_zero()
        {
            self.failed.insert(
                (origin.to_owned(), media_id.to_owned()),
                (e.clone(), Instant::now()),
            );
            let text = serde_json::to_string(e).unwrap_or_default();
            let noted = store
                .note_shared(&failure_key(origin, media_id), &text, remember)
                .await;
            if let Err(e) = noted {
                tracing::debug!(error = %e, "failure not shared with the other instances");
            }
        }
    }
}

/// The shared note of a remote media that failed.
fn failure_key(origin: &str, media_id: &str) -> String {
    format!("remote-failure:{origin}/{media_id}")
}

/// The shared note of a paused server: until when (ms).
fn backoff_key(server: &str) -> String {
    format!("remote-backoff:{server}")
}

fn paused(origin: &str, config: &Config, left: Duration) -> Error {
    Error::Remote(format!(
        "{origin} failed {} times in a row; it is not asked again for {} s",
        config.federation.backoff_at,
        left.as_secs() + 1
    ))
}

/// One fetch: download, stream into the store as `mxc://origin/media_id`.
async fn fetch(
    client: &federation::Client,
    store: &store::Store,
    (origin, media_id): &(String, String),
    signer: Option<&Signer>,
    limits: Limits,
    requires_auth: bool,
    live: Option<LiveTx>,
) -> Result<Media, Failure> {
    let fetched = client
        .download(origin, media_id, signer, limits)
        .await
        .map_err(Failure::Fetch)?;
    let upload_name = fetched.file_name.filter(|n| usable_file_name(n));
    let live = live.and_then(|l| {
        l.meta
            .send((fetched.content_type.clone(), upload_name.clone()))
            .ok()
            .map(|()| l.bytes)
    });
    tracing::debug!(origin, media_id, content_type = %fetched.content_type, "fetching remote media");
    // The body's own error (the remote's fault) is kept; the store only sees that it stopped.
    let cause: Arc<Mutex<Option<FetchError>>> = Arc::default();
    let slot = cause.clone();
    let body = fetched.body.map(move |piece| {
        piece.map_err(|e| {
            let text = e.to_string();
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(e);
            text
        })
    });
    let body = tee(body.boxed(), live);
    let new = NewMedia {
        origin: origin.to_owned(),
        kind: MediaKind::RemoteMedia,
        content_type: fetched.content_type,
        upload_name,
        user_id: String::new(),
        requires_auth,
        quarantined: false,
        created_ts: None,
    };
    // Written as a local upload is (not `read_soon`): the client that asked gets the bytes as
    // they arrive, and a large file goes around the page cache, which costs a 2-core machine a
    // fifth of the fetch's CPU and evicts what is read more often.
    let store_limits = store::Limits {
        max_bytes: limits.max_bytes,
        ..store::Limits::default()
    };
    match store
        .upload(new, Target::Id(media_id.to_owned()), body, store_limits)
        .await
    {
        Ok(uploaded) => {
            tracing::info!(mxc = %uploaded.media.mxc(), bytes = uploaded.size, dedup = uploaded.deduplicated, "remote media cached");
            Ok(uploaded.media)
        }
        // Another instance stored it first: theirs is the same media.
        Err(store::Error::MediaIdTaken) => match store.media(origin, media_id).await {
            Ok(Some(media)) if media.object.is_some() => Ok(media),
            Ok(_) => Err(Failure::Local(Arc::new(store::Error::MediaIdTaken))),
            Err(e) => Err(Failure::Local(Arc::new(e))),
        },
        Err(store::Error::TooLarge { max }) => Err(Failure::Fetch(FetchError::TooLarge { max })),
        Err(store::Error::Aborted(why)) => {
            let cause = cause.lock().unwrap_or_else(PoisonError::into_inner).take();
            Err(Failure::Fetch(cause.unwrap_or(FetchError::Failed(why))))
        }
        Err(e) => Err(Failure::Local(Arc::new(e))),
    }
}

/// `body`, each piece also sent to `live` (the client that started the fetch) while it keeps up,
/// those that arrived together in one batch; its body ends cleanly only when this one did.
fn tee(
    body: futures_util::stream::BoxStream<'static, Result<bytes::Bytes, String>>,
    live: Option<tokio::sync::mpsc::Sender<LivePiece>>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, String>> + Send {
    let batches = body.ready_chunks(LIVE_BATCH);
    futures_util::stream::unfold((batches, live), |(mut batches, mut live)| async move {
        let batch = batches.next().await;
        if let Some(tx) = &live {
            let copy = match &batch {
                Some(pieces) => match pieces.iter().find_map(|p| p.as_ref().err()) {
                    Some(e) => LivePiece::Failed(e.clone()),
                    None => LivePiece::Bytes(pieces.iter().flatten().cloned().collect()),
                },
                None => LivePiece::End,
            };
            let sent = tokio::time::timeout(LIVE_PATIENCE, tx.send(copy)).await;
            if !matches!(sent, Ok(Ok(()))) || batch.is_none() {
                live = None;
            }
        }
        batch.map(|b| (futures_util::stream::iter(b), (batches, live)))
    })
    .flatten()
}

/// A remote's file name is kept when it is one we could have accepted from a local upload.
fn usable_file_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(transient: bool) -> store::Error {
        store::Error::Backend(store::BackendError {
            datastore: "s3".into(),
            operation: "put",
            message: "down".into(),
            transient,
        })
    }

    #[test]
    fn every_waiter_of_a_failed_store_gets_the_same_class_of_answer() {
        // The last waiter gets the store error itself; the others a shared copy of it.
        let shared = Arc::new(backend(true));
        let first: Error = Failure::Local(shared.clone()).into();
        let last: Error = Failure::Local(shared).into();
        assert!(matches!(first, Error::Unavailable(_)), "{first:?}");
        assert!(
            matches!(last, Error::Store(ref e) if e.is_unavailable()),
            "{last:?}"
        );
        let refused = Arc::new(backend(false));
        let kept = refused.clone();
        let first: Error = Failure::Local(refused).into();
        assert!(matches!(first, Error::Remote(_)), "{first:?}");
        drop(kept);
    }
}
