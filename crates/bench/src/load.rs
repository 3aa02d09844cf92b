//! The client side: uploads and downloads over loopback HTTP/1.1, each with a timeout.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;
use reqwest::header;

use crate::procfs::MIB;
use crate::servers::Target;

/// The client every phase uses: no proxy, connections kept for reuse.
pub(crate) fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(128)
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the HTTP client")
}

/// Request bodies: a random 1 MiB block, with the first 16 bytes of every 1 MiB replaced by the
/// body's seed and the chunk's index, so that every body is distinct (no de-duplication) while
/// costing the client no copies and no memory beyond the block.
#[derive(Clone)]
pub(crate) struct Bodies {
    block: Bytes,
}

impl Bodies {
    pub(crate) fn new() -> Bodies {
        Bodies {
            block: Bytes::from(crate::pattern(MIB as usize, 7)),
        }
    }

    fn header(seed: u64, index: u64) -> Bytes {
        let mut header = BytesMut::with_capacity(16);
        header.extend_from_slice(&seed.to_le_bytes());
        header.extend_from_slice(&index.to_le_bytes());
        header.freeze()
    }

    /// A body of `len` bytes (a multiple of 1 MiB), streamed without copying: per MiB, its 16-byte
    /// header, then the rest of the block.
    pub(crate) fn body(&self, seed: u64, len: u64) -> reqwest::Body {
        let block = self.block.slice(16..);
        let stream = futures_util::stream::iter(0..len / MIB).flat_map(move |i| {
            futures_util::stream::iter([
                Ok::<_, std::io::Error>(Self::header(seed, i)),
                Ok(block.clone()),
            ])
        });
        reqwest::Body::wrap_stream(stream)
    }

    /// A small body of `len` bytes (16 to 1 MiB), in one piece.
    pub(crate) fn small(&self, seed: u64, len: usize) -> reqwest::Body {
        let mut body = BytesMut::from(&self.block[..len]);
        body[..16].copy_from_slice(&Self::header(seed, u64::MAX));
        reqwest::Body::from(body.freeze())
    }
}

/// `POST /_matrix/media/v3/upload` of `body` (`len` bytes); returns the media id.
pub(crate) async fn upload(
    client: &reqwest::Client,
    target: &Target,
    body: reqwest::Body,
    len: u64,
    timeout: Duration,
) -> Result<String> {
    let mut request = client
        .post(format!("{}/_matrix/media/v3/upload", target.base_url))
        .bearer_auth(&target.token)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        // Synapse refuses uploads without it, and a streamed body has no length of its own.
        .header(header::CONTENT_LENGTH, len)
        .timeout(timeout)
        .body(body);
    if let Some(host) = &target.host {
        request = request.header(header::HOST, host);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{} upload of {len} bytes", target.label))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        bail!("{} upload of {len} bytes: {status}: {text}", target.label);
    }
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} upload: not JSON: {text}", target.label))?;
    let uri = json["content_uri"].as_str().unwrap_or_default();
    let prefix = format!("mxc://{}/", target.server_name);
    match uri.strip_prefix(&prefix) {
        Some(id) if !id.is_empty() => Ok(id.to_owned()),
        _ => bail!("{} upload: unexpected content_uri in {text}", target.label),
    }
}

/// `GET /_matrix/client/v1/media/download/{server}/{id}`, reading and counting the whole body;
/// fails unless it is `expected` bytes long. Returns the time from sending to the last byte.
pub(crate) async fn download(
    client: &reqwest::Client,
    target: &Target,
    media_id: &str,
    expected: u64,
    timeout: Duration,
) -> Result<Duration> {
    Ok(download_timed(client, target, media_id, expected, timeout)
        .await?
        .last_byte)
}

/// How long a download took.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timed {
    /// From sending the request to the response's headers.
    pub(crate) headers: Duration,
    /// From sending the request to the last byte of the body.
    pub(crate) last_byte: Duration,
}

/// [`download`], also telling when the response's headers came.
pub(crate) async fn download_timed(
    client: &reqwest::Client,
    target: &Target,
    media_id: &str,
    expected: u64,
    timeout: Duration,
) -> Result<Timed> {
    let start = Instant::now();
    let mut request = client
        .get(format!(
            "{}/_matrix/client/v1/media/download/{}/{media_id}",
            target.base_url, target.server_name
        ))
        .bearer_auth(&target.token)
        .timeout(timeout);
    if let Some(host) = &target.host {
        request = request.header(header::HOST, host);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("{} download", target.label))?;
    let headers = start.elapsed();
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        bail!("{} download: {status}: {text}", target.label);
    }
    let received = drain(response)
        .await
        .with_context(|| format!("{} download", target.label))?;
    let last_byte = start.elapsed();
    if received != expected {
        bail!(
            "{} download: {received} bytes, expected {expected}",
            target.label
        );
    }
    Ok(Timed { headers, last_byte })
}

/// Reads a response's whole body, counting it (bytes discarded): its length.
pub(crate) async fn drain(response: reqwest::Response) -> reqwest::Result<u64> {
    let mut stream = response.bytes_stream();
    let mut received = 0u64;
    while let Some(chunk) = stream.next().await {
        received += chunk?.len() as u64;
    }
    Ok(received)
}
