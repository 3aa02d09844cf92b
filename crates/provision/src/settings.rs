//! Evaluated variables, typed: the media repo's config model plus what the unit, the proxy routes
//! and the homeserver snippet need. Type errors name the variable and where it was set.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value as Json};

use crate::routes::RouteTable;
use crate::{Diagnostics, Error, Evaluator, Warning};

pub(crate) const PREFIX: &str = "matrix_media_repo_";

/// Everything the renderers read.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: config::Config,
    pub identifier: String,
    pub base_path: String,
    pub config_path: String,
    pub data_path: String,
    pub binary_path: String,
    pub user: String,
    pub group: String,
    pub required_services: Vec<String>,
    pub wanted_services: Vec<String>,
    pub homeserver_implementation: String,
    pub generate_signing_key: bool,
    pub signing_key_path: String,
    pub homeserver_signing_key: String,
    pub routes: RouteTable,
    pub webserver: crate::webserver::Webserver,
}

/// Config keys and the variables they come from (without the `matrix_media_repo_` prefix), in
/// matrix-media-repo's key order. Datastores, homeservers and plugins are assembled in code.
const CONFIG_KEYS: &[(&str, &str)] = &[
    ("repo.bindAddress", "bind_address"),
    ("repo.port", "port"),
    ("repo.logDirectory", "log_directory"),
    ("repo.logColors", "log_colors"),
    ("repo.jsonLogs", "json_logs"),
    ("repo.logLevel", "log_level"),
    (
        "repo.trustAnyForwardedAddress",
        "trust_any_forwarded_address",
    ),
    ("repo.useForwardedHost", "use_forwarded_host"),
    (
        "repo.freezeUnauthenticatedMedia",
        "freeze_unauthenticated_media",
    ),
    ("federation.backoffAt", "federation_backoff_at"),
    ("federation.ignoredHosts", "federation_ignored_hosts"),
    ("federation.allowedNetworks", "federation_allowed_networks"),
    (
        "federation.disallowedNetworks",
        "federation_disallowed_networks",
    ),
    ("federation.nameservers", "federation_nameservers"),
    ("database.postgres", "database_postgres"),
    ("database.pool.maxConnections", "database_max_connections"),
    (
        "database.pool.maxIdleConnections",
        "database_max_idle_connections",
    ),
    ("homeservers", "homeservers"),
    (
        "accessTokens.maxCacheTimeSeconds",
        "access_tokens_max_cache_time_seconds",
    ),
    (
        "accessTokens.useLocalAppserviceConfig",
        "access_tokens_use_local_appservice_config",
    ),
    ("accessTokens.appservices", "access_tokens_appservices"),
    ("admins", "admins"),
    ("sharedSecretAuth.enabled", "shared_secret_auth_enabled"),
    ("sharedSecretAuth.token", "shared_secret_auth_token"),
    ("archiving.enabled", "archiving_enabled"),
    ("archiving.selfService", "archiving_self_service"),
    (
        "archiving.targetBytesPerPart",
        "archiving_target_bytes_per_part",
    ),
    ("uploads.maxBytes", "max_bytes"),
    ("uploads.minBytes", "min_bytes"),
    ("uploads.reportedMaxBytes", "reported_max_bytes"),
    ("uploads.maxPending", "max_pending"),
    ("uploads.maxAgeSeconds", "max_age_seconds"),
    ("uploads.quotas.enabled", "quotas_enabled"),
    ("uploads.quotas.users", "quotas_users"),
    ("downloads.maxBytes", "downloads_max_bytes"),
    ("downloads.numWorkers", "downloads_num_workers"),
    (
        "downloads.failureCacheMinutes",
        "downloads_failure_cache_minutes",
    ),
    ("downloads.expireAfterDays", "downloads_expire_after_days"),
    (
        "downloads.defaultRangeChunkSizeBytes",
        "downloads_default_range_chunk_size_bytes",
    ),
    ("urlPreviews.enabled", "url_previews_enabled"),
    (
        "urlPreviews.maxPageSizeBytes",
        "url_previews_max_page_size_bytes",
    ),
    (
        "urlPreviews.previewUnsafeCertificates",
        "url_previews_preview_unsafe_certificates",
    ),
    ("urlPreviews.numWords", "url_previews_num_words"),
    ("urlPreviews.maxLength", "url_previews_max_length"),
    ("urlPreviews.numTitleWords", "url_previews_num_title_words"),
    (
        "urlPreviews.maxTitleLength",
        "url_previews_max_title_length",
    ),
    (
        "urlPreviews.filePreviewTypes",
        "url_previews_file_preview_types",
    ),
    ("urlPreviews.numWorkers", "url_previews_num_workers"),
    (
        "urlPreviews.disallowedNetworks",
        "url_previews_disallowed_networks",
    ),
    (
        "urlPreviews.allowedNetworks",
        "url_previews_allowed_networks",
    ),
    (
        "urlPreviews.expireAfterDays",
        "url_previews_expire_after_days",
    ),
    (
        "urlPreviews.defaultLanguage",
        "url_previews_default_language",
    ),
    ("urlPreviews.userAgent", "url_previews_user_agent"),
    ("urlPreviews.oEmbed", "url_previews_o_embed"),
    // mmrctl: ports besides 80 and 443 that previews may fetch from.
    ("urlPreviews.allowedPorts", "url_previews_allowed_ports"),
    ("thumbnails.maxSourceBytes", "thumbnails_max_source_bytes"),
    ("thumbnails.maxPixels", "thumbnails_max_pixels"),
    ("thumbnails.numWorkers", "thumbnails_num_workers"),
    ("thumbnails.sizes", "thumbnails_sizes"),
    ("thumbnails.dynamicSizing", "thumbnails_dynamic_sizing"),
    ("thumbnails.types", "thumbnails_types"),
    ("thumbnails.allowAnimated", "thumbnails_allow_animated"),
    ("thumbnails.defaultAnimated", "thumbnails_default_animated"),
    (
        "thumbnails.maxAnimateSizeBytes",
        "thumbnails_max_animate_size_bytes",
    ),
    ("thumbnails.stillFrame", "thumbnails_still_frame"),
    ("thumbnails.expireAfterDays", "thumbnails_expire_after_days"),
    ("rateLimit.enabled", "rate_limit_enabled"),
    (
        "rateLimit.requestsPerSecond",
        "rate_limit_requests_per_second",
    ),
    ("rateLimit.burst", "rate_limit_burst"),
    (
        "rateLimit.buckets.downloads.capacityBytes",
        "rate_limit_buckets_download_capacity_bytes",
    ),
    (
        "rateLimit.buckets.downloads.drainBytesPerMinute",
        "rate_limit_buckets_download_drain_bytes_per_minute",
    ),
    (
        "rateLimit.buckets.downloads.overflowLimitBytes",
        "rate_limit_buckets_download_overflow_limit_bytes",
    ),
    ("identicons.enabled", "identicons_enabled"),
    (
        "quarantine.replaceThumbnails",
        "quarantine_replace_thumbnails",
    ),
    (
        "quarantine.replaceDownloads",
        "quarantine_replace_downloads",
    ),
    ("quarantine.thumbnailPath", "quarantine_thumbnail_path"),
    (
        "quarantine.allowLocalAdmins",
        "quarantine_allow_local_admins",
    ),
    (
        "timeouts.urlPreviewTimeoutSeconds",
        "timeouts_url_preview_timeout_seconds",
    ),
    (
        "timeouts.federationTimeoutSeconds",
        "timeouts_federation_timeout_seconds",
    ),
    (
        "timeouts.clientServerTimeoutSeconds",
        "timeouts_client_server_timeout_seconds",
    ),
    ("metrics.enabled", "metrics_enabled"),
    ("metrics.bindAddress", "metrics_bind_address"),
    ("metrics.port", "metrics_port"),
    ("redis.enabled", "redis_enabled"),
    ("redis.databaseNumber", "redis_database_number"),
    ("redis.shards", "redis_shards"),
    ("sentry.enabled", "sentry_enabled"),
    ("sentry.dsn", "sentry_dsn"),
    ("sentry.environment", "sentry_environment"),
    ("sentry.debug", "sentry_debug"),
    ("tasks.numWorkers", "tasks_num_workers"),
    ("pgo.enabled", "pgo_enabled"),
    ("pgo.submitUrl", "pgo_submit_url"),
    ("pgo.submitKey", "pgo_submit_key"),
    ("connections.maxConnections", "connections_max_connections"),
    (
        "connections.headerReadTimeoutSeconds",
        "connections_header_read_timeout_seconds",
    ),
    (
        "connections.idleTimeoutSeconds",
        "connections_idle_timeout_seconds",
    ),
    (
        "connections.bodyTimeoutSeconds",
        "connections_body_timeout_seconds",
    ),
    (
        "connections.sendTimeoutSeconds",
        "connections_send_timeout_seconds",
    ),
    ("connections.maxHeaderBytes", "connections_max_header_bytes"),
];

