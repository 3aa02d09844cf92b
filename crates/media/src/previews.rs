//! URL previews as a media operation: the cache first (Postgres, per origin, URL, hour and
//! language), else one fetch however many ask at once, on a pool of `urlPreviews.numWorkers`.
//!
//! A preview fetcher is the one part of a media repo whose URLs a user chooses, so every request
//! it makes goes through a client built for that ([`Setup`]): every address a name resolves to is
//! checked against `allowedNetworks`/`disallowedNetworks` and the connection goes to the checked
//! address; IP literals (in any notation: the URL standard's parser reads them), redirect targets,
//! ports and credentials in URLs are checked before anything is sent. Pages are read as they
//! stream, up to `maxPageSizeBytes`, and everything a preview does is bounded by
//! `timeouts.urlPreviewTimeoutSeconds`.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use config::{Config, MediaKind};
use futures_util::{FutureExt as _, StreamExt as _};
use outbound::{Method, Purpose, Url, header};
use preview::{OpenGraph, Providers, TextLimits};
use store::{NewMedia, PreviewKey, StoredPreview, Target};
use tokio::sync::Semaphore;

use crate::inflight::{Inflight, Joined, Run};
use crate::{Error, Service};

/// Previews are kept per hour: a page is fetched again at most hourly (per language).
const BUCKET_MS: i64 = 3_600_000;
/// How long a failed preview is remembered (clients retry on every render).
const FAILURE_MS: i64 = 5 * 60_000;
/// Fetches waiting for a worker or running, at most; beyond, requests get 503.
const MAX_QUEUED: usize = 256;
/// An oEmbed answer is JSON that describes a page: small.
const MAX_OEMBED_BYTES: u64 = 1024 * 1024;
/// The bytes of an image kept to read its header (dimensions) while it streams to the store.
const IMAGE_HEAD: usize = 256 * 1024;
/// The longest `Accept-Language` kept (a key of the cache, so bounded).
const MAX_LANGUAGE: usize = 64;
/// Previews found are also kept in memory, up to this many bytes of JSON, for this long: a stored
/// preview never changes (a success is never replaced), so any instance may keep it.
const MEMORY_BYTES: u64 = 32 * 1024 * 1024;
const MEMORY_TTL: Duration = Duration::from_secs(600);

/// What a client asked for.
#[derive(Debug, Clone)]
pub struct PreviewParams {
    pub url: String,
    /// The `ts` parameter: the preferred point in time (ms).
    pub ts: Option<i64>,
    /// The client's `Accept-Language`, else `urlPreviews.defaultLanguage`.
    pub language: Option<String>,
    /// The homeserver of the user who asked: preview images are its media.
    pub origin: String,
}

/// The kinds of stored failures.
const DENIED: &str = "denied";
const FAILED: &str = "failed";

/// Why a fetch gave no preview, shared by everyone who waited for it and cached briefly.
#[derive(Debug, Clone)]
enum Failure {
    /// The URL, or where it leads, is not one previews may reach.
    Denied(String),
    /// The page could not be fetched (the message says why).
    Failed(String),
    /// Our side failed (database, datastore): not cached.
    Local(String),
}

impl Failure {
    fn message(&self) -> &str {
        match self {
            Failure::Denied(why) | Failure::Failed(why) | Failure::Local(why) => why,
        }
    }

    /// How a failure is stored (local ones never are).
    fn kind(&self) -> &'static str {
        match self {
            Failure::Denied(_) => DENIED,
            Failure::Failed(_) | Failure::Local(_) => FAILED,
        }
    }

    /// A stored failure, as it was.
    fn stored(kind: &str, message: String) -> Failure {
        if kind == DENIED {
            Failure::Denied(message)
        } else {
            Failure::Failed(message)
        }
    }
}

impl From<Failure> for Error {
    fn from(f: Failure) -> Error {
        match f {
            Failure::Denied(why) => Error::PreviewDenied(why),
            Failure::Failed(why) => Error::PreviewFailed(why),
            Failure::Local(why) => Error::Unavailable(why),
        }
    }
}

