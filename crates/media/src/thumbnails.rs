//! Thumbnails as a media operation: the request normalised to a bucket, the row looked up, and
//! otherwise a generation on a pool of `thumbnails.numWorkers` (at most [`MAX_QUEUED`] waiting):
//! requests for the same thumbnail share its result, and other sizes of one media join the
//! generation that is running while what it decoded covers them. Sources that cannot be
//! thumbnailed are remembered, so that clients retrying cost nothing (MMR #647).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use config::Config;
use sha2::{Digest as _, Sha256};
use store::{Media, ObjectRef, StoredThumbnail, ThumbnailKey};
use thumbnail::{Method, Outcome};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{Semaphore, watch};

use crate::{Error, Fetch, Service, Wait};

/// What a client asked for (`width`, `height`, `method`, `animated`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThumbnailParams {
    pub width: u32,
    pub height: u32,
    pub method: Method,
    /// `None`: `thumbnails.defaultAnimated`.
    pub animated: Option<bool>,
    /// Asked on an authenticated endpoint: without, media frozen to those is not found (before
    /// anything is decoded).
    pub authenticated: bool,
}

/// What a thumbnail request gets.
#[derive(Debug, Clone)]
pub enum Thumb {
    /// The source fits the box: the media itself.
    Original(Media),
    /// A thumbnail stored earlier.
    Stored(StoredThumbnail),
    /// Made for this request; `bytes` is its content (being stored meanwhile).
    Made {
        content_type: String,
        bytes: Bytes,
        /// The content's SHA-256 (hex), as its object will have it.
        sha256: String,
    },
}

/// Generations waiting for a worker or running, at most; beyond, requests get 503.
const MAX_QUEUED: usize = 256;

/// How long a source that failed to thumbnail is remembered.
const FAILURE_MEMORY: Duration = Duration::from_secs(3600);
const MAX_REMEMBERED: u64 = 10_000;

type Waiter = (
    thumbnail::Request,
    watch::Sender<Option<Result<Thumb, Error>>>,
);

/// One generation: the requests it serves, added to until it starts, and after that while what it
/// decoded covers them (`cover`), until it has answered all of them.
#[derive(Default)]
struct Batch {
    started: bool,
    /// What the running generation makes without decoding again; `None` once it is done.
    cover: Option<thumbnail::Cover>,
    wanted: Vec<Waiter>,
}

/// The generations of each media (origin, id): at most one not yet started.
type Batches = HashMap<(String, String), Vec<Arc<Mutex<Batch>>>>;

pub(crate) struct Thumbnailer {
    workers: Arc<Semaphore>,
    batches: Mutex<Batches>,
    failures: moka::sync::Cache<String, thumbnail::Error>,
    generated: std::sync::atomic::AtomicU64,
    /// Thumbnails made: width, height, method, animated, origin (`remote` for remote media).
    made: crate::Counts,
    queued: std::sync::atomic::AtomicUsize,
}

