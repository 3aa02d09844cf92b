//! Remote media: `GET /_matrix/federation/v1/media/download/{mediaId}` (multipart, the file or a
//! `Location`), falling back to the legacy `/_matrix/media/v3/download` only where the spec and
//! Synapse do (the remote does not know the endpoint), with the body streamed to the caller.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use outbound::{Method, Purpose, StatusCode, header};

use crate::client::{Client, Error, Signer};
use crate::multipart;

/// Redirects followed for a `Location` part or a legacy download (as MMR).
const MAX_REDIRECTS: usize = 5;
/// What a remote may take to announce a pending upload (Synapse's default `timeout_ms`).
const REMOTE_WAIT_MS: u64 = 20_000;
/// The JSON of a non-200 answer is read up to this, for its errcode.
const ERROR_BODY_BYTES: usize = 4096;

/// Serialisable, so that the instances share what failed.
#[derive(Debug, Clone, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum FetchError {
    /// The remote says it has no such media (404 `M_NOT_FOUND`, or its legacy endpoint's 404).
    #[error("{0}")]
    NotFound(String),
    /// The remote has it but its upload is not complete (504 `M_NOT_YET_UPLOADED`).
    #[error("the remote has not received the content yet")]
    NotYetUploaded,
    /// The remote refused us (401/403): our signature, its allow-list.
    #[error("{0}")]
    NotAllowed(String),
    #[error("the remote media is larger than {max} bytes")]
    TooLarge { max: u64 },
    /// Nothing was sent: the address filter or the URL refused it.
    #[error("{0}")]
    Denied(String),
    /// The remote failed: unreachable, timed out, 5xx, malformed. Counts toward its backoff.
    #[error("{0}")]
    Failed(String),
}

impl FetchError {
    fn from_client(e: Error) -> FetchError {
        match e {
            Error::TooLarge { max } => FetchError::TooLarge { max },
            Error::Denied(reason) => FetchError::Denied(reason),
            e => FetchError::Failed(e.to_string()),
        }
    }

    /// Whether this says the remote server itself is failing (as opposed to this media).
    pub fn is_server_failure(&self) -> bool {
        matches!(self, FetchError::Failed(_))
    }
}

/// A remote file, its body not read yet.
pub struct Fetched {
    pub content_type: String,
    pub file_name: Option<String>,
    /// The body, ending with an error if the transfer did not complete or grew past the limit.
    pub body: BoxStream<'static, Result<Bytes, FetchError>>,
}

impl std::fmt::Debug for Fetched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fetched({}, {:?})", self.content_type, self.file_name)
    }
}

/// How a remote download is bounded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `downloads.maxBytes` (0: none).
    pub max_bytes: u64,
    /// `timeouts.federationTimeoutSeconds`: the whole exchange, body included.
    pub timeout: Duration,
}

impl Limits {
    fn purpose(self, redirects: usize, envelope: u64) -> Purpose {
        Purpose {
            total: Some(self.timeout),
            read: self.timeout,
            max_bytes: (self.max_bytes > 0).then(|| self.max_bytes.saturating_add(envelope)),
            redirects,
        }
    }
}

/// Bytes a multipart answer has besides the file: part 1, headers, delimiters.
const ENVELOPE_ALLOWANCE: u64 = 64 * 1024;

impl Client {
    /// Downloads `mxc://{server}/{media_id}` from `server`, signed by `signer` when given.
    pub async fn download(
        &self,
        server: &str,
        media_id: &str,
        signer: Option<&Signer>,
        limits: Limits,
    ) -> Result<Fetched, FetchError> {
        let path =
            format!("/_matrix/federation/v1/media/download/{media_id}?timeout_ms={REMOTE_WAIT_MS}");
        if signer.is_some() {
            let (dest, response) = self
                .get(server, &path, signer, limits.purpose(0, ENVELOPE_ALLOWANCE))
                .await
                .map_err(FetchError::from_client)?;
            match response.status() {
                StatusCode::OK => {
                    return self
                        .read_multipart(&dest.base_url, &path, response, limits)
                        .await;
                }
                status => {
                    let answer = ErrorAnswer::read(status, response).await;
                    if !answer.unknown_endpoint() {
                        return Err(answer.into_error(server, limits.max_bytes));
                    }
                    tracing::debug!(server, %status, "no federation media endpoint; trying the legacy one");
                }
            }
        } else {
            tracing::warn!(
                server,
                "no signing key for this homeserver: using the legacy download, which current servers refuse for authenticated media"
            );
        }
        self.legacy_download(server, media_id, signer, limits).await
    }