impl From<outbound::Error> for Failure {
    fn from(e: outbound::Error) -> Failure {
        match e {
            outbound::Error::Denied { url, reason } => Failure::Denied(format!("{url}: {reason}")),
            other => Failure::Failed(other.to_string()),
        }
    }
}

/// The client and provider list previews use, from the config (rebuilt on reload).
pub struct Setup {
    client: outbound::Client,
    filter: Arc<outbound::UrlFilter>,
    providers: Providers,
}

impl Setup {
    /// From `urlPreviews`; the error names the setting that is wrong.
    pub fn new(config: &Config, user_agent_fallback: &str) -> Result<Setup, String> {
        let p = &config.url_previews;
        let networks = outbound::NetworkFilter::new(&p.allowed_networks, &p.disallowed_networks)
            .map_err(|e| format!("urlPreviews.allowedNetworks/disallowedNetworks: {e}"))?
            .with_nat64(&p.nat64_prefixes)
            .map_err(|e| {
                format!(
                    "urlPreviews.nat64Prefixes: `{}` is not an IPv6 /96 network",
                    e.entry
                )
            })?;
        let filter = Arc::new(outbound::UrlFilter {
            networks,
            ports: p.allowed_ports.clone(),
        });
        let user_agent = if p.user_agent.trim().is_empty() {
            user_agent_fallback
        } else {
            p.user_agent.trim()
        };
        let mut builder = outbound::Client::builder(user_agent)
            .filter(filter.clone())
            .accept_invalid_certs(p.preview_unsafe_certificates);
        if !p.nameservers.is_empty() {
            let servers = outbound::parse_nameservers(&p.nameservers)
                .map_err(|e| format!("urlPreviews.nameservers: {e}"))?;
            builder = builder.resolver(
                outbound::Resolver::nameservers(&servers)
                    .map_err(|e| format!("urlPreviews.nameservers: {e}"))?,
            );
        }
        let client = builder
            .build()
            .map_err(|e| format!("the URL preview HTTP client: {e}"))?;
        let providers = match &p.o_embed_providers_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    format!("urlPreviews.oEmbedProvidersFile: cannot read {path}: {e}")
                })?;
                Providers::from_json(&text)
                    .map_err(|e| format!("urlPreviews.oEmbedProvidersFile: {path}: {e}"))?
            }
            None => Providers::builtin(),
        };
        Ok(Setup {
            client,
            filter,
            providers,
        })
    }
}

type SharedFetch = Run<Result<Arc<str>, Failure>>;

pub(crate) struct Previewer {
    setup: ArcSwapOption<Setup>,
    workers: Arc<Semaphore>,
    inflight: Inflight<PreviewKey, Result<Arc<str>, Failure>>,
    found: moka::sync::Cache<PreviewKey, Arc<str>>,
    fetched: std::sync::atomic::AtomicU64,
    /// Previews made, by type: `oembed`, `opengraph`, or `calculated` (from the page's title,
    /// description and first image).
    made: crate::Counts,
}

impl Previewer {
    pub(crate) fn new(workers: usize) -> Previewer {
        Previewer {
            setup: ArcSwapOption::empty(),
            workers: Arc::new(Semaphore::new(workers.max(1))),
            inflight: Inflight::new(),
            found: moka::sync::Cache::builder()
                .weigher(|k: &PreviewKey, v: &Arc<str>| {
                    u32::try_from(k.url.len() + v.len()).unwrap_or(u32::MAX)
                })
                .max_capacity(MEMORY_BYTES)
                .time_to_live(MEMORY_TTL)
                .build(),
            fetched: std::sync::atomic::AtomicU64::new(0),
            made: crate::Counts::default(),
        }
    }
}

