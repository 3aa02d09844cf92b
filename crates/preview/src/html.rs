//! A page read as it streams: what a preview needs, in bounded memory however large the page.
//!
//! lol_html tokenizes the bytes as they arrive (no tree is built); handlers keep the first of
//! each thing a preview uses, each text capped. The charset is the BOM's, else the header's,
//! else the one a `<meta charset>` or `http-equiv` names (lol_html switches when it sees it),
//! else UTF-8; UTF-16 pages (which the tokenizer cannot read) are transcoded first.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use encoding_rs::Encoding;
use lol_html::html_content::EndTag;
use lol_html::send::{EndTagHandler, HtmlRewriter, Settings};
use lol_html::{AsciiCompatibleEncoding, MemorySettings, element, text};
use url::Url;

use crate::text::cut;
use crate::{Error, OpenGraph, TextLimits};

/// The most characters kept of any one text or attribute (enough for any limit a preview has).
const MAX_TEXT: usize = 4096;
/// The most `og:`/`twitter:` properties kept.
const MAX_PROPERTIES: usize = 64;
/// The memory the tokenizer may use for one element or text run split across chunks.
const TOKENIZER_MEMORY: usize = 1024 * 1024;

/// What a page says, as far as a preview is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Page {
    /// `og:*` and `twitter:*` properties, the first of each (values entity-decoded, trimmed).
    pub properties: BTreeMap<String, String>,
    pub title: Option<String>,
    /// `<meta name="description">`.
    pub description: Option<String>,
    /// The text of the first paragraph that has any.
    pub paragraph: Option<String>,
    /// The first `<img src>` that is not a tracking pixel, resolved against the page's URL.
    pub image: Option<String>,
    /// The page's oEmbed discovery link (`<link type="application/json+oembed">`), resolved.
    pub oembed: Option<String>,
}

impl Page {
    /// The preview: OpenGraph first, then Twitter cards, then the title, description, first
    /// paragraph and first image; texts cut to `limits`; `og:image` absolute (still a URL: the
    /// caller fetches it and puts its `mxc://` in its place).
    pub fn open_graph(&self, url: &Url, limits: TextLimits) -> OpenGraph {
        let mut og = OpenGraph::new();
        for (key, value) in &self.properties {
            if key.starts_with("og:") && !value.is_empty() {
                og.insert(key.clone(), value.clone().into());
            }
        }
        let first = |keys: &[&str], fallback: Option<&String>| -> Option<String> {
            keys.iter()
                .find_map(|k| self.properties.get(*k).filter(|v| !v.is_empty()))
                .or(fallback)
                .cloned()
        };
        let title = first(&["og:title", "twitter:title"], self.title.as_ref());
        let description = first(
            &["og:description", "twitter:description"],
            self.description.as_ref().or(self.paragraph.as_ref()),
        );
        let image = first(
            &[
                "og:image",
                "og:image:url",
                "og:image:secure_url",
                "twitter:image",
                "twitter:image:src",
            ],
            self.image.as_ref(),
        );
        match title.map(|t| cut(&t, limits.title_words, limits.title_length)) {
            Some(t) if !t.is_empty() => og.insert("og:title".into(), t.into()),
            _ => og.remove("og:title"),
        };
        match description.map(|d| cut(&d, limits.words, limits.length)) {
            Some(d) if !d.is_empty() => og.insert("og:description".into(), d.into()),
            _ => og.remove("og:description"),
        };
        match image.and_then(|i| resolve(url, &i)) {
            Some(i) => og.insert("og:image".into(), i.into()),
            None => og.remove("og:image"),
        };
        og.entry("og:url").or_insert_with(|| url.as_str().into());
        og
    }
}

/// `link` against `base`, if it makes an http(s) URL.
pub fn resolve(base: &Url, link: &str) -> Option<String> {
    let url = base.join(link.trim()).ok()?;
    matches!(url.scheme(), "http" | "https").then(|| url.into())
}

/// What the handlers collect.
struct State {
    base: Url,
    page: Page,
    title: String,
    title_done: bool,
    paragraph: String,
    paragraph_done: bool,
    in_body: bool,
}

