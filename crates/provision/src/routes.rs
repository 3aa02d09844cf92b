//! The one route table: which request paths reach the media repo, on which Traefik entrypoints.
//! Docker labels and Traefik file-provider routes are both rendered from it.

use indexmap::IndexMap;
use serde::Serialize;

use crate::settings::Reader;

const LABELS: &str = "matrix_media_repo_container_labels_traefik_";
pub(crate) const SERVICE: &str = "matrix-media-repo";
pub(crate) const METRICS_SERVICE: &str = "matrix-media-repo-metrics";
pub(crate) const HEADERS_MIDDLEWARE: &str = "matrix-media-repo-add-headers";
pub(crate) const METRICS_REPLACE_PATH_MIDDLEWARE: &str = "matrix-media-repo-metrics-replace-path";
pub(crate) const METRICS_BASIC_AUTH_MIDDLEWARE: &str = "matrix-media-repo-metrics-basic-auth";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Client-facing entrypoints, with TLS settings.
    Public,
    /// The playbook's internal client API entrypoint (bridges, bots): no TLS settings.
    Internal,
    /// The federation entrypoint: only while the homeserver federates.
    Federation,
    Metrics,
}

/// Router name, variable group, side, and whether it exists only while the token cache is on (the
/// media repo must see logouts to drop cached tokens).
const ROUTERS: &[(&str, &str, Side, bool)] = &[
    (
        "matrix-media-repo-public-media",
        "media_",
        Side::Public,
        false,
    ),
    (
        "matrix-media-repo-public-client-matrix-client-media",
        "client_matrix_client_media_",
        Side::Public,
        false,
    ),
    (
        "matrix-media-repo-internal-media",
        "internal_media_",
        Side::Internal,
        false,
    ),
    (
        "matrix-media-repo-internal-matrix-client-media",
        "internal_matrix_client_media_",
        Side::Internal,
        false,
    ),
    (
        "matrix-media-repo-public-logout",
        "logout_",
        Side::Public,
        true,
    ),
    (
        "matrix-media-repo-public-admin",
        "admin_",
        Side::Public,
        false,
    ),
    (
        "matrix-media-repo-public-t2bot",
        "t2bot_",
        Side::Public,
        false,
    ),
    (
        "matrix-media-repo-metrics",
        "metrics_",
        Side::Metrics,
        false,
    ),
    (
        "matrix-media-repo-public-media-federation",
        "media_federation_",
        Side::Federation,
        false,
    ),
    (
        "matrix-media-repo-public-federation-matrix-federation-media",
        "federation_matrix_federation_media_",
        Side::Federation,
        false,
    ),
    (
        "matrix-media-repo-public-logout-federation",
        "logout_federation_",
        Side::Federation,
        true,
    ),
    (
        "matrix-media-repo-public-admin-federation",
        "admin_federation_",
        Side::Federation,
        false,
    ),
    (
        "matrix-media-repo-public-t2bot-federation",
        "t2bot_federation_",
        Side::Federation,
        false,
    ),
];

/// One Traefik router.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub name: String,
    pub rule: String,
    /// 0 leaves Traefik's default (longest rule first).
    pub priority: i64,
    pub entrypoints: Vec<String>,
    /// `Some(cert resolver)` when the router terminates TLS.
    pub tls: Option<String>,
    pub middlewares: Vec<String>,
    pub service: String,
    pub side: Side,
    /// The prefix of this router's variables (`…_rule`, `…_entrypoints`).
    pub variables: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    pub name: String,
    /// The container port (labels).
    pub port: u16,
    /// Where a Traefik outside the container network reaches the native service (file provider).
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct RouteTable {
    pub enabled: bool,
    pub docker_network: String,
    pub services: Vec<Service>,
    /// Request headers the proxy sets (by default `X-Forwarded-Host: <server name>`).
    pub request_headers: IndexMap<String, String>,
    pub metrics_path: String,
    pub metrics_basic_auth_users: Option<String>,
    pub routes: Vec<Route>,
    /// Extra label lines the operator asked for, verbatim.
    pub additional_labels: String,
}

impl RouteTable {
    pub(crate) fn from_vars(r: &mut Reader<'_>, config: &config::Config) -> RouteTable {
        let mut table = RouteTable {
            enabled: r.bool(&format!("{LABELS}enabled")).unwrap_or(false),
            docker_network: r
                .string(&format!("{LABELS}docker_network"))
                .unwrap_or_default(),
            additional_labels: r
                .string("matrix_media_repo_container_labels_additional_labels")
                .unwrap_or_default(),
            metrics_path: "/metrics".to_owned(),
            ..RouteTable::default()
        };
        table.services = vec![
            Service {
                name: SERVICE.to_owned(),
                port: config.repo.port,
                url: r
                    .string("matrix_media_repo_traefik_service_url")
                    .unwrap_or_default(),
            },
            Service {
                name: METRICS_SERVICE.to_owned(),
                port: config.metrics.port,
                url: r
                    .string("matrix_media_repo_traefik_metrics_service_url")
                    .unwrap_or_default(),
            },
        ];
        table.request_headers = r
            .get(
                &format!("{LABELS}additional_request_headers"),
                "a mapping of header names to values",
            )
            .unwrap_or_default();
        if r.bool(&format!("{LABELS}metrics_middleware_basic_auth_enabled"))
            .unwrap_or(false)
        {
            table.metrics_basic_auth_users =
                r.string(&format!("{LABELS}metrics_middleware_basic_auth_users"));
        }
        // Computed even when Traefik's labels are off: the nginx and Caddy outputs use them too.
        let federation = r
            .bool("matrix_media_repo_homeserver_federation_enabled")
            .unwrap_or(true);
        let token_cache = r
            .int("matrix_media_repo_access_tokens_max_cache_time_seconds")
            .unwrap_or(0)
            > 0;
        for (name, group, side, needs_token_cache) in ROUTERS {
            if (*side == Side::Federation && !federation) || (*needs_token_cache && !token_cache) {
                continue;
            }
            let v = |suffix: &str| format!("{LABELS}{group}{suffix}");
            if !r.bool(&v("enabled")).unwrap_or(false) {
                continue;
            }
            let entrypoints: Vec<String> = r
                .string(&v("entrypoints"))
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            let tls = match side {
                Side::Internal => None,
                _ if r.bool(&v("tls")).unwrap_or(false) => {
                    Some(r.string(&v("tls_certResolver")).unwrap_or_default())
                }
                _ => None,
            };
            let (service, middlewares) = if *side == Side::Metrics {
                let mut m = vec![METRICS_REPLACE_PATH_MIDDLEWARE.to_owned()];
                if table.metrics_basic_auth_users.is_some() {
                    m.push(METRICS_BASIC_AUTH_MIDDLEWARE.to_owned());
                }
                (METRICS_SERVICE, m)
            } else if table.request_headers.is_empty() {
                (SERVICE, Vec::new())
            } else {
                (SERVICE, vec![HEADERS_MIDDLEWARE.to_owned()])
            };
            table.routes.push(Route {
                name: (*name).to_owned(),
                rule: r.string(&v("rule")).unwrap_or_default(),
                priority: r.int(&v("priority")).unwrap_or(0),
                entrypoints,
                tls,
                middlewares,
                service: service.to_owned(),
                side: *side,
                variables: v(""),
            });
        }
        table
    }
}
