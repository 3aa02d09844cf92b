//! Server discovery: where to send a federation request for a server name, as the spec's
//! "Resolving server names" (server-server API) says, step by step:
//!
//! 1. an IP literal (`1.2.3.4`, `[::1]`), with its port or 8448; `Host` is the server name;
//! 2. a host name with an explicit port: that host and port; `Host` is the server name;
//! 3. else `GET https://<host>/.well-known/matrix/server` (redirects followed, at most
//!    [`WELL_KNOWN_REDIRECTS`]; at most [`WELL_KNOWN_MAX_BYTES`]; within 10 s). A valid
//!    `m.server` (`<delegated>[:<port>]`) then gives, for the delegated name: an IP literal with
//!    its port or 8448, or a host with its port, `Host` the `m.server` value as given; else SRV
//!    `_matrix-fed._tcp.<delegated>`, then `_matrix._tcp.<delegated>`, then `<delegated>:8448`,
//!    `Host` the delegated name (and the certificate must be for it);
//! 4. an invalid or failed well-known: SRV `_matrix-fed._tcp.<host>`, then `_matrix._tcp.<host>`,
//!    then `<host>:8448`, `Host` the host.
//!
//! An SRV answer becomes an entry in the federation client's [`Overrides`]: the
//! [`Destination`]'s URL is `https://<name>` with no port, so TLS checks the certificate for
//! `<name>` while the client's resolver connects to the SRV targets' addresses and ports (in
//! SRV order: priority, then weighted random, RFC 2782, as Synapse sorts them). The client's
//! address filter still decides each of them when connecting. Without an SRV answer the entry
//! is removed and the URL carries the port.
//!
//! The `.well-known` answer is cached per host, as Synapse 1.163 caches it
//! (`synapse/http/federation/well_known_resolver.py`): a valid answer for the lifetime its
//! `Cache-Control: max-age` or `Expires` gives ([`well_known_lifetime`]: at least 5 minutes, at
//! most 48 hours, 24 hours when neither is given); a failure (no answer, not 200, not JSON, no
//! valid `m.server`) for 1 hour, or for 2 minutes when the host had a valid answer within the
//! last 2 hours past its lifetime (the delegation is probably just down for a moment). The
//! default and failure lifetimes get ±10% jitter, so a restart does not refetch everything
//! at once. A cached answer is refetched once 80% of its lifetime has passed; if that refetch
//! fails for a transient reason (no answer, 5xx, too large), the cached answer is kept until it
//! expires. SRV and address answers are cached by the resolver for their TTL (hickory's cache;
//! negative answers for their SOA's negative TTL). Concurrent resolutions of one name are
//! coalesced into one (one well-known request, one set of DNS queries).
//!
//! Known limit: overrides are per host name, so one host reached both through SRV (server name
//! `example.org`) and with an explicit port (server name `example.org:8449`, or a delegation to
//! `example.org:8449`) is connected to at the SRV targets' addresses for both (with the explicit
//! port for the second). Both names are under one DNS owner, and the certificate is checked
//! for the name either way.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use outbound::header::{self, HeaderMap};
use outbound::{Method, Overrides, Purpose, Resolver, SrvRecord, StatusCode};

/// The federation port when none is given and no SRV record says otherwise.
pub const DEFAULT_PORT: u16 = 8448;
/// A valid `.well-known` answer without caching headers.
pub const WELL_KNOWN_DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Bounds of a valid answer's lifetime, whatever its headers say.
pub const WELL_KNOWN_MIN_LIFETIME: Duration = Duration::from_secs(5 * 60);
pub const WELL_KNOWN_MAX_LIFETIME: Duration = Duration::from_secs(48 * 3600);
/// A failed or invalid `.well-known`.
pub const WELL_KNOWN_FAILURE_LIFETIME: Duration = Duration::from_secs(3600);
/// A failed or invalid `.well-known` of a host that recently had a valid one.
pub const WELL_KNOWN_DOWN_LIFETIME: Duration = Duration::from_secs(2 * 60);
/// How long after a valid answer expires the host counts as "recently had a valid one".
pub const WELL_KNOWN_REMEMBER_VALID: Duration = Duration::from_secs(2 * 3600);
/// The most bytes a `.well-known/matrix/server` answer may have (real ones are ~50 bytes).
pub const WELL_KNOWN_MAX_BYTES: u64 = 8 * 1024;
/// Redirects followed for `.well-known/matrix/server`.
pub const WELL_KNOWN_REDIRECTS: usize = 5;
const WELL_KNOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// A cached answer is refetched once this part of its lifetime is left.
const GRACE_FACTOR: f64 = 0.2;
const JITTER: f64 = 0.1;
/// Hosts whose `.well-known` answer is kept.
const WELL_KNOWN_ENTRIES: u64 = 10_000;

