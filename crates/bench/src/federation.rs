//! `mmrctl-bench --federation`: remote media fetched over federation by `mmrctl serve` and by
//! Synapse, from a static remote: nginx over TLS serving prebuilt `multipart/mixed` answers from
//! disk, laid out exactly as Synapse writes them. Beside them the limit: the same answers fetched
//! raw over the same loopback TLS by a rustls client (bytes discarded), each just before mmrctl's
//! cold fetch of it, so that the two see the same moments of the machine.
//!
//! mmrctl is measured first; then it is stopped and two stock Synapses start
//! (`testkit::Federation`), homeserver B fetching. The remote is started again for Synapse with
//! the harness's certificate (Synapse trusts only the harness's CA); its files are the same.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value, json};
use testkit::{Federation, Nginx, TestCerts};

use crate::load::{self, Bodies, Timed};
use crate::procfs::{self, MIB};
use crate::servers::{MediaRepo, Target, synapse_version};
use crate::{SERVER_NAME, mb_per_s, mib, pattern, percentile_ms};

/// The targets, as the tracker states them.
const COLD_OF_LIMIT: f64 = 0.6;
const COLD_VS_SYNAPSE: f64 = 2.0;
/// A cached remote download is served as our own media is: within noise of a local download.
const CACHED_OF_LOCAL: f64 = 0.9;
/// Peak RSS after the large fetches at most this times the peak after the small ones (the
/// import bench's "flat").
const RSS_GROWTH: f64 = 1.5;

/// The multipart boundary of every answer (unquoted, the only parameter).
const BOUNDARY: &str = "6d6d7263746c2d62656e6368";
const FEDERATION_DOWNLOAD: &str = "/_matrix/federation/v1/media/download/";

/// What one run fetches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    small: u64,
    large: u64,
    /// Fetches of each size, each of its own file under its own id (after one untimed warm-up).
    runs: u64,
}

pub(crate) const FULL: Sizes = Sizes {
    small: 10 * MIB,
    large: 100 * MIB,
    // Seven pairs: the limit moves by ±15% from one moment to the next on a shared machine.
    runs: 7,
};

pub(crate) const QUICK: Sizes = Sizes {
    small: MIB,
    large: 4 * MIB,
    runs: 2,
};

/// One remote file: its media id, the file's length and the whole answer's.
#[derive(Debug, Clone)]
struct File {
    id: String,
    len: u64,
    body_len: u64,
    seed: u64,
}

/// The answers on disk: a warm-up one, then `runs` of each size, all distinct.
struct Files {
    dir: tempfile::TempDir,
    warm_up: File,
    small: Vec<File>,
    large: Vec<File>,
}

impl Files {
    fn write(sizes: &Sizes) -> Result<Files> {
        let dir = tempfile::Builder::new()
            .prefix("mmrctl-bench-remote-")
            .tempdir()?;
        let write = |name: &str, len: u64, seed: u64| -> Result<File> {
            let body_len = write_answer(&dir.path().join(name), len, seed)?;
            Ok(File {
                id: name.to_owned(),
                len,
                body_len,
                seed,
            })
        };
        let warm_up = write("warm-up", sizes.small, 1)?;
        let small = (0..sizes.runs)
            .map(|i| write(&format!("small-{i}"), sizes.small, 1_000 + i))
            .collect::<Result<_>>()?;
        let large = (0..sizes.runs)
            .map(|i| write(&format!("large-{i}"), sizes.large, 2_000 + i))
            .collect::<Result<_>>()?;
        Ok(Files {
            dir,
            warm_up,
            small,
            large,
        })
    }
}

/// Writes a federation download answer as Synapse emits it, around `len` bytes of
/// `pattern(len, seed)`: the answer's length.
fn write_answer(path: &Path, len: u64, seed: u64) -> Result<u64> {
    let head = format!(
        "\r\n--{BOUNDARY}\r\nContent-Type: application/json\r\n\r\n{{}}\r\n--{BOUNDARY}\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{BOUNDARY}--\r\n");
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    out.write_all(head.as_bytes())?;
    out.write_all(&pattern(len as usize, seed))?;
    out.write_all(tail.as_bytes())?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok((head.len() + tail.len()) as u64 + len)
}

/// nginx serving the answers in `dir` at `/_matrix/federation/v1/media/download/<id>` over TLS,
/// as `localhost:<port>`.
struct StaticRemote {
    nginx: Nginx,
    port: u16,
}

