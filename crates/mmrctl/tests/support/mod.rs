//! A real `mmrctl serve` on a fresh database, for end-to-end tests.

#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::print_stderr)] // Each test file uses a part; helpers panic to fail tests.

pub mod remote;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use testkit::TestDb;
pub use testkit::http::encode;
use testkit::http::{self, Response};

pub const SHARED_SECRET: &str = "test-shared-secret";
/// The file datastore every test repo starts with, and the S3 one tests add.
pub const FILE_ID: &str = "test-file-store";
pub const S3_ID: &str = "test-s3-store";

fn bind_any() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct MediaRepo {
    child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub dir: tempfile::TempDir,
    /// The database, for the instance that owns it.
    pub db: Option<TestDb>,
    pub config: Value,
}

impl MediaRepo {
    /// Starts `mmrctl serve` for `homeservers` (`name`, `csApi`), after `tweak` edits the config.
    pub fn start(homeservers: &[(&str, &str)], tweak: impl FnOnce(&mut Value)) -> MediaRepo {
        let db = TestDb::new();
        let url = db.url().to_owned();
        let repo = MediaRepo::spawn(Some(db), &url, homeservers, tweak);
        repo.wait_healthy();
        repo
    }

    /// Starts `n` instances at the same moment on one database and one datastore (the first owns both).
    pub fn start_many(n: usize, homeservers: &[(&str, &str)]) -> Vec<MediaRepo> {
        MediaRepo::start_many_with(n, homeservers, |_| {})
    }

    /// [`MediaRepo::start_many`], every config edited by `tweak`.
    pub fn start_many_with(
        n: usize,
        homeservers: &[(&str, &str)],
        tweak: impl Fn(&mut Value),
    ) -> Vec<MediaRepo> {
        let db = TestDb::new();
        let url = db.url().to_owned();
        let first = MediaRepo::spawn(Some(db), &url, homeservers, &tweak);
        let media = first.dir.path().join("media");
        let mut repos = vec![first];
        for _ in 1..n {
            repos.push(MediaRepo::spawn(None, &url, homeservers, |c| {
                tweak(c);
                c["datastores"][0]["opts"]["path"] = json!(media)
            }));
        }
        for repo in &repos {
            repo.wait_healthy();
        }
        repos
    }

    /// Starts without waiting for it to become healthy.
    pub fn spawn(
        db: Option<TestDb>,
        db_url: &str,
        homeservers: &[(&str, &str)],
        tweak: impl FnOnce(&mut Value),
    ) -> MediaRepo {
        MediaRepo::spawn_with_env(db, db_url, homeservers, &[], tweak)
    }

    /// [`MediaRepo::spawn`] with extra environment variables for the server.
    pub fn spawn_with_env(
        db: Option<TestDb>,
        db_url: &str,
        homeservers: &[(&str, &str)],
        env: &[(&str, &str)],
        tweak: impl FnOnce(&mut Value),
    ) -> MediaRepo {
        let dir = tempfile::tempdir().unwrap();
        // Both listeners are held while their ports are read, so the two ports differ.
        let (a, b) = (bind_any(), bind_any());
        let (port, metrics_port) = (
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        );
        drop((a, b));
        let mut config = json!({
            "repo": { "bindAddress": "127.0.0.1", "port": port, "logDirectory": "-", "logLevel": "debug",
                      "freezeUnauthenticatedMedia": true },
            "database": { "postgres": db_url, "pool": { "maxConnections": 10, "maxIdleConnections": 2 } },
            "homeservers": homeservers.iter().map(|(name, cs_api)| json!({
                "name": name, "csApi": cs_api, "backoffAt": 3, "adminApiKind": "synapse"
            })).collect::<Vec<_>>(),
            "accessTokens": { "maxCacheTimeSeconds": 600 },
            "sharedSecretAuth": { "enabled": true, "token": SHARED_SECRET },
            "datastores": [{ "type": "file", "id": FILE_ID, "forKinds": ["all"],
                             "opts": { "path": dir.path().join("media") } }],
            "metrics": { "enabled": true, "bindAddress": "127.0.0.1", "port": metrics_port },
            "urlPreviews": { "enabled": false },
            "rateLimit": { "enabled": false },
        });
        tweak(&mut config);
        // A test may have chosen the port (one a proxy in front already points at).
        let port = config["repo"]["port"].as_u64().map_or(port, |p| p as u16);
        let config_path = dir.path().join("media-repo.yaml");
        fs::write(&config_path, serde_norway::to_string(&config).unwrap()).unwrap();
        let log = fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
            .args(["serve", "--config"])
            .arg(&config_path)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        MediaRepo {
            child,
            port,
            metrics_port,
            dir,
            db,
            config,
        }
    }

