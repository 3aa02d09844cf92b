//! [`NetworkFilter`]: which addresses may be connected to, as lists of networks, with the
//! semantics of matrix-media-repo's `urlPreviews.disallowedNetworks` / `allowedNetworks`: an
//! address is refused when it is in any disallowed network, else allowed only when it is in an
//! allowed network.
//!
//! Before matching, an address is seen as what it reaches:
//!
//! - an IPv4-mapped (`::ffff:a.b.c.d`) or IPv4-compatible (`::a.b.c.d`) IPv6 address *is* that
//!   IPv4 address (a dual-stack socket connecting to `::ffff:10.0.0.1` reaches `10.0.0.1`), as
//!   Go's `net.IPNet.Contains` treats it in MMR;
//! - a 6to4 (`2002::/16`), Teredo (`2001::/32`) or NAT64 address (the well-known prefix
//!   `64:ff9b::/96`, and the network-specific `/96` prefixes configured with
//!   [`NetworkFilter::with_nat64`]) is matched itself *and* by the IPv4 address it embeds
//!   (Teredo embeds two, the server's and the client's: both must be allowed), since a relay
//!   would carry the packet to that IPv4 address.
//!
//! Whatever the lists say, these are never connected to: unspecified addresses (`0.0.0.0/8`,
//! `::`), the broadcast address and multicast (`224.0.0.0/4`, `ff00::/8`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::AddressFilter;

/// Networks refused to federation by default: Synapse's `DEFAULT_IP_RANGE_BLOCKLIST`
/// (`synapse/config/server.py`) plus `240.0.0.0/4` (reserved, "future use"; includes the
/// broadcast address). Loopback is in it: a test federating on loopback allows it explicitly.
pub const FEDERATION_DISALLOWED: &[&str] = &[
    "127.0.0.0/8",     // loopback
    "10.0.0.0/8",      // RFC 1918
    "172.16.0.0/12",   // RFC 1918
    "192.168.0.0/16",  // RFC 1918
    "100.64.0.0/10",   // carrier-grade NAT (RFC 6598)
    "192.0.0.0/24",    // IETF protocol assignments
    "169.254.0.0/16",  // link-local
    "192.88.99.0/24",  // formerly 6to4 relay anycast
    "198.18.0.0/15",   // benchmarking (RFC 2544)
    "192.0.2.0/24",    // documentation (TEST-NET-1)
    "198.51.100.0/24", // documentation (TEST-NET-2)
    "203.0.113.0/24",  // documentation (TEST-NET-3)
    "224.0.0.0/4",     // multicast
    "240.0.0.0/4",     // reserved
    "::1/128",         // loopback
    "fe80::/10",       // link-local
    "fc00::/7",        // unique local addresses
    "2001:db8::/32",   // documentation
    "ff00::/8",        // multicast
    "fec0::/10",       // site-local (deprecated)
];

/// Every address is allowed unless disallowed.
pub const ALLOW_ALL: &[&str] = &["0.0.0.0/0", "::/0"];

/// A network list entry that is not a network.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{entry}` is not a network (CIDR such as `10.0.0.0/8` or `fc00::/7`, or one address)")]
pub struct BadNetwork {
    pub entry: String,
}

/// Reads one network: CIDR notation, where host bits may be set (`127.0.0.1/8`, as MMR's
/// defaults write it, is `127.0.0.0/8`), or one address (a `/32` or `/128`). An IPv4-mapped
/// IPv6 network (`::ffff:10.0.0.0/104`) is read as the IPv4 network it maps.
pub fn parse_network(entry: &str) -> Result<IpNet, BadNetwork> {
    let text = entry.trim();
    let bad = || BadNetwork {
        entry: entry.to_owned(),
    };
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|_| bad())?
    } else {
        IpNet::from(text.parse::<IpAddr>().map_err(|_| bad())?)
    };
    Ok(normalise_net(net))
}

fn normalise_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96)
                .map(|n| IpNet::V4(n.trunc()))
                .unwrap_or(IpNet::V6(v6.trunc())),
            None => IpNet::V6(v6.trunc()),
        },
        other => other.trunc(),
    }
}

/// Addresses refused when in any `disallowed` network, else allowed when in an `allowed` one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkFilter {
    allowed: Vec<IpNet>,
    disallowed: Vec<IpNet>,
    /// Network-specific NAT64 prefixes (`/96`), beside the well-known one.
    nat64: Vec<Ipv6Net>,
}

