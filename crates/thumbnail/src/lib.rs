//! Thumbnails from untrusted bytes. Everything is read from the header before any pixel buffer
//! exists: the format from the signature, the size, the frame count and the EXIF orientation.
//! Over `max_pixels` (or an animation over its budget) nothing is decoded. JPEG decodes at the
//! smallest DCT scale that covers the output (`jpeg`); the other formats through the `image`
//! crate's pure-Rust decoders with their allocation limit. Resizing is `fast_image_resize`'s
//! Lanczos3 with premultiplied alpha. All sizes of one call come from one decode.
//!
//! Decoders may panic on malicious input (`image` says so; libjpeg unwinds on errors): [`render`]
//! catches that and reports [`Error::Corrupt`], so one bad file is one refused request.
//!
//! Synchronous and CPU-bound: the caller runs it on a bounded pool.

mod animated;
mod jpeg;
mod raster;
mod sizes;
mod sniff;
mod svg;
mod video;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use image::metadata::Orientation;

pub use sizes::{Geometry, Method, bucket, geometry};
pub use sniff::{Format, listed, sniff};

/// Why no thumbnail was made. Every variant but [`Error::Encode`] and [`Error::Unavailable`] is
/// about the source, and the same source fails the same way again (callers may remember it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the media is not an image format that can be thumbnailed")]
    Unsupported,
    #[error("the image has {pixels} pixels, more than thumbnails.maxPixels ({max})")]
    TooManyPixels { pixels: u64, max: u64 },
    #[error("the animation has {frames} frames, more than the {max} that are read")]
    TooManyFrames { frames: u64, max: u64 },
    #[error("the image could not be decoded: {0}")]
    Corrupt(String),
    #[error("the thumbnail could not be encoded: {0}")]
    Encode(String),
    /// The host, not the source: a helper program that could not start or finish in time, a
    /// temp file that could not be written. Worth trying again later.
    #[error("{0}")]
    Unavailable(String),
}

/// The bounds of one call.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Pixels of the source (of its canvas, for an animation); `thumbnails.maxPixels`.
    pub max_pixels: u64,
    /// Larger sources get a still frame, never an animation; `thumbnails.maxAnimateSizeBytes`.
    pub max_animate_bytes: u64,
    /// Where in an animation the still frame is, 0 to 1; `thumbnails.stillFrame`.
    pub still_frame: f64,
    /// An animation still being made then becomes a still frame (checked between frames).
    pub animation_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pixels: 32_000_000,
            max_animate_bytes: 10 * 1024 * 1024,
            still_frame: 0.5,
            animation_time: Duration::from_secs(10),
        }
    }
}

/// One requested thumbnail: the box (already a bucket, see [`bucket`]) and how to fill it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    pub width: u32,
    pub height: u32,
    pub method: Method,
    pub animated: bool,
}

/// What a request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The source fits the box and clients show it as it is: serve the original.
    Original,
    Made(Thumbnail),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thumbnail {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
    pub animated: bool,
    /// A still made because an animation ran out of time: right for now, not worth keeping
    /// (another try may animate).
    pub fallback: bool,
}

/// What the header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    pub format: Format,
    /// As displayed (EXIF orientation applied).
    pub width: u32,
    pub height: u32,
    pub orientation: Orientation,
    /// Set for a source with more than one frame.
    pub animation: Option<Animation>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Animation {
    pub frames: u64,
    /// The frames' pixels summed, a whole canvas per frame (what compositing one costs).
    pub area: u64,
}

/// Animations are read only up to this many frames; beyond, the file is refused.
pub const MAX_FRAMES: u64 = 1000;
/// An animated thumbnail is made only when the source's frames sum to at most this many pixels
/// (about a second of decoding); otherwise the still frame is served.
pub const ANIMATION_PIXELS: u64 = 150_000_000;
/// … and at most this many frames are written (frames are merged, keeping the duration).
pub const MAX_OUTPUT_FRAMES: u64 = 200;
/// … and only for boxes up to this size (larger animated thumbnails cost more than the original).
pub const MAX_ANIMATED_BOX: (u32, u32) = (800, 600);

/// Reads the header of `data`.
pub fn inspect(data: &[u8]) -> Result<Source, Error> {
    catching(|| inspect_inner(data))
}

