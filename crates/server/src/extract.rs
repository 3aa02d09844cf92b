//! What handlers extract from a request: the homeserver it is for (from `Host`, the request
//! target or a trusted proxy's `X-Forwarded-Host`), the client's address, the authenticated user,
//! the API version in the path.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use config::{Config, Homeserver};

use crate::SharedState;
use crate::auth::User;
use crate::error::ApiError;

/// The homeserver a request is for, in `config`.
fn homeserver(config: &Config, parts: &Parts) -> Result<Homeserver, ApiError> {
    let host = request_host(config, parts)?;
    match served_homeserver(config, &host) {
        Some(hs) => Ok(hs.clone()),
        None => {
            // Which names are served is the operator's business: logged, not answered.
            tracing::debug!(%host, "request for a homeserver not served here");
            Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "M_UNRECOGNIZED",
                format!(
                    "This media repository does not serve `{host}`. The reverse proxy must pass the \
                     homeserver's name in Host or X-Forwarded-Host."
                ),
            ))
        }
    }
}

/// The name of the homeserver a request is for, when it is one served here.
pub(crate) fn served_name(config: &Config, parts: &Parts) -> Option<String> {
    let host = request_host(config, parts).ok()?;
    served_homeserver(config, &host).map(|hs| hs.name.clone())
}

/// The homeserver name a request is for: `X-Forwarded-Host` when `useForwardedHost` and the peer
/// is a proxy we trust, else the authority of an absolute-form target (which wins over `Host`, RFC
/// 9112 3.2.2), else `Host`.
fn request_host(config: &Config, parts: &Parts) -> Result<String, ApiError> {
    let headers = &parts.headers;
    if headers.get_all(axum::http::header::HOST).iter().count() > 1 {
        return Err(ApiError::bad_request(
            "The request has more than one Host header",
        ));
    }
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let forwarded = (config.repo.use_forwarded_host && trusts_forwarding(config, parts))
        .then(|| header_str("x-forwarded-host"))
        .flatten()
        .and_then(|h| h.split(',').next());
    let authority = parts
        .uri
        .authority()
        .and_then(|a| a.as_str().rsplit('@').next());
    let raw = forwarded
        .or(authority)
        .or_else(|| header_str("host"))
        .unwrap_or("")
        .trim();
    Ok(raw.to_ascii_lowercase())
}

/// The homeserver `host` (as the request names it, port included) stands for: the one named
/// exactly so (a server name may carry a port: `localhost:20448`), else, the port left out, one whose
/// name has no port (`example.org` behind a proxy that passes `example.org:8448`).
fn served_homeserver<'a>(config: &'a Config, host: &str) -> Option<&'a Homeserver> {
    let named = |name: &str| {
        config
            .homeservers
            .iter()
            .find(|hs| hs.name.eq_ignore_ascii_case(name))
    };
    named(host).or_else(|| {
        let bare = strip_port(host);
        (bare != host)
            .then(|| named(bare))
            .flatten()
            .filter(|hs| strip_port(&hs.name) == hs.name)
    })
}

fn peer(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Whether the peer is a proxy whose forwarding headers we believe: any peer with
/// `trustAnyForwardedAddress`, else loopback and private addresses.
fn trusts_forwarding(config: &Config, parts: &Parts) -> bool {
    config.repo.trust_any_forwarded_address || peer(parts).is_some_and(is_loopback_or_private)
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..=h.len()]);
    }
    host.rsplit_once(':')
        .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// The client's address: the peer, or when the peer is a trusted proxy, the nearest
