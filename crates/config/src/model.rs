//! Sections in matrix-media-repo's order. Every struct defaults to upstream's code defaults.

use serde::{Deserialize, Serialize};

use crate::Datastore;

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Config {
    pub repo: Repo,
    pub federation: Federation,
    pub database: Database,
    pub homeservers: Vec<Homeserver>,
    pub access_tokens: AccessTokens,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub admins: Vec<String>,
    pub shared_secret_auth: SharedSecretAuth,
    pub datastores: Vec<Datastore>,
    pub archiving: Archiving,
    pub uploads: Uploads,
    pub downloads: Downloads,
    pub url_previews: UrlPreviews,
    pub thumbnails: Thumbnails,
    pub rate_limit: RateLimit,
    pub identicons: Identicons,
    pub quarantine: Quarantine,
    pub timeouts: Timeouts,
    pub metrics: Metrics,
    pub plugins: Vec<Plugin>,
    /// Upstream has no unstable features; the key is accepted and kept empty.
    #[serde(skip_serializing)]
    pub feature_support: serde_norway::Value,
    pub redis: Redis,
    pub sentry: Sentry,
    pub tasks: Tasks,
    pub pgo: Pgo,
    /// mmrctl's own section (matrix-media-repo ignores it): how clients may hold connections.
    pub connections: Connections,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Repo {
    pub bind_address: String,
    pub port: u16,
    /// `-` disables file logging.
    pub log_directory: String,
    pub log_colors: bool,
    pub json_logs: bool,
    pub log_level: String,
    pub trust_any_forwarded_address: bool,
    /// `X-Forwarded-Host` replaces `Host` when choosing the homeserver.
    pub use_forwarded_host: bool,
    /// New media is served only on the authenticated (MSC3916) endpoints.
    pub freeze_unauthenticated_media: bool,
}

impl Default for Repo {
    fn default() -> Self {
        Repo {
            bind_address: "127.0.0.1".into(),
            port: 8000,
            log_directory: "logs".into(),
            log_colors: false,
            json_logs: false,
            log_level: "info".into(),
            trust_any_forwarded_address: false,
            use_forwarded_host: true,
            freeze_unauthenticated_media: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Federation {
    /// Consecutive failures (not 404s) after which a remote server is not asked for a while.
    pub backoff_at: u32,
    /// Servers whose media is never fetched and whose requests are refused.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored_hosts: Vec<String>,
    /// mmrctl: which addresses federation requests may connect to, with `urlPreviews`'
    /// semantics (refused when in a disallowed network, else allowed when in an allowed one).
    /// Unset: the built-in lists (public addresses only, as Synapse's `ip_range_blacklist`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_networks: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disallowed_networks: Option<Vec<String>>,
    /// mmrctl: DNS servers (`ip:port`) for federation lookups (SRV, A/AAAA); empty uses
    /// `/etc/resolv.conf` and `/etc/hosts`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

impl Federation {
    /// Whether `server_name` is in `ignoredHosts`, whatever port either names (`evil.example:8448`
    /// is `evil.example`).
    pub fn is_ignored(&self, server_name: &str) -> bool {
        let host = |name: &str| -> String {
            let host = match name.strip_prefix('[') {
                Some(rest) => rest.split(']').next().unwrap_or(rest),
                None => name.rsplit_once(':').map_or(name, |(h, _)| h),
            };
            host.trim_end_matches('.').to_ascii_lowercase()
        };
        let wanted = host(server_name);
        self.ignored_hosts.iter().any(|h| host(h) == wanted)
    }
}

impl Default for Federation {
    fn default() -> Self {
        Federation {
            backoff_at: 20,
            ignored_hosts: Vec::new(),
            allowed_networks: None,
            disallowed_networks: None,
            nameservers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Database {
    /// A libpq connection URL, `postgres://user:password@host:port/name?sslmode=...`.
    pub postgres: String,
    pub pool: Pool,
}

impl Default for Database {
    fn default() -> Self {
        Database {
            postgres:
                "postgres://your_username:your_password@localhost/database_name?sslmode=disable"
                    .into(),
            pool: Pool::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Pool {
    pub max_connections: u32,
    pub max_idle_connections: u32,
}

impl Default for Pool {
    fn default() -> Self {
        Pool {
            max_connections: 25,
            max_idle_connections: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminApiKind {
    Synapse,
    Dendrite,
    #[default]
    Matrix,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Homeserver {
    /// The server name (it may carry a port); requests are matched to it by `Host` (or a trusted
    /// proxy's `X-Forwarded-Host`): with the port when the name has one, else whatever the port.
    pub name: String,
    /// How the media repo reaches the homeserver's client-server API.
    pub cs_api: String,
    #[serde(default = "default_hs_backoff")]
    pub backoff_at: u32,
    #[serde(default)]
    pub admin_api_kind: AdminApiKind,
    /// The media repo's own signing key (MMR PEM format), for outbound federation requests.
    #[serde(default)]
    pub signing_key_path: String,
}

fn default_hs_backoff() -> u32 {
    10
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct AccessTokens {
    /// 0 disables the cache.
    pub max_cache_time_seconds: u64,
    pub use_local_appservice_config: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub appservices: Vec<Appservice>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Appservice {
    pub id: String,
    pub as_token: String,
    pub sender_user_id: String,
    #[serde(default)]
    pub user_namespaces: Vec<Namespace>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Namespace {
    pub regex: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct SharedSecretAuth {
    pub enabled: bool,
    pub token: String,
}

impl Default for SharedSecretAuth {
    fn default() -> Self {
        SharedSecretAuth {
            enabled: false,
            token: "ReplaceMe".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Archiving {
    pub enabled: bool,
    pub self_service: bool,
    pub target_bytes_per_part: u64,
}

impl Default for Archiving {
    fn default() -> Self {
        Archiving {
            enabled: true,
            self_service: false,
            target_bytes_per_part: 209_715_200,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Uploads {
    /// 0 disables the limit.
    pub max_bytes: u64,
    pub min_bytes: u64,
    /// What `/config` reports: 0 means `maxBytes`, -1 means unlimited.
    pub reported_max_bytes: i64,
    /// Pending MSC2246 `/create`s per user.
    pub max_pending: u32,
    /// How long an MSC2246 media id may stay pending.
    pub max_age_seconds: u64,
    pub quotas: Quotas,
}

impl Default for Uploads {
    fn default() -> Self {
        Uploads {
            max_bytes: 104_857_600,
            min_bytes: 100,
            reported_max_bytes: 0,
            max_pending: 5,
            max_age_seconds: 1800,
            quotas: Quotas::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Quotas {
    pub enabled: bool,
    /// The first entry whose glob matches the user id applies.
    pub users: Vec<UserQuota>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserQuota {
    pub glob: String,
    /// 0 means no limit (likewise below).
    #[serde(default)]
    pub max_bytes: u64,
    #[serde(default)]
    pub max_pending: u32,
    #[serde(default)]
    pub max_files: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Downloads {
    pub max_bytes: u64,
    pub num_workers: u32,
    pub failure_cache_minutes: u32,
    pub expire_after_days: u32,
    pub default_range_chunk_size_bytes: u64,
}

impl Default for Downloads {
    fn default() -> Self {
        Downloads {
            max_bytes: 104_857_600,
            num_workers: 10,
            failure_cache_minutes: 15,
            expire_after_days: 0,
            default_range_chunk_size_bytes: 10_485_760,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct UrlPreviews {
    pub enabled: bool,
    pub max_page_size_bytes: u64,
    pub preview_unsafe_certificates: bool,
    pub num_words: u32,
    pub max_length: u32,
    pub num_title_words: u32,
    pub max_title_length: u32,
    pub file_preview_types: Vec<String>,
    pub num_workers: u32,
    pub disallowed_networks: Vec<String>,
    pub allowed_networks: Vec<String>,
    pub expire_after_days: u32,
    pub default_language: String,
    pub user_agent: String,
    #[serde(rename = "oEmbed")]
    pub o_embed: bool,
    /// mmrctl: an oEmbed provider list in oembed.com's `providers.json` format, used instead of
    /// the one shipped in the binary.
    #[serde(
        rename = "oEmbedProvidersFile",
        skip_serializing_if = "Option::is_none"
    )]
    pub o_embed_providers_file: Option<String>,
    /// mmrctl: ports URLs may name besides their scheme's default (80, 443).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allowed_ports: Vec<u16>,
    /// mmrctl: redirects followed per fetch, each target checked as the first URL.
    #[serde(skip_serializing_if = "is_five")]
    pub max_redirects: u32,
    /// mmrctl: the network's NAT64 `/96` prefixes (beside `64:ff9b::/96`): an address in one
    /// is judged by the IPv4 address it carries.
    #[serde(rename = "nat64Prefixes", skip_serializing_if = "Vec::is_empty")]
    pub nat64_prefixes: Vec<String>,
    /// mmrctl: DNS servers (`ip:port`) for preview lookups; empty uses `/etc/resolv.conf`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
}

fn is_five(n: &u32) -> bool {
    *n == 5
}

impl Default for UrlPreviews {
    fn default() -> Self {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        UrlPreviews {
            enabled: true,
            max_page_size_bytes: 10_485_760,
            preview_unsafe_certificates: false,
            num_words: 50,
            max_length: 200,
            num_title_words: 30,
            max_title_length: 150,
            file_preview_types: strings(&["image/*"]),
            num_workers: 10,
            disallowed_networks: strings(&[
                "127.0.0.1/8",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "100.64.0.0/10",
                "169.254.0.0/16",
                "::1/128",
                "fe80::/64",
                "fc00::/7",
            ]),
            allowed_networks: strings(&["0.0.0.0/0"]),
            expire_after_days: 0,
            default_language: "en-US,en".into(),
            user_agent: "matrix-media-repo".into(),
            o_embed: false,
            o_embed_providers_file: None,
            allowed_ports: Vec::new(),
            max_redirects: 5,
            nat64_prefixes: Vec::new(),
            nameservers: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Thumbnails {
    pub max_source_bytes: u64,
    pub max_pixels: u64,
    pub num_workers: u32,
    pub sizes: Vec<ThumbnailSize>,
    pub dynamic_sizing: bool,
    pub types: Vec<String>,
    pub allow_animated: bool,
    pub default_animated: bool,
    pub max_animate_size_bytes: u64,
    pub still_frame: f64,
    pub expire_after_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThumbnailSize {
    pub width: u32,
    pub height: u32,
}

impl Default for Thumbnails {
    fn default() -> Self {
        let size = |width, height| ThumbnailSize { width, height };
        Thumbnails {
            max_source_bytes: 10_485_760,
            max_pixels: 32_000_000,
            // One per core.
            num_workers: 0,
            // The spec's five, and Element Web's 800x600 previews at device pixel ratio 2.
            sizes: vec![
                size(32, 32),
                size(96, 96),
                size(320, 240),
                size(640, 480),
                size(800, 600),
                size(1600, 1200),
            ],
            dynamic_sizing: false,
            types: [
                "image/jpeg",
                "image/jpg",
                "image/png",
                "image/apng",
                "image/gif",
                "image/webp",
                "image/bmp",
                "image/tiff",
            ]
            .map(String::from)
            .to_vec(),
            allow_animated: true,
            default_animated: false,
            max_animate_size_bytes: 10_485_760,
            still_frame: 0.5,
            expire_after_days: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RateLimit {
    pub enabled: bool,
    pub requests_per_second: f64,
    pub burst: u32,
    pub buckets: RateLimitBuckets,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            enabled: true,
            requests_per_second: 5.0,
            burst: 10,
            buckets: RateLimitBuckets::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct RateLimitBuckets {
    pub downloads: DownloadBucket,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct DownloadBucket {
    pub capacity_bytes: u64,
    pub drain_bytes_per_minute: u64,
    pub overflow_limit_bytes: u64,
}

impl Default for DownloadBucket {
    fn default() -> Self {
        DownloadBucket {
            capacity_bytes: 524_288_000,
            drain_bytes_per_minute: 5_242_880,
            overflow_limit_bytes: 104_857_600,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Identicons {
    pub enabled: bool,
}

impl Default for Identicons {
    fn default() -> Self {
        Identicons { enabled: true }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Quarantine {
    pub replace_thumbnails: bool,
    pub replace_downloads: bool,
    pub thumbnail_path: String,
    pub allow_local_admins: bool,
}

impl Default for Quarantine {
    fn default() -> Self {
        Quarantine {
            replace_thumbnails: true,
            replace_downloads: false,
            thumbnail_path: String::new(),
            allow_local_admins: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Timeouts {
    pub url_preview_timeout_seconds: u32,
    pub federation_timeout_seconds: u32,
    pub client_server_timeout_seconds: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            url_preview_timeout_seconds: 10,
            federation_timeout_seconds: 120,
            client_server_timeout_seconds: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Metrics {
    pub enabled: bool,
    pub bind_address: String,
    pub port: u16,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enabled: false,
            bind_address: "127.0.0.1".into(),
            port: 9000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plugin {
    pub exec: String,
    #[serde(default)]
    pub config: serde_norway::Value,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Redis {
    pub enabled: bool,
    pub database_number: u32,
    pub shards: Vec<RedisShard>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RedisShard {
    pub name: String,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Sentry {
    pub enabled: bool,
    pub dsn: String,
    pub environment: String,
    pub debug: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Tasks {
    pub num_workers: u32,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks { num_workers: 5 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Pgo {
    pub enabled: bool,
    pub submit_url: String,
    pub submit_key: String,
}

impl Default for Pgo {
    fn default() -> Self {
        Pgo {
            enabled: false,
            submit_url: "https://mmr-pgo.t2host.io/v1/submit".into(),
            submit_key: String::new(),
        }
    }
}

/// Bounds on client connections, so that slow or idle clients cannot hold the server's memory or
/// sockets. Timeouts are in seconds; each must be at least 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Connections {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: u32,
    /// From the first byte of a request until its headers are complete.
    pub header_read_timeout_seconds: u32,
    /// How long a keep-alive connection may wait for its next request (longer than a reverse
    /// proxy's idle timeout for its upstreams, Traefik's and Go's 90 s, so the proxy closes first).
    pub idle_timeout_seconds: u32,
    /// The longest pause between two pieces of a request body (a stalled upload fails).
    pub body_timeout_seconds: u32,
    /// The longest a response may wait for the client to accept more bytes.
    pub send_timeout_seconds: u32,
    /// The request line and headers together.
    pub max_header_bytes: u32,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            max_connections: 8192,
            header_read_timeout_seconds: 30,
            idle_timeout_seconds: 120,
            body_timeout_seconds: 60,
            send_timeout_seconds: 60,
            max_header_bytes: 16 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_hosts_match_whatever_the_port() {
        let f = Federation {
            ignored_hosts: vec![
                "Evil.example".into(),
                "[2001:db8::1]".into(),
                "x.test:8448".into(),
            ],
            ..Federation::default()
        };
        for name in [
            "evil.example",
            "evil.example:8448",
            "EVIL.example:443",
            "[2001:db8::1]:8448",
            "x.test",
            "x.test:1",
        ] {
            assert!(f.is_ignored(name), "{name}");
        }
        for name in ["good.example", "evil.example.org", "[2001:db8::2]", "test"] {
            assert!(!f.is_ignored(name), "{name}");
        }
    }
}
