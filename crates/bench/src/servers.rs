//! The two servers under test: `mmrctl serve` (started here) and Synapse (started by testkit).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use testkit::{Database, Synapse, TestDb};

use crate::procfs::MIB;

/// The token `sharedSecretAuth` accepts as an access token.
const SHARED_SECRET: &str = "mmrctl-bench-shared-secret";

/// How a client reaches one server's media endpoints.
pub(crate) struct Target {
    /// `mmrctl` or `Synapse`.
    pub(crate) label: &'static str,
    /// `http://127.0.0.1:<port>`.
    pub(crate) base_url: String,
    /// The `Host` header to send, when the server tells homeservers apart by it.
    pub(crate) host: Option<String>,
    pub(crate) token: String,
    /// The server name in `mxc://` URIs and download paths.
    pub(crate) server_name: String,
    pub(crate) pid: u32,
}

/// A free loopback port.
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("no free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// A running `mmrctl serve` with a file datastore in its own temp dir, killed when dropped.
pub(crate) struct MediaRepo {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    _db: Option<TestDb>,
}

impl MediaRepo {
    /// The directory the datastore keeps its objects in (created by `mmrctl serve`).
    pub(crate) fn datastore_dir(dir: &Path) -> PathBuf {
        dir.join("media")
    }

    /// Starts `binary serve` for homeserver `server_name` (its client API at `cs_api`), in `dir`.
    pub(crate) fn start(
        binary: &Path,
        dir: tempfile::TempDir,
        server_name: &str,
        cs_api: &str,
    ) -> Result<MediaRepo> {
        Self::start_with(binary, dir, server_name, cs_api, |_| {}, &[])
    }

    /// [`MediaRepo::start`], with the config edited by `tweak` before it is written and `env`
    /// added to the server's environment.
    pub(crate) fn start_with(
        binary: &Path,
        dir: tempfile::TempDir,
        server_name: &str,
        cs_api: &str,
        tweak: impl FnOnce(&mut serde_json::Value),
        env: &[(&str, &Path)],
    ) -> Result<MediaRepo> {
        let db = TestDb::new();
        let url = db.url().to_owned();
        Self::launch(binary, dir, server_name, cs_api, Some(db), &url, tweak, env)
    }

    /// [`MediaRepo::start_with`] on the database at `db_url`, which another owns (instances that
    /// share it).
    pub(crate) fn start_on(
        binary: &Path,
        dir: tempfile::TempDir,
        server_name: &str,
        cs_api: &str,
        db_url: &str,
        tweak: impl FnOnce(&mut serde_json::Value),
    ) -> Result<MediaRepo> {
        Self::launch(binary, dir, server_name, cs_api, None, db_url, tweak, &[])
    }

    #[allow(clippy::too_many_arguments)]
    fn launch(
        binary: &Path,
        dir: tempfile::TempDir,
        server_name: &str,
        cs_api: &str,
        db: Option<TestDb>,
        db_url: &str,
        tweak: impl FnOnce(&mut serde_json::Value),
        env: &[(&str, &Path)],
    ) -> Result<MediaRepo> {
        let port = free_port()?;
        let mut config = json!({
            "repo": {
                "bindAddress": "127.0.0.1", "port": port, "logDirectory": "-", "logLevel": "warn",
            },
            "database": { "postgres": db_url },
            "homeservers": [{ "name": server_name, "csApi": cs_api, "adminApiKind": "synapse" }],
            "sharedSecretAuth": { "enabled": true, "token": SHARED_SECRET },
            "datastores": [{
                "type": "file", "id": "bench-file-store", "forKinds": ["all"],
                "opts": { "path": Self::datastore_dir(dir.path()) },
            }],
            "uploads": { "maxBytes": 200 * MIB },
            "rateLimit": { "enabled": false },
            "urlPreviews": { "enabled": false },
        });
        tweak(&mut config);
        // JSON is YAML.
        let config_path = dir.path().join("media-repo.yaml");
        fs::write(&config_path, serde_json::to_string_pretty(&config)?)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let log = fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(binary)
            // As the generated systemd unit runs it.
            .env("GLIBC_TUNABLES", unit_malloc_tunables()?)
            .envs(env.iter().copied())
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut repo = MediaRepo {
            child,
            port,
            dir,
            _db: db,
        };
        repo.wait_healthy()?;
        Ok(repo)
    }

    fn wait_healthy(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/healthz", self.base_url());
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("mmrctl serve exited ({status}):\n{}", self.log_tail());
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && testkit::http::get(&url, &[]).status == 200
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "mmrctl serve did not answer {url} within 30 s:\n{}",
            self.log_tail()
        )
    }

    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn target(&self, server_name: &str) -> Target {
        Target {
            label: "mmrctl",
            base_url: self.base_url(),
            host: Some(server_name.to_owned()),
            token: SHARED_SECRET.to_owned(),
            server_name: server_name.to_owned(),
            pid: self.pid(),
        }
    }

    /// The last lines of the server's log.
    pub(crate) fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for MediaRepo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Synapse on its own database of the same PostgreSQL server, with uploads up to 200 MiB and
/// logging at WARNING (as `mmrctl serve` is set to `warn`), plus a registered user's token.
pub(crate) struct SynapseServer {
    pub(crate) synapse: Synapse,
    token: String,
    pid: u32,
    _db: TestDb,
    _log_dir: tempfile::TempDir,
}

impl SynapseServer {
    pub(crate) fn start(server_name: &str) -> Result<SynapseServer> {
        Self::start_with(server_name, &[])
    }

    /// [`SynapseServer::start`] with `extra` config keys.
    pub(crate) fn start_with(
        server_name: &str,
        extra: &[(&str, serde_json::Value)],
    ) -> Result<SynapseServer> {
        let db = TestDb::new();
        let log_dir = tempfile::Builder::new()
            .prefix("mmrctl-bench-synapse-log-")
            .tempdir()?;
        let log_config = log_dir.path().join("log.config.yaml");
        let quiet = json!({
            "version": 1,
            "formatters": {"precise": {"format": "%(asctime)s - %(name)s - %(levelname)s - %(message)s"}},
            "handlers": {"console": {
                "class": "logging.StreamHandler", "formatter": "precise", "stream": "ext://sys.stderr"
            }},
            "root": {"level": "WARNING", "handlers": ["console"]},
            "disable_existing_loggers": false
        });
        fs::write(&log_config, serde_json::to_string_pretty(&quiet)?)?;
        let mut builder = Synapse::builder(server_name)
            .database(Database::Postgres(db.url().to_owned()))
            .config("max_upload_size", json!("200M"))
            .config("log_config", json!(log_config.to_string_lossy()));
        for (key, value) in extra {
            builder = builder.config(key, value.clone());
        }
        let synapse = builder.start();
        let (_user, token) = synapse.register_user("bench", false);
        let config_path = synapse.config_path().to_string_lossy().into_owned();
        let Some(pid) = crate::procfs::find_pid(&config_path) else {
            bail!("cannot find the Synapse process (no command line holds {config_path})");
        };
        Ok(SynapseServer {
            synapse,
            token,
            pid,
            _db: db,
            _log_dir: log_dir,
        })
    }

    pub(crate) fn target(&self) -> Target {
        Target {
            label: "Synapse",
            base_url: self.synapse.base_url(),
            host: None,
            token: self.token.clone(),
            server_name: self.synapse.server_name().to_owned(),
            pid: self.pid,
        }
    }

    /// Synapse's version (see [`synapse_version`]).
    pub(crate) fn version(&self) -> String {
        synapse_version(&self.synapse)
    }
}

/// A Synapse's version, as its federation API reports it (without the build details that follow
/// the number).
pub(crate) fn synapse_version(synapse: &Synapse) -> String {
    let r = synapse.get("/_matrix/federation/v1/version", None);
    let json = if r.status == 200 {
        r.json()
    } else {
        json!(null)
    };
    json["server"]["version"]
        .as_str()
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("(unknown version)")
        .to_owned()
}

/// The allocator settings the generated systemd unit gives the server (its `GLIBC_TUNABLES`).
fn unit_malloc_tunables() -> Result<&'static str> {
    const UNIT: &str = include_str!("../../../templates/matrix-media-repo.service.j2");
    UNIT.lines()
        .find_map(|line| line.strip_prefix("Environment=GLIBC_TUNABLES="))
        .context("templates/matrix-media-repo.service.j2 sets no GLIBC_TUNABLES")
}