    async fn read_multipart(
        &self,
        base_url: &str,
        path: &str,
        response: outbound::Response,
        limits: Limits,
    ) -> Result<Fetched, FetchError> {
        let content_type = header_str(response.headers(), header::CONTENT_TYPE).unwrap_or_default();
        // Dendrite names the file on the outer response, not in part 2.
        let outer_disposition = header_str(response.headers(), header::CONTENT_DISPOSITION);
        if let Some(len) = response.content_length()
            && limits.max_bytes > 0
            && len > limits.max_bytes.saturating_add(ENVELOPE_ALLOWANCE)
        {
            return Err(FetchError::TooLarge {
                max: limits.max_bytes,
            });
        }
        let body = response.stream().map(|r| r.map_err(Error::from_outbound));
        let (part, body) = multipart::read_media(&content_type, body)
            .await
            .map_err(|e| FetchError::Failed(format!("malformed multipart answer: {e}")))?;
        if let Some(location) = part.location {
            // MSC3916: the part's other headers and body are ignored; the URL needs no auth.
            let base = outbound::Url::parse(&format!("{base_url}{path}"))
                .map_err(|e| FetchError::Failed(format!("bad base URL: {e}")))?;
            let url = base
                .join(&location)
                .map_err(|e| FetchError::Failed(format!("bad Location `{location}`: {e}")))?;
            let response = self
                .plain()
                .send(
                    Method::GET,
                    url.as_str(),
                    limits.purpose(MAX_REDIRECTS, 0),
                    |r| r,
                )
                .await
                .map_err(|e| FetchError::from_client(Error::from_outbound(e)))?;
            if !response.status().is_success() {
                return Err(FetchError::Failed(format!(
                    "the media's Location answered HTTP {}",
                    response.status()
                )));
            }
            return plain_file(response, limits);
        }
        let max = limits.max_bytes;
        let mut seen = 0u64;
        let body = body.map(move |piece| {
            // Counted here first: the outer cap (file + envelope) only catches a huge part 1.
            let piece = piece.map_err(|e| FetchError::Failed(e.to_string()))?;
            seen += piece.len() as u64;
            if max > 0 && seen > max {
                return Err(FetchError::TooLarge { max });
            }
            Ok(piece)
        });
        Ok(Fetched {
            content_type: part
                .content_type
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "application/octet-stream".to_owned()),
            file_name: part
                .content_disposition
                .as_deref()
                .and_then(file_name)
                .or_else(|| outer_disposition.as_deref().and_then(file_name)),
            body: body.boxed(),
        })
    }

    /// `GET /_matrix/media/v3/download/{server}/{id}?allow_remote=false`, as Synapse falls back
    /// (signed too, redirects followed).
    async fn legacy_download(
        &self,
        server: &str,
        media_id: &str,
        signer: Option<&Signer>,
        limits: Limits,
    ) -> Result<Fetched, FetchError> {
        let path = format!(
            "/_matrix/media/v3/download/{server}/{media_id}?allow_remote=false&allow_redirect=true&timeout_ms={REMOTE_WAIT_MS}"
        );
        let (_, response) = self
            .get(server, &path, signer, limits.purpose(MAX_REDIRECTS, 0))
            .await
            .map_err(FetchError::from_client)?;
        let status = response.status();
        if status != StatusCode::OK {
            let answer = ErrorAnswer::read(status, response).await;
            return Err(answer.into_error(server, limits.max_bytes));
        }
        plain_file(response, limits)
    }
}

fn plain_file(response: outbound::Response, limits: Limits) -> Result<Fetched, FetchError> {
    if let Some(len) = response.content_length()
        && limits.max_bytes > 0
        && len > limits.max_bytes
    {
        return Err(FetchError::TooLarge {
            max: limits.max_bytes,
        });
    }
    let headers = response.headers();
    // A body that ends when the connection closes cannot tell a complete file from a cut one.
    let chunked = header_str(headers, header::TRANSFER_ENCODING)
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if response.content_length().is_none() && !chunked {
        return Err(FetchError::Failed(
            "the answer has no length (neither Content-Length nor chunked): a cut transfer would look complete".into(),
        ));
    }
    let content_type = header_str(headers, header::CONTENT_TYPE)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| "application/octet-stream".to_owned());
    let file_name = header_str(headers, header::CONTENT_DISPOSITION)
        .as_deref()
        .and_then(file_name);
    let body = response
        .stream()
        .map(|r| r.map_err(|e| FetchError::from_client(Error::from_outbound(e))));
    Ok(Fetched {
        content_type,
        file_name,
        body: body.boxed(),
    })
}

fn header_str(headers: &header::HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
}

/// A non-200 answer: its status and, when it is Matrix JSON, its errcode.
struct ErrorAnswer {
    status: StatusCode,
    errcode: Option<String>,
    is_json: bool,
    snippet: String,
}

impl ErrorAnswer {
    async fn read(status: StatusCode, response: outbound::Response) -> ErrorAnswer {
        ErrorAnswer::parse(status, response.snippet(ERROR_BODY_BYTES).await)
    }

    fn parse(status: StatusCode, snippet: String) -> ErrorAnswer {
        let json: Option<serde_json::Value> = serde_json::from_str(&snippet).ok();
        ErrorAnswer {
            status,
            errcode: json
                .as_ref()
                .and_then(|j| j.get("errcode"))
                .and_then(|e| e.as_str())
                .map(str::to_owned),
            is_json: json.as_ref().is_some_and(serde_json::Value::is_object),
            snippet,
        }
    }

