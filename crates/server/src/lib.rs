//! The media server: the Matrix media endpoints over the store.
//!
//! Handlers know nothing about file paths (the store's datastores do) and map every failure to the
//! spec's JSON error in one place (`error`). The config is swapped whole on reload (SIGHUP), so a
//! request sees one consistent config from start to end.

mod auth;
mod client;
mod error;
mod headers;
mod media;
mod metrics;
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use config::{Config, Homeserver};

pub use error::ApiError;
pub use serve::{Error, serve};

/// Shared by every request.
pub struct AppState {
    config: ArcSwap<Config>,
    store: store::Store,
    auth: auth::Auth,
    metrics: metrics::Metrics,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(config: Config, store: store::Store) -> Result<AppState, Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("mmrctl/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| Error::Startup(format!("HTTP client: {e}")))?;
        Ok(AppState {
            auth: auth::Auth::new(http, &config),
            config: ArcSwap::from_pointee(config),
            store,
            metrics: metrics::Metrics::new(),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Applies a reloaded config: limits, homeservers, token settings; the token cache is flushed.
    pub fn reload(&self, config: Config) {
        self.auth.reconfigure(&config);
        self.config.store(Arc::new(config));
    }

    pub fn metrics_text(&self) -> String {
        self.metrics.encode(self.store.pool_status())
    }
}

/// The homeserver a request is for, from `Host` (or `X-Forwarded-Host` when `useForwardedHost`).
pub struct Hs(pub Homeserver);

impl FromRequestParts<SharedState> for Hs {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &SharedState,
    ) -> Result<Self, Self::Rejection> {
        let config = state.config();
        let host = request_host(&config, &parts.headers);
        match config.homeserver(&host) {
            Some(hs) => Ok(Hs(hs.clone())),
            None => {
                let known: Vec<&str> = config.homeservers.iter().map(|h| h.name.as_str()).collect();
                Err(ApiError::new(
                    axum::http::StatusCode::NOT_FOUND,
                    "M_UNRECOGNIZED",
                    format!(
                        "This media repository does not serve `{host}` (it serves: {}). The reverse proxy must pass \
                         the homeserver's name in Host or X-Forwarded-Host.",
                        known.join(", ")
                    ),
                ))
            }
        }
    }
}

fn request_host(config: &Config, headers: &HeaderMap) -> String {
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let raw = (config
        .repo
        .use_forwarded_host
        .then(|| header_str("x-forwarded-host"))
        .flatten())
    .and_then(|h| h.split(',').next())
    .or_else(|| header_str("host"))
    .unwrap_or("")
    .trim();
    strip_port(raw).to_ascii_lowercase()
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

/// The client's address: the peer, or the first `X-Forwarded-For` hop when the proxy is trusted.
fn client_ip(config: &Config, parts: &Parts) -> String {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let forwarded = parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(|s| s.trim().to_owned());
    let trust = config.repo.trust_any_forwarded_address
        || peer.as_deref().is_some_and(is_loopback_or_private);
    (if trust { forwarded.or(peer) } else { peer }).unwrap_or_default()
}

fn is_loopback_or_private(ip: &str) -> bool {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(v4)) => v4.is_loopback() || v4.is_private(),
        Ok(std::net::IpAddr::V6(v6)) => v6.is_loopback() || v6.is_unique_local(),
        Err(_) => false,
    }
}

/// The router for the client-facing listener.
pub fn router(state: SharedState) -> Router {
    let media_versions = Router::new()
        .route("/_matrix/media/{version}/upload", post(media::upload))
        .route("/_matrix/media/v1/create", post(media::create))
        .route(
            "/_matrix/media/{version}/upload/{server}/{media_id}",
            put(media::upload_async),
        )
        .route(
            "/_matrix/media/{version}/download/{server}/{media_id}",
            get(media::download_legacy),
        )
        .route(
            "/_matrix/media/{version}/download/{server}/{media_id}/{file_name}",
            get(media::download_legacy_named),
        )
        .route(
            "/_matrix/client/v1/media/download/{server}/{media_id}",
            get(media::download_authenticated),
        )
        .route(
            "/_matrix/client/v1/media/download/{server}/{media_id}/{file_name}",
            get(media::download_authenticated_named),
        )
        .route("/_matrix/media/{version}/config", get(media::media_config))
        .route(
            "/_matrix/client/v1/media/config",
            get(media::media_config_authenticated),
        )
        .route("/_matrix/client/{version}/logout", post(client::logout))
        .route(
            "/_matrix/client/{version}/logout/all",
            post(client::logout_all),
        )
        .route("/_matrix/client/versions", get(client::versions))
        .route("/healthz", get(health).head(health));
    media_versions
        .fallback(|| async { ApiError::unrecognized() })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "Method not allowed",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .with_state(state)
}

async fn health(State(state): State<SharedState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(serde_json::json!({ "ok": true, "status": "ok" })).into_response(),
        Err(e) => ApiError::unavailable(format!("database: {e}"), 5).into_response(),
    }
}

/// Counts requests by route (the matched pattern, not the raw path), method and status.
async fn record_request(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = request.method().clone();
    let response = next.run(request).await;
    let labels = metrics::RequestLabels {
        route: route.clone(),
        method: method_label(&method),
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .latency
        .get_or_create(&metrics::RouteLabels { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

fn method_label(m: &Method) -> String {
    m.as_str().to_owned()
}

/// The router for the metrics listener.
pub fn metrics_router(state: SharedState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(state): State<SharedState>| async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    state.metrics_text(),
                )
            }),
        )
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8448"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8008"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
