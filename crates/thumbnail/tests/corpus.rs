//! The thumbnailer over a corpus that `make_corpus.py` generates with Pillow: every format at
//! several boxes and both methods, EXIF orientation, CMYK, alpha, 16-bit, and the hostile files
//! (truncated, corrupt, SVG, a decompression bomb, too many frames).

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use image::AnimationDecoder as _;
use thumbnail::{Error, Format, Limits, Method, Outcome, Request, Thumbnail};

/// The corpus, read into memory (the tempdir is gone once it is read).
fn corpus() -> &'static HashMap<String, Vec<u8>> {
    static CORPUS: OnceLock<HashMap<String, Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/make_corpus.py");
        let status = Command::new(testkit::python())
            .arg(&script)
            .arg(dir.path())
            .status()
            .expect("run make_corpus.py");
        assert!(status.success(), "make_corpus.py failed: {status}");
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(dir.path()).expect("read corpus dir") {
            let entry = entry.expect("corpus entry");
            let name = entry.file_name().into_string().expect("utf-8 name");
            files.insert(name, std::fs::read(entry.path()).expect("read corpus file"));
        }
        files
    })
}

fn file(name: &str) -> &'static [u8] {
    corpus()
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not in the corpus"))
}

/// Default limits but a deadline no loaded CI machine reaches: an animation falling back to a
/// still because the runner was slow would make the tests flaky.
fn limits() -> Limits {
    Limits {
        animation_time: Duration::from_secs(600),
        ..Limits::default()
    }
}

const BOXES: [(u32, u32); 4] = [(32, 32), (96, 96), (320, 240), (800, 600)];
const METHODS: [Method; 2] = [Method::Scale, Method::Crop];

fn request(width: u32, height: u32, method: Method, animated: bool) -> Request {
    Request {
        width,
        height,
        method,
        animated,
    }
}

fn render_one(data: &[u8], r: Request) -> Result<Outcome, Error> {
    let mut results = thumbnail::render(data, &[r], &limits()).expect("header accepted");
    assert_eq!(results.len(), 1);
    results.remove(0)
}

fn made(name: &str, r: Request) -> Thumbnail {
    match render_one(file(name), r) {
        Ok(Outcome::Made(t)) => t,
        other => panic!("{name} {r:?}: expected a thumbnail, got {other:?}"),
    }
}

/// A decoded thumbnail: its RGBA pixels and frame count.
struct Decoded {
    image: image::RgbaImage,
    frames: usize,
}

/// Decodes `t` by its bytes' own signature and checks that it is what `t` says.
fn decode(t: &Thumbnail) -> Decoded {
    let decoded = match t.content_type {
        "image/jpeg" => {
            // The `image` crate is built without its JPEG decoder here; libjpeg reads it.
            assert!(t.bytes.starts_with(&[0xFF, 0xD8, 0xFF]), "not a JPEG");
            let d = mozjpeg::Decompress::new_mem(&t.bytes).expect("JPEG header");
            let mut started = d.rgb().expect("JPEG decode");
            let (w, h) = (started.width() as u32, started.height() as u32);
            let rgb: Vec<u8> = started.read_scanlines().expect("JPEG scanlines");
            let rgb = image::RgbImage::from_raw(w, h, rgb).expect("JPEG buffer size");
            Decoded {
                image: image::DynamicImage::ImageRgb8(rgb).into_rgba8(),
                frames: 1,
            }
        }
        "image/png" => {
            assert_eq!(
                image::guess_format(&t.bytes).expect("known format"),
                image::ImageFormat::Png
            );
            let image = image::load_from_memory_with_format(&t.bytes, image::ImageFormat::Png)
                .expect("PNG decode");
            Decoded {
                image: image.into_rgba8(),
                frames: 1,
            }
        }
        "image/gif" => {
            let frames = image::codecs::gif::GifDecoder::new(Cursor::new(&t.bytes))
                .expect("GIF header")
                .into_frames()
                .collect_frames()
                .expect("GIF frames");
            let first = frames.first().expect("a frame").buffer().clone();
            Decoded {
                image: first,
                frames: frames.len(),
            }
        }
        other => panic!("unexpected content type {other}"),
    };
    assert_eq!(
        decoded.image.dimensions(),
        (t.width, t.height),
        "decoded size differs from the reported one"
    );
    decoded
}

