//! The S3 datastore: objects in a bucket of AWS S3 or of an S3-compatible service (DigitalOcean
//! Spaces, MinIO, Garage, Backblaze B2, Scaleway, ...), keyed by their SHA-256.
//!
//! - Uploads come from the pipeline's temp file (in `tempPath`, never memory): one `PutObject` for
//!   small objects, a multipart upload with parts streamed from the file (a few parts in flight, so
//!   memory stays bounded whatever the size) above [`MULTIPART_THRESHOLD`] when `multipartUploads`.
//!   A failed multipart upload is aborted: nothing is left half-written.
//! - Downloads are `GetObject` with the requested `Range`, streamed.
//! - Failures of the service (unreachable, timeouts, 5xx, throttling) are transient
//!   ([`BackendError::transient`]): the server answers 503 and the next request tries again.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
    StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, StorageClass};
use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::Error;
use crate::datastore::{BackendError, Reader};

/// S3 requests this process made, by matrix-media-repo's operation names (its metric
/// `media_s3_operations_total`): an upload is one `PutObject` however many parts it took.
pub fn operation_counts() -> Vec<(&'static str, u64)> {
    OPERATION_NAMES
        .iter()
        .zip(&OPERATIONS)
        .map(|(name, n)| (*name, n.load(Ordering::Relaxed)))
        .collect()
}

const OPERATION_NAMES: [&str; 4] = ["PutObject", "GetObject", "StatObject", "RemoveObject"];
static OPERATIONS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

