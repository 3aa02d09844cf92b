//! Response headers for media: Content-Disposition with filenames that round-trip, the inline
//! allowlist, and the security headers the spec recommends.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Types the spec allows to be served inline ("Serving inline content", v1.12). SVG is absent on
/// purpose: it can carry scripts.
const INLINE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

pub(crate) const CONTENT_SECURITY_POLICY: &str = "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; \
     style-src 'unsafe-inline'; media-src 'self'; object-src 'self';";

/// Media never changes under its mxc URI.
pub(crate) const CACHE_CONTROL: &str = "public, max-age=31536000, immutable";

/// Whether a content type (any case, parameters allowed) may be shown inline.
pub(crate) fn is_inline(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    INLINE_TYPES.contains(&essence.as_str())
}

/// RFC 5987 `attr-char`: everything else is percent-encoded in `filename*`.
const ATTR_CHAR: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'!')
    .remove(b'#')
    .remove(b'$')
    .remove(b'&')
    .remove(b'+')
    .remove(b'-')
    .remove(b'.')
    .remove(b'^')
    .remove(b'_')
    .remove(b'`')
    .remove(b'|')
    .remove(b'~');

/// `inline` or `attachment`, with the file name as `filename` (quoted) when it is plain printable
/// ASCII, and as `filename*` (UTF-8, RFC 6266) otherwise, so every name round-trips.
pub(crate) fn content_disposition(content_type: &str, file_name: Option<&str>) -> String {
    let disposition = if is_inline(content_type) {
        "inline"
    } else {
        "attachment"
    };
    let Some(name) = file_name.filter(|n| !n.is_empty()) else {
        return disposition.to_owned();
    };
    let plain = name
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    if plain {
        format!("{disposition}; filename=\"{name}\"")
    } else {
        format!(
            "{disposition}; filename*=utf-8''{}",
            utf8_percent_encode(name, ATTR_CHAR)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_allowlist_ignores_case_and_parameters() {
        assert!(is_inline("image/png"));
        assert!(is_inline("Text/Plain; charset=utf-8"));
        assert!(!is_inline("image/svg+xml"));
        assert!(!is_inline("text/html"));
        assert!(!is_inline(""));
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(
            content_disposition("image/png", Some("a b;c.png")),
            "inline; filename=\"a b;c.png\""
        );
        assert_eq!(content_disposition("image/svg+xml", None), "attachment");
        assert_eq!(
            content_disposition("text/plain", Some("☕ \"q\".txt")),
            "inline; filename*=utf-8''%E2%98%95%20%22q%22.txt"
        );
    }
}