/// The files of the size matrix: displayed size and format, as the generator made them.
const STILLS: &[(&str, (u32, u32), Format)] = &[
    ("baseline.jpg", (1200, 900), Format::Jpeg),
    ("progressive.jpg", (1200, 900), Format::Jpeg),
    ("orient_1.jpg", (400, 300), Format::Jpeg),
    ("orient_6.jpg", (400, 300), Format::Jpeg),
    ("cmyk.jpg", (300, 200), Format::Jpeg),
    ("gray.jpg", (500, 400), Format::Jpeg),
    ("rgba.png", (400, 300), Format::Png),
    ("gray16.png", (500, 400), Format::Png),
    ("still.webp", (640, 480), Format::Webp),
    ("image.bmp", (400, 300), Format::Bmp),
    ("image.tiff", (400, 300), Format::Tiff),
    ("still.gif", (300, 200), Format::Gif),
    ("one.png", (1, 1), Format::Png),
];

const ANIMATIONS: &[(&str, (u32, u32), Format, u64)] = &[
    ("anim.gif", (400, 300), Format::Gif, 8),
    ("anim.apng", (400, 300), Format::Png, 6),
    ("anim.webp", (400, 300), Format::Webp, 6),
];

/// Checks one outcome against the geometry rules: `scale` fits inside the box keeping the
/// aspect, `crop` is the box clamped to the source, a source that fits is the original (or a
/// PNG of it, for formats clients do not show).
fn check_outcome(name: &str, source: (u32, u32), format: Format, r: Request, got: Outcome) {
    let (sw, sh) = source;
    let fits = sw <= r.width && sh <= r.height;
    // An animation is its own thumbnail only when an animation was asked for (the spec: a still
    // request MUST NOT get an animated image).
    let animation = ANIMATIONS.iter().any(|(n, ..)| *n == name);
    let as_is = format.clients_render() && (!animation || r.animated);
    let t = match got {
        Outcome::Original => {
            assert!(
                fits,
                "{name} {r:?}: Original for a source larger than the box"
            );
            assert!(
                as_is,
                "{name} {r:?}: Original for {format:?}, which is not shown as it is here"
            );
            return;
        }
        Outcome::Made(t) => t,
    };
    let decoded = decode(&t);
    let (w, h) = (t.width, t.height);
    if fits {
        assert!(
            !as_is,
            "{name} {r:?}: a fitting {format:?} source was re-encoded"
        );
        assert_eq!((w, h), source, "{name} {r:?}: re-encoded at another size");
        assert_eq!(t.content_type, "image/png", "{name} {r:?}");
        return;
    }
    match r.method {
        Method::Scale => {
            assert!(
                w <= r.width && h <= r.height,
                "{name} {r:?}: {w}x{h} overflows"
            );
            let s = (f64::from(r.width) / f64::from(sw)).min(f64::from(r.height) / f64::from(sh));
            let (ew, eh) = (f64::from(sw) * s, f64::from(sh) * s);
            assert!(
                (f64::from(w) - ew).abs() <= 1.0 && (f64::from(h) - eh).abs() <= 1.0,
                "{name} {r:?}: {w}x{h} does not keep the aspect of {sw}x{sh}"
            );
            assert!(
                w == r.width || h == r.height,
                "{name} {r:?}: {w}x{h} does not fill an axis"
            );
        }
        Method::Crop => {
            assert_eq!((w, h), (r.width.min(sw), r.height.min(sh)), "{name} {r:?}");
        }
    }
    let animated_source = ANIMATIONS.iter().any(|a| a.0 == name);
    let expected_type = if r.animated && animated_source {
        "image/gif"
    } else if format == Format::Jpeg {
        "image/jpeg"
    } else {
        "image/png"
    };
    assert_eq!(t.content_type, expected_type, "{name} {r:?}");
    assert_eq!(t.animated, expected_type == "image/gif", "{name} {r:?}");
    if expected_type == "image/gif" {
        assert!(
            decoded.frames > 1,
            "{name} {r:?}: {} frame(s)",
            decoded.frames
        );
    }
}