impl StaticRemote {
    fn start(dir: &Path, cert: &Path, key: &Path) -> StaticRemote {
        let port = testkit::free_port();
        // `types {}` empties the MIME map, so every file gets `default_type`; nginx sets the
        // Content-Length from the file.
        let http = format!(
            r#"    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate "{cert}";
        ssl_certificate_key "{key}";
        location {FEDERATION_DOWNLOAD} {{
            alias "{dir}/";
            types {{ }}
            default_type "multipart/mixed; boundary={BOUNDARY}";
        }}
    }}
"#,
            cert = cert.display(),
            key = key.display(),
            dir = dir.display(),
        );
        StaticRemote {
            nginx: Nginx::start(&http, &[port]),
            port,
        }
    }

    /// Its server name.
    fn name(&self) -> String {
        format!("localhost:{}", self.port)
    }

    /// nginx's master and workers.
    fn pids(&self) -> Vec<u32> {
        let master = std::fs::read_to_string(self.nginx.dir().join("nginx.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        match master {
            Some(master) => {
                let mut pids = procfs::children(master);
                pids.push(master);
                pids
            }
            None => Vec::new(),
        }
    }
}

/// CPU seconds of some processes, summed (those that have gone count for nothing).
fn cpu_of(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| procfs::cpu_seconds(p)).sum()
}

/// A series of timed fetches of one size, and the CPU each side spent on it.
#[derive(Debug, Default)]
struct Series {
    bytes: u64,
    headers: Vec<Duration>,
    last_byte: Vec<Duration>,
    /// CPU seconds per fetch: the fetching server (none for the limit), the remote's nginx, this
    /// client.
    server_cpu: f64,
    remote_cpu: f64,
    client_cpu: f64,
}

impl Series {
    fn p50_ms(&self) -> f64 {
        let mut sorted = self.last_byte.clone();
        sorted.sort();
        percentile_ms(&sorted, 0.5)
    }

    fn p50_mb_s(&self) -> f64 {
        mb_per_s(self.bytes, Duration::from_secs_f64(self.p50_ms() / 1000.0))
    }

    fn headers_p50_ms(&self) -> f64 {
        let mut sorted = self.headers.clone();
        sorted.sort();
        percentile_ms(&sorted, 0.5)
    }

    fn put(&self, out: &mut Map<String, Value>, prefix: &str) {
        let mut put = |k: &str, v: f64| {
            out.insert(format!("{prefix}_{k}"), json!(v));
        };
        put("mb_s", self.p50_mb_s());
        put("p50_ms", self.p50_ms());
        put("headers_ms", self.headers_p50_ms());
        put("server_cpu_ms", 1000.0 * self.server_cpu);
        put("remote_cpu_ms", 1000.0 * self.remote_cpu);
        put("client_cpu_ms", 1000.0 * self.client_cpu);
    }
}

/// The processes whose CPU a series counts: the fetching server (none for the limit), the
/// remote's nginx, this client.
struct Pids {
    server: Vec<u32>,
    remote: Vec<u32>,
    me: u32,
}

impl Pids {
    fn new(server: Option<u32>, remote: &StaticRemote) -> Pids {
        Pids {
            server: server.into_iter().collect(),
            remote: remote.pids(),
            me: std::process::id(),
        }
    }

    fn cpu(&self) -> [f64; 3] {
        [
            cpu_of(&self.server),
            cpu_of(&self.remote),
            cpu_of(&[self.me]),
        ]
    }
}

impl Series {
    /// Times `fetch` of `file` (its whole answer when `raw`, else its file) and adds the CPU
    /// each side spent on it.
    async fn add(
        &mut self,
        label: &str,
        file: &File,
        raw: bool,
        pids: &Pids,
        fetch: impl std::future::Future<Output = Result<Timed>>,
    ) -> Result<()> {
        let before = pids.cpu();
        let timed = fetch.await?;
        let after = pids.cpu();
        self.server_cpu += after[0] - before[0];
        self.remote_cpu += after[1] - before[1];
        self.client_cpu += after[2] - before[2];
        self.bytes = if raw { file.body_len } else { file.len };
        progress!(
            "{label}: {} MiB: {:.0} MB/s (headers after {:.1} ms, last byte after {:.1} ms)",
            file.len / MIB,
            mb_per_s(self.bytes, timed.last_byte),
            timed.headers.as_secs_f64() * 1000.0,
            timed.last_byte.as_secs_f64() * 1000.0,
        );
        self.headers.push(timed.headers);
        self.last_byte.push(timed.last_byte);
        Ok(())
    }

