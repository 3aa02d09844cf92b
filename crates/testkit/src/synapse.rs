//! A real Synapse from the tools venv, in a temp dir, for one test.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::db::parse_url;
use crate::hmac::hmac_sha1_hex;
use crate::http::{self, Response};
use crate::tools::python;

/// The registration shared secret every test Synapse uses.
const SHARED_SECRET: &str = "testkit-registration-shared-secret";

/// Which database a test Synapse uses.
#[derive(Debug, Clone, Default)]
pub enum Database {
    /// SQLite in the temp dir.
    #[default]
    Sqlite,
    /// PostgreSQL at this URL (for example [`crate::TestDb::url`]); the database must use the
    /// `C` collation, as `TestDb` creates it.
    Postgres(String),
}

/// How to start a [`Synapse`]; [`SynapseBuilder::start`] starts it.
#[derive(Debug, Clone)]
pub struct SynapseBuilder {
    server_name: String,
    signing_key_path: Option<PathBuf>,
    database: Database,
    overrides: Vec<(String, Value)>,
    start_timeout: Duration,
    x_forwarded: bool,
    extra_signing_keys: Vec<String>,
}

impl SynapseBuilder {
    /// Synapse's `signing_key_path` (else the key `--generate-config` made).
    pub fn signing_key_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.signing_key_path = Some(path.into());
        self
    }

    /// Synapse's `old_signing_keys`: `{"ed25519:id": {"key": "<public key>", "expired_ts": ms}}`.
    pub fn old_signing_keys(self, keys: Value) -> Self {
        self.config("old_signing_keys", keys)
    }

    pub fn database(mut self, database: Database) -> Self {
        self.database = database;
        self
    }

    /// Sets a top-level option of `homeserver.yaml` (after everything testkit sets, so it wins).
    pub fn config(mut self, key: &str, value: Value) -> Self {
        self.overrides.push((key.to_owned(), value));
        self
    }

    /// Sets the top-level options of a YAML mapping, as an operator would paste it into
    /// `homeserver.yaml` (for example the `old_signing_keys` section `mmrctl keys revoke` prints).
    pub fn config_yaml(mut self, yaml: &str) -> Self {
        let value: Value = serde_norway::from_str(yaml)
            .unwrap_or_else(|e| panic!("not a YAML mapping ({e}):\n{yaml}"));
        let Value::Object(map) = value else {
            panic!("not a YAML mapping:\n{yaml}");
        };
        self.overrides.extend(map);
        self
    }

    /// The listener's `x_forwarded`: trust `X-Forwarded-For`/`-Proto` from a reverse proxy in
    /// front (default false).
    pub fn x_forwarded(mut self, x_forwarded: bool) -> Self {
        self.x_forwarded = x_forwarded;
        self
    }

    /// Appends a key line in Synapse's format (`ed25519 <version> <unpadded base64 seed>`) to the
    /// signing key file before Synapse starts, after the keys already there: Synapse publishes
    /// every key of the file and signs its own requests with the first. This is how a media
    /// repo's key is merged into its homeserver's key file.
    pub fn append_signing_key(mut self, line: &str) -> Self {
        self.extra_signing_keys.push(line.trim().to_owned());
        self
    }

    /// How long to wait for `/health` (default 90 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    /// Generates the config, patches it, starts Synapse and waits until it answers `/health`.
    pub fn start(self) -> Synapse {
        Synapse::launch(self)
    }
}

/// A running Synapse, listening on 127.0.0.1 (client and federation APIs on one plain HTTP port),
/// stopped (SIGTERM, then SIGKILL) and removed when dropped.
pub struct Synapse {
    child: Child,
    dir: tempfile::TempDir,
    server_name: String,
    port: u16,
    log_path: PathBuf,
    config_path: PathBuf,
    config: Value,
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the OS picked it; it can be taken again
/// before it is used, which is unlikely).
pub fn free_port() -> u16 {
    let listener =
        TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:0: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("no local address: {e}"))
        .port()
}

/// The log config: everything at INFO to stderr, which goes to the log file.
fn log_config() -> Value {
    json!({
        "version": 1,
        "formatters": {"precise": {
            "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(request)s - %(message)s"
        }},
        "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter", "request": ""}},
        "handlers": {"console": {
            "class": "logging.StreamHandler",
            "formatter": "precise",
            "filters": ["context"],
            "stream": "ext://sys.stderr"
        }},
        "root": {"level": "INFO", "handlers": ["console"]},
        "disable_existing_loggers": false
    })
}

