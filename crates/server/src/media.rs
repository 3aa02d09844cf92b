//! Upload, asynchronous upload (MSC2246), download (legacy and authenticated, MSC3916) and config.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use config::{Config, Homeserver, MediaKind};
use serde_json::{Value, json};
use store::{Limits, Media, NewMedia, Target};

use crate::auth::{User, query_param};
use crate::error::{ApiError, ApiResult};
use crate::{Hs, SharedState, headers};

/// `timeout_ms` when the client gives none, and the most we wait whatever it asks (as Synapse).
const DEFAULT_WAIT_MS: u64 = 20_000;
const MAX_WAIT_MS: u64 = 60_000;

/// A request's config snapshot, homeserver and client address.
struct Ctx {
    config: Arc<Config>,
    hs: Homeserver,
    client_ip: String,
}

impl Ctx {
    async fn new(state: &SharedState, parts: &mut Parts) -> ApiResult<Ctx> {
        let Hs(hs) =
            <Hs as axum::extract::FromRequestParts<SharedState>>::from_request_parts(parts, state)
                .await?;
        let config = state.config();
        let client_ip = crate::client_ip(&config, parts);
        Ok(Ctx {
            config,
            hs,
            client_ip,
        })
    }

    async fn user(
        &self,
        state: &SharedState,
        parts: &Parts,
        allow_guests: bool,
    ) -> ApiResult<User> {
        state
            .auth
            .authenticate(
                &self.config,
                &self.hs,
                &parts.headers,
                parts.uri.query(),
                &self.client_ip,
                allow_guests,
                &state.metrics,
            )
            .await
    }
}

fn check_version(version: &str, allowed: &[&str]) -> ApiResult<()> {
    if allowed.contains(&version) {
        Ok(())
    } else {
        Err(ApiError::unrecognized())
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or("application/octet-stream")
        .to_owned()
}

/// Size limits and quotas, checked from `Content-Length` before a byte is read; the returned limits
/// are enforced again while streaming, and the quota once more when the upload is recorded.
async fn upload_limits(
    state: &SharedState,
    config: &Config,
    user: &User,
    declared: Option<u64>,
) -> ApiResult<UploadLimits> {
    let max = config.uploads.max_bytes;
    if let Some(len) = declared
        && max > 0
        && len > max
    {
        return Err(store::Error::TooLarge { max }.into());
    }
    let mut limits = UploadLimits {
        store: Limits {
            max_bytes: max,
            min_bytes: config.uploads.min_bytes,
            quota: None,
        },
        quota_bytes: None,
    };
    if let Some(quota) = quota_for(config, &user.user_id) {
        let usage = state.store.usage(&user.user_id).await?;
        if quota.max_files > 0 && usage.files >= quota.max_files {
            return Err(store::Error::QuotaFiles(quota.max_files).into());
        }
        if quota.max_bytes > 0 {
            let left = quota.max_bytes.saturating_sub(usage.bytes);
            if declared.unwrap_or(0) > left || left == 0 {
                return Err(ApiError::forbidden(format!(
                    "You have reached your quota of {} bytes",
                    quota.max_bytes
                )));
            }
            if max == 0 || left < max {
                limits.store.max_bytes = left;
                limits.quota_bytes = Some(quota.max_bytes);
            }
        }
        limits.store.quota = Some(store::Quota {
            max_files: quota.max_files,
            max_bytes: quota.max_bytes,
        });
    }
    Ok(limits)
}

struct UploadLimits {
    store: Limits,
    /// Set when the quota, not `uploads.maxBytes`, is the streaming limit.
    quota_bytes: Option<u64>,
}

impl UploadLimits {
    fn explain(&self, e: store::Error) -> ApiError {
        match (e, self.quota_bytes) {
            (store::Error::TooLarge { .. }, Some(q)) => {
                ApiError::forbidden(format!("This upload would exceed your quota of {q} bytes"))
            }
            (e, _) => e.into(),
        }
    }
}

/// The first quota whose glob matches the user, when quotas are on.
fn quota_for<'a>(config: &'a Config, user_id: &str) -> Option<&'a config::UserQuota> {
    if !config.uploads.quotas.enabled {
        return None;
    }
    config
        .uploads
        .quotas
        .users
        .iter()
        .find(|q| glob_match(&q.glob, user_id))
}

