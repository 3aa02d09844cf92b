//! `rateLimit`: requests per second with a burst, and a leaky bucket of bytes downloaded, per
//! client address (the trusted-proxy rules decide the address; IPv6 clients count per /64, which
//! one host owns). Over either, 429 `M_LIMIT_EXCEEDED` with `retry_after_ms`.
//!
//! Memory is bounded: each table holds at most [`CLIENTS`] addresses and forgets one once idle
//! long enough that its bucket would be back to its resting state anyway, so forgetting is exact.
//! Only when more addresses than that are active at once does the least recently seen one go,
//! which makes the limit more lenient for it, never stricter for anyone.

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

use crate::SharedState;

/// Addresses tracked per table, whatever the traffic.
pub(crate) const CLIENTS: u64 = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

pub(crate) struct Limiter {
    requests: Cache<IpAddr, Arc<Mutex<Bucket>>>,
    downloads: Cache<IpAddr, Arc<Mutex<Bucket>>>,
}

impl Limiter {
    pub(crate) fn new(config: &Config) -> Limiter {
        let rl = &config.rate_limit;
        // A request bucket refills within burst / rate; a download bucket drains within
        // capacity / drain rate.
        let refill = Duration::from_secs_f64(
            (f64::from(rl.burst.max(1)) / rl.requests_per_second.max(0.001)).min(86_400.0) + 1.0,
        );
        let d = &rl.buckets.downloads;
        let drain = Duration::from_secs_f64(
            ((d.capacity_bytes + d.overflow_limit_bytes) as f64 * 60.0
                / (d.drain_bytes_per_minute.max(1) as f64))
                .min(7.0 * 86_400.0)
                + 1.0,
        );
        let table = |idle| {
            Cache::builder()
                .max_capacity(CLIENTS)
                .time_to_idle(idle)
                .build()
        };
        Limiter {
            requests: table(refill),
            downloads: table(drain),
        }
    }

    /// One request from `ip`: `Err(wait)` when it is over `requestsPerSecond` with `burst`.
    fn request(&self, config: &Config, ip: IpAddr) -> Result<(), Duration> {
        let rl = &config.rate_limit;
        let rate = rl.requests_per_second.max(0.001);
        let burst = f64::from(rl.burst.max(1));
        let bucket = self.requests.get_with(ip, || {
            Arc::new(Mutex::new(Bucket {
                level: burst,
                at: Instant::now(),
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Here the level is the tokens left.
        b.level = (b.level + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.level >= 1.0 {
            b.level -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.level) / rate))
        }
    }

    /// `bytes` about to be sent to `ip`: `Err(wait)` when its bucket is full, or the download would
    /// overflow it by more than `overflowLimitBytes`; else charged.
    fn download(&self, config: &Config, ip: IpAddr, bytes: u64) -> Result<(), Duration> {
        let d = &config.rate_limit.buckets.downloads;
        let per_sec = d.drain_bytes_per_minute.max(1) as f64 / 60.0;
        let capacity = d.capacity_bytes as f64;
        let most = capacity + d.overflow_limit_bytes as f64;
        let bucket = self.downloads.get_with(ip, || {
            Arc::new(Mutex::new(Bucket {
                level: 0.0,
                at: Instant::now(),
            }))
        });
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Here the level is the bytes in the bucket.
        b.level = (b.level - now.duration_since(b.at).as_secs_f64() * per_sec).max(0.0);
        b.at = now;
        let bytes = bytes as f64;
        // An empty bucket takes any one download (else one larger than the bucket never passes).
        if b.level > 0.0 && (b.level >= capacity || b.level + bytes > most) {
            let target = capacity.min(most - bytes).max(0.0);
            return Err(Duration::from_secs_f64(
                ((b.level - target) / per_sec).max(0.001),
            ));
        }
        b.level += bytes;
        Ok(())
    }
}

/// Whether the request carries a token the config itself grants (the shared secret, an
/// appservice's): those callers are not limited.
fn exempt(config: &Config, parts: &Parts) -> bool {
    let Ok(token) = crate::auth::token(&parts.headers, parts.uri.query()) else {
        return false;
    };
    (config.shared_secret_auth.enabled && token == config.shared_secret_auth.token)
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
        Some(k) if !exempt(&config, &parts) => k,
        _ => return next.run(Request::from_parts(parts, body)).await,
    };
    if let Err(wait) = state.limiter.load().request(&config, key) {
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
        && let Err(wait) = state.limiter.load().download(&config, key, len)
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
    fn a_burst_passes_then_the_rate_decides() {
        let c = config(2.0, 3, 1000, 60, 0);
        let l = Limiter::new(&c);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.request(&c, ip).is_ok());
        }
        let wait = l.request(&c, ip).unwrap_err();
        assert!(
            wait <= Duration::from_millis(500) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Someone else is not affected.
        assert!(l.request(&c, "192.0.2.2".parse().unwrap()).is_ok());
    }

    #[test]
    fn the_download_bucket_fills_overflows_by_at_most_the_limit_and_takes_one_large_file() {
        // 1000 bytes, draining 60 per minute (1 per second), overflow 100.
        let c = config(10.0, 10, 1000, 60, 100);
        let l = Limiter::new(&c);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.download(&c, ip, 900).is_ok());
        // 900 + 250 > 1100: refused, until 50 bytes drained (~50 s).
        let wait = l.download(&c, ip, 250).unwrap_err();
        assert!((49..=50).contains(&wait.as_secs()), "{wait:?}");
        // Within the overflow: accepted; now full.
        assert!(l.download(&c, ip, 150).is_ok());
        assert!(l.download(&c, ip, 1).is_err());
        // An empty bucket takes a file larger than itself.
        assert!(l.download(&c, "192.0.2.9".parse().unwrap(), 5000).is_ok());
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