#[test]
fn every_format_every_box_both_methods() {
    for &(name, size, format) in STILLS {
        let source = thumbnail::inspect(file(name)).expect(name);
        assert_eq!((source.width, source.height), size, "{name}");
        assert_eq!(source.format, format, "{name}");
        assert_eq!(source.animation, None, "{name}");
        for (bw, bh) in BOXES {
            for method in METHODS {
                // An animated request on a still source is a still request.
                for animated in [false, true] {
                    let r = request(bw, bh, method, animated);
                    let got =
                        render_one(file(name), r).unwrap_or_else(|e| panic!("{name} {r:?}: {e}"));
                    check_outcome(name, size, format, r, got);
                }
            }
        }
    }
}

#[test]
fn animations_every_box_both_methods() {
    for &(name, size, format, frames) in ANIMATIONS {
        let source = thumbnail::inspect(file(name)).expect(name);
        assert_eq!((source.width, source.height), size, "{name}");
        assert_eq!(source.format, format, "{name}");
        let animation = source
            .animation
            .unwrap_or_else(|| panic!("{name}: not animated"));
        assert_eq!(animation.frames, frames, "{name}");
        for (bw, bh) in BOXES {
            for method in METHODS {
                for animated in [false, true] {
                    let r = request(bw, bh, method, animated);
                    let got =
                        render_one(file(name), r).unwrap_or_else(|e| panic!("{name} {r:?}: {e}"));
                    check_outcome(name, size, format, r, got);
                }
            }
        }
    }
}

fn rgb(p: &image::Rgba<u8>) -> (u8, u8, u8) {
    (p[0], p[1], p[2])
}

fn near(p: &image::Rgba<u8>, want: (u8, u8, u8)) -> bool {
    let d = |a: u8, b: u8| a.abs_diff(b) <= 60;
    d(p[0], want.0) && d(p[1], want.1) && d(p[2], want.2)
}

#[test]
fn exif_orientation_shows_red_top_left() {
    const RED: (u8, u8, u8) = (255, 0, 0);
    const GREEN: (u8, u8, u8) = (0, 255, 0);
    const BLUE: (u8, u8, u8) = (0, 0, 255);
    const WHITE: (u8, u8, u8) = (255, 255, 255);
    let names = (1..=8)
        .map(|o| (format!("orient_{o}.jpg"), o))
        .chain(["png", "webp", "tiff"].map(|ext| (format!("orient_6.{ext}"), 6)));
    for (name, o) in names {
        let source = thumbnail::inspect(file(&name)).expect("header");
        assert_eq!(source.orientation.to_exif(), o, "{name}");
        assert_eq!(
            (source.width, source.height),
            (400, 300),
            "{name}: displayed size"
        );
        for (bw, bh) in [(32, 32), (96, 96), (320, 240)] {
            for method in METHODS {
                let r = request(bw, bh, method, false);
                let t = made(&name, r);
                let img = decode(&t).image;
                let (w, h) = img.dimensions();
                assert!(
                    w > h || method == Method::Crop,
                    "{name} {r:?}: {w}x{h} not landscape"
                );
                let quadrants = [
                    ((0, 0), RED),
                    ((w / 4, h / 4), RED),
                    ((3 * w / 4, h / 4), GREEN),
                    ((w / 4, 3 * h / 4), BLUE),
                    ((3 * w / 4, 3 * h / 4), WHITE),
                ];
                for ((x, y), want) in quadrants {
                    let p = img.get_pixel(x, y);
                    assert!(
                        near(p, want),
                        "{name} {r:?}: pixel ({x},{y}) is {:?}, want {want:?}",
                        rgb(p)
                    );
                }
            }
        }
    }
}

