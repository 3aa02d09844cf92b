//! nginx in a temp dir, for one test: the TLS reverse proxy the federation harness puts in front
//! of each homeserver, as production does. Run from the binary `cargo xtask test` provides, never
//! installed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The nginx binary, from `MMRCTL_NGINX` (set by `cargo xtask test`).
pub fn nginx_bin() -> PathBuf {
    crate::tools::provided_binary("MMRCTL_NGINX", "nginx")
}

/// A running nginx (master and one worker) with its config, pid file, logs and temp files in a
/// temp dir; stopped (`SIGQUIT`, then `SIGKILL`) and removed when dropped.
///
/// Every request is logged to [`Nginx::access_log`] as
/// `<client> "<request line>" <status> <bytes sent> "<Host>"`, so a test can assert which requests
/// reached it (or that none did).
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `http` as the body of its `http {}` block (`server` blocks, with
    /// absolute paths) and waits until it accepts connections on 127.0.0.1 at every one of
    /// `ports`. testkit supplies the rest: `daemon off`, pid, logs and temp paths in the temp dir.
    pub fn start(http: &str, ports: &[u16]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-nginx-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let d = dir.path();
        let config_path = write_config(d, http);
        // `-e`: the compiled-in error log (/var/log/nginx) is opened before the config is read.
        let child = crate::synapse::spawn_logged(
            Command::new(nginx_bin())
                .arg("-p")
                .arg(d)
                .arg("-c")
                .arg(&config_path)
                .arg("-e")
                .arg(d.join("error.log")),
            d,
        );
        let mut nginx = Self { child, dir };
        let dir = nginx.dir.path().to_owned();
        crate::synapse::wait_listening(
            &mut nginx.child,
            "nginx",
            ports,
            Duration::from_secs(20),
            &|| read_log(&dir),
        );
        nginx
    }

    /// Replaces the `http {}` body and reloads (`SIGHUP`): new connections get the new config
    /// once the new workers run, which the caller waits for by what it expects to change.
    pub fn reload(&self, http: &str) {
        write_config(self.dir.path(), http);
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
        assert!(status.success(), "kill -HUP nginx failed");
    }

    /// The temp dir holding `nginx.conf`, the logs and the temp files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The access log so far, one request a line (see [`Nginx`]). nginx writes a line when the
    /// request has been answered, which may be just after the client saw the response.
    pub fn access_log(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The error log and nginx's stderr so far.
    pub fn error_log(&self) -> String {
        read_log(self.dir.path())
    }

    /// Stops nginx: `SIGQUIT` (graceful), then `SIGKILL` after 10 s. Dropping it stops it too.
    pub fn stop(&mut self) {
        crate::synapse::stop_child(&mut self.child, "-QUIT");
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("testkit: nginx's error log:\n{}", self.error_log());
        }
    }
}

/// Writes `nginx.conf` in `d`: `http` inside testkit's frame (`daemon off`, pid, logs and temp
/// paths in `d`).
fn write_config(d: &Path, http: &str) -> PathBuf {
    let p = |name: &str| d.join(name).to_string_lossy().into_owned();
    let config = format!(
        r#"daemon off;
worker_processes 1;
# Workers write the temp files in this (0700) temp dir; the directive is ignored unless root.
user root;
pid "{pid}";
error_log "{error_log}" notice;
events {{ worker_connections 1024; }}
http {{
    client_body_temp_path "{client_body}";
    proxy_temp_path "{proxy}";
    fastcgi_temp_path "{fastcgi}";
    uwsgi_temp_path "{uwsgi}";
    scgi_temp_path "{scgi}";
    default_type application/octet-stream;
    log_format testkit '$remote_addr "$request" $status $body_bytes_sent "$http_host"';
    access_log "{access_log}" testkit;
{http}
}}
"#,
        pid = p("nginx.pid"),
        error_log = p("error.log"),
        client_body = p("client_body_temp"),
        proxy = p("proxy_temp"),
        fastcgi = p("fastcgi_temp"),
        uwsgi = p("uwsgi_temp"),
        scgi = p("scgi_temp"),
        access_log = p("access.log"),
    );
    let config_path = d.join("nginx.conf");
    fs::write(&config_path, config)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
    config_path
}

/// Its log and its stderr, as far as they go.
fn read_log(dir: &Path) -> String {
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!("{}{}", read("error.log"), read("stderr.log"))
}
