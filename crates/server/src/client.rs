//! Client endpoints the media repo answers for the homeserver: logout (to drop cached tokens) and
//! `/versions` (to announce authenticated media).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::auth::token;
use crate::error::{ApiError, ApiResult};
use crate::{Hs, SharedState};

/// The spec version that brought authenticated media.
const AUTHENTICATED_MEDIA_VERSION: &str = "v1.11";

/// `POST /_matrix/client/{r0,v3}/logout`
pub(crate) async fn logout(
    state: State<SharedState>,
    path: Path<String>,
    request: Request,
) -> ApiResult<Response> {
    proxy_logout(state, path, request, false).await
}

/// `POST /_matrix/client/{r0,v3}/logout/all`
pub(crate) async fn logout_all(
    state: State<SharedState>,
    path: Path<String>,
    request: Request,
) -> ApiResult<Response> {
    proxy_logout(state, path, request, true).await
}

async fn proxy_logout(
    State(state): State<SharedState>,
    Path(version): Path<String>,
    request: Request,
    all: bool,
) -> ApiResult<Response> {
    if !["r0", "v3"].contains(&version.as_str()) {
        return Err(ApiError::unrecognized());
    }
    let (mut parts, _) = request.into_parts();
    let Hs(hs) = <Hs as axum::extract::FromRequestParts<SharedState>>::from_request_parts(
        &mut parts, &state,
    )
    .await?;
    let config = state.config();
    let token = token(&parts.headers, parts.uri.query())?;
    // Who the token belongs to, before it stops working (for /logout/all).
    let user = if all {
        let ip = crate::client_ip(&config, &parts);
        Some(
            state
                .auth
                .authenticate(
                    &config,
                    &hs,
                    &parts.headers,
                    parts.uri.query(),
                    &ip,
                    true,
                    &state.metrics,
                )
                .await?,
        )
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
        .homeserver_request(&config, &hs, reqwest::Method::POST, path)
        .bearer_auth(&token)
        .header(header::CONTENT_TYPE, "application/json")
        .body("{}")
        .send()
        .await
        .map_err(|e| homeserver_unreachable(&hs.name, &e))?;
    let status =
        StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let body = response
        .bytes()
        .await
        .map_err(|e| homeserver_unreachable(&hs.name, &e))?;
    if status.is_success() || status == StatusCode::UNAUTHORIZED {
        // Gone at the homeserver (or never valid): gone here too.
        state.auth.forget_token(&token);
        if let Some(user) = user {
            state.auth.forget_user(&hs.name, &user.user_id);
        }
    }
    Ok((
        status,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(body),
    )
        .into_response())
}

fn homeserver_unreachable(hs: &str, e: &reqwest::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "M_UNKNOWN",
        format!("Cannot reach the homeserver {hs}: {e}"),
    )
}

/// `GET /_matrix/client/versions`: the homeserver's answer, with authenticated media announced.
pub(crate) async fn versions(
    State(state): State<SharedState>,
    Hs(hs): Hs,
) -> ApiResult<Json<serde_json::Value>> {
    let config = state.config();
    let response = state
        .auth
        .homeserver_request(
            &config,
            &hs,
            reqwest::Method::GET,
            "/_matrix/client/versions",
        )
        .send()
        .await
        .map_err(|e| homeserver_unreachable(&hs.name, &e))?;
    let mut body: serde_json::Value = response
        .json()
        .await
        .map_err(|e| homeserver_unreachable(&hs.name, &e))?;
    if let Some(versions) = body.get_mut("versions").and_then(|v| v.as_array_mut())
        && !versions.iter().any(|v| v == AUTHENTICATED_MEDIA_VERSION)
    {
        versions.push(AUTHENTICATED_MEDIA_VERSION.into());
    }
    Ok(Json(body))
}