impl State {
    /// Everything a preview can use is known: reading further changes nothing.
    fn enough(&self) -> bool {
        let has = |keys: &[&str]| keys.iter().any(|k| self.page.properties.contains_key(*k));
        self.in_body
            && (self.title_done || has(&["og:title", "twitter:title"]))
            && (self.page.description.is_some()
                || self.paragraph_done
                || has(&["og:description", "twitter:description"]))
            && (self.page.image.is_some() || has(&["og:image", "twitter:image"]))
    }
}

fn capped(text: &str) -> String {
    let decoded = html_escape::decode_html_entities(text);
    let trimmed = decoded.trim();
    match trimmed.char_indices().nth(MAX_TEXT) {
        Some((end, _)) => trimmed[..end].to_owned(),
        None => trimmed.to_owned(),
    }
}

/// Appends a text chunk to `buf` while it is under the cap.
fn append(buf: &mut String, chunk: &str) {
    if buf.len() < MAX_TEXT * 4 {
        buf.push_str(chunk);
    }
}

type Sink = fn(&[u8]);

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the bytes reach the tokenizer.
enum Input {
    /// The first bytes, held until the BOM can be seen.
    Start(Vec<u8>),
    Direct,
    /// UTF-16, transcoded to UTF-8 first.
    Transcoded(encoding_rs::Decoder),
}

/// Reads a page chunk by chunk: [`Extractor::feed`], then [`Extractor::finish`].
pub struct Extractor {
    header_charset: Option<&'static Encoding>,
    state: Arc<Mutex<State>>,
    rewriter: Option<HtmlRewriter<'static, Sink>>,
    input: Input,
}

impl Extractor {
    /// For the page at `url` (the final one, after redirects: relative links resolve against
    /// it), whose `Content-Type` named `charset` if it did.
    pub fn new(url: Url, charset: Option<&str>) -> Extractor {
        Extractor {
            header_charset: charset.and_then(|c| Encoding::for_label(c.trim().as_bytes())),
            state: Arc::new(Mutex::new(State {
                base: url,
                page: Page::default(),
                title: String::new(),
                title_done: false,
                paragraph: String::new(),
                paragraph_done: false,
                in_body: false,
            })),
            rewriter: None,
            input: Input::Start(Vec::new()),
        }
    }

