//! A small blocking HTTP client for tests (no TLS: test servers listen on 127.0.0.1).

use std::time::Duration;

/// A response: status, headers (lower-case names) and the whole body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", self.status, self.text()))
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Percent-encodes a path segment or query value (UTF-8): everything but RFC 3986's unreserved
/// characters.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

fn finish(url: &str, result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Response {
    result
        .map_err(|e| e.to_string())
        .and_then(read)
        .unwrap_or_else(|e| panic!("request to {url} failed: {e}"))
}

fn read(mut response: ureq::http::Response<ureq::Body>) -> Result<Response, String> {
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .map_err(|e| e.to_string())?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// `GET url` with `headers`; panics only when no response came (any status is returned).
pub fn get(url: &str, headers: &[(&str, &str)]) -> Response {
    let mut request = agent().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    finish(url, request.call())
}

/// `GET url`, or `None` when nothing answered (a server still starting).
pub fn try_get(url: &str) -> Option<Response> {
    let result = agent().get(url).call();
    result.is_ok().then(|| finish(url, result))
}

/// `method url` with `headers` and `body` (with a `Content-Type` header when given).
pub fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    content_type: Option<&str>,
    body: &[u8],
) -> Response {
    send_with(&agent(), method, url, headers, content_type, body)
}

/// [`send`] through `agent` (one with its own TLS roots, say).
pub(crate) fn send_with(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    content_type: Option<&str>,
    body: &[u8],
) -> Response {
    finish(
        url,
        agent.run(request(method, url, headers, content_type, body)),
    )
}

/// [`send`], or the transport's error when no response came (a server killed mid-request).
pub fn try_send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Response, String> {
    let request = request(method, url, headers, content_type, body);
    agent()
        .run(request)
        .map_err(|e| e.to_string())
        .and_then(read)
}

fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    content_type: Option<&str>,
    body: &[u8],
) -> ureq::http::Request<Vec<u8>> {
    let request = ureq::http::Request::builder().method(method).uri(url);
    let mut request = headers
        .iter()
        .fold(request, |r, (name, value)| r.header(*name, *value));
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    request
        .body(body.to_vec())
        .unwrap_or_else(|e| panic!("bad request {method} {url}: {e}"))
}

/// `POST url` with a JSON body.
pub fn post_json(url: &str, headers: &[(&str, &str)], body: &serde_json::Value) -> Response {
    send(
        "POST",
        url,
        headers,
        Some("application/json"),
        body.to_string().as_bytes(),
    )
}
