//! `mmrctl-bench --soak SECONDS`: three `mmrctl serve` instances on one database and one file
//! datastore, loaded for a fixed time by many clients at once with a mix of uploads, downloads,
//! thumbnails and URL previews, each request sent to any instance. Every answer must be right
//! (status and length); the result is the latency of each kind of request and each instance's RSS
//! over time, which must stay flat once warm.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value, json};

use crate::procfs;
use crate::servers::{MediaRepo, Target};
use crate::{SERVER_NAME, percentile_ms, previews, thumbnails};

/// Clients sending requests at once (threads, each one request at a time).
const CLIENTS: u64 = 24;
/// Distinct pages previews ask for: the first request of each is cold, the rest cached.
const PAGES: u64 = 300;
/// Photos thumbnails are asked of, and the sizes asked for.
const PHOTOS: usize = 4;
const THUMBNAIL_QUERIES: &[&str] = &[
    "width=32&height=32&method=crop",
    "width=96&height=96&method=crop",
    "width=320&height=240&method=scale",
    "width=640&height=480&method=scale",
    "width=800&height=600&method=scale",
];
/// How often each instance's RSS is read.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Upload,
    Download,
    Thumbnail,
    Preview,
}

const OPS: [Op; 4] = [Op::Upload, Op::Download, Op::Thumbnail, Op::Preview];

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Upload => "upload",
            Op::Download => "download",
            Op::Thumbnail => "thumbnail",
            Op::Preview => "preview",
        }
    }

    /// 30% uploads, 45% downloads, 15% thumbnails, 10% previews.
    fn pick(r: u64) -> Op {
        match r % 100 {
            0..30 => Op::Upload,
            30..75 => Op::Download,
            75..90 => Op::Thumbnail,
            _ => Op::Preview,
        }
    }
}

/// xorshift64*: the clients' choices, reproducible per client.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

struct Shared {
    /// Uploads so far: media id and length.
    uploaded: Mutex<Vec<(String, usize)>>,
    latencies: [Mutex<Vec<Duration>>; 4],
    errors: Mutex<Vec<String>>,
    error_count: AtomicU64,
}

fn get(target: &Target, path: &str) -> testkit::http::Response {
    let auth = format!("Bearer {}", target.token);
    testkit::http::get(
        &format!("{}{path}", target.base_url),
        &[("Authorization", &auth), ("Host", SERVER_NAME)],
    )
}

/// One request of `op` against `target`: an error says what was wrong with the answer.
fn request(
    op: Op,
    target: &Target,
    rng: &mut u64,
    shared: &Shared,
    photos: &[String],
    pages_port: u16,
) -> Result<()> {
    match op {
        Op::Upload => {
            let len = 16 * 1024 + (next(rng) % (496 * 1024)) as usize;
            let seed = next(rng);
            let body: Vec<u8> = (0..len)
                .map(|i| (seed.wrapping_add(i as u64 / 64) % 251) as u8)
                .collect();
            let (id, _) = thumbnails::upload(target, &body, "application/octet-stream")?;
            shared
                .uploaded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((id, len));
        }
        Op::Download => {
            let pick = {
                let uploaded = shared.uploaded.lock().unwrap_or_else(|p| p.into_inner());
                if uploaded.is_empty() {
                    return Ok(());
                }
                uploaded[(next(rng) % uploaded.len() as u64) as usize].clone()
            };
            let r = get(
                target,
                &format!("/_matrix/client/v1/media/download/{SERVER_NAME}/{}", pick.0),
            );
            if r.status != 200 || r.body.len() != pick.1 {
                bail!(
                    "download of {}: {} with {} bytes, not {}",
                    pick.0,
                    r.status,
                    r.body.len(),
                    pick.1
                );
            }
        }
        Op::Thumbnail => {
            let id = &photos[(next(rng) % photos.len() as u64) as usize];
            let query = THUMBNAIL_QUERIES[(next(rng) % THUMBNAIL_QUERIES.len() as u64) as usize];
            thumbnails::thumbnail(target, id, query)?;
        }
        Op::Preview => {
            let url = format!(
                "http://127.0.0.1:{pages_port}/page?n=soak-{}",
                next(rng) % PAGES
            );
            previews::preview(target, &url)?;
        }
    }
    Ok(())
}

