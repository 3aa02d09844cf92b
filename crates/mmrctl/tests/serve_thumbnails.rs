//! Thumbnails through `mmrctl serve`, on a real PostgreSQL: every endpoint family, the request's
//! rules (sizes, methods, errors), what is stored, and one generation for many requests.
//! The formats themselves are covered by the thumbnail crate's corpus test.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::io::Cursor;
use std::thread;

use image::{AnimationDecoder as _, ImageFormat, RgbImage, Rgba, RgbaImage};
use support::{MediaRepo, SHARED_SECRET};

const HS: &str = "example.test";

fn repo(tweak: impl FnOnce(&mut serde_json::Value)) -> MediaRepo {
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = serde_json::json!({ "minBytes": 0 });
        tweak(c)
    });
    repo.wait_healthy();
    repo
}

/// A `w`x`h` picture whose colour changes across it (so a wrong crop or orientation shows).
fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
    })
}

fn jpeg(w: u32, h: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    picture(w, h).write_to(&mut out, ImageFormat::Jpeg).unwrap();
    out.into_inner()
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    picture(w, h).write_to(&mut out, ImageFormat::Png).unwrap();
    out.into_inner()
}

/// An animated GIF of `frames` frames, each a different colour.
fn gif(w: u32, h: u32, frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        encoder
            .set_repeat(image::codecs::gif::Repeat::Infinite)
            .unwrap();
        for i in 0..frames {
            let c = (i * 255 / frames) as u8;
            let frame = RgbaImage::from_pixel(w, h, Rgba([c, 255 - c, 0, 255]));
            encoder
                .encode_frame(image::Frame::from_parts(
                    frame,
                    0,
                    0,
                    image::Delay::from_numer_denom_ms(100, 1),
                ))
                .unwrap();
        }
    }
    out
}

fn thumb(repo: &MediaRepo, prefix: &str, id: &str, query: &str) -> testkit::http::Response {
    repo.get_as(HS, &format!("{prefix}/thumbnail/{HS}/{id}?{query}"))
}

const V1: &str = "/_matrix/client/v1/media";

/// `sql`'s count once it reaches `expected` (thumbnails are stored just after they are served),
/// or what it is after 10 s.
fn settled_count(repo: &MediaRepo, sql: &str, expected: i64) -> i64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let n = repo.count(sql);
        if n == expected || std::time::Instant::now() > deadline {
            return n;
        }
        thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn dimensions(body: &[u8]) -> (u32, u32) {
    let image = image::load_from_memory(body).unwrap();
    (image.width(), image.height())
}

