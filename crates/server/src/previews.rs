//! `GET /_matrix/media/{r0,v1,v3}/preview_url` and `/_matrix/client/v1/media/preview_url`: the
//! `url` and `ts` parameters and the client's `Accept-Language` onto the `media` service's
//! preview, answered as the JSON object it is. Guests may not (as Synapse): a fetcher of URLs is
//! the last thing to open to anyone who can register a guest.

use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse as _, Response};
use media::PreviewParams;

use crate::SharedState;
use crate::auth::query_param;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Authed, R0, V1, V3, Version};
use axum::extract::State;

/// `GET /_matrix/media/{r0,v1,v3}/preview_url`
pub(crate) async fn preview_legacy(
    State(state): State<SharedState>,
    _: Version<{ R0 | V1 | V3 }>,
    authed: Authed<false>,
    parts: Parts,
) -> ApiResult<Response> {
    preview(&state, authed, &parts).await
}

/// `GET /_matrix/client/v1/media/preview_url`
pub(crate) async fn preview_authenticated(
    State(state): State<SharedState>,
    authed: Authed<false>,
    parts: Parts,
) -> ApiResult<Response> {
    preview(&state, authed, &parts).await
}

async fn preview(state: &SharedState, authed: Authed<false>, parts: &Parts) -> ApiResult<Response> {
    let query = parts.uri.query();
    let url = query_param(query, "url").ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "M_MISSING_PARAM",
            "Missing string query parameter 'url'",
        )
    })?;
    let ts = match query_param(query, "ts") {
        None => None,
        Some(ts) => Some(ts.parse::<i64>().map_err(|_| {
            ApiError::bad_request(format!(
                "Query parameter 'ts' must be an integer, not '{ts}'"
            ))
        })?),
    };
    let language = parts
        .headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let ctx = &authed.ctx;
    let json = state
        .media
        .preview(
            &ctx.config,
            PreviewParams {
                url,
                ts,
                language,
                origin: ctx.hs.name.clone(),
            },
        )
        .await?;
    Ok((
        [
            (header::CONTENT_TYPE, "application/json"),
            // Per user's request, and the page may change: clients must not share it.
            (header::CACHE_CONTROL, "private, max-age=3600"),
        ],
        json.to_string(),
    )
        .into_response())
}
