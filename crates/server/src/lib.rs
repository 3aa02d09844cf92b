//! The media server's HTTP side: routes, extractors, response headers, errors, connections. What
//! an operation means lives in the `media` service; this crate maps HTTP onto it, one module per
//! API surface (`client_media` for the client media API, `client` for the other client endpoints
//! the repo answers for the homeserver).
//!
//! Every failure a client sees is mapped to the spec's JSON error in one place (`error`). The
//! config is swapped whole on reload (SIGHUP), so a request sees one consistent config from start
//! to end.

mod admin;
mod auth;
mod client;
mod client_media;
mod conn;
mod error;
mod extract;
mod federation_media;
mod headers;
mod metrics;
mod peer;
mod previews;
mod range;
mod ratelimit;
mod serve;
mod thumbnails;

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use config::Config;

pub use error::ApiError;
pub use serve::{Error, serve};

/// Shared by every request.
pub struct AppState {
    config: ArcSwap<Config>,
    media: media::Service,
    auth: auth::Auth,
    /// The origins' keys, for requests other servers sign.
    keyring: federation::keyring::Keyring,
    metrics: metrics::Metrics,
    /// Homeserver admins, as their homeservers said.
    admin_checks: admin::AdminChecks,
    /// `rateLimit`'s buckets, rebuilt on reload.
    limiter: ArcSwap<ratelimit::Limiter>,
    /// For the admin API's federation test.
    federation: federation::Client,
    /// `X-Mmrctl-Instance` on every response: tells a webserver's routing (and `mmrctl doctor`)
    /// which instance answered, and that it was the media repo and not the homeserver.
    instance: axum::http::HeaderValue,
}

/// The response header that names the instance that answered.
pub const INSTANCE_HEADER: &str = "x-mmrctl-instance";

pub type SharedState = Arc<AppState>;

const USER_AGENT: &str = concat!("mmrctl/", env!("CARGO_PKG_VERSION"));

impl AppState {
    pub fn new(config: Config, store: store::Store) -> Result<AppState, Error> {
        let http = outbound::Client::new(USER_AGENT, None)
            .map_err(|e| Error::Startup(format!("HTTP client: {e}")))?;
        let federation = federation_client(&config)?;
        let signers = media::load_signers(&config).map_err(Error::Startup)?;
        let keyring = federation::keyring::Keyring::new(federation.clone());
        let media = media::Service::with_federation(
            store,
            federation.clone(),
            signers,
            usize::try_from(config.downloads.num_workers).unwrap_or(1),
            media::thumbnail_workers(&config),
            usize::try_from(config.url_previews.num_workers).unwrap_or(1),
        );
        if config.url_previews.enabled {
            media.configure_previews(
                media::PreviewSetup::new(&config, USER_AGENT).map_err(Error::Startup)?,
            );
        }
        Ok(AppState {
            auth: auth::Auth::new(http, &config),
            limiter: ArcSwap::from_pointee(ratelimit::Limiter::new(&config)),
            keyring,
            media,
            config: ArcSwap::from_pointee(config),
            metrics: metrics::Metrics::new(),
            admin_checks: admin::AdminChecks::new(),
            federation,
            instance: instance_name(),
        })
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Applies a reloaded config: limits, homeservers, token settings; the token cache is flushed.
    pub fn reload(&self, config: Config) {
        self.auth.reconfigure(&config);
        match media::load_signers(&config) {
            Ok(signers) => self.media.reconfigure(signers),
            Err(e) => {
                tracing::error!(error = %e, "signing keys not reloaded; the previous ones stay in use")
            }
        }
        if config.url_previews.enabled {
            match media::PreviewSetup::new(&config, USER_AGENT) {
                Ok(setup) => self.media.configure_previews(setup),
                Err(e) => {
                    tracing::error!(error = %e, "URL preview settings not reloaded; the previous ones stay in use")
                }
            }
        }
        self.limiter
            .store(Arc::new(ratelimit::Limiter::new(&config)));
        self.config.store(Arc::new(config));
    }

    pub fn metrics_text(&self) -> String {
        self.metrics.encode(
            self.media.store().pool_status(),
            metrics::ServiceCounts {
                thumbnails_generated: self.media.thumbnails_generated(),
                previews_fetched: self.media.previews_fetched(),
                thumbnails_made: self.media.thumbnails_made(),
                remote_downloads: self.media.remote_downloads(),
                previews_made: self.media.previews_made(),
            },
        )
    }
}

/// The router for the client-facing listener.
pub fn router(state: SharedState) -> Router {
    use client_media as m;
    let routes = Router::new()
        .route("/_matrix/media/{version}/upload", post(m::upload))
        .route("/_matrix/media/v1/create", post(m::create))
        .route(
            "/_matrix/media/{version}/upload/{server}/{media_id}",
            put(m::upload_async),
        )
        .route(
            "/_matrix/media/{version}/download/{server}/{media_id}",
            get(m::download_legacy),
        )
        .route(
            "/_matrix/media/{version}/download/{server}/{media_id}/{file_name}",
            get(m::download_legacy),
        )
        .route(
            "/_matrix/client/v1/media/download/{server}/{media_id}",
            get(m::download_authenticated),
        )
        .route(
            "/_matrix/client/v1/media/download/{server}/{media_id}/{file_name}",
            get(m::download_authenticated),
        )
        .route(
            "/_matrix/media/{version}/thumbnail/{server}/{media_id}",
            get(thumbnails::thumbnail_legacy),
        )
        .route(
            "/_matrix/client/v1/media/thumbnail/{server}/{media_id}",
            get(thumbnails::thumbnail_authenticated),
        )
        .route(
            "/_matrix/federation/v1/media/download/{media_id}",
            get(federation_media::download),
        )
        .route(
            "/_matrix/federation/v1/media/thumbnail/{media_id}",
            get(federation_media::thumbnail),
        )
        .route(
            "/_matrix/media/{version}/preview_url",
            get(previews::preview_legacy),
        )
        .route(
            "/_matrix/client/v1/media/preview_url",
            get(previews::preview_authenticated),
        )
        .route("/_matrix/media/{version}/config", get(m::config_legacy))
        .route("/_matrix/client/v1/media/config", get(m::config))
        .route("/_matrix/client/{version}/logout", post(client::logout))
        .route(
            "/_matrix/client/{version}/logout/all",
            post(client::logout_all),
        )
        .route("/_matrix/client/versions", get(client::versions))
        .route("/healthz", get(health).head(health))
        .nest("/_matrix/media/unstable/admin", admin::routes())
        .nest(
            "/_matrix/media/unstable/io.t2bot.media/admin",
            admin::routes(),
        )
        .nest("/_matrix/client/{version}", admin::synapse_routes())
        .nest(
            "/_matrix/client/unstable/io.t2bot.media",
            admin::synapse_routes(),
        );
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
            ratelimit::rate_limit,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_request,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            common_headers,
        ))
        .with_state(state)
}

