//! Animations (GIF, APNG, animated WebP): counted from their headers before any frame is
//! decoded, then decoded one composited frame at a time (memory: one canvas and one output
//! frame, whatever the length), resized, and written as an animated GIF, which every client
//! shows (the pure-Rust WebP encoder has no animation).

use std::io::Cursor;
use std::time::Instant;

use image::codecs::gif::{GifDecoder, GifEncoder, Repeat};
use image::codecs::png::PngDecoder;
use image::codecs::webp::WebPDecoder;
use image::{AnimationDecoder, DynamicImage, Frames, ImageDecoder as _};

use crate::raster::corrupt;
use crate::{
    Animation, Error, Format, Geometry, MAX_FRAMES, MAX_OUTPUT_FRAMES, Pixels, Source, Thumbnail,
};

/// The frame count and summed frame area, when `data` has more than one frame. GIFs are
/// walked without decompressing; APNG and WebP say their count up front. Every frame counts a
/// whole canvas, whatever its rectangle: the decoders composite each onto a full canvas, so
/// that is what a frame costs.
pub(crate) fn inspect(
    data: &[u8],
    format: Format,
    canvas: (u32, u32),
) -> Result<Option<Animation>, Error> {
    let canvas_area = u64::from(canvas.0) * u64::from(canvas.1);
    let frames = match format {
        Format::Gif => gif_frames(data, canvas)?,
        Format::Png => {
            let reader = png::Decoder::new(Cursor::new(data))
                .read_info()
                .map_err(|e| Error::Corrupt(e.to_string()))?;
            reader
                .info()
                .animation_control()
                .map_or(1, |a| u64::from(a.num_frames))
        }
        Format::Webp => {
            let decoder = image_webp::WebPDecoder::new(Cursor::new(data))
                .map_err(|e| Error::Corrupt(e.to_string()))?;
            if decoder.is_animated() {
                u64::from(decoder.num_frames())
            } else {
                1
            }
        }
        _ => 1,
    };
    Ok((frames > 1).then_some(Animation {
        frames,
        area: frames.saturating_mul(canvas_area),
    }))
}

/// Counts the frames without decompressing them; a frame that does not fit the canvas is refused
/// (the decoder would allocate its rectangle, whatever the canvas's size).
fn gif_frames(data: &[u8], canvas: (u32, u32)) -> Result<u64, Error> {
    let mut options = gif::DecodeOptions::new();
    options.skip_frame_decoding(true);
    let mut decoder = options
        .read_info(Cursor::new(data))
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    let mut frames = 0u64;
    // Past the limit the file is refused anyway: stop counting there.
    while frames <= MAX_FRAMES {
        match decoder.read_next_frame() {
            Ok(Some(f)) => {
                if u32::from(f.left) + u32::from(f.width) > canvas.0
                    || u32::from(f.top) + u32::from(f.height) > canvas.1
                {
                    return Err(Error::Corrupt(format!(
                        "frame {frames} ({}x{} at {},{}) does not fit the {}x{} canvas",
                        f.width, f.height, f.left, f.top, canvas.0, canvas.1
                    )));
                }
                frames += 1;
            }
            Ok(None) => break,
            // A truncated tail: the frames before it are what there is.
            Err(_) if frames > 0 => break,
            Err(e) => return Err(Error::Corrupt(e.to_string())),
        }
    }
    Ok(frames)
}

/// The composited frames, each decoder under the allocation limit of `max_pixels`.
fn frames(data: &[u8], format: Format, max_pixels: u64) -> Result<Frames<'_>, Error> {
    let cursor = Cursor::new(data);
    let limits = crate::raster::limits(max_pixels);
    Ok(match format {
        Format::Gif => {
            let mut d = GifDecoder::new(cursor).map_err(corrupt)?;
            d.set_limits(limits).map_err(corrupt)?;
            d.into_frames()
        }
        Format::Png => {
            let mut d = PngDecoder::new(cursor).map_err(corrupt)?;
            d.set_limits(limits).map_err(corrupt)?;
            d.apng().map_err(corrupt)?.into_frames()
        }
        Format::Webp => {
            let mut d = WebPDecoder::new(cursor).map_err(corrupt)?;
            d.set_limits(limits).map_err(corrupt)?;
            d.into_frames()
        }
        _ => return Err(Error::Unsupported),
    })
}