    /// The CPU sums made per fetch; prints the series' summary.
    fn finish(mut self, label: &str) -> Series {
        let n = self.last_byte.len().max(1) as f64;
        self.server_cpu /= n;
        self.remote_cpu /= n;
        self.client_cpu /= n;
        progress!(
            "{label}: p50 {:.0} MB/s; CPU per fetch: server {:.0} ms, remote {:.0} ms, client {:.0} ms",
            self.p50_mb_s(),
            1000.0 * self.server_cpu,
            1000.0 * self.remote_cpu,
            1000.0 * self.client_cpu,
        );
        self
    }
}

/// A rustls client (as mmrctl's outbound one) trusting only `ca`, with `localhost` resolved to
/// 127.0.0.1 (where the remote listens).
fn tls_client(ca: &Path, port: u16) -> Result<reqwest::Client> {
    let pem = std::fs::read(ca).with_context(|| format!("cannot read {}", ca.display()))?;
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem)?])
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("cannot build the TLS client")
}

/// The raw answer of `file` from the remote, bytes counted and discarded.
async fn raw_fetch(client: &reqwest::Client, remote: &StaticRemote, file: File) -> Result<Timed> {
    let url = format!(
        "https://localhost:{}{FEDERATION_DOWNLOAD}{}?timeout_ms=20000",
        remote.port, file.id
    );
    let start = Instant::now();
    let response = client
        .get(&url)
        .timeout(Duration::from_secs(300))
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let headers = start.elapsed();
    let status = response.status();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let wanted = format!("multipart/mixed; boundary={BOUNDARY}");
    if !status.is_success() || content_type != wanted {
        bail!("GET {url}: {status}, Content-Type {content_type:?} (expected {wanted:?})");
    }
    let received = load::drain(response).await?;
    let last_byte = start.elapsed();
    if received != file.body_len {
        bail!("GET {url}: {received} bytes, expected {}", file.body_len);
    }
    Ok(Timed { headers, last_byte })
}

