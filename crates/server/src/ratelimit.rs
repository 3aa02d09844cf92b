//! `rateLimit`: requests per second with a burst, and a leaky bucket of bytes downloaded, per
//! client address (the trusted-proxy rules decide the address; IPv6 clients count per /64, which
//! one host owns). Over either, 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`.
//!
//! The buckets are shared by every instance (`store::shared`: Redis when configured, else
//! Postgres). When that store does not answer, this instance's own buckets decide until it
//! does, so a limit then holds per instance instead of failing requests.
//!
//! Memory of the local buckets is bounded: each table holds at most [`CLIENTS`] addresses and
//! forgets one once idle long enough that its bucket would be empty anyway, so forgetting is
//! exact. Only when more addresses than that are active at once does the least recently seen one
//! go, which makes the limit more lenient for it, never stricter for anyone.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use config::Config;
use moka::sync::Cache;
use serde_json::json;
use store::shared::Rule;

use crate::SharedState;

/// Addresses tracked per table, whatever the traffic.
pub(crate) const CLIENTS: u64 = 65_536;

/// How long a request waits for the shared bucket (a busy database pool, a slow Redis) before
/// this instance's bucket decides.
const SHARED_PATIENCE: Duration = Duration::from_millis(200);

/// When a local bucket is empty again.
type Bucket = Arc<Mutex<Instant>>;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Requests,
    Downloads,
}

impl Kind {
    fn key(self, ip: IpAddr) -> String {
        match self {
            Kind::Requests => format!("rl:requests:{ip}"),
            Kind::Downloads => format!("rl:downloads:{ip}"),
        }
    }
}

pub(crate) struct Limiter {
    requests: Cache<IpAddr, Bucket>,
    downloads: Cache<IpAddr, Bucket>,
}

impl Limiter {
    pub(crate) fn new(config: &Config) -> Limiter {
        let rl = &config.rate_limit;
        let d = &rl.buckets.downloads;
        // An idle bucket is empty within its fullest backlog.
        let idle =
            |rule: Rule| Duration::from_secs_f64((rule.most_ms / 1000.0).min(7.0 * 86_400.0) + 1.0);
        let table = |idle| {
            Cache::builder()
                .max_capacity(CLIENTS)
                .time_to_idle(idle)
                .build()
        };
        Limiter {
            requests: table(idle(Rule::request(rl.requests_per_second, rl.burst))),
            downloads: table(idle(Rule::bytes(
                0,
                d.drain_bytes_per_minute,
                d.capacity_bytes,
                d.overflow_limit_bytes,
            ))),
        }
    }

    /// Charges this instance's bucket of `ip`: `Err(wait)` when over.
    fn charge_local(&self, kind: Kind, ip: IpAddr, rule: &Rule) -> Result<(), Duration> {
        let table = match kind {
            Kind::Requests => &self.requests,
            Kind::Downloads => &self.downloads,
        };
        let bucket = table.get_with(ip, || Arc::new(Mutex::new(Instant::now())));
        let mut empty_at = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let backlog = empty_at.saturating_duration_since(now).as_secs_f64() * 1000.0;
        let backlog = rule.charge(backlog)?;
        *empty_at = now + Duration::from_secs_f64(backlog / 1000.0);
        Ok(())
    }
}

/// Charges the bucket of `ip` shared by the instances, or this instance's when the shared one
/// cannot be reached.
async fn charge(state: &SharedState, kind: Kind, ip: IpAddr, rule: Rule) -> Result<(), Duration> {
    let key = kind.key(ip);
    let shared = state.media.store().charge_shared(&key, &rule);
    match tokio::time::timeout(SHARED_PATIENCE, shared).await {
        Ok(Ok(charged)) => charged,
        unavailable => {
            if let Ok(Err(e)) = unavailable {
                tracing::debug!(error = %e, "shared rate-limit bucket unavailable; this instance's decides");
            }
            state.limiter.load().charge_local(kind, ip, &rule)
        }
    }
}

fn request_rule(config: &Config) -> Rule {
    let rl = &config.rate_limit;
    Rule::request(rl.requests_per_second, rl.burst)
}

fn download_rule(config: &Config, bytes: u64) -> Rule {
    let d = &config.rate_limit.buckets.downloads;
    Rule::bytes(
        bytes,
        d.drain_bytes_per_minute,
        d.capacity_bytes,
        d.overflow_limit_bytes,
    )
}

