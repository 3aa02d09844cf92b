//! A PostgreSQL server for the tests: the one the user names, the one already listening on the
//! standard port, or a throwaway cluster started here and stopped when the run ends.

use std::ffi::OsString;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{self, note, shell_quote};

pub(crate) const URL_VAR: &str = "MMRCTL_TEST_DATABASE_URL";

const HOW_TO_PROVIDE: &str = "Provide PostgreSQL for the tests in one of these ways:\n  \
     - install it (Debian/Ubuntu: `apt-get install postgresql`): xtask uses a server on \
     127.0.0.1:5432, or else starts a throwaway cluster with its initdb and pg_ctl;\n  \
     - or point the tests at a server you run: \
     MMRCTL_TEST_DATABASE_URL=postgres://USER@HOST:PORT/DB cargo xtask test \
     (the user must be allowed to create databases).";

/// The server the tests use. When xtask started it, dropping this stops it.
pub(crate) struct Postgres {
    pub(crate) url: String,
    _cluster: Option<Cluster>,
}

/// Finds or starts a server; see the module docs for the order.
pub(crate) fn provide(target: &Path) -> Result<Postgres> {
    if let Some(url) = std::env::var_os(URL_VAR).filter(|v| !v.is_empty()) {
        let url = url
            .into_string()
            .map_err(|_| anyhow::anyhow!("{URL_VAR} is not valid UTF-8"))?;
        note!("postgres at {url} (from {URL_VAR})");
        return Ok(Postgres {
            url,
            _cluster: None,
        });
    }

    let standard = SocketAddr::from(([127, 0, 0, 1], 5432));
    if TcpStream::connect_timeout(&standard, Duration::from_secs(1)).is_ok() {
        let url = "postgres://postgres@127.0.0.1:5432/postgres".to_owned();
        note!("postgres at {url} (a server already listens on 127.0.0.1:5432)");
        return Ok(Postgres {
            url,
            _cluster: None,
        });
    }

    let Some(bin) = find_bin_dir() else {
        bail!(
            "no PostgreSQL for the tests: {URL_VAR} is not set, nothing listens on \
             127.0.0.1:5432, and no initdb/pg_ctl was found on PATH or in \
             /usr/lib/postgresql/*/bin.\n{HOW_TO_PROVIDE}"
        );
    };
    let cluster = Cluster::start(&bin, target).with_context(|| {
        format!(
            "could not start a throwaway PostgreSQL cluster with {}.\n{HOW_TO_PROVIDE}",
            bin.display()
        )
    })?;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    note!(
        "postgres at {url} (throwaway cluster in {}, stopped when the run ends)",
        cluster.dir.data.display()
    );
    Ok(Postgres {
        url,
        _cluster: Some(cluster),
    })
}

