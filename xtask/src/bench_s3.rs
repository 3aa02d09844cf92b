//! The S3 datastore bench (`cargo xtask bench`, section `s3`): upload and download throughput of
//! 100 MiB objects through a release `mmrctl serve` whose only datastore is S3, against moto's
//! server (from the tools venv) on a loopback port, with moto alone as the baseline.
//!
//! moto is an in-memory Python server: its own throughput bounds what we can show, so the figures
//! measure moto more than mmrctl. What they do show about mmrctl: the overhead over talking to moto
//! directly, and the server's peak memory while objects far larger than it stream through.
//!
//! Std only (xtask's rule): the HTTP/1.1 client below is just enough for these requests.

use std::io::{BufRead as _, BufReader, Read, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::util::{self, note};
use crate::{postgres, tools};

const MIB: u64 = 1024 * 1024;
/// Each object's size.
const OBJECT: u64 = 100 * MIB;
/// Objects uploaded and downloaded (distinct contents: no dedup); the median is reported.
const ROUNDS: u64 = 3;
/// The server's peak RSS must stay under this while 100 MiB objects pass through.
const PEAK_RSS_TARGET_MIB: f64 = 100.0;
const BUCKET: &str = "bench";
const SECRET: &str = "bench-shared-secret";
const HS: &str = "bench.test";
/// moto checks no signature but wants one on object requests.
const FAKE_AUTH: &str = "AWS4-HMAC-SHA256 Credential=bench/20250101/us-east-1/s3/aws4_request, \
                         SignedHeaders=host;x-amz-date, Signature=0000";

/// What the section reports.
pub(crate) struct Report {
    pub(crate) markdown: String,
    pub(crate) missed: Vec<String>,
}

pub(crate) fn run(date: &str, machine: &str) -> Result<Report> {
    let target = util::target_dir();
    let pg = postgres::provide(&target)?;
    let tools_bin = tools::ensure_venv(&target)?;

    let mut build = util::cargo();
    build.args(["build", "--release", "-p", "mmrctl"]);
    note!("running `{}`", util::display_cargo(&build));
    let status = util::run_status(&mut build)?;
    if !status.success() {
        bail!("`{}` failed ({status})", util::display_cargo(&build));
    }

    let dir = target.join("bench-s3");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let db = Database::create(&pg.url)?;
    let moto = Process::start(
        Command::new(tools_bin.join("moto_server")).args([
            "-H",
            "127.0.0.1",
            "-p",
            &free_port()?.to_string(),
        ]),
        &dir.join("moto.log"),
    )?;
    let moto_port = port_of(&moto.command)?;
    wait_for(moto_port, "/", &[], &moto)?;
    let r = request(moto_port, "PUT", &format!("/{BUCKET}"), &[], Body::Empty)?;
    if r.status != 200 {
        bail!("creating the bucket failed: {} {}", r.status, r.text);
    }

    let port = free_port()?;
    let config = dir.join("media-repo.yaml");
    std::fs::write(&config, config_yaml(port, &db.url, moto_port, &dir))
        .with_context(|| format!("cannot write {}", config.display()))?;
    let mut serve_cmd = Command::new(target.join("release").join("mmrctl"));
    serve_cmd.arg("serve").arg("--config").arg(&config);
    let serve = Process::start(&mut serve_cmd, &dir.join("serve.log"))?;
    wait_for(port, "/healthz", &[], &serve)?;

    let auth = format!("Bearer {SECRET}");
    let mut up = Vec::new();
    let mut down = Vec::new();
    let mut moto_up = Vec::new();
    let mut moto_down = Vec::new();
    for round in 0..ROUNDS {
        // Through mmrctl: the body streams to tempPath, then goes to S3 in 16 MiB parts.
        let started = Instant::now();
        let r = request(
            port,
            "POST",
            "/_matrix/media/v3/upload",
            &[("Host", HS), ("Authorization", &auth)],
            Body::Pattern(round, OBJECT),
        )?;
        up.push(mb_s(OBJECT, started.elapsed()));
        if r.status != 200 {
            bail!("upload {round} failed: {} {}", r.status, r.text);
        }
        let media_id = r
            .text
            .split("mxc://")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.rsplit('/').next())
            .with_context(|| format!("no content_uri in {}", r.text))?
            .to_owned();
        let started = Instant::now();
        let r = request(
            port,
            "GET",
            &format!("/_matrix/client/v1/media/download/{HS}/{media_id}"),
            &[("Host", HS), ("Authorization", &auth)],
            Body::Empty,
        )?;
        down.push(mb_s(OBJECT, started.elapsed()));
        if r.status != 200 || r.len != OBJECT {
            bail!("download {round}: {} with {} bytes", r.status, r.len);
        }

        // moto alone, for comparison: one PUT and one GET of the same size.
        let key = format!("/{BUCKET}/direct-{round}");
        let started = Instant::now();
        let r = request(
            moto_port,
            "PUT",
            &key,
            &[("Authorization", FAKE_AUTH)],
            Body::Pattern(100 + round, OBJECT),
        )?;
        moto_up.push(mb_s(OBJECT, started.elapsed()));
        if r.status != 200 {
            bail!("PUT to moto failed: {} {}", r.status, r.text);
        }
        let started = Instant::now();
        let r = request(
            moto_port,
            "GET",
            &key,
            &[("Authorization", FAKE_AUTH)],
            Body::Empty,
        )?;
        moto_down.push(mb_s(OBJECT, started.elapsed()));
        if r.status != 200 || r.len != OBJECT {
            bail!("GET from moto: {} with {} bytes", r.status, r.len);
        }
    }
    let peak = peak_rss_mib(serve.child.id())?;
    drop(serve);
    drop(moto);
    drop(db);

    let [up, down, moto_up, moto_down] = [up, down, moto_up, moto_down].map(median);
    note!(
        "bench s3: upload {up:.0} MB/s, download {down:.0} MB/s (moto alone: PUT {moto_up:.0}, \
         GET {moto_down:.0} MB/s); peak RSS {peak:.1} MiB"
    );
    let pass = peak < PEAK_RSS_TARGET_MIB;
    let markdown = format!(
        "## S3 datastore\n\n\
         `mmrctl serve` (release build) with one S3 datastore, against moto's server (`moto[server]` \
         from the tools venv) on a loopback port: {ROUNDS} objects of {} MiB each (distinct \
         contents), uploaded through `/_matrix/media/v3/upload` (streamed to `tempPath`, then a \
         multipart upload of 16 MiB parts) and downloaded through the authenticated endpoint \
         (streamed from `GetObject`); medians. \"moto alone\" is one `PutObject` and one `GetObject` \
         of the same size sent straight to moto.\n\n\
         moto is an in-memory Python server: its throughput bounds these figures, which measure \
         moto more than mmrctl. A real S3 or MinIO is faster; what carries over is the overhead \
         over moto alone and the server's memory, which stays flat whatever the object size.\n\n\
         | date (UTC) | machine | upload | download | moto alone: PUT | moto alone: GET | peak RSS | target | result |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n\
         | {date} | {} | {up:.0} MB/s | {down:.0} MB/s | {moto_up:.0} MB/s | {moto_down:.0} MB/s | \
         {peak:.1} MiB | peak RSS < {PEAK_RSS_TARGET_MIB:.0} MiB | {} |",
        OBJECT / MIB,
        machine.replace('|', "\\|"),
        if pass { "pass" } else { "**fail**" },
    );
    let missed = if pass {
        Vec::new()
    } else {
        vec![format!(
            "s3: peak RSS {peak:.1} MiB, target < {PEAK_RSS_TARGET_MIB:.0} MiB"
        )]
    };
    Ok(Report { markdown, missed })
}

