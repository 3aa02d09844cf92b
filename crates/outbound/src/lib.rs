//! The one outbound HTTP client every part of mmrctl uses (the homeserver's client-server API,
//! imports' fetches; next federation and URL previews), so that each request gets the same care:
//!
//! - a [`Purpose`] per kind of request: its timeouts, the most bytes its response may have
//!   (enforced while streaming, whatever `Content-Length` claims), and whether redirects are
//!   followed (not unless the purpose asks, and then a bounded number);
//! - an [`AddressFilter`] decided at connect time: every address a name resolves to is checked
//!   and only allowed ones are connected to (no second lookup a rebinding DNS could win), and an
//!   IP literal in a URL, or in a redirect's `Location`, is checked before anything is sent.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

pub use reqwest::{Method, RequestBuilder, StatusCode, Url, header};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{url}: {reason}")]
    Denied { url: String, reason: String },
    #[error("{0}")]
    Http(String),
    #[error("the response is larger than {max} bytes")]
    TooLarge { max: u64 },
}

impl Error {
    fn http(e: &reqwest::Error) -> Error {
        Error::Http(chain(e))
    }

    /// The request never left: it was malformed, or its address was refused (nothing reached the
    /// remote end, so nothing can be said about it).
    pub fn never_sent(&self) -> bool {
        matches!(self, Error::Denied { .. })
    }
}

/// The error with its causes (reqwest's own message alone often says just "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Which addresses may be connected to.
pub trait AddressFilter: Send + Sync + 'static {
    /// Why `ip` is refused, or `None` when it is allowed.
    fn refuses(&self, ip: IpAddr) -> Option<String>;
}

/// What a request is for, and the bounds that go with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purpose {
    /// The whole exchange, body included; `None` for bodies that may take long (imports of large
    /// files), which then have `read` between pieces.
    pub total: Option<Duration>,
    /// The longest wait for the response's head, and then for each next piece of its body.
    pub read: Duration,
    /// The most bytes the response body may have.
    pub max_bytes: Option<u64>,
    /// Redirects followed (0: a redirect is returned as the response).
    pub redirects: usize,
}

impl Purpose {
    /// A call to a homeserver's client-server API with `timeout` (JSON answers, small).
    pub fn homeserver(timeout: Duration) -> Purpose {
        Purpose {
            total: Some(timeout),
            read: timeout,
            max_bytes: Some(1024 * 1024),
            redirects: 0,
        }
    }

    /// A media file fetched for an import: as long as it takes, at most `max_bytes`.
    pub fn import(max_bytes: u64) -> Purpose {
        Purpose {
            total: None,
            read: Duration::from_secs(60),
            max_bytes: Some(max_bytes),
            redirects: 0,
        }
    }
}

/// Resolves with the system resolver, then keeps only the addresses the filter allows.
struct FilteringResolver(Arc<dyn AddressFilter>);