/// The untimed first fetch through a server (connections, discovery, first writes): its whole
/// body, checked against the file.
async fn warm_up(client: &reqwest::Client, target: &Target, file: &File) -> Result<()> {
    let url = format!(
        "{}/_matrix/client/v1/media/download/{}/{}",
        target.base_url, target.server_name, file.id
    );
    let mut request = client
        .get(&url)
        .bearer_auth(&target.token)
        .timeout(Duration::from_secs(120));
    if let Some(host) = &target.host {
        request = request.header(reqwest::header::HOST, host);
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let status = response.status();
    let body = response.bytes().await?;
    if !status.is_success() {
        bail!(
            "{}: GET {url}: {status}: {}",
            target.label,
            String::from_utf8_lossy(&body)
        );
    }
    if body[..] != pattern(file.len as usize, file.seed)[..] {
        bail!(
            "{}: GET {url}: {} bytes that are not the remote's file",
            target.label,
            body.len()
        );
    }
    progress!("{}: warm-up fetch of {} ok", target.label, file.id);
    Ok(())
}

/// What one fetching server achieved.
struct Fetched {
    small: Series,
    large: Series,
    /// The raw fetches made beside the server's, when asked for: small, large.
    limit: Option<(Series, Series)>,
    idle_rss: u64,
    hwm_small: u64,
    hwm_large: u64,
}

/// A warm-up fetch, then the cold fetches of each size through `target` (a server with nothing
/// cached), with its peak RSS after each size. With `limit` (a client of the remote), each cold
/// fetch follows a raw fetch of the same answer, so that the server and the limit see the same
/// moments of the machine.
async fn cold_fetches(
    client: &reqwest::Client,
    target: &Target,
    remote: &StaticRemote,
    files: &Files,
    limit: Option<&reqwest::Client>,
) -> Result<Fetched> {
    let idle_rss = procfs::rss(target.pid).context("no RSS for the server")?;
    warm_up(client, target, &files.warm_up).await?;
    if let Some(tls) = limit {
        raw_fetch(tls, remote, files.warm_up.clone()).await?;
    }
    let label = format!("{} cold", target.label);
    let (ours, raw) = (Pids::new(Some(target.pid), remote), Pids::new(None, remote));
    let hwm = || procfs::status_bytes(target.pid, "VmHWM").unwrap_or(0);
    // One size: the server's series, and the limit's beside it when asked for.
    let size = async |batch: &[File]| -> Result<(Series, Option<Series>)> {
        let (mut cold, mut limits) = (Series::default(), Series::default());
        for file in batch {
            if let Some(tls) = limit {
                let fetch = raw_fetch(tls, remote, file.clone());
                limits.add("limit", file, true, &raw, fetch).await?;
            }
            let fetch =
                load::download_timed(client, target, &file.id, file.len, Duration::from_secs(300));
            cold.add(&label, file, false, &ours, fetch).await?;
        }
        let limits = limit.map(|_| limits.finish("limit"));
        Ok((cold.finish(&label), limits))
    };
    let (small, limit_small) = size(&files.small).await?;
    let hwm_small = hwm();
    let (large, limit_large) = size(&files.large).await?;
    let hwm_large = hwm();
    progress!(
        "{}: peak RSS {:.1} MiB after the small fetches, {:.1} MiB after the large ones",
        target.label,
        mib(hwm_small),
        mib(hwm_large)
    );
    Ok(Fetched {
        small,
        large,
        limit: limit_small.zip(limit_large),
        idle_rss,
        hwm_small,
        hwm_large,
    })
}

/// The cached remote files downloaded again, alternating with downloads of a local upload of the
/// same size (so that both see the same moments of the machine): p50 MB/s of each.
async fn cached_and_local(
    client: &reqwest::Client,
    repo: &MediaRepo,
    remote_name: &str,
    files: &[File],
    size: u64,
) -> Result<(f64, f64)> {
    let local = repo.target(SERVER_NAME);
    let mut remote = repo.target(SERVER_NAME);
    remote.server_name = remote_name.to_owned();
    let timeout = Duration::from_secs(300);
    let local_id = load::upload(
        client,
        &local,
        Bodies::new().body(3_000, size),
        size,
        timeout,
    )
    .await?;
    // Each read once untimed: the large ones of both kinds were written around the page cache.
    load::download(client, &local, &local_id, size, timeout).await?;
    for file in files {
        load::download(client, &remote, &file.id, file.len, timeout).await?;
    }
    let (mut cached, mut locals) = (Vec::new(), Vec::new());
    for file in files {
        let c = load::download(client, &remote, &file.id, file.len, timeout).await?;
        let l = load::download(client, &local, &local_id, size, timeout).await?;
        progress!(
            "mmrctl: cached remote {:.0} MB/s, local {:.0} MB/s",
            mb_per_s(file.len, c),
            mb_per_s(size, l)
        );
        cached.push(c);
        locals.push(l);
    }
    let p50 = |mut v: Vec<Duration>| {
        v.sort();
        mb_per_s(
            size,
            Duration::from_secs_f64(percentile_ms(&v, 0.5) / 1000.0),
        )
    };
    Ok((p50(cached), p50(locals)))
}

/// The whole federation bench; prints its JSON line.
/// With `mmrctl_only` (profiling), Synapse is left out and nothing is judged: the figures are in
/// the progress lines.
pub(crate) fn run(mmrctl: &Path, sizes: Sizes, mmrctl_only: bool) -> Result<()> {
    progress!(
        "writing the remote's answers ({} + {} × ({} + {}) MiB) ...",
        sizes.small / MIB,
        sizes.runs,
        sizes.small / MIB,
        sizes.large / MIB
    );
    let files = Files::write(&sizes)?;
    let busy_start = crate::wait_until_quiet();
    let loadavg_start = crate::loadavg();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let http = load::client()?;

    // The limit and mmrctl, against a remote with certificates of our own CA.
    let certs = TestCerts::new();
    let remote = StaticRemote::start(files.dir.path(), &certs.cert_path(), &certs.key_path());
    let remote_name = remote.name();
    progress!("static remote {remote_name} (nginx)");
    let tls = tls_client(&certs.ca_path(), remote.port)?;

    let dir = tempfile::Builder::new().prefix("mmrctl-bench-").tempdir()?;
    let key_path = dir.path().join("mmr.signing.key");
    let key = keys::SigningKey::generate().context("cannot generate a signing key")?;
    std::fs::write(
        &key_path,
        keys::KeyFile::new(keys::KeyFormat::Mmr, vec![key]).to_text(keys::KeyFormat::Mmr),
    )?;
    progress!("starting mmrctl serve ({}) ...", mmrctl.display());
    let ca = certs.ca_path();
    let repo = MediaRepo::start_with(
        mmrctl,
        dir,
        SERVER_NAME,
        "http://127.0.0.1:9",
        |c| {
            c["homeservers"][0]["signingKeyPath"] = json!(key_path);
            // Loopback is refused by default.
            c["federation"] = json!({ "disallowedNetworks": [] });
            c["downloads"] = json!({ "maxBytes": 200 * MIB });
        },
        &[("SSL_CERT_FILE", ca.as_path())],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    let mut target = repo.target(SERVER_NAME);
    target.server_name.clone_from(&remote_name);
    let ours = runtime
        .block_on(async {
            let fetched = cold_fetches(&http, &target, &remote, &files, Some(&tls)).await?;
            let (cached, local) =
                cached_and_local(&http, &repo, &remote_name, &files.large, sizes.large).await?;
            Ok::<_, anyhow::Error>((fetched, cached, local))
        })
        .map_err(|e| e.context(format!("mmrctl serve's log:\n{}", repo.log_tail())));
    drop(repo);
    drop(remote);
    let (mut ours, cached, local) = ours?;
    let (limit_small, limit_large) = ours.limit.take().context("no limit measured")?;
    if mmrctl_only {
        return Ok(());
    }

    // Synapse: homeserver B of two stock ones fetches; the remote now has the harness's
    // certificate, which Synapse trusts.
    progress!("starting two Synapses (testkit::Federation) ...");
    let fed = Federation::start();
    let remote = StaticRemote::start(
        files.dir.path(),
        &fed.certs().cert_path(),
        &fed.certs().key_path(),
    );
    let b = fed.b();
    let (_user, token) = b.register_user("bench", false);
    let config_path = b.synapse().config_path().to_string_lossy().into_owned();
    let pid = procfs::find_pid(&config_path)
        .with_context(|| format!("cannot find Synapse B (no command line holds {config_path})"))?;
    let synapse = synapse_version(b.synapse());
    // Its own listener, as mmrctl's: plain HTTP on loopback, no proxy in front.
    let target = Target {
        label: "Synapse",
        base_url: b.client_url(),
        host: None,
        token,
        server_name: remote.name(),
        pid,
    };
    std::thread::sleep(Duration::from_secs(2));
    crate::wait_until_quiet();
    let theirs = runtime.block_on(cold_fetches(&http, &target, &remote, &files, None))?;
    drop(remote);
    drop(fed);

    let mut out = Map::new();
    out.insert("name".into(), json!("federation"));
    out.insert("synapse_version".into(), json!(synapse));
    let mut put = |k: &str, v: f64| {
        out.insert(k.to_owned(), json!(v));
    };
    put("busy_start_pct", busy_start);
    put("loadavg_start", loadavg_start);
    put("loadavg_end", crate::loadavg());
    put("small_bytes", sizes.small as f64);
    put("large_bytes", sizes.large as f64);
    put("runs", sizes.runs as f64);
    put("mmrctl_cached_mb_s", cached);
    put("mmrctl_local_mb_s", local);
    for (who, f) in [("mmrctl", &ours), ("synapse", &theirs)] {
        put(&format!("{who}_idle_rss_mib"), mib(f.idle_rss));
        put(&format!("{who}_hwm_small_mib"), mib(f.hwm_small));
        put(&format!("{who}_hwm_large_mib"), mib(f.hwm_large));
    }
    let mut targets = Vec::new();
    for (size, limit, ours, theirs) in [
        ("small", &limit_small, &ours.small, &theirs.small),
        ("large", &limit_large, &ours.large, &theirs.large),
    ] {
        limit.put(&mut out, &format!("limit_{size}"));
        ours.put(&mut out, &format!("mmrctl_{size}"));
        theirs.put(&mut out, &format!("synapse_{size}"));
        let cold = ours.p50_mb_s();
        targets.push((
            format!("cold_limit_{size}"),
            cold,
            COLD_OF_LIMIT * limit.p50_mb_s(),
        ));
        targets.push((
            format!("cold_synapse_{size}"),
            cold,
            COLD_VS_SYNAPSE * theirs.p50_mb_s(),
        ));
    }
    targets.push(("cached".to_owned(), cached, CACHED_OF_LOCAL * local));
    for (name, value, threshold) in targets {
        out.insert(format!("target_{name}"), json!(threshold));
        out.insert(format!("pass_{name}"), json!(value >= threshold));
    }
    let rss_limit = RSS_GROWTH * mib(ours.hwm_small);
    out.insert("target_rss_flat".into(), json!(rss_limit));
    out.insert(
        "pass_rss_flat".into(),
        json!(mib(ours.hwm_large) <= rss_limit),
    );
    println!("{}", Value::Object(out));
    Ok(())
}