fn config_yaml(port: u16, db_url: &str, moto_port: u16, dir: &Path) -> String {
    format!(
        "repo:\n  bindAddress: 127.0.0.1\n  port: {port}\n  logDirectory: '-'\n  logLevel: info\n\
         database:\n  postgres: \"{db_url}\"\n\
         homeservers:\n- name: {HS}\n  csApi: http://127.0.0.1:9\n\
         sharedSecretAuth:\n  enabled: true\n  token: {SECRET}\n\
         uploads:\n  maxBytes: {}\n\
         datastores:\n- type: s3\n  id: bench-s3\n  forKinds: [all]\n  opts:\n\
         \x20   tempPath: \"{}\"\n    endpoint: 127.0.0.1:{moto_port}\n    accessKeyId: bench\n\
         \x20   accessSecret: bench\n    ssl: false\n    bucketName: {BUCKET}\n\
         urlPreviews:\n  enabled: false\n",
        2 * OBJECT,
        dir.join("s3-tmp").display()
    )
}

fn mb_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The `-p PORT` of a moto command line.
fn port_of(command: &str) -> Result<u16> {
    command
        .split_whitespace()
        .skip_while(|w| *w != "-p")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no port in `{command}`"))
}

/// `VmHWM` of a process, in MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/<pid>/status")?;
    Ok(kib / 1024.0)
}