/// Rate limits high enough that tests never meet them.
fn no_rate_limits(config: &mut Map<String, Value>) {
    let generous = json!({"per_second": 10000, "burst_count": 100000});
    for key in [
        "rc_message",
        "rc_registration",
        "rc_admin_redaction",
        "rc_3pid_validation",
        "rc_media_create",
        "rc_delayed_event_mgmt",
        "rc_reports",
    ] {
        config.insert(key.to_owned(), generous.clone());
    }
    config.insert(
        "rc_login".to_owned(),
        json!({"address": generous, "account": generous, "failed_attempts": generous}),
    );
    config.insert("rc_presence".to_owned(), json!({"per_user": generous}));
    config.insert(
        "rc_joins".to_owned(),
        json!({"local": generous, "remote": generous}),
    );
    config.insert(
        "rc_invites".to_owned(),
        json!({"per_room": generous, "per_user": generous, "per_issuer": generous}),
    );
    config.insert(
        "rc_federation".to_owned(),
        json!({"window_size": 1000, "sleep_limit": 10000, "sleep_delay": 1, "reject_limit": 10000, "concurrent": 1000}),
    );
}

fn psycopg2_database(url: &str) -> Value {
    let url = parse_url(url);
    let mut args = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            args.insert(k.to_owned(), v);
        }
    };
    put("user", url.user.map(Value::String));
    put("password", url.password.map(Value::String));
    put("host", url.host.map(Value::String));
    put("port", url.port.map(Value::from));
    put("dbname", url.dbname.map(Value::String));
    for (k, v) in url.params {
        put(&k, Some(Value::String(v)));
    }
    put("cp_min", Some(json!(1)));
    put("cp_max", Some(json!(5)));
    json!({"name": "psycopg2", "args": args})
}

impl Synapse {
    /// A builder for a Synapse whose `server_name` is `server_name`.
    pub fn builder(server_name: &str) -> SynapseBuilder {
        SynapseBuilder {
            server_name: server_name.to_owned(),
            signing_key_path: None,
            database: Database::Sqlite,
            overrides: Vec::new(),
            start_timeout: Duration::from_secs(90),
            x_forwarded: false,
            extra_signing_keys: Vec::new(),
        }
    }

    /// Starts a Synapse with the defaults (SQLite, its own generated signing key).
    pub fn start(server_name: &str) -> Self {
        Self::builder(server_name).start()
    }

    fn launch(b: SynapseBuilder) -> Self {
        let python = python();
        let dir = tempfile::Builder::new()
            .prefix("testkit-synapse-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temp dir: {e}"));
        let d = dir.path();
        let config_path = d.join("homeserver.yaml");

        let generated = Command::new(&python)
            .args(["-m", "synapse.app.homeserver", "--generate-config"])
            .arg("--server-name")
            .arg(&b.server_name)
            .arg("--config-path")
            .arg(&config_path)
            .arg("--data-directory")
            .arg(d)
            .arg("--config-directory")
            .arg(d)
            .arg("--report-stats=no")
            .current_dir(d)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
        assert!(
            generated.status.success(),
            "synapse --generate-config failed ({}): {}{}\nIs Synapse installed in the tools venv? \
             Run `cargo xtask test`, which installs it (xtask/requirements-tools.txt).",
            generated.status,
            String::from_utf8_lossy(&generated.stdout),
            String::from_utf8_lossy(&generated.stderr)
        );