/// `*` matches any run of characters, `?` one character.
fn glob_match(glob: &str, text: &str) -> bool {
    let (g, t): (Vec<char>, Vec<char>) = (glob.chars().collect(), text.chars().collect());
    let (mut gi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if gi < g.len() && (g[gi] == '?' || g[gi] == t[ti]) {
            gi += 1;
            ti += 1;
        } else if gi < g.len() && g[gi] == '*' {
            star = Some(gi);
            mark = ti;
            gi += 1;
        } else if let Some(s) = star {
            gi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|c| *c == '*')
}

/// The most a file name may take, in bytes (as Linux's NAME_MAX).
const MAX_FILE_NAME_BYTES: usize = 255;

fn new_media(config: &Config, hs: &Homeserver, user: &User, parts: &Parts) -> ApiResult<NewMedia> {
    let upload_name = query_param(parts.uri.query(), "filename").filter(|n| !n.is_empty());
    if let Some(name) = &upload_name {
        if name.contains('\0') {
            return Err(ApiError::bad_request(
                "`filename` must not contain a NUL character (%00)",
            ));
        }
        if name.len() > MAX_FILE_NAME_BYTES {
            return Err(ApiError::bad_request(format!(
                "`filename` is longer than {MAX_FILE_NAME_BYTES} bytes"
            )));
        }
    }
    Ok(NewMedia {
        origin: hs.name.clone(),
        kind: MediaKind::LocalMedia,
        content_type: content_type(&parts.headers),
        upload_name,
        user_id: user.user_id.clone(),
        requires_auth: config.repo.freeze_unauthenticated_media,
        quarantined: false,
        created_ts: None,
    })
}

/// The body's pieces, failing when the client sends nothing for `timeout` (a stalled upload
/// then fails like any interrupted one, and leaves nothing behind).
fn body_stream(
    body: Body,
    timeout: Duration,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, String>> + Send {
    let stream = body.into_data_stream();
    futures_util::stream::unfold(Some(stream), move |stream| async move {
        let mut stream = stream?;
        match tokio::time::timeout(timeout, futures_util::StreamExt::next(&mut stream)).await {
            Ok(Some(piece)) => Some((piece.map_err(|e| e.to_string()), Some(stream))),
            Ok(None) => None,
            Err(_) => Some((
                Err(format!("no data received for {} s", timeout.as_secs())),
                None,
            )),
        }
    })
}

async fn store_upload(
    state: &SharedState,
    new: NewMedia,
    target: Target,
    body: Body,
    limits: &UploadLimits,
) -> ApiResult<store::Uploaded> {
    let started = Instant::now();
    let timeout = Duration::from_secs(u64::from(
        state.config().connections.body_timeout_seconds.max(1),
    ));
    let stream = body_stream(body, timeout);
    let uploaded = state
        .store
        .upload(new, target, stream, limits.store)
        .await
        .map_err(|e| limits.explain(e))?;
    state
        .metrics
        .observe_datastore("upload", started.elapsed().as_secs_f64());
    state.metrics.uploads.inc();
    state.metrics.bytes_in.inc_by(uploaded.size);
    if uploaded.deduplicated {
        state.metrics.dedup_hits.inc();
    }
    Ok(uploaded)
}

/// `POST /_matrix/media/{r0,v1,v3}/upload`
pub(crate) async fn upload(
    State(state): State<SharedState>,
    Path(version): Path<String>,
    request: Request,
) -> ApiResult<Json<Value>> {
    check_version(&version, &["r0", "v1", "v3"])?;
    let (mut parts, body) = request.into_parts();
    let ctx = Ctx::new(&state, &mut parts).await?;
    let user = ctx.user(&state, &parts, false).await?;
    let limits = upload_limits(&state, &ctx.config, &user, content_length(&parts.headers)).await?;
    let new = new_media(&ctx.config, &ctx.hs, &user, &parts)?;
    let uploaded = store_upload(&state, new, Target::NewId, body, &limits).await?;
    tracing::info!(mxc = %uploaded.media.mxc(), user = %user.user_id, bytes = uploaded.size, dedup = uploaded.deduplicated, "upload");
    Ok(Json(json!({ "content_uri": uploaded.media.mxc() })))
}

/// `POST /_matrix/media/v1/create` (MSC2246): reserves an id to upload into later.
pub(crate) async fn create(
    State(state): State<SharedState>,
    request: Request,
) -> ApiResult<Json<Value>> {
    let (mut parts, _) = request.into_parts();
    let ctx = Ctx::new(&state, &mut parts).await?;
    let user = ctx.user(&state, &parts, false).await?;
    let max_pending = quota_for(&ctx.config, &user.user_id)
        .map(|q| q.max_pending)
        .filter(|n| *n > 0)
        .unwrap_or(ctx.config.uploads.max_pending);
    let now = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(i64::MAX);
    let max_age = i64::try_from(ctx.config.uploads.max_age_seconds.max(1)).unwrap_or(86_400);
    let expires = now + max_age * 1000;
    let media_id = state
        .store
        .create_pending(
            &ctx.hs.name,
            &user.user_id,
            expires,
            ctx.config.repo.freeze_unauthenticated_media,
            max_pending,
        )
        .await?;
    Ok(Json(
        json!({ "content_uri": format!("mxc://{}/{media_id}", ctx.hs.name), "unused_expires_at": expires }),
    ))
}

/// `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}` (MSC2246)
pub(crate) async fn upload_async(
    State(state): State<SharedState>,
    Path((version, server, media_id)): Path<(String, String, String)>,
    request: Request,
) -> ApiResult<Json<Value>> {
    check_version(&version, &["v3"])?;
    let (mut parts, body) = request.into_parts();
    let ctx = Ctx::new(&state, &mut parts).await?;
    let user = ctx.user(&state, &parts, false).await?;
    if server != ctx.hs.name || !store::ids::is_valid_media_id(&media_id) {
        return Err(store::Error::PendingNotFound.into());
    }
    state
        .store
        .check_pending(&server, &media_id, &user.user_id)
        .await?;
    let limits = upload_limits(&state, &ctx.config, &user, content_length(&parts.headers)).await?;
    let new = new_media(&ctx.config, &ctx.hs, &user, &parts)?;
    let uploaded = store_upload(&state, new, Target::Pending(media_id), body, &limits).await?;
    tracing::info!(mxc = %uploaded.media.mxc(), user = %user.user_id, bytes = uploaded.size, "async upload");
    Ok(Json(json!({})))
}

pub(crate) async fn download_legacy(
    State(state): State<SharedState>,
    Path((version, server, media_id)): Path<(String, String, String)>,
    request: Request,
) -> ApiResult<Response> {
    check_version(&version, &["r0", "v1", "v3"])?;
    download(state, request, server, media_id, None, false).await
}

pub(crate) async fn download_legacy_named(
    State(state): State<SharedState>,
    Path((version, server, media_id, file_name)): Path<(String, String, String, String)>,
    request: Request,
) -> ApiResult<Response> {
    check_version(&version, &["r0", "v1", "v3"])?;
    download(state, request, server, media_id, Some(file_name), false).await
}

pub(crate) async fn download_authenticated(
    State(state): State<SharedState>,
    Path((server, media_id)): Path<(String, String)>,
    request: Request,
) -> ApiResult<Response> {
    download(state, request, server, media_id, None, true).await
}

pub(crate) async fn download_authenticated_named(
    State(state): State<SharedState>,
    Path((server, media_id, file_name)): Path<(String, String, String)>,
    request: Request,
) -> ApiResult<Response> {
    download(state, request, server, media_id, Some(file_name), true).await
}

async fn download(
    state: SharedState,
    request: Request,
    server: String,
    media_id: String,
    file_name: Option<String>,
    authenticated: bool,
) -> ApiResult<Response> {
    let (mut parts, _) = request.into_parts();
    let ctx = Ctx::new(&state, &mut parts).await?;
    if authenticated {
        ctx.user(&state, &parts, true).await?;
    }
    if !store::ids::is_valid_server_name(&server) || !store::ids::is_valid_media_id(&media_id) {
        return Err(ApiError::not_found("Invalid server name or media id"));
    }
    if ctx.config.homeserver(&server).is_none() {
        // Fetching from other servers over federation is a later feature.
        return Err(ApiError::not_found(format!(
            "Media from {server} is not available here"
        )));
    }
    let media = wait_for_content(&state, &server, &media_id, parts.uri.query()).await?;
    if media.quarantined {
        return Err(ApiError::not_found("This media has been quarantined"));
    }
    if !authenticated && media.requires_auth {
        return Err(ApiError::not_found(
            "This media is only served on the authenticated endpoint /_matrix/client/v1/media/download",
        ));
    }
    let Some(object) = media.object.clone() else {
        return Err(ApiError::not_found("Not found"));
    };
    let disposition_name = file_name.as_deref().or(media.upload_name.as_deref());
    // MSC3916: clients of the authenticated endpoints follow redirects; legacy clients say so.
    let allow_redirect = authenticated
        || query_param(parts.uri.query(), "allow_redirect").is_some_and(|v| v == "true");
    serve_object(
        &state,
        &parts,
        &media,
        &object,
        disposition_name,
        allow_redirect,
    )
    .await
}

/// The media row, waiting up to `timeout_ms` for a pending upload to complete (woken at once when it
/// does, on any instance).
async fn wait_for_content(
    state: &SharedState,
    origin: &str,
    media_id: &str,
    query: Option<&str>,
) -> ApiResult<Media> {
    let mut uploads = state.store.subscribe_uploads();
    let media = state
        .store
        .media(origin, media_id)
        .await?
        .ok_or_else(|| ApiError::not_found("Not found"))?;
    if media.object.is_some() {
        return Ok(media);
    }
    let wait_ms = query_param(query, "timeout_ms")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(DEFAULT_WAIT_MS)
        .min(MAX_WAIT_MS);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
    let key = format!("{origin}/{media_id}");
    loop {
        if media_expired(&media) {
            return Err(ApiError::not_found(
                "This media id expired before any content was uploaded",
            ));
        }
        match tokio::time::timeout_at(deadline, uploads.recv()).await {
            Err(_) => break,
            Ok(Ok(done)) if done != key => continue,
            // A match, or missed messages (lagged): look again.
            Ok(_) => {
                let media = state
                    .store
                    .media(origin, media_id)
                    .await?
                    .ok_or_else(|| ApiError::not_found("Not found"))?;
                if media.object.is_some() {
                    return Ok(media);
                }
            }
        }
    }
    Err(ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "M_NOT_YET_UPLOADED",
        "Content has not yet been uploaded",
    ))
}

fn media_expired(media: &Media) -> bool {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    media
        .expires_ts
        .is_some_and(|t| u128::try_from(t).unwrap_or(0) <= now)
}

/// A single `bytes=` range against `size`: `Ok(None)` for the whole object, `Err` when unsatisfiable.
fn parse_range(value: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None); // Multiple ranges: serve the whole object, as RFC 9110 allows.
    }
    let Some((start, end)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = (start.trim(), end.trim());
    let range = if start.is_empty() {
        let suffix: u64 = end.parse().map_err(|_| ())?;
        if suffix == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(suffix), size - 1)
    } else {
        let start: u64 = start.parse().map_err(|_| ())?;
        let end = if end.is_empty() {
            size.saturating_sub(1)
        } else {
            end.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

async fn serve_object(
    state: &SharedState,
    parts: &Parts,
    media: &Media,
    object: &store::ObjectRef,
    file_name: Option<&str>,
    allow_redirect: bool,
) -> ApiResult<Response> {
    let etag = format!("\"{}\"", object.sha256);
    let mut builder = Response::builder()
        .header(
            header::CONTENT_TYPE,
            header_value(&media.content_type, "application/octet-stream"),
        )
        .header(
            header::CONTENT_DISPOSITION,
            header_value(
                &headers::content_disposition(&media.content_type, file_name),
                "attachment",
            ),
        )
        .header(
            header::CONTENT_SECURITY_POLICY,
            headers::CONTENT_SECURITY_POLICY,
        )
        .header("X-Content-Security-Policy", "sandbox;")
        .header("Cross-Origin-Resource-Policy", "cross-origin")
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::CACHE_CONTROL, headers::CACHE_CONTROL)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &etag);
    if parts
        .headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return builder
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    // S3 with `publicBaseUrl`: the client fetches the bytes from there (a CDN), not through us.
    // There is no cache to prefer, so `redirectWhenCached` changes nothing: redirects whenever
    // allowed.
    if allow_redirect
        && let Some(url) = state
            .store
            .datastores()
            .get(&object.datastore_id)
            .and_then(|ds| ds.redirect_url(&object.location))
    {
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, header_value(&url, "/"))
            .header("Cross-Origin-Resource-Policy", "cross-origin")
            // Not cached: the object may move to another datastore (`datastores transfer`).
            .header(header::CACHE_CONTROL, "no-store")
            .body(Body::empty())
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    let size = object.size;
    let range = match parts
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
    {
        None => None,
        Some(value) => match parse_range(value, size) {
            Ok(r) => r,
            Err(()) => {
                return builder
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{size}"))
                    .body(Body::empty())
                    .map_err(|e| ApiError::internal(e.to_string()));
            }
        },
    };
    let (status, start, len) = match range {
        Some((start, end)) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{size}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        None => (StatusCode::OK, 0, size),
    };
    builder = builder.status(status).header(header::CONTENT_LENGTH, len);
    if parts.method == Method::HEAD {
        return builder
            .body(Body::empty())
            .map_err(|e| ApiError::internal(e.to_string()));
    }
    let started = Instant::now();
    let reader = state.store.read(object, start, Some(len)).await?;
    state
        .metrics
        .observe_datastore("open", started.elapsed().as_secs_f64());
    state.metrics.bytes_out.inc_by(len);
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
    builder
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

fn header_value(value: &str, fallback: &'static str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static(fallback))
}

/// `GET /_matrix/media/{r0,v1,v3}/config`
pub(crate) async fn media_config(
    State(state): State<SharedState>,
    Path(version): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    check_version(&version, &["r0", "v1", "v3"])?;
    config_response(state, request).await
}

/// `GET /_matrix/client/v1/media/config`
pub(crate) async fn media_config_authenticated(
    State(state): State<SharedState>,
    request: Request,
) -> ApiResult<Response> {
    config_response(state, request).await
}

async fn config_response(state: SharedState, request: Request) -> ApiResult<Response> {
    let (mut parts, _) = request.into_parts();
    let ctx = Ctx::new(&state, &mut parts).await?;
    ctx.user(&state, &parts, true).await?;
    let uploads = &ctx.config.uploads;
    // reportedMaxBytes: 0 reports maxBytes, -1 reports no limit.
    let size = match uploads.reported_max_bytes {
        0 if uploads.max_bytes > 0 => Some(uploads.max_bytes),
        n if n > 0 => u64::try_from(n).ok(),
        _ => None,
    };
    let body = match size {
        Some(size) => json!({ "m.upload.size": size }),
        None => json!({}),
    };
    Ok(Json(body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=5-1", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
    }

    #[test]
    fn globs() {
        assert!(glob_match("@*:*", "@alice:example.com"));
        assert!(glob_match(
            "@*:second.example.org",
            "@bob:second.example.org"
        ));
        assert!(!glob_match("@*:second.example.org", "@bob:example.com"));
        assert!(glob_match("@a?ice:*", "@alice:x"));
    }
}