    /// Reads the next chunk. `Ok(true)`: the page has said all a preview can use, the rest need
    /// not be read.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<bool, Error> {
        match &mut self.input {
            Input::Start(held) => {
                held.extend_from_slice(chunk);
                if held.len() < 3 {
                    return Ok(false);
                }
                let held = std::mem::take(held);
                self.start(&held)?;
            }
            Input::Direct => self.write(chunk)?,
            Input::Transcoded(decoder) => {
                let text = transcode(decoder, chunk, false);
                self.write(text.as_bytes())?;
            }
        }
        Ok(self.lock().enough())
    }

    /// The page as read so far (all of it, when the body ended).
    pub fn finish(mut self) -> Result<Page, Error> {
        if let Input::Start(held) = &self.input {
            let held = held.clone();
            self.start(&held)?;
        }
        if let Input::Transcoded(decoder) = &mut self.input {
            let rest = transcode(decoder, &[], true);
            self.write(rest.as_bytes())?;
        }
        if let Some(rewriter) = self.rewriter.take() {
            rewriter.end().map_err(|e| Error::Html(e.to_string()))?;
        }
        let mut state = self.lock();
        let state = &mut *state;
        if state.page.title.is_none() && !state.title.trim().is_empty() {
            state.page.title = Some(capped(&state.title));
        }
        if state.page.paragraph.is_none() && !state.paragraph.trim().is_empty() {
            state.page.paragraph = Some(capped(&state.paragraph));
        }
        Ok(std::mem::take(&mut state.page))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Chooses the encoding from the first bytes, builds the tokenizer and gives it those bytes.
    fn start(&mut self, first: &[u8]) -> Result<(), Error> {
        let (bom, skip) = Encoding::for_bom(first).map_or((None, 0), |(e, n)| (Some(e), n));
        let chosen = bom.or(self.header_charset);
        let (encoding, adjust) = match chosen {
            Some(e) => match AsciiCompatibleEncoding::new(e) {
                Some(ascii) => (ascii, false),
                // UTF-16 (or a label the tokenizer cannot take): transcoded to UTF-8.
                None => {
                    self.input = Input::Transcoded(e.new_decoder_without_bom_handling());
                    (AsciiCompatibleEncoding::utf_8(), false)
                }
            },
            None => (AsciiCompatibleEncoding::utf_8(), true),
        };
        if matches!(self.input, Input::Start(_)) {
            self.input = Input::Direct;
        }
        self.rewriter = Some(self.tokenizer(encoding, adjust));
        let rest = &first[skip..];
        match &mut self.input {
            Input::Transcoded(decoder) => {
                let text = transcode(decoder, rest, false);
                self.write(text.as_bytes())
            }
            _ => self.write(rest),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let Some(rewriter) = &mut self.rewriter else {
            return Ok(());
        };
        if bytes.is_empty() {
            return Ok(());
        }
        rewriter.write(bytes).map_err(|e| {
            // A failed tokenizer cannot be used again; what was read so far stays.
            self.rewriter = None;
            Error::Html(e.to_string())
        })
    }

    fn tokenizer(
        &self,
        encoding: AsciiCompatibleEncoding,
        adjust_charset_on_meta_tag: bool,
    ) -> HtmlRewriter<'static, Sink> {
        let (meta, title, title_text, p, p_text, img, link, body) = (
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
            self.state.clone(),
        );
        let handlers = vec![
            element!("meta", move |el| {
                let mut s = lock(&meta);
                let Some(content) = el.get_attribute("content") else {
                    return Ok(());
                };
                let key = el
                    .get_attribute("property")
                    .or_else(|| el.get_attribute("name"))
                    .map(|k| k.trim().to_ascii_lowercase());
                match key.as_deref() {
                    Some("description") if s.page.description.is_none() => {
                        let d = capped(&content);
                        if !d.is_empty() {
                            s.page.description = Some(d);
                        }
                    }
                    Some(k)
                        if (k.starts_with("og:") || k.starts_with("twitter:"))
                            && s.page.properties.len() < MAX_PROPERTIES
                            && !s.page.properties.contains_key(k) =>
                    {
                        let value = capped(&content);
                        s.page.properties.insert(k.to_owned(), value);
                    }
                    _ => {}
                }
                Ok(())
            }),
            element!("title", move |el| {
                on_end(el, &title, |s| {
                    if !s.title_done && !s.title.trim().is_empty() {
                        s.title_done = true;
                        s.page.title = Some(capped(&s.title));
                    }
                });
                Ok(())
            }),
            text!("title", move |t| {
                let mut s = lock(&title_text);
                if !s.title_done {
                    append(&mut s.title, t.as_str());
                }
                Ok(())
            }),
            element!("p", move |el| {
                on_end(el, &p, |s| {
                    if !s.paragraph_done {
                        if s.paragraph.trim().is_empty() {
                            s.paragraph.clear();
                        } else {
                            s.paragraph_done = true;
                            s.page.paragraph = Some(capped(&s.paragraph));
                        }
                    }
                });
                Ok(())
            }),
            text!("p", move |t| {
                let mut s = lock(&p_text);
                if !s.paragraph_done {
                    append(&mut s.paragraph, t.as_str());
                }
                Ok(())
            }),
            element!("img[src]", move |el| {
                let mut s = lock(&img);
                if s.page.image.is_some() {
                    return Ok(());
                }
                let tiny = |a: &str| {
                    el.get_attribute(a)
                        .and_then(|v| v.trim().parse::<u32>().ok())
                        .is_some_and(|n| n < 16)
                };
                let src = el.get_attribute("src").unwrap_or_default();
                let src = capped(&src);
                if tiny("width") || tiny("height") || src.starts_with("data:") {
                    return Ok(());
                }
                s.page.image = resolve(&s.base, &src);
                Ok(())
            }),
            element!("link[href]", move |el| {
                let mut s = lock(&link);
                let kind = el.get_attribute("type").unwrap_or_default();
                if s.page.oembed.is_none()
                    && kind.trim().eq_ignore_ascii_case("application/json+oembed")
                {
                    let href = capped(&el.get_attribute("href").unwrap_or_default());
                    s.page.oembed = resolve(&s.base, &href);
                }
                Ok(())
            }),
            element!("body", move |_| {
                lock(&body).in_body = true;
                Ok(())
            }),
        ];
        let settings = handlers.into_iter().fold(
            Settings::new_send()
                .with_encoding(encoding)
                .with_adjust_charset_on_meta_tag(adjust_charset_on_meta_tag)
                .with_memory_settings(
                    MemorySettings::new().with_max_allowed_memory_usage(TOKENIZER_MEMORY),
                ),
            Settings::append_element_content_handler,
        );
        let discard: Sink = |_| {};
        HtmlRewriter::new(settings, discard)
    }
}

