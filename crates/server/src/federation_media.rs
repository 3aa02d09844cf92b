//! Our media for other servers: `GET /_matrix/federation/v1/media/{download,thumbnail}/{mediaId}`,
//! answered as `multipart/mixed` in exactly the form Synapse's parser reads
//! (`federation::multipart`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use federation::multipart::Envelope;
use futures_util::StreamExt as _;

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
    let wait = crate::client_media::wait_param(parts.uri.query());
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
    state.media.accessed(&media.origin, &media.media_id);
    state.metrics.observe_media_age(media.created_ts);
    let disposition =
        headers::content_disposition(&media.content_type, media.upload_name.as_deref());
    multipart(
        &state,
        &media.content_type,
        &disposition,
        Part::Object(&object),
    )
    .await
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`: our media's thumbnail, in the same
/// envelope (Complement's `TestFederationThumbnail` compares it with the client endpoint's).
pub(crate) async fn thumbnail(
    State(state): State<SharedState>,
    Path(media_id): Path<String>,
    peer: Peer,
    parts: Parts,
) -> ApiResult<Response> {
    let Peer { ctx, origin } = peer;
    let query = parts.uri.query();
    // Signed by a server: the authenticated family.
    let params = crate::thumbnails::params(query, true)?;
    let (media, thumb) = state
        .media
        .thumbnail(
            &ctx.config,
            &ctx.hs.name,
            &media_id,
            params,
            crate::client_media::wait_param(query),
            media::Fetch::CachedOnly,
        )
        .await?;
    tracing::debug!(%origin, mxc = %media.mxc(), "federation thumbnail");
    match &thumb {
        media::Thumb::Original(media) => {
            let object = media
                .object
                .as_ref()
                .ok_or_else(|| ApiError::not_found("Not found"))?;
            let disposition =
                headers::content_disposition(&media.content_type, media.upload_name.as_deref());
            multipart(
                &state,
                &media.content_type,
                &disposition,
                Part::Object(object),
            )
            .await
        }
        media::Thumb::Stored(stored) => {
            let disposition = headers::content_disposition(&stored.content_type, None);
            multipart(
                &state,
                &stored.content_type,
                &disposition,
                Part::Object(&stored.object),
            )
            .await
        }
        media::Thumb::Made {
            content_type,
            bytes,
            ..
        } => {
            let disposition = headers::content_disposition(content_type, None);
            multipart(
                &state,
                content_type,
                &disposition,
                Part::Bytes(bytes.clone()),
            )
            .await
        }
    }
}

/// The file of a federation answer: stored content, or a thumbnail just made.
enum Part<'a> {
    Object(&'a store::ObjectRef),
    Bytes(Bytes),
}

/// The `multipart/mixed` answer for a file of `content_type` (a `Location` part for S3 with
/// `publicBaseUrl`: MSC3916's redirect form).
async fn multipart(
    state: &SharedState,
    content_type: &str,
    disposition: &str,
    part: Part<'_>,
) -> ApiResult<Response> {
    let internal = |e: &dyn std::fmt::Display| ApiError::internal(e.to_string());
    let redirect = match &part {
        Part::Object(object) => state
            .media
            .store()
            .datastores()
            .get(&object.datastore_id)
            .and_then(|ds| ds.redirect_url(&object.location)),
        Part::Bytes(_) => None,
    };
    let (envelope, file_len) = match (&redirect, &part) {
        (Some(url), _) => (Envelope::redirect(url).map_err(|e| internal(&e))?, 0),
        (None, part) => {
            let envelope = Envelope::file(content_type, Some(disposition))
                .or_else(|_| Envelope::file("application/octet-stream", Some("attachment")))
                .map_err(|e| internal(&e))?;
            let len = match part {
                Part::Object(object) => object.size,
                Part::Bytes(b) => b.len() as u64,
            };
            (envelope, len)
        }
    };
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, envelope.content_type())
        .header(header::CONTENT_LENGTH, envelope.content_length(file_len))
        // Dendrite reads the file name here, Synapse in part 2.
        .header(
            header::CONTENT_DISPOSITION,
            axum::http::HeaderValue::from_str(disposition)
                .unwrap_or(axum::http::HeaderValue::from_static("attachment")),
        );
    // The preamble is one piece of the body: Synapse's parser breaks when it arrives split.
    let (head_bytes, tail_bytes) = (envelope.head(), envelope.tail());
    let head = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(head_bytes) });
    let tail = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(tail_bytes) });
    state.metrics.bytes_out.inc_by(file_len);
    let body = match (file_len, part) {
        (0, _) => Body::from_stream(head.chain(tail)),
        (_, Part::Bytes(bytes)) => {
            let file =
                futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(bytes) });
            Body::from_stream(head.chain(file).chain(tail))
        }
        (_, Part::Object(object)) => {
            let reader = state.media.store().read(object, 0, Some(file_len)).await?;
            let file = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
            Body::from_stream(head.chain(file).chain(tail))
        }
    };
    builder.body(body).map_err(|e| internal(&e))
}
