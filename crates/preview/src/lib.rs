//! URL previews from untrusted pages, synchronous and without I/O (the fetching, the network
//! rules and the cache are `media`'s):
//!
//! - `html`: a page read as it streams, in bounded memory however large it is: OpenGraph, then
//!   Twitter cards, then `<title>`, the meta description, the first paragraph and the first image;
//!   the charset from the header, the BOM or `<meta charset>`; relative URLs resolved; reading
//!   stops as soon as everything a preview needs is known.
//! - `oembed`: which provider's endpoint describes a URL (a list shipped in the binary, or the
//!   operator's), and its answer as OpenGraph.
//! - `text`: whitespace collapsed and text cut on word boundaries.

pub mod html;
pub mod oembed;
pub mod text;

pub use html::{Extractor, Page};
pub use oembed::Providers;

/// A preview as the spec's response has it: `og:*` keys (and `matrix:image:size`) to strings or
/// numbers.
pub type OpenGraph = serde_json::Map<String, serde_json::Value>;

/// How long the texts of a preview may be (`urlPreviews.numWords`, `maxLength`,
/// `numTitleWords`, `maxTitleLength`; 0 means no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextLimits {
    pub words: u32,
    pub length: u32,
    pub title_words: u32,
    pub title_length: u32,
}

impl Default for TextLimits {
    /// matrix-media-repo's defaults.
    fn default() -> Self {
        TextLimits {
            words: 50,
            length: 200,
            title_words: 30,
            title_length: 150,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The page could not be parsed within the memory it may use.
    #[error("the page cannot be read: {0}")]
    Html(String),
    /// An oEmbed answer that is not an oEmbed object.
    #[error("the oEmbed answer is not an oEmbed object: {0}")]
    OEmbed(String),
    /// A provider list that is not one.
    #[error("not an oEmbed provider list (providers.json's format): {0}")]
    Providers(String),
}
