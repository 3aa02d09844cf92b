//! Name resolution for a [`Client`](crate::Client): a DNS [`Resolver`] (hickory, plain UDP/TCP
//! to the system's or the given name servers, answers cached for their TTL), a table of
//! [`Overrides`] consulted first, and the client's address filter applied to every address
//! either gives.
//!
//! Overrides are how federation reaches an SRV target while the URL keeps the server's name:
//! the URL's host is what TLS sends as SNI and checks the certificate against, and when the URL
//! has no explicit port, hyper connects to the port the resolver returned (hyper-util
//! `client/legacy/connect/http.rs`, `fn set_port`: "Respect explicit ports in the URI, if none,
//! either keep non `0` ports resolved from a custom dns resolver, or use the default port for
//! the scheme"). So `https://example.org/...` with the override
//! `example.org -> [192.0.2.7:8448]` connects to `192.0.2.7:8448` and checks the certificate for
//! `example.org`. An override's addresses carry their port; with an explicit port in the URL,
//! that port wins.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::AddressFilter;

/// A DNS lookup that failed (a name with no such records is not a failure: it gives nothing).
#[derive(Debug, Clone, thiserror::Error)]
#[error("DNS lookup of {name} failed: {reason}")]
pub struct DnsError {
    pub name: String,
    pub reason: String,
}

/// One SRV record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    /// The target host, fully qualified (`host.example.`); `.` means "no service here".
    pub target: String,
}

/// A DNS resolver, cheap to clone (clones share one cache). Answers are cached for their TTL,
/// negative answers for the SOA's negative TTL, in at most 8192 entries (hickory's defaults);
/// concurrent identical queries are sent once.
#[derive(Clone)]
pub struct Resolver {
    inner: hickory_resolver::TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolver")
    }
}

/// Name servers as configured (`ip:port` each); the error names the entry that is not one.
pub fn parse_nameservers(list: &[String]) -> Result<Vec<SocketAddr>, String> {
    list.iter()
        .map(|s| {
            s.parse::<SocketAddr>()
                .map_err(|e| format!("`{s}` (want ip:port): {e}"))
        })
        .collect()
}

