//! Requests from other servers: `Authorization: X-Matrix ...` verified against the origin's
//! published keys (`federation::keyring`).

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use federation::keyring::{KeyError, SignedRequest};

use crate::SharedState;
use crate::error::ApiError;
use crate::extract::Ctx;

/// A request another server signed: `origin` is that server, `ctx.hs` ours it was for (the one
/// the request's `Host` names, which its `destination` must be too).
pub(crate) struct Peer {
    pub(crate) ctx: Ctx,
    pub(crate) origin: String,
}

/// The most X-Matrix headers one request may carry.
const MAX_HEADERS: usize = 4;

fn unauthorized(reason: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "M_UNAUTHORIZED", reason)
}

impl FromRequestParts<SharedState> for Peer {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let ctx = Ctx::from_request_parts(parts, state).await?;
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
        // MMR's rule: one origin and one destination for all of them, and only a few (each may
        // cost a key fetch).
        if values.len() > MAX_HEADERS {
            return Err(unauthorized(format!(
                "At most {MAX_HEADERS} X-Matrix headers are accepted"
            )));
        }
        // The signature covers the request target exactly as the origin sent it.
        let uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path(), |p| p.as_str());
        let headers = values
            .iter()
            .map(|v| {
                federation::xmatrix::parse(v)
                    .map_err(|e| unauthorized(format!("Malformed X-Matrix header: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let origin = headers[0].origin.clone();
        if headers
            .iter()
            .any(|x| x.origin != origin || x.destination != headers[0].destination)
        {
            return Err(unauthorized(
                "All X-Matrix headers must name the same origin and destination",
            ));
        }
        if let Some(destination) = headers[0].destination.as_deref()
            && destination != ctx.hs.name
        {
            return Err(unauthorized(format!(
                "Destination mismatch: {destination} is not {} (this request's server)",
                ctx.hs.name
            )));
        }
        if ctx.config.federation.is_ignored(&origin) {
            return Err(ApiError::forbidden(format!(
                "{origin} is not allowed to federate with this media repository"
            )));
        }
        let mut refusal = None;
        for x in &headers {
            let request = SignedRequest {
                method: parts.method.as_str(),
                uri,
                origin: &origin,
                destination: &ctx.hs.name,
                key_id: &x.key,
                sig: &x.sig,
            };
            match state.keyring.verify(&request).await {
                Ok(()) => {
                    state.media.server_is_up(&origin);
                    return Ok(Peer { ctx, origin });
                }
                Err(e) => {
                    tracing::info!(%origin, key = %x.key, error = %e, "refused a federation request");
                    refusal.get_or_insert(e);
                }
            }
        }
        // What failed in fetching keys stays in the log: the answer would tell anyone who can
        // name an origin how that address answers.
        Err(unauthorized(match refusal {
            Some(KeyError::Fetch { server, .. } | KeyError::BadAnswer { server, .. }) => {
                format!("The keys of {server} could not be fetched or were not valid")
            }
            Some(e) => e.to_string(),
            None => "No valid X-Matrix signature".to_owned(),
        }))
    }
}
