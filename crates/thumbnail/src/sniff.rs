//! What the bytes are, from their first bytes: the uploader's Content-Type decides nothing.

/// The formats we can thumbnail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jpeg,
    /// PNG, APNG included (told apart by the header's `acTL`).
    Png,
    Gif,
    Webp,
    Bmp,
    Tiff,
    /// Rendered, never served as it is (it can carry scripts).
    Svg,
    /// MP4 and QuickTime (ISO media with a video brand): the first frame, through ffmpeg.
    Mp4,
    /// WebM and Matroska: the same.
    Webm,
}

impl Format {
    /// The media type that `thumbnails.types` lists for this format.
    pub fn mime(self) -> &'static str {
        match self {
            Format::Jpeg => "image/jpeg",
            Format::Png => "image/png",
            Format::Gif => "image/gif",
            Format::Webp => "image/webp",
            Format::Bmp => "image/bmp",
            Format::Tiff => "image/tiff",
            Format::Svg => "image/svg+xml",
            Format::Mp4 => "video/mp4",
            Format::Webm => "video/webm",
        }
    }

    /// Every browser and Matrix client shows it as it is, so a source smaller than the
    /// requested size can be served as the thumbnail (TIFF and BMP are re-encoded instead).
    pub fn clients_render(self) -> bool {
        matches!(
            self,
            Format::Jpeg | Format::Png | Format::Gif | Format::Webp
        )
    }
}

/// The format of `data`, from its signature.
pub fn sniff(data: &[u8]) -> Option<Format> {
    let starts = |sig: &[u8]| data.starts_with(sig);
    if starts(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if starts(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if starts(b"GIF87a") || starts(b"GIF89a") {
        Some(Format::Gif)
    } else if data.len() >= 12 && starts(b"RIFF") && &data[8..12] == b"WEBP" {
        Some(Format::Webp)
    } else if starts(b"BM") && data.len() >= 26 {
        Some(Format::Bmp)
    } else if starts(b"II*\0") || starts(b"MM\0*") {
        Some(Format::Tiff)
    } else if data.len() >= 12 && &data[4..8] == b"ftyp" && !is_still_brand(&data[8..12]) {
        Some(Format::Mp4)
    } else if starts(&[0x1A, 0x45, 0xDF, 0xA3]) {
        Some(Format::Webm)
    } else if is_svg(data) {
        Some(Format::Svg)
    } else {
        None
    }
}

/// ISO media brands of still images (HEIF, AVIF): not videos.
fn is_still_brand(brand: &[u8]) -> bool {
    [
        &b"heic"[..],
        b"heix",
        b"heim",
        b"heis",
        b"mif1",
        b"msf1",
        b"avif",
        b"avis",
    ]
    .contains(&brand)
}

/// XML (after a BOM and blanks: a declaration, a comment, a doctype or the element) with an
/// `<svg` element in its first 4 KiB.
fn is_svg(data: &[u8]) -> bool {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let start = data
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(data.len());
    let head = &data[start..data.len().min(start + 4096)];
    let xml = [&b"<?xml"[..], b"<!--", b"<!DOCTYPE", b"<svg"]
        .iter()
        .any(|p| head.starts_with(p));
    xml && head.windows(4).any(|w| w == b"<svg")
}

/// The media types `thumbnails.types` may name for `format` (MMR's configs list `image/jpg` and
/// `image/apng` too).
pub fn listed(format: Format, types: &[String]) -> bool {
    let aliases: &[&str] = match format {
        Format::Jpeg => &["image/jpeg", "image/jpg", "image/pjpeg"],
        Format::Png => &["image/png", "image/apng"],
        Format::Bmp => &["image/bmp", "image/x-bmp"],
        Format::Mp4 => &["video/mp4", "video/quicktime"],
        Format::Webm => &["video/webm", "video/x-matroska"],
        other => &[other.mime()],
    };
    types
        .iter()
        .any(|t| aliases.iter().any(|a| t.trim().eq_ignore_ascii_case(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_decide_not_extensions() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0rest"), Some(Format::Jpeg));
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some(Format::Png));
        assert_eq!(sniff(b"GIF89a......"), Some(Format::Gif));
        assert_eq!(sniff(b"RIFF\x10\0\0\0WEBPVP8 "), Some(Format::Webp));
        assert_eq!(sniff(b"RIFF\x10\0\0\0WAVEfmt "), None);
        assert_eq!(sniff(b"II*\0\x08\0\0\0"), Some(Format::Tiff));
        assert_eq!(sniff(b"<svg xmlns="), Some(Format::Svg));
        assert_eq!(
            sniff(b"\xEF\xBB\xBF  <?xml version=\"1.0\"?>\n<svg>"),
            Some(Format::Svg)
        );
        assert_eq!(sniff(b"<?xml version=\"1.0\"?><html>"), None);
        assert_eq!(
            sniff(b"<html><svg>"),
            None,
            "HTML with an inline SVG is HTML"
        );
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(b"BM"), None, "too short for a BMP header");
    }

    #[test]
    fn listed_types_accept_mmr_aliases() {
        let types = vec!["image/jpg".to_owned(), "IMAGE/APNG".to_owned()];
        assert!(listed(Format::Jpeg, &types));
        assert!(listed(Format::Png, &types));
        assert!(!listed(Format::Gif, &types));
    }
}