fn inspect_inner(data: &[u8]) -> Result<Source, Error> {
    let format = sniff(data).ok_or(Error::Unsupported)?;
    let ((w, h), orientation) = match format {
        Format::Jpeg => jpeg::header(data)?,
        Format::Svg => (svg::header(data)?, Orientation::NoTransforms),
        other => raster::header(data, other)?,
    };
    let (width, height) = if swaps_axes(orientation) {
        (h, w)
    } else {
        (w, h)
    };
    let animation = animated::inspect(data, format, (w, h))?;
    Ok(Source {
        format,
        width,
        height,
        orientation,
        animation,
    })
}

/// Every request's thumbnail of `data`, from one decode. The header is checked against `limits`
/// first; a source over them fails every request alike.
pub fn render(
    data: &[u8],
    requests: &[Request],
    limits: &Limits,
) -> Result<Vec<Result<Outcome, Error>>, Error> {
    let mut decoder = Decoder::new(data, *limits)?;
    Ok(decoder.render(requests))
}

/// One source whose header passed the limits, keeping the still image it decoded, so that later
/// requests it covers ([`Cover::covers`]) are made without decoding again.
pub struct Decoder<'a> {
    /// The source; for a video, the PNG of its first frame.
    data: std::borrow::Cow<'a, [u8]>,
    source: Source,
    limits: Limits,
    still: Option<Pixels>,
}

