//! SVG, rendered with resvg and nothing around it: no file, no network, no font, no embedded
//! image is ever read (both of usvg's image resolvers answer nothing, there is no resources
//! directory, and text is not built in), and the XML may have at most [`MAX_NODES`] nodes
//! (entities expanded), so a "billion laughs" stops early. The render target is the output's size,
//! whatever size the document claims.

use resvg::{tiny_skia, usvg};

use crate::{Error, Pixels};

/// Elements, attributes and text nodes of one document.
const MAX_NODES: u32 = 100_000;
/// Larger sources are refused before parsing (an icon or a diagram is far smaller).
const MAX_SVG_BYTES: usize = 1024 * 1024;

fn tree(data: &[u8]) -> Result<usvg::Tree, Error> {
    if data.len() > MAX_SVG_BYTES {
        return Err(Error::Corrupt(format!(
            "the SVG is larger than the {MAX_SVG_BYTES} bytes that are rendered"
        )));
    }
    let text =
        std::str::from_utf8(data).map_err(|_| Error::Corrupt("the SVG is not UTF-8".into()))?;
    let xml = roxmltree::Document::parse_with_options(
        text,
        roxmltree::ParsingOptions {
            allow_dtd: true,
            nodes_limit: MAX_NODES,
        },
    )
    .map_err(|e| Error::Corrupt(e.to_string()))?;
    let options = usvg::Options {
        resources_dir: None,
        image_href_resolver: usvg::ImageHrefResolver {
            resolve_data: Box::new(|_, _, _| None),
            resolve_string: Box::new(|_, _| None),
        },
        ..usvg::Options::default()
    };
    usvg::Tree::from_xmltree(&xml, &options).map_err(|e| Error::Corrupt(e.to_string()))
}

/// The size the document states (its `width`/`height`, else its `viewBox`), rounded up.
pub(crate) fn header(data: &[u8]) -> Result<(u32, u32), Error> {
    let size = tree(data)?.size();
    let px = |v: f32| (v.ceil() as u32).max(1);
    Ok((px(size.width()), px(size.height())))
}

/// The whole document rendered into `need` pixels (stretched to them: `need` keeps its aspect).
pub(crate) fn render(data: &[u8], need: (u32, u32)) -> Result<Pixels, Error> {
    let tree = tree(data)?;
    let (w, h) = (need.0.max(1), need.1.max(1));
    let mut pixmap = tiny_skia::Pixmap::new(w, h)
        .ok_or_else(|| Error::Corrupt(format!("cannot render the SVG at {w}x{h}")))?;
    let size = tree.size();
    let transform = tiny_skia::Transform::from_scale(
        w as f32 / size.width().max(f32::MIN_POSITIVE),
        h as f32 / size.height().max(f32::MIN_POSITIVE),
    );
    resvg::render(&tree, transform, &mut pixmap.as_mut());
    // tiny-skia's pixels are premultiplied.
    let data = pixmap
        .pixels()
        .iter()
        .flat_map(|p| {
            let c = p.demultiply();
            [c.red(), c.green(), c.blue(), c.alpha()]
        })
        .collect();
    Ok(Pixels::rgba(w, h, data))
}
