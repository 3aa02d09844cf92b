//! Caddy in a temp dir, for one test: a webserver configured from a Caddyfile (the one
//! `mmrctl render` writes, imported). Run from the binary `cargo xtask test` provides, never
//! installed, with its admin API off and its storage in the temp dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// The Caddy binary, from `MMRCTL_CADDY` (set by `cargo xtask test`).
pub fn caddy_bin() -> PathBuf {
    crate::tools::provided_binary("MMRCTL_CADDY", "caddy")
}

/// A running Caddy; stopped (`SIGTERM`, then `SIGKILL`) and removed when dropped. Every request
/// is logged as JSON lines in [`Caddy::access_log`].
pub struct Caddy {
    child: Child,
    dir: tempfile::TempDir,
}

impl Caddy {
    /// Starts Caddy with `sites` after testkit's global options (no admin API, no redirects from
    /// port 80, nothing installed into trust stores) and waits until it accepts connections on
    /// 127.0.0.1 at every one of `ports`.
    pub fn start(sites: &str, ports: &[u16]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("testkit-caddy-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let d = dir.path();
        let config = format!(
            "{{\n    admin off\n    auto_https disable_redirects\n    \
             skip_install_trust\n    storage file_system {storage}\n    log {{\n        output file {log}\n    }}\n}}\n{sites}\n",
            storage = d.join("storage").display(),
            log = d.join("caddy.log").display(),
        );
        let config_path = d.join("Caddyfile");
        fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let child = crate::synapse::spawn_logged(
            Command::new(caddy_bin())
                .args(["run", "--adapter", "caddyfile", "--config"])
                .arg(&config_path)
                .env("HOME", d)
                .env("XDG_DATA_HOME", d.join("data"))
                .env("XDG_CONFIG_HOME", d.join("config")),
            d,
        );
        let mut caddy = Self { child, dir };
        let dir = caddy.dir.path().to_owned();
        crate::synapse::wait_listening(
            &mut caddy.child,
            "caddy",
            ports,
            Duration::from_secs(20),
            &|| read_log(&dir),
        );
        caddy
    }

    /// What Caddy logged (its own log and stderr).
    pub fn log(&self) -> String {
        read_log(self.dir.path())
    }

    pub fn stop(&mut self) {
        crate::synapse::stop_child(&mut self.child, "-TERM");
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("testkit: caddy's log:\n{}", self.log());
        }
    }
}

/// Its log and its stderr, as far as they go.
fn read_log(dir: &Path) -> String {
    let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
    format!("{}{}", read("caddy.log"), read("stderr.log"))
}
