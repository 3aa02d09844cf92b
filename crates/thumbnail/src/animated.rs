//! Animations (GIF, APNG, animated WebP): counted from their headers before any frame is
//! decoded, then decoded one composited frame at a time (memory: one canvas and one output
//! frame, whatever the length), resized, and written as an animated GIF, which every client
//! shows (the pure-Rust WebP encoder has no animation).

use std::io::Cursor;
use std::time::Instant;

use image::codecs::gif::GifDecoder;
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
    let mut writer = None::<GifWriter>;
    // Frames beyond MAX_OUTPUT_FRAMES are merged into the one before, delays added.
    let mut pending: Option<(Vec<u8>, u32)> = None;
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
                *d = d.saturating_add(delay_ms);
            }
            continue;
        }
        let pixels = Pixels::from_image(DynamicImage::ImageRgba8(frame.into_buffer()))
            .oriented(source.orientation)?;
        let resized = pixels.resize(geometry, (source.width, source.height))?;
        let rgba = resized.into_image()?.into_rgba8().into_raw();
        if writer.is_none() {
            writer = Some(GifWriter::new(geometry.width, geometry.height, &rgba)?);
        }
        if let (Some(w), Some((previous, delay))) =
            (writer.as_mut(), pending.replace((rgba, delay_ms)))
        {
            w.frame(&previous, delay)?;
        }
    }
    let Some(mut writer) = writer else {
        return Err(Error::Corrupt("the animation has no frame".into()));
    };
    if let Some((last, delay)) = pending {
        writer.frame(&last, delay)?;
    }
    Ok(Some(Thumbnail {
        bytes: writer.finish()?,
        content_type: "image/gif",
        width: geometry.width,
        height: geometry.height,
        animated: true,
        fallback: false,
    }))
}

/// An animated GIF with one palette for all its frames: learnt (NeuQuant) from the first frame,
/// and each pixel mapped through a 15-bit colour table filled as colours appear, so mapping a
/// frame costs a lookup per pixel instead of a palette search (which took most of the time).
/// Index 255 is transparency; frames are cleared after showing (each is a whole canvas).
struct GifWriter {
    encoder: gif::Encoder<Vec<u8>>,
    quant: color_quant::NeuQuant,
    /// Palette index per 5-bit-per-channel colour, found on first use.
    table: Vec<Option<u8>>,
    width: u16,
    height: u16,
}

const TRANSPARENT: u8 = 255;

impl GifWriter {
    fn new(width: u32, height: u32, first: &[u8]) -> Result<GifWriter, Error> {
        let fail = |e: gif::EncodingError| Error::Encode(e.to_string());
        let (w, h) = match (u16::try_from(width), u16::try_from(height)) {
            (Ok(w), Ok(h)) => (w, h),
            _ => {
                return Err(Error::Encode(format!(
                    "{width}x{height} is too large for a GIF"
                )));
            }
        };
        let quant = color_quant::NeuQuant::new(10, 255, first);
        let mut palette = quant.color_map_rgb();
        palette.resize(256 * 3, 0);
        let mut encoder = gif::Encoder::new(Vec::new(), w, h, &palette).map_err(fail)?;
        encoder.set_repeat(gif::Repeat::Infinite).map_err(fail)?;
        Ok(GifWriter {
            encoder,
            quant,
            table: vec![None; 1 << 15],
            width: w,
            height: h,
        })
    }

    fn frame(&mut self, rgba: &[u8], delay_ms: u32) -> Result<(), Error> {
        let mut has_transparency = false;
        let indices: Vec<u8> = rgba
            .chunks_exact(4)
            .map(|p| {
                if p[3] < 128 {
                    has_transparency = true;
                    return TRANSPARENT;
                }
                let cell = (usize::from(p[0] >> 3) << 10)
                    | (usize::from(p[1] >> 3) << 5)
                    | usize::from(p[2] >> 3);
                *self.table[cell].get_or_insert_with(|| {
                    // The cell's centre, so that every colour in it maps alike.
                    let centre = |v: u8| (v & 0xF8) | 4;
                    let index =
                        self.quant
                            .index_of(&[centre(p[0]), centre(p[1]), centre(p[2]), 255]);
                    u8::try_from(index).unwrap_or(0).min(TRANSPARENT - 1)
                })
            })
            .collect();
        let frame = gif::Frame {
            width: self.width,
            height: self.height,
            buffer: std::borrow::Cow::Owned(indices),
            // In hundredths of a second.
            delay: u16::try_from(delay_ms.div_ceil(10)).unwrap_or(u16::MAX),
            dispose: gif::DisposalMethod::Background,
            transparent: has_transparency.then_some(TRANSPARENT),
            ..gif::Frame::default()
        };
        self.encoder
            .write_frame(&frame)
            .map_err(|e| Error::Encode(e.to_string()))
    }

    fn finish(self) -> Result<Vec<u8>, Error> {
        self.encoder
            .into_inner()
            .map_err(|e| Error::Encode(e.to_string()))
    }
}