    /// Runs `mmrctl serve` on a config file written elsewhere (a rendered one), listening on `port`;
    /// waits until it is healthy. Its log goes to `server.log` in a new temp dir.
    pub fn start_with_config_file(
        config_path: &Path,
        port: u16,
        db: Option<TestDb>,
        env: &[(&str, &str)],
    ) -> MediaRepo {
        let dir = tempfile::tempdir().unwrap();
        let text = fs::read_to_string(config_path).unwrap();
        let config: Value = serde_norway::from_str(&text).unwrap();
        let log = fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
            .args(["serve", "--config"])
            .arg(config_path)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let metrics_port = config["metrics"]["port"].as_u64().unwrap_or(0) as u16;
        let repo = MediaRepo {
            child,
            port,
            metrics_port,
            dir,
            db,
            config,
        };
        repo.wait_healthy();
        repo
    }

    /// The config file `mmrctl serve` runs with (for other subcommands that take `--config`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("media-repo.yaml")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's peak resident set size so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmHWM in /proc/{}/status:\n{status}", self.pid()))
    }

    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.get("/healthz", &[]).status == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("mmrctl serve did not become healthy:\n{}", self.log());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http::get(&self.url(path), headers)
    }

    pub fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        content_type: Option<&str>,
        body: &[u8],
    ) -> Response {
        http::send(method, &self.url(path), headers, content_type, body)
    }

    /// `POST /_matrix/media/v3/upload` as `token` on `host`; returns the media id.
    pub fn upload(
        &self,
        host: &str,
        token: &str,
        content_type: &str,
        filename: Option<&str>,
        body: &[u8],
    ) -> String {
        let r = self.upload_response(host, token, content_type, filename, body);
        assert_eq!(r.status, 200, "upload: {}", r.text());
        let uri = r.json()["content_uri"].as_str().unwrap().to_owned();
        let prefix = format!("mxc://{host}/");
        assert!(uri.starts_with(&prefix), "{uri}");
        uri[prefix.len()..].to_owned()
    }

    pub fn upload_response(
        &self,
        host: &str,
        token: &str,
        content_type: &str,
        filename: Option<&str>,
        body: &[u8],
    ) -> Response {
        let path = match filename {
            Some(name) => format!("/_matrix/media/v3/upload?filename={}", encode(name)),
            None => "/_matrix/media/v3/upload".to_owned(),
        };
        let auth = format!("Bearer {token}");
        self.send(
            "POST",
            &path,
            &[("Host", host), ("Authorization", &auth)],
            Some(content_type),
            body,
        )
    }

    /// `GET /_matrix/client/v1/media/download/{host}/{media_id}` with the shared secret, plus
    /// `headers`.
    pub fn download(&self, host: &str, media_id: &str, headers: &[(&str, &str)]) -> Response {
        let auth = format!("Bearer {SHARED_SECRET}");
        let mut all = vec![("Host", host), ("Authorization", auth.as_str())];
        all.extend_from_slice(headers);
        self.get(
            &format!("/_matrix/client/v1/media/download/{host}/{media_id}"),
            &all,
        )
    }

    /// `POST /_matrix/media/v1/create` on `host` with the shared secret.
    pub fn create(&self, host: &str) -> Response {
        let auth = format!("Bearer {SHARED_SECRET}");
        self.send(
            "POST",
            "/_matrix/media/v1/create",
            &[("Host", host), ("Authorization", &auth)],
            Some("application/json"),
            b"{}",
        )
    }

    /// A connection to the repo's database (its config's `database.postgres`).
    pub fn client(&self) -> testkit::postgres::Client {
        let url = self.config["database"]["postgres"].as_str().unwrap();
        testkit::postgres::Client::connect(url, testkit::postgres::NoTls).unwrap()
    }

    /// Media rows in the repo's database (pending ones included).
    pub fn media_rows(&self) -> i64 {
        self.count("SELECT COUNT(*) FROM media")
    }

    /// One number from the repo's database (`SELECT COUNT(*) ...`).
    pub fn count(&self, sql: &str) -> i64 {
        self.client().query_one(sql, &[]).unwrap().get(0)
    }

    /// Runs a statement on the repo's database.
    pub fn execute(&self, sql: &str) {
        self.client().execute(sql, &[]).unwrap();
    }

    /// `GET path` as the shared secret's user on `host`.
    pub fn get_as(&self, host: &str, path: &str) -> Response {
        let auth = format!("Bearer {SHARED_SECRET}");
        self.get(path, &[("Host", host), ("Authorization", &auth)])
    }

    /// Files in the datastore (objects), temp files excluded.
    pub fn objects(&self) -> usize {
        count_files(&self.dir.path().join("media"), true)
    }

    /// Where the file datastore keeps the object with this SHA-256.
    pub fn object_path(&self, sha256: &str) -> PathBuf {
        self.dir
            .path()
            .join("media")
            .join(&sha256[..2])
            .join(&sha256[2..4])
            .join(sha256)
    }

    pub fn temp_files(&self) -> usize {
        count_files(&self.dir.path().join("media/.tmp"), false)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Rewrites the config file (for SIGHUP tests).
    pub fn rewrite_config(&mut self, edit: impl FnOnce(&mut Value)) {
        edit(&mut self.config);
        fs::write(
            self.dir.path().join("media-repo.yaml"),
            serde_norway::to_string(&self.config).unwrap(),
        )
        .unwrap();
    }

    pub fn metrics(&self) -> String {
        http::get(
            &format!("http://127.0.0.1:{}/metrics", self.metrics_port),
            &[],
        )
        .text()
    }

    /// Waits for the server to exit by itself (at most `bound`).
    pub fn wait_exit(&mut self, bound: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + bound;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "mmrctl serve did not exit within {bound:?}:\n{}",
            self.log()
        );
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("mmrctl serve did not stop on SIGTERM:\n{}", self.log());
    }
}

