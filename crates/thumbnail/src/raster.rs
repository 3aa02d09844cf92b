//! The formats the `image` crate decodes (PNG, GIF, WebP, BMP, TIFF), with its allocation limit,
//! and PNG output.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::{Error, Format, Pixels};

fn image_format(format: Format) -> Result<ImageFormat, Error> {
    Ok(match format {
        Format::Jpeg => ImageFormat::Jpeg,
        Format::Png => ImageFormat::Png,
        Format::Gif => ImageFormat::Gif,
        Format::Webp => ImageFormat::WebP,
        Format::Bmp => ImageFormat::Bmp,
        Format::Tiff => ImageFormat::Tiff,
        Format::Svg | Format::Mp4 | Format::Webm => return Err(Error::Unsupported),
    })
}

pub(crate) fn corrupt(e: image::ImageError) -> Error {
    Error::Corrupt(e.to_string())
}

/// The decoder's allocation limit for a source of at most `max_pixels`: 16-bit RGBA of that size
/// and some room for the decoder's own buffers.
pub(crate) fn limits(max_pixels: u64) -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(64 << 20));
    limits
}

fn reader(
    data: &[u8],
    format: Format,
    max_pixels: u64,
) -> Result<ImageReader<Cursor<&[u8]>>, Error> {
    let mut reader = ImageReader::with_format(Cursor::new(data), image_format(format)?);
    reader.limits(limits(max_pixels));
    Ok(reader)
}

/// The allocation limit while reading a header (as for a source of this many pixels).
const HEADER_PIXELS: u64 = 8 << 20;

/// Size and orientation from the header; no pixel is decoded.
pub(crate) fn header(data: &[u8], format: Format) -> Result<((u32, u32), Orientation), Error> {
    // Headers and the chunks before the pixels are small; a source over its pixel limit is
    // refused by the caller with the size read here.
    let mut decoder = reader(data, format, HEADER_PIXELS)?
        .into_decoder()
        .map_err(corrupt)?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::Corrupt(format!("impossible size {w}x{h}")));
    }
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    Ok(((w, h), orientation))
}

/// The whole image (an animation's first frame), as stored (orientation not applied).
pub(crate) fn decode(data: &[u8], format: Format, max_pixels: u64) -> Result<Pixels, Error> {
    let decoder = reader(data, format, max_pixels)?
        .into_decoder()
        .map_err(corrupt)?;
    let image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    Ok(Pixels::from_image(image))
}

/// PNG, fast compression: a thumbnail is small, and this is what it costs to make it.
pub(crate) fn encode_png(p: &Pixels) -> Result<Vec<u8>, Error> {
    use image::ImageEncoder as _;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    let color = if p.alpha {
        image::ExtendedColorType::Rgba8
    } else {
        image::ExtendedColorType::Rgb8
    };
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Adaptive)
        .write_image(&p.data, p.width, p.height, color)
        .map_err(|e| Error::Encode(e.to_string()))?;
    Ok(out)
}