fn count(name: &str) {
    if let Some(i) = OPERATION_NAMES.iter().position(|n| *n == name) {
        OPERATIONS[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Objects larger than this go up as multipart uploads (when `multipartUploads`), as minio-go (what
/// matrix-media-repo uses) does.
pub(crate) const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
/// The smallest part; parts grow for huge objects so that there are at most [`MAX_PARTS`].
const MIN_PART_SIZE: u64 = 16 * 1024 * 1024;
/// S3 allows 10,000 parts; a margin leaves room for rounding.
const MAX_PARTS: u64 = 9_000;
/// Parts uploading at once: each streams from the temp file, so this bounds connections, not memory.
const PARTS_IN_FLIGHT: usize = 2;
/// How much of the temp file each body reads at a time.
const READ_BUFFER: usize = 64 * 1024;
/// Keys listed per `ListObjectsV2` page (S3's maximum).
const LIST_PAGE: i32 = 1000;
/// The region when none is configured: what S3-compatible services expect from clients that have
/// no region, and AWS's default.
const DEFAULT_REGION: &str = "us-east-1";
/// The content type every object gets: the media row keeps the real one (objects are shared by
/// media of different types).
const OBJECT_CONTENT_TYPE: &str = "application/octet-stream";

/// Where and how to reach the service, derived from `endpoint`, `ssl` and `region`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// `None` for AWS itself: the SDK resolves the regional endpoint.
    url: Option<String>,
    region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which every S3-compatible service accepts;
    /// AWS gets virtual-hosted style.
    path_style: bool,
}

impl Endpoint {
    fn from_opts(endpoint: &str, ssl: bool, region: Option<&str>) -> Endpoint {
        let endpoint = endpoint.trim().trim_end_matches('/');
        let (scheme, host) = match endpoint.split_once("://") {
            Some((scheme, host)) => (scheme.to_ascii_lowercase(), host),
            None => (if ssl { "https" } else { "http" }.to_owned(), endpoint),
        };
        let hostname = host
            .split(['/', ':'])
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let region = region.map(str::trim).filter(|r| !r.is_empty());
        let aws = hostname == "amazonaws.com" || hostname.ends_with(".amazonaws.com");
        if aws && scheme == "https" && !host.contains('/') {
            // `s3.amazonaws.com`, `s3.eu-central-1.amazonaws.com`, `s3-eu-west-1.amazonaws.com`,
            // `s3.dualstack.eu-west-1.amazonaws.com`: the region is in the name when not given.
            let from_host = hostname
                .trim_end_matches(".amazonaws.com")
                .split('.')
                .map(|label| label.strip_prefix("s3-").unwrap_or(label))
                .find(|label| label.contains('-'))
                .map(ToOwned::to_owned);
            return Endpoint {
                url: None,
                region: region
                    .map(ToOwned::to_owned)
                    .or(from_host)
                    .unwrap_or_else(|| DEFAULT_REGION.to_owned()),
                path_style: false,
            };
        }
        // `s3.<region>.<provider>` (Scaleway, Backblaze B2, Wasabi, ...): services that check the
        // signing region name it there.
        let labels: Vec<&str> = hostname.split('.').collect();
        let from_host = match labels.as_slice() {
            ["s3", region, _, ..] if region.contains('-') => Some(*region),
            _ => None,
        };
        Endpoint {
            url: Some(format!("{scheme}://{host}")),
            region: region.or(from_host).unwrap_or(DEFAULT_REGION).to_owned(),
            path_style: true,
        }
    }
}

/// The key of the object with this hash: the hash, split after `prefix_length` characters when
/// that is set (`ab/cdef...`), which spreads keys over prefixes for services that partition by them.
pub(crate) fn key_for(sha256: &str, prefix_length: usize) -> String {
    if prefix_length == 0 || prefix_length >= sha256.len() {
        sha256.to_owned()
    } else {
        format!("{}/{}", &sha256[..prefix_length], &sha256[prefix_length..])
    }
}

pub(crate) struct S3Store {
    datastore: String,
    client: Client,
    bucket: String,
    endpoint: Endpoint,
    prefix_length: usize,
    storage_class: Option<StorageClass>,
    multipart: bool,
    public_base_url: Option<String>,
    pub(crate) tmp: PathBuf,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the credentials.
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("prefix_length", &self.prefix_length)
            .field("multipart", &self.multipart)
            .field("tmp", &self.tmp)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds the client; nothing is sent yet, so a store whose service is down still opens (and
    /// its requests fail with 503 until it is back).
    pub(crate) fn new(datastore: &str, opts: &config::S3Opts) -> Result<S3Store, Error> {
        let config_error =
            |what: String| Error::Config(format!("S3 datastore `{datastore}`: {what}"));
        if opts.bucket_name.trim().is_empty() {
            return Err(config_error("bucketName is empty".to_owned()));
        }
        if opts.endpoint.trim().is_empty() {
            return Err(config_error("endpoint is empty".to_owned()));
        }
        let prefix_length = usize::try_from(opts.prefix_length)
            .ok()
            .filter(|n| *n < 64)
            .ok_or_else(|| {
                config_error(format!(
                    "prefixLength {} must be below 64 (the length of a SHA-256)",
                    opts.prefix_length
                ))
            })?;
        let tmp = if opts.temp_path.trim().is_empty() {
            std::env::temp_dir()
        } else {
            PathBuf::from(&opts.temp_path)
        };
        crate::datastore::create_dirs(&tmp)
            .map_err(|e| config_error(format!("cannot create tempPath {}: {e}", tmp.display())))?;

        let endpoint = Endpoint::from_opts(&opts.endpoint, opts.ssl, opts.region.as_deref());
        let credentials = Credentials::new(
            opts.access_key_id.clone(),
            opts.access_secret.clone(),
            None,
            None,
            "media-repo.yaml",
        );
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60))
            // One attempt of a request up to its response headers (bodies stream on past it).
            .operation_attempt_timeout(Duration::from_secs(300))
            .build();
        let mut builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(endpoint.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(endpoint.path_style)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(3))
            .stalled_stream_protection(StalledStreamProtectionConfig::enabled().build())
            // Checksums only where S3 requires them: many S3-compatible services reject the
            // aws-chunked bodies that the SDK's default CRC32 checksums need.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(url) = &endpoint.url {
            builder = builder.endpoint_url(url);
        }
        let client = Client::from_conf(builder.build());
        let storage_class = opts
            .storage_class
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(StorageClass::from);
        let public_base_url = opts
            .public_base_url
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('/').to_owned());
        Ok(S3Store {
            datastore: datastore.to_owned(),
            client,
            bucket: opts.bucket_name.trim().to_owned(),
            endpoint,
            prefix_length,
            storage_class,
            multipart: opts.multipart_uploads,
            public_base_url,
            tmp,
        })
    }

    pub(crate) fn location(&self, sha256: &str) -> String {
        key_for(sha256, self.prefix_length)
    }

    /// `publicBaseUrl` + the key, when redirects are configured.
    pub(crate) fn redirect_url(&self, location: &str) -> Option<String> {
        self.public_base_url
            .as_ref()
            .map(|base| format!("{base}/{location}"))
    }

    fn error<E>(&self, operation: &'static str, e: SdkError<E, HttpResponse>) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        Error::Backend(backend_error(&self.datastore, operation, &e))
    }

    /// Uploads the temp file unless an object with this key is there already (the same key always
    /// holds the same bytes).
    pub(crate) async fn place(&self, temp: &Path, sha256: &str) -> Result<String, Error> {
        let key = self.location(sha256);
        if self.exists(&key).await? {
            return Ok(key);
        }
        let size = tokio::fs::metadata(temp).await?.len();
        count("PutObject");
        if self.multipart && size > MULTIPART_THRESHOLD {
            self.put_multipart(temp, &key, size).await?;
        } else {
            let body = file_body(temp, 0, size).await?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                .content_type(OBJECT_CONTENT_TYPE)
                .content_length(i64::try_from(size).unwrap_or(i64::MAX))
                .set_storage_class(self.storage_class.clone())
                .body(body)
                .send()
                .await
                .map_err(|e| self.error("PutObject", e))?;
        }
        tracing::debug!(datastore = %self.datastore, key, size, "object uploaded");
        Ok(key)
    }

    async fn put_multipart(&self, temp: &Path, key: &str, size: u64) -> Result<(), Error> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(OBJECT_CONTENT_TYPE)
            .set_storage_class(self.storage_class.clone())
            .send()
            .await
            .map_err(|e| self.error("CreateMultipartUpload", e))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let result = self.upload_parts(temp, key, size, &upload_id).await;
        if result.is_err() {
            // Nothing half-written: the parts uploaded so far are dropped (best effort; a bucket
            // lifecycle rule for incomplete multipart uploads catches what this misses).
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(datastore = %self.datastore, key, error = %crate::error_chain(&e),
                    "could not abort a failed multipart upload");
            }
        }
        result
    }

    async fn upload_parts(
        &self,
        temp: &Path,
        key: &str,
        size: u64,
        upload_id: &str,
    ) -> Result<(), Error> {
        let part_size = part_size(size);
        let parts = size.div_ceil(part_size);
        let mut completed: Vec<CompletedPart> = futures_util::stream::iter(0..parts)
            .map(|i| async move {
                let offset = i * part_size;
                let len = part_size.min(size - offset);
                let number = i32::try_from(i + 1).unwrap_or(i32::MAX);
                let body = file_body(temp, offset, len).await?;
                let part = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_length(i64::try_from(len).unwrap_or(i64::MAX))
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| self.error("UploadPart", e))?;
                Ok::<_, Error>(
                    CompletedPart::builder()
                        .set_e_tag(part.e_tag().map(ToOwned::to_owned))
                        .part_number(number)
                        .build(),
                )
            })
            .buffer_unordered(PARTS_IN_FLIGHT)
            .try_collect()
            .await?;
        completed.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(completed))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| self.error("CompleteMultipartUpload", e))?;
        tracing::debug!(datastore = %self.datastore, key, size, parts, "multipart upload complete");
        Ok(())
    }

    pub(crate) async fn exists(&self, key: &str) -> Result<bool, Error> {
        count("StatObject");
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(self.error("HeadObject", e)),
        }
    }

    /// Streams `len` bytes from `start` (the rest of the object when `None`), with `Range` passed
    /// to S3 so that only those bytes travel.
    pub(crate) async fn open(
        &self,
        key: &str,
        start: u64,
        len: Option<u64>,
    ) -> Result<Option<Reader>, Error> {
        if len == Some(0) {
            // An empty range cannot be asked for; the object must still be there.
            return Ok(self
                .exists(key)
                .await?
                .then(|| Box::pin(tokio::io::empty()) as Reader));
        }
        let range = match (start, len) {
            (0, None) => None,
            (start, None) => Some(format!("bytes={start}-")),
            (start, Some(len)) => Some(format!("bytes={start}-{}", start + len - 1)),
        };
        count("GetObject");
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .set_range(range)
            .send()
            .await
        {
            Ok(output) => Ok(Some(Box::pin(output.body.into_async_read()))),
            Err(e) if status(&e) == Some(404) && !is_code(&e, "NoSuchBucket") => Ok(None),
            Err(e) => Err(self.error("GetObject", e)),
        }
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<(), Error> {
        count("RemoveObject");
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.error("DeleteObject", e))?;
        Ok(())
    }

    /// One page of keys (all of them, whatever `prefixLength`: no delimiter) and the token for the
    /// next page, if any.
    pub(crate) async fn list_page(
        &self,
        token: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), Error> {
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .max_keys(LIST_PAGE)
            .set_continuation_token(token)
            .send()
            .await
            .map_err(|e| self.error("ListObjectsV2", e))?;
        let keys = page
            .contents()
            .iter()
            .filter_map(|o| o.key().map(ToOwned::to_owned))
            .collect();
        let next = page
            .is_truncated()
            .unwrap_or(false)
            .then(|| page.next_continuation_token().map(ToOwned::to_owned))
            .flatten();
        Ok((keys, next))
    }
}

