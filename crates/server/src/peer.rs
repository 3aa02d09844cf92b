//! Requests from other servers: `Authorization: X-Matrix ...` verified against the origin's
//! published keys (`federation::keyring`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use config::Homeserver;
use federation::keyring::SignedRequest;

use crate::SharedState;
use crate::error::ApiError;
use crate::extract::Ctx;

/// A request another server signed: `origin` is that server, `hs` ours it was for.
pub(crate) struct Peer {
    pub(crate) ctx: Ctx,
    pub(crate) origin: String,
}

fn unauthorized(reason: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", reason)
}

impl FromRequestParts<SharedState> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let mut ctx = Ctx::from_request_parts(parts, state).await?;
        let values: Vec<&str> = parts
            .headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter(|v| {
                v.get(..8)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("X-Matrix"))
            })
            .collect();
        if values.is_empty() {
            return Err(unauthorized("Missing Authorization headers (X-Matrix)"));
        }
        // The signature covers the request target exactly as the origin sent it.
        let uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        let mut refusal = None;
        for value in values {
            match verify(state, &ctx, parts.method.as_str(), uri, value).await {
                Ok((origin, hs)) => {
                    state.media.server_is_up(&origin);
                    ctx.hs = hs;
                    return Ok(Peer { ctx, origin });
                }
                Err(e) => {
                    refusal.get_or_insert(e);
                }
            }
        }
        Err(refusal.unwrap_or_else(|| unauthorized("No valid X-Matrix signature")))
    }
}

/// Checks one header: its destination is one of our homeservers (port included; absent means
/// the one the request was addressed to), its origin a server name we talk to, its signature the
/// origin's. Returns the origin and our homeserver.
async fn verify(
    state: &SharedState,
    ctx: &Ctx,
    method: &str,
    uri: &str,
    value: &str,
) -> Result<(String, Homeserver), ApiError> {
    let x = federation::xmatrix::parse(value)
        .map_err(|e| unauthorized(format!("Malformed X-Matrix header: {e}")))?;
    let hs = match x.destination.as_deref() {
        None => ctx.hs.clone(),
        Some(destination) => ctx.config.homeserver(destination).cloned().ok_or_else(|| {
            unauthorized(format!(
                "Destination mismatch: {destination} is not a server this media repository serves"
            ))
        })?,
    };
    if !store::ids::is_valid_server_name(&x.origin) {
        return Err(unauthorized(format!(
            "`{}` is not a valid server name",
            x.origin
        )));
    }
    if ctx
        .config
        .federation
        .ignored_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(&x.origin))
    {
        return Err(ApiError::forbidden(format!(
            "{} is not allowed to federate with this media repository",
            x.origin
        )));
    }
    let request = SignedRequest {
        method,
        uri,
        origin: &x.origin,
        destination: &hs.name,
        key_id: &x.key,
        sig: &x.sig,
    };
    state.keyring.verify(&request).await.map_err(|e| {
        tracing::info!(origin = %x.origin, key = %x.key, error = %e, "refused a federation request");
        unauthorized(e.to_string())
    })?;
    Ok((x.origin, hs))
}