impl Service {
    /// Previews use `setup` from now on (at start, and on reload).
    pub fn configure_previews(&self, setup: Setup) {
        self.previews.setup.store(Some(Arc::new(setup)));
    }

    /// Previews made since start, by type (`oembed`, `opengraph`, `calculated`).
    pub fn previews_made(&self) -> Vec<(Vec<String>, u64)> {
        self.previews.made.snapshot()
    }

    /// Pages fetched for previews by this instance so far.
    pub fn previews_fetched(&self) -> u64 {
        self.previews
            .fetched
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The preview of `params.url` as the spec's JSON object.
    pub async fn preview(&self, config: &Config, params: PreviewParams) -> Result<Arc<str>, Error> {
        if !config.url_previews.enabled {
            return Err(Error::PreviewsDisabled);
        }
        let Some(setup) = self.previews.setup.load_full() else {
            return Err(Error::PreviewsDisabled);
        };
        let mut url = Url::parse(params.url.trim())
            .map_err(|e| Error::InvalidParam(format!("`url` is not a URL: {e}")))?;
        url.set_fragment(None);
        if let Some(why) = outbound::refusal(Some(setup.filter.as_ref()), &url) {
            return Err(Error::PreviewDenied(format!("{url}: {why}")));
        }
        let now = store::now_ms();
        let ts = params.ts.filter(|&t| t > 0 && t < now).unwrap_or(now);
        let language = params
            .language
            .as_deref()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .unwrap_or(&config.url_previews.default_language);
        let key = PreviewKey {
            origin: params.origin,
            url: url.to_string(),
            bucket_ts: ts - ts.rem_euclid(BUCKET_MS),
            language: language.chars().take(MAX_LANGUAGE).collect(),
        };
        if let Some(json) = self.previews.found.get(&key) {
            return Ok(json);
        }
        match self.store.preview(&key).await? {
            Some(StoredPreview::Found(json)) => {
                let json: Arc<str> = Arc::from(json);
                self.previews.found.insert(key, json.clone());
                return Ok(json);
            }
            Some(StoredPreview::Failed { kind, message, .. }) => {
                return Err(Failure::stored(&kind, message).into());
            }
            None => {}
        }
        let fetch = self.fetch_once(key, url, setup, config)?;
        fetch.await.map_err(Into::into)
    }

    /// Joins the fetch of `key` in progress, or starts one (it finishes for the others, and for
    /// the cache, when the first client goes away).
    fn fetch_once(
        &self,
        key: PreviewKey,
        url: Url,
        setup: Arc<Setup>,
        config: &Config,
    ) -> Result<SharedFetch, Error> {
        let previews = self.previews.clone();
        let job = Job {
            service: self.clone(),
            setup,
            settings: Settings::of(config),
            origin: key.origin.clone(),
            language: key.language.clone(),
        };
        let task_key = key.clone();
        let start = move || {
            async move {
                let _worker = previews.workers.acquire().await;
                previews
                    .fetched
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let within = job.settings.timeout;
                let made = tokio::time::timeout(within, job.preview(url))
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failure::Failed(format!(
                            "no preview within {} s (timeouts.urlPreviewTimeoutSeconds)",
                            within.as_secs()
                        )))
                    });
                let recorded = job.record(&task_key, made).await;
                if let Ok(json) = &recorded {
                    previews.found.insert(task_key, json.clone());
                }
                recorded
            }
            .boxed()
        };
        let stopped = |e: String| Err(Failure::Local(format!("the preview stopped: {e}")));
        match self
            .previews
            .inflight
            .join_or_start(key, MAX_QUEUED, start, stopped)
        {
            Joined::Started(run) | Joined::Running(run) => Ok(run),
            Joined::Full => Err(Error::Unavailable(format!(
                "{MAX_QUEUED} URL previews are being made; try again shortly"
            ))),
        }
    }
}