        let text = fs::read_to_string(&config_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", config_path.display()));
        let Value::Object(mut config) = serde_norway::from_str::<Value>(&text)
            .unwrap_or_else(|e| panic!("cannot parse the generated homeserver.yaml: {e}"))
        else {
            panic!("the generated homeserver.yaml is not a mapping");
        };

        let port = free_port();
        let log_config_path = d.join("log.config.yaml");
        write_json(&log_config_path, &log_config());
        let mut set = |k: &str, v: Value| {
            config.insert(k.to_owned(), v);
        };
        set(
            "listeners",
            json!([{
                "port": port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": false,
                "x_forwarded": b.x_forwarded,
                "resources": [{"names": ["client", "federation"], "compress": false}],
            }]),
        );
        set("log_config", path_value(&log_config_path));
        set("pid_file", path_value(&d.join("homeserver.pid")));
        set("report_stats", json!(false));
        set("enable_registration", json!(false));
        set("registration_shared_secret", json!(SHARED_SECRET));
        set("media_store_path", path_value(&d.join("media_store")));
        set("enable_authenticated_media", json!(true));
        set("trusted_key_servers", json!([]));
        set("suppress_key_server_warning", json!(true));
        set("enable_metrics", json!(false));
        if let Some(path) = &b.signing_key_path {
            set("signing_key_path", path_value(path));
        }
        match &b.database {
            Database::Sqlite => set(
                "database",
                json!({"name": "sqlite3", "args": {"database": path_value(&d.join("homeserver.db"))}}),
            ),
            Database::Postgres(url) => set("database", psycopg2_database(url)),
        }
        config.remove("federation_domain_whitelist");
        no_rate_limits(&mut config);
        for (k, v) in b.overrides {
            config.insert(k, v);
        }
        let config = Value::Object(config);
        // JSON is YAML: no second serializer to trust.
        write_json(&config_path, &config);
        if !b.extra_signing_keys.is_empty() {
            append_keys(&config, &b.extra_signing_keys);
        }

        let log_path = d.join("synapse.log");
        let child = spawn(&config_path, d, &log_path);
        let mut synapse = Self {
            child,
            dir,
            server_name: b.server_name,
            port,
            log_path,
            config_path,
            config,
        };
        synapse.wait_healthy(b.start_timeout);
        synapse
    }

    fn wait_healthy(&mut self, timeout: Duration) {
        let start = Instant::now();
        let url = format!("{}/health", self.base_url());
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Synapse exited ({status}) before it answered /health. Its log ({}):\n{}",
                    self.log_path.display(),
                    self.log_tail(80)
                );
            }
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .timeout_global(Some(Duration::from_secs(2)))
                .build()
                .into();
            if let Ok(mut r) = agent.get(&url).call()
                && r.status() == 200
                && r.body_mut()
                    .read_to_string()
                    .is_ok_and(|b| b.trim() == "OK")
            {
                eprintln!(
                    "testkit: Synapse {} ready on {} after {:.1} s",
                    self.server_name,
                    self.base_url(),
                    start.elapsed().as_secs_f64()
                );
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "Synapse did not answer {url} within {} s. Its log ({}):\n{}",
                    timeout.as_secs(),
                    self.log_path.display(),
                    self.log_tail(80)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `http://127.0.0.1:<port>`: the client, federation and key APIs.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The temp dir holding the config, the database (SQLite) and the media store.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The `homeserver.yaml` Synapse runs with.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The config Synapse runs with.
    pub fn config(&self) -> &Value {
        &self.config
    }

    /// The signing key file Synapse reads (`signing_key_path`).
    pub fn signing_key_path(&self) -> PathBuf {
        PathBuf::from(self.config["signing_key_path"].as_str().unwrap_or_default())
    }

    /// The media store directory (`media_store_path`).
    pub fn media_store_path(&self) -> PathBuf {
        PathBuf::from(self.config["media_store_path"].as_str().unwrap_or_default())
    }

    /// Everything Synapse logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `GET <base_url><path>` with an optional access token.
    pub fn get(&self, path: &str, token: Option<&str>) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http::get(&format!("{}{path}", self.base_url()), &headers)
    }

    /// `POST <base_url><path>` with a JSON body and an optional access token.
    pub fn post_json(&self, path: &str, body: &Value, token: Option<&str>) -> Response {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http::post_json(&format!("{}{path}", self.base_url()), &headers, body)
    }

    /// `GET /_matrix/key/v2/server`: the keys Synapse publishes.
    pub fn server_keys(&self) -> Value {
        let r = self.get("/_matrix/key/v2/server", None);
        assert_eq!(r.status, 200, "GET /_matrix/key/v2/server: {}", r.text());
        r.json()
    }

    /// The password [`Synapse::register_user`] gives user `name`.
    pub fn password_of(name: &str) -> String {
        format!("testkit-password-{name}")
    }

    /// Registers `name` through the shared-secret admin API; returns the user id and an access
    /// token.
    pub fn register_user(&self, name: &str, admin: bool) -> (String, String) {
        let path = "/_synapse/admin/v1/register";
        let nonce = self.get(path, None);
        assert_eq!(nonce.status, 200, "GET {path}: {}", nonce.text());
        let nonce = nonce.json()["nonce"]
            .as_str()
            .unwrap_or_else(|| panic!("no nonce from GET {path}"))
            .to_owned();
        let password = Synapse::password_of(name);
        let message = [
            nonce.as_str(),
            name,
            &password,
            if admin { "admin" } else { "notadmin" },
        ]
        .join("\0");
        let mac = hmac_sha1_hex(SHARED_SECRET.as_bytes(), message.as_bytes());
        let r = self.post_json(
            path,
            &json!({"nonce": nonce, "username": name, "password": password, "admin": admin, "mac": mac}),
            None,
        );
        assert_eq!(r.status, 200, "POST {path}: {}", r.text());
        let body = r.json();
        let field = |k: &str| {
            body[k]
                .as_str()
                .unwrap_or_else(|| panic!("no {k} in the registration response: {body}"))
                .to_owned()
        };
        (field("user_id"), field("access_token"))
    }

    /// Starts Synapse again after [`Synapse::stop`], with the same config, data and port.
    pub fn restart(&mut self) {
        self.stop();
        self.child = spawn(&self.config_path, self.dir.path(), &self.log_path);
        self.wait_healthy(Duration::from_secs(90));
    }

    /// Stops Synapse: SIGTERM, then SIGKILL after 10 s. Dropping it stops it too.
    pub fn stop(&mut self) {
        stop_child(&mut self.child, "-TERM");
    }
}

