//! Every error a client sees is the spec's `{"errcode", "error"}` JSON, mapped here and only here.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub errcode: &'static str,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            errcode,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", message)
    }

    pub fn unrecognized() -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "M_UNRECOGNIZED",
            "Unrecognized request",
        )
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", message)
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", message)
    }

    pub fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> ApiError {
        ApiError {
            retry_after_secs: Some(retry_after_secs),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", message)
        }
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "errcode": self.errcode, "error": self.message });
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> ApiError {
        use store::Error as E;
        match e {
            E::TooLarge { max } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!("Cannot upload files larger than {max} bytes"),
            ),
            E::TooSmall { min } => {
                ApiError::bad_request(format!("Cannot upload files smaller than {min} bytes"))
            }
            E::Aborted(why) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                format!("The upload was interrupted: {why}"),
            ),
            E::MediaIdTaken | E::CannotOverwrite => ApiError::new(
                StatusCode::CONFLICT,
                "M_CANNOT_OVERWRITE_MEDIA",
                "This media id already has content",
            ),
            E::ContentQuarantined => ApiError::forbidden(
                "This content has been quarantined by an administrator and cannot be uploaded",
            ),
            E::PendingNotFound => ApiError::not_found("This media id was not created with /create"),
            E::PendingExpired => ApiError::not_found("This media id has expired"),
            E::PendingOtherUser => ApiError::forbidden("This media id was created by another user"),
            E::TooManyPending(n) => ApiError {
                retry_after_secs: Some(60),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "M_LIMIT_EXCEEDED",
                    format!(
                        "Too many pending uploads (at most {n}); finish or let some expire first"
                    ),
                )
            },
            E::Backend(b) if b.transient => {
                tracing::error!(error = %b, "datastore unavailable");
                ApiError::unavailable(
                    format!(
                        "The media repository's datastore `{}` is unavailable; try again shortly",
                        b.datastore
                    ),
                    5,
                )
            }
            E::Backend(b) => {
                tracing::error!(error = %b, "datastore refused the request");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    format!(
                        "The media repository's datastore `{}` refused the request; its log has the details",
                        b.datastore
                    ),
                )
            }
            e if e.is_storage_full() => {
                tracing::error!(error = %e, "datastore full");
                ApiError {
                    retry_after_secs: Some(60),
                    ..ApiError::new(
                        StatusCode::INSUFFICIENT_STORAGE,
                        "M_UNKNOWN",
                        "The media repository's storage is full; try again later",
                    )
                }
            }
            E::HashMismatch { .. } => ApiError::bad_request(e.to_string()),
            E::QuotaFiles(n) => {
                ApiError::forbidden(format!("You have reached your quota of {n} files"))
            }
            E::QuotaBytes(n) => {
                ApiError::forbidden(format!("This upload would exceed your quota of {n} bytes"))
            }
            e if e.is_invalid_input() => ApiError::bad_request(
                "The request holds text that cannot be stored (such as a NUL character)",
            ),
            e if e.is_unavailable() => {
                tracing::error!(error = %e, "database unavailable");
                ApiError::unavailable(
                    "The media repository's database is unavailable; try again shortly",
                    5,
                )
            }
            e => {
                tracing::error!(error = %e, "request failed");
                ApiError::internal("Internal error; the media repository's log has the details")
            }
        }
    }
}

impl From<media::Error> for ApiError {
    fn from(e: media::Error) -> ApiError {
        use media::Error as E;
        match e {
            E::InvalidParam(why) => ApiError::bad_request(why),
            E::Store(e) => e.into(),
            E::NotFound(what) => ApiError::not_found(what),
            E::Quarantined => ApiError::not_found("This media has been quarantined"),
            E::Expired => {
                ApiError::not_found("This media id expired before any content was uploaded")
            }
            E::BodyStalled(secs) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "M_UNKNOWN",
                format!("The upload was interrupted: no data received for {secs} s"),
            ),
            E::Remote(why) => {
                tracing::info!(reason = %why, "remote media not fetched");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "M_UNKNOWN",
                    format!("Failed to fetch remote media: {why}"),
                )
            }
            E::RemoteTooLarge(max) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "M_TOO_LARGE",
                format!("Remote media is larger than this server serves ({max} bytes)"),
            ),
            E::NotYetUploaded => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "M_NOT_YET_UPLOADED",
                "Content has not yet been uploaded",
            ),
            E::Thumbnail(e) => {
                use thumbnail::Error as T;
                let status = match e {
                    T::TooManyPixels { .. } | T::TooManyFrames { .. } => {
                        StatusCode::PAYLOAD_TOO_LARGE
                    }
                    T::Unsupported | T::Corrupt(_) => StatusCode::BAD_REQUEST,
                    T::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    T::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                };
                let errcode = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    "M_TOO_LARGE"
                } else {
                    "M_UNKNOWN"
                };
                ApiError::new(status, errcode, format!("Cannot generate a thumbnail: {e}"))
            }
            E::CannotThumbnail(why) => ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", why),
            E::ThumbnailSourceTooLarge(max) => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "M_TOO_LARGE",
                format!(
                    "Cannot generate a thumbnail: the media is larger than thumbnails.maxSourceBytes ({max} bytes)"
                ),
            ),
            E::Unavailable(why) => ApiError::unavailable(why, 5),
            E::Internal(why) => {
                tracing::error!(error = %why, "internal error");
                ApiError::internal("Internal error; the media repository's log has the details")
            }
            E::PreviewsDisabled => ApiError::new(
                StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                "URL previews are not enabled on this server",
            ),
            E::PreviewDenied(why) => {
                tracing::info!(reason = %why, "URL preview refused");
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "M_FORBIDDEN",
                    format!("This URL cannot be previewed: {why}"),
                )
            }
            E::PreviewFailed(why) => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "M_UNKNOWN",
                format!("The URL could not be previewed: {why}"),
            ),
        }
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;