impl NetworkFilter {
    /// From the lists as configured; the error names the first entry that is not a network.
    pub fn new<A: AsRef<str>, D: AsRef<str>>(
        allowed: &[A],
        disallowed: &[D],
    ) -> Result<NetworkFilter, BadNetwork> {
        let read = |list: &[&str]| -> Result<Vec<IpNet>, BadNetwork> {
            list.iter().map(|e| parse_network(e)).collect()
        };
        let allowed: Vec<&str> = allowed.iter().map(AsRef::as_ref).collect();
        let disallowed: Vec<&str> = disallowed.iter().map(AsRef::as_ref).collect();
        Ok(NetworkFilter {
            allowed: read(&allowed)?,
            disallowed: read(&disallowed)?,
            nat64: Vec::new(),
        })
    }

    /// The network's NAT64 prefixes (RFC 6052 `/96`s, as the operator's DNS64 uses them): an
    /// address in one is also judged by the IPv4 address it carries. The error names the first
    /// entry that is not a `/96` IPv6 network.
    pub fn with_nat64<P: AsRef<str>>(
        mut self,
        prefixes: &[P],
    ) -> Result<NetworkFilter, BadNetwork> {
        for p in prefixes {
            let entry = p.as_ref();
            match entry.trim().parse::<Ipv6Net>() {
                Ok(net) if net.prefix_len() == 96 => self.nat64.push(net.trunc()),
                _ => {
                    return Err(BadNetwork {
                        entry: entry.to_owned(),
                    });
                }
            }
        }
        Ok(self)
    }

    /// From networks already read.
    pub fn from_networks(allowed: Vec<IpNet>, disallowed: Vec<IpNet>) -> NetworkFilter {
        NetworkFilter {
            allowed: allowed.into_iter().map(normalise_net).collect(),
            disallowed: disallowed.into_iter().map(normalise_net).collect(),
            nat64: Vec::new(),
        }
    }

    /// For federation: like Synapse, everything public, nothing private or special
    /// ([`FEDERATION_DISALLOWED`]; allowed: [`ALLOW_ALL`]).
    pub fn federation_defaults() -> NetworkFilter {
        Self::builtin(ALLOW_ALL, FEDERATION_DISALLOWED)
    }

    fn builtin(allowed: &[&str], disallowed: &[&str]) -> NetworkFilter {
        // The built-in lists are tested to parse; a bad entry would only be dropped.
        let read = |list: &[&str]| list.iter().filter_map(|e| parse_network(e).ok()).collect();
        NetworkFilter {
            allowed: read(allowed),
            disallowed: read(disallowed),
            nat64: Vec::new(),
        }
    }

    pub fn allowed(&self) -> &[IpNet] {
        &self.allowed
    }

    pub fn disallowed(&self) -> &[IpNet] {
        &self.disallowed
    }

    /// Why `ip` is refused, if it is.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(ip);
        if let Some(kind) = always_refused(ip) {
            return Err(Refusal::Special(kind));
        }
        if let Some(net) = self.disallowed.iter().find(|n| n.contains(&ip)) {
            return Err(Refusal::Disallowed(*net));
        }
        if let IpAddr::V6(v6) = ip {
            for (how, v4) in embedded_ipv4(v6, &self.nat64) {
                if let Err(why) = self.check(IpAddr::V4(v4)) {
                    return Err(Refusal::Embedded {
                        how,
                        ip: v4,
                        why: Box::new(why),
                    });
                }
            }
        }
        if self.allowed.iter().any(|n| n.contains(&ip)) {
            Ok(())
        } else {
            Err(Refusal::NotAllowed)
        }
    }
}

impl AddressFilter for NetworkFilter {
    fn refuses(&self, ip: IpAddr) -> Option<String> {
        self.check(ip).err().map(|r| r.to_string())
    }
}

/// A [`NetworkFilter`] with rules for the URLs themselves, for requests whose URL a user chose
/// (URL previews): a port other than the scheme's default is refused unless listed, and so is a
/// URL with credentials in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlFilter {
    pub networks: NetworkFilter,
    pub ports: Vec<u16>,
}

impl AddressFilter for UrlFilter {
    fn refuses(&self, ip: IpAddr) -> Option<String> {
        self.networks.refuses(ip)
    }

    fn refuses_url(&self, url: &url::Url) -> Option<String> {
        if !url.username().is_empty() || url.password().is_some() {
            return Some("URLs with credentials in them are not fetched".to_owned());
        }
        // `Url` drops a port that is the scheme's default: what remains is another one.
        match url.port() {
            Some(port) if !self.ports.contains(&port) => Some(format!(
                "port {port} is not allowed (only the scheme's default, and those listed in allowedPorts)"
            )),
            _ => None,
        }
    }
}

