//! A real Prometheus in a temp dir, for one test: it scrapes the given targets every second,
//! and [`Prometheus::query`] runs PromQL against what it scraped. The server binary comes from
//! the same Debian package as `promtool` (`cargo xtask test` provides both).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::synapse::free_port;

pub struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    job: String,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (`host:port`, path `/metrics`) as job `job`, and
    /// waits until each has been scraped at least `scrapes` times.
    pub fn start(job: &str, targets: &[String], scrapes: u32) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-prometheus-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let config = dir.path().join("prometheus.yml");
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  \
                 - job_name: '{job}'\n    static_configs:\n      - targets: [{}]\n",
                targets.join(", ")
            ),
        )
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
        let bin = crate::tools::promtool_bin().with_file_name("prometheus");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log"))
            .unwrap_or_else(|e| panic!("cannot create the log: {e}"));
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut prometheus = Self {
            child,
            port,
            dir,
            job: job.to_owned(),
        };
        prometheus.wait_scrapes(scrapes);
        prometheus
    }

    /// How often every target has been scraped so far (within 5 minutes).
    pub fn scrapes(&self) -> u32 {
        let count = format!("min(count_over_time(up{{job=\"{}\"}}[5m]))", self.job);
        self.query(&count)
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .map_or(0, |n| n as u32)
    }

    /// Waits until every target has been scraped `scrapes` times in all (within 5 minutes).
    pub fn wait_scrapes(&mut self, scrapes: u32) {
        let wanted = format!(
            "min(count_over_time(up{{job=\"{}\"}}[5m])) >= {scrapes}",
            self.job
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            let ready = crate::http::try_get(&self.url(&wanted)).is_some_and(|r| {
                r.status == 200
                    && !r.json()["data"]["result"]
                        .as_array()
                        .is_none_or(Vec::is_empty)
            });
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not scrape {scrapes} times within 60 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn url(&self, expr: &str) -> String {
        format!(
            "http://127.0.0.1:{}/api/v1/query?query={}",
            self.port,
            crate::http::encode(expr)
        )
    }

    /// The result vector of the instant query `expr` (panics when Prometheus refuses it).
    pub fn query(&self, expr: &str) -> Vec<Value> {
        let r = crate::http::get(&self.url(expr), &[]);
        let body = r.json();
        assert_eq!(
            (r.status, body["status"].as_str()),
            (200, Some("success")),
            "prometheus refused {expr}: {}",
            r.text()
        );
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        crate::synapse::stop_child(&mut self.child, "-TERM");
    }
}