impl<'a> Decoder<'a> {
    /// Reads and checks the header: nothing is decoded yet (but a video's first frame, which
    /// ffmpeg extracts once its size passed `max_pixels`).
    pub fn new(data: &'a [u8], limits: Limits) -> Result<Decoder<'a>, Error> {
        let (data, source) = match sniff(data) {
            Some(format @ (Format::Mp4 | Format::Webm)) => {
                let frame = video::first_frame(data, format, limits.max_pixels)?;
                let still = catching(|| inspect_inner(&frame))?;
                let source = Source {
                    format,
                    animation: None,
                    ..still
                };
                (std::borrow::Cow::Owned(frame), source)
            }
            _ => (
                std::borrow::Cow::Borrowed(data),
                catching(|| inspect_inner(data))?,
            ),
        };
        let pixels = u64::from(source.width) * u64::from(source.height);
        if pixels > limits.max_pixels {
            return Err(Error::TooManyPixels {
                pixels,
                max: limits.max_pixels,
            });
        }
        if let Some(a) = source.animation
            && a.frames > MAX_FRAMES
        {
            return Err(Error::TooManyFrames {
                frames: a.frames,
                max: MAX_FRAMES,
            });
        }
        Ok(Decoder {
            data,
            source,
            limits,
            still: None,
        })
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    fn plan(&self, r: &Request) -> Option<Geometry> {
        self.cover().plan(r)
    }

    fn animates(&self, r: &Request) -> bool {
        self.cover().animates(r)
    }

    fn cover(&self) -> Cover {
        Cover {
            source: self.source,
            limits: self.limits,
            data_len: self.data.len() as u64,
            still: self.still.as_ref().map(|p| (p.width, p.height)),
        }
    }

    /// What this decoder covers once it has rendered `requests` (see [`Cover::covers`]): a
    /// worker publishes it so that requests arriving meanwhile know whether to join.
    pub fn cover_after(&self, requests: &[Request]) -> Cover {
        let mut cover = self.cover();
        for r in requests {
            // An animation may fall back to a still: counted as one.
            let still = Request {
                animated: false,
                ..*r
            };
            if let Some(n) = cover.need(&still) {
                cover.still = Some(cover.still.map_or(n, |s| (s.0.max(n.0), s.1.max(n.1))));
            }
        }
        cover
    }
}

/// What a [`Decoder`] can make without decoding again: its source, limits and the size of the
/// still image it holds (or will hold).
#[derive(Debug, Clone, Copy)]
pub struct Cover {
    source: Source,
    limits: Limits,
    data_len: u64,
    still: Option<(u32, u32)>,
}

impl Cover {
    fn plan(&self, r: &Request) -> Option<Geometry> {
        geometry(
            (self.source.width, self.source.height),
            (r.width, r.height),
            r.method,
        )
    }

    fn animates(&self, r: &Request) -> bool {
        match (self.source.animation, self.plan(r)) {
            (Some(a), Some(_)) => {
                self.data_len <= self.limits.max_animate_bytes
                    && a.area <= ANIMATION_PIXELS
                    && r.width <= MAX_ANIMATED_BOX.0
                    && r.height <= MAX_ANIMATED_BOX.1
            }
            _ => false,
        }
    }

    /// The still pixels `r` needs (`None`: none: the original, or an animation).
    fn need(&self, r: &Request) -> Option<(u32, u32)> {
        let size = (self.source.width, self.source.height);
        if r.animated && self.animates(r) {
            return None;
        }
        match self.plan(r) {
            // The original, unless it is an animation and a still was asked for.
            None if self.source.format.clients_render()
                && (self.source.animation.is_none() || r.animated) =>
            {
                None
            }
            None => Some(size),
            Some(g) => Some(g.needs(size)),
        }
    }

    /// `r` can be made without decoding more (an animation makes its own pass in any case).
    pub fn covers(&self, r: &Request) -> bool {
        match (self.need(r), self.still) {
            (None, _) => true,
            (Some(need), Some(s)) => s.0 >= need.0 && s.1 >= need.1,
            (Some(_), None) => false,
        }
    }
}

impl Decoder<'_> {
    /// Every request's thumbnail: animations each from their own pass over the frames, the rest
    /// from one still image, decoded now unless the one kept covers them all.
    pub fn render(&mut self, requests: &[Request]) -> Vec<Result<Outcome, Error>> {
        let mut results: Vec<Option<Result<Outcome, Error>>> = vec![None; requests.len()];
        let mut fallback = vec![false; requests.len()];
        for (i, request) in requests.iter().enumerate() {
            if request.animated
                && self.animates(request)
                && let Some(g) = self.plan(request)
            {
                // Each animation its own time.
                let deadline = Instant::now() + self.limits.animation_time;
                let max_pixels = self.limits.max_pixels;
                match catching(|| {
                    animated::render(&self.data, &self.source, &g, deadline, max_pixels)
                }) {
                    Ok(Some(t)) => results[i] = Some(Ok(Outcome::Made(t))),
                    // Past the deadline, or frames that fail to decode (a truncated tail): a
                    // still, which does not need them.
                    Ok(None) | Err(_) => fallback[i] = true,
                }
            }
        }
        let mut need = None::<(u32, u32)>;
        for (i, request) in requests.iter().enumerate() {
            if results[i].is_some() {
                continue;
            }
            // An animation that fell back is a still request now.
            let still_request = Request {
                animated: request.animated && !fallback[i],
                ..*request
            };
            match self.cover().need(&still_request) {
                None => results[i] = Some(Ok(Outcome::Original)),
                Some(n) => need = Some(need.map_or(n, |m| (m.0.max(n.0), m.1.max(n.1)))),
            }
        }
        let Some(need) = need else {
            return results
                .into_iter()
                .map(|r| r.unwrap_or(Ok(Outcome::Original)))
                .collect();
        };
        let covered = self
            .still
            .as_ref()
            .is_some_and(|p| p.width >= need.0 && p.height >= need.1);
        if !covered {
            match catching(|| decode_still(&self.data, &self.source, need, &self.limits)) {
                Ok(p) => self.still = Some(p),
                Err(e) => {
                    return results
                        .into_iter()
                        .map(|r| r.unwrap_or_else(|| Err(e.clone())))
                        .collect();
                }
            }
        }
        let Some(pixels) = &self.still else {
            return vec![Err(Error::Corrupt("no still image".into())); requests.len()];
        };
        requests
            .iter()
            .zip(results)
            .zip(fallback)
            .map(|((request, result), fallback)| match result {
                Some(r) => r,
                None => catching(|| thumbnail_of(pixels, &self.source, self.plan(request)))
                    .map(|t| Outcome::Made(Thumbnail { fallback, ..t })),
            })
            .collect()
    }
}

/// The still image: the whole image, or an animation's `still_frame` (its first frame when the
/// animation is over the budget, so that a still costs no more than one frame).
fn decode_still(
    data: &[u8],
    source: &Source,
    need: (u32, u32),
    limits: &Limits,
) -> Result<Pixels, Error> {
    let pixels = match (source.format, source.animation) {
        (Format::Jpeg, _) => {
            let need = if swaps_axes(source.orientation) {
                (need.1, need.0)
            } else {
                need
            };
            jpeg::decode(data, need)?
        }
        // Vector: rendered at the size the output needs, never at the size it claims.
        (Format::Svg, _) => svg::render(data, need)?,
        // The first frame, as a PNG.
        (Format::Mp4 | Format::Webm, _) => raster::decode(data, Format::Png, limits.max_pixels)?,
        (format, Some(a)) if a.area <= ANIMATION_PIXELS && limits.still_frame > 0.0 => {
            let index = ((a.frames - 1) as f64 * limits.still_frame.clamp(0.0, 1.0)) as u64;
            animated::frame(data, format, index, limits.max_pixels)?
        }
        (format, _) => raster::decode(data, format, limits.max_pixels)?,
    };
    pixels.oriented(source.orientation)
}

fn thumbnail_of(
    pixels: &Pixels,
    source: &Source,
    plan: Option<Geometry>,
) -> Result<Thumbnail, Error> {
    // No plan: the source fits but clients cannot show its format; re-encoded at its size.
    let geometry = plan.unwrap_or(Geometry {
        width: source.width,
        height: source.height,
        crop: (0.0, 0.0, f64::from(source.width), f64::from(source.height)),
    });
    let resized = pixels.resize(&geometry, (source.width, source.height))?;
    resized.encode(source.format == Format::Jpeg, false)
}

fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Runs a decoder, turning its panic (or libjpeg's unwinding error) into [`Error::Corrupt`].
fn catching<T>(f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
    std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("the decoder failed");
        Err(Error::Corrupt(message.to_owned()))
    })
}