/// Why an address is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Unspecified, broadcast or multicast: refused whatever the lists say.
    Special(&'static str),
    /// In this disallowed network.
    Disallowed(IpNet),
    /// In no allowed network.
    NotAllowed,
    /// The IPv4 address an IPv6 address embeds is refused.
    Embedded {
        how: &'static str,
        ip: Ipv4Addr,
        why: Box<Refusal>,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Special(kind) => write!(f, "{kind} addresses are never connected to"),
            Refusal::Disallowed(net) => write!(f, "in the disallowed network {net}"),
            Refusal::NotAllowed => f.write_str("in no allowed network"),
            Refusal::Embedded { how, ip, why } => {
                write!(f, "a {how} address for {ip}, which is refused: {why}")
            }
        }
    }
}

/// An IPv4-mapped or IPv4-compatible IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            // IPv4-compatible (`::a.b.c.d`, RFC 4291 §2.5.5.1); `::` and `::1` are IPv6's own.
            if s[..6].iter().all(|&x| x == 0) && (s[6] != 0 || s[7] > 1) {
                let [.., a, b, c, d] = v6.octets();
                return IpAddr::V4(Ipv4Addr::new(a, b, c, d));
            }
            IpAddr::V6(v6)
        }
        v4 => v4,
    }
}

fn always_refused(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("unspecified (0.0.0.0/8)"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V4(v4) if v4.is_multicast() => Some("multicast"),
        IpAddr::V6(v6) if v6.is_unspecified() => Some("unspecified"),
        IpAddr::V6(v6) if v6.is_multicast() => Some("multicast"),
        _ => None,
    }
}