#[test]
fn cmyk_jpeg_is_red() {
    for (bw, bh) in [(32, 32), (96, 96)] {
        let t = made("cmyk.jpg", request(bw, bh, Method::Scale, false));
        assert_eq!(t.content_type, "image/jpeg");
        let img = decode(&t).image;
        let p = img.get_pixel(img.width() / 2, img.height() / 2);
        assert!(
            p[0] > 200 && p[1] < 60 && p[2] < 60,
            "{bw}x{bh}: centre is {:?}",
            rgb(p)
        );
    }
}

#[test]
fn grayscale_jpeg_stays_gray() {
    let t = made("gray.jpg", request(96, 96, Method::Scale, false));
    let img = decode(&t).image;
    let (w, h) = img.dimensions();
    // A top-to-bottom gradient turned a quarter counter-clockwise: dark on the left.
    let (left, right) = (img.get_pixel(2, h / 2)[0], img.get_pixel(w - 3, h / 2)[0]);
    assert!(left < 60 && right > 195, "no gradient: {left} vs {right}");
    for p in img.pixels() {
        assert!(
            p[0].abs_diff(p[1]) <= 8 && p[1].abs_diff(p[2]) <= 8,
            "{:?}",
            rgb(p)
        );
    }
}

#[test]
fn alpha_is_kept() {
    for (bw, bh) in [(32, 32), (96, 96), (320, 240)] {
        for method in METHODS {
            let r = request(bw, bh, method, false);
            let t = made("rgba.png", r);
            assert_eq!(t.content_type, "image/png");
            let img = decode(&t).image;
            let (w, h) = img.dimensions();
            let clear = img.get_pixel(w / 8, h / 2);
            let solid = img.get_pixel(7 * w / 8, h / 2);
            assert_eq!(clear[3], 0, "{r:?}: the transparent half is {clear:?}");
            assert_eq!(solid[3], 255, "{r:?}: the opaque half is {solid:?}");
            assert!(
                near(solid, (30, 60, 220)),
                "{r:?}: opaque half is {solid:?}"
            );
        }
    }
}

#[test]
fn sixteen_bit_png_keeps_its_gradient() {
    for method in METHODS {
        let t = made("gray16.png", request(96, 96, method, false));
        let img = decode(&t).image;
        let (w, h) = img.dimensions();
        let (left, right) = (img.get_pixel(1, h / 2), img.get_pixel(w - 2, h / 2));
        assert!(
            left[0] < 60 && right[0] > 195,
            "{method:?}: {left:?} .. {right:?}"
        );
        assert_eq!(left[3], 255);
    }
}

#[test]
fn one_pixel_is_the_original() {
    let source = thumbnail::inspect(file("one.png")).expect("header");
    assert_eq!((source.width, source.height), (1, 1));
    let requests: Vec<Request> = BOXES
        .iter()
        .flat_map(|&(w, h)| METHODS.map(|m| request(w, h, m, false)))
        .collect();
    let results = thumbnail::render(file("one.png"), &requests, &limits()).expect("header");
    assert_eq!(results.len(), requests.len());
    for (r, got) in requests.iter().zip(results) {
        assert_eq!(got, Ok(Outcome::Original), "{r:?}");
    }
}