impl Thumbnailer {
    pub(crate) fn new(workers: usize) -> Thumbnailer {
        Thumbnailer {
            workers: Arc::new(Semaphore::new(workers.max(1))),
            batches: Mutex::new(HashMap::new()),
            failures: moka::sync::Cache::builder()
                .max_capacity(MAX_REMEMBERED)
                .time_to_live(FAILURE_MEMORY)
                .build(),
            generated: std::sync::atomic::AtomicU64::new(0),
            made: crate::Counts::default(),
            queued: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// `thumbnails.numWorkers`, 0 meaning one per core.
pub fn workers(config: &Config) -> usize {
    match config.thumbnails.num_workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n as usize,
    }
}

/// What a generation needs of the config of the request that started it.
#[derive(Clone)]
struct Settings {
    limits: thumbnail::Limits,
    types: Vec<String>,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        let t = &config.thumbnails;
        Settings {
            limits: thumbnail::Limits {
                max_pixels: t.max_pixels,
                max_animate_bytes: t.max_animate_size_bytes,
                still_frame: t.still_frame,
                ..thumbnail::Limits::default()
            },
            types: t.types.clone(),
        }
    }
}

/// A thumbnailer error as the service reports it: the host's troubles are not the source's.
fn from_thumbnail(e: thumbnail::Error) -> Error {
    match e {
        thumbnail::Error::Unavailable(why) => Error::Unavailable(why),
        e => Error::Thumbnail(e),
    }
}

/// The error as every waiter of a generation gets it (store errors are not `Clone`).
fn share(e: &Error) -> Error {
    match e {
        Error::Thumbnail(t) => Error::Thumbnail(t.clone()),
        Error::ThumbnailSourceTooLarge(n) => Error::ThumbnailSourceTooLarge(*n),
        Error::CannotThumbnail(why) => Error::CannotThumbnail(why.clone()),
        other => Error::Unavailable(other.to_string()),
    }
}

impl Service {
    /// Thumbnails generated since start (identical concurrent requests count once).
    pub fn thumbnails_generated(&self) -> u64 {
        self.thumbnails
            .generated
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Thumbnails made since start, by width, height, method, animated and origin (`remote` for
    /// remote media).
    pub fn thumbnails_made(&self) -> Vec<(Vec<String>, u64)> {
        self.thumbnails.made.snapshot()
    }

    /// The media `origin`/`media_id` and its thumbnail for `params`, waiting for a pending upload
    /// and fetching remote media as a download does ([`Service::media`]).
    pub async fn thumbnail(
        &self,
        config: &Config,
        origin: &str,
        media_id: &str,
        params: ThumbnailParams,
        wait: Wait,
        fetch: Fetch<'_>,
    ) -> Result<(Media, Thumb), Error> {
        let t = &config.thumbnails;
        let sizes: Vec<(u32, u32)> = t.sizes.iter().map(|s| (s.width, s.height)).collect();
        let (width, height) =
            thumbnail::bucket(params.width, params.height, &sizes, t.dynamic_sizing);
        let animated = t.allow_animated && params.animated.unwrap_or(t.default_animated);
        let media = self.media(config, origin, media_id, wait, fetch).await?;
        if !params.authenticated && media.requires_auth {
            return Err(Error::NotFound(
                "This media is only served on the authenticated endpoint /_matrix/client/v1/media/thumbnail".into(),
            ));
        }
        let request = thumbnail::Request {
            width,
            height,
            method: params.method,
            animated,
        };
        if let Some(stored) = self.store.thumbnail(&key_of(&media, &request)).await? {
            return Ok((media, Thumb::Stored(stored)));
        }
        let object = media
            .object
            .clone()
            .ok_or_else(|| Error::NotFound("Not found".into()))?;
        if t.max_source_bytes > 0 && object.size > t.max_source_bytes {
            return Err(Error::ThumbnailSourceTooLarge(t.max_source_bytes));
        }
        if let Some(failure) = self.thumbnails.failures.get(&object.sha256) {
            return Err(Error::Thumbnail(failure));
        }
        let mut result = self.join_batch(config, media.clone(), object, request)?;
        let shared = result
            .wait_for(Option::is_some)
            .await
            .map_err(|_| Error::Unavailable("the thumbnail job stopped".into()))?;
        match shared.as_ref() {
            Some(Ok(thumb)) => Ok((media, thumb.clone())),
            Some(Err(e)) => Err(share(e)),
            None => Err(Error::Unavailable("no thumbnail".into())),
        }
    }

    /// Joins the generation that makes (or will make) `request` for this media, or starts one.
    fn join_batch(
        &self,
        config: &Config,
        media: Media,
        object: ObjectRef,
        request: thumbnail::Request,
    ) -> Result<watch::Receiver<Option<Result<Thumb, Error>>>, Error> {
        let key = (media.origin.clone(), media.media_id.clone());
        let mut batches = self
            .thumbnails
            .batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let list = batches.entry(key.clone()).or_default();
        let mut open = None;
        for batch in list.iter() {
            let mut b = batch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, tx)) = b.wanted.iter().find(|(r, _)| *r == request) {
                return Ok(tx.subscribe());
            }
            let joins = !b.started || b.cover.is_some_and(|c| c.covers(&request));
            if joins && open.is_none() {
                let (tx, rx) = watch::channel(None);
                b.wanted.push((request, tx));
                open = Some(rx);
            }
        }
        if let Some(rx) = open {
            return Ok(rx);
        }
        let queued = &self.thumbnails.queued;
        if queued.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= MAX_QUEUED {
            queued.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Error::Unavailable(format!(
                "{MAX_QUEUED} thumbnails are being made already; try again shortly"
            )));
        }
        let (tx, rx) = watch::channel(None);
        let batch = Arc::new(Mutex::new(Batch {
            started: false,
            cover: None,
            wanted: vec![(request, tx)],
        }));
        list.push(batch.clone());
        drop(batches);
        // Its own task: a client that goes away does not stop what others wait for.
        let service = self.clone();
        let settings = Settings::of(config);
        tokio::spawn(async move {
            // Leaves the map however the generation ends (a panic included).
            let _done = Done {
                service: service.clone(),
                key,
                batch: batch.clone(),
            };
            service.generate(&media, &object, &batch, settings).await;
        });
        Ok(rx)
    }