/// S3 `opts` keys and their variables; the `Option` ones are written only when the variable is set.
const S3_OPTS: &[(&str, &str, bool)] = &[
    ("tempPath", "datastore_s3_opts_temp_path", true),
    ("endpoint", "datastore_s3_opts_endpoint", true),
    ("accessKeyId", "datastore_s3_opts_access_key_id", true),
    ("accessSecret", "datastore_s3_opts_access_secret", true),
    ("ssl", "datastore_s3_opts_ssl", true),
    ("bucketName", "datastore_s3_opts_bucket_name", true),
    ("region", "datastore_s3_opts_region", false),
    ("storageClass", "datastore_s3_opts_storage_class", false),
    ("publicBaseUrl", "datastore_s3_opts_public_base_url", false),
    (
        "redirectWhenCached",
        "datastore_s3_opts_redirect_when_cached",
        true,
    ),
    ("prefixLength", "datastore_s3_opts_prefix_length", true),
    (
        "multipartUploads",
        "datastore_s3_opts_multipart_uploads",
        true,
    ),
];

/// Typed reads of evaluated variables, collecting errors instead of stopping at the first.
pub(crate) struct Reader<'a> {
    pub(crate) eval: &'a Evaluator,
    pub(crate) diagnostics: &'a mut Diagnostics,
}