/// Whether the request carries a token the config itself grants (the shared secret, an
/// appservice's) or one recently found to be a repo admin's: those callers are not limited.
fn exempt(state: &SharedState, config: &Config, parts: &Parts) -> bool {
    let Ok(token) = crate::auth::token(&parts.headers, parts.uri.query()) else {
        return false;
    };
    (config.shared_secret_auth.enabled && token == config.shared_secret_auth.token)
        || state.auth.is_known_admin(&token)
        || config
            .access_tokens
            .appservices
            .iter()
            .any(|a| a.as_token == token)
}

/// The key of a client: its address, an IPv6 one cut to its /64.
fn client_key(ip: &str) -> Option<IpAddr> {
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => Some(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                Some(IpAddr::V6(std::net::Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
        },
        v4 => Some(v4),
    }
}

fn limited(wait: Duration) -> Response {
    let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut response = (
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({
            "errcode": "M_LIMIT_EXCEEDED",
            "error": "Too many requests; try again later",
            "retry_after_ms": ms,
        })),
    )
        .into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(&ms.div_ceil(1000).to_string()) {
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, v);
    }
    response
}

/// The middleware: requests counted before the handler runs; a download's bytes (its
/// `Content-Length`) charged before its body is sent, and refused instead when over.
/// Federation requests (other servers, authenticated) are not limited.
pub(crate) async fn rate_limit(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let config = state.config();
    if !config.rate_limit.enabled {
        return next.run(request).await;
    }
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    if route.starts_with("/_matrix/federation/") || route == "/healthz" {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let key = client_key(&crate::extract::client_ip(&config, &parts));
    let key = match key {
        Some(k) if !exempt(&state, &config, &parts) => k,
        _ => return next.run(Request::from_parts(parts, body)).await,
    };
    if let Err(wait) = charge(&state, Kind::Requests, key, request_rule(&config)).await {
        return limited(wait);
    }
    let response = next.run(Request::from_parts(parts, body)).await;
    let is_download = route.contains("/download/");
    if is_download
        && response.status().is_success()
        && let Some(len) = response
            .headers()
            .get(axum::http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        && let Err(wait) = charge(&state, Kind::Downloads, key, download_rule(&config, len)).await
    {
        // Nothing of the body was sent: dropping it costs nothing.
        return limited(wait);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(rps: f64, burst: u32, capacity: u64, drain: u64, overflow: u64) -> Config {
        let mut c = Config::default();
        c.rate_limit.enabled = true;
        c.rate_limit.requests_per_second = rps;
        c.rate_limit.burst = burst;
        c.rate_limit.buckets.downloads.capacity_bytes = capacity;
        c.rate_limit.buckets.downloads.drain_bytes_per_minute = drain;
        c.rate_limit.buckets.downloads.overflow_limit_bytes = overflow;
        c
    }

    #[test]
    fn local_buckets_are_per_address_and_kind() {
        let c = config(2.0, 3, 1000, 60, 100);
        let l = Limiter::new(&c);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(
                l.charge_local(Kind::Requests, ip, &request_rule(&c))
                    .is_ok()
            );
        }
        let wait = l
            .charge_local(Kind::Requests, ip, &request_rule(&c))
            .unwrap_err();
        assert!(
            wait <= Duration::from_millis(500) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Someone else, and the same client's downloads, are not affected.
        let other = "192.0.2.2".parse().unwrap();
        assert!(
            l.charge_local(Kind::Requests, other, &request_rule(&c))
                .is_ok()
        );
        assert!(
            l.charge_local(Kind::Downloads, ip, &download_rule(&c, 900))
                .is_ok()
        );
        assert!(
            l.charge_local(Kind::Downloads, ip, &download_rule(&c, 250))
                .is_err()
        );
    }

    #[test]
    fn ipv6_clients_count_per_64_and_mapped_addresses_as_ipv4() {
        assert_eq!(
            client_key("2001:db8:1:2:aaaa::1"),
            client_key("2001:db8:1:2:bbbb::2")
        );
        assert_ne!(client_key("2001:db8:1:2::1"), client_key("2001:db8:1:3::1"));
        assert_eq!(client_key("::ffff:192.0.2.1"), client_key("192.0.2.1"));
        assert_eq!(client_key(""), None);
    }
}