/// A directory holding both `initdb` and `pg_ctl`: from PATH first, then the newest
/// `/usr/lib/postgresql/<version>/bin` (where Debian keeps them off PATH).
pub(crate) fn find_bin_dir() -> Option<PathBuf> {
    let has_both = |dir: &Path| {
        util::is_executable(&dir.join("initdb")) && util::is_executable(&dir.join("pg_ctl"))
    };
    if let Some(initdb) = util::find_on_path("initdb") {
        // A symlinked initdb (e.g. /usr/local/bin -> /usr/lib/postgresql/15/bin) is fine: pg_ctl
        // beside it, or beside its target, belongs to the same installation.
        let resolved = std::fs::canonicalize(&initdb).unwrap_or_else(|_| initdb.clone());
        for candidate in [&initdb, &resolved] {
            if let Some(dir) = candidate.parent().filter(|d| has_both(d)) {
                return Some(dir.to_path_buf());
            }
        }
    }
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|p| p.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_both(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// A cluster started by xtask; dropping it stops the server.
struct Cluster {
    dir: ClusterDir,
    port: u16,
}

/// Where a cluster lives and how to drive it.
struct ClusterDir {
    pg_ctl: PathBuf,
    base: PathBuf,
    data: PathBuf,
    /// The unprivileged user that owns the cluster when xtask runs as root.
    run_as: Option<RunAs>,
}

/// How to run the PostgreSQL programs as another user (they refuse to run as root).
#[derive(Clone)]
struct RunAs {
    user: String,
    /// `runuser` when there is one, else `su`.
    runuser: Option<PathBuf>,
}

impl RunAs {
    fn command(&self, program: &Path, args: &[OsString]) -> Command {
        match &self.runuser {
            Some(runuser) => {
                let mut cmd = Command::new(runuser);
                cmd.args(["-u", &self.user, "--"]).arg(program).args(args);
                cmd
            }
            None => {
                let line = std::iter::once(shell_quote(program))
                    .chain(args.iter().map(shell_quote))
                    .collect::<Vec<_>>()
                    .join(" ");
                let mut cmd = Command::new("su");
                cmd.args([&self.user, "-s", "/bin/sh", "-c", &line]);
                cmd
            }
        }
    }
}

impl Cluster {
    fn start(bin: &Path, target: &Path) -> Result<Self> {
        let run_as = if util::is_root() {
            Some(unprivileged_user()?)
        } else {
            None
        };
        let base = choose_base(target, run_as.as_ref())?;
        let data = base.join("data");
        let sock = base.join("sock");
        let log = base.join("postgres.log");
        let dir = ClusterDir {
            pg_ctl: bin.join("pg_ctl"),
            base: base.clone(),
            data: data.clone(),
            run_as,
        };

        // initdb: superuser `postgres`, trust auth, no fsync (the data is thrown away).
        let initdb = bin.join("initdb");
        let args: Vec<OsString> = vec![
            "-D".into(),
            data.clone().into(),
            "-U".into(),
            "postgres".into(),
            "--auth=trust".into(),
            "--encoding=UTF8".into(),
            "--locale=C".into(),
            "--no-sync".into(),
        ];
        util::run_captured(
            &mut dir.command(&initdb, &args),
            "initdb could not create the cluster (see its output above).",
        )?;

        let port = free_port()?;
        // pg_ctl passes -o through /bin/sh, hence the quoting of the socket directory.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off",
            port,
            shell_quote(&sock)
        );
        let args: Vec<OsString> = vec![
            "-D".into(),
            data.clone().into(),
            "-l".into(),
            log.clone().into(),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "-o".into(),
            options.into(),
            "start".into(),
        ];
        let started = util::run_captured(
            &mut dir.command(&dir.pg_ctl, &args),
            "pg_ctl could not start the server.",
        );
        if let Err(err) = started {
            // It may have come up after pg_ctl gave up waiting.
            dir.stop("immediate");
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = log_text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{err:#}\nserver log ({}):\n  {}",
                log.display(),
                tail.join("\n  ")
            );
        }
        Ok(Cluster { dir, port })
    }
}

impl ClusterDir {
    /// A command running `program` as the cluster's owner.
    fn command(&self, program: &Path, args: &[OsString]) -> Command {
        let mut cmd = match &self.run_as {
            Some(run_as) => run_as.command(program, args),
            None => {
                let mut cmd = Command::new(program);
                cmd.args(args);
                cmd
            }
        };
        // The owner may not be allowed into the caller's working directory.
        cmd.current_dir(&self.base);
        cmd
    }

    fn stop(&self, mode: &str) -> bool {
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data.clone().into(),
            "-m".into(),
            mode.into(),
            "-w".into(),
            "stop".into(),
        ];
        self.command(&self.pg_ctl, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.dir.stop("fast") {
            note!("postgres: throwaway cluster stopped");
            // The data is of no further use; the log stays for a look after a failed run.
            let _ = std::fs::remove_dir_all(&self.dir.data);
        } else {
            note!(
                "postgres: could not stop the throwaway cluster; stop it with \
                 `pg_ctl -D {} stop` (as its owner)",
                self.dir.data.display()
            );
        }
    }
}

/// The user to run PostgreSQL as when we are root: `postgres`, which Debian's package creates.
fn unprivileged_user() -> Result<RunAs> {
    let user = "postgres".to_owned();
    let exists = Command::new("id")
        .args(["-u", &user])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !exists {
        bail!(
            "running as root, and initdb/postgres refuse to run as root, but there is no \
             `{user}` user to run them as: create one (`useradd --system --home-dir \
             /var/lib/postgresql {user}`), or run xtask as a normal user"
        );
    }
    let runuser = util::find_on_path("runuser").or_else(|| {
        ["/usr/sbin/runuser", "/sbin/runuser"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| util::is_executable(p))
    });
    Ok(RunAs { user, runuser })
}

/// Prepares an empty directory for the cluster: `<target>/xtask/pg`, or one under the temporary
/// directory when the cluster's owner cannot reach the target directory or its path is too long
/// for a Unix socket.
fn choose_base(target: &Path, run_as: Option<&RunAs>) -> Result<PathBuf> {
    let preferred = target.join("xtask").join("pg");
    let fallback = std::env::temp_dir().join("mmrctl-xtask-pg");
    let mut problems = Vec::new();
    for base in [preferred, fallback] {
        // `<base>/sock/.s.PGSQL.65535.lock` must fit in sun_path (108 bytes).
        if base.as_os_str().len() + 30 > 107 {
            problems.push(format!(
                "{}: path too long for a Unix socket",
                base.display()
            ));
            continue;
        }
        match prepare_base(&base, run_as) {
            Ok(()) => return Ok(base),
            Err(err) => problems.push(format!("{}: {err:#}", base.display())),
        }
    }
    bail!(
        "no usable directory for the cluster:\n  {}",
        problems.join("\n  ")
    )
}

fn prepare_base(base: &Path, run_as: Option<&RunAs>) -> Result<()> {
    let data = base.join("data");
    // A cluster left running by an interrupted run: stop it before wiping its directory.
    if data.join("postmaster.pid").exists()
        && let Some(bin) = find_bin_dir()
    {
        let stale = ClusterDir {
            pg_ctl: bin.join("pg_ctl"),
            base: base.to_path_buf(),
            data: data.clone(),
            run_as: run_as.cloned(),
        };
        if stale.stop("immediate") {
            note!("postgres: stopped a cluster left running by an earlier run");
        }
    }
    if base.exists() {
        std::fs::remove_dir_all(base)
            .with_context(|| format!("cannot remove {}", base.display()))?;
    }
    std::fs::create_dir_all(base.join("sock"))
        .with_context(|| format!("cannot create {}", base.display()))?;
    if let Some(run_as) = run_as {
        util::run_captured(
            Command::new("chown").args(["-R", &run_as.user]).arg(base),
            "cannot hand the cluster directory to its owner",
        )?;
        // Every parent directory must let the owner through.
        let mut probe = run_as.command(Path::new("test"), &["-w".into(), base.into()]);
        let reachable = probe
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !reachable {
            let _ = std::fs::remove_dir_all(base);
            bail!("user `{}` cannot write there", run_as.user);
        }
    }
    Ok(())
}

/// A loopback TCP port nobody listens on right now.
fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).context("cannot find a free loopback port")?;
    Ok(listener.local_addr()?.port())
}