impl Drop for MediaRepo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "mmrctl serve log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn count_files(dir: &Path, skip_tmp: bool) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.unwrap())
        .map(|e| {
            let path: PathBuf = e.path();
            if path.is_dir() {
                if skip_tmp && path.file_name().is_some_and(|n| n == ".tmp") {
                    0
                } else {
                    count_files(&path, skip_tmp)
                }
            } else {
                1
            }
        })
        .sum()
}

/// 5 MiB of deterministic, incompressible-looking bytes.
pub fn sample(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The test PostgreSQL server's connection parts, from `MMRCTL_TEST_DATABASE_URL`.
pub struct Pg {
    pub host: String,
    pub port: String,
    pub user: String,
}

impl Pg {
    /// `mmrctl import`'s connection flags for this server.
    pub fn flags(&self) -> [&str; 6] {
        [
            "--db-host",
            &self.host,
            "--db-port",
            &self.port,
            "--db-user",
            &self.user,
        ]
    }
}

pub fn pg() -> Pg {
    let url = testkit::parse_url(&testkit::database_url());
    Pg {
        host: url.host.unwrap_or_default(),
        port: url.port.unwrap_or(5432).to_string(),
        user: url.user.unwrap_or_else(|| "postgres".to_owned()),
    }
}

/// A finished command: its exit code and what it logged on stderr.
pub struct Run {
    pub code: i32,
    pub log: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("--- {cmd:?}\n{log}");
    Run {
        code: out.status.code().unwrap_or(-1),
        log,
    }
}

/// The log lines of `log` that carry `msg="<msg>"`.
pub fn log_lines<'a>(log: &'a str, msg: &str) -> Vec<&'a str> {
    let needle = format!("msg=\"{msg}\"");
    log.lines().filter(|l| l.contains(&needle)).collect()
}

/// The directory of the test's file store (`<repo dir>/media`), read from the config being built.
pub fn repo_dir(config: &Value) -> PathBuf {
    let path = config["datastores"][0]["opts"]["path"].as_str().unwrap();
    Path::new(path).parent().unwrap().to_path_buf()
}

/// An S3 datastore entry for `s3`, its temp path in the repo's dir, with `extra` opts.
pub fn s3_datastore(
    s3: &testkit::S3Server,
    config: &Value,
    for_kinds: Value,
    extra: Value,
) -> Value {
    let mut opts = s3.datastore_opts(&repo_dir(config).join("s3-tmp"));
    for (k, v) in extra.as_object().unwrap() {
        opts[k] = v.clone();
    }
    json!({ "type": "s3", "id": S3_ID, "forKinds": for_kinds, "opts": opts })
}

/// The repo's file datastore entry, for `for_kinds`.
pub fn file_datastore(config: &Value, for_kinds: Value) -> Value {
    json!({ "type": "file", "id": FILE_ID, "forKinds": for_kinds,
            "opts": { "path": repo_dir(config).join("media") } })
}

/// Writes `vars` to `out/vars.yml` and runs `mmrctl render` on it into `out`; panics with its
/// errors when it fails.
pub fn render(vars: &str, out: &Path) {
    let vars_path = out.join("vars.yml");
    fs::write(&vars_path, vars).unwrap();
    let render = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(["render", "--out"])
        .arg(out)
        .arg(&vars_path)
        .output()
        .unwrap();
    assert!(
        render.status.success(),
        "mmrctl render failed:\n{}",
        String::from_utf8_lossy(&render.stderr)
    );
}

/// `mmrctl datastores check` finds the store and the database in agreement.
pub fn check_clean(config: &std::path::Path, id: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(["datastores", "check", id, "--config"])
        .arg(config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("0 orphan(s), 0 missing"),
        "{id}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