/// Where to send requests for a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Prefix for request paths: `https://host` (no port: the client's overrides decide the
    /// address and port, from SRV) or `https://host:port`.
    pub base_url: String,
    /// The `Host` header to send, always explicitly (it may carry `:443`, which a URL drops):
    /// the server name as given for an IP literal or explicit port; the `m.server` value as
    /// given for a delegation to an IP literal or explicit port; else the (delegated) host
    /// name alone.
    pub host_header: String,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("`{name}` is not a valid server name: {reason}")]
    InvalidServerName { name: String, reason: String },
    #[error("invalid .well-known/matrix/server: {0}")]
    InvalidWellKnown(String),
    #[error(transparent)]
    Dns(#[from] outbound::DnsError),
    /// SRV says there is no federation service, or its targets have no address.
    #[error("{0}")]
    NoService(String),
    #[error("{0}")]
    Setup(String),
}

/// The host part of a server name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// A DNS name, as given.
    Name(String),
}

/// A server name read by the spec's grammar: `host[:port]`, host a DNS name, an IPv4 address
/// or a bracketed IPv6 address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerName {
    pub host: Host,
    pub port: Option<u16>,
}

/// Reads a server name (the grammar of `store::ids::is_valid_server_name`, plus: labels of at
/// most 63 characters, a port from 1 to 65535).
pub fn parse_server_name(name: &str) -> Result<ServerName, Error> {
    let bad = |reason: &str| Error::InvalidServerName {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    if name.is_empty() || name.len() > 255 {
        return Err(bad("it must have 1 to 255 characters"));
    }
    let (host, port) = if let Some(rest) = name.strip_prefix('[') {
        let (ip6, after) = rest.split_once(']').ok_or_else(|| bad("`[` without `]`"))?;
        let ip: Ipv6Addr = ip6
            .parse()
            .map_err(|_| bad("not an IPv6 address between `[` and `]`"))?;
        let port = match after {
            "" => None,
            _ => Some(
                after
                    .strip_prefix(':')
                    .ok_or_else(|| bad("only `:port` may follow `]`"))?,
            ),
        };
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (host, port) = match name.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (name, None),
        };
        let host = match host.parse::<Ipv4Addr>() {
            Ok(ip) => Host::Ip(IpAddr::V4(ip)),
            Err(_) => {
                let label_ok = |l: &str| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                };
                // Dotted digits that are no IPv4 address (`1.2.3.999`) name nothing.
                let dotted_digits = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
                if !host.split('.').all(label_ok) || dotted_digits {
                    return Err(bad(
                        "the host must be a DNS name (letters, digits, `-`, dots between labels), \
                         an IPv4 address or an IPv6 address in brackets",
                    ));
                }
                Host::Name(host.to_owned())
            }
        };
        (host, port)
    };
    let port = port
        .map(|p| {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("the port must be 1 to 5 digits"));
            }
            match p.parse::<u16>() {
                Ok(0) | Err(_) => Err(bad("the port must be from 1 to 65535")),
                Ok(port) => Ok(port),
            }
        })
        .transpose()?;
    Ok(ServerName { host, port })
}

/// The `m.server` value of a `.well-known/matrix/server` body, checked to be a server name.
pub fn parse_well_known(body: &[u8]) -> Result<String, Error> {
    let invalid = |why: String| Error::InvalidWellKnown(why);
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let object = value
        .as_object()
        .ok_or_else(|| invalid("not a JSON object".to_owned()))?;
    let server = object
        .get("m.server")
        .ok_or_else(|| invalid("no `m.server`".to_owned()))?
        .as_str()
        .ok_or_else(|| invalid("`m.server` is not a string".to_owned()))?;
    parse_server_name(server).map_err(|e| invalid(format!("`m.server`: {e}")))?;
    Ok(server.to_owned())
}

