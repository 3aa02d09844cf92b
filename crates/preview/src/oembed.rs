//! oEmbed: for pages that say little in their HTML (videos, posts), the provider's endpoint
//! describes a URL. Which provider handles a URL comes from its URL schemes, in oembed.com's
//! `providers.json` format: a list shipped in the binary (`oembed-providers.json`), or the
//! operator's file instead.

use serde::Deserialize;
use serde_json::Value;
use url::Url;

use crate::{Error, OpenGraph, TextLimits, html};

/// The providers shipped in the binary: the well-known ones whose pages preview poorly.
const BUILTIN: &str = include_str!("oembed-providers.json");

#[derive(Debug, Deserialize)]
struct Provider {
    provider_name: String,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

#[derive(Debug, Deserialize)]
struct Endpoint {
    #[serde(default)]
    schemes: Vec<String>,
    url: String,
}

/// One URL scheme of a provider, and the endpoint that describes its URLs.
#[derive(Debug, Clone)]
struct Scheme {
    /// The host part of the pattern, with its port if any (`*` matches within it), lowercase.
    host: String,
    /// The rest: path and query (`*` matches anything).
    rest: String,
    endpoint: String,
    provider: String,
}

/// Which provider describes which URLs.
#[derive(Debug, Clone)]
pub struct Providers {
    schemes: Vec<Scheme>,
}

impl Providers {
    /// The list shipped in the binary.
    pub fn builtin() -> Providers {
        // Tested to parse.
        Providers::from_json(BUILTIN).unwrap_or(Providers {
            schemes: Vec::new(),
        })
    }

    /// A list in `providers.json`'s format.
    pub fn from_json(json: &str) -> Result<Providers, Error> {
        let providers: Vec<Provider> =
            serde_json::from_str(json).map_err(|e| Error::Providers(e.to_string()))?;
        let mut schemes = Vec::new();
        for p in providers {
            for e in p.endpoints {
                for s in e.schemes {
                    // `http://` and `https://` alike: a scheme names the site, not the transport.
                    let Some((_, after)) = s.split_once("://") else {
                        continue;
                    };
                    let (host, rest) = after.split_at(after.find('/').unwrap_or(after.len()));
                    schemes.push(Scheme {
                        host: host.to_ascii_lowercase(),
                        rest: rest.to_owned(),
                        endpoint: e.url.replace("{format}", "json"),
                        provider: p.provider_name.clone(),
                    });
                }
            }
        }
        Ok(Providers { schemes })
    }

    pub fn len(&self) -> usize {
        self.schemes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.schemes.is_empty()
    }

