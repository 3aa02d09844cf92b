//! `mmrctl-bench --previews`: URL previews of a local 200 KiB page (OpenGraph in its head, an
//! `og:image` of 40 KiB) by `mmrctl serve` and by Synapse (`url_preview_enabled`, loopback
//! whitelisted), from a page server in this process. Cold previews each ask for a URL not seen
//! before (and its image under a new URL too), so both fetch, parse and store everything; then one
//! URL again and again (cached); then 50 distinct cold previews at once (mmrctl's peak RSS beside
//! its peak while previewing one at a time).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, json};

use crate::procfs::{self, MIB};
use crate::servers::{MediaRepo, SynapseServer, Target};
use crate::{SERVER_NAME, percentile_ms};

/// The targets, as the tracker states them.
const COLD_VS_SYNAPSE: f64 = 3.0;
const CACHED_VS_COLD: f64 = 20.0;
/// "Flat": the peak with 50 previews at once within this much of the peak one at a time.
const CONCURRENT_RSS_GROWTH_MIB: f64 = 25.0;

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    cold: usize,
    cached: usize,
    concurrent: usize,
    page_bytes: usize,
}

pub(crate) const FULL: Sizes = Sizes {
    cold: 40,
    cached: 200,
    concurrent: 50,
    page_bytes: 200 * 1024,
};

pub(crate) const QUICK: Sizes = Sizes {
    cold: 5,
    cached: 10,
    concurrent: 8,
    page_bytes: 200 * 1024,
};

/// A news article's shape: OpenGraph and Twitter tags in the head, scripts and styles, then a long
/// body of paragraphs, padded to `bytes`.
fn page(bytes: usize, port: u16) -> Vec<u8> {
    let mut html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>A long article about media repositories | Example News</title>
<meta name="description" content="How a media repository de-duplicates, thumbnails and previews.">
<meta property="og:type" content="article">
<meta property="og:site_name" content="Example News">
<meta property="og:title" content="A long article about media repositories">
<meta property="og:description" content="How a media repository de-duplicates, thumbnails and previews, and what it costs.">
<meta property="og:image" content="http://127.0.0.1:{port}/image.png?for=PAGE">
<meta name="twitter:card" content="summary_large_image">
<link rel="stylesheet" href="/style.css"><script>window.analytics = {{ id: 42 }};</script>
<style>body {{ font-family: sans-serif; }} .x {{ color: red; }}</style>
</head><body><header><nav><a href="/">Home</a> <a href="/world">World</a></nav></header><main>
"#
    );
    let paragraph = "<p>Media repositories keep what users upload and what other servers send, \
                     once per content, and make thumbnails of it on request. <a href=\"/more\">More</a> \
                     on <b>this</b> below.</p>\n";
    while html.len() + paragraph.len() + 40 < bytes {
        html.push_str(paragraph);
    }
    html.push_str("</main></body></html>\n");
    html.into_bytes()
}

/// A 40 KiB-ish PNG of noise, made with Pillow from the tools venv.
fn image() -> Result<Vec<u8>> {
    let python = testkit::python();
    let out = Command::new(&python)
        .args([
            "-c",
            "import sys, io\nfrom PIL import Image\nb = io.BytesIO()\n\
             Image.effect_noise((120, 90), 80).convert('RGB').save(b, 'PNG')\n\
             sys.stdout.buffer.write(b.getvalue())",
        ])
        .output()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!("making the bench's image with Pillow failed");
    }
    Ok(out.stdout)
}