impl Reader<'_> {
    pub(crate) fn json(&mut self, name: &str) -> Option<Json> {
        match self.eval.json(name) {
            Ok(v) => Some(v),
            Err(e) => {
                self.diagnostics.errors.push(e);
                None
            }
        }
    }

    pub(crate) fn get<T: DeserializeOwned>(&mut self, name: &str, expected: &str) -> Option<T> {
        let value = self.json(name)?;
        match serde_json::from_value(value.clone()) {
            Ok(v) => Some(v),
            Err(_) => {
                let e = self.eval.invalid(
                    name,
                    &format!("expected {expected}, got {}", describe(&value)),
                );
                self.diagnostics.errors.push(e);
                None
            }
        }
    }

    pub(crate) fn string(&mut self, name: &str) -> Option<String> {
        match self.json(name)? {
            Json::String(s) => Some(s),
            Json::Number(n) => Some(n.to_string()),
            other => {
                let e = self.eval.invalid(
                    name,
                    &format!("expected a string, got {}", describe(&other)),
                );
                self.diagnostics.errors.push(e);
                None
            }
        }
    }

    /// Ansible's `| bool` reading: booleans, and yes/no/true/false/on/off/1/0 strings.
    pub(crate) fn bool(&mut self, name: &str) -> Option<bool> {
        match self.json(name)? {
            Json::Bool(b) => Some(b),
            Json::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "yes" | "on" | "1" | "true" => Some(true),
                "no" | "off" | "0" | "false" | "" => Some(false),
                _ => {
                    let e = self
                        .eval
                        .invalid(name, &format!("expected true or false, got \"{s}\""));
                    self.diagnostics.errors.push(e);
                    None
                }
            },
            Json::Number(n) => Some(n.as_i64() == Some(1)),
            other => {
                let e = self.eval.invalid(
                    name,
                    &format!("expected true or false, got {}", describe(&other)),
                );
                self.diagnostics.errors.push(e);
                None
            }
        }
    }

    pub(crate) fn strings(&mut self, name: &str) -> Option<Vec<String>> {
        self.get(name, "a list of strings")
    }

    pub(crate) fn int(&mut self, name: &str) -> Option<i64> {
        match self.json(name)? {
            Json::Number(n) if n.is_i64() => n.as_i64(),
            Json::String(s) if s.trim().parse::<i64>().is_ok() => s.trim().parse().ok(),
            other => {
                let e = self.eval.invalid(
                    name,
                    &format!("expected an integer, got {}", describe(&other)),
                );
                self.diagnostics.errors.push(e);
                None
            }
        }
    }
}