/// Broken files are refused or (libjpeg fills a truncated scan with grey) thumbnailed; a panic
/// never reaches the caller.
#[test]
fn truncated_and_corrupt_are_refused_not_panics() {
    let requests: Vec<Request> = BOXES
        .iter()
        .flat_map(|&(w, h)| METHODS.map(|m| request(w, h, m, true)))
        .collect();
    for name in ["truncated.jpg", "corrupt.png"] {
        let data = file(name);
        let outcome = std::panic::catch_unwind(|| {
            (
                thumbnail::inspect(data),
                thumbnail::render(data, &requests, &limits()),
            )
        });
        let (inspected, rendered) = outcome.unwrap_or_else(|_| panic!("{name}: a panic escaped"));
        match inspected {
            Ok(_) | Err(Error::Corrupt(_)) => {}
            Err(e) => panic!("{name}: inspect gave {e:?}"),
        }
        match rendered {
            Err(Error::Corrupt(_)) => {}
            Err(e) => panic!("{name}: render gave {e:?}"),
            Ok(results) => {
                assert_eq!(results.len(), requests.len(), "{name}");
                for (r, got) in requests.iter().zip(results) {
                    match got {
                        Err(Error::Corrupt(_)) => {}
                        Ok(Outcome::Made(t)) => {
                            decode(&t);
                        }
                        other => panic!("{name} {r:?}: {other:?}"),
                    }
                }
            }
        }
    }
    // The corrupt PNG has no IHDR: nothing to make of it.
    assert!(matches!(
        thumbnail::render(file("corrupt.png"), &requests, &limits()),
        Err(Error::Corrupt(_))
    ));
}

/// SVG is rendered from the document alone: the PNG it references by path, by relative name and
/// as a data URI is never drawn (the right half stays transparent), so nothing was read.
#[test]
fn svg_renders_without_reading_what_it_references() {
    let svg = file("local.svg");
    assert!(std::str::from_utf8(svg).expect("utf-8").contains("red.png"));
    let source = thumbnail::inspect(svg).expect("an SVG");
    assert_eq!(
        (source.format, source.width, source.height),
        (thumbnail::Format::Svg, 200, 200)
    );
    let requests = [
        request(96, 96, Method::Scale, false),
        request(320, 240, Method::Scale, false),
    ];
    let results = thumbnail::render(svg, &requests, &limits()).expect("rendered");
    let sizes = [(96, 96), (200, 200)];
    for (result, size) in results.into_iter().zip(sizes) {
        // Never the SVG itself (it can carry scripts): a PNG, at most the document's size.
        let Ok(Outcome::Made(t)) = result else {
            panic!("{result:?}")
        };
        assert_eq!(t.content_type, "image/png");
        let image = image::load_from_memory(&t.bytes).expect("a PNG").to_rgba8();
        assert_eq!(image.dimensions(), size);
        let (w, h) = size;
        let left = image.get_pixel(w / 4, h / 2);
        assert!(
            left[2] > 200 && left[0] < 50 && left[3] > 200,
            "blue: {left:?}"
        );
        for y in [h / 4, h * 5 / 8, h * 7 / 8] {
            let right = image.get_pixel(w * 3 / 4, y);
            assert!(
                right[3] < 20,
                "the referenced PNG was drawn at y={y}: {right:?}"
            );
        }
    }
}

/// A billion-laughs SVG stops at the node limit, long before its expansion.
#[test]
fn svg_entity_expansion_is_bounded() {
    let result = thumbnail::render(
        file("lol.svg"),
        &[request(32, 32, Method::Scale, false)],
        &Limits::default(),
    );
    assert!(matches!(result, Err(Error::Corrupt(_))), "{result:?}");
}

#[test]
fn png_bomb_is_refused_from_its_header() {
    let bomb = file("bomb.png");
    let source = thumbnail::inspect(bomb).expect("a valid header");
    assert_eq!((source.width, source.height), (30000, 30000));
    let max = Limits::default().max_pixels;
    assert_eq!(
        thumbnail::render(
            bomb,
            &[request(96, 96, Method::Scale, false)],
            &Limits::default()
        ),
        Err(Error::TooManyPixels {
            pixels: 900_000_000,
            max
        })
    );
}