/// What a fetch needs of the config of the request that started it.
#[derive(Debug, Clone)]
struct Settings {
    timeout: Duration,
    max_page: u64,
    max_image: u64,
    redirects: usize,
    limits: TextLimits,
    file_types: Vec<String>,
    oembed: bool,
    requires_auth: bool,
}

impl Settings {
    fn of(config: &Config) -> Settings {
        let p = &config.url_previews;
        // 0: no size limit (time still bounds the fetch).
        let nonzero = |n: u64| (n > 0).then_some(n);
        let max_page = nonzero(p.max_page_size_bytes).unwrap_or(u64::MAX);
        Settings {
            timeout: Duration::from_secs(u64::from(
                config.timeouts.url_preview_timeout_seconds.max(1),
            )),
            max_page,
            max_image: nonzero(config.uploads.max_bytes).map_or(max_page, |n| n.min(max_page)),
            redirects: p.max_redirects as usize,
            limits: TextLimits {
                words: p.num_words,
                length: p.max_length,
                title_words: p.num_title_words,
                title_length: p.max_title_length,
            },
            file_types: p.file_preview_types.clone(),
            oembed: p.o_embed,
            requires_auth: config.repo.freeze_unauthenticated_media,
        }
    }
}

/// One preview being made.
struct Job {
    service: Service,
    setup: Arc<Setup>,
    settings: Settings,
    origin: String,
    language: String,
}

impl Job {
    fn made(&self, kind: &str) {
        self.service.previews.made.add(&[kind]);
    }

    async fn preview(&self, url: Url) -> Result<OpenGraph, Failure> {
        if self.settings.oembed
            && let Some((endpoint, _)) = self.setup.providers.endpoint(&url)
        {
            match self.oembed(&endpoint, &url).await {
                Ok(og) => {
                    self.made("oembed");
                    return self.with_image(og).await;
                }
                Err(e) => {
                    tracing::info!(%url, error = ?e, "oEmbed failed; previewing the page itself")
                }
            }
        }
        let response = self
            .get(
                &url,
                self.settings.max_page,
                "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8",
            )
            .await?;
        let final_url = response.url().clone();
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/octet-stream")
            .to_owned();
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime == "text/html" || mime == "application/xhtml+xml" {
            let page =
                read_page(response, &final_url, preview::html::charset(&content_type)).await?;
            let mut og = page.open_graph(&final_url, self.settings.limits);
            let from_open_graph = page.properties.keys().any(|k| k.starts_with("og:"));
            if self.settings.oembed
                && !og.contains_key("og:title")
                && let Some(link) = page.oembed.as_deref().and_then(|l| Url::parse(l).ok())
                && let Ok(extra) = self.oembed(&link, &final_url).await
            {
                for (k, v) in extra {
                    og.entry(k).or_insert(v);
                }
                self.made("oembed");
            } else {
                self.made(if from_open_graph {
                    "opengraph"
                } else {
                    "calculated"
                });
            }
            return self.with_image(og).await;
        }
        if file_type_listed(&mime, &self.settings.file_types) {
            let mut og = OpenGraph::new();
            og.insert("og:url".into(), final_url.as_str().into());
            if let Some(name) = final_url
                .path_segments()
                .and_then(|mut s| s.next_back())
                .filter(|n| !n.is_empty())
            {
                let name = percent_decode(name);
                og.insert("og:title".into(), name.into());
            }
            let image = self.store_image(response, &mime).await?;
            image.describe(&mut og);
            return Ok(og);
        }
        // Something else (a zip, a video not listed): nothing to show, which is a preview too.
        let mut og = OpenGraph::new();
        og.insert("og:url".into(), final_url.as_str().into());
        Ok(og)
    }