/// `X-Forwarded-For` hop that is not a trusted proxy itself (proxies append to what the client
/// sent, so hops left of that are the client's own claims). A hop that is not an address ends the
/// walk; a proxy may add a port.
pub(crate) fn client_ip(config: &Config, parts: &Parts) -> String {
    let peer = peer(parts);
    let forwarded = || {
        let header = parts.headers.get("x-forwarded-for")?.to_str().ok()?;
        let mut nearest = None;
        for hop in header.rsplit(',').map(str::trim) {
            let Ok(ip) = hop
                .parse::<IpAddr>()
                .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
            else {
                break;
            };
            nearest = Some(ip);
            if !is_loopback_or_private(ip) {
                break;
            }
        }
        nearest
    };
    trusts_forwarding(config, parts)
        .then(forwarded)
        .flatten()
        .or(peer)
        .map(|ip| ip.to_string())
        .unwrap_or_default()
}

fn is_loopback_or_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_private(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unique_local(),
    }
}

/// A request's config snapshot (one config from start to end, whatever a reload does), its
/// homeserver and the client's address.
pub(crate) struct Ctx {
    pub(crate) config: Arc<Config>,
    pub(crate) hs: Homeserver,
    pub(crate) client_ip: String,
}

impl FromRequestParts<SharedState> for Ctx {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        // One snapshot for everything the request decides.
        let config = state.config();
        let hs = homeserver(&config, parts)?;
        let client_ip = client_ip(&config, parts);
        Ok(Ctx {
            config,
            hs,
            client_ip,
        })
    }
}

impl Ctx {
    /// The user the request's token belongs to, a user of the request's homeserver.
    pub(crate) async fn authenticate(
        &self,
        state: &SharedState,
        parts: &Parts,
        allow_guests: bool,
    ) -> Result<User, ApiError> {
        state
            .auth
            .authenticate(
                &self.config,
                &self.hs,
                &parts.headers,
                parts.uri.query(),
                &self.client_ip,
                allow_guests,
                &state.metrics,
            )
            .await
    }
}

/// A request with its authenticated user, a user of the request's homeserver (guests only where
/// `GUESTS`).
pub(crate) struct Authed<const GUESTS: bool> {
    pub(crate) ctx: Ctx,
    pub(crate) user: User,
}

impl<const GUESTS: bool> FromRequestParts<SharedState> for Authed<GUESTS> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let ctx = Ctx::from_request_parts(parts, state).await?;
        let user = ctx.authenticate(state, parts, GUESTS).await?;
        Ok(Authed { ctx, user })
    }
}

/// The `{version}` of the path, one of those `ALLOWED` lists (`r0`, `v1`, `v3` as bits 1, 2, 4);
/// any other is an unknown endpoint, refused before anything else is looked at.
pub(crate) struct Version<const ALLOWED: u8>;

pub(crate) const R0: u8 = 1;
pub(crate) const V1: u8 = 2;
pub(crate) const V3: u8 = 4;

