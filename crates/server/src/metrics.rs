//! Prometheus metrics, served on their own listener (`metrics.bindAddress:port`).
//!
//! Two sets: matrix-media-repo's (`media_*`, the names and labels its published Grafana dashboard
//! queries, so that dashboard works unchanged, minus its Go runtime panels) and ours
//! (`mmrctl_*`), plus the usual `process_*`. Label values come from bounded sets only: hosts are
//! the homeservers served here (other hosts count as invalid requests), actions are route names,
//! and the service's own counts are bounded where they are kept.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) route: String,
    pub(crate) method: String,
    pub(crate) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub(crate) route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabels {
    pub(crate) result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OperationLabels {
    pub(crate) operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MmrRequestLabels {
    pub(crate) host: String,
    pub(crate) action: String,
    pub(crate) method: String,
}

/// matrix-media-repo names the status `statusCode`; Prometheus's naming rules (and promtool)
/// want snake_case. Its dashboard only shows the label in a legend.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct MmrResponseLabels {
    pub(crate) host: String,
    pub(crate) action: String,
    pub(crate) method: String,
    pub(crate) status_code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct InvalidRequestLabels {
    pub(crate) action: String,
    pub(crate) method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    pub(crate) cache: String,
}

/// A label set given as names and values (the service's counts).
type Labels = Vec<(String, String)>;

/// Totals the `media` service keeps itself.
#[derive(Debug, Clone)]
pub(crate) struct ServiceCounts {
    pub(crate) thumbnails_generated: u64,
    pub(crate) previews_fetched: u64,
    /// By width, height, method, animated, origin.
    pub(crate) thumbnails_made: Vec<(Vec<String>, u64)>,
    /// By origin.
    pub(crate) remote_downloads: Vec<(Vec<String>, u64)>,
    /// By type.
    pub(crate) previews_made: Vec<(Vec<String>, u64)>,
}

/// matrix-media-repo's metrics.
struct Mmr {
    requests: Family<MmrRequestLabels, Counter>,
    responses: Family<MmrResponseLabels, Counter>,
    invalid: Family<InvalidRequestLabels, Counter>,
    response_time: Family<MmrRequestLabels, Histogram>,
    cache_hits: Family<CacheLabels, Counter>,
    cache_misses: Family<CacheLabels, Counter>,
    thumbnails: Family<Labels, Counter>,
    downloaded: Family<Labels, Counter>,
    previews: Family<Labels, Counter>,
    s3_operations: Family<Labels, Counter>,
    age: Histogram,
}

/// `process_*`, read from `/proc/self` at each scrape.
#[derive(Default)]
struct Process {
    resident: Gauge,
    virtual_memory: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
    start_time: Gauge,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) latency: Family<RouteLabels, Histogram>,
    pub(crate) bytes_in: Counter,
    pub(crate) bytes_out: Counter,
    pub(crate) dedup_hits: Counter,
    pub(crate) uploads: Counter,
    thumbnails_generated: Counter,
    previews_fetched: Counter,
    /// Held while the service's own counts are copied into the counters, so that concurrent
    /// scrapes never add one difference twice.
    copying: std::sync::Mutex<()>,
    token_cache: Family<ResultLabels, Counter>,
    pub(crate) datastore_latency: Family<OperationLabels, Histogram>,
    pool_size: Gauge,
    pool_available: Gauge,
    pool_waiting: Gauge,
    pool_max: Gauge,
    mmr: Mmr,
    process: Process,
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Where a request went, in matrix-media-repo's action names.
pub(crate) fn action(route: &str, method: &axum::http::Method) -> &'static str {
    let last = |name: &str| route.trim_end_matches('/').ends_with(name);
    if route.starts_with("/_matrix/federation/") {
        return if route.contains("/thumbnail/") {
            "federation_thumbnail"
        } else {
            "federation_download"
        };
    }
    if route.contains("/thumbnail/") {
        "thumbnail"
    } else if route.contains("/download/") {
        "download"
    } else if route.contains("/upload/") || (last("/upload") && method == axum::http::Method::PUT) {
        "upload_async"
    } else if last("/upload") {
        "upload"
    } else if last("/create") {
        "create"
    } else if last("/preview_url") {
        "preview_url"
    } else if last("/config") {
        "config"
    } else if last("/logout/all") {
        "logout_all"
    } else if last("/logout") {
        "logout"
    } else if last("/versions") {
        "versions"
    } else if last("/healthz") {
        "health"
    } else {
        "<UNKNOWN>"
    }
}

/// The method as a label: the standard ones, else `other` (clients may send any token).
fn method_label(method: &axum::http::Method) -> &'static str {
    const KNOWN: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"];
    KNOWN
        .into_iter()
        .find(|m| *m == method.as_str())
        .unwrap_or("other")
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("mmrctl");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let datastore_latency = Family::<OperationLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let m = Metrics {
            registry: Registry::default(),
            mmr: Mmr {
                requests: Family::default(),
                responses: Family::default(),
                invalid: Family::default(),
                response_time: Family::new_with_constructor(|| {
                    // Prometheus's default buckets, as matrix-media-repo (in seconds, here).
                    Histogram::new([
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    ])
                }),
                cache_hits: Family::default(),
                cache_misses: Family::default(),
                thumbnails: Family::default(),
                downloaded: Family::default(),
                previews: Family::default(),
                s3_operations: Family::default(),
                // matrix-media-repo's buckets: 5 s to a year.
                age: Histogram::new([
                    5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 21600.0, 43200.0,
                    86400.0, 604800.0, 2592000.0, 7776000.0, 15552000.0, 31536000.0,
                ]),
            },
            process: Process::default(),
            requests,
            latency,
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            dedup_hits: Counter::default(),
            uploads: Counter::default(),
            thumbnails_generated: Counter::default(),
            previews_fetched: Counter::default(),
            copying: std::sync::Mutex::new(()),
            token_cache: Family::default(),
            datastore_latency,
            pool_size: Gauge::default(),
            pool_available: Gauge::default(),
            pool_waiting: Gauge::default(),
            pool_max: Gauge::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            m.requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to response headers, by route",
            m.latency.clone(),
        );
        registry.register(
            "media_bytes_received",
            "Media bytes received in uploads",
            m.bytes_in.clone(),
        );
        registry.register(
            "media_bytes_sent",
            "Media bytes sent in downloads",
            m.bytes_out.clone(),
        );
        registry.register("uploads", "Uploads stored", m.uploads.clone());
        registry.register(
            "dedup_hits",
            "Uploads whose content was already stored",
            m.dedup_hits.clone(),
        );
        registry.register(
            "thumbnails_generated",
            "Thumbnail generations: decodes of a source (requests that share one count once)",
            m.thumbnails_generated.clone(),
        );
        registry.register(
            "url_previews_fetched",
            "URL preview fetches: pages fetched (requests that share one, or find it cached, do not count)",
            m.previews_fetched.clone(),
        );
        registry.register(
            "token_cache_lookups",
            "Access token cache lookups by result",
            m.token_cache.clone(),
        );
        registry.register(
            "datastore_operation_duration_seconds",
            "Datastore operation latency by operation",
            m.datastore_latency.clone(),
        );
        registry.register(
            "db_pool_connections",
            "Open database connections",
            m.pool_size.clone(),
        );
        registry.register(
            "db_pool_available",
            "Idle database connections",
            m.pool_available.clone(),
        );
        registry.register(
            "db_pool_waiting",
            "Requests waiting for a database connection",
            m.pool_waiting.clone(),
        );
        registry.register(
            "db_pool_max",
            "The pool's bound (database.pool.maxConnections)",
            m.pool_max.clone(),
        );
        let mmr = &m.mmr;
        root.register(
            "media_http_requests",
            "Requests by homeserver, action and method",
            mmr.requests.clone(),
        );
        root.register(
            "media_http_responses",
            "Responses by homeserver, action, method and status",
            mmr.responses.clone(),
        );
        root.register(
            "media_invalid_http_requests",
            "Requests for a host that is not a homeserver served here",
            mmr.invalid.clone(),
        );
        root.register(
            "media_http_response_time_seconds",
            "Time to response headers by homeserver, action and method",
            mmr.response_time.clone(),
        );
        root.register(
            "media_cache_hits",
            "Cache hits by cache",
            mmr.cache_hits.clone(),
        );
        root.register(
            "media_cache_misses",
            "Cache misses by cache",
            mmr.cache_misses.clone(),
        );
        root.register(
            "media_thumbnails_generated",
            "Thumbnails made (origin: remote for remote media)",
            mmr.thumbnails.clone(),
        );
        root.register(
            "media_downloaded",
            "Remote media fetched over federation",
            mmr.downloaded.clone(),
        );
        root.register(
            "media_url_previews_generated",
            "URL previews made by type (oembed, opengraph, calculated)",
            mmr.previews.clone(),
        );
        root.register(
            "media_s3_operations",
            "S3 requests by operation",
            mmr.s3_operations.clone(),
        );
        root.register(
            "media_age_accessed_media_seconds",
            "Age of media when downloaded",
            mmr.age.clone(),
        );
        let p = &m.process;
        root.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            p.resident.clone(),
        );
        root.register(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            p.virtual_memory.clone(),
        );
        root.register(
            "process_open_fds",
            "Number of open file descriptors",
            p.open_fds.clone(),
        );
        root.register(
            "process_max_fds",
            "Maximum number of open file descriptors",
            p.max_fds.clone(),
        );
        root.register("process_threads", "Number of OS threads", p.threads.clone());
        root.register(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            p.start_time.clone(),
        );
        root.register(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            p.cpu_seconds.clone(),
        );
        Metrics {
            registry: root,
            ..m
        }
    }

    /// A request answered: `host` is the homeserver it was for, when served here.
    pub(crate) fn observe_request(
        &self,
        host: Option<String>,
        route: String,
        method: &axum::http::Method,
        status: u16,
        seconds: f64,
    ) {
        let action = action(&route, method).to_owned();
        let method = method_label(method).to_owned();
        self.requests
            .get_or_create(&RequestLabels {
                route: route.clone(),
                method: method.clone(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
        let Some(host) = host else {
            self.mmr
                .invalid
                .get_or_create(&InvalidRequestLabels { action, method })
                .inc();
            return;
        };
        let labels = MmrRequestLabels {
            host,
            action,
            method,
        };
        self.mmr.requests.get_or_create(&labels).inc();
        self.mmr
            .response_time
            .get_or_create(&labels)
            .observe(seconds);
        self.mmr
            .responses
            .get_or_create(&MmrResponseLabels {
                host: labels.host,
                action: labels.action,
                method: labels.method,
                status_code: status.to_string(),
            })
            .inc();
    }

    /// A download of media created at `created_ts` (ms).
    pub(crate) fn observe_media_age(&self, created_ts: i64) {
        let age_ms = store::now_ms().saturating_sub(created_ts).max(0);
        self.mmr.age.observe(age_ms as f64 / 1000.0);
    }

    pub(crate) fn token_cache(&self, hit: bool) {
        let cache = CacheLabels {
            cache: "access_tokens".to_owned(),
        };
        if hit {
            self.mmr.cache_hits.get_or_create(&cache).inc();
        } else {
            self.mmr.cache_misses.get_or_create(&cache).inc();
        }
        let result = if hit { "hit" } else { "miss" };
        self.token_cache
            .get_or_create(&ResultLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    pub(crate) fn observe_datastore(&self, operation: &str, seconds: f64) {
        self.datastore_latency
            .get_or_create(&OperationLabels {
                operation: operation.to_owned(),
            })
            .observe(seconds);
    }

    /// The exposition text, with the pool gauges, the media service's running totals (`counts`)
    /// and the process's figures read now.
    pub(crate) fn encode(&self, pool: store::PoolStatus, counts: ServiceCounts) -> String {
        {
            let _copying = self
                .copying
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (counter, total) in [
                (&self.thumbnails_generated, counts.thumbnails_generated),
                (&self.previews_fetched, counts.previews_fetched),
            ] {
                counter.inc_by(total.saturating_sub(counter.get()));
            }
            // Every operation, at zero too: the series exist before the first S3 request.
            let s3: Vec<_> = store::s3_operation_counts()
                .into_iter()
                .map(|(op, n)| (vec![op.to_owned()], n))
                .collect();
            for (family, names, totals) in [
                (
                    &self.mmr.thumbnails,
                    &["width", "height", "method", "animated", "origin"][..],
                    &counts.thumbnails_made,
                ),
                (
                    &self.mmr.downloaded,
                    &["origin"][..],
                    &counts.remote_downloads,
                ),
                (&self.mmr.previews, &["type"][..], &counts.previews_made),
                (&self.mmr.s3_operations, &["operation"][..], &s3),
            ] {
                for (values, total) in totals {
                    let labels: Labels = names
                        .iter()
                        .zip(values)
                        .map(|(n, v)| ((*n).to_owned(), v.clone()))
                        .collect();
                    let counter = family.get_or_create(&labels);
                    counter.inc_by(total.saturating_sub(counter.get()));
                }
            }
            self.process.read();
        }
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.pool_size.set(as_i64(pool.size));
        self.pool_available.set(as_i64(pool.available));
        self.pool_waiting.set(as_i64(pool.waiting));
        self.pool_max.set(as_i64(pool.max_size));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        prometheus_text(&out)
    }
}

/// OpenMetrics text (what the encoder writes) as Prometheus's text format 0.0.4, which the
/// listener serves and `promtool check metrics` reads: a counter family is named with its
/// `_total` suffix there, and there is no `# EOF`.
fn prometheus_text(open_metrics: &str) -> String {
    let lines: Vec<&str> = open_metrics.lines().collect();
    let mut out = String::with_capacity(open_metrics.len() + 1024);
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" {
            continue;
        }
        let counter = |name: &str| {
            lines
                .get(i..i + 2)
                .is_some_and(|next| next.iter().any(|l| *l == format!("# TYPE {name} counter")))
        };
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|kind| {
            let rest = line.strip_prefix(kind)?;
            let name = rest.split(' ').next()?;
            counter(name).then(|| format!("{kind}{name}_total{}", &rest[name.len()..]))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

impl Process {
    /// Reads `/proc/self`; what cannot be read keeps its previous value.
    fn read(&self) {
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            };
            if let Some(kib) = field("VmRSS:") {
                self.resident.set(to_i64(kib * 1024));
            }
            if let Some(kib) = field("VmSize:") {
                self.virtual_memory.set(to_i64(kib * 1024));
            }
            if let Some(n) = field("Threads:") {
                self.threads.set(to_i64(n));
            }
        }
        // Fields after the command (which may hold spaces and parentheses): utime and stime are
        // fields 14 and 15 of proc(5), starttime 22, counted from 1 with the state at 3.
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat")
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
            let cpu = (field(14) + field(15)) as f64 / USER_HZ;
            let seen = self.cpu_seconds.get();
            if cpu > seen {
                self.cpu_seconds.inc_by(cpu - seen);
            }
            if let Some(boot) = boot_time() {
                self.start_time
                    .set(to_i64(boot + (field(22) as f64 / USER_HZ) as u64));
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(to_i64(fds.count() as u64));
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits")
            && let Some(line) = limits.lines().find(|l| l.starts_with("Max open files"))
            && let Some(soft) = line.split_whitespace().nth(3)
            && let Ok(soft) = soft.parse::<u64>()
        {
            self.max_fds.set(to_i64(soft));
        }
    }
}

/// The unit of CPU times in `/proc/self/stat`: Linux's `USER_HZ`, 100 on every architecture it
/// supports today.
const USER_HZ: f64 = 100.0;

/// When the machine booted (seconds since the epoch), from `/proc/stat`.
fn boot_time() -> Option<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    #[test]
    fn counters_are_named_with_their_total_suffix_in_the_text_format() {
        let open_metrics = "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total 3\n\
                            # HELP b_open Open.\n# TYPE b_open gauge\nb_open 1\n# EOF\n";
        assert_eq!(
            prometheus_text(open_metrics),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total 3\n\
             # HELP b_open Open.\n# TYPE b_open gauge\nb_open 1\n"
        );
    }

    #[test]
    fn routes_map_to_matrix_media_repo_actions() {
        for (route, method, expected) in [
            ("/_matrix/media/{version}/upload", Method::POST, "upload"),
            (
                "/_matrix/media/{version}/upload/{server}/{media_id}",
                Method::PUT,
                "upload_async",
            ),
            ("/_matrix/media/v1/create", Method::POST, "create"),
            (
                "/_matrix/client/v1/media/download/{server}/{media_id}/{file_name}",
                Method::GET,
                "download",
            ),
            (
                "/_matrix/media/{version}/thumbnail/{server}/{media_id}",
                Method::GET,
                "thumbnail",
            ),
            (
                "/_matrix/federation/v1/media/download/{media_id}",
                Method::GET,
                "federation_download",
            ),
            (
                "/_matrix/federation/v1/media/thumbnail/{media_id}",
                Method::GET,
                "federation_thumbnail",
            ),
            (
                "/_matrix/client/v1/media/preview_url",
                Method::GET,
                "preview_url",
            ),
            ("/_matrix/client/v1/media/config", Method::GET, "config"),
            (
                "/_matrix/client/{version}/logout/all",
                Method::POST,
                "logout_all",
            ),
            ("/_matrix/client/{version}/logout", Method::POST, "logout"),
            ("unmatched", Method::GET, "<UNKNOWN>"),
        ] {
            assert_eq!(action(route, &method), expected, "{route}");
        }
    }
}