#[test]
fn five_thousand_frames_are_refused() {
    let gif = file("frames5000.gif");
    match thumbnail::render(
        gif,
        &[request(32, 32, Method::Scale, true)],
        &Limits::default(),
    ) {
        Err(Error::TooManyFrames { frames, max }) => {
            assert_eq!(max, thumbnail::MAX_FRAMES);
            assert!(frames > max, "{frames} frames");
        }
        other => panic!("expected TooManyFrames, got {other:?}"),
    }
}

#[test]
fn five_requests_five_results_in_order() {
    let requests = [
        request(32, 32, Method::Crop, false),
        request(96, 96, Method::Scale, false),
        request(320, 240, Method::Crop, false),
        request(800, 600, Method::Scale, false),
        request(1600, 1200, Method::Scale, false),
    ];
    let results = thumbnail::render(file("baseline.jpg"), &requests, &limits()).expect("header");
    assert_eq!(results.len(), 5);
    let expected = [
        Some((32, 32)),
        Some((96, 72)),
        Some((320, 240)),
        Some((800, 600)),
        None,
    ];
    for ((r, got), want) in requests.iter().zip(results).zip(expected) {
        match (got, want) {
            (Ok(Outcome::Made(t)), Some(size)) => {
                assert_eq!((t.width, t.height), size, "{r:?}");
                assert_eq!(decode(&t).image.dimensions(), size, "{r:?}");
            }
            (Ok(Outcome::Original), None) => {}
            (got, _) => panic!("{r:?}: {got:?}"),
        }
    }
}

#[test]
fn animation_over_the_byte_limit_is_a_still_png() {
    let gif = file("anim.gif");
    let r = request(96, 96, Method::Scale, true);
    // Within the limit: animated (so the limit below is what makes the difference).
    match render_one(gif, r) {
        Ok(Outcome::Made(t)) => assert_eq!(t.content_type, "image/gif"),
        other => panic!("{other:?}"),
    }
    let tight = Limits {
        max_animate_bytes: 16,
        ..limits()
    };
    let mut results = thumbnail::render(gif, &[r], &tight).expect("header");
    let t = match results.remove(0) {
        Ok(Outcome::Made(t)) => t,
        other => panic!("{other:?}"),
    };
    assert_eq!(t.content_type, "image/png");
    assert!(!t.animated);
    assert_eq!((t.width, t.height), (96, 72));
    assert_eq!(decode(&t).frames, 1);
}

/// The source at full size, as stored (the files used here have no orientation).
fn full_size(name: &str) -> image::RgbaImage {
    let data = file(name);
    if name.ends_with(".jpg") {
        let d = mozjpeg::Decompress::new_mem(data).expect("JPEG header");
        let mut started = d.rgb().expect("JPEG decode");
        let (w, h) = (started.width() as u32, started.height() as u32);
        let rgb: Vec<u8> = started.read_scanlines().expect("JPEG scanlines");
        let rgb = image::RgbImage::from_raw(w, h, rgb).expect("JPEG buffer size");
        image::DynamicImage::ImageRgb8(rgb).into_rgba8()
    } else {
        image::load_from_memory(data).expect(name).into_rgba8()
    }
}

/// The mean colour of the pixels whose centres lie in `[x0, x1) × [y0, y1)`.
fn mean(img: &image::RgbaImage, (x0, y0, x1, y1): (f64, f64, f64, f64)) -> [f64; 3] {
    let (mut sum, mut n) = ([0.0; 3], 0.0);
    for (x, y, p) in img.enumerate_pixels() {
        let (cx, cy) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
        if cx >= x0 && cx < x1 && cy >= y0 && cy < y1 {
            for c in 0..3 {
                sum[c] += f64::from(p[c]);
            }
            n += 1.0;
        }
    }
    assert!(n > 0.0, "empty region {x0},{y0}..{x1},{y1}");
    sum.map(|v| v / n)
}

