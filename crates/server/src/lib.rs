//! The media server: the Matrix media endpoints over the store.
//!
//! Handlers know nothing about file paths (the store's datastores do) and map every failure to the
//! spec's JSON error in one place (`error`). The config is swapped whole on reload (SIGHUP), so a
//! request sees one consistent config from start to end.

mod auth;
mod client;
mod conn;
mod error;
mod headers;
mod media;
mod metrics;
mod serve;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::extract::{ConnectInfo, FromRequestParts, MatchedPath, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
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
        let host = request_host(&config, parts)?;
        match config.homeserver(&host) {
            Some(hs) => Ok(Hs(hs.clone())),
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
}

/// The homeserver name a request is for: `X-Forwarded-Host` when `useForwardedHost`, else the
/// authority of an absolute-form target (which wins over `Host`, RFC 9112 3.2.2), else `Host`.
fn request_host(config: &Config, parts: &Parts) -> Result<String, ApiError> {
    let headers = &parts.headers;
    if headers.get_all(axum::http::header::HOST).iter().count() > 1 {
        return Err(ApiError::bad_request(
            "The request has more than one Host header",
        ));
    }
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let forwarded = config
        .repo
        .use_forwarded_host
        .then(|| header_str("x-forwarded-host"))
        .flatten()
        .and_then(|h| h.split(',').next());
    let raw = forwarded
        .or_else(|| parts.uri.host())
        .or_else(|| header_str("host"))
        .unwrap_or("")
        .trim();
    Ok(strip_port(raw).to_ascii_lowercase())
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

/// The client's address: the peer, or the first `X-Forwarded-For` hop when the proxy is trusted
/// and that hop is an address (a proxy may add a port; anything else is not believed).
fn client_ip(config: &Config, parts: &Parts) -> String {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let trust = config.repo.trust_any_forwarded_address || peer.is_some_and(is_loopback_or_private);
    let forwarded = || {
        let first = parts
            .headers
            .get("x-forwarded-for")?
            .to_str()
            .ok()?
            .split(',')
            .next()?
            .trim();
        first
            .parse::<IpAddr>()
            .or_else(|_| first.parse::<SocketAddr>().map(|s| s.ip()))
            .ok()
    };
    trust
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

/// The router for the client-facing listener.
pub fn router(state: SharedState) -> Router {
    let routes = Router::new()
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
    routes
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
        .layer(axum::middleware::from_fn(cors))
        .with_state(state)
}

/// CORS as the client-server spec asks, on every response (errors included), and `OPTIONS`
/// answered on every path: browser clients preflight each authenticated request.
async fn cors(request: Request, next: Next) -> Response {
    use axum::http::{HeaderValue, StatusCode, header};
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("X-Requested-With, Content-Type, Authorization, Date"),
    );
    response
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

    fn parts(request: axum::http::request::Builder) -> Parts {
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_homeserver_comes_from_forwarded_host_then_absolute_target_then_host() {
        let mut config = Config::default();
        let request = |uri: &str, headers: &[(&str, &str)]| {
            let mut b = axum::http::Request::get(uri);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            parts(b)
        };
        let host = |c: &Config, p: &Parts| request_host(c, p).map_err(|e| e.status.as_u16());
        let p = request("/x", &[("Host", "A.test:8008")]);
        assert_eq!(host(&config, &p), Ok("a.test".to_owned()));
        let p = request("http://b.test/x", &[("Host", "a.test")]);
        assert_eq!(host(&config, &p), Ok("b.test".to_owned()), "RFC 9112 3.2.2");
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
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8448"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8008"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }
}