/// The IPv4 addresses a 6to4, Teredo or NAT64 address carries packets to.
fn embedded_ipv4(v6: Ipv6Addr, nat64: &[Ipv6Net]) -> Vec<(&'static str, Ipv4Addr)> {
    let o = v6.octets();
    let s = v6.segments();
    let v4 = |a: &[u8]| Ipv4Addr::new(a[0], a[1], a[2], a[3]);
    if s[0] == 0x2002 {
        // 6to4 (RFC 3056): 2002:AABB:CCDD::/48.
        vec![("6to4", v4(&o[2..6]))]
    } else if s[0] == 0x2001 && s[1] == 0 {
        // Teredo (RFC 4380 §4): the server's address, then the client's, bits inverted.
        let client: Vec<u8> = o[12..16].iter().map(|b| !b).collect();
        vec![
            ("Teredo (server)", v4(&o[4..8])),
            ("Teredo (client)", v4(&client)),
        ]
    } else if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] || nat64.iter().any(|n| n.contains(&v6)) {
        // NAT64 (RFC 6052): the well-known 64:ff9b::/96, or the network's own /96.
        vec![("NAT64", v4(&o[12..16]))]
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn refused(f: &NetworkFilter, s: &str) -> bool {
        f.refuses(ip(s)).is_some()
    }

    #[test]
    fn builtin_lists_parse() {
        for list in [FEDERATION_DISALLOWED, ALLOW_ALL] {
            for e in list {
                parse_network(e).unwrap();
            }
        }
        let f = NetworkFilter::federation_defaults();
        assert_eq!(f.disallowed().len(), FEDERATION_DISALLOWED.len());
        assert_eq!(f.allowed().len(), 2);
    }

    #[test]
    fn networks_are_normalised() {
        assert_eq!(
            parse_network("127.0.0.1/8").unwrap().to_string(),
            "127.0.0.0/8"
        );
        assert_eq!(
            parse_network(" fe80::1/64 ").unwrap().to_string(),
            "fe80::/64"
        );
        assert_eq!(
            parse_network("10.1.2.3").unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(parse_network("::1").unwrap().to_string(), "::1/128");
        assert_eq!(
            parse_network("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "example.org",
            "::1/129",
            "1.2.3.4/x",
        ] {
            let e = NetworkFilter::new(&["0.0.0.0/0", bad], &["10.0.0.0/8"]).unwrap_err();
            assert_eq!(e.entry, bad);
            assert!(e.to_string().contains(&format!("`{bad}`")), "{e}");
        }
        let e = NetworkFilter::new(&["0.0.0.0/0"], &["10.0.0.0/8", "nope"]).unwrap_err();
        assert_eq!(e.entry, "nope");
    }

    #[test]
    fn federation_defaults_refuse_private_and_special_ranges() {
        let f = NetworkFilter::federation_defaults();
        for bad in [
            "127.0.0.1",
            "127.255.255.254",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254", // cloud metadata
            "192.0.0.8",
            "192.88.99.1",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.2.1",
            "198.51.100.1",
            "203.0.113.1",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "::",
            "::1",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "2001:db8::1",
            "ff02::1",
            "fec0::1",
        ] {
            assert!(refused(&f, bad), "{bad} should be refused");
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "192.169.0.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2a00:1450:4001::1",
            "2606:4700::1111",
            "fe00::1", // not link-local (fe80::/10), not ULA
        ] {
            assert!(!refused(&f, good), "{good} should be allowed");
        }
    }

    #[test]
    fn mapped_and_compatible_addresses_are_their_ipv4() {
        let f = NetworkFilter::federation_defaults();
        for bad in [
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::10.0.0.1",
            "::127.0.0.1",
            "::ffff:0.0.0.0",
            "::ffff:255.255.255.255",
            "::ffff:224.0.0.1",
        ] {
            assert!(refused(&f, bad), "{bad} should be refused");
        }
        assert!(!refused(&f, "::ffff:1.1.1.1"));
        assert!(!refused(&f, "::8.8.8.8"));
        // `::1` stays IPv6 loopback (not 0.0.0.1), refused as such.
        assert_eq!(
            f.check(ip("::1")),
            Err(Refusal::Disallowed("::1/128".parse().unwrap()))
        );
        // A filter that allows IPv4 loopback allows its mapped form too, and the reverse.
        let lo = NetworkFilter::new(&["127.0.0.0/8"], &[] as &[&str]).unwrap();
        assert!(!refused(&lo, "::ffff:127.0.0.1"));
        assert!(refused(&lo, "::1"));
        let mapped_net = NetworkFilter::new(ALLOW_ALL, &["::ffff:10.0.0.0/104"]).unwrap();
        assert!(refused(&mapped_net, "10.9.9.9"));
    }

    #[test]
    fn tunnel_addresses_are_checked_by_the_ipv4_they_embed() {
        let f = NetworkFilter::federation_defaults();
        // 6to4 of 10.0.0.1, 127.0.0.1, 192.168.1.1; of 8.8.8.8 allowed.
        assert!(refused(&f, "2002:a00:1::1"));
        assert!(refused(&f, "2002:7f00:1::"));
        assert!(refused(&f, "2002:c0a8:101::1"));
        assert!(!refused(&f, "2002:808:808::1"));
        // Teredo: server 65.54.227.120, client 10.0.0.1 (inverted: f5ff:fffe).
        assert!(refused(&f, "2001:0:4136:e378:8000:63bf:f5ff:fffe"));
        // client 8.8.8.8 (f7f7:f7f7), public server: allowed.
        assert!(!refused(&f, "2001:0:4136:e378:8000:63bf:f7f7:f7f7"));
        // server in a private network.
        assert!(refused(&f, "2001:0:a00:1:8000:63bf:f7f7:f7f7"));
        // NAT64 of 192.168.0.1 and of 1.1.1.1.
        assert!(refused(&f, "64:ff9b::c0a8:1"));
        assert!(!refused(&f, "64:ff9b::101:101"));
        let why = f.refuses(ip("2002:a00:1::1")).unwrap();
        assert!(why.contains("6to4") && why.contains("10.0.0.1"), "{why}");
    }

    #[test]
    fn special_addresses_are_refused_whatever_the_lists_say() {
        let open = NetworkFilter::new(ALLOW_ALL, &[] as &[&str]).unwrap();
        for bad in [
            "0.0.0.0",
            "0.255.0.1",
            "255.255.255.255",
            "224.0.0.251",
            "::",
            "ff05::2",
            "::ffff:0.0.0.0",
            "::ffff:239.1.1.1",
            "2002:e000:1::", // 6to4 of 224.0.0.1
        ] {
            assert!(refused(&open, bad), "{bad} should be refused");
        }
        assert!(!refused(&open, "127.0.0.1"));
        assert!(!refused(&open, "10.0.0.1"));
    }

    #[test]
    fn disallowed_wins_and_allowed_is_required() {
        let f = NetworkFilter::new(&["10.0.0.0/8", "::1/128"], &["10.1.0.0/16"]).unwrap();
        assert!(!refused(&f, "10.2.3.4"));
        assert!(!refused(&f, "::1"));
        assert_eq!(
            f.check(ip("10.1.2.3")),
            Err(Refusal::Disallowed("10.1.0.0/16".parse().unwrap()))
        );
        assert_eq!(f.check(ip("1.1.1.1")), Err(Refusal::NotAllowed));
        assert_eq!(f.check(ip("2606:4700::1")), Err(Refusal::NotAllowed));
        let none = NetworkFilter::new(&[] as &[&str], &[] as &[&str]).unwrap();
        assert!(refused(&none, "1.1.1.1"));
    }
}