/// Part size for an object of `size` bytes: at least [`MIN_PART_SIZE`], in whole MiB, and large
/// enough that there are at most [`MAX_PARTS`] parts.
fn part_size(size: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    MIN_PART_SIZE.max(size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB)
}

/// A body reading `len` bytes of the file from `offset`, re-readable for retries.
async fn file_body(path: &Path, offset: u64, len: u64) -> Result<ByteStream, Error> {
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        .buffer_size(READ_BUFFER)
        .build()
        .await
        .map_err(|e| Error::Io(std::io::Error::other(e)))
}

fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

fn is_code<E: ProvideErrorMetadata>(e: &SdkError<E, HttpResponse>, code: &str) -> bool {
    matches!(e, SdkError::ServiceError(se) if se.err().code() == Some(code))
}

/// Classifies a failed request: the service unreachable, slow or failing (5xx, throttling) is
/// transient; a refusal (credentials, bucket, permissions) is not, and says what S3 answered.
fn backend_error<E>(
    datastore: &str,
    operation: &'static str,
    e: &SdkError<E, HttpResponse>,
) -> BackendError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let code = match e {
        SdkError::ServiceError(se) => se.err().code(),
        _ => None,
    };
    let transient = match e {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(_) => {
            status(e).is_some_and(|s| s >= 500 || s == 429 || s == 408)
                || matches!(
                    code,
                    Some("SlowDown" | "RequestTimeout" | "InternalError" | "ServiceUnavailable")
                )
        }
        _ => false,
    };
    let message = match (status(e), code) {
        (Some(s), Some(code)) => {
            let detail = match e {
                SdkError::ServiceError(se) => se.err().message().unwrap_or(""),
                _ => "",
            };
            format!("S3 answered {s} {code}: {detail}")
        }
        (Some(s), None) => format!("S3 answered {s}: {}", crate::error_chain(e)),
        (None, _) => crate::error_chain(e),
    };
    BackendError {
        datastore: datastore.to_owned(),
        operation,
        message,
        transient,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_prefix_length() {
        let hash = "ab".repeat(32);
        assert_eq!(key_for(&hash, 0), hash);
        assert_eq!(key_for(&hash, 2), format!("ab/{}", &hash[2..]));
        assert_eq!(key_for(&hash, 3), format!("aba/{}", &hash[3..]));
        assert_eq!(key_for(&hash, 64), hash);
    }

    #[test]
    fn endpoints() {
        let e = |endpoint: &str, ssl: bool, region: Option<&str>| {
            Endpoint::from_opts(endpoint, ssl, region)
        };
        // DigitalOcean Spaces, as in the seed.
        assert_eq!(
            e("sfo2.digitaloceanspaces.com", true, None),
            Endpoint {
                url: Some("https://sfo2.digitaloceanspaces.com".to_owned()),
                region: "us-east-1".to_owned(),
                path_style: true
            }
        );
        // MinIO or Garage without TLS, Scaleway with its region.
        assert_eq!(
            e("127.0.0.1:9000", false, Some("garage")),
            Endpoint {
                url: Some("http://127.0.0.1:9000".to_owned()),
                region: "garage".to_owned(),
                path_style: true
            }
        );
        assert_eq!(
            e("https://s3.fr-par.scw.cloud/", false, Some("fr-par")).url,
            Some("https://s3.fr-par.scw.cloud".to_owned())
        );
        // Regions in the host name of other providers, when none is configured.
        assert_eq!(e("s3.fr-par.scw.cloud", true, None).region, "fr-par");
        assert_eq!(
            e("s3.us-west-002.backblazeb2.com", true, None).region,
            "us-west-002"
        );
        assert_eq!(
            e("s3.garage.localhost:3900", false, None).region,
            "us-east-1"
        );
        assert_eq!(e("minio:9000", false, None).region, "us-east-1");
        // AWS: the SDK's own endpoints, the region from the name when not given.
        assert_eq!(
            e("s3.eu-central-1.amazonaws.com", true, None),
            Endpoint {
                url: None,
                region: "eu-central-1".to_owned(),
                path_style: false
            }
        );
        assert_eq!(
            e("s3-eu-west-1.amazonaws.com", true, None).region,
            "eu-west-1"
        );
        assert_eq!(e("s3.amazonaws.com", true, None).region, "us-east-1");
        assert_eq!(
            e("s3.amazonaws.com", true, Some("ap-south-1")).region,
            "ap-south-1"
        );
        // Plain HTTP to AWS is what the operator asked for: kept as a custom endpoint.
        assert_eq!(
            e("s3.amazonaws.com", false, None).url,
            Some("http://s3.amazonaws.com".to_owned())
        );
    }

    #[test]
    fn parts_stay_within_limits() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(part_size(300 * MIB), 16 * MIB);
        let huge = 5 * 1024 * 1024 * MIB; // 5 TiB, S3's largest object
        let size = part_size(huge);
        assert_eq!(size % MIB, 0);
        assert!(huge.div_ceil(size) <= 10_000);
    }
}