impl<const ALLOWED: u8> FromRequestParts<SharedState> for Version<ALLOWED> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|_| ApiError::unrecognized())?;
        let bit = match params.iter().find(|(k, _)| *k == "version").map(|(_, v)| v) {
            Some("r0") => R0,
            Some("v1") => V1,
            Some("v3") => V3,
            _ => 0,
        };
        if bit & ALLOWED == 0 {
            return Err(ApiError::unrecognized());
        }
        Ok(Version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(request: axum::http::request::Builder) -> Parts {
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_homeserver_comes_from_forwarded_host_then_absolute_target_then_host() {
        let mut config = Config::default();
        let from = |peer: &str, uri: &str, headers: &[(&str, &str)]| {
            let mut b = axum::http::Request::get(uri);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let mut p = parts(b);
            p.extensions
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
            p
        };
        let request = |uri: &str, headers: &[(&str, &str)]| from("127.0.0.1:1", uri, headers);
        let host = |c: &Config, p: &Parts| request_host(c, p).map_err(|e| e.status.as_u16());
        // A client that is no proxy of ours names no homeserver in X-Forwarded-Host.
        let p = from(
            "198.51.100.1:1",
            "/x",
            &[("Host", "a.test"), ("X-Forwarded-Host", "c.test")],
        );
        assert_eq!(host(&config, &p), Ok("a.test".to_owned()));
        let p = request("/x", &[("Host", "A.test:8008")]);
        assert_eq!(host(&config, &p), Ok("a.test:8008".to_owned()));
        let p = request("http://b.test/x", &[("Host", "a.test")]);
        assert_eq!(host(&config, &p), Ok("b.test".to_owned()), "RFC 9112 3.2.2");
        let p = request("http://user@b.test:81/x", &[("Host", "a.test")]);
        assert_eq!(host(&config, &p), Ok("b.test:81".to_owned()));
        let p = request(
            "http://b.test/x",
            &[("Host", "a.test"), ("X-Forwarded-Host", "c.test, d.test")],
        );
        assert_eq!(host(&config, &p), Ok("c.test".to_owned()));
        config.repo.use_forwarded_host = false;
        assert_eq!(host(&config, &p), Ok("b.test".to_owned()));
        let p = request("/x", &[("Host", "a.test"), ("Host", "b.test")]);
        assert_eq!(host(&config, &p), Err(400));
    }

    #[test]
    fn forwarded_addresses_are_believed_only_from_trusted_peers_and_only_as_addresses() {
        let mut config = Config::default();
        let ip = |c: &Config, peer: &str, xff: Option<&str>| {
            let mut b = axum::http::Request::get("/x");
            if let Some(v) = xff {
                b = b.header("X-Forwarded-For", v);
            }
            let mut p = parts(b);
            p.extensions
                .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
            client_ip(c, &p)
        };
        assert_eq!(
            ip(&config, "127.0.0.1:5", Some("203.0.113.7, 10.0.0.1")),
            "203.0.113.7"
        );
        assert_eq!(
            ip(&config, "10.1.2.3:5", Some("203.0.113.7:4711")),
            "203.0.113.7"
        );
        assert_eq!(
            ip(&config, "[::1]:5", Some("[2001:db8::1]:80")),
            "2001:db8::1"
        );
        assert_eq!(
            ip(&config, "127.0.0.1:5", Some("2001:db8::2")),
            "2001:db8::2"
        );
        for junk in ["not an address", "", "203.0.113.7\tx", "@evil"] {
            assert_eq!(
                ip(&config, "127.0.0.1:5", Some(junk)),
                "127.0.0.1",
                "{junk:?}"
            );
        }
        assert_eq!(ip(&config, "127.0.0.1:5", None), "127.0.0.1");
        // A public peer's header is its own claim.
        assert_eq!(
            ip(&config, "198.51.100.9:5", Some("203.0.113.7")),
            "198.51.100.9"
        );
        config.repo.trust_any_forwarded_address = true;
        assert_eq!(
            ip(&config, "198.51.100.9:5", Some("203.0.113.7")),
            "203.0.113.7"
        );
    }

    #[test]
    fn server_names_with_a_port_are_matched_with_it() {
        let mut config = Config::default();
        for name in ["example.org", "localhost:20448", "[::1]:8448"] {
            config.homeservers.push(Homeserver {
                name: name.to_owned(),
                cs_api: "http://127.0.0.1:9".to_owned(),
                backoff_at: 10,
                admin_api_kind: config::AdminApiKind::Synapse,
                signing_key_path: String::new(),
            });
        }
        let served = |host: &str| served_homeserver(&config, host).map(|hs| hs.name.as_str());
        assert_eq!(served("example.org"), Some("example.org"));
        assert_eq!(
            served("EXAMPLE.org:8448"),
            Some("example.org"),
            "a port the name lacks"
        );
        assert_eq!(served("localhost:20448"), Some("localhost:20448"));
        assert_eq!(served("localhost"), None, "the port is part of that name");
        assert_eq!(served("localhost:20449"), None);
        assert_eq!(served("[::1]:8448"), Some("[::1]:8448"));
        assert_eq!(served("[::1]"), None);
        assert_eq!(served("other.org"), None);
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8448"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8008"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