    async fn get(
        &self,
        url: &Url,
        max_bytes: u64,
        accept: &'static str,
    ) -> Result<outbound::Response, Failure> {
        // A little beyond the preview's own deadline, which ends it first and says so.
        let purpose = Purpose::preview(
            self.settings.timeout + Duration::from_secs(1),
            max_bytes,
            self.settings.redirects,
        );
        let language = self.language.clone();
        let response = self
            .setup
            .client
            .send(Method::GET, url.as_str(), purpose, move |r| {
                r.header(header::ACCEPT, accept)
                    .header(header::ACCEPT_LANGUAGE, language)
            })
            .await?;
        if !response.status().is_success() {
            return Err(Failure::Failed(format!(
                "{} answered {}",
                response.url(),
                response.status()
            )));
        }
        Ok(response)
    }

    async fn oembed(&self, endpoint: &Url, page: &Url) -> Result<OpenGraph, Failure> {
        let response = self
            .get(endpoint, MAX_OEMBED_BYTES, "application/json")
            .await?;
        let body = response.bytes().await.map_err(Failure::from)?;
        preview::oembed::to_open_graph(&body, page, self.settings.limits)
            .map_err(|e| Failure::Failed(e.to_string()))
    }

    /// Replaces `og:image` (a URL) with the image stored as media; a preview whose image cannot
    /// be had is shown without one.
    async fn with_image(&self, mut og: OpenGraph) -> Result<OpenGraph, Failure> {
        let Some(link) = og.remove("og:image") else {
            return Ok(og);
        };
        // What the page said about its image describes the remote file, not ours.
        og.retain(|k, _| !k.starts_with("og:image:"));
        let Some(url) = link.as_str().and_then(|l| Url::parse(l).ok()) else {
            return Ok(og);
        };
        let fetched = async {
            let response = self.get(&url, self.settings.max_image, "image/*").await?;
            let mime = response
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            self.store_image(response, &mime).await
        }
        .await;
        match fetched {
            Ok(image) => image.describe(&mut og),
            Err(Failure::Local(why)) => return Err(Failure::Local(why)),
            Err(e) => tracing::info!(%url, error = ?e, "the preview's image was not fetched"),
        }
        Ok(og)
    }

    /// Streams an image into the store as this origin's preview image (one media row per
    /// content). Refused unless its bytes are an image's.
    async fn store_image(
        &self,
        response: outbound::Response,
        mime: &str,
    ) -> Result<Image, Failure> {
        let mut body = response.stream();
        // The start, to see what it is before anything is stored.
        let mut head = Vec::new();
        let mut first: Vec<Bytes> = Vec::new();
        while head.len() < 64 {
            match body.next().await {
                Some(Ok(piece)) => {
                    head.extend_from_slice(&piece);
                    first.push(piece);
                }
                Some(Err(e)) => return Err(e.into()),
                None => break,
            }
        }
        let Some(format) = thumbnail::sniff(&head) else {
            return Err(Failure::Failed(format!(
                "not an image (its type says {mime:?})"
            )));
        };
        let captured = Arc::new(Mutex::new(head));
        let tap = captured.clone();
        let rest = body.map(move |piece| {
            if let Ok(bytes) = &piece {
                let mut head = tap.lock().unwrap_or_else(PoisonError::into_inner);
                if head.len() < IMAGE_HEAD {
                    let room = IMAGE_HEAD - head.len();
                    head.extend_from_slice(&bytes[..bytes.len().min(room)]);
                }
            }
            piece
        });
        let stream = futures_util::stream::iter(first.into_iter().map(Ok))
            .chain(rest)
            .map(|piece| piece.map_err(|e| e.to_string()));
        let new = NewMedia {
            origin: self.origin.clone(),
            kind: MediaKind::LocalMedia,
            content_type: format.mime().to_owned(),
            upload_name: None,
            user_id: String::new(),
            requires_auth: self.settings.requires_auth,
            quarantined: false,
            created_ts: None,
        };
        let limits = store::Limits {
            max_bytes: self.settings.max_image,
            ..store::Limits::default()
        };
        let uploaded = self
            .service
            .store
            .upload(new, Target::PreviewImage, stream, limits)
            .await
            .map_err(|e| match e {
                store::Error::TooLarge { max } => {
                    Failure::Failed(format!("the image is larger than {max} bytes"))
                }
                store::Error::Aborted(why) => Failure::Failed(why),
                other => Failure::Local(other.to_string()),
            })?;
        // The first pieces, then what the tap added of the rest: the file's start.
        let head = captured.lock().unwrap_or_else(PoisonError::into_inner);
        let size = thumbnail::inspect(&head).ok().map(|s| (s.width, s.height));
        Ok(Image {
            mxc: uploaded.media.mxc(),
            content_type: format.mime(),
            bytes: uploaded.size,
            size,
        })
    }