#[test]
fn every_endpoint_family_scales_and_crops() {
    let repo = repo(|c| c["repo"]["freezeUnauthenticatedMedia"] = false.into());
    let id = repo.upload(
        HS,
        SHARED_SECRET,
        "image/jpeg",
        Some("photo.jpg"),
        &jpeg(1200, 900),
    );
    for prefix in ["/_matrix/media/v3", "/_matrix/media/r0", V1] {
        let r = thumb(&repo, prefix, &id, "width=320&height=240&method=scale");
        assert_eq!(r.status, 200, "{prefix}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("image/jpeg"), "{prefix}");
        assert_eq!(dimensions(&r.body), (320, 240), "{prefix}");
        assert_eq!(
            r.header("cross-origin-resource-policy"),
            Some("cross-origin")
        );
    }
    // Aspect kept inside the box; crop fills it.
    let r = thumb(&repo, V1, &id, "width=700&height=500&method=scale");
    assert_eq!(
        dimensions(&r.body),
        (800, 600),
        "700x500 is served from the 800x600 bucket"
    );
    // 640x640 needs the 1600x1200 bucket, which holds the whole photo: the original.
    let r = thumb(&repo, V1, &id, "width=640&height=640&method=scale");
    assert_eq!(dimensions(&r.body), (1200, 900));
    let r = thumb(&repo, V1, &id, "width=96&height=96&method=crop");
    assert_eq!(dimensions(&r.body), (96, 96));
    // The default method is scale; an unknown size maps to the bucket that holds it.
    let r = thumb(&repo, V1, &id, "width=30&height=30");
    assert_eq!(dimensions(&r.body), (32, 24));
    // Served again from the stored row: same bytes, same ETag, and a 304 on revalidation.
    let first = thumb(&repo, V1, &id, "width=96&height=96&method=crop");
    let again = thumb(&repo, V1, &id, "width=96&height=96&method=crop");
    assert_eq!(first.body, again.body);
    let etag = again.header("etag").unwrap().to_owned();
    let auth = format!("Bearer {SHARED_SECRET}");
    let r = repo.get(
        &format!("{V1}/thumbnail/{HS}/{id}?width=96&height=96&method=crop"),
        &[
            ("Host", HS),
            ("Authorization", &auth),
            ("If-None-Match", &etag),
        ],
    );
    assert_eq!(r.status, 304);
    // Rows: 320x240, 800x600, 1600x1200 (the original) and 32x32 scale, 96x96 crop; never a
    // media row per thumbnail.
    assert_eq!(
        settled_count(&repo, "SELECT COUNT(*) FROM thumbnails", 5),
        5
    );
    assert_eq!(repo.media_rows(), 1);
    // The authenticated endpoint wants a token.
    let r = repo.get(
        &format!("{V1}/thumbnail/{HS}/{id}?width=96&height=96"),
        &[("Host", HS)],
    );
    assert_eq!(r.status, 401, "{}", r.text());
}

#[test]
fn bad_requests_say_what_is_wrong() {
    let repo = repo(|_| {});
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &png(400, 300));
    for (query, status, errcode, needle) in [
        ("height=32", 400, "M_MISSING_PARAM", "width"),
        ("width=32", 400, "M_MISSING_PARAM", "height"),
        ("width=abc&height=32", 400, "M_INVALID_PARAM", "width"),
        ("width=0&height=32", 400, "M_INVALID_PARAM", "width"),
        (
            "width=32&height=32&method=zoom",
            400,
            "M_INVALID_PARAM",
            "method",
        ),
        (
            "width=32&height=32&animated=yes",
            400,
            "M_INVALID_PARAM",
            "animated",
        ),
    ] {
        let r = thumb(&repo, V1, &id, query);
        assert_eq!(r.status, status, "{query}: {}", r.text());
        assert_eq!(r.json()["errcode"], errcode, "{query}");
        assert!(
            r.json()["error"].as_str().unwrap().contains(needle),
            "{query}: {}",
            r.text()
        );
    }
    let r = thumb(&repo, V1, "NoSuchMedia", "width=32&height=32");
    assert_eq!(r.status, 404);
    // Not an image: 400 M_UNKNOWN, and the same again (remembered, not decoded again).
    let text = repo.upload(
        HS,
        SHARED_SECRET,
        "image/png",
        None,
        b"not a picture at all",
    );
    for size in [32, 96] {
        let r = thumb(&repo, V1, &text, &format!("width={size}&height={size}"));
        assert_eq!(
            (r.status, r.json()["errcode"].as_str()),
            (400, Some("M_UNKNOWN")),
            "{}",
            r.text()
        );
    }
    assert!(
        repo.metrics()
            .contains("mmrctl_thumbnails_generated_total 1\n"),
        "the second request (another size) did not decode the file again"
    );
}

#[test]
fn limits_are_enforced_and_named() {
    let repo = repo(|c| {
        c["thumbnails"] = serde_json::json!({
            "maxPixels": 100_000,
            "maxSourceBytes": 200_000,
            "types": ["image/jpeg", "image/png"],
        })
    });
    let big = repo.upload(HS, SHARED_SECRET, "image/png", None, &png(400, 300));
    let r = thumb(&repo, V1, &big, "width=32&height=32");
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.json()["errcode"], "M_TOO_LARGE");
    assert!(r.text().contains("thumbnails.maxPixels"), "{}", r.text());

    let heavy: Vec<u8> = {
        let mut data = png(100, 100);
        // Trailing bytes after IEND: still a 100x100 PNG, but over maxSourceBytes.
        data.extend(std::iter::repeat_n(0u8, 250_000));
        data
    };
    let heavy = repo.upload(HS, SHARED_SECRET, "image/png", None, &heavy);
    let r = thumb(&repo, V1, &heavy, "width=32&height=32");
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.text().contains("thumbnails.maxSourceBytes"),
        "{}",
        r.text()
    );

    let gif = repo.upload(HS, SHARED_SECRET, "image/gif", None, &gif(64, 64, 3));
    let r = thumb(&repo, V1, &gif, "width=32&height=32");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("thumbnails.types"), "{}", r.text());
}