/// How long a response may be cached by its headers, as Synapse reads them: `Cache-Control:
/// no-store` gives 0, else `max-age=N` gives N seconds, else `Expires` gives the time left until
/// then (0 when past or not a date); `None` when none of these is given.
pub fn cache_lifetime_from_headers(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let mut max_age = None;
    let mut no_store = false;
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else { continue };
        for directive in value.split(',') {
            let (name, arg) = match directive.split_once('=') {
                Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                None => (directive.trim(), None),
            };
            if name.eq_ignore_ascii_case("no-store") {
                no_store = true;
            } else if name.eq_ignore_ascii_case("max-age")
                && let Some(secs) = arg.and_then(|a| a.parse::<u64>().ok())
            {
                max_age = Some(Duration::from_secs(secs));
            }
        }
    }
    if no_store {
        return Some(Duration::ZERO);
    }
    if max_age.is_some() {
        return max_age;
    }
    let expires = headers.get_all(header::EXPIRES).iter().next_back()?;
    let at = expires
        .to_str()
        .ok()
        .and_then(|e| httpdate::parse_http_date(e.trim()).ok());
    Some(match at {
        // RFC 9111 §5.3: an invalid date means "already expired".
        None => Duration::ZERO,
        Some(at) => at.duration_since(now).unwrap_or(Duration::ZERO),
    })
}

/// How long a valid `.well-known` answer with these headers is kept: what the headers say
/// ([`cache_lifetime_from_headers`]) within [`WELL_KNOWN_MIN_LIFETIME`] and
/// [`WELL_KNOWN_MAX_LIFETIME`], else [`WELL_KNOWN_DEFAULT_LIFETIME`] (to which the cache adds
/// jitter).
pub fn well_known_lifetime(headers: &HeaderMap, now: SystemTime) -> Duration {
    cache_lifetime_from_headers(headers, now)
        .map(|d| d.clamp(WELL_KNOWN_MIN_LIFETIME, WELL_KNOWN_MAX_LIFETIME))
        .unwrap_or(WELL_KNOWN_DEFAULT_LIFETIME)
}

/// SRV records in the order to try them (RFC 2782, as Synapse's `_sort_server_list`): by
/// priority, lowest first; within one priority, weighted random. `random(n)` returns a number
/// from 0 to `n`, both included.
pub fn order_srv(records: Vec<SrvRecord>, mut random: impl FnMut(u32) -> u32) -> Vec<SrvRecord> {
    let mut by_priority: Vec<SrvRecord> = records;
    by_priority.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(by_priority.len());
    let mut rest = by_priority.as_slice();
    while let Some(first) = rest.first() {
        let same = rest
            .iter()
            .take_while(|r| r.priority == first.priority)
            .count();
        let mut group: Vec<SrvRecord> = rest[..same].to_vec();
        rest = &rest[same..];
        while !group.is_empty() {
            let total: u32 = group.iter().map(|r| u32::from(r.weight)).sum();
            let mut target = i64::from(random(total));
            let mut pick = group.len() - 1;
            for (i, r) in group.iter().enumerate() {
                target -= i64::from(r.weight);
                if target <= 0 {
                    pick = i;
                    break;
                }
            }
            out.push(group.remove(pick));
        }
    }
    out
}

fn random_upto(n: u32) -> u32 {
    match getrandom::u32() {
        Ok(r) if n < u32::MAX => r % (n + 1),
        Ok(r) => r,
        Err(_) => 0,
    }
}

/// `d` times a random factor in [1 - JITTER, 1 + JITTER].
fn jitter(d: Duration) -> Duration {
    let unit = f64::from(random_upto(1_000_000)) / 1_000_000.0;
    d.mul_f64(1.0 - JITTER + 2.0 * JITTER * unit)
}

fn ip_url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// A destination that needs no lookup: an IP literal, or a host with an explicit port.
fn direct(name: &ServerName, as_given: &str) -> Option<Destination> {
    let base_url = match (&name.host, name.port) {
        (Host::Ip(ip), port) => {
            format!(
                "https://{}:{}",
                ip_url_host(*ip),
                port.unwrap_or(DEFAULT_PORT)
            )
        }
        (Host::Name(host), Some(port)) => format!("https://{host}:{port}"),
        (Host::Name(_), None) => return None,
    };
    Some(Destination {
        base_url,
        host_header: as_given.to_owned(),
    })
}

/// What is kept of a host's `.well-known/matrix/server`.
#[derive(Debug, Clone)]
struct WellKnown {
    /// The valid `m.server`, or `None` after a failure.
    delegated: Option<String>,
    fresh_until: Instant,
    lifetime: Duration,
    /// Until when the host counts as having had a valid answer.
    had_valid_until: Option<Instant>,
}