/// A child process with its output in a log file, killed when dropped.
struct Process {
    child: Child,
    command: String,
    log: PathBuf,
}

impl Process {
    fn start(cmd: &mut Command, log: &Path) -> Result<Process> {
        let out = std::fs::File::create(log)?;
        let err = out.try_clone()?;
        let command = util::display_command(cmd);
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        Ok(Process {
            child,
            command,
            log: log.to_path_buf(),
        })
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(port: u16, path: &str, headers: &[(&str, &str)], process: &Process) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = request(port, "GET", path, headers, Body::Empty)
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "`{}` did not answer on port {port} within 60 s; its log:\n{}",
                process.command,
                process.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A request body.
enum Body {
    Empty,
    /// `len` bytes of a pattern (seeded), generated while sending.
    Pattern(u64, u64),
}

struct Response {
    status: u16,
    /// Body bytes received (counted, not kept).
    len: u64,
    /// The body when it is small (errors, JSON).
    text: String,
}

/// One HTTP/1.1 request on a new connection (`Connection: close`).
fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Body,
) -> Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let len = match body {
        Body::Empty => 0,
        Body::Pattern(_, len) => len,
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        head.push_str(&format!(
            "Content-Type: application/octet-stream\r\nContent-Length: {len}\r\n"
        ));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    if let Body::Pattern(seed, len) = body {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut chunk = vec![0u8; MIB as usize];
        let mut sent = 0;
        while sent < len {
            for word in chunk.chunks_exact_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                word.copy_from_slice(&state.to_le_bytes());
            }
            let n = (len - sent).min(MIB) as usize;
            stream.write_all(&chunk[..n])?;
            sent += n as u64;
        }
    }

    let mut reader = BufReader::with_capacity(256 * 1024, stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status line in `{line}`"))?;
    let mut content_length = None;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse::<u64>().ok();
        }
    }
    let mut received = 0u64;
    let mut text = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut body = reader.take(content_length.unwrap_or(u64::MAX));
    loop {
        let n = body.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if text.len() < 4096 {
            text.extend_from_slice(&buf[..n.min(4096)]);
        }
        received += n as u64;
    }
    Ok(Response {
        status,
        len: received,
        text: String::from_utf8_lossy(&text).into_owned(),
    })
}

/// A throwaway database on the bench's PostgreSQL server, dropped afterwards (with `psql`).
struct Database {
    server_url: String,
    name: String,
    url: String,
    psql: PathBuf,
}

impl Database {
    fn create(server_url: &str) -> Result<Database> {
        let psql = util::find_on_path("psql")
            .or_else(|| {
                let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path().join("bin/psql")))
                    .filter(|p| util::is_executable(p))
                    .collect();
                found.sort();
                found.pop()
            })
            .context("the S3 bench creates its database with `psql`, which was not found")?;
        let name = format!("mmrctl_bench_s3_{}", std::process::id());
        let db = Database {
            url: with_database(server_url, &name),
            server_url: server_url.to_owned(),
            name,
            psql,
        };
        db.psql(&format!("DROP DATABASE IF EXISTS {}", db.name))?;
        db.psql(&format!("CREATE DATABASE {}", db.name))?;
        Ok(db)
    }

    fn psql(&self, sql: &str) -> Result<String> {
        util::run_captured(
            Command::new(&self.psql).args([self.server_url.as_str(), "-qc", sql]),
            "the bench's PostgreSQL server must accept this user",
        )
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Err(e) = self.psql(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )) {
            note!("could not drop the bench database {}: {e:#}", self.name);
        }
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_urls() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "b"),
            "postgres://postgres@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_database("postgres://u:p@h/d?sslmode=disable", "b"),
            "postgres://u:p@h/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "b"), "postgres://h:1/b");
    }

    #[test]
    fn medians_and_ports() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(port_of("moto_server -H 127.0.0.1 -p 4567").ok(), Some(4567));
    }
}