/// Each cell of a 4×4 grid over the thumbnail has the mean colour of the source region it
/// shows: the whole source for `scale`, the centre for `crop` (an off-centre crop, a stretched
/// or DCT-misscaled decode shifts the photo's gradients by far more than the tolerance).
#[test]
fn thumbnails_show_the_right_part_of_the_source() {
    let names = [
        "baseline.jpg",
        "progressive.jpg",
        "gray16.png",
        "still.webp",
        "still.gif",
        "image.bmp",
        "image.tiff",
    ];
    for name in names {
        let src = full_size(name);
        let (sw, sh) = (f64::from(src.width()), f64::from(src.height()));
        for (bw, bh) in [(32, 32), (96, 96), (320, 240)] {
            for method in METHODS {
                if src.width() <= bw && src.height() <= bh {
                    continue; // Served as it is (or re-encoded whole): nothing cut.
                }
                let r = request(bw, bh, method, false);
                let t = made(name, r);
                let thumb = decode(&t).image;
                let (w, h) = (f64::from(t.width), f64::from(t.height));
                let (left, top, cw, ch) = match method {
                    Method::Scale => (0.0, 0.0, sw, sh),
                    Method::Crop => {
                        let s = (w / sw).max(h / sh);
                        ((sw - w / s) / 2.0, (sh - h / s) / 2.0, w / s, h / s)
                    }
                };
                let mut worst = 0.0_f64;
                for i in 0..4 {
                    for j in 0..4 {
                        let (fx0, fx1) = (f64::from(i) / 4.0, f64::from(i + 1) / 4.0);
                        let (fy0, fy1) = (f64::from(j) / 4.0, f64::from(j + 1) / 4.0);
                        let got = mean(&thumb, (fx0 * w, fy0 * h, fx1 * w, fy1 * h));
                        let want = mean(
                            &src,
                            (
                                left + fx0 * cw,
                                top + fy0 * ch,
                                left + fx1 * cw,
                                top + fy1 * ch,
                            ),
                        );
                        for c in 0..3 {
                            worst = worst.max((got[c] - want[c]).abs());
                        }
                    }
                }
                assert!(worst < 12.0, "{name} {r:?}: a cell is off by {worst:.1}");
            }
        }
    }
}

/// Over `MAX_OUTPUT_FRAMES` frames, frames are merged into the one before: the animation still
/// starts with the source's first frame and lasts as long.
#[test]
fn long_animation_is_merged_keeping_start_and_duration() {
    let gif = file("long.gif");
    let source = thumbnail::inspect(gif).expect("header");
    assert_eq!(source.animation.map(|a| a.frames), Some(300));
    let t = made("long.gif", request(32, 32, Method::Scale, true));
    assert_eq!(t.content_type, "image/gif");
    let frames = image::codecs::gif::GifDecoder::new(Cursor::new(&t.bytes))
        .expect("GIF header")
        .into_frames()
        .collect_frames()
        .expect("GIF frames");
    let kept = frames.len() as u64;
    assert!(
        kept > 1 && kept <= thumbnail::MAX_OUTPUT_FRAMES,
        "{kept} frames"
    );
    let total_ms: u32 = frames
        .iter()
        .map(|f| {
            let (n, d) = f.delay().numer_denom_ms();
            n / d
        })
        .sum();
    assert_eq!(total_ms, 300 * 20, "the duration changed ({kept} frames)");
    let first = frames[0].buffer().get_pixel(16, 16);
    assert!(near(first, (255, 0, 0)), "first frame is {:?}", rgb(first));
}

/// Tiny frame rectangles do not make an animation cheap: every frame is composited onto the
/// whole canvas, so 40 frames on a 4 MP screen are over `ANIMATION_PIXELS` and get a still.
#[test]
fn sparse_frames_on_a_large_canvas_are_over_the_animation_budget() {
    let gif = file("sparse.gif");
    let source = thumbnail::inspect(gif).expect("header");
    assert_eq!((source.width, source.height), (2000, 2000));
    let animation = source.animation.expect("animated");
    assert_eq!(animation.frames, 40);
    assert!(
        animation.area > thumbnail::ANIMATION_PIXELS,
        "{} pixels counted for 40 canvases of 4 MP",
        animation.area
    );
    let t = made("sparse.gif", request(96, 96, Method::Scale, true));
    assert_eq!(t.content_type, "image/png", "animated over the budget");
    assert!(!t.animated);
    // The first frame (the still of an over-budget animation): its one red pixel is lost in
    // the scale-down, the rest of the canvas is transparent.
    assert_eq!(decode(&t).image.get_pixel(48, 48)[3], 0);
}