impl WellKnown {
    fn keep_until(&self) -> Instant {
        self.had_valid_until
            .map_or(self.fresh_until, |h| h.max(self.fresh_until))
    }

    fn fresh_at(&self, now: Instant) -> bool {
        now + self.lifetime.mul_f64(GRACE_FACTOR) < self.fresh_until
    }
}

struct KeepUntil;

impl moka::Expiry<String, Arc<WellKnown>> for KeepUntil {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<WellKnown>,
        created_at: Instant,
    ) -> Option<Duration> {
        Some(value.keep_until().saturating_duration_since(created_at))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<WellKnown>,
        updated_at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_until().saturating_duration_since(updated_at))
    }
}

/// Why a `.well-known` fetch gave nothing.
struct Failure {
    /// No answer, a 5xx, or too large: the previous answer, if still valid, is kept.
    transient: bool,
    reason: String,
}

type Flight = Shared<BoxFuture<'static, Result<Destination, Error>>>;

/// Resolutions under way, one per server name.
#[derive(Default)]
struct Flights {
    next_id: u64,
    running: HashMap<String, (u64, Flight)>,
}

/// Server discovery with its caches: cheap to clone, share one per process.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    /// The federation client's user agent, filter and resolver, without its overrides and with
    /// a pool of its own: the well-known is on port 443 of the name whatever SRV says.
    well_known_http: outbound::Client,
    dns: Resolver,
    overrides: Overrides,
    well_known: moka::sync::Cache<String, Arc<WellKnown>>,
    flights: Arc<Mutex<Flights>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Discovery")
    }
}

fn lock(m: &Mutex<Flights>) -> MutexGuard<'_, Flights> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Discovery {
    /// `http` is the federation client: built with a resolver
    /// ([`outbound::Client::builder`]`.resolver(..)`), whose override table discovery fills
    /// and whose filter decides every address, the well-known fetch's included.
    pub fn new(http: outbound::Client) -> Result<Discovery, Error> {
        let setup = |what: &str| {
            Error::Setup(format!(
                "the federation client has no {what}: build it with \
                 outbound::Client::builder(..).resolver(..)"
            ))
        };
        let dns = http
            .resolver()
            .cloned()
            .ok_or_else(|| setup("DNS resolver"))?;
        let overrides = http
            .overrides()
            .cloned()
            .ok_or_else(|| setup("override table"))?;
        let well_known_http = http
            .without_overrides()
            .map_err(|e| Error::Setup(format!("cannot build the well-known client: {e}")))?;
        Ok(Discovery {
            inner: Arc::new(Inner {
                well_known_http,
                dns,
                overrides,
                well_known: moka::sync::Cache::builder()
                    .max_capacity(WELL_KNOWN_ENTRIES)
                    .expire_after(KeepUntil)
                    .build(),
                flights: Arc::default(),
            }),
        })
    }

    /// Where to send requests for `server_name` (which may carry a port: `localhost:8448`).
    pub async fn resolve(&self, server_name: &str) -> Result<Destination, Error> {
        let name = parse_server_name(server_name)?;
        if let Some(dest) = direct(&name, server_name) {
            return Ok(dest);
        }
        let Host::Name(host) = name.host else {
            return Err(Error::Setup(
                "unreachable: IP literals are direct".to_owned(),
            ));
        };
        self.coalesced(host).await
    }

    /// One resolution per host at a time: the first caller starts it as a task of its own (so
    /// it finishes, and leaves the table, even if every caller gives up), the others wait for
    /// the same result.
    async fn coalesced(&self, host: String) -> Result<Destination, Error> {
        let key = host.to_ascii_lowercase();
        let flight = {
            let mut flights = lock(&self.inner.flights);
            if let Some((_, f)) = flights.running.get(&key) {
                f.clone()
            } else {
                let id = flights.next_id;
                flights.next_id = flights.next_id.wrapping_add(1);
                let inner = self.inner.clone();
                let table = self.inner.flights.clone();
                let done_key = key.clone();
                let task = tokio::spawn(async move {
                    let out = inner.resolve_host(&host).await;
                    let mut flights = lock(&table);
                    if flights
                        .running
                        .get(&done_key)
                        .is_some_and(|(i, _)| *i == id)
                    {
                        flights.running.remove(&done_key);
                    }
                    out
                });
                let flight: Flight = async move {
                    task.await.unwrap_or_else(|e| {
                        Err(Error::Setup(format!("the resolution task failed: {e}")))
                    })
                }
                .boxed()
                .shared();
                flights.running.insert(key, (id, flight.clone()));
                flight
            }
        };
        flight.await
    }
}