pub(crate) fn run(mmrctl: &Path, seconds: u64) -> Result<()> {
    let pages_port = previews::serve_pages(previews::QUICK)?;
    let pictures = tempfile::Builder::new()
        .prefix("mmrctl-soak-pictures-")
        .tempdir()?;
    thumbnails::make_pictures(pictures.path(), thumbnails::QUICK)?;

    let db = testkit::TestDb::new();
    let shared_dir = tempfile::Builder::new().prefix("mmrctl-soak-").tempdir()?;
    let media = MediaRepo::datastore_dir(shared_dir.path());
    let mut repos = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::Builder::new()
            .prefix("mmrctl-soak-instance-")
            .tempdir()?;
        let media = media.clone();
        repos.push(MediaRepo::start_on(
            mmrctl,
            dir,
            SERVER_NAME,
            "http://127.0.0.1:9",
            db.url(),
            move |c| {
                c["datastores"][0]["opts"]["path"] = json!(media);
                c["urlPreviews"] = json!({
                    "enabled": true,
                    "allowedNetworks": ["127.0.0.1/32"],
                    "disallowedNetworks": [],
                    "allowedPorts": [pages_port],
                });
            },
        )?);
    }
    let targets: Vec<Target> = repos.iter().map(|r| r.target(SERVER_NAME)).collect();
    let mut photos = Vec::new();
    for i in 0..PHOTOS {
        let body = thumbnails::photo(pictures.path(), i)?;
        let (id, _) = thumbnails::upload(&targets[i % 3], &body, "image/jpeg")?;
        photos.push(id);
    }

    let shared = Shared {
        uploaded: Mutex::new(Vec::new()),
        latencies: Default::default(),
        errors: Mutex::new(Vec::new()),
        error_count: AtomicU64::new(0),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let pids: Vec<u32> = repos.iter().map(MediaRepo::pid).collect();
    progress!("soak: {CLIENTS} clients on 3 instances for {seconds} s ...");
    let samples: Vec<(f64, Vec<u64>)> = std::thread::scope(|s| {
        for client in 0..CLIENTS {
            let (shared, targets, photos) = (&shared, &targets, &photos);
            s.spawn(move || {
                let mut rng = 0x9e37_79b9_7f4a_7c15 ^ (client + 1);
                while Instant::now() < deadline {
                    let op = Op::pick(next(&mut rng));
                    let target = &targets[(next(&mut rng) % 3) as usize];
                    let at = Instant::now();
                    match request(op, target, &mut rng, shared, photos, pages_port) {
                        Ok(()) => shared.latencies[op as usize]
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(at.elapsed()),
                        Err(e) => {
                            shared.error_count.fetch_add(1, Ordering::Relaxed);
                            let mut errors =
                                shared.errors.lock().unwrap_or_else(|p| p.into_inner());
                            if errors.len() < 20 {
                                errors.push(format!("{} on {}: {e:#}", op.name(), target.base_url));
                            }
                        }
                    }
                }
            });
        }
        let mut samples = Vec::new();
        while Instant::now() < deadline {
            std::thread::sleep(SAMPLE_EVERY);
            let rss = pids.iter().map(|p| procfs::rss(*p).unwrap_or(0)).collect();
            samples.push((started.elapsed().as_secs_f64(), rss));
        }
        samples
    });

    let mut out = Map::new();
    out.insert("name".into(), json!("soak"));
    out.insert("seconds".into(), json!(seconds));
    out.insert("clients".into(), json!(CLIENTS));
    let mut total = 0;
    for op in OPS {
        let mut times = shared.latencies[op as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        times.sort();
        total += times.len();
        out.insert(format!("{}_requests", op.name()), json!(times.len()));
        out.insert(
            format!("{}_p50_ms", op.name()),
            json!(percentile_ms(&times, 0.50)),
        );
        out.insert(
            format!("{}_p99_ms", op.name()),
            json!(percentile_ms(&times, 0.99)),
        );
    }
    out.insert("requests".into(), json!(total));
    out.insert(
        "errors".into(),
        json!(shared.error_count.load(Ordering::Relaxed)),
    );
    // RSS once warm (the first sample after a minute, or a third of the run) and at the end.
    let warm_at = (seconds as f64 / 3.0).min(60.0);
    let warm = samples
        .iter()
        .find(|(t, _)| *t >= warm_at)
        .or(samples.first())
        .context("no RSS sample")?;
    let last = samples.last().context("no RSS sample")?;
    for i in 0..3 {
        out.insert(
            format!("instance{i}_rss_warm_mib"),
            json!(warm.1[i] as f64 / procfs::MIB as f64),
        );
        out.insert(
            format!("instance{i}_rss_end_mib"),
            json!(last.1[i] as f64 / procfs::MIB as f64),
        );
    }
    out.insert("warm_at_s".into(), json!(warm.0));
    let errors = shared.errors.into_inner().unwrap_or_default();
    for e in &errors {
        progress!("soak error: {e}");
    }
    out.insert("first_errors".into(), Value::from(errors));
    println!("{}", Value::Object(out));
    Ok(())
}