/// The image served in place of quarantined media (`quarantine.replaceThumbnails` without a
/// `thumbnailPath`): a grey PNG of `width`×`height` (at most 800 a side) crossed out.
pub fn quarantine_placeholder(width: u32, height: u32) -> Result<Vec<u8>, Error> {
    let (w, h) = (width.clamp(1, 800), height.clamp(1, 800));
    let mut data = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h {
        for x in 0..w {
            // Both diagonals, about 1/40 of the image thick.
            let (fx, fy) = (f64::from(x) / f64::from(w), f64::from(y) / f64::from(h));
            let on_cross = (fx - fy).abs() < 0.025 || (fx + fy - 1.0).abs() < 0.025;
            let v = if on_cross { 0x40 } else { 0xb0 };
            data.extend_from_slice(&[v, v, v]);
        }
    }
    raster::encode_png(&Pixels::rgb(w, h, data))
}

/// 8-bit RGB or RGBA pixels, row after row.
#[derive(Debug, Clone)]
pub(crate) struct Pixels {
    width: u32,
    height: u32,
    alpha: bool,
    data: Vec<u8>,
}

impl Pixels {
    pub(crate) fn rgb(width: u32, height: u32, data: Vec<u8>) -> Pixels {
        Pixels {
            width,
            height,
            alpha: false,
            data,
        }
    }

    pub(crate) fn rgba(width: u32, height: u32, data: Vec<u8>) -> Pixels {
        Pixels {
            width,
            height,
            alpha: true,
            data,
        }
    }

    pub(crate) fn from_image(image: image::DynamicImage) -> Pixels {
        let (width, height) = (image.width(), image.height());
        if image.color().has_alpha() {
            let data = image.into_rgba8().into_raw();
            // Fully opaque RGBA (GIF frames, most PNGs) is RGB: smaller files, faster resizes.
            if data.chunks_exact(4).all(|p| p[3] == 255) {
                let rgb = data
                    .chunks_exact(4)
                    .flat_map(|p| [p[0], p[1], p[2]])
                    .collect();
                return Pixels::rgb(width, height, rgb);
            }
            Pixels {
                width,
                height,
                alpha: true,
                data,
            }
        } else {
            Pixels::rgb(width, height, image.into_rgb8().into_raw())
        }
    }

