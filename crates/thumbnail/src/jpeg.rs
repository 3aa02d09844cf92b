//! JPEG through libjpeg-turbo (mozjpeg's build): the header first, then a decode at the smallest
//! DCT scale (1/8, 1/4, 1/2, 1) that still covers the output, so a 12 MP photo becomes a 0.6 MP
//! buffer without ever existing at full size. libjpeg reports errors by unwinding; the caller
//! catches them (`crate::render`).

use image::metadata::Orientation;
use mozjpeg::{ColorSpace, Decompress, Marker};

use crate::{Error, Pixels};

/// Width, height (as stored, before orientation) and EXIF orientation, from the header.
pub(crate) fn header(data: &[u8]) -> Result<((u32, u32), Orientation), Error> {
    let d = Decompress::with_markers(&[Marker::APP(1)])
        .from_mem(data)
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    let size = dims(d.size())?;
    Ok((size, orientation(&d)))
}

fn dims((w, h): (usize, usize)) -> Result<(u32, u32), Error> {
    match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => Err(Error::Corrupt(format!("impossible JPEG size {w}x{h}"))),
    }
}

fn orientation<R>(d: &Decompress<R>) -> Orientation {
    d.markers()
        .filter(|m| m.marker == Marker::APP(1))
        .find_map(|m| m.data.strip_prefix(b"Exif\0\0"))
        .and_then(Orientation::from_exif_chunk)
        .unwrap_or(Orientation::NoTransforms)
}

/// Decodes at the smallest scale whose size is at least `need` (stored orientation), to RGB.
pub(crate) fn decode(data: &[u8], need: (u32, u32)) -> Result<Pixels, Error> {
    let mut d = Decompress::new_mem(data).map_err(|e| Error::Corrupt(e.to_string()))?;
    let (w, h) = dims(d.size())?;
    let numerator = [1u8, 2, 4, 8]
        .into_iter()
        .find(|&n| {
            let scaled = |v: u32| (u64::from(v) * u64::from(n)).div_ceil(8);
            scaled(w) >= u64::from(need.0) && scaled(h) >= u64::from(need.1)
        })
        .unwrap_or(8);
    d.scale(numerator);
    let cmyk = matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK);
    let corrupt = |e: std::io::Error| Error::Corrupt(e.to_string());
    if cmyk {
        let mut started = d.to_colorspace(ColorSpace::JCS_CMYK).map_err(corrupt)?;
        let (sw, sh) = dims((started.width(), started.height()))?;
        let cmyk: Vec<[u8; 4]> = started.read_scanlines().map_err(corrupt)?;
        started.finish().map_err(corrupt)?;
        // Adobe's CMYK JPEGs (Photoshop's, Pillow's) store the inks inverted.
        let rgb = cmyk
            .iter()
            .flat_map(|&[c, m, y, k]| {
                let mul = |v: u8| ((u16::from(v) * u16::from(k) + 127) / 255) as u8;
                [mul(c), mul(m), mul(y)]
            })
            .collect();
        return Ok(Pixels::rgb(sw, sh, rgb));
    }
    let mut started = d.rgb().map_err(corrupt)?;
    let (sw, sh) = dims((started.width(), started.height()))?;
    let rgb: Vec<u8> = started.read_scanlines::<u8>().map_err(corrupt)?;
    started.finish().map_err(corrupt)?;
    Ok(Pixels::rgb(sw, sh, rgb))
}

/// Encodes RGB as a baseline JPEG, quality 85, with libjpeg-turbo's fast settings (a thumbnail
/// is small; trellis quantisation would cost more than it saves).
pub(crate) fn encode(width: u32, height: u32, rgb: &[u8]) -> Result<Vec<u8>, Error> {
    let mut c = mozjpeg::Compress::new(ColorSpace::JCS_RGB);
    c.set_fastest_defaults();
    c.set_size(width as usize, height as usize);
    c.set_quality(85.0);
    let fail = |e: std::io::Error| Error::Encode(e.to_string());
    let mut started = c.start_compress(Vec::new()).map_err(fail)?;
    started.write_scanlines(rgb).map_err(fail)?;
    started.finish().map_err(fail)
}