/// Serde's Rust type names, in the operator's words.
fn plain_types(message: &str) -> String {
    [
        ("expected u16", "expected a number from 0 to 65535"),
        ("expected u32", "expected a whole number of at least 0"),
        ("expected u64", "expected a whole number of at least 0"),
        ("expected i64", "expected a whole number"),
        ("expected f64", "expected a number"),
        ("expected a boolean", "expected true or false"),
    ]
    .iter()
    .fold(message.to_owned(), |m, (rust, plain)| {
        m.replace(rust, plain)
    })
}

pub(crate) fn describe(v: &Json) -> String {
    match v {
        Json::Null => "nothing (null)".to_owned(),
        Json::Bool(b) => format!("the boolean {b}"),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) => format!("the string \"{s}\""),
        Json::Array(_) => "a list".to_owned(),
        Json::Object(_) => "a mapping".to_owned(),
    }
}

fn var(short: &str) -> String {
    format!("{PREFIX}{short}")
}

/// Inserts `value` at a dotted `path`, creating the mappings on the way.
fn insert(tree: &mut Map<String, Json>, path: &str, value: Json) {
    match path.split_once('.') {
        None => {
            tree.insert(path.to_owned(), value);
        }
        Some((head, rest)) => {
            let child = tree
                .entry(head.to_owned())
                .or_insert_with(|| Json::Object(Map::new()));
            if let Json::Object(child) = child {
                insert(child, rest, value);
            }
        }
    }
}

impl Settings {
    /// Reads and types every variable. Returns `None` when errors were recorded.
    pub(crate) fn from_vars(eval: &Evaluator, diagnostics: &mut Diagnostics) -> Option<Settings> {
        let mut r = Reader { eval, diagnostics };
        if !r.bool(&var("enabled")).unwrap_or(true) {
            let e = eval.invalid(
                &var("enabled"),
                "is not true: set `matrix_media_repo_enabled: true` in your vars.yml to render the media repo",
            );
            r.diagnostics.errors.push(e);
            return None;
        }
        let config = build_config(&mut r);
        let settings = Settings {
            identifier: r.string(&var("identifier")).unwrap_or_default(),
            base_path: r.string(&var("base_path")).unwrap_or_default(),
            config_path: r.string(&var("config_path")).unwrap_or_default(),
            data_path: r.string(&var("data_path")).unwrap_or_default(),
            binary_path: r.string(&var("binary_path")).unwrap_or_default(),
            user: r.string(&var("user")).unwrap_or_default(),
            group: r.string(&var("group")).unwrap_or_default(),
            required_services: r
                .strings(&var("systemd_required_services_list"))
                .unwrap_or_default(),
            wanted_services: r
                .strings(&var("systemd_wanted_services_list"))
                .unwrap_or_default(),
            homeserver_implementation: r
                .string(&var("homeserver_implementation"))
                .unwrap_or_default(),
            generate_signing_key: r.bool(&var("generate_signing_key")).unwrap_or_default(),
            signing_key_path: r.string(&var("signing_key_path")).unwrap_or_default(),
            homeserver_signing_key: r.string(&var("homeserver_signing_key")).unwrap_or_default(),
            routes: RouteTable::default(),
            webserver: Default::default(),
            config: config?,
        };
        let routes = RouteTable::from_vars(&mut r, &settings.config);
        let webserver = crate::webserver::Webserver::from_vars(&mut r, &routes, &settings.config);
        let settings = Settings {
            routes,
            webserver,
            ..settings
        };
        r.diagnostics.errors.is_empty().then_some(settings)
    }
}