/// Serves the page at `/page?n=...` (its `og:image` under the same `n`) and the image at
/// `/image.png?...`, one thread per connection, `Connection: close`.
pub(crate) fn serve_pages(sizes: Sizes) -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let page = Arc::new(page(sizes.page_bytes, port));
    let image = Arc::new(image()?);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (page, image) = (page.clone(), image.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).unwrap_or(0) == 0 || header.trim().is_empty() {
                        break;
                    }
                }
                let n = target.split_once("?n=").map_or("0", |(_, n)| n);
                let (content_type, body): (&str, Vec<u8>) = if target.starts_with("/image.png") {
                    ("image/png", image.to_vec())
                } else if target.starts_with("/page") {
                    let text =
                        String::from_utf8_lossy(&page).replace("for=PAGE", &format!("for={n}"));
                    ("text/html; charset=utf-8", text.into_bytes())
                } else {
                    ("text/plain", b"not found".to_vec())
                };
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n",
                    body.len()
                );
                let mut stream = &stream;
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body);
            });
        }
    });
    Ok(port)
}

pub(crate) fn preview(target: &Target, url: &str) -> Result<Duration> {
    let request = format!(
        "{}/_matrix/client/v1/media/preview_url?url={}",
        target.base_url,
        testkit::http::encode(url)
    );
    let auth = format!("Bearer {}", target.token);
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(host) = &target.host {
        headers.push(("Host", host));
    }
    let started = Instant::now();
    let r = testkit::http::get(&request, &headers);
    let took = started.elapsed();
    if r.status != 200 {
        bail!(
            "{} preview of {url}: {} {}",
            target.label,
            r.status,
            r.text()
        );
    }
    let og = r.json();
    if og["og:title"] != "A long article about media repositories"
        || !og["og:image"]
            .as_str()
            .is_some_and(|i| i.starts_with("mxc://"))
    {
        bail!("{} previewed {url} as {og}", target.label);
    }
    Ok(took)
}

/// Cold previews of `/page?n={run}-{i}`: p50 and p99 in ms.
fn cold(target: &Target, port: u16, run: &str, n: usize) -> Result<(f64, f64)> {
    let mut times = Vec::new();
    for i in 0..n {
        times.push(preview(
            target,
            &format!("http://127.0.0.1:{port}/page?n={run}-{i}"),
        )?);
    }
    times.sort();
    Ok((percentile_ms(&times, 0.5), percentile_ms(&times, 0.99)))
}

/// The same URL `n` times (after one untimed fetch): p50 and p99 in ms.
fn cached(target: &Target, port: u16, n: usize) -> Result<(f64, f64)> {
    let url = format!("http://127.0.0.1:{port}/page?n=cached");
    preview(target, &url)?;
    let mut times = Vec::new();
    for _ in 0..n {
        times.push(preview(target, &url)?);
    }
    times.sort();
    Ok((percentile_ms(&times, 0.5), percentile_ms(&times, 0.99)))
}