    /// The endpoint request that describes `url` (`?url=…&format=json`), and the provider's
    /// name, when a provider's scheme matches it.
    pub fn endpoint(&self, url: &Url) -> Option<(Url, &str)> {
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        let host = match url.port() {
            Some(port) => format!("{}:{port}", url.host_str()?),
            None => url.host_str()?.to_owned(),
        }
        .to_ascii_lowercase();
        let rest = &url[url::Position::BeforePath..];
        let scheme = self
            .schemes
            .iter()
            .find(|s| glob(&s.host, &host, false) && glob(&s.rest, rest, true))?;
        let mut endpoint = Url::parse(&scheme.endpoint).ok()?;
        endpoint
            .query_pairs_mut()
            .append_pair("url", url.as_str())
            .append_pair("format", "json");
        Some((endpoint, &scheme.provider))
    }
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters (but a `/` only
/// when `slashes`).
fn glob(pattern: &str, text: &str, slashes: bool) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // Iterative matching with one backtrack point (linear in practice, never exponential).
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star
            && (slashes || t[st] != '/')
        {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// An oEmbed answer as OpenGraph: title, provider as site name, the thumbnail (or a photo's own
/// URL) as image, the description from a `rich` or `video` answer's HTML.
pub fn to_open_graph(json: &[u8], page: &Url, limits: TextLimits) -> Result<OpenGraph, Error> {
    let answer: Value = serde_json::from_slice(json).map_err(|e| Error::OEmbed(e.to_string()))?;
    let Value::Object(answer) = answer else {
        return Err(Error::OEmbed("not a JSON object".into()));
    };
    let text = |key: &str| {
        answer
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    };
    let mut og = OpenGraph::new();
    og.insert("og:url".into(), page.as_str().into());
    if let Some(title) = text("title") {
        let title = crate::text::cut(title, limits.title_words, limits.title_length);
        og.insert("og:title".into(), title.into());
    }
    if let Some(site) = text("provider_name") {
        og.insert("og:site_name".into(), site.into());
    }
    let kind = text("type").unwrap_or("link");
    let image = if kind == "photo" {
        text("url").or(text("thumbnail_url"))
    } else {
        text("thumbnail_url")
    };
    if let Some(image) = image.and_then(|i| html::resolve(page, i)) {
        og.insert("og:image".into(), image.into());
    }
    match kind {
        "video" => {
            og.insert("og:type".into(), "video.other".into());
        }
        "link" | "rich" | "photo" => {
            og.insert("og:type".into(), "website".into());
        }
        _ => {}
    }
    if matches!(kind, "rich" | "video")
        && let Some(markup) = text("html")
        && let Ok(page) = html::parse(page, Some("utf-8"), markup.as_bytes())
        && let Some(d) = page.paragraph.or(page.description)
    {
        let d = crate::text::cut(&d, limits.words, limits.length);
        if !d.is_empty() {
            og.insert("og:description".into(), d.into());
        }
    }
    if !og.contains_key("og:description")
        && let Some(author) = text("author_name")
    {
        og.insert("og:description".into(), author.into());
    }
    Ok(og)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn builtin_list_parses_and_matches_the_big_sites() {
        let p = Providers::builtin();
        assert!(p.len() > 20, "{}", p.len());
        for (page, provider) in [
            ("https://www.youtube.com/watch?v=dQw4w9WgXcQ", "YouTube"),
            ("https://youtu.be/dQw4w9WgXcQ", "YouTube"),
            ("https://m.youtube.com/watch?v=x", "YouTube"),
            ("https://twitter.com/user/status/123", "Twitter"),
            ("https://x.com/user/status/123", "Twitter"),
            ("https://vimeo.com/123456", "Vimeo"),
            ("https://open.spotify.com/track/abc", "Spotify"),
        ] {
            let (endpoint, name) = p
                .endpoint(&url(page))
                .unwrap_or_else(|| panic!("{page} matches no provider"));
            assert_eq!(name, provider, "{page}");
            let pairs: Vec<(String, String)> = endpoint.query_pairs().into_owned().collect();
            assert!(pairs.contains(&("url".into(), page.into())), "{endpoint}");
            assert!(
                pairs.contains(&("format".into(), "json".into())),
                "{endpoint}"
            );
        }
        for other in [
            "https://example.org/watch?v=1",
            "https://evil.example/www.youtube.com/watch?v=1",
            "https://youtube.com.evil.example/watch?v=1",
            "ftp://www.youtube.com/watch?v=1",
        ] {
            assert!(p.endpoint(&url(other)).is_none(), "{other}");
        }
    }

    #[test]
    fn glob_keeps_stars_within_the_host() {
        assert!(glob("*.example.org", "www.example.org", false));
        assert!(glob("*.example.org", "a.b.example.org", false));
        assert!(!glob("*.example.org", "example.org", false));
        assert!(!glob("*.example.org", "evil/.example.org", false));
        assert!(glob("/watch*", "/watch?v=1/2", true));
        assert!(!glob("/watch", "/watch?v=1", true));
        assert!(glob("/*/status/*", "/u/status/1", true));
        assert!(!glob("/*/status/*", "/u/post/1", true));
        // Long runs of stars stay cheap.
        let pattern = "*a".repeat(50);
        assert!(!glob(&pattern, &"b".repeat(10_000), true));
    }

    #[test]
    fn operators_list_replaces_the_builtin_one() {
        let p = Providers::from_json(
            r#"[{"provider_name": "Local", "provider_url": "http://127.0.0.1/",
                 "endpoints": [{"schemes": ["http://127.0.0.1:*/video/*"],
                                "url": "http://127.0.0.1:9/oembed.{format}"}]}]"#,
        )
        .unwrap();
        let (endpoint, name) = p.endpoint(&url("http://127.0.0.1:8080/video/1")).unwrap();
        assert_eq!(name, "Local");
        assert!(
            endpoint
                .as_str()
                .starts_with("http://127.0.0.1:9/oembed.json?url=")
        );
        assert!(
            p.endpoint(&url("https://www.youtube.com/watch?v=1"))
                .is_none()
        );
        let e = Providers::from_json("{}").unwrap_err();
        assert!(e.to_string().contains("providers.json"), "{e}");
    }

    #[test]
    fn answers_become_open_graph() {
        let page = url("https://video.example/v/1");
        let og = to_open_graph(
            br#"{"type": "video", "version": "1.0", "title": "A  video", "provider_name": "Vids",
                 "author_name": "Someone", "thumbnail_url": "/thumb.jpg",
                 "html": "<iframe src=x></iframe><p>About &amp; more</p>"}"#,
            &page,
            TextLimits::default(),
        )
        .unwrap();
        assert_eq!(og["og:title"], "A video");
        assert_eq!(og["og:site_name"], "Vids");
        assert_eq!(og["og:image"], "https://video.example/thumb.jpg");
        assert_eq!(og["og:type"], "video.other");
        assert_eq!(og["og:description"], "About & more");
        assert_eq!(og["og:url"], "https://video.example/v/1");

        let photo = to_open_graph(
            br#"{"type": "photo", "url": "https://img.example/full.png", "thumbnail_url": "https://img.example/t.png", "author_name": "Ann"}"#,
            &page,
            TextLimits::default(),
        )
        .unwrap();
        assert_eq!(photo["og:image"], "https://img.example/full.png");
        assert_eq!(photo["og:description"], "Ann");
        assert!(to_open_graph(b"[1]", &page, TextLimits::default()).is_err());
        assert!(to_open_graph(b"not json", &page, TextLimits::default()).is_err());
        // A thumbnail that is not http(s) is dropped.
        let bad = to_open_graph(
            br#"{"type": "link", "thumbnail_url": "file:///etc/passwd"}"#,
            &page,
            TextLimits::default(),
        )
        .unwrap();
        assert!(!bad.contains_key("og:image"));
    }
}