/// Runs `then` on the state when `el`'s end tag comes (elements that have one).
fn on_end(
    el: &mut lol_html::send::Element<'_, '_>,
    state: &Arc<Mutex<State>>,
    then: impl FnOnce(&mut State) + Send + 'static,
) {
    let state = state.clone();
    if let Some(handlers) = el.end_tag_handlers() {
        let end: EndTagHandler<'static> = Box::new(move |_: &mut EndTag<'_>| {
            then(&mut lock(&state));
            Ok(())
        });
        handlers.push(end);
    }
}

fn transcode(decoder: &mut encoding_rs::Decoder, bytes: &[u8], last: bool) -> String {
    let mut out = String::with_capacity(
        decoder
            .max_utf8_buffer_length(bytes.len())
            .unwrap_or(bytes.len() * 3),
    );
    let _ = decoder.decode_to_string(bytes, &mut out, last);
    out
}

/// The charset a `Content-Type` header names.
pub fn charset(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| value.trim().trim_matches('"'))
    })
}

/// Reads a whole page at once (tests, fuzzing, oEmbed `html`).
pub fn parse(url: &Url, charset: Option<&str>, body: &[u8]) -> Result<Page, Error> {
    let mut x = Extractor::new(url.clone(), charset);
    x.feed(body)?;
    x.finish()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn url() -> Url {
        Url::parse("https://site.example/dir/page.html").unwrap()
    }

    fn og(body: &[u8], charset: Option<&str>) -> OpenGraph {
        parse(&url(), charset, body)
            .unwrap()
            .open_graph(&url(), TextLimits::default())
    }

    /// The same page fed one byte at a time, then in uneven chunks: same result.
    fn same_in_pieces(body: &[u8], charset: Option<&str>) -> Page {
        let whole = parse(&url(), charset, body).unwrap();
        for size in [1, 2, 3, 7, 64] {
            let mut x = Extractor::new(url(), charset);
            for piece in body.chunks(size) {
                if x.feed(piece).unwrap() {
                    break;
                }
            }
            let page = x.finish().unwrap();
            assert_eq!(page.title, whole.title, "chunks of {size}");
            assert_eq!(page.properties, whole.properties, "chunks of {size}");
            assert_eq!(page.description, whole.description, "chunks of {size}");
        }
        whole
    }

    #[test]
    fn open_graph_comes_first() {
        let body = br#"<!doctype html><html><head>
            <meta property="og:title" content="OG &amp; title">
            <meta name="twitter:title" content="Twitter title">
            <title>Page title</title>
            <meta name="description" content="Meta description">
            <meta property="og:description" content="OG description">
            <meta property="og:image" content="/images/a.png">
            <meta property="og:site_name" content="Site">
            <meta property="og:type" content="article">
            </head><body><p>First paragraph</p></body></html>"#;
        let page = same_in_pieces(body, None);
        assert_eq!(page.title.as_deref(), Some("Page title"));
        let og = og(body, None);
        assert_eq!(og["og:title"], "OG & title");
        assert_eq!(og["og:description"], "OG description");
        assert_eq!(og["og:image"], "https://site.example/images/a.png");
        assert_eq!(og["og:site_name"], "Site");
        assert_eq!(og["og:type"], "article");
        assert_eq!(og["og:url"], "https://site.example/dir/page.html");
        assert!(!og.contains_key("twitter:title"));
    }

    #[test]
    fn twitter_cards_then_title_description_and_paragraph() {
        let twitter = br#"<html><head><meta name="twitter:title" content="Tw">
            <meta name="twitter:description" content="Tw desc">
            <meta name="twitter:image" content="img/t.jpg"><title>T</title></head></html>"#;
        let og = og(twitter, None);
        assert_eq!(og["og:title"], "Tw");
        assert_eq!(og["og:description"], "Tw desc");
        assert_eq!(og["og:image"], "https://site.example/dir/img/t.jpg");

        let plain = b"<html><head><title>\n  Just a   title </title></head>\
            <body><p>  </p><div><p>The <b>first</b> real\n paragraph.</p><p>Second.</p>\
            <img src=\"pixel.gif\" width=1 height=1><img src=\"//cdn.example/pic.jpg\"></div></body></html>";
        let page = same_in_pieces(plain, None);
        assert_eq!(
            page.paragraph.as_deref(),
            Some("The first real\n paragraph.")
        );
        let og = self::og(plain, None);
        assert_eq!(og["og:title"], "Just a title");
        assert_eq!(og["og:description"], "The first real paragraph.");
        assert_eq!(og["og:image"], "https://cdn.example/pic.jpg");

        let described =
            br#"<title>x</title><meta name="description" content="Meta wins"><p>Para</p>"#;
        assert_eq!(self::og(described, None)["og:description"], "Meta wins");
    }

    #[test]
    fn texts_are_cut_to_the_limits() {
        let long = format!(
            "<title>{}</title><p>{}</p>",
            "word ".repeat(100),
            "lorem ipsum ".repeat(200)
        );
        let og = parse(&url(), None, long.as_bytes())
            .unwrap()
            .open_graph(&url(), TextLimits::default());
        let title = og["og:title"].as_str().unwrap();
        let description = og["og:description"].as_str().unwrap();
        assert!(
            title.split(' ').count() <= 30 && title.ends_with('…'),
            "{title}"
        );
        assert!(description.chars().count() <= 200, "{description}");
        assert!(description.split(' ').count() <= 50, "{description}");
    }

    #[test]
    fn charsets_from_header_bom_and_meta() {
        // "Café – été" in windows-1252 (– is 0x96), declared three ways.
        let latin = b"Caf\xe9 \x96 \xe9t\xe9";
        let wrap = |head: &str| {
            let mut v = format!("<html><head>{head}<title>").into_bytes();
            v.extend_from_slice(latin);
            v.extend_from_slice(b"</title></head></html>");
            v
        };
        let want = "Café – été";
        let by_header = parse(&url(), Some("windows-1252"), &wrap("")).unwrap();
        assert_eq!(by_header.title.as_deref(), Some(want));
        let by_meta = same_in_pieces(&wrap("<meta charset=\"windows-1252\">"), None);
        assert_eq!(by_meta.title.as_deref(), Some(want));
        let by_equiv = parse(
            &url(),
            None,
            &wrap(r#"<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1">"#),
        )
        .unwrap();
        assert_eq!(by_equiv.title.as_deref(), Some(want));
        // The header wins over the page's meta (as browsers do).
        let conflicting = parse(
            &url(),
            Some("windows-1252"),
            &wrap("<meta charset=\"utf-8\">"),
        )
        .unwrap();
        assert_eq!(conflicting.title.as_deref(), Some(want));

        // Shift_JIS by meta: 日本 is 0x93fa 0x967b.
        let sjis = b"<meta charset=shift_jis><title>\x93\xfa\x96\x7b</title>";
        assert_eq!(
            parse(&url(), None, sjis).unwrap().title.as_deref(),
            Some("日本")
        );

        // UTF-16 with a BOM, whatever the header says; the UTF-8 BOM is not text.
        for (bom, be) in [(&[0xFF, 0xFE][..], false), (&[0xFE, 0xFF][..], true)] {
            let mut body = bom.to_vec();
            for unit in "<title>Grüße</title>".encode_utf16() {
                body.extend_from_slice(&if be {
                    unit.to_be_bytes()
                } else {
                    unit.to_le_bytes()
                });
            }
            let page = same_in_pieces(&body, Some("iso-8859-1"));
            assert_eq!(page.title.as_deref(), Some("Grüße"));
        }
        let utf8_bom = b"\xEF\xBB\xBF<title>Hi</title>";
        assert_eq!(
            parse(&url(), None, utf8_bom).unwrap().title.as_deref(),
            Some("Hi")
        );
        assert_eq!(charset("text/html; charset=\"UTF-8\""), Some("UTF-8"));
        assert_eq!(charset("text/html;Charset=latin1 ; x=y"), Some("latin1"));
        assert_eq!(charset("text/html"), None);
    }

    #[test]
    fn reading_stops_once_everything_is_known() {
        let head = br#"<html><head><meta property="og:title" content="T">
            <meta property="og:description" content="D"><meta property="og:image" content="/i.png">
            </head><body>"#;
        let mut x = Extractor::new(url(), None);
        assert!(!x.feed(&head[..head.len() - 10]).unwrap());
        assert!(x.feed(&head[head.len() - 10..]).unwrap());
        // Without an image, the body is read until one appears.
        let mut y = Extractor::new(url(), None);
        assert!(
            !y.feed(b"<title>T</title><meta name=description content=D><body><p>x</p>")
                .unwrap()
        );
        assert!(y.feed(b"<img src=/a.png>").unwrap());
        assert_eq!(
            y.finish().unwrap().image.as_deref(),
            Some("https://site.example/a.png")
        );
    }

    #[test]
    fn oembed_discovery_and_odd_markup() {
        let page = parse(
            &url(),
            None,
            br#"<link rel="alternate" type="application/json+oembed" href="/oembed?u=1&amp;f=json">
                <meta property="OG:Title" content="  Upper  ">
                <meta property="og:image" content="javascript:alert(1)">
                <script>document.write("<title>not this</title>")</script><title>Real</title>"#,
        )
        .unwrap();
        assert_eq!(
            page.oembed.as_deref(),
            Some("https://site.example/oembed?u=1&f=json")
        );
        assert_eq!(page.title.as_deref(), Some("Real"));
        let og = page.open_graph(&url(), TextLimits::default());
        assert_eq!(og["og:title"], "Upper");
        assert!(!og.contains_key("og:image"), "{og:?}");
        // Nothing at all is an empty preview, not an error.
        let empty = og_of(b"");
        assert_eq!(empty.len(), 1, "{empty:?}");
        let binary = og_of(&[0u8, 159, 146, 150, 255, 0, 1]);
        assert!(!binary.contains_key("og:title"));
    }

    fn og_of(body: &[u8]) -> OpenGraph {
        og(body, None)
    }

    #[test]
    fn memory_stays_bounded_on_hostile_pages() {
        // An attribute of 4 MiB: over the tokenizer's budget, so reading stops with what was
        // found before it.
        let mut body = b"<title>Before</title><meta content=\"".to_vec();
        body.extend(std::iter::repeat_n(b'a', 4 << 20));
        let mut x = Extractor::new(url(), None);
        let mut failed = false;
        for piece in body.chunks(64 * 1024) {
            if x.feed(piece).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);
        assert_eq!(x.finish().unwrap().title.as_deref(), Some("Before"));
        // A huge title is capped.
        let huge = format!("<title>{}</title>", "x".repeat(1 << 20));
        let page = parse(&url(), None, huge.as_bytes()).unwrap();
        assert!(page.title.unwrap().len() <= MAX_TEXT);
    }
}