    fn into_image(self) -> Result<image::DynamicImage, Error> {
        let (w, h) = (self.width, self.height);
        let image = if self.alpha {
            image::RgbaImage::from_raw(w, h, self.data).map(image::DynamicImage::ImageRgba8)
        } else {
            image::RgbImage::from_raw(w, h, self.data).map(image::DynamicImage::ImageRgb8)
        };
        image.ok_or_else(|| Error::Encode(format!("the pixels do not make a {w}x{h} image")))
    }

    fn oriented(self, orientation: Orientation) -> Result<Pixels, Error> {
        if orientation == Orientation::NoTransforms {
            return Ok(self);
        }
        let mut image = self.into_image()?;
        image.apply_orientation(orientation);
        Ok(Pixels::from_image(image))
    }

    /// Resizes to `g` (whose crop box is in `source` pixels; these pixels may be a DCT-scaled
    /// decode of it).
    pub(crate) fn resize(&self, g: &Geometry, source: (u32, u32)) -> Result<Pixels, Error> {
        use fast_image_resize as fr;
        let pixel_type = if self.alpha {
            fr::PixelType::U8x4
        } else {
            fr::PixelType::U8x3
        };
        let sx = f64::from(self.width) / f64::from(source.0.max(1));
        let sy = f64::from(self.height) / f64::from(source.1.max(1));
        let (left, top, w, h) = g.crop;
        let src = fr::images::ImageRef::new(self.width, self.height, &self.data, pixel_type)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        let mut dst = fr::images::Image::new(g.width, g.height, pixel_type);
        let options = fr::ResizeOptions::new()
            .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3))
            .crop(left * sx, top * sy, w * sx, h * sy);
        fr::Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|e| Error::Corrupt(e.to_string()))?;
        Ok(Pixels {
            width: g.width,
            height: g.height,
            alpha: self.alpha,
            data: dst.into_vec(),
        })
    }

    /// JPEG for JPEG sources (they have no alpha), PNG otherwise.
    pub(crate) fn encode(self, as_jpeg: bool, animated: bool) -> Result<Thumbnail, Error> {
        let (width, height) = (self.width, self.height);
        let (bytes, content_type) = if as_jpeg && !self.alpha {
            (jpeg::encode(width, height, &self.data)?, "image/jpeg")
        } else {
            (raster::encode_png(&self)?, "image/png")
        };
        Ok(Thumbnail {
            bytes,
            content_type,
            width,
            height,
            animated,
            fallback: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_decoder_is_a_refused_file() {
        let r: Result<(), Error> = catching(|| panic!("boom"));
        assert_eq!(r, Err(Error::Corrupt("boom".into())));
    }

    /// Found by fuzzing: a 12000x12000 frame on a 2000x2000 canvas made the GIF decoder allocate
    /// 576 MB though the canvas is within `max_pixels`.
    #[test]
    fn a_gif_frame_larger_than_its_canvas_is_refused() {
        let gif = b"GIF89a\xd0\x07\xd0\x07\x80\x00\x00\x00\x00\x00\xff\xff\xff\x21\xff\x0bNETSCAPE2.0\
            \x03\x01\x00\x00\x00\x21\xf9\x04\x00\x0a\x00\x00\x00\x2c\x00\x00\x00\x00\xe0\x2e\xe0\x2e\
            \x00\x02\x01\x2c\x00\x21\xf9\x04\x00\x0a\x00\x00\x00\x2c\x00\x00\x00\x00\x01\x00\x01\x00\
            \x00\x02\x01\x2c\x00\x3b";
        let request = Request {
            width: 32,
            height: 32,
            method: Method::Scale,
            animated: false,
        };
        match render(gif, &[request], &Limits::default()) {
            Err(Error::Corrupt(why)) => assert!(why.contains("does not fit"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_unsupported_not_a_panic() {
        assert_eq!(inspect(b"hello world"), Err(Error::Unsupported));
        for data in [
            &b"\xFF\xD8\xFF\xE0\x00\x10JFIF"[..],
            b"\x89PNG\r\n\x1a\nxx",
            b"GIF89a\x01",
        ] {
            assert!(matches!(inspect(data), Err(Error::Corrupt(_))), "{data:?}");
        }
    }
}
