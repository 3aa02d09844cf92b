//! `GET /_matrix/media/{r0,v1,v3}/thumbnail/...` and `/_matrix/client/v1/media/thumbnail/...`:
//! the query read and checked, then the `media` service's thumbnail served as a download is
//! (stored objects with ranges and ETags; a fresh thumbnail from memory).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::Response;
use media::{Thumb, ThumbnailParams};

use crate::SharedState;
use crate::auth::query_param;
use crate::client_media::{etag_matches, fetch_rule, media_headers, serve_object, wait_param};
use crate::error::{ApiError, ApiResult};
use crate::extract::{Authed, Ctx, R0, V1, V3, Version};

#[derive(serde::Deserialize)]
pub(crate) struct ThumbnailPath {
    server: String,
    media_id: String,
}

/// `width`, `height` (required, positive integers), `method` (`scale`, the default, or `crop`),
/// `animated` (`true`/`false`).
pub(crate) fn params(query: Option<&str>, authenticated: bool) -> ApiResult<ThumbnailParams> {
    let size = |name: &str| -> ApiResult<u32> {
        let value = query_param(query, name).ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "M_MISSING_PARAM",
                format!("Missing integer query parameter '{name}'"),
            )
        })?;
        value.parse::<u32>().ok().filter(|&n| n > 0).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Query parameter '{name}' must be a positive integer, not '{value}'"
            ))
        })
    };
    let (width, height) = (size("width")?, size("height")?);
    let method = match query_param(query, "method") {
        None => media::Method::Scale,
        Some(m) => media::Method::parse(&m).ok_or_else(|| {
            ApiError::bad_request(format!("Unknown method '{m}': use scale or crop"))
        })?,
    };
    let animated = match query_param(query, "animated").as_deref() {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "Query parameter 'animated' must be true or false, not '{other}'"
            )));
        }
    };
    Ok(ThumbnailParams {
        width,
        height,
        method,
        animated,
        authenticated,
    })
}

/// `GET /_matrix/media/{r0,v1,v3}/thumbnail/{serverName}/{mediaId}`
pub(crate) async fn thumbnail_legacy(
    State(state): State<SharedState>,
    _: Version<{ R0 | V1 | V3 }>,
    Path(path): Path<ThumbnailPath>,
    ctx: Ctx,
    parts: Parts,
) -> ApiResult<Response> {
    thumbnail(&state, &ctx, &parts, path, false).await
}

/// `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
pub(crate) async fn thumbnail_authenticated(
    State(state): State<SharedState>,
    Path(path): Path<ThumbnailPath>,
    authed: Authed<true>,
    parts: Parts,
) -> ApiResult<Response> {
    thumbnail(&state, &authed.ctx, &parts, path, true).await
}

async fn thumbnail(
    state: &SharedState,
    ctx: &Ctx,
    parts: &Parts,
    path: ThumbnailPath,
    authenticated: bool,
) -> ApiResult<Response> {
    let query = parts.uri.query();
    let params = params(query, authenticated)?;
    let (width, height) = (params.width, params.height);
    let found = state
        .media
        .thumbnail(
            &ctx.config,
            &path.server,
            &path.media_id,
            params,
            wait_param(query),
            fetch_rule(ctx, query, authenticated),
        )
        .await;
    let thumb = match found {
        Err(media::Error::Quarantined) if ctx.config.quarantine.replace_thumbnails => {
            return quarantined_image(ctx, parts, width, height).await;
        }
        found => found?.1,
    };
    state.media.accessed(&path.server, &path.media_id);
    let allow_redirect =
        authenticated || query_param(query, "allow_redirect").is_some_and(|v| v == "true");
    match thumb {
        Thumb::Original(media) => {
            let object = media
                .object
                .as_ref()
                .ok_or_else(|| ApiError::not_found("Not found"))?;
            serve_object(
                state,
                parts,
                &media.content_type,
                object,
                media.upload_name.as_deref(),
                allow_redirect,
            )
            .await
        }
        Thumb::Stored(stored) => {
            serve_object(
                state,
                parts,
                &stored.content_type,
                &stored.object,
                None,
                allow_redirect,
            )
            .await
        }
        Thumb::Made {
            content_type,
            bytes,
            sha256,
        } => {
            let etag = format!("\"{sha256}\"");
            if etag_matches(parts, &etag) {
                return media_headers(&content_type, None)
                    .status(StatusCode::NOT_MODIFIED)
                    .header(header::ETAG, etag)
                    .body(Body::empty())
                    .map_err(|e| ApiError::internal(e.to_string()));
            }
            let builder = media_headers(&content_type, None)
                .status(StatusCode::OK)
                .header(header::ETAG, &etag)
                .header(header::CONTENT_LENGTH, bytes.len());
            let body = if parts.method == Method::HEAD {
                Body::empty()
            } else {
                state.metrics.bytes_out.inc_by(bytes.len() as u64);
                Body::from(bytes)
            };
            builder
                .body(body)
                .map_err(|e| ApiError::internal(e.to_string()))
        }
    }
}

/// What quarantined media is served as (`quarantine.replaceThumbnails`, and
/// `replaceDownloads`): the image at `thumbnailPath` as it is, else a placeholder of the size asked.
pub(crate) async fn quarantined_image(
    ctx: &Ctx,
    parts: &Parts,
    width: u32,
    height: u32,
) -> ApiResult<Response> {
    /// An operator's image larger than this is not read per request.
    const MAX_IMAGE: u64 = 16 * 1024 * 1024;
    let path = &ctx.config.quarantine.thumbnail_path;
    let bytes = if path.is_empty() {
        thumbnail::quarantine_placeholder(width, height)
            .map_err(|e| ApiError::internal(e.to_string()))?
    } else {
        let too_large = tokio::fs::metadata(path)
            .await
            .is_ok_and(|m| m.len() > MAX_IMAGE);
        match tokio::fs::read(path).await {
            Ok(bytes) if !too_large => bytes,
            Ok(_) | Err(_) => {
                tracing::error!(
                    path,
                    "quarantine.thumbnailPath cannot be read, or is over 16 MiB"
                );
                return Err(ApiError::not_found("This media has been quarantined"));
            }
        }
    };
    let content_type = thumbnail::sniff(&bytes).map_or("application/octet-stream", |f| f.mime());
    let builder = media_headers(content_type, None)
        .status(StatusCode::OK)
        .header(header::CACHE_CONTROL, "no-store")
        .header(header::CONTENT_LENGTH, bytes.len());
    let body = if parts.method == Method::HEAD {
        Body::empty()
    } else {
        Body::from(bytes)
    };
    builder
        .body(body)
        .map_err(|e| ApiError::internal(e.to_string()))
}