/// Starts `cmd` in `dir` (its working directory), stdin closed, stdout and stderr into
/// `stdout.log` and `stderr.log` there.
pub(crate) fn spawn_logged(cmd: &mut Command, dir: &Path) -> Child {
    let output = |name: &str| {
        std::fs::File::create(dir.join(name))
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.join(name).display()))
    };
    cmd.current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(output("stdout.log"))
        .stderr(output("stderr.log"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()))
}

/// Waits until `child` (`name`, for messages) accepts connections on 127.0.0.1 at every one of
/// `ports`; panics with `log()` when it exits first or `timeout` passes.
pub(crate) fn wait_listening(
    child: &mut std::process::Child,
    name: &str,
    ports: &[u16],
    timeout: std::time::Duration,
    log: &dyn Fn() -> String,
) {
    use std::net::{Ipv4Addr, SocketAddr, TcpStream};
    let start = std::time::Instant::now();
    for &port in ports {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        while TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}) before it listened on {addr}:\n{}",
                    log()
                );
            }
            assert!(
                start.elapsed() < timeout,
                "{name} did not listen on {addr} within {} s:\n{}",
                timeout.as_secs(),
                log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

/// Sends `signal` (`-TERM`, `-QUIT`) to `child`, then SIGKILL if it has not exited within 10 s.
pub(crate) fn stop_child(child: &mut Child, signal: &str) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Synapse {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "testkit: the log of Synapse {} (last lines):\n{}",
                self.server_name,
                self.log_tail(40)
            );
        }
    }
}

/// Appends `lines` to the signing key file `config` names, each on a line of its own.
fn append_keys(config: &Value, lines: &[String]) {
    let path = config["signing_key_path"]
        .as_str()
        .unwrap_or_else(|| panic!("no signing_key_path in the config"));
    let mut text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read the key file {path}: {e}"));
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write the key file {path}: {e}"));
}

fn path_value(path: &Path) -> Value {
    Value::String(path.to_string_lossy().into_owned())
}

fn write_json(path: &Path, value: &Value) {
    let text = serde_json::to_string_pretty(value)
        .unwrap_or_else(|e| panic!("cannot serialize {}: {e}", path.display()));
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// Runs Synapse with `config_path`, appending its output to `log_path`.
fn spawn(config_path: &Path, dir: &Path, log_path: &Path) -> Child {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));
    let log2 = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot clone a file handle: {e}"));
    let python = python();
    Command::new(&python)
        .args(["-m", "synapse.app.homeserver", "--config-path"])
        .arg(config_path)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start Synapse with {}: {e}", python.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_urls_become_psycopg2_args() {
        assert_eq!(
            psycopg2_database("postgres://syn:pw@127.0.0.1:5433/mmrctl_test_1?sslmode=disable"),
            json!({"name": "psycopg2", "args": {
                "user": "syn", "password": "pw", "host": "127.0.0.1", "port": 5433,
                "dbname": "mmrctl_test_1", "sslmode": "disable", "cp_min": 1, "cp_max": 5
            }})
        );
    }
}