/// Frame `index` (composited, as shown at that point of the animation).
pub(crate) fn frame(
    data: &[u8],
    format: Format,
    index: u64,
    max_pixels: u64,
) -> Result<Pixels, Error> {
    let mut frames = frames(data, format, max_pixels)?;
    let mut last = None;
    for _ in 0..=index {
        match frames.next() {
            Some(frame) => last = Some(frame.map_err(corrupt)?),
            None => break,
        }
    }
    let frame = last.ok_or_else(|| Error::Corrupt("the animation has no frame".into()))?;
    Ok(Pixels::from_image(DynamicImage::ImageRgba8(
        frame.into_buffer(),
    )))
}

/// The animated thumbnail, or `None` when the deadline passed first (the caller serves a still).
pub(crate) fn render(
    data: &[u8],
    source: &Source,
    geometry: &Geometry,
    deadline: Instant,
    max_pixels: u64,
) -> Result<Option<Thumbnail>, Error> {
    let total = source.animation.map_or(1, |a| a.frames).max(1);
    let mut out = Vec::new();
    {
        // NeuQuant's fastest sampling: palettes for a thumbnail do not need more, and at the
        // default speed the quantiser was most of an animation's time.
        let mut encoder = GifEncoder::new_with_speed(&mut out, 30);
        encoder
            .set_repeat(Repeat::Infinite)
            .map_err(|e| Error::Encode(e.to_string()))?;
        // Frames beyond MAX_OUTPUT_FRAMES are merged into the one before, delays added.
        let mut pending: Option<(image::RgbaImage, u32)> = None;
        for (i, frame) in frames(data, source.format, max_pixels)?.enumerate() {
            if Instant::now() > deadline {
                return Ok(None);
            }
            let frame = frame.map_err(corrupt)?;
            let (num, den) = frame.delay().numer_denom_ms();
            let delay_ms = num / den.max(1);
            let i = i as u64;
            // The first frame of each of the MAX_OUTPUT_FRAMES slots is kept: frame 0 always
            // (a merged frame needs one before it, or its delay is lost).
            let slot = |i: u64| i * MAX_OUTPUT_FRAMES / total;
            let keep = total <= MAX_OUTPUT_FRAMES || i == 0 || slot(i) != slot(i - 1);
            if !keep {
                if let Some((_, d)) = pending.as_mut() {
                    *d += delay_ms;
                }
                continue;
            }
            let pixels = Pixels::from_image(DynamicImage::ImageRgba8(frame.into_buffer()))
                .oriented(source.orientation);
            let resized = pixels.resize(geometry, (source.width, source.height))?;
            let rgba = match resized.into_image() {
                Some(image) => image.into_rgba8(),
                None => return Err(Error::Encode("frame size".into())),
            };
            if let Some((image, delay)) = pending.replace((rgba, delay_ms)) {
                write_frame(&mut encoder, image, delay)?;
            }
        }
        if let Some((image, delay)) = pending {
            write_frame(&mut encoder, image, delay)?;
        }
    }
    Ok(Some(Thumbnail {
        bytes: out,
        content_type: "image/gif",
        width: geometry.width,
        height: geometry.height,
        animated: true,
    }))
}

fn write_frame(
    encoder: &mut GifEncoder<&mut Vec<u8>>,
    image: image::RgbaImage,
    delay_ms: u32,
) -> Result<(), Error> {
    let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
    encoder
        .encode_frame(image::Frame::from_parts(image, 0, 0, delay))
        .map_err(|e| Error::Encode(e.to_string()))
}
