//! `mmrctl-bench --thumbnails`: cold thumbnails of a 12 MP photo by `mmrctl serve` and by
//! Synapse (`dynamic_thumbnails: true`, so it makes them on request), beside the machine's limit
//! measured in the same run: libjpeg-turbo's `djpeg -scale 1/8` on the same file (the entropy
//! decoding of the whole file, which no scaling skips). Then all five spec sizes of one upload
//! (mmrctl: five requests at once, one decode; Synapse: its pre-generation at upload, the upload's
//! time with the five sizes configured less its time with none), 20 cold thumbnails of distinct
//! photos at once (mmrctl's peak RSS), and a 100-frame 640x480 GIF thumbnailed animated.
//!
//! The pictures are made with Pillow from the tools venv (photo-like: smooth fields, texture and
//! noise, about 2.2 bits per pixel, like a phone's JPEG).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, json};

use crate::procfs::{self, MIB};
use crate::servers::{MediaRepo, SynapseServer, Target};
use crate::{SERVER_NAME, percentile_ms};

/// The targets, as the tracker states them.
const COLD_OF_LIMIT: f64 = 1.3;
const COLD_VS_SYNAPSE: f64 = 4.0;
const FIVE_VS_SYNAPSE: f64 = 10.0;
const CONCURRENT_RSS_MIB: f64 = 150.0;
/// The stated bound for the animated thumbnail (100 frames of 640x480 to 320x240).
const ANIMATED_MS: f64 = 1000.0;
const ANIMATED_RSS_MIB: f64 = 100.0;

/// Where `cargo xtask bench` puts libjpeg-turbo's `djpeg`.
const DJPEG_VAR: &str = "MMRCTL_DJPEG";

/// The spec's five sizes, as Synapse pre-generates them by default.
const FIVE: [(u32, u32, &str); 5] = [
    (32, 32, "crop"),
    (96, 96, "crop"),
    (320, 240, "scale"),
    (640, 480, "scale"),
    (800, 600, "scale"),
];

#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// Cold 320x240 thumbnails measured (each of a fresh upload), and djpeg runs.
    runs: usize,
    /// Distinct photos thumbnailed at once.
    concurrent: usize,
    width: u32,
    height: u32,
    gif_frames: u32,
}

pub(crate) const FULL: Sizes = Sizes {
    runs: 15,
    concurrent: 20,
    width: 4032,
    height: 3024,
    gif_frames: 100,
};

pub(crate) const QUICK: Sizes = Sizes {
    runs: 3,
    concurrent: 4,
    width: 1600,
    height: 1200,
    gif_frames: 10,
};

/// Writes `photo-0.jpg` .. `photo-{n-1}.jpg` (one picture, re-encoded at qualities 88..: distinct
/// bytes, the same decoding work) and `anim.gif` into `dir`.
const MAKE_PICTURES: &str = r#"
import sys
from PIL import Image, ImageDraw
out, w, h, n, frames = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def field(scale, sigma):
    small = Image.effect_noise((max(2, w // scale), max(2, h // scale)), sigma)
    return small.resize((w, h), Image.BICUBIC)
channels = [Image.blend(field(300, 90), field(30, 60), 0.35) for _ in range(3)]
photo = Image.merge("RGB", channels)
grain = Image.merge("RGB", [Image.effect_noise((w, h), 60) for _ in range(3)])
photo = Image.blend(photo, grain, 0.15)
for i in range(n):
    photo.save(f"{out}/photo-{i}.jpg", quality=88 + i % 8, subsampling="4:2:0")
gif = []
for i in range(frames):
    f = photo.resize((640, 480)).rotate(i * 3.6)
    ImageDraw.Draw(f).text((10, 10), str(i), fill=(255, 255, 255))
    gif.append(f.convert("P", palette=Image.ADAPTIVE))
gif[0].save(f"{out}/anim.gif", save_all=True, append_images=gif[1:], duration=40, loop=0)
"#;

pub(crate) fn make_pictures(dir: &Path, sizes: Sizes) -> Result<()> {
    let python = testkit::python();
    let status = Command::new(&python)
        .arg("-c")
        .arg(MAKE_PICTURES)
        .arg(dir)
        .args([
            sizes.width.to_string(),
            sizes.height.to_string(),
            (sizes.concurrent + sizes.runs + 8).to_string(),
            sizes.gif_frames.to_string(),
        ])
        .status()
        .with_context(|| format!("cannot run {}", python.display()))?;
    if !status.success() {
        bail!("making the bench's pictures with Pillow failed ({status})");
    }
    Ok(())
}

pub(crate) fn photo(dir: &Path, i: usize) -> Result<Vec<u8>> {
    let path = dir.join(format!("photo-{i}.jpg"));
    std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))
}

/// `djpeg -scale 1/8` on the photo, whole process, p50 of `runs`.
fn limit_ms(djpeg: &Path, photo: &Path, runs: usize) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..runs + 1 {
        let started = Instant::now();
        let status = Command::new(djpeg)
            .args(["-scale", "1/8", "-outfile", "/dev/null"])
            .arg(photo)
            .status()
            .with_context(|| format!("cannot run {}", djpeg.display()))?;
        if !status.success() {
            bail!("{} failed ({status})", djpeg.display());
        }
        times.push(started.elapsed());
    }
    times.remove(0);
    times.sort();
    Ok(percentile_ms(&times, 0.5))
}

