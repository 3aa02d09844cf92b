//! The one outbound HTTP client every part of mmrctl uses (the homeserver's client-server API,
//! imports' fetches; next federation and URL previews), so that each request gets the same care:
//!
//! - a [`Purpose`] per kind of request: its timeouts, the most bytes its response may have
//!   (enforced while streaming, whatever `Content-Length` claims), and whether redirects are
//!   followed (not unless the purpose asks, and then a bounded number);
//! - an [`AddressFilter`] decided at connect time: every address a name resolves to is checked
//!   and only allowed ones are connected to (no second lookup a rebinding DNS could win), and an
//!   IP literal in a URL, or in a redirect's `Location`, is checked before anything is sent
//!   ([`NetworkFilter`] is the one configured from lists of networks);
//! - optionally, its own DNS [`Resolver`] and a table of [`Overrides`] (host name to addresses,
//!   consulted first: how federation reaches an SRV target under the server's name), built with
//!   [`Client::builder`].

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};

pub mod dns;
pub mod filter;

pub use dns::{DnsError, Overrides, Resolver, SrvRecord, parse_nameservers};
pub use filter::{BadNetwork, NetworkFilter, Refusal, UrlFilter};
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
    /// A name whose every address the filter refused is [`Error::Denied`] (nothing was sent),
    /// whatever layers of the HTTP stack it came through.
    fn http(e: &reqwest::Error) -> Error {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(c) = cause {
            if let Some(refused) = c.downcast_ref::<dns::Refused>() {
                return Error::Denied {
                    url: e.url().map(Url::to_string).unwrap_or_default(),
                    reason: refused.0.clone(),
                };
            }
            cause = c.source();
        }
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

    /// Why a URL (the first or a redirect's) is refused whatever it resolves to; its IP
    /// literal, if it has one, is checked with [`AddressFilter::refuses`] as well.
    fn refuses_url(&self, _url: &Url) -> Option<String> {
        None
    }
}