impl Resolver {
    /// The system's configuration: name servers and options from `/etc/resolv.conf`, names from
    /// `/etc/hosts` first. `localhost` names are answered with the loopback addresses without
    /// asking anyone (RFC 6761), whatever the configuration.
    pub fn system() -> Result<Resolver, DnsError> {
        let builder = hickory_resolver::TokioResolver::builder_tokio().map_err(|e| DnsError {
            name: "/etc/resolv.conf".to_owned(),
            reason: e.to_string(),
        })?;
        let inner = builder.build().map_err(|e| DnsError {
            name: "/etc/resolv.conf".to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Resolver { inner })
    }

    /// Asks only `servers` (plain DNS, UDP then TCP on truncation, each at its own port), in
    /// that order, with no search domains and no hosts file (`localhost` still gives loopback).
    pub fn nameservers(servers: &[SocketAddr]) -> Result<Resolver, DnsError> {
        if servers.is_empty() {
            return Err(DnsError {
                name: "(no name server)".to_owned(),
                reason: "at least one name server is needed".to_owned(),
            });
        }
        let name_servers = servers
            .iter()
            .map(|s| {
                let mut udp = ConnectionConfig::udp();
                udp.port = s.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = s.port();
                NameServerConfig::new(s.ip(), true, vec![udp, tcp])
            })
            .collect();
        let mut options = ResolverOpts::default();
        options.use_hosts_file = ResolveHosts::Never;
        options.timeout = Duration::from_secs(3);
        options.server_ordering_strategy =
            hickory_resolver::config::ServerOrderingStrategy::UserProvidedOrder;
        let inner = hickory_resolver::TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
        .with_options(options)
        .build()
        .map_err(|e| DnsError {
            name: format!("{servers:?}"),
            reason: e.to_string(),
        })?;
        Ok(Resolver { inner })
    }

    /// The IPv6 and IPv4 addresses of `host` (an IP literal gives itself); empty when it has
    /// none. Nothing is filtered here: the client filters when it connects.
    pub async fn lookup_ip(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        match self.inner.lookup_ip(host).await {
            Ok(found) => Ok(found.iter().collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(failed(host, &e)),
        }
    }

    /// The SRV records of `name` (`_matrix-fed._tcp.example.org`), as answered (not sorted);
    /// empty when there are none. `name` is taken as fully qualified (no search domains).
    pub async fn lookup_srv(&self, name: &str) -> Result<Vec<SrvRecord>, DnsError> {
        let fqdn = if name.ends_with('.') {
            name.to_owned()
        } else {
            format!("{name}.")
        };
        match self.inner.srv_lookup(fqdn.as_str()).await {
            Ok(found) => Ok(found
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SRV(srv) => Some(SrvRecord {
                        priority: srv.priority,
                        weight: srv.weight,
                        port: srv.port,
                        target: srv.target.to_ascii(),
                    }),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(failed(name, &e)),
        }
    }
}

fn failed(name: &str, e: &NetError) -> DnsError {
    DnsError {
        name: name.to_owned(),
        reason: e.to_string(),
    }
}

/// Addresses to connect to for a host name instead of what DNS says, shared between whoever
/// sets them (federation discovery) and the client that connects. Cheap to clone; bounded
/// (least recently used entries go first).
#[derive(Clone)]
pub struct Overrides {
    table: moka::sync::Cache<String, Arc<[SocketAddr]>>,
}

impl std::fmt::Debug for Overrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Overrides({} entries)", self.table.entry_count())
    }
}

impl Default for Overrides {
    fn default() -> Self {
        Overrides::new(10_000)
    }
}

impl Overrides {
    /// A table of at most `capacity` host names.
    pub fn new(capacity: u64) -> Overrides {
        Overrides {
            // LRU, not moka's default TinyLFU: that may refuse a new entry when full, and a
            // name just set must be there when the client connects a moment later.
            table: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .eviction_policy(moka::policy::EvictionPolicy::lru())
                .build(),
        }
    }

    /// From now on, `host` (any case) connects to `addrs` (each with its port).
    pub fn set(&self, host: &str, addrs: Vec<SocketAddr>) {
        self.table.insert(
            host.to_ascii_lowercase(),
            Arc::from(addrs.into_boxed_slice()),
        );
    }

    /// `host` is resolved by DNS again.
    pub fn remove(&self, host: &str) {
        self.table.invalidate(&host.to_ascii_lowercase());
    }

    pub fn get(&self, host: &str) -> Option<Vec<SocketAddr>> {
        self.table
            .get(&host.to_ascii_lowercase())
            .map(|a| a.to_vec())
    }
}

/// A name all of whose addresses the filter refused: nothing was connected to.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refused(pub(crate) String);

/// What a client resolves names with (reqwest calls it for every new connection to a host
/// name; IP literals never reach it).
pub(crate) struct NameResolver {
    pub(crate) filter: Option<Arc<dyn AddressFilter>>,
    /// `None`: the system's `getaddrinfo` (tokio's `lookup_host`).
    pub(crate) dns: Option<Resolver>,
    pub(crate) overrides: Option<Overrides>,
}

impl Resolve for NameResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let filter = self.filter.clone();
        let dns = self.dns.clone();
        let overridden = self.overrides.as_ref().and_then(|o| o.get(name.as_str()));
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = match (overridden, dns) {
                (Some(addrs), _) => addrs,
                (None, Some(dns)) => dns
                    .lookup_ip(&host)
                    .await?
                    .into_iter()
                    .map(|ip| SocketAddr::new(ip, 0))
                    .collect(),
                (None, None) => tokio::net::lookup_host((host.as_str(), 0)).await?.collect(),
            };
            let Some(filter) = filter else {
                if found.is_empty() {
                    return Err(format!("{host} resolves to no address").into());
                }
                return Ok(Box::new(found.into_iter()) as Addrs);
            };
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
                let refused: Box<dyn std::error::Error + Send + Sync> = Box::new(Refused(format!(
                    "{host} resolves to no allowed address ({why})"
                )));
                return Err(refused);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}