impl Inner {
    /// Steps 3 and 4 for a host name without a port.
    async fn resolve_host(&self, host: &str) -> Result<Destination, Error> {
        let Some(delegated) = self.well_known(host).await else {
            return self.via_srv(host, host.to_owned()).await;
        };
        let name = parse_server_name(&delegated)?;
        if let Some(dest) = direct(&name, &delegated) {
            return Ok(dest);
        }
        match name.host {
            Host::Name(d) => self.via_srv(&d, d.clone()).await,
            Host::Ip(_) => Err(Error::Setup(
                "unreachable: IP literals are direct".to_owned(),
            )),
        }
    }

    /// SRV `_matrix-fed._tcp`, then `_matrix._tcp`, then port 8448, for `host`.
    async fn via_srv(&self, host: &str, host_header: String) -> Result<Destination, Error> {
        for service in ["_matrix-fed._tcp", "_matrix._tcp"] {
            let srv_name = format!("{service}.{host}");
            let records = self.dns.lookup_srv(&srv_name).await?;
            if records.is_empty() {
                continue;
            }
            if records.iter().all(|r| r.target == ".") {
                return Err(Error::NoService(format!(
                    "{srv_name} says there is no federation service (SRV target `.`)"
                )));
            }
            let mut addrs: Vec<SocketAddr> = Vec::new();
            let mut failures = Vec::new();
            for r in order_srv(records, random_upto) {
                if r.target == "." {
                    continue;
                }
                match self.dns.lookup_ip(&r.target).await {
                    Ok(ips) => {
                        for ip in ips {
                            let a = SocketAddr::new(ip, r.port);
                            if !addrs.contains(&a) {
                                addrs.push(a);
                            }
                        }
                    }
                    Err(e) => failures.push(e.to_string()),
                }
            }
            if addrs.is_empty() {
                let why = if failures.is_empty() {
                    "no address".to_owned()
                } else {
                    failures.join("; ")
                };
                return Err(Error::NoService(format!(
                    "the SRV targets of {srv_name} have no address ({why})"
                )));
            }
            tracing::debug!(%host, service, ?addrs, "federation through SRV");
            self.overrides.set(host, addrs);
            return Ok(Destination {
                base_url: format!("https://{host}"),
                host_header,
            });
        }
        self.overrides.remove(host);
        Ok(Destination {
            base_url: format!("https://{host}:{DEFAULT_PORT}"),
            host_header,
        })
    }

    /// The host's valid `m.server`, from the cache or fetched.
    async fn well_known(&self, host: &str) -> Option<String> {
        let key = host.to_ascii_lowercase();
        let previous = self.well_known.get(&key);
        if let Some(p) = &previous
            && p.fresh_at(Instant::now())
        {
            return p.delegated.clone();
        }
        let fetched = self.fetch_well_known(host).await;
        let now = Instant::now();
        let had_valid_until = previous
            .as_ref()
            .and_then(|p| p.had_valid_until)
            .filter(|h| *h > now);
        let entry = match fetched {
            Ok((delegated, lifetime)) => WellKnown {
                delegated: Some(delegated),
                fresh_until: now + lifetime,
                lifetime,
                had_valid_until: Some(now + lifetime + WELL_KNOWN_REMEMBER_VALID),
            },
            Err(failure) => {
                if let Some(p) = &previous
                    && failure.transient
                    && p.delegated.is_some()
                    && now < p.fresh_until
                {
                    tracing::info!(%host, reason = failure.reason, "keeping the cached .well-known");
                    return p.delegated.clone();
                }
                tracing::info!(%host, reason = failure.reason, "no .well-known/matrix/server");
                let lifetime = jitter(if had_valid_until.is_some() {
                    WELL_KNOWN_DOWN_LIFETIME
                } else {
                    WELL_KNOWN_FAILURE_LIFETIME
                });
                WellKnown {
                    delegated: None,
                    fresh_until: now + lifetime,
                    lifetime,
                    had_valid_until,
                }
            }
        };
        let delegated = entry.delegated.clone();
        self.well_known.insert(key, Arc::new(entry));
        delegated
    }

