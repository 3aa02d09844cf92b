//! Uploads: the limits and quotas that decide whether one may happen, checked from what the client
//! declared before a byte is read, enforced again while the body streams, and the quota once more
//! when the store records it (under the user's lock); asynchronous uploads' reservations.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use config::{Config, MediaKind};
use futures_util::Stream;
use store::{Limits, NewMedia, Quota, Target, Uploaded};

use crate::body::with_idle_timeout;
use crate::quota::quota_for;
use crate::{Error, Service};

/// The most a file name may take, in bytes (as Linux's NAME_MAX).
const MAX_FILE_NAME_BYTES: usize = 255;

/// A local user's upload to one of our homeservers.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The homeserver the media is for (the mxc URI's server name).
    pub origin: String,
    pub user_id: String,
    pub content_type: String,
    pub file_name: Option<String>,
    /// The size the client announced (`Content-Length`), if any.
    pub declared_len: Option<u64>,
}

/// A reserved media id (MSC2246 `/create`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub media_id: String,
    /// Epoch milliseconds after which the reservation is void.
    pub expires_ts: i64,
}

impl Service {
    /// Checks `upload` against the limits and quotas, then streams `body` into the store as
    /// `target`; a body that pauses for `connections.bodyTimeoutSeconds` fails.
    pub async fn upload<S, E>(
        &self,
        config: &Config,
        upload: Upload,
        target: Target,
        body: S,
    ) -> Result<Uploaded, Error>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        if let Some(name) = &upload.file_name {
            check_file_name(name)?;
        }
        let limits = self.limits(config, &upload).await?;
        let timeout =
            Duration::from_secs(u64::from(config.connections.body_timeout_seconds.max(1)));
        let stalled = Arc::new(AtomicBool::new(false));
        let body = with_idle_timeout(body, timeout, stalled.clone());
        let new = NewMedia {
            origin: upload.origin,
            kind: MediaKind::LocalMedia,
            content_type: upload.content_type,
            upload_name: upload.file_name,
            user_id: upload.user_id,
            requires_auth: config.repo.freeze_unauthenticated_media,
            quarantined: false,
            created_ts: None,
        };
        self.store
            .upload(new, target, body, limits.store)
            .await
            .map_err(|e| match (e, limits.quota_bytes) {
                (store::Error::Aborted(_), _) if stalled.load(Ordering::Relaxed) => {
                    Error::BodyStalled(timeout.as_secs())
                }
                // The quota, not `uploads.maxBytes`, cut the stream.
                (store::Error::TooLarge { .. }, Some(q)) => store::Error::QuotaBytes(q).into(),
                (e, _) => Error::Store(e),
            })
    }

    /// The limits for this upload, refusing it already when what the client declared cannot fit.
    async fn limits(&self, config: &Config, upload: &Upload) -> Result<UploadLimits, Error> {
        let max = config.uploads.max_bytes;
        if let Some(len) = upload.declared_len
            && max > 0
            && len > max
        {
            return Err(store::Error::TooLarge { max }.into());
        }
        let mut limits = UploadLimits {
            store: Limits {
                max_bytes: max,
                min_bytes: config.uploads.min_bytes,
                quota: None,
                expected_sha256: None,
                read_soon: false,
            },
            quota_bytes: None,
        };
        let Some(quota) = quota_for(config, &upload.user_id) else {
            return Ok(limits);
        };
        let usage = self.store.usage(&upload.user_id).await?;
        if quota.max_files > 0 && usage.files >= quota.max_files {
            return Err(store::Error::QuotaFiles(quota.max_files).into());
        }
        if quota.max_bytes > 0 {
            let left = quota.max_bytes.saturating_sub(usage.bytes);
            if upload.declared_len.unwrap_or(0) > left || left == 0 {
                return Err(store::Error::QuotaBytes(quota.max_bytes).into());
            }
            if max == 0 || left < max {
                limits.store.max_bytes = left;
                limits.quota_bytes = Some(quota.max_bytes);
            }
        }
        limits.store.quota = Some(Quota {
            max_files: quota.max_files,
            max_bytes: quota.max_bytes,
        });
        Ok(limits)
    }

    /// Reserves a media id on `origin` for `user_id` to upload into later, within
    /// `uploads.maxPending` (or the user's quota's `maxPending`).
    pub async fn create(
        &self,
        config: &Config,
        origin: &str,
        user_id: &str,
    ) -> Result<Created, Error> {
        let max_pending = quota_for(config, user_id)
            .map(|q| q.max_pending)
            .filter(|n| *n > 0)
            .unwrap_or(config.uploads.max_pending);
        let max_age_ms = i64::try_from(config.uploads.max_age_seconds.max(1))
            .unwrap_or(86_400)
            .saturating_mul(1000);
        let expires_ts = store::now_ms().saturating_add(max_age_ms);
        let media_id = self
            .store
            .create_pending(
                origin,
                user_id,
                expires_ts,
                config.repo.freeze_unauthenticated_media,
                max_pending,
            )
            .await?;
        Ok(Created {
            media_id,
            expires_ts,
        })
    }

    /// Whether `user_id` may upload into the reserved `origin`/`media_id` now, decided before the
    /// body is read.
    pub async fn check_pending(
        &self,
        config: &Config,
        origin: &str,
        media_id: &str,
        user_id: &str,
    ) -> Result<(), Error> {
        if config.homeserver(origin).is_none() || !store::ids::is_valid_media_id(media_id) {
            return Err(store::Error::PendingNotFound.into());
        }
        Ok(self.store.check_pending(origin, media_id, user_id).await?)
    }
}

struct UploadLimits {
    store: Limits,
    /// Set when the quota, not `uploads.maxBytes`, is the streaming limit.
    quota_bytes: Option<u64>,
}

fn check_file_name(name: &str) -> Result<(), Error> {
    if name.contains('\0') {
        return Err(Error::InvalidParam(
            "`filename` must not contain a NUL character (%00)".into(),
        ));
    }
    if name.len() > MAX_FILE_NAME_BYTES {
        return Err(Error::InvalidParam(format!(
            "`filename` is longer than {MAX_FILE_NAME_BYTES} bytes"
        )));
    }
    Ok(())
}