/// `n` distinct cold previews at once: the server's peak RSS in MiB and the wall time in ms.
fn concurrent(target: &Target, port: u16, n: usize) -> Result<(f64, f64)> {
    let peak = procfs::PeakRss::start(target.pid);
    let started = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                s.spawn(move || {
                    preview(target, &format!("http://127.0.0.1:{port}/page?n=many-{i}"))
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a request thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    let wall = started.elapsed().as_secs_f64() * 1000.0;
    Ok((peak.stop() as f64 / MIB as f64, wall))
}

pub(crate) fn run(mmrctl: &std::path::Path, sizes: Sizes) -> Result<()> {
    let busy_start = crate::wait_until_quiet();
    let loadavg_start = crate::loadavg();
    let port = serve_pages(sizes)?;
    let mut out = Map::new();
    out.insert("name".into(), json!("previews"));
    out.insert("busy_start_pct".into(), json!(busy_start));
    out.insert("loadavg_start".into(), json!(loadavg_start));
    out.insert("page_bytes".into(), json!(sizes.page_bytes));
    out.insert("cold_runs".into(), json!(sizes.cold));
    out.insert("cached_runs".into(), json!(sizes.cached));
    out.insert("concurrent".into(), json!(sizes.concurrent));

    let dir = tempfile::Builder::new().prefix("mmrctl-bench-").tempdir()?;
    progress!("starting mmrctl serve ...");
    let repo = MediaRepo::start_with(
        mmrctl,
        dir,
        SERVER_NAME,
        "http://127.0.0.1:9",
        |c| {
            c["urlPreviews"] = json!({
                "enabled": true,
                "allowedNetworks": ["127.0.0.1/32"],
                "disallowedNetworks": [],
                "allowedPorts": [port],
            })
        },
        &[],
    )?;
    let ours = repo.target(SERVER_NAME);
    cold(&ours, port, "warm", 2)?;
    let one_at_a_time = procfs::PeakRss::start(ours.pid);
    let (cold_p50, cold_p99) = cold(&ours, port, "cold", sizes.cold)?;
    let sequential_rss = one_at_a_time.stop() as f64 / MIB as f64;
    progress!(
        "mmrctl: cold p50 {cold_p50:.2} ms, p99 {cold_p99:.2} ms, peak RSS {sequential_rss:.1} MiB"
    );
    let (cached_p50, cached_p99) = cached(&ours, port, sizes.cached)?;
    progress!("mmrctl: cached p50 {cached_p50:.3} ms, p99 {cached_p99:.3} ms");
    let (rss, wall) = concurrent(&ours, port, sizes.concurrent)?;
    progress!(
        "mmrctl: {} at once in {wall:.0} ms, peak RSS {rss:.1} MiB",
        sizes.concurrent
    );
    drop(repo);
    out.insert("mmrctl_cold_p50_ms".into(), json!(cold_p50));
    out.insert("mmrctl_cold_p99_ms".into(), json!(cold_p99));
    out.insert("mmrctl_cached_p50_ms".into(), json!(cached_p50));
    out.insert("mmrctl_cached_p99_ms".into(), json!(cached_p99));
    out.insert("mmrctl_sequential_rss_mib".into(), json!(sequential_rss));
    out.insert("mmrctl_concurrent_rss_mib".into(), json!(rss));
    out.insert("mmrctl_concurrent_ms".into(), json!(wall));

    progress!("starting Synapse (url_preview_enabled, 127.0.0.1 whitelisted) ...");
    let synapse = SynapseServer::start_with(
        SERVER_NAME,
        &[
            ("url_preview_enabled", json!(true)),
            ("url_preview_ip_range_blacklist", json!(["10.0.0.0/8"])),
            ("url_preview_ip_range_whitelist", json!(["127.0.0.1"])),
        ],
    )?;
    let theirs = synapse.target();
    out.insert("synapse_version".into(), json!(synapse.version()));
    cold(&theirs, port, "warm", 2)?;
    let (synapse_p50, synapse_p99) = cold(&theirs, port, "cold", sizes.cold)?;
    progress!("Synapse: cold p50 {synapse_p50:.2} ms, p99 {synapse_p99:.2} ms");
    let (synapse_cached_p50, _) = cached(&theirs, port, sizes.cached)?;
    progress!("Synapse: cached p50 {synapse_cached_p50:.3} ms");
    drop(synapse);
    out.insert("synapse_cold_p50_ms".into(), json!(synapse_p50));
    out.insert("synapse_cold_p99_ms".into(), json!(synapse_p99));
    out.insert("synapse_cached_p50_ms".into(), json!(synapse_cached_p50));

    let checks = [
        (
            "cold_synapse",
            cold_p50 * COLD_VS_SYNAPSE <= synapse_p50,
            synapse_p50 / COLD_VS_SYNAPSE,
        ),
        (
            "cached_cold",
            cached_p50 * CACHED_VS_COLD <= cold_p50,
            cold_p50 / CACHED_VS_COLD,
        ),
        (
            "concurrent_rss",
            rss <= sequential_rss + CONCURRENT_RSS_GROWTH_MIB,
            sequential_rss + CONCURRENT_RSS_GROWTH_MIB,
        ),
    ];
    crate::print_result(out, &checks);
    Ok(())
}
