//! Our media for other servers: `GET /_matrix/federation/v1/media/download/{mediaId}`, answered
//! as `multipart/mixed` in exactly the form Synapse's parser reads (`federation::multipart`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use federation::multipart::Envelope;
use futures_util::StreamExt as _;

use crate::auth::query_param;
use crate::error::{ApiError, ApiResult};
use crate::peer::Peer;
use crate::{SharedState, headers};

/// `GET /_matrix/federation/v1/media/download/{mediaId}`: the media id is scoped to the
/// destination (MSC3916: never remote media from here).
pub(crate) async fn download(
    State(state): State<SharedState>,
    Path(media_id): Path<String>,
    peer: Peer,
    parts: Parts,
) -> ApiResult<Response> {
    let Peer { ctx, origin } = peer;
    let wait = media::Wait::from_millis(
        query_param(parts.uri.query(), "timeout_ms").and_then(|t| t.parse::<u64>().ok()),
    );
    let media = state
        .media
        .media(
            &ctx.config,
            &ctx.hs.name,
            &media_id,
            wait,
            media::Fetch::CachedOnly,
        )
        .await?;
    let Some(object) = media.object.clone() else {
        return Err(ApiError::not_found("Not found"));
    };
    tracing::debug!(%origin, mxc = %media.mxc(), "federation download");
    let internal = |e: &dyn std::fmt::Display| ApiError::internal(e.to_string());
    // S3 with `publicBaseUrl`: the requester fetches the bytes from there (MSC3916's Location).
    let redirect = state
        .media
        .store()
        .datastores()
        .get(&object.datastore_id)
        .and_then(|ds| ds.redirect_url(&object.location));
    let disposition =
        headers::content_disposition(&media.content_type, media.upload_name.as_deref());
    let (envelope, file_len) = match redirect {
        Some(url) => (Envelope::redirect(&url).map_err(|e| internal(&e))?, 0),
        None => {
            let envelope = Envelope::file(&media.content_type, Some(&disposition))
                .or_else(|_| Envelope::file("application/octet-stream", Some("attachment")))
                .map_err(|e| internal(&e))?;
            (envelope, object.size)
        }
    };
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, envelope.content_type())
        .header(header::CONTENT_LENGTH, envelope.content_length(file_len))
        // Dendrite reads the file name here, Synapse in part 2.
        .header(
            header::CONTENT_DISPOSITION,
            axum::http::HeaderValue::from_str(&disposition)
                .unwrap_or(axum::http::HeaderValue::from_static("attachment")),
        );
    // The preamble is one piece of the body: Synapse's parser breaks when it arrives split.
    let (head_bytes, tail_bytes) = (envelope.head(), envelope.tail());
    let head = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(head_bytes) });
    let tail = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(tail_bytes) });
    let body = if file_len == 0 {
        Body::from_stream(head.chain(tail))
    } else {
        let reader = state.media.store().read(&object, 0, Some(file_len)).await?;
        state.metrics.bytes_out.inc_by(file_len);
        let file = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
        Body::from_stream(head.chain(file).chain(tail))
    };
    builder.body(body).map_err(|e| internal(&e))
}