    /// Synapse's `is_unknown_endpoint`: 404/405 with an empty or non-JSON body or
    /// `M_UNRECOGNIZED`, or 400 `M_UNRECOGNIZED`. Never a 404 `M_NOT_FOUND`.
    fn unknown_endpoint(&self) -> bool {
        let unrecognized = self.errcode.as_deref() == Some("M_UNRECOGNIZED");
        match self.status {
            StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => unrecognized || !self.is_json,
            StatusCode::BAD_REQUEST => unrecognized,
            _ => false,
        }
    }

    /// `max` is our limit, reported when the remote says the media is too large for it.
    fn into_error(self, server: &str, max: u64) -> FetchError {
        let text: String = self.snippet.chars().take(200).collect();
        match (self.status, self.errcode.as_deref()) {
            (StatusCode::NOT_FOUND, _) => {
                FetchError::NotFound(format!("{server} has no such media"))
            }
            (StatusCode::GATEWAY_TIMEOUT, Some("M_NOT_YET_UPLOADED")) => FetchError::NotYetUploaded,
            (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN, _) => {
                FetchError::NotAllowed(format!(
                    "{server} refused the request (HTTP {}): {text}",
                    self.status
                ))
            }
            // The remote will not serve it to us: ours to report as too large, not its failure.
            (StatusCode::PAYLOAD_TOO_LARGE, _) | (_, Some("M_TOO_LARGE")) => {
                FetchError::TooLarge { max }
            }
            (status, _) => FetchError::Failed(format!("{server} answered HTTP {status}: {text}")),
        }
    }
}

/// The file name of a `Content-Disposition` value: `filename*=UTF-8''...` (RFC 5987,
/// percent-decoded) preferred, else `filename=` (quoted or a token), as Synapse reads it.
pub fn file_name(disposition: &str) -> Option<String> {
    let mut plain = None;
    let mut extended = None;
    for param in split_params(disposition).into_iter().skip(1) {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "filename*" => {
                let value = value.trim();
                let Some((charset, rest)) = value.split_once('\'') else {
                    continue;
                };
                let Some((_, encoded)) = rest.split_once('\'') else {
                    continue;
                };
                if charset.eq_ignore_ascii_case("utf-8") {
                    extended = percent_decode(encoded);
                }
            }
            "filename" => plain = Some(unquote(value.trim())),
            _ => {}
        }
    }
    extended.or(plain).filter(|n| !n.is_empty())
}

/// Splits on `;` outside quoted strings.
fn split_params(value: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(if c == '\\' {
            chars.next().unwrap_or('\\')
        } else {
            c
        });
    }
    out
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_as_synapse_reads_them() {
        assert_eq!(file_name("inline"), None);
        assert_eq!(
            file_name("attachment; filename=a.png").as_deref(),
            Some("a.png")
        );
        assert_eq!(
            file_name("inline; filename=\"a \\\"b\\\"; c.txt\"").as_deref(),
            Some("a \"b\"; c.txt")
        );
        assert_eq!(
            file_name(
                "inline; filename=x.png; filename*=utf-8''%E6%97%A5%E6%9C%AC%20%E2%98%95.png"
            )
            .as_deref(),
            Some("日本 ☕.png")
        );
        assert_eq!(
            file_name("inline; FILENAME*=UTF-8''caf%C3%A9").as_deref(),
            Some("café")
        );
        // A broken extended name falls back to the plain one.
        assert_eq!(
            file_name("inline; filename*=utf-8''%ZZ; filename=b").as_deref(),
            Some("b")
        );
        assert_eq!(file_name("inline; filename=\"\"").as_deref(), None);
    }

    fn answer(status: u16, body: &str) -> ErrorAnswer {
        ErrorAnswer::parse(StatusCode::from_u16(status).unwrap(), body.to_owned())
    }

    #[test]
    fn falls_back_only_when_the_endpoint_is_unknown() {
        let unknown = |s, b| answer(s, b).unknown_endpoint();
        assert!(unknown(404, r#"{"errcode":"M_UNRECOGNIZED","error":"x"}"#));
        assert!(unknown(405, r#"{"errcode":"M_UNRECOGNIZED"}"#));
        assert!(unknown(400, r#"{"errcode":"M_UNRECOGNIZED"}"#));
        assert!(unknown(404, "<html>Not Found</html>"));
        assert!(unknown(404, ""));
        assert!(!unknown(404, r#"{"errcode":"M_NOT_FOUND"}"#));
        assert!(!unknown(400, "not json"));
        assert!(!unknown(500, r#"{"errcode":"M_UNRECOGNIZED"}"#));
        assert!(!unknown(401, r#"{"errcode":"M_UNAUTHORIZED"}"#));
        assert!(matches!(
            answer(404, r#"{"errcode":"M_NOT_FOUND"}"#).into_error("s", 9),
            FetchError::NotFound(_)
        ));
        assert!(matches!(
            answer(403, "{}").into_error("s", 9),
            FetchError::NotAllowed(_)
        ));
        assert!(matches!(
            answer(413, r#"{"errcode":"M_TOO_LARGE"}"#).into_error("s", 9),
            FetchError::TooLarge { max: 9 }
        ));
        assert!(matches!(
            answer(502, "").into_error("s", 9),
            FetchError::Failed(_)
        ));
    }
}