    /// Stores what the fetch ended with, so other instances and later requests see it.
    async fn record(
        &self,
        key: &PreviewKey,
        made: Result<OpenGraph, Failure>,
    ) -> Result<Arc<str>, Failure> {
        let (stored, answer) = match made {
            Ok(og) => {
                let json = serde_json::Value::Object(og).to_string();
                let answer = Ok(Arc::from(json.as_str()));
                (StoredPreview::Found(json), answer)
            }
            Err(local @ Failure::Local(_)) => return Err(local),
            Err(failure) => (
                StoredPreview::Failed {
                    kind: failure.kind().to_owned(),
                    message: failure.message().to_owned(),
                    until: store::now_ms() + FAILURE_MS,
                },
                Err(failure),
            ),
        };
        if let Err(e) = self.service.store.put_preview(key, &stored).await {
            tracing::warn!(error = %e, url = %key.url, "a URL preview was not cached");
        }
        answer
    }
}

/// A preview's image, stored.
struct Image {
    mxc: String,
    content_type: &'static str,
    bytes: u64,
    size: Option<(u32, u32)>,
}

impl Image {
    fn describe(&self, og: &mut OpenGraph) {
        og.insert("og:image".into(), self.mxc.clone().into());
        og.insert("og:image:type".into(), self.content_type.into());
        og.insert("matrix:image:size".into(), self.bytes.into());
        if let Some((w, h)) = self.size {
            og.insert("og:image:width".into(), w.into());
            og.insert("og:image:height".into(), h.into());
        }
    }
}

/// Reads an HTML page as it streams until it has said everything a preview uses, it ends, or it
/// grows past `maxPageSizeBytes` (what was read until then makes the preview). A page that stops
/// arriving is a failure: half a title is no preview.
async fn read_page(
    response: outbound::Response,
    url: &Url,
    charset: Option<&str>,
) -> Result<preview::Page, Failure> {
    let mut extractor = preview::Extractor::new(url.clone(), charset);
    let mut body = response.stream();
    while let Some(piece) = body.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(outbound::Error::TooLarge { .. }) => break,
            Err(e) => return Err(Failure::Failed(format!("{url}: {e}"))),
        };
        match extractor.feed(&piece) {
            Ok(false) => {}
            // Everything is known, or the tokenizer's memory ran out: what it has is the page.
            Ok(true) | Err(_) => break,
        }
    }
    Ok(extractor.finish().unwrap_or_default())
}

/// Whether `mime` is in `types` (`image/*` style wildcards allowed).
fn file_type_listed(mime: &str, types: &[String]) -> bool {
    types.iter().any(|t| {
        let t = t.trim().to_ascii_lowercase();
        match t.strip_suffix("/*") {
            Some(major) => mime.split('/').next() == Some(major),
            None => t == "*" || t == mime,
        }
    })
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::file_type_listed;

    #[test]
    fn file_types_match_with_wildcards() {
        let types = vec!["image/*".to_owned(), "video/mp4".to_owned()];
        assert!(file_type_listed("image/png", &types));
        assert!(file_type_listed("video/mp4", &types));
        assert!(!file_type_listed("video/webm", &types));
        assert!(!file_type_listed("imagex/png", &types));
        assert!(!file_type_listed("text/html", &types));
        assert!(file_type_listed("anything/else", &["*".to_owned()]));
    }
}