impl Resolve for FilteringResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let filter = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refusals = Vec::new();
            let allowed: Vec<SocketAddr> = found
                .into_iter()
                .filter(|a| match filter.refuses(a.ip()) {
                    None => true,
                    Some(why) => {
                        refusals.push(format!("{}: {why}", a.ip()));
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = if refusals.is_empty() {
                    "no address".to_owned()
                } else {
                    refusals.join(", ")
                };
                return Err(format!("{host} resolves to no allowed address ({why})").into());
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The client: cheap to clone, one connection pool for every purpose.
#[derive(Clone)]
pub struct Client {
    /// Never follows redirects (most purposes).
    direct: reqwest::Client,
    /// Follows them, each checked like the first URL; the purpose's count is enforced per request.
    following: reqwest::Client,
    filter: Option<Arc<dyn AddressFilter>>,
}

/// The most redirects any purpose may follow.
const MAX_REDIRECTS: usize = 10;
/// Connecting, name resolution included, whatever the purpose.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    /// `user_agent` names the caller (`mmrctl/<version>`); `filter`, when given, decides every
    /// address connected to.
    pub fn new(user_agent: &str, filter: Option<Arc<dyn AddressFilter>>) -> Result<Client, Error> {
        let build = |redirect: reqwest::redirect::Policy| {
            let mut b = reqwest::Client::builder()
                .user_agent(user_agent)
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_max_idle_per_host(32)
                .redirect(redirect);
            if let Some(f) = &filter {
                b = b.dns_resolver(Arc::new(FilteringResolver(f.clone())));
            }
            b.build().map_err(|e| Error::http(&e))
        };
        let check = filter.clone();
        let following = build(reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match check
                .as_deref()
                .and_then(|f| literal_refused(f, attempt.url()))
            {
                Some(why) => attempt.error(why),
                None => attempt.follow(),
            }
        }))?;
        Ok(Client {
            direct: build(reqwest::redirect::Policy::none())?,
            following,
            filter,
        })
    }

    /// Sends a request for `purpose`; `prepare` adds headers and a body.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        purpose: Purpose,
        prepare: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Response, Error> {
        let parsed = Url::parse(url).map_err(|e| Error::Denied {
            url: url.to_owned(),
            reason: format!("not a URL: {e}"),
        })?;
        if let Some(why) = self
            .filter
            .as_deref()
            .and_then(|f| literal_refused(f, &parsed))
        {
            return Err(Error::Denied {
                url: url.to_owned(),
                reason: why,
            });
        }
        let client = if purpose.redirects > 0 {
            &self.following
        } else {
            &self.direct
        };
        let mut request = client.request(method, parsed);
        if let Some(total) = purpose.total {
            request = request.timeout(total);
        }
        let request = prepare(request).build().map_err(|e| Error::Denied {
            url: url.to_owned(),
            reason: format!("cannot build the request: {}", chain(&e)),
        })?;
        let head_within = purpose.read + CONNECT_TIMEOUT;
        let response = tokio::time::timeout(head_within, client.execute(request))
            .await
            .map_err(|_| {
                Error::Http(format!(
                    "{url}: no answer within {} s",
                    head_within.as_secs()
                ))
            })?
            .map_err(|e| Error::http(&e))?;
        Ok(Response {
            inner: response,
            purpose,
        })
    }
}

/// Why the filter refuses the IP literal `url` names, if it names one.
fn literal_refused(filter: &dyn AddressFilter, url: &Url) -> Option<String> {
    let ip = match url.host()? {
        url::Host::Ipv4(ip) => IpAddr::V4(ip),
        url::Host::Ipv6(ip) => IpAddr::V6(ip),
        url::Host::Domain(_) => return None,
    };
    filter
        .refuses(ip)
        .map(|why| format!("{ip} is not allowed: {why}"))
}

/// A response whose body is read within its purpose's bounds.
#[derive(Debug)]
pub struct Response {
    inner: reqwest::Response,
    purpose: Purpose,
}

impl Response {
    pub fn status(&self) -> StatusCode {
        self.inner.status()
    }

    pub fn headers(&self) -> &header::HeaderMap {
        self.inner.headers()
    }

    pub fn content_length(&self) -> Option<u64> {
        self.inner.content_length()
    }

    /// The body as it arrives: an error when a piece takes longer than the purpose's `read`, or
    /// when the body grows past its `max_bytes` (then nothing more is read).
    pub fn stream(self) -> impl Stream<Item = Result<Bytes, Error>> + Send + Unpin {
        let Purpose {
            read, max_bytes, ..
        } = self.purpose;
        let max = max_bytes.unwrap_or(u64::MAX);
        let state = (self.inner.bytes_stream(), 0u64, false);
        Box::pin(futures_util::stream::unfold(
            state,
            move |(mut body, seen, done)| async move {
                if done {
                    return None;
                }
                let piece = match tokio::time::timeout(read, body.next()).await {
                    Err(_) => Err(Error::Http(format!(
                        "no data received for {} s",
                        read.as_secs()
                    ))),
                    Ok(None) => return None,
                    Ok(Some(Err(e))) => Err(Error::http(&e)),
                    Ok(Some(Ok(bytes))) => {
                        let seen = seen.saturating_add(bytes.len() as u64);
                        if seen > max {
                            Err(Error::TooLarge { max })
                        } else {
                            return Some((Ok(bytes), (body, seen, false)));
                        }
                    }
                };
                Some((piece, (body, seen, true)))
            },
        ))
    }

    /// The whole body, within the purpose's bounds.
    pub async fn bytes(self) -> Result<Bytes, Error> {
        let mut out = Vec::new();
        let mut stream = self.stream();
        while let Some(piece) = stream.next().await {
            out.extend_from_slice(&piece?);
        }
        Ok(Bytes::from(out))
    }

    /// The body as JSON, within the purpose's bounds.
    pub async fn json(self) -> Result<serde_json::Value, Error> {
        let bytes = self.bytes().await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Http(format!("the answer is not JSON: {e}")))
    }
}
