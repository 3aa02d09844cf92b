//! `thumbnail::sniff` and `thumbnail::inspect` (headers only: format, size, frame count, EXIF
//! orientation) on arbitrary bytes: nothing panics out of `inspect`, and what it says agrees with
//! `sniff`.
//!
//! `inspect` catches the decoders' panics itself (and libjpeg's errors, which unwind), so the
//! panic hook libfuzzer-sys installs (print, then abort, even for a panic that is caught later)
//! is replaced by a silent one: only a panic that escapes `inspect` is a finding. Set
//! `THUMBNAIL_FUZZ_PANICS=1` to see every panic, caught or not (std's hook, with `RUST_BACKTRACE`).
#![no_main]

use std::panic::{AssertUnwindSafe, catch_unwind};

use libfuzzer_sys::fuzz_target;
use thumbnail::{Error, Format};

// libjpeg's errors unwind through its C frames and `inspect` catches them: with panic=abort the
// first corrupt JPEG would end the process. cargo-fuzz 0.13 builds with unwinding; keep it so.
const _: () = assert!(
    cfg!(panic = "unwind"),
    "build the fuzz targets with panic=unwind"
);

/// Prints why and aborts (libFuzzer saves the input): an `assert!` would be silent here, since
/// the panic hook is.
macro_rules! finding {
    ($($arg:tt)*) => {{
        eprintln!("FINDING: {}", format_args!($($arg)*));
        std::process::abort()
    }};
}

fuzz_target!(
    init: {
        // Back to std's hook, then (unless asked to show panics) to one that prints nothing.
        drop(std::panic::take_hook());
        if std::env::var_os("THUMBNAIL_FUZZ_PANICS").is_none() {
            std::panic::set_hook(Box::new(|_| {}));
        }
    },
    |data: &[u8]| {
        let format = thumbnail::sniff(data);
        let source = match catch_unwind(AssertUnwindSafe(|| thumbnail::inspect(data))) {
            Ok(source) => source,
            Err(payload) => finding!("a panic escaped thumbnail::inspect: {}", message(&*payload)),
        };
        match (&source, format) {
            (Err(Error::Unsupported), None) | (Err(Error::Corrupt(_)), Some(_)) => {}
            // Headers only: a video's size comes from ffprobe, which `inspect` never runs.
            (Err(Error::Unsupported), Some(Format::Mp4 | Format::Webm)) => {}
            (Ok(s), Some(f)) if s.format == f => {
                if s.width == 0 || s.height == 0 {
                    finding!("inspect accepted an empty image: {s:?}");
                }
                if let Some(a) = s.animation
                    && a.frames < 2
                {
                    finding!("an animation of {} frames: {s:?}", a.frames);
                }
            }
            _ => finding!("sniff says {format:?}, inspect says {source:?}"),
        }
    }
);

fn message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(not a string)")
}
