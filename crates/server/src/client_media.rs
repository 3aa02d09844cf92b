//! The client media API: upload, asynchronous upload (MSC2246), download (legacy and
//! authenticated, MSC3916) and config. Handlers map HTTP onto the `media` service and build the
//! responses (headers, ranges, redirects).

use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use store::Target;

use crate::auth::query_param;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Authed, Ctx, R0, V1, V3, Version};
use crate::{SharedState, headers};

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

/// Streams `body` into the service as `target`, counting it in the metrics.
async fn store_upload(
    state: &SharedState,
    authed: &Authed<false>,
    headers: &HeaderMap,
    query: Option<&str>,
    target: Target,
    body: Body,
) -> ApiResult<store::Uploaded> {
    let config = &authed.ctx.config;
    let upload = media::Upload {
        origin: authed.ctx.hs.name.clone(),
        user_id: authed.user.user_id.clone(),
        content_type: content_type(headers),
        file_name: query_param(query, "filename").filter(|n| !n.is_empty()),
        declared_len: content_length(headers),
    };
    let body = body.into_data_stream();
    let started = Instant::now();
    let uploaded = state.media.upload(config, upload, target, body).await?;
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
    _: Version<{ R0 | V1 | V3 }>,
    authed: Authed<false>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> ApiResult<Json<Value>> {
    let uploaded = store_upload(
        &state,
        &authed,
        &headers,
        query.as_deref(),
        Target::NewId,
        body,
    )
    .await?;
    tracing::info!(mxc = %uploaded.media.mxc(), user = %authed.user.user_id, bytes = uploaded.size, dedup = uploaded.deduplicated, "upload");
    Ok(Json(json!({ "content_uri": uploaded.media.mxc() })))
}

/// `POST /_matrix/media/v1/create` (MSC2246): reserves an id to upload into later.
pub(crate) async fn create(
    State(state): State<SharedState>,
    authed: Authed<false>,
) -> ApiResult<Json<Value>> {
    let Authed { ctx, user } = authed;
    let created = state
        .media
        .create(&ctx.config, &ctx.hs.name, &user.user_id)
        .await?;
    Ok(Json(json!({
        "content_uri": format!("mxc://{}/{}", ctx.hs.name, created.media_id),
        "unused_expires_at": created.expires_ts,
    })))
}

/// `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}` (MSC2246)
pub(crate) async fn upload_async(
    State(state): State<SharedState>,
    _: Version<V3>,
    Path((_, server, media_id)): Path<(String, String, String)>,
    authed: Authed<false>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    body: Body,
) -> ApiResult<Json<Value>> {
    if server != authed.ctx.hs.name {
        return Err(store::Error::PendingNotFound.into());
    }
    state
        .media
        .check_pending(&authed.ctx.config, &server, &media_id, &authed.user.user_id)
        .await?;
    let target = Target::Pending(media_id);
    let uploaded = store_upload(&state, &authed, &headers, query.as_deref(), target, body).await?;
    tracing::info!(mxc = %uploaded.media.mxc(), user = %authed.user.user_id, bytes = uploaded.size, "async upload");
    Ok(Json(json!({})))
}

/// The path of a download: `{server}/{media_id}[/{file_name}]` (after `{version}` on the legacy
/// endpoints).
#[derive(serde::Deserialize)]
pub(crate) struct DownloadPath {
    server: String,
    media_id: String,
    file_name: Option<String>,
}

/// `GET /_matrix/media/{r0,v1,v3}/download/{serverName}/{mediaId}[/{fileName}]`
pub(crate) async fn download_legacy(
    State(state): State<SharedState>,
    _: Version<{ R0 | V1 | V3 }>,
    Path(path): Path<DownloadPath>,
    ctx: Ctx,
    parts: Parts,
) -> ApiResult<Response> {
    download(&state, &ctx, &parts, path, false).await
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}[/{fileName}]`
pub(crate) async fn download_authenticated(
    State(state): State<SharedState>,
    Path(path): Path<DownloadPath>,
    authed: Authed<true>,
    parts: Parts,
) -> ApiResult<Response> {
    download(&state, &authed.ctx, &parts, path, true).await
}

/// `timeout_ms`: how long to wait for a pending upload.
pub(crate) fn wait_param(query: Option<&str>) -> media::Wait {
    media::Wait::from_millis(query_param(query, "timeout_ms").and_then(|t| t.parse::<u64>().ok()))
}

/// Remote media is fetched for the authenticated endpoints; the legacy ones fetch only what they
/// may serve (not when unauthenticated media is frozen) and not with `allow_remote=false`.
pub(crate) fn fetch_rule<'a>(
    ctx: &'a Ctx,
    query: Option<&str>,
    authenticated: bool,
) -> media::Fetch<'a> {
    if authenticated
        || (!ctx.config.repo.freeze_unauthenticated_media
            && query_param(query, "allow_remote").is_none_or(|v| v != "false"))
    {
        media::Fetch::As(&ctx.hs.name)
    } else {
        media::Fetch::CachedOnly
    }
}

async fn download(
    state: &SharedState,
    ctx: &Ctx,
    parts: &Parts,
    path: DownloadPath,
    authenticated: bool,
) -> ApiResult<Response> {
    let query = parts.uri.query();
    let wait = wait_param(query);
    let fetch = fetch_rule(ctx, query, authenticated);
    // A plain GET may get remote media as it arrives; a range, a HEAD or a conditional request
    // waits until it is stored.
    let live_ok = parts.method == Method::GET
        && !parts.headers.contains_key(header::RANGE)
        && !parts.headers.contains_key(header::IF_NONE_MATCH);
    let found = state
        .media
        .find(
            &ctx.config,
            &path.server,
            &path.media_id,
            wait,
            fetch,
            live_ok,
        )
        .await;
    let found = match found {
        Err(media::Error::Quarantined) if ctx.config.quarantine.replace_downloads => {
            return crate::thumbnails::quarantined_image(ctx, parts, 512, 512).await;
        }
        found => found?,
    };
    state.media.accessed(&path.server, &path.media_id);
    let media = match found {
        media::Found::Stored(media) => media,
        media::Found::Live(live) => {
            let name = path.file_name.as_deref().or(live.upload_name.as_deref());
            let metrics = state.clone();
            let body = live.body.map(move |piece| {
                let piece = piece.map_err(std::io::Error::other)?;
                metrics.metrics.bytes_out.inc_by(piece.len() as u64);
                Ok::<_, std::io::Error>(piece)
            });
            // No length, range or ETag yet: the content is still arriving (chunked).
            return media_headers(&live.content_type, name)
                .status(StatusCode::OK)
                .body(Body::from_stream(body))
                .map_err(|e| ApiError::internal(e.to_string()));
        }
    };
    // Uploaded after unauthenticated media was frozen: the authenticated endpoint only.
    if !authenticated && media.requires_auth {
        return Err(ApiError::not_found(
            "This media is only served on the authenticated endpoint /_matrix/client/v1/media/download",
        ));
    }
    let Some(object) = media.object.clone() else {
        return Err(ApiError::not_found("Not found"));
    };
    let disposition_name = path.file_name.as_deref().or(media.upload_name.as_deref());
    state.metrics.observe_media_age(media.created_ts);
    // MSC3916: clients of the authenticated endpoints follow redirects; legacy clients say so.
    let allow_redirect =
        authenticated || query_param(query, "allow_redirect").is_some_and(|v| v == "true");
    serve_object(
        state,
        parts,
        &media.content_type,
        &object,
        disposition_name,
        allow_redirect,
    )
    .await
}

pub(crate) async fn serve_object(
    state: &SharedState,
    parts: &Parts,
    content_type: &str,
    object: &store::ObjectRef,
    file_name: Option<&str>,
    allow_redirect: bool,
) -> ApiResult<Response> {
    let etag = format!("\"{}\"", object.sha256);
    let mut builder = media_headers(content_type, file_name)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &etag);
    if etag_matches(parts, &etag) {
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
            .media
            .store()
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
        Some(value) => match crate::range::parse_range(value, size) {
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
    let reader = state.media.store().read(object, start, Some(len)).await?;
    state
        .metrics
        .observe_datastore("open", started.elapsed().as_secs_f64());
    state.metrics.bytes_out.inc_by(len);
    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
    builder
        .body(Body::from_stream(stream))
        .map_err(|e| ApiError::internal(e.to_string()))
}

/// The request's `If-None-Match` names `etag` (or `*`).
pub(crate) fn etag_matches(parts: &Parts, etag: &str) -> bool {
    parts
        .headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
}

/// The headers every media download has: its type and name, and the security headers.
pub(crate) fn media_headers(
    content_type: &str,
    file_name: Option<&str>,
) -> axum::http::response::Builder {
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            header_value(content_type, "application/octet-stream"),
        )
        .header(
            header::CONTENT_DISPOSITION,
            header_value(
                &headers::content_disposition(content_type, file_name),
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
}

pub(crate) fn header_value(value: &str, fallback: &'static str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static(fallback))
}

/// `GET /_matrix/media/{r0,v1,v3}/config`
pub(crate) async fn config_legacy(
    _: Version<{ R0 | V1 | V3 }>,
    authed: Authed<true>,
) -> ApiResult<Response> {
    config(authed).await
}

/// `GET /_matrix/client/v1/media/config`
pub(crate) async fn config(authed: Authed<true>) -> ApiResult<Response> {
    let uploads = &authed.ctx.config.uploads;
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