/// The headers of a request to `target` as its user (`auth`: the `Authorization` value).
fn headers<'a>(target: &'a Target, auth: &'a str) -> Vec<(&'static str, &'a str)> {
    let mut headers = vec![("Authorization", auth)];
    if let Some(host) = &target.host {
        headers.push(("Host", host));
    }
    headers
}

pub(crate) fn upload(
    target: &Target,
    body: &[u8],
    content_type: &str,
) -> Result<(String, Duration)> {
    let url = format!("{}/_matrix/media/v3/upload", target.base_url);
    let auth = format!("Bearer {}", target.token);
    let headers = headers(target, &auth);
    let started = Instant::now();
    let r = testkit::http::send("POST", &url, &headers, Some(content_type), body);
    let took = started.elapsed();
    if r.status != 200 {
        bail!("{} upload: {} {}", target.label, r.status, r.text());
    }
    let uri = r.json()["content_uri"]
        .as_str()
        .context("no content_uri")?
        .to_owned();
    let id = uri.rsplit('/').next().unwrap_or_default().to_owned();
    Ok((id, took))
}

pub(crate) fn thumbnail(target: &Target, id: &str, query: &str) -> Result<(Vec<u8>, Duration)> {
    let url = format!(
        "{}/_matrix/client/v1/media/thumbnail/{}/{id}?{query}",
        target.base_url, target.server_name
    );
    let auth = format!("Bearer {}", target.token);
    let headers = headers(target, &auth);
    let started = Instant::now();
    let r = testkit::http::get(&url, &headers);
    let took = started.elapsed();
    if r.status != 200 {
        bail!(
            "{} thumbnail {query}: {} {}",
            target.label,
            r.status,
            r.text()
        );
    }
    Ok((r.body, took))
}

/// Cold 320x240 `scale` thumbnails, each of a fresh upload of photo `first + i`: p50 in ms.
fn cold_p50(target: &Target, dir: &Path, first: usize, runs: usize) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..runs {
        let (id, _) = upload(target, &photo(dir, first + i)?, "image/jpeg")?;
        let (_, took) = thumbnail(target, &id, "width=320&height=240&method=scale")?;
        times.push(took);
    }
    times.sort();
    Ok(percentile_ms(&times, 0.5))
}