/// Assembles the config tree from the variables, then types it through the shared model so the
/// written file is exactly what `serve` (and upstream MMR) will read.
fn build_config(r: &mut Reader<'_>) -> Option<config::Config> {
    let mut tree = Map::new();
    // Which variable each config key came from, to name it when the value has the wrong type.
    let mut sources: Vec<(String, String)> = Vec::new();
    for (key, short) in CONFIG_KEYS {
        let name = var(short);
        let Some(value) = r.json(&name) else { continue };
        sources.push(((*key).to_owned(), name));
        insert(&mut tree, key, value);
    }

    let mut datastores = Vec::new();
    if r.bool(&var("datastore_file_enabled")).unwrap_or(false) {
        let i = datastores.len();
        let mut ds = Map::new();
        ds.insert("type".into(), "file".into());
        for (key, short) in [
            ("id", "datastore_file_id"),
            ("forKinds", "datastore_file_for_kinds"),
        ] {
            ds.insert(key.into(), r.json(&var(short)).unwrap_or(Json::Null));
            sources.push((format!("datastores[{i}].{key}"), var(short)));
        }
        let path = r.json(&var("datastore_opts_path")).unwrap_or(Json::Null);
        sources.push((format!("datastores[{i}].opts"), var("datastore_opts_path")));
        ds.insert("opts".into(), serde_json::json!({ "path": path }));
        datastores.push(Json::Object(ds));
    }
    if r.bool(&var("datastore_s3_enabled")).unwrap_or(false) {
        let i = datastores.len();
        let mut ds = Map::new();
        ds.insert("type".into(), "s3".into());
        for (key, short) in [
            ("id", "datastore_s3_id"),
            ("forKinds", "datastore_s3_for_kinds"),
        ] {
            ds.insert(key.into(), r.json(&var(short)).unwrap_or(Json::Null));
            sources.push((format!("datastores[{i}].{key}"), var(short)));
        }
        let mut opts = Map::new();
        for (key, short, always) in S3_OPTS {
            let name = var(short);
            if !always && !r.eval.is_defined(&name) {
                continue;
            }
            opts.insert((*key).into(), r.json(&name).unwrap_or(Json::Null));
        }
        sources.push((format!("datastores[{i}].opts"), var("datastore_s3_opts_*")));
        ds.insert("opts".into(), Json::Object(opts));
        datastores.push(Json::Object(ds));
    }
    insert(&mut tree, "datastores", Json::Array(datastores));

    // The role keeps plugins under a `plugins:` key of its own variable.
    if let Some(plugins) = r.json(&var("plugins")) {
        let list = match plugins {
            Json::Object(mut m) => m.remove("plugins").unwrap_or(Json::Array(Vec::new())),
            other => other,
        };
        sources.push(("plugins".into(), var("plugins")));
        insert(&mut tree, "plugins", list);
    }

    if !r.diagnostics.errors.is_empty() {
        return None;
    }
    // Ordered by the model's field order when serialized, whatever the insertion order here.
    let mut unknown: Vec<String> = Vec::new();
    let mut note_unknown = |p: serde_ignored::Path<'_>| unknown.push(p.to_string());
    let de = serde_ignored::Deserializer::new(Json::Object(tree), &mut note_unknown);
    let parsed: Result<config::Config, _> = serde_path_to_error::deserialize(de);
    let source_of = |path: &str| -> String {
        sources
            .iter()
            .filter(|(key, _)| {
                path == key
                    || path.starts_with(&format!("{key}."))
                    || path.starts_with(&format!("{key}["))
            })
            .max_by_key(|(key, _)| key.len())
            .map_or_else(
                || "the media repo config".to_owned(),
                |(_, name)| name.clone(),
            )
    };
    for path in unknown {
        let name = source_of(&path);
        let origin = r
            .eval
            .origin(&name)
            .map(|o| format!(" ({o})"))
            .unwrap_or_default();
        r.diagnostics.warnings.push(Warning(format!(
            "`{name}`{origin}: `{path}` is not a matrix-media-repo option and is left out of the config"
        )));
    }
    match parsed {
        Ok(config) => Some(config),
        Err(e) => {
            let path = e.path().to_string();
            let name = source_of(&path);
            let message = format!(
                "invalid value for `{path}`: {}",
                plain_types(&e.into_inner().to_string())
            );
            r.diagnostics.errors.push(r.eval.invalid(&name, &message));
            None
        }
    }
}

impl From<Error> for Diagnostics {
    fn from(e: Error) -> Self {
        Diagnostics {
            errors: vec![e],
            warnings: Vec::new(),
        }
    }
}