    async fn generate(
        &self,
        media: &Media,
        object: &ObjectRef,
        batch: &Arc<Mutex<Batch>>,
        settings: Settings,
    ) {
        let Ok(_permit) = self.thumbnails.workers.clone().acquire_owned().await else {
            return;
        };
        {
            // Everyone who asked went away while it waited: no work for nobody.
            let mut b = lock(batch);
            if b.wanted.iter().all(|(_, tx)| tx.is_closed()) {
                b.started = true;
                b.cover = None;
                return;
            }
        }
        // One generation per media among all instances: the others wait, then find stored
        // what it made. Without the database's lock, each instance makes its own.
        let lock = tokio::time::timeout(
            INSTANCE_PATIENCE,
            self.store
                .lock_job(&format!("thumbnail {}/{}", media.origin, media.media_id)),
        )
        .await;
        let lock = match lock {
            Ok(Ok(lock)) => {
                if self.answer_stored(media, batch).await {
                    lock.release().await;
                    return;
                }
                Some(lock)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "thumbnail generation not coordinated with other instances");
                None
            }
            Err(_) => None,
        };
        self.make_and_keep(media, object, batch, settings).await;
        if let Some(lock) = lock {
            lock.release().await;
        }
    }

    /// Answers the requests of `batch` that are stored already (another instance made them);
    /// whether that was all of them.
    async fn answer_stored(&self, media: &Media, batch: &Arc<Mutex<Batch>>) -> bool {
        let requests: Vec<thumbnail::Request> =
            lock(batch).wanted.iter().map(|(r, _)| *r).collect();
        let mut stored = Vec::new();
        for request in requests {
            if let Ok(Some(found)) = self.store.thumbnail(&key_of(media, &request)).await {
                stored.push((request, found));
            }
        }
        let mut b = lock(batch);
        for (request, found) in stored {
            if let Some(i) = b.wanted.iter().position(|(r, _)| *r == request) {
                let (_, tx) = b.wanted.swap_remove(i);
                tx.send_replace(Some(Ok(Thumb::Stored(found))));
            }
        }
        let all = b.wanted.is_empty();
        if all {
            b.started = true;
            b.cover = None;
        }
        all
    }

    async fn make_and_keep(
        &self,
        media: &Media,
        object: &ObjectRef,
        batch: &Arc<Mutex<Batch>>,
        settings: Settings,
    ) {
        let data = match self.read_source(object, &settings).await {
            Ok(data) => data,
            Err(e) => {
                let mut b = lock(batch);
                b.started = true;
                for (_, tx) in &b.wanted {
                    tx.send_replace(Some(Err(share(&e))));
                }
                return;
            }
        };
        let (worker_batch, worker_media) = (batch.clone(), media.clone());
        let limits = settings.limits;
        // Counted before its first answer goes out.
        self.thumbnails
            .generated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let made =
            tokio::task::spawn_blocking(move || make(&data, limits, &worker_batch, &worker_media))
                .await;
        let (made, failure) = match made {
            Ok(made) => made,
            Err(e) => {
                let e = Error::Unavailable(format!("the thumbnail worker failed: {e}"));
                let mut b = lock(batch);
                b.started = true;
                b.cover = None;
                for (_, tx) in &b.wanted {
                    if tx.borrow().is_none() {
                        tx.send_replace(Some(Err(share(&e))));
                    }
                }
                return;
            }
        };
        if let Some(e) = failure {
            self.thumbnails.failures.insert(object.sha256.clone(), e);
        }
        // Answered already; stored now (requests meanwhile join this batch: it leaves the map
        // once stored).
        for (request, kept) in made {
            if matches!(kept, Kept::Made { .. }) {
                let origin = match media.kind {
                    config::MediaKind::RemoteMedia => "remote",
                    _ => media.origin.as_str(),
                };
                self.thumbnails.made.add(&[
                    &request.width.to_string(),
                    &request.height.to_string(),
                    request.method.as_str(),
                    if request.animated { "true" } else { "false" },
                    origin,
                ]);
            }
            if let Err(e) = self.keep(media, object, &request, kept).await {
                tracing::warn!(mxc = %media.mxc(), error = %e, "a thumbnail was served but not stored; it is made again when asked for");
            }
        }
    }

    /// The source (at most `maxSourceBytes`, checked before), if `thumbnails.types` lists its
    /// sniffed format.
    async fn read_source(&self, object: &ObjectRef, settings: &Settings) -> Result<Vec<u8>, Error> {
        let mut reader = self.store.read(object, 0, None).await?;
        let mut data = Vec::with_capacity(usize::try_from(object.size).unwrap_or(0));
        reader
            .read_to_end(&mut data)
            .await
            .map_err(|e| Error::Unavailable(format!("reading the media: {e}")))?;
        if let Some(format) = thumbnail::sniff(&data)
            && !thumbnail::listed(format, &settings.types)
        {
            return Err(Error::CannotThumbnail(format!(
                "Thumbnails are not made for {} (it is not in thumbnails.types)",
                format.mime()
            )));
        }
        Ok(data)
    }

    /// Stores one made thumbnail (or records that the source is its own thumbnail).
    async fn keep(
        &self,
        media: &Media,
        object: &ObjectRef,
        request: &thumbnail::Request,
        kept: Kept,
    ) -> Result<(), Error> {
        let key = key_of(media, request);
        match kept {
            Kept::Original { content_type } => {
                self.store
                    .link_thumbnail(&key, content_type, object)
                    .await?
            }
            Kept::Made {
                content_type,
                bytes,
            } => {
                self.store.put_thumbnail(&key, content_type, bytes).await?;
            }
        }
        Ok(())
    }
}