/// The five sizes of one fresh upload, requested at once: the time until the last is answered.
fn five_at_once_ms(target: &Target, body: &[u8]) -> Result<f64> {
    let (id, _) = upload(target, body, "image/jpeg")?;
    let started = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = FIVE
            .iter()
            .map(|(w, h, m)| {
                let id = &id;
                s.spawn(move || thumbnail(target, id, &format!("width={w}&height={h}&method={m}")))
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a request thread panicked"))??;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// `n` cold thumbnails of distinct photos at once; peak RSS of the server in MiB, wall time ms.
fn concurrent(target: &Target, dir: &Path, first: usize, n: usize) -> Result<(f64, f64)> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(upload(target, &photo(dir, first + i)?, "image/jpeg")?.0);
    }
    let peak = procfs::PeakRss::start(target.pid);
    let started = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| s.spawn(move || thumbnail(target, id, "width=320&height=240&method=scale")))
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

/// The 100-frame GIF, thumbnailed animated at 320x240: time, the server's peak RSS (MiB), and
/// the frames of the answer.
fn animated(target: &Target, gif: &[u8]) -> Result<(f64, f64, usize)> {
    let (id, _) = upload(target, gif, "image/gif")?;
    let peak = procfs::PeakRss::start(target.pid);
    let (body, took) = thumbnail(
        target,
        &id,
        "width=320&height=240&method=scale&animated=true",
    )?;
    let rss = peak.stop() as f64 / MIB as f64;
    Ok((took.as_secs_f64() * 1000.0, rss, count_frames(&body)))
}

/// Frames of a GIF answer (its image descriptors, walking the blocks), or of an animated WebP
/// (its `ANMF` chunks); 1 for anything else.
fn count_frames(body: &[u8]) -> usize {
    if body.starts_with(b"RIFF") {
        return body.windows(4).filter(|w| w == b"ANMF").count().max(1);
    }
    if !body.starts_with(b"GIF") || body.len() < 13 {
        return 1;
    }
    let table = |flags: u8| {
        if flags & 0x80 != 0 {
            3 << ((flags & 7) + 1)
        } else {
            0
        }
    };
    // Sub-blocks from `at`: the index after their terminator.
    let skip_blocks = |mut at: usize| {
        while let Some(&len) = body.get(at) {
            at += 1 + usize::from(len);
            if len == 0 {
                break;
            }
        }
        at
    };
    let (mut at, mut frames) = (13 + table(body[10]), 0);
    while let Some(&block) = body.get(at) {
        match block {
            0x21 => at = skip_blocks(at + 2),
            0x2C => {
                frames += 1;
                let flags = body.get(at + 9).copied().unwrap_or(0);
                at = skip_blocks(at + 10 + table(flags) + 1);
            }
            _ => break,
        }
    }
    frames
}

pub(crate) fn run(mmrctl: &Path, sizes: Sizes) -> Result<()> {
    let busy_start = crate::wait_until_quiet();
    let loadavg_start = crate::loadavg();
    let djpeg =
        PathBuf::from(std::env::var_os(DJPEG_VAR).with_context(|| {
            format!("{DJPEG_VAR} is not set: run `cargo xtask bench thumbnails`")
        })?);
    let pictures = tempfile::Builder::new()
        .prefix("mmrctl-bench-pictures-")
        .tempdir()?;
    progress!(
        "making {}x{} photos and a {}-frame GIF with Pillow ...",
        sizes.width,
        sizes.height,
        sizes.gif_frames
    );
    make_pictures(pictures.path(), sizes)?;
    let photo0 = pictures.path().join("photo-0.jpg");
    let photo_bytes = std::fs::metadata(&photo0)?.len();
    let gif = std::fs::read(pictures.path().join("anim.gif"))?;

    progress!("the limit: djpeg -scale 1/8 ...");
    let limit = limit_ms(&djpeg, &photo0, sizes.runs)?;
    progress!("djpeg -scale 1/8: {limit:.1} ms");

    let mut out = Map::new();
    out.insert("name".into(), json!("thumbnails"));
    out.insert("busy_start_pct".into(), json!(busy_start));
    out.insert("loadavg_start".into(), json!(loadavg_start));
    out.insert("photo_bytes".into(), json!(photo_bytes));
    out.insert(
        "photo_px".into(),
        json!(format!("{}x{}", sizes.width, sizes.height)),
    );
    out.insert("limit_ms".into(), json!(limit));
    out.insert("runs".into(), json!(sizes.runs));

    // mmrctl alone first.
    let dir = tempfile::Builder::new().prefix("mmrctl-bench-").tempdir()?;
    progress!("starting mmrctl serve ...");
    let repo = MediaRepo::start_with(
        mmrctl,
        dir,
        SERVER_NAME,
        "http://127.0.0.1:9",
        |c| {
            c["thumbnails"] = json!({ "maxSourceBytes": 50 * MIB, "maxAnimateSizeBytes": 50 * MIB })
        },
        &[],
    )?;
    let ours = repo.target(SERVER_NAME);
    // One untimed thumbnail: the first request's connections and page-ins.
    let (id, _) = upload(&ours, &photo(pictures.path(), 1)?, "image/jpeg")?;
    thumbnail(&ours, &id, "width=320&height=240&method=scale")?;
    progress!("mmrctl: {} cold 320x240 thumbnails ...", sizes.runs);
    let cold = cold_p50(&ours, pictures.path(), 2, sizes.runs)?;
    progress!("mmrctl: cold 320x240 p50 {cold:.1} ms");
    let five = five_at_once_ms(&ours, &photo(pictures.path(), 2 + sizes.runs)?)?;
    progress!("mmrctl: five sizes of one upload {five:.1} ms");
    let first = 3 + sizes.runs;
    let (rss, wall) = concurrent(&ours, pictures.path(), first, sizes.concurrent)?;
    progress!(
        "mmrctl: {} distinct photos at once: {wall:.0} ms, peak RSS {rss:.1} MiB",
        sizes.concurrent
    );
    let (anim_ms, anim_rss, anim_frames) = animated(&ours, &gif)?;
    progress!(
        "mmrctl: animated GIF {anim_ms:.0} ms, {anim_frames} frames, peak RSS {anim_rss:.1} MiB"
    );
    drop(repo);
    out.insert("mmrctl_cold_ms".into(), json!(cold));
    out.insert("mmrctl_five_ms".into(), json!(five));
    out.insert("mmrctl_concurrent_rss_mib".into(), json!(rss));
    out.insert("mmrctl_concurrent_ms".into(), json!(wall));
    out.insert("mmrctl_animated_ms".into(), json!(anim_ms));
    out.insert("mmrctl_animated_rss_mib".into(), json!(anim_rss));
    out.insert("mmrctl_animated_frames".into(), json!(anim_frames));

    // Synapse making thumbnails on request, none at upload.
    progress!("starting Synapse (dynamic_thumbnails, no pre-generated sizes) ...");
    let synapse = SynapseServer::start_with(
        SERVER_NAME,
        &[
            ("dynamic_thumbnails", json!(true)),
            ("thumbnail_sizes", json!([])),
        ],
    )?;
    let theirs = synapse.target();
    out.insert("synapse_version".into(), json!(synapse.version()));
    let (id, _) = upload(&theirs, &photo(pictures.path(), 1)?, "image/jpeg")?;
    thumbnail(&theirs, &id, "width=320&height=240&method=scale")?;
    progress!("Synapse: {} cold 320x240 thumbnails ...", sizes.runs);
    let synapse_cold = cold_p50(&theirs, pictures.path(), 2, sizes.runs)?;
    progress!("Synapse: cold 320x240 p50 {synapse_cold:.1} ms");
    let plain_upload = median_upload_ms(&theirs, pictures.path(), first, 5)?;
    let (synapse_anim_ms, _, synapse_anim_frames) = animated(&theirs, &gif)?;
    progress!("Synapse: animated GIF {synapse_anim_ms:.0} ms, {synapse_anim_frames} frames");
    drop(synapse);

    // Synapse pre-generating the five sizes at upload.
    progress!("starting Synapse (its default five sizes, made at upload) ...");
    let synapse = SynapseServer::start_with(SERVER_NAME, &[("dynamic_thumbnails", json!(false))])?;
    let theirs = synapse.target();
    let pregen_upload = median_upload_ms(&theirs, pictures.path(), first, 5)?;
    let synapse_five = (pregen_upload - plain_upload).max(0.0);
    progress!(
        "Synapse: upload {pregen_upload:.0} ms with the five sizes, {plain_upload:.0} ms without: \
         {synapse_five:.0} ms of pre-generation"
    );
    drop(synapse);
    out.insert("synapse_cold_ms".into(), json!(synapse_cold));
    out.insert("synapse_upload_plain_ms".into(), json!(plain_upload));
    out.insert("synapse_upload_pregen_ms".into(), json!(pregen_upload));
    out.insert("synapse_five_ms".into(), json!(synapse_five));
    out.insert("synapse_animated_ms".into(), json!(synapse_anim_ms));
    out.insert("synapse_animated_frames".into(), json!(synapse_anim_frames));

    let checks = [
        (
            "cold_limit",
            cold <= COLD_OF_LIMIT * limit,
            COLD_OF_LIMIT * limit,
        ),
        (
            "cold_synapse",
            cold * COLD_VS_SYNAPSE <= synapse_cold,
            synapse_cold / COLD_VS_SYNAPSE,
        ),
        (
            "five_synapse",
            five * FIVE_VS_SYNAPSE <= synapse_five,
            synapse_five / FIVE_VS_SYNAPSE,
        ),
        (
            "concurrent_rss",
            rss <= CONCURRENT_RSS_MIB,
            CONCURRENT_RSS_MIB,
        ),
        (
            "animated_ms",
            anim_ms <= ANIMATED_MS && anim_frames > 1,
            ANIMATED_MS,
        ),
        (
            "animated_rss",
            anim_rss <= ANIMATED_RSS_MIB,
            ANIMATED_RSS_MIB,
        ),
    ];
    crate::print_result(out, &checks);
    Ok(())
}

/// Uploads of photos `first..first + n` (each distinct): the median time in ms.
fn median_upload_ms(target: &Target, dir: &Path, first: usize, n: usize) -> Result<f64> {
    let mut times = Vec::new();
    for i in 0..n {
        times.push(upload(target, &photo(dir, first + i)?, "image/jpeg")?.1);
    }
    times.sort();
    Ok(percentile_ms(&times, 0.5))
}