    async fn fetch_well_known(&self, host: &str) -> Result<(String, Duration), Failure> {
        let url = format!("https://{host}/.well-known/matrix/server");
        let purpose = Purpose {
            total: Some(WELL_KNOWN_TIMEOUT),
            read: WELL_KNOWN_TIMEOUT,
            max_bytes: Some(WELL_KNOWN_MAX_BYTES),
            redirects: WELL_KNOWN_REDIRECTS,
        };
        let transient = |reason: String| Failure {
            transient: true,
            reason,
        };
        let response = self
            .well_known_http
            .send(Method::GET, &url, purpose, |r| r)
            .await
            .map_err(|e| transient(e.to_string()))?;
        let status = response.status();
        if status.is_server_error() {
            return Err(transient(format!("{url}: {status}")));
        }
        if status != StatusCode::OK {
            return Err(Failure {
                transient: false,
                reason: format!("{url}: {status}"),
            });
        }
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| transient(format!("{url}: {e}")))?;
        let delegated = parse_well_known(&body).map_err(|e| Failure {
            transient: false,
            reason: format!("{url}: {e}"),
        })?;
        let lifetime = match cache_lifetime_from_headers(&headers, SystemTime::now()) {
            Some(_) => well_known_lifetime(&headers, SystemTime::now()),
            None => jitter(WELL_KNOWN_DEFAULT_LIFETIME),
        };
        Ok((delegated, lifetime))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use outbound::header::HeaderValue;

    fn name(s: &str) -> ServerName {
        parse_server_name(s).unwrap()
    }