/// Why `url` would be refused before anything is sent: not http(s), refused by the filter's URL
/// rules, or an IP literal the filter refuses (names are checked when they resolve). `url` is
/// read as the WHATWG URL standard says, as browsers do: an IP literal in any notation
/// (`2130706433`, `0x7f.1`, `0177.0.0.1`, `[::ffff:7f00:1]`) is the address it denotes.
pub fn refusal(filter: Option<&dyn AddressFilter>, url: &Url) -> Option<String> {
    if !matches!(url.scheme(), "http" | "https") {
        return Some(format!("`{}` is not http or https", url.scheme()));
    }
    let filter = filter?;
    filter
        .refuses_url(url)
        .or_else(|| literal_refused(filter, url))
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

    /// A page or image fetched for a URL preview: everything within `total`, at most
    /// `max_bytes`, at most `redirects` redirects.
    pub fn preview(total: Duration, max_bytes: u64, redirects: usize) -> Purpose {
        Purpose {
            total: Some(total),
            read: total,
            max_bytes: Some(max_bytes),
            redirects,
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

/// The client: cheap to clone, one connection pool for every purpose.
#[derive(Clone)]
pub struct Client {
    /// Never follows redirects by itself: [`Client::send`] does, counting them for the purpose.
    http: reqwest::Client,
    filter: Option<Arc<dyn AddressFilter>>,
    dns: Option<Resolver>,
    overrides: Option<Overrides>,
    user_agent: Arc<str>,
    accept_invalid_certs: bool,
}

/// Connecting, name resolution included, whatever the purpose.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How a [`Client`] is made: [`Client::builder`].
#[derive(Clone)]
pub struct ClientBuilder {
    user_agent: String,
    filter: Option<Arc<dyn AddressFilter>>,
    dns: Option<Resolver>,
    overrides: Option<Overrides>,
    accept_invalid_certs: bool,
}

impl ClientBuilder {
    /// Certificates are not checked (`urlPreviews.previewUnsafeCertificates`): the connection is
    /// encrypted but could be anyone's.
    pub fn accept_invalid_certs(mut self, yes: bool) -> ClientBuilder {
        self.accept_invalid_certs = yes;
        self
    }

    /// Every address connected to must pass `filter`: each one a name resolves to (overrides
    /// included), and IP literals in URLs and redirects.
    pub fn filter(mut self, filter: Arc<dyn AddressFilter>) -> ClientBuilder {
        self.filter = Some(filter);
        self
    }

    /// Names are resolved with `dns` (else with the system's `getaddrinfo`).
    pub fn resolver(mut self, dns: Resolver) -> ClientBuilder {
        self.dns = Some(dns);
        self
    }

    /// Names in `overrides` connect to the addresses given there, before any DNS. A client
    /// built with a resolver gets an empty table of its own unless one is given here.
    pub fn overrides(mut self, overrides: Overrides) -> ClientBuilder {
        self.overrides = Some(overrides);
        self
    }

    pub fn build(mut self) -> Result<Client, Error> {
        let overrides = match (self.overrides.take(), &self.dns) {
            (Some(o), _) => Some(o),
            (None, Some(_)) => Some(Overrides::default()),
            (None, None) => None,
        };
        self.finish(overrides)
    }

    fn finish(self, overrides: Option<Overrides>) -> Result<Client, Error> {
        let mut builder = reqwest::Client::builder()
            .user_agent(&self.user_agent)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(32)
            .redirect(reqwest::redirect::Policy::none())
            .tls_danger_accept_invalid_certs(self.accept_invalid_certs);
        if self.filter.is_some() || self.dns.is_some() || overrides.is_some() {
            // A proxy would resolve the names itself, out of the filter's and the overrides'
            // sight.
            builder = builder.no_proxy().dns_resolver(Arc::new(dns::NameResolver {
                filter: self.filter.clone(),
                dns: self.dns.clone(),
                overrides: overrides.clone(),
            }));
        }
        Ok(Client {
            http: builder.build().map_err(|e| Error::http(&e))?,
            filter: self.filter,
            dns: self.dns,
            overrides,
            user_agent: Arc::from(self.user_agent),
            accept_invalid_certs: self.accept_invalid_certs,
        })
    }
}

impl Client {
    /// `user_agent` names the caller (`mmrctl/<version>`); `filter`, when given, decides every
    /// address connected to. Names are resolved by the system (`getaddrinfo`).
    pub fn new(user_agent: &str, filter: Option<Arc<dyn AddressFilter>>) -> Result<Client, Error> {
        let builder = Client::builder(user_agent);
        match filter {
            Some(f) => builder.filter(f),
            None => builder,
        }
        .build()
    }

    /// A client for `user_agent`, to configure: [`ClientBuilder::filter`],
    /// [`ClientBuilder::resolver`], [`ClientBuilder::overrides`].
    pub fn builder(user_agent: &str) -> ClientBuilder {
        ClientBuilder {
            user_agent: user_agent.to_owned(),
            filter: None,
            dns: None,
            overrides: None,
            accept_invalid_certs: false,
        }
    }

    /// The DNS resolver the client was built with.
    pub fn resolver(&self) -> Option<&Resolver> {
        self.dns.as_ref()
    }

    /// The override table the client consults first (every client built with a resolver has
    /// one).
    pub fn overrides(&self) -> Option<&Overrides> {
        self.overrides.as_ref()
    }

    /// The same client (user agent, filter, resolver) with no overrides and a connection pool
    /// of its own: for requests to a host that must reach what DNS says even when the
    /// overrides send federation elsewhere (`.well-known/matrix/server` is on port 443 of the
    /// server name, whatever its SRV records say).
    pub fn without_overrides(&self) -> Result<Client, Error> {
        ClientBuilder {
            user_agent: self.user_agent.to_string(),
            filter: self.filter.clone(),
            dns: self.dns.clone(),
            overrides: None,
            accept_invalid_certs: self.accept_invalid_certs,
        }
        .finish(None)
    }

    /// Sends a request for `purpose`; `prepare` adds headers and a body. Redirects of `GET` and
    /// `HEAD` are followed as far as the purpose allows, each target checked like the first URL;
    /// credentials are not sent to another origin.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        purpose: Purpose,
        prepare: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
    ) -> Result<Response, Error> {
        let denied = |url: &str, reason: String| Error::Denied {
            url: url.to_owned(),
            reason,
        };
        let mut target = Url::parse(url).map_err(|e| denied(url, format!("not a URL: {e}")))?;
        self.check(&target)?;
        let request = self.http.request(method.clone(), target.clone());
        let mut request = prepare(request)
            .build()
            .map_err(|e| denied(url, format!("cannot build the request: {}", chain(&e))))?;
        // One deadline for the whole exchange, redirects included: each hop gets what is left.
        let deadline = purpose.total.map(|t| (tokio::time::Instant::now() + t, t));
        let mut hops = 0;
        loop {
            if let Some((deadline, total)) = deadline {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(Error::Http(format!(
                        "{url}: no answer within {} s",
                        total.as_secs_f64()
                    )));
                }
                *request.timeout_mut() = Some(left);
            }
            // Kept for a redirect: the same request to the next URL.
            let again = request.try_clone();
            let response = self.execute(request, purpose.read).await?;
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .map(str::to_owned);
            let follow = purpose.redirects > 0
                && response.status().is_redirection()
                && (method == Method::GET || method == Method::HEAD);
            let (Some(location), Some(mut next), true) = (location, again, follow) else {
                return Ok(Response {
                    inner: response,
                    purpose,
                });
            };
            hops += 1;
            if hops > purpose.redirects {
                return Err(Error::Http(format!(
                    "{url}: more than {} redirects",
                    purpose.redirects
                )));
            }
            let to = target
                .join(&location)
                .map_err(|e| denied(&location, format!("not a URL: {e}")))?;
            self.check(&to)?;
            if to.origin() != target.origin() {
                // `Host` too: a caller that set it (federation) set it for the first origin.
                for h in [
                    header::AUTHORIZATION,
                    header::COOKIE,
                    header::PROXY_AUTHORIZATION,
                    header::HOST,
                ] {
                    next.headers_mut().remove(h);
                }
            }
            *next.url_mut() = to.clone();
            target = to;
            request = next;
        }
    }

    /// Refuses a URL as [`refusal`] says.
    fn check(&self, url: &Url) -> Result<(), Error> {
        match refusal(self.filter.as_deref(), url) {
            Some(reason) => Err(Error::Denied {
                url: url.to_string(),
                reason,
            }),
            None => Ok(()),
        }
    }

    async fn execute(
        &self,
        request: reqwest::Request,
        read: Duration,
    ) -> Result<reqwest::Response, Error> {
        let url = request.url().to_string();
        let head_within = read + CONNECT_TIMEOUT;
        tokio::time::timeout(head_within, self.http.execute(request))
            .await
            .map_err(|_| {
                Error::Http(format!(
                    "{url}: no answer within {} s",
                    head_within.as_secs()
                ))
            })?
            .map_err(|e| Error::http(&e))
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

    /// The URL that answered (the last one, after redirects).
    pub fn url(&self) -> &Url {
        self.inner.url()
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

    /// The start of the body as text, at most `max` bytes of it (for error messages).
    pub async fn snippet(self, max: usize) -> String {
        let mut out = Vec::new();
        let mut stream = self.stream();
        while out.len() < max
            && let Some(Ok(piece)) = stream.next().await
        {
            out.extend_from_slice(&piece[..piece.len().min(max - out.len())]);
        }
        String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::filter::UrlFilter;

    /// Previews' test rules: 127.0.0.1 allowed, 127.0.0.2 and ::1 denied, port 8080 allowed.
    fn rules() -> UrlFilter {
        UrlFilter {
            networks: NetworkFilter::new(&["127.0.0.1/32"], &["127.0.0.2/32", "::1/128"]).unwrap(),
            ports: vec![8080],
        }
    }

    fn refused(url: &str) -> Option<String> {
        let url = Url::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        refusal(Some(&rules()), &url)
    }

    #[test]
    fn ip_literals_in_every_notation_are_the_address_they_denote() {
        // Each of these is 127.0.0.2 (or maps to it) to a browser's URL parser, and so to ours.
        for url in [
            "http://127.0.0.2/",
            "http://2130706434/",
            "http://0x7f000002/",
            "http://0X7F000002/",
            "http://0x7f.0x0.0x0.0x2/",
            "http://0x7f.0.0.2/",
            "http://0177.0.0.2/",
            "http://0177.0.0.02/",
            "http://00000177.000.000.002/",
            "http://127.2/",
            "http://127.0.2/",
            "http://0x7f.2/",
            "http://127.0.0.2./",
            "http://%31%32%37.0.0.2/",
            "http://１２７.０.０.２/", // full-width digits, normalised by IDNA
            "http://[::ffff:127.0.0.2]/",
            "http://[::ffff:7f00:2]/",
            "http://[0:0:0:0:0:ffff:7f00:0002]/",
            "http://[::127.0.0.2]/",
            "http://[2002:7f00:2::]/",
            "http://[64:ff9b::127.0.0.2]/",
            "http://[2001:0:4136:e378:8000:63bf:80ff:fffd]/", // Teredo, client 127.0.0.2
            "http://[::1]/",
            "http://[0:0:0:0:0:0:0:1]/",
            "https://127.0.0.2/",
            "http://127.0.0.2:8080/",
        ] {
            let why = refused(url).unwrap_or_else(|| panic!("{url} should be refused"));
            assert!(why.contains("not allowed"), "{url}: {why}");
        }
        // The one allowed address, however written.
        for url in [
            "http://127.0.0.1/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
            "http://0177.0.0.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://127.0.0.1:8080/",
            "https://127.0.0.1:443/",
            "http://127.0.0.1:80/",
        ] {
            assert_eq!(refused(url), None, "{url}");
        }
        // Names are judged when they resolve, not here.
        assert_eq!(refused("http://evil.example/"), None);
    }

    #[test]
    fn url_rules_refuse_other_schemes_ports_and_credentials() {
        for (url, says) in [
            ("file:///etc/passwd", "not http or https"),
            ("ftp://127.0.0.1/", "not http or https"),
            ("gopher://127.0.0.1:70/", "not http or https"),
            ("data:text/html,hi", "not http or https"),
            ("http://127.0.0.1:22/", "port 22"),
            ("https://127.0.0.1:80/", "port 80"),
            ("http://127.0.0.1:443/", "port 443"),
            ("http://user@127.0.0.1/", "credentials"),
            ("http://user:pw@127.0.0.1/", "credentials"),
            ("http://:pw@127.0.0.1/", "credentials"),
        ] {
            let why = refused(url).unwrap_or_else(|| panic!("{url} should be refused"));
            assert!(why.contains(says), "{url}: {why}");
        }
        // Malformed IPv4 is not a name either: the parser refuses it.
        for bad in [
            "http://127.0.0.256/",
            "http://0x100000000/",
            "http://1.2.3.4.5/",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        // Without a filter, only the scheme is checked.
        let plain = Url::parse("http://127.0.0.2:22/").unwrap();
        assert_eq!(refusal(None, &plain), None);
    }

    #[test]
    fn configured_nat64_prefixes_are_judged_by_their_ipv4() {
        let f = NetworkFilter::new(filter::ALLOW_ALL, &["10.0.0.0/8"])
            .unwrap()
            .with_nat64(&["2001:db8:64::/96"])
            .unwrap();
        assert!(f.refuses("2001:db8:64::a00:1".parse().unwrap()).is_some());
        assert!(f.refuses("2001:db8:64::808:808".parse().unwrap()).is_none());
        // Outside the prefix it is just an IPv6 address.
        assert!(f.refuses("2001:db8:65::a00:1".parse().unwrap()).is_none());
        for bad in ["2001:db8:64::/64", "10.0.0.0/8", "nope"] {
            let e = NetworkFilter::new(filter::ALLOW_ALL, &[] as &[&str])
                .unwrap()
                .with_nat64(&[bad])
                .unwrap_err();
            assert_eq!(e.entry, bad);
        }
    }
}