#[test]
fn a_source_smaller_than_the_box_is_served_as_it_is() {
    let repo = repo(|_| {});
    let small = png(200, 150);
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &small);
    let r = thumb(&repo, V1, &id, "width=320&height=240");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, small);
    assert_eq!(r.header("content-type"), Some("image/png"));
    // Served as what the bytes are, not as what the uploader said.
    let untyped = repo.upload(
        HS,
        SHARED_SECRET,
        "application/octet-stream",
        None,
        &png(201, 150),
    );
    let r = thumb(&repo, V1, &untyped, "width=320&height=240");
    assert_eq!(r.header("content-type"), Some("image/png"), "{}", r.text());
    // Recorded as the thumbnail (pointing at the original's object), so it is not decoded again.
    assert_eq!(
        settled_count(&repo, "SELECT COUNT(*) FROM thumbnails", 2),
        2
    );
    assert_eq!(
        repo.count("SELECT COUNT(*) FROM thumbnails t JOIN media m ON m.sha256 = t.sha256"),
        2
    );
}

#[test]
fn fifty_identical_requests_make_one_thumbnail() {
    let repo = repo(|_| {});
    let id = repo.upload(HS, SHARED_SECRET, "image/jpeg", None, &jpeg(2400, 1800));
    let bodies: Vec<Vec<u8>> = thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|_| {
                s.spawn(|| {
                    let r = thumb(&repo, V1, &id, "width=320&height=240&method=scale");
                    assert_eq!(r.status, 200, "{}", r.text());
                    r.body
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    assert_eq!(dimensions(&bodies[0]), (320, 240));
    let metrics = repo.metrics();
    assert!(
        metrics.contains("mmrctl_thumbnails_generated_total 1\n"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("thumbnail"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        settled_count(&repo, "SELECT COUNT(*) FROM thumbnails", 1),
        1
    );
    assert_eq!(
        repo.count("SELECT COUNT(*) FROM objects"),
        2,
        "the photo and one thumbnail"
    );
}

#[test]
fn a_pending_upload_is_waited_for() {
    let repo = repo(|_| {});
    let created = repo.create(HS);
    assert_eq!(created.status, 200, "{}", created.text());
    let uri = created.json()["content_uri"].as_str().unwrap().to_owned();
    let id = uri.rsplit('/').next().unwrap().to_owned();
    thread::scope(|s| {
        let waiting = s.spawn(|| {
            thumb(
                &repo,
                V1,
                &id,
                "width=96&height=96&method=crop&timeout_ms=20000",
            )
        });
        thread::sleep(std::time::Duration::from_millis(300));
        let auth = format!("Bearer {SHARED_SECRET}");
        let r = repo.send(
            "PUT",
            &format!("/_matrix/media/v3/upload/{HS}/{id}"),
            &[("Host", HS), ("Authorization", &auth)],
            Some("image/jpeg"),
            &jpeg(640, 480),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let r = waiting.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(dimensions(&r.body), (96, 96));
    });
    // Without waiting, a pending upload is 504 M_NOT_YET_UPLOADED.
    let created = repo.create(HS);
    let uri = created.json()["content_uri"].as_str().unwrap().to_owned();
    let pending = uri.rsplit('/').next().unwrap();
    let r = thumb(&repo, V1, pending, "width=96&height=96&timeout_ms=0");
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (504, Some("M_NOT_YET_UPLOADED"))
    );
}

#[test]
fn animated_thumbnails_only_when_asked_and_allowed() {
    let repo = repo(|_| {});
    let id = repo.upload(HS, SHARED_SECRET, "image/gif", None, &gif(400, 300, 12));
    let r = thumb(&repo, V1, &id, "width=320&height=240&animated=true");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("image/gif"));
    let frames = image::codecs::gif::GifDecoder::new(Cursor::new(&r.body))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    assert_eq!(frames.len(), 12);
    assert_eq!(frames[0].buffer().dimensions(), (320, 240));
    // A still is never the animation, even when the GIF fits the box (the spec: MUST NOT).
    let r = thumb(&repo, V1, &id, "width=800&height=600&animated=false");
    assert_eq!(r.header("content-type"), Some("image/png"), "{}", r.text());
    assert_eq!(dimensions(&r.body), (400, 300));
    // A still by default: the frame at stillFrame (0.5: the middle), as PNG.
    let r = thumb(&repo, V1, &id, "width=320&height=240");
    assert_eq!(r.header("content-type"), Some("image/png"));
    let still = image::load_from_memory(&r.body).unwrap().to_rgb8();
    let expected = (5 * 255 / 12) as u8;
    let p = still.get_pixel(160, 120);
    assert!(p[0].abs_diff(expected) < 12, "{p:?} is not frame 5");
}

#[test]
fn quarantined_media_has_no_thumbnail_unless_replaced() {
    let repo = repo(|c| c["quarantine"] = serde_json::json!({ "replaceThumbnails": false }));
    let id = repo.upload(HS, SHARED_SECRET, "image/jpeg", None, &jpeg(800, 600));
    assert_eq!(thumb(&repo, V1, &id, "width=96&height=96").status, 200);
    repo.execute(&format!(
        "UPDATE media SET quarantined = TRUE WHERE media_id = '{id}'"
    ));
    let r = thumb(&repo, V1, &id, "width=96&height=96");
    assert_eq!(r.status, 404, "{}", r.text());
    // matrix-media-repo's default replaces them (serve_admin.rs checks the image).
    let replaced = self::repo(|_| {});
    let id = replaced.upload(HS, SHARED_SECRET, "image/jpeg", None, &jpeg(800, 600));
    replaced.execute(&format!(
        "UPDATE media SET quarantined = TRUE WHERE media_id = '{id}'"
    ));
    let r = thumb(&replaced, V1, &id, "width=96&height=96");
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("image/png"))
    );
}

#[test]
fn frozen_media_has_thumbnails_on_the_authenticated_endpoint_only() {
    let repo = repo(|c| c["repo"]["freezeUnauthenticatedMedia"] = true.into());
    let id = repo.upload(HS, SHARED_SECRET, "image/jpeg", None, &jpeg(800, 600));
    assert_eq!(thumb(&repo, V1, &id, "width=96&height=96").status, 200);
    let r = thumb(&repo, "/_matrix/media/v3", &id, "width=96&height=96");
    assert_eq!(r.status, 404, "{}", r.text());
    assert!(
        r.text().contains("/_matrix/client/v1/media/thumbnail"),
        "{}",
        r.text()
    );
}

/// A video's thumbnail, when `types` lists it: its first frame through the ffmpeg on PATH
/// (`cargo xtask test` provides one), never the video itself.
#[test]
fn videos_are_thumbnailed_from_their_first_frame_when_listed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("green.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i"])
        .arg("color=c=green:size=320x240:rate=10:duration=1")
        .args(["-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(&path)
        .status()
        .expect("ffmpeg: run the tests with `cargo xtask test`, which provides it");
    assert!(status.success());
    let mp4 = std::fs::read(&path).unwrap();
    let listed = repo(|c| c["thumbnails"] = serde_json::json!({ "types": ["video/mp4"] }));
    let id = listed.upload(HS, SHARED_SECRET, "video/mp4", Some("clip.mp4"), &mp4);
    let r = thumb(&listed, V1, &id, "width=96&height=96&method=crop");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("image/png"));
    let image = image::load_from_memory(&r.body).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (96, 96));
    let p = image.get_pixel(48, 48);
    assert!(p[1] > 100 && p[0] < 60, "green: {p:?}");
    // Larger than the video: a PNG of its frame, not the video.
    let r = thumb(&listed, V1, &id, "width=800&height=600");
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(dimensions(&r.body), (320, 240));
    // Not listed (the default types): 400, saying so.
    let unlisted = repo(|_| {});
    let id = unlisted.upload(HS, SHARED_SECRET, "video/mp4", None, &mp4);
    let r = thumb(&unlisted, V1, &id, "width=96&height=96");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("video/mp4"), "{}", r.text());
}
