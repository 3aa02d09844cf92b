//! Client endpoints the media repo answers for the homeserver: logout (to drop cached tokens) and
//! `/versions` (to announce authenticated media).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::SharedState;
use crate::auth::token;
use crate::error::{ApiError, ApiResult};
use crate::extract::{Ctx, R0, V3, Version};

/// The spec version that brought authenticated media.
const AUTHENTICATED_MEDIA_VERSION: &str = "v1.11";

/// `POST /_matrix/client/{r0,v3}/logout`
pub(crate) async fn logout(
    State(state): State<SharedState>,
    _: Version<{ R0 | V3 }>,
    ctx: Ctx,
    parts: Parts,
) -> ApiResult<Response> {
    proxy_logout(&state, &ctx, &parts, false).await
}

/// `POST /_matrix/client/{r0,v3}/logout/all`
pub(crate) async fn logout_all(
    State(state): State<SharedState>,
    _: Version<{ R0 | V3 }>,
    ctx: Ctx,
    parts: Parts,
) -> ApiResult<Response> {
    proxy_logout(&state, &ctx, &parts, true).await
}

async fn proxy_logout(
    state: &SharedState,
    ctx: &Ctx,
    parts: &Parts,
    all: bool,
) -> ApiResult<Response> {
    let token = token(&parts.headers, parts.uri.query())?;
    // Who the token belongs to, before it stops working (for /logout/all).
    let user = if all {
        Some(ctx.authenticate(state, parts, true).await?)
    } else {
        None
    };
    let path = if all {
        "/_matrix/client/v3/logout/all"
    } else {
        "/_matrix/client/v3/logout"
    };
    let response = state
        .auth
        .homeserver(&ctx.config, &ctx.hs, outbound::Method::POST, path, |r| {
            r.bearer_auth(&token)
                .header(header::CONTENT_TYPE, "application/json")
                .body("{}")
        })
        .await
        .map_err(|e| homeserver_unreachable(&ctx.hs.name, &e))?;
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = response
        .bytes()
        .await
        .map_err(|e| homeserver_unreachable(&ctx.hs.name, &e))?;
    if status.is_success() || status == StatusCode::UNAUTHORIZED {
        // Gone at the homeserver (or never valid): gone here, and on every other instance.
        let mut messages = vec![crate::auth::logout_message(&token, None)];
        if let Some(user) = &user {
            messages.push(crate::auth::logout_message(
                &token,
                Some((&ctx.hs.name, &user.user_id)),
            ));
        }
        for message in messages {
            state.auth.forget(&message);
            if let Err(e) = state.media.store().announce_logout(&message).await {
                tracing::warn!(error = %e, "logout not announced to other instances");
            }
        }
    }
    Ok((
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response())
}

fn homeserver_unreachable(hs: &str, e: &outbound::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "M_UNKNOWN",
        format!("Cannot reach the homeserver {hs}: {e}"),
    )
}

/// `GET /_matrix/client/versions`: the homeserver's answer, with authenticated media announced.
pub(crate) async fn versions(
    State(state): State<SharedState>,
    ctx: Ctx,
) -> ApiResult<Json<serde_json::Value>> {
    let response = state
        .auth
        .homeserver(
            &ctx.config,
            &ctx.hs,
            outbound::Method::GET,
            "/_matrix/client/versions",
            |r| r,
        )
        .await
        .map_err(|e| homeserver_unreachable(&ctx.hs.name, &e))?;
    let mut body = response
        .json()
        .await
        .map_err(|e| homeserver_unreachable(&ctx.hs.name, &e))?;
    if let Some(versions) = body.get_mut("versions").and_then(|v| v.as_array_mut())
        && !versions.iter().any(|v| v == AUTHENTICATED_MEDIA_VERSION)
    {
        versions.push(AUTHENTICATED_MEDIA_VERSION.into());
    }
    Ok(Json(body))
}