/// A video made with the ffmpeg on PATH (`cargo xtask test` provides one) from a lavfi source.
fn video(dir: &Path, name: &str, source: &str, codec: &[&str]) -> Vec<u8> {
    let path = dir.join(name);
    let status = Command::new("ffmpeg")
        .args(["-nostdin", "-v", "error", "-f", "lavfi", "-i", source])
        .args(codec)
        .arg(&path)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run ffmpeg ({e}): run the tests with `cargo xtask test`, which provides it"
            )
        });
    assert!(status.success(), "ffmpeg could not make {name}");
    std::fs::read(&path).expect("the video ffmpeg wrote")
}

/// Video: the first frame, through ffmpeg, thumbnailed like a still and never served as it is;
/// the pixel limit holds from ffprobe's answer, before anything is decoded.
#[test]
fn video_thumbnails_come_from_the_first_frame() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mp4 = video(
        dir.path(),
        "red.mp4",
        "color=c=red:size=640x480:rate=10:duration=1",
        &["-c:v", "libx264", "-pix_fmt", "yuv420p"],
    );
    let webm = video(
        dir.path(),
        "blue.webm",
        "color=c=blue:size=320x240:rate=10:duration=1",
        &["-c:v", "libvpx"],
    );
    assert_eq!(thumbnail::sniff(&mp4), Some(Format::Mp4));
    assert_eq!(thumbnail::sniff(&webm), Some(Format::Webm));
    let requests = [
        request(96, 96, Method::Crop, false),
        request(320, 240, Method::Scale, true),
        request(800, 600, Method::Scale, false),
    ];
    let results = thumbnail::render(&mp4, &requests, &limits()).expect("a video");
    let made = |r: &Result<Outcome, Error>| match r {
        Ok(Outcome::Made(t)) => t.clone(),
        other => panic!("{other:?}"),
    };
    let sizes = [(96, 96), (320, 240), (640, 480)];
    for (result, size) in results.iter().zip(sizes) {
        let t = made(result);
        assert_eq!((t.content_type, t.animated), ("image/png", false));
        let image = image::load_from_memory(&t.bytes).expect("a PNG").to_rgb8();
        assert_eq!(image.dimensions(), size);
        let p = image.get_pixel(size.0 / 2, size.1 / 2);
        assert!(p[0] > 200 && p[1] < 60 && p[2] < 60, "red: {p:?}");
    }
    let results = thumbnail::render(&webm, &[request(800, 600, Method::Scale, false)], &limits())
        .expect("a video");
    let t = made(&results[0]);
    let image = image::load_from_memory(&t.bytes).expect("a PNG").to_rgb8();
    assert_eq!(
        image.dimensions(),
        (320, 240),
        "never upscaled, never the video itself"
    );
    let p = image.get_pixel(160, 120);
    assert!(p[2] > 200 && p[0] < 60, "blue: {p:?}");

    let small = Limits {
        max_pixels: 100_000,
        ..limits()
    };
    assert_eq!(
        thumbnail::render(&mp4, &requests, &small).map(|_| ()),
        Err(Error::TooManyPixels {
            pixels: 640 * 480,
            max: 100_000
        })
    );
    // A container header and nothing after: ffprobe refuses it.
    let mut broken = mp4[..32].to_vec();
    broken.extend(std::iter::repeat_n(0x55, 500));
    assert!(matches!(
        thumbnail::render(&broken, &requests, &limits()),
        Err(Error::Corrupt(_))
    ));
}
