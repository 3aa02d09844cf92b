//! A PostgreSQL server of the test's own (a throwaway cluster: initdb, pg_ctl), for tests that
//! stop and restart the database under a running media repo without touching anyone else's.
//! As root the cluster belongs to the `postgres` user (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct PgServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

/// The newest `/usr/lib/postgresql/N/bin` holding initdb and pg_ctl, or `MMRCTL_PG_BIN`.
fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MMRCTL_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").exists() && bin.join("pg_ctl").exists()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server programs (initdb, pg_ctl) in /usr/lib/postgresql/*/bin: install \
             Debian's postgresql package, or set MMRCTL_PG_BIN to the directory holding them"
        )
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|u| u.split_whitespace().next() == Some("0"))
        })
        .unwrap_or(false)
}

impl PgServer {
    pub fn start() -> PgServer {
        let dir = tempfile::tempdir().expect("temp dir for PostgreSQL");
        let data = dir.path().join("data");
        let server = PgServer {
            bin: bin_dir(),
            data,
            port: crate::free_port(),
            _dir: dir,
        };
        if is_root() {
            server.run(
                "chown",
                &["-R", "postgres:postgres", &path_str(server._dir.path())],
            );
        }
        server.pg(
            "initdb",
            &[
                "-D",
                &path_str(&server.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
            ],
        );
        server.start_again();
        server
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server at once, dropping every connection (`pg_ctl stop -m fast`).
    pub fn stop(&self) {
        self.pg(
            "pg_ctl",
            &["-D", &path_str(&self.data), "-m", "fast", "-w", "stop"],
        );
    }

    /// Starts it (again) on its port; returns once it takes connections.
    pub fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            path_str(&self.data)
        );
        let log = self.data.join("server.log");
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &path_str(&self.data),
                "-l",
                &path_str(&log),
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
    }

    /// `program` of the server's binaries, as the cluster's owner.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let program = self.bin.join(program);
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args).current_dir("/");
        cmd
    }

    fn pg(&self, program: &str, args: &[&str]) {
        check(&mut self.command(program, args));
    }

    fn run(&self, program: &str, args: &[&str]) {
        check(Command::new(program).args(args));
    }
}

fn check(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("UTF-8 temp path").to_owned()
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let data = path_str(&self.data);
            let _ = self
                .command("pg_ctl", &["-D", &data, "-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