/// A random id per process, told apart from other instances' without naming the host.
fn instance_name() -> axum::http::HeaderValue {
    use std::hash::{BuildHasher as _, Hasher as _};
    // `RandomState` is seeded from the OS's randomness for each process.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    axum::http::HeaderValue::from_str(&format!("{:016x}", hasher.finish()))
        .unwrap_or(axum::http::HeaderValue::from_static("mmrctl"))
}

/// The instance marker, and CORS as the client-server spec asks, on every response (errors
/// included), with `OPTIONS` answered on every path: browser clients preflight each
/// authenticated request.
async fn common_headers(
    State(state): State<SharedState>,
    request: Request,
    next: Next,
) -> Response {
    use axum::http::{HeaderValue, StatusCode, header};
    let mut response = if request.method() == Method::OPTIONS {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(INSTANCE_HEADER, state.instance.clone());
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
    match state.media.store().ping().await {
        Ok(()) => Json(serde_json::json!({ "ok": true, "status": "ok" })).into_response(),
        Err(e) => ApiError::unavailable(format!("database: {e}"), 5).into_response(),
    }
}

/// Counts requests by route (the matched pattern, not the raw path), method and status, and by
/// homeserver and action as matrix-media-repo does.
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
    let (parts, body) = request.into_parts();
    let host = extract::served_name(&state.config.load(), &parts);
    let response = next.run(Request::from_parts(parts, body)).await;
    state.metrics.observe_request(
        host,
        route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
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

/// The federation client: its addresses filtered by `federation.allowedNetworks` /
/// `disallowedNetworks` (built-in lists when unset), names resolved with `federation.nameservers`
/// (else the system's configuration), and server discovery on top.
fn federation_client(config: &Config) -> Result<federation::Client, Error> {
    let setup = |what: &str, e: &dyn std::fmt::Display| Error::Startup(format!("{what}: {e}"));
    let fed = &config.federation;
    let defaults = outbound::NetworkFilter::federation_defaults();
    let networks = |key: &str, list: &Option<Vec<String>>, default: &[_]| match list {
        None => Ok(default.to_vec()),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(i, entry)| {
                outbound::filter::parse_network(entry)
                    .map_err(|e| setup(&format!("federation.{key}[{i}]"), &e))
            })
            .collect::<Result<Vec<_>, _>>(),
    };
    let filter = outbound::NetworkFilter::from_networks(
        networks("allowedNetworks", &fed.allowed_networks, defaults.allowed())?,
        networks(
            "disallowedNetworks",
            &fed.disallowed_networks,
            defaults.disallowed(),
        )?,
    );
    let dns = if fed.nameservers.is_empty() {
        outbound::Resolver::system().map_err(|e| setup("DNS (/etc/resolv.conf)", &e))?
    } else {
        let servers = outbound::parse_nameservers(&fed.nameservers)
            .map_err(|e| setup("federation.nameservers", &e))?;
        outbound::Resolver::nameservers(&servers)
            .map_err(|e| setup("federation.nameservers", &e))?
    };
    let http = outbound::Client::builder(USER_AGENT)
        .filter(Arc::new(filter))
        .resolver(dns)
        .build()
        .map_err(|e| setup("federation HTTP client", &e))?;
    let discovery = federation::discovery::Discovery::new(http.clone())
        .map_err(|e| setup("server discovery", &e))?;
    federation::Client::new(http, discovery).map_err(|e| setup("federation HTTP client", &e))
}
