//! Which thumbnail a request gets: the requested box normalised to a bucket (so that varying the
//! size cannot make a new file per request: Synapse #11853), then the output geometry for a
//! source, never larger than the source.

/// `scale` fits the source inside the box; `crop` fills the box and cuts the centre.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Scale,
    Crop,
}

impl Method {
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "scale" => Some(Method::Scale),
            "crop" => Some(Method::Crop),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Scale => "scale",
            Method::Crop => "crop",
        }
    }
}

/// The box a request is served from. With fixed sizes (MMR's rule): the configured size equal to
/// the request, else the smallest that holds it on both axes, else the largest. With
/// `dynamic`, each axis rounded up to a step of a √2 series (32, 45, 64, 91, 128, …) and capped
/// at the largest configured width and height: at most a few dozen boxes per axis, whatever
/// clients ask.
pub fn bucket(width: u32, height: u32, sizes: &[(u32, u32)], dynamic: bool) -> (u32, u32) {
    let width = width.max(1);
    let height = height.max(1);
    if dynamic {
        let max_w = sizes.iter().map(|s| s.0).max().unwrap_or(width);
        let max_h = sizes.iter().map(|s| s.1).max().unwrap_or(height);
        return (step_up(width).min(max_w), step_up(height).min(max_h));
    }
    if sizes.contains(&(width, height)) {
        return (width, height);
    }
    let area = |s: &&(u32, u32)| u64::from(s.0) * u64::from(s.1);
    sizes
        .iter()
        .filter(|s| s.0 >= width && s.1 >= height)
        .min_by_key(area)
        .or_else(|| sizes.iter().max_by_key(area))
        .copied()
        .unwrap_or((width, height))
}

/// The smallest step of the series 32·√2ⁿ (rounded) that is at least `n`; below 32, `n` rounded
/// up to a multiple of 8.
fn step_up(n: u32) -> u32 {
    if n <= 32 {
        return n.div_ceil(8) * 8;
    }
    let mut step = 32.0_f64;
    while (step.round() as u32) < n {
        step *= std::f64::consts::SQRT_2;
    }
    step.round() as u32
}

/// What to make of a source of `source` pixels (after EXIF orientation) for a box.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    /// The output's size.
    pub width: u32,
    pub height: u32,
    /// The part of the source it shows, in source pixels: all of it for `scale`, the centre for
    /// `crop`.
    pub crop: (f64, f64, f64, f64),
}

impl Geometry {
    /// The source size a scaled decode must at least give so that this output needs no upscale.
    pub fn needs(&self, source: (u32, u32)) -> (u32, u32) {
        let sx = f64::from(self.width) / self.crop.2;
        let sy = f64::from(self.height) / self.crop.3;
        let s = sx.max(sy);
        (
            (f64::from(source.0) * s).ceil() as u32,
            (f64::from(source.1) * s).ceil() as u32,
        )
    }
}

/// The output for `source` in box `(bw, bh)`, or `None` when the source already fits the box (it
/// is served as it is: thumbnails never upscale).
pub fn geometry(source: (u32, u32), (bw, bh): (u32, u32), method: Method) -> Option<Geometry> {
    let (sw, sh) = (source.0.max(1), source.1.max(1));
    if sw <= bw && sh <= bh {
        return None;
    }
    let (fw, fh) = (f64::from(sw), f64::from(sh));
    match method {
        Method::Scale => {
            let s = (f64::from(bw) / fw).min(f64::from(bh) / fh);
            Some(Geometry {
                width: ((fw * s).round() as u32).clamp(1, sw),
                height: ((fh * s).round() as u32).clamp(1, sh),
                crop: (0.0, 0.0, fw, fh),
            })
        }
        Method::Crop => {
            // The box, but never larger than the source on either axis.
            let (tw, th) = (bw.min(sw), bh.min(sh));
            let s = (f64::from(tw) / fw).max(f64::from(th) / fh);
            let (cw, ch) = (f64::from(tw) / s, f64::from(th) / s);
            Some(Geometry {
                width: tw,
                height: th,
                crop: ((fw - cw) / 2.0, (fh - ch) / 2.0, cw, ch),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZES: &[(u32, u32)] = &[
        (32, 32),
        (96, 96),
        (320, 240),
        (640, 480),
        (800, 600),
        (1600, 1200),
    ];

    #[test]
    fn fixed_sizes_follow_mmr() {
        assert_eq!(bucket(96, 96, SIZES, false), (96, 96));
        assert_eq!(bucket(36, 36, SIZES, false), (96, 96));
        // Element X's square avatars and Element Web's previews at dpr 2.
        assert_eq!(bucket(240, 240, SIZES, false), (320, 240));
        assert_eq!(bucket(1600, 1200, SIZES, false), (1600, 1200));
        assert_eq!(bucket(5000, 10, SIZES, false), (1600, 1200), "the largest");
        assert_eq!(bucket(14, 14, SIZES, false), (32, 32));
    }

    #[test]
    fn dynamic_sizes_fall_in_few_buckets() {
        let mut seen = std::collections::HashSet::new();
        for h in 590..=800 {
            seen.insert(bucket(800, h, SIZES, true));
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(bucket(800, 600, SIZES, true), (1024, 724));
        assert_eq!(bucket(9000, 9000, SIZES, true), (1600, 1200), "capped");
        assert_eq!(bucket(30, 30, SIZES, true), (32, 32));
        let all: std::collections::HashSet<_> = (1..=2000).map(step_up).collect();
        assert!(all.len() < 30, "{}", all.len());
    }

    #[test]
    fn scale_fits_inside_and_keeps_aspect() {
        let g = geometry((4032, 3024), (320, 240), Method::Scale).expect("smaller");
        assert_eq!((g.width, g.height), (320, 240));
        let g = geometry((3024, 4032), (320, 240), Method::Scale).expect("smaller");
        assert_eq!((g.width, g.height), (180, 240));
        assert_eq!(g.needs((3024, 4032)), (180, 240));
    }

    #[test]
    fn crop_fills_and_cuts_the_centre() {
        let g = geometry((4000, 2000), (96, 96), Method::Crop).expect("smaller");
        assert_eq!((g.width, g.height), (96, 96));
        assert_eq!(g.crop, (1000.0, 0.0, 2000.0, 2000.0));
        assert_eq!(g.needs((4000, 2000)), (192, 96));
    }

    #[test]
    fn never_upscales() {
        assert_eq!(geometry((300, 200), (320, 240), Method::Scale), None);
        assert_eq!(geometry((96, 96), (96, 96), Method::Crop), None);
        // Wider than the box but shorter: cropped to the box's width at the source's height.
        let g = geometry((500, 50), (96, 96), Method::Crop).expect("wider");
        assert_eq!((g.width, g.height), (96, 50));
        assert_eq!(g.crop, (202.0, 0.0, 96.0, 50.0));
    }
}