/// How long a generation waits for another instance's generation of the same media before
/// it makes its own.
const INSTANCE_PATIENCE: Duration = Duration::from_secs(30);

fn key_of(media: &Media, request: &thumbnail::Request) -> ThumbnailKey {
    ThumbnailKey {
        origin: media.origin.clone(),
        media_id: media.media_id.clone(),
        width: request.width,
        height: request.height,
        method: request.method.as_str(),
        animated: request.animated,
    }
}

/// What a generation stores for a request after answering it.
enum Kept {
    /// The source is the thumbnail, served as the type its bytes are.
    Original { content_type: &'static str },
    Made {
        content_type: &'static str,
        bytes: Bytes,
    },
}

/// Removes its batch from the map when the generation's task ends, however it ends.
struct Done {
    service: Service,
    key: (String, String),
    batch: Arc<Mutex<Batch>>,
}

impl Drop for Done {
    fn drop(&mut self) {
        let thumbnails = &self.service.thumbnails;
        let mut batches = thumbnails
            .batches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(list) = batches.get_mut(&self.key) {
            list.retain(|b| !Arc::ptr_eq(b, &self.batch));
            if list.is_empty() {
                batches.remove(&self.key);
            }
        }
        thumbnails
            .queued
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn lock(batch: &Mutex<Batch>) -> std::sync::MutexGuard<'_, Batch> {
    batch
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The worker's part, on the blocking pool: every request of the batch, those that join while it
/// runs included, each answered as soon as it is made. Returns what to store (not the stills an
/// animation fell back to for lack of time: another try may animate), and the source's failure
/// when it has one (to remember).
fn make(
    data: &[u8],
    limits: thumbnail::Limits,
    batch: &Mutex<Batch>,
    media: &Media,
) -> (Vec<(thumbnail::Request, Kept)>, Option<thumbnail::Error>) {
    let mut decoder = match thumbnail::Decoder::new(data, limits) {
        Ok(d) => d,
        Err(e) => {
            let mut b = lock(batch);
            b.started = true;
            for (_, tx) in &b.wanted {
                tx.send_replace(Some(Err(from_thumbnail(e.clone()))));
            }
            return (Vec::new(), remembered(e));
        }
    };
    // Served as the type its bytes are, whatever the uploader said.
    let original_type = decoder.source().format.mime();
    let original = Media {
        content_type: original_type.to_owned(),
        ..media.clone()
    };
    let (mut made, mut failure) = (Vec::new(), None);
    let mut done = 0;
    loop {
        let requests: Vec<thumbnail::Request> = {
            let mut b = lock(batch);
            if done == b.wanted.len() {
                b.cover = None;
                break;
            }
            let requests: Vec<_> = b.wanted[done..].iter().map(|(r, _)| *r).collect();
            b.started = true;
            b.cover = Some(decoder.cover_after(&requests));
            requests
        };
        let results = decoder.render(&requests);
        // Built before taking the lock: hashing is not done under it.
        let mut answers = Vec::with_capacity(results.len());
        for (request, result) in requests.iter().zip(results) {
            answers.push(match result {
                Err(e) => {
                    failure = remembered(e.clone()).or(failure);
                    Err(from_thumbnail(e))
                }
                Ok(Outcome::Original) => {
                    made.push((
                        *request,
                        Kept::Original {
                            content_type: original_type,
                        },
                    ));
                    Ok(Thumb::Original(original.clone()))
                }
                Ok(Outcome::Made(t)) => {
                    let sha256 = hex::encode(Sha256::digest(&t.bytes));
                    let bytes = Bytes::from(t.bytes);
                    if !t.fallback {
                        made.push((
                            *request,
                            Kept::Made {
                                content_type: t.content_type,
                                bytes: bytes.clone(),
                            },
                        ));
                    }
                    Ok(Thumb::Made {
                        content_type: t.content_type.to_owned(),
                        bytes,
                        sha256,
                    })
                }
            });
        }
        let b = lock(batch);
        for (i, answer) in answers.into_iter().enumerate() {
            b.wanted[done + i].1.send_replace(Some(answer));
        }
        done += requests.len();
    }
    (made, failure)
}

/// The failures worth remembering: those of the source, not of the host or the encoder.
fn remembered(e: thumbnail::Error) -> Option<thumbnail::Error> {
    match e {
        thumbnail::Error::Encode(_) | thumbnail::Error::Unavailable(_) => None,
        e => Some(e),
    }
}