    #[test]
    fn server_names_follow_the_grammar() {
        assert_eq!(
            name("example.org"),
            ServerName {
                host: Host::Name("example.org".into()),
                port: None
            }
        );
        assert_eq!(name("localhost:20448").port, Some(20448));
        assert_eq!(name("1.2.3.4:5").host, Host::Ip("1.2.3.4".parse().unwrap()));
        assert_eq!(name("[::1]").host, Host::Ip("::1".parse().unwrap()));
        assert_eq!(name("[::1]:8448").port, Some(8448));
        assert_eq!(name("[2001:db8::1]:1").port, Some(1));
        for bad in [
            // Digits-only labels that are no IPv4 address name nothing.
            "1.2.3.256",
            "",
            "exa mple.org",
            "example.org:",
            "example.org:123456",
            "example.org:65536",
            "example.org:0",
            "example.org:-1",
            "example.org.",
            ".example.org",
            "a..b",
            "[zz]",
            "[::1",
            "[::1]x",
            "[::1]:",
            "::1",
            "a/b",
            "user@example.org",
            "ex_ample.org",
            "éxample.org",
            &"a".repeat(64),
            &format!("{}.org", "a.".repeat(127)),
        ] {
            assert!(parse_server_name(bad).is_err(), "{bad:?} should be invalid");
        }
        assert!(parse_server_name(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn direct_destinations() {
        let d = |s: &str| direct(&name(s), s);
        assert_eq!(
            d("1.2.3.4"),
            Some(Destination {
                base_url: "https://1.2.3.4:8448".into(),
                host_header: "1.2.3.4".into()
            })
        );
        assert_eq!(d("1.2.3.4:99").unwrap().base_url, "https://1.2.3.4:99");
        assert_eq!(d("1.2.3.4:99").unwrap().host_header, "1.2.3.4:99");
        assert_eq!(d("[::1]").unwrap().base_url, "https://[::1]:8448");
        assert_eq!(d("[::1]").unwrap().host_header, "[::1]");
        assert_eq!(d("[::1]:443").unwrap().base_url, "https://[::1]:443");
        assert_eq!(
            d("example.org:443"),
            Some(Destination {
                base_url: "https://example.org:443".into(),
                host_header: "example.org:443".into()
            })
        );
        assert_eq!(d("example.org"), None);
    }

    #[test]
    fn well_known_bodies() {
        let ok = |b: &str| parse_well_known(b.as_bytes()).unwrap();
        assert_eq!(
            ok(r#"{"m.server": "matrix.example.org:443"}"#),
            "matrix.example.org:443"
        );
        assert_eq!(ok(r#"{"m.server": "[::1]", "other": 1}"#), "[::1]");
        assert_eq!(ok(r#"{"m.server": "1.2.3.4"}"#), "1.2.3.4");
        for bad in [
            "",
            "null",
            "[]",
            r#""m.server""#,
            "{}",
            r#"{"m.server": 1}"#,
            r#"{"m.server": ""}"#,
            r#"{"m.server": "https://matrix.example.org"}"#,
            r#"{"m.server": "matrix.example.org:0"}"#,
            r#"{"m.server": "matrix.example.org"#,
            "\u{feff}{\"m.server\": \"a.b\"}",
        ] {
            let e = parse_well_known(bad.as_bytes()).unwrap_err();
            assert!(matches!(e, Error::InvalidWellKnown(_)), "{bad}: {e}");
        }
        assert!(parse_well_known(&[0xff, 0xfe, 0x00]).is_err());
        let deep = "[".repeat(100_000);
        assert!(parse_well_known(deep.as_bytes()).is_err());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn well_known_lifetimes_follow_the_headers_within_bounds() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let life = |pairs: &[(&str, &str)]| well_known_lifetime(&headers(pairs), now);
        let h = Duration::from_secs(3600);
        assert_eq!(life(&[]), 24 * h);
        assert_eq!(life(&[("cache-control", "max-age=7200")]), 2 * h);
        assert_eq!(
            life(&[("Cache-Control", "public, Max-Age=\"7200\"")]),
            2 * h
        );
        assert_eq!(
            life(&[("cache-control", "max-age=10")]),
            WELL_KNOWN_MIN_LIFETIME
        );
        assert_eq!(
            life(&[("cache-control", "max-age=0")]),
            WELL_KNOWN_MIN_LIFETIME
        );
        assert_eq!(life(&[("cache-control", "max-age=999999999")]), 48 * h);
        assert_eq!(
            life(&[("cache-control", "max-age=7200, no-store")]),
            WELL_KNOWN_MIN_LIFETIME
        );
        // Several headers are one list.
        assert_eq!(
            life(&[
                ("cache-control", "public"),
                ("cache-control", "max-age=7200")
            ]),
            2 * h
        );
        // max-age wins over Expires; a bad max-age falls to Expires.
        assert_eq!(
            life(&[
                ("cache-control", "max-age=7200"),
                ("expires", "Sun, 06 Nov 1994 20:49:37 GMT")
            ]),
            2 * h
        );
        assert_eq!(
            life(&[
                ("cache-control", "max-age=soon"),
                ("expires", "Sun, 06 Nov 1994 20:49:37 GMT")
            ]),
            12 * h
        );
        // The three date formats of RFC 9110 §5.6.7.
        assert_eq!(
            life(&[("expires", "Sunday, 06-Nov-94 11:49:37 GMT")]),
            3 * h
        );
        assert_eq!(life(&[("expires", "Sun Nov  6 12:49:37 1994")]), 4 * h);
        // Past, invalid, or far away.
        assert_eq!(
            life(&[("expires", "Sat, 05 Nov 1994 08:49:37 GMT")]),
            WELL_KNOWN_MIN_LIFETIME
        );
        assert_eq!(life(&[("expires", "0")]), WELL_KNOWN_MIN_LIFETIME);
        assert_eq!(
            life(&[("expires", "Mon, 06 Nov 1995 08:49:37 GMT")]),
            48 * h
        );
        assert_eq!(
            cache_lifetime_from_headers(&headers(&[("expires", "0")]), now),
            Some(Duration::ZERO)
        );
        assert_eq!(cache_lifetime_from_headers(&headers(&[]), now), None);
    }

    fn srv(priority: u16, weight: u16, target: &str) -> SrvRecord {
        SrvRecord {
            priority,
            weight,
            port: 8448,
            target: target.to_owned(),
        }
    }

    #[test]
    fn srv_order_is_priority_then_weighted() {
        let records = vec![srv(20, 0, "c."), srv(10, 1, "a."), srv(10, 3, "b.")];
        let targets = |r: Vec<SrvRecord>| r.into_iter().map(|r| r.target).collect::<Vec<_>>();
        // random 0: the first record of the group whose running weight reaches 0.
        assert_eq!(
            targets(order_srv(records.clone(), |_| 0)),
            ["a.", "b.", "c."]
        );
        // random = total: the last one first.
        assert_eq!(
            targets(order_srv(records.clone(), |n| n)),
            ["b.", "a.", "c."]
        );
        // 2 of 4: past `a` (weight 1), within `b`.
        assert_eq!(
            targets(order_srv(records.clone(), |n| n.min(2))),
            ["b.", "a.", "c."]
        );
        // Weights all zero: in the order given.
        let zero = vec![srv(1, 0, "x."), srv(1, 0, "y.")];
        assert_eq!(targets(order_srv(zero.clone(), |n| n)), ["x.", "y."]);
        assert_eq!(targets(order_srv(zero, random_upto)).len(), 2);
        // Real randomness keeps every record, in priority order.
        for _ in 0..20 {
            let o = targets(order_srv(records.clone(), random_upto));
            assert_eq!(o.len(), 3);
            assert_eq!(o[2], "c.");
        }
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let d = Duration::from_secs(1000);
        for _ in 0..100 {
            let j = jitter(d);
            assert!(
                j >= Duration::from_secs(900) && j <= Duration::from_secs(1100),
                "{j:?}"
            );
        }
    }

    /// A cached delegation (the HTTPS fetch is the main engineer's end-to-end test) goes through
    /// the same SRV steps for the delegated name, with its `Host`.
    #[tokio::test]
    async fn delegations_use_the_delegated_name() {
        let dns = testkit::DnsServer::start();
        dns.add_srv(
            "_matrix-fed._tcp.deleg.test",
            10,
            0,
            8500,
            "target.deleg.test",
        );
        dns.add_a("target.deleg.test", Ipv4Addr::new(127, 0, 0, 81));
        let http = outbound::Client::builder("discovery-unit-test")
            .filter(Arc::new(
                outbound::NetworkFilter::new(&["127.0.0.0/8", "::1/128"], &[] as &[&str]).unwrap(),
            ))
            .resolver(Resolver::nameservers(&[dns.addr()]).unwrap())
            .build()
            .unwrap();
        let discovery = Discovery::new(http.clone()).unwrap();
        let cache = |host: &str, delegated: &str| {
            let now = Instant::now();
            discovery.inner.well_known.insert(
                host.to_owned(),
                Arc::new(WellKnown {
                    delegated: Some(delegated.to_owned()),
                    fresh_until: now + Duration::from_secs(3600),
                    lifetime: Duration::from_secs(3600),
                    had_valid_until: None,
                }),
            );
        };
        cache("a.test", "deleg.test");
        cache("b.test", "nosrv.test");
        cache("c.test", "deleg.test:443");
        cache("d.test", "127.0.0.82");
        cache("e.test", "[::1]:9000");
        let got = discovery.resolve("a.test").await.unwrap();
        assert_eq!(got.base_url, "https://deleg.test");
        assert_eq!(got.host_header, "deleg.test");
        assert_eq!(
            http.overrides().unwrap().get("deleg.test"),
            Some(vec!["127.0.0.81:8500".parse().unwrap()])
        );
        assert_eq!(http.overrides().unwrap().get("a.test"), None);
        let got = discovery.resolve("b.test").await.unwrap();
        assert_eq!(got.base_url, "https://nosrv.test:8448");
        assert_eq!(got.host_header, "nosrv.test");
        let got = discovery.resolve("c.test").await.unwrap();
        assert_eq!(got.base_url, "https://deleg.test:443");
        assert_eq!(got.host_header, "deleg.test:443");
        let got = discovery.resolve("d.test").await.unwrap();
        assert_eq!(got.base_url, "https://127.0.0.82:8448");
        assert_eq!(got.host_header, "127.0.0.82");
        let got = discovery.resolve("e.test").await.unwrap();
        assert_eq!(got.base_url, "https://[::1]:9000");
        assert_eq!(got.host_header, "[::1]:9000");
        // Nothing asked about the original names: the (cached) delegation decided.
        assert_eq!(dns.queries("_matrix-fed._tcp.a.test"), 0);
        assert_eq!(dns.queries_of("_matrix-fed._tcp.deleg.test", "SRV"), 1);
        assert_eq!(dns.queries_of("_matrix-fed._tcp.nosrv.test", "SRV"), 1);
        assert_eq!(dns.queries_of("_matrix._tcp.nosrv.test", "SRV"), 1);
    }

    #[test]
    fn a_stale_entry_is_refetched_before_it_expires() {
        let now = Instant::now();
        let e = WellKnown {
            delegated: None,
            fresh_until: now + Duration::from_secs(100),
            lifetime: Duration::from_secs(1000),
            had_valid_until: Some(now + Duration::from_secs(5000)),
        };
        // 100 s left of 1000: past the grace point (200 s left).
        assert!(!e.fresh_at(now));
        assert!(e.fresh_at(now - Duration::from_secs(200)));
        assert_eq!(e.keep_until(), now + Duration::from_secs(5000));
    }
}
