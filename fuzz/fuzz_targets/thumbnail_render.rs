//! `thumbnail::render` on arbitrary images of every format: nothing panics out of it, nothing
//! aborts, nothing outgrows libFuzzer's `-rss_limit_mb`, and what it makes is what was asked
//! (never larger than the box or the source, readable back at the size it says).
//!
//! Input: byte 0 picks the format (SVG when bit 5 is set, else `FORMATS[byte % 6]`; its
//! signature is put in front of the
//! rest unless the rest already starts with a signature `sniff` knows, so that every decoder is
//! reached) and, in bits 3-4, the still frame of an animation (`STILL_FRAMES`); the rest is the
//! file. The limits are small (4 MP, animations only up to 16 KiB and 50 ms) to keep iterations
//! fast.
//!
//! `render` catches the decoders' panics and libjpeg's unwinding errors (they become
//! `Error::Corrupt`), so libfuzzer-sys's panic hook (print, then abort, even for a panic caught
//! later) is replaced by a silent one: only a panic escaping `render` is a finding. Set
//! `THUMBNAIL_FUZZ_PANICS=1` to see every panic, caught or not (std's hook, with `RUST_BACKTRACE`).
#![no_main]

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use thumbnail::{Error, Format, Limits, Method, Outcome, Request};

// libjpeg's errors unwind through its C frames and `render` catches them: with panic=abort the
// first corrupt JPEG would end the process. cargo-fuzz 0.13 builds with unwinding; keep it so.
const _: () = assert!(
    cfg!(panic = "unwind"),
    "build the fuzz targets with panic=unwind"
);

/// Byte 0 % 6 (the seeds' first byte, see `seeds/make_thumbnail_seeds.py`).
const FORMATS: [Format; 6] = [
    Format::Jpeg,
    Format::Png,
    Format::Gif,
    Format::Webp,
    Format::Bmp,
    Format::Tiff,
];

/// Byte 0 >> 3 & 3.
const STILL_FRAMES: [f64; 4] = [0.5, 0.0, 1.0, 0.25];

const REQUESTS: [Request; 3] = [
    Request {
        width: 32,
        height: 32,
        method: Method::Scale,
        animated: true,
    },
    Request {
        width: 32,
        height: 24,
        method: Method::Crop,
        animated: false,
    },
    Request {
        width: 96,
        height: 96,
        method: Method::Scale,
        animated: false,
    },
];

macro_rules! finding {
    ($($arg:tt)*) => {{
        eprintln!("FINDING: {}", format_args!($($arg)*));
        std::process::abort()
    }};
}

fn with_signature(format: Format, rest: &[u8]) -> Cow<'_, [u8]> {
    if thumbnail::sniff(rest).is_some() {
        return Cow::Borrowed(rest);
    }
    let mut file = match format {
        Format::Jpeg => vec![0xFF, 0xD8, 0xFF],
        Format::Png => b"\x89PNG\r\n\x1a\n".to_vec(),
        Format::Gif => b"GIF89a".to_vec(),
        Format::Webp => {
            let size = u32::try_from(rest.len() + 4).unwrap_or(u32::MAX);
            [&b"RIFF"[..], &size.to_le_bytes(), b"WEBP"].concat()
        }
        Format::Bmp => b"BM".to_vec(),
        Format::Tiff => b"II*\0".to_vec(),
        Format::Svg => br#"<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">"#.to_vec(),
        // Videos need ffmpeg, which the fuzzer does not have: they are `Unsupported` here.
        Format::Mp4 | Format::Webm => Vec::new(),
    };
    file.extend_from_slice(rest);
    Cow::Owned(file)
}

fuzz_target!(
    init: {
        drop(std::panic::take_hook());
        if std::env::var_os("THUMBNAIL_FUZZ_PANICS").is_none() {
            std::panic::set_hook(Box::new(|_| {}));
        }
    },
    |data: &[u8]| {
        let Some((&selector, rest)) = data.split_first() else {
            return;
        };
        let format = if selector & 0x20 != 0 {
            Format::Svg
        } else {
            FORMATS[usize::from(selector % 6)]
        };
        let file = with_signature(format, rest);
        let limits = Limits {
            max_pixels: 4_000_000,
            max_animate_bytes: 16 * 1024,
            still_frame: STILL_FRAMES[usize::from(selector >> 3 & 3)],
            animation_time: Duration::from_millis(50),
        };
        let results = match catch_unwind(AssertUnwindSafe(|| {
            thumbnail::render(&file, &REQUESTS, &limits)
        })) {
            Ok(Ok(results)) => results,
            Ok(Err(_)) => return,
            Err(payload) => finding!("a panic escaped thumbnail::render: {}", message(&*payload)),
        };
        check(&file, &results, &limits);
    }
);

/// What was made is what was asked.
fn check(file: &[u8], results: &[Result<Outcome, Error>], limits: &Limits) {
    if results.len() != REQUESTS.len() {
        finding!("{} results for {} requests", results.len(), REQUESTS.len());
    }
    // `render` read the same header to get this far.
    let source = match thumbnail::inspect(file) {
        Ok(source) => source,
        Err(e) => finding!("render accepted what inspect refuses: {e}"),
    };
    if u64::from(source.width) * u64::from(source.height) > limits.max_pixels {
        finding!("rendered a source over max_pixels: {source:?}");
    }
    for (request, result) in REQUESTS.iter().zip(results) {
        let thumbnail = match result {
            Ok(Outcome::Made(t)) => t,
            Ok(Outcome::Original) => {
                if source.width > request.width
                    || source.height > request.height
                    || !source.format.clients_render()
                    || (source.animation.is_some() && !request.animated)
                {
                    finding!("the original {source:?} served for {request:?}");
                }
                continue;
            }
            Err(_) => continue,
        };
        let (w, h) = (thumbnail.width, thumbnail.height);
        if w == 0 || h == 0 || w > request.width || h > request.height {
            finding!("{w}x{h} made for {request:?}");
        }
        if w > source.width || h > source.height {
            finding!("{w}x{h} made of {source:?}: upscaled");
        }
        if thumbnail.animated && (!request.animated || source.animation.is_none()) {
            finding!("an animation made of {source:?} for {request:?}");
        }
        match thumbnail::inspect(&thumbnail.bytes) {
            Ok(made)
                if (made.width, made.height) == (w, h)
                    && made.format.mime() == thumbnail.content_type => {}
            other => finding!(
                "the {w}x{h} {} thumbnail of {source:?} reads back as {other:?}",
                thumbnail.content_type
            ),
        }
    }
}

fn message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(not a string)")
}
