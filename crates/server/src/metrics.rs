//! Prometheus metrics, served on their own listener (`metrics.bindAddress:port`).

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

/// Totals the `media` service keeps itself.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServiceCounts {
    pub(crate) thumbnails_generated: u64,
    pub(crate) previews_fetched: u64,
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
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~65 s
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mmrctl");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let datastore_latency = Family::<OperationLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let m = Metrics {
            registry: Registry::default(),
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
        Metrics { registry, ..m }
    }

    pub(crate) fn token_cache(&self, hit: bool) {
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

    /// The exposition text, with the pool gauges and the media service's counts read now.
    /// The exposition; `counts` are the service's own running totals.
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
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
