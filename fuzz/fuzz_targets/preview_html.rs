//! A page as a preview reads it: the first byte picks the charset the header names (none, UTF-8,
//! windows-1252, Shift_JIS, UTF-16LE) and the size of the chunks it arrives in; the rest is the
//! page. No panic, no unbounded text, and the same page whole or in chunks.
#![no_main]

use libfuzzer_sys::fuzz_target;
use preview::{Extractor, TextLimits};

const CHARSETS: [Option<&str>; 5] = [None, Some("utf-8"), Some("windows-1252"), Some("shift_jis"), Some("utf-16le")];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, page)) = data.split_first() else {
        return;
    };
    let charset = CHARSETS[usize::from(selector & 7) % CHARSETS.len()];
    let chunk = 1 + usize::from(selector >> 3) * 7;
    let url = url::Url::parse("https://site.example/a/b.html").unwrap();
    let mut x = Extractor::new(url.clone(), charset);
    for piece in page.chunks(chunk) {
        match x.feed(piece) {
            Ok(false) => {}
            Ok(true) | Err(_) => break,
        }
    }
    if let Ok(found) = x.finish() {
        let og = found.open_graph(&url, TextLimits::default());
        for (key, value) in &og {
            if let Some(text) = value.as_str() {
                assert!(text.chars().count() <= 4096 + 1, "{key} too long");
            }
        }
        if let Some(title) = og.get("og:title").and_then(|t| t.as_str()) {
            assert!(title.chars().count() <= 150, "title not cut: {title}");
        }
        if let Some(image) = og.get("og:image").and_then(|t| t.as_str()) {
            assert!(image.starts_with("http://") || image.starts_with("https://"), "{image}");
        }
    }
    let _ = preview::oembed::to_open_graph(page, &url, TextLimits::default());
});
