//! URL previews through `mmrctl serve`, on a real PostgreSQL, of pages served on loopback: a
//! corpus checked key by key, the network rules (every way to reach a denied address is refused
//! before any connection: a listener on 127.0.0.2 records none), one fetch however many ask, and
//! pages that are slow, endless or huge.
//!
//! Every address a test connects to is loopback: the repo allows only 127.0.0.1/32 and denies
//! 127.0.0.2/32 and ::1; names resolve through a test DNS server that answers only loopback.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::io::Cursor;

use serde_json::{Value, json};
use support::remote::{Action, FakeRemote, Scripted};
use support::{MediaRepo, SHARED_SECRET, encode};
use testkit::DnsServer;
use testkit::http::Response;

const HS: &str = "example.test";

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The pages, a denied listener, the DNS server, and a repo allowed to reach only the pages.
struct Fixture {
    pages: Scripted,
    denied: Scripted,
    dns: DnsServer,
    repo: MediaRepo,
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn start(tweak: impl FnOnce(&mut Value)) -> Fixture {
        let pages = Scripted::start("127.0.0.1");
        let denied = Scripted::start("127.0.0.2");
        // Every page answers too, so that a request that got through would be seen succeeding.
        denied.route("/", Action::ok("text/html", "<title>secret</title>"));
        let dns = DnsServer::start();
        dns.add_a("pages.test", std::net::Ipv4Addr::LOCALHOST);
        dns.add_a("evil.test", std::net::Ipv4Addr::new(127, 0, 0, 2));
        let dir = tempfile::tempdir().unwrap();
        let providers = dir.path().join("providers.json");
        std::fs::write(
            &providers,
            json!([{
                "provider_name": "LocalTube",
                "endpoints": [{
                    "schemes": [format!("http://127.0.0.1:{}/video/*", pages.port)],
                    "url": format!("http://127.0.0.1:{}/oembed", pages.port),
                }],
            }])
            .to_string(),
        )
        .unwrap();
        let (port, denied_port) = (pages.port, denied.port);
        let dns_addr = dns.addr().to_string();
        let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
            c["urlPreviews"] = json!({
                "enabled": true,
                "allowedNetworks": ["127.0.0.1/32"],
                "disallowedNetworks": ["127.0.0.2/32", "::1/128"],
                // The denied listener's port too: only its address may be what refuses it.
                "allowedPorts": [port, denied_port],
                "nameservers": [dns_addr],
                "oEmbed": true,
                "oEmbedProvidersFile": providers,
                "maxPageSizeBytes": 1_048_576,
                "userAgent": "preview-test-agent",
            });
            c["timeouts"] = json!({ "urlPreviewTimeoutSeconds": 3 });
            tweak(c);
        });
        Fixture {
            pages,
            denied,
            dns,
            repo,
            _dir: dir,
        }
    }

    fn page(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.pages.port)
    }

    fn preview(&self, url: &str, headers: &[(&str, &str)]) -> Response {
        preview(&self.repo, url, headers)
    }

    fn preview_ok(&self, url: &str) -> serde_json::Map<String, Value> {
        let r = self.preview(url, &[]);
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/json"));
        r.json().as_object().unwrap().clone()
    }
}

fn preview(repo: &MediaRepo, url: &str, headers: &[(&str, &str)]) -> Response {
    let auth = format!("Bearer {SHARED_SECRET}");
    let mut all = vec![("Host", HS), ("Authorization", auth.as_str())];
    all.extend_from_slice(headers);
    repo.get(
        &format!("/_matrix/client/v1/media/preview_url?url={}", encode(url)),
        &all,
    )
}

/// The `mxc://` of a preview's image, downloaded: its bytes.
fn image_bytes(repo: &MediaRepo, og: &serde_json::Map<String, Value>) -> Vec<u8> {
    let mxc = og["og:image"].as_str().unwrap();
    let id = mxc.strip_prefix(&format!("mxc://{HS}/")).unwrap();
    let r = repo.get_as(HS, &format!("/_matrix/client/v1/media/download/{HS}/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.body
}

#[test]
fn a_corpus_of_pages_previews_key_by_key() {
    let fx = Fixture::start(|_| {});
    let cat = png(40, 30);
    fx.pages
        .route("/img/cat.png", Action::ok("image/png", cat.clone()));
    fx.pages.route(
        "/og.html",
        Action::ok(
            "text/html; charset=utf-8",
            r#"<!doctype html><html><head>
            <meta property="og:title" content="An OpenGraph page &amp; more">
            <meta property="og:description" content="What the page is about.">
            <meta property="og:image" content="/img/cat.png">
            <meta property="og:image:width" content="9999">
            <meta property="og:site_name" content="Pages">
            <meta property="og:type" content="article">
            <title>Not this title</title></head><body><p>Nor this.</p></body></html>"#,
        ),
    );
    let og = fx.preview_ok(&fx.page("/og.html"));
    assert_eq!(og["og:title"], "An OpenGraph page & more");
    assert_eq!(og["og:description"], "What the page is about.");
    assert_eq!(og["og:site_name"], "Pages");
    assert_eq!(og["og:type"], "article");
    assert_eq!(og["og:url"], fx.page("/og.html"));
    assert!(
        og["og:image"]
            .as_str()
            .unwrap()
            .starts_with("mxc://example.test/")
    );
    assert_eq!(og["og:image:type"], "image/png");
    // Of the stored image, not what the page claimed.
    assert_eq!(og["og:image:width"], 40);
    assert_eq!(og["og:image:height"], 30);
    assert_eq!(og["matrix:image:size"], cat.len());
    assert_eq!(image_bytes(&fx.repo, &og), cat);

    // Another page with the same image: the same media, stored once.
    fx.pages.route(
        "/og2.html",
        Action::ok(
            "text/html",
            format!(
                r#"<meta property="og:title" content="Second"><meta property="og:image" content="http://127.0.0.1:{}/img/cat.png?again">"#,
                fx.pages.port
            ),
        ),
    );
    let og2 = fx.preview_ok(&fx.page("/og2.html"));
    assert_eq!(og2["og:image"], og["og:image"]);
    assert_eq!(fx.repo.count("SELECT COUNT(*) FROM preview_images"), 1);
    assert_eq!(
        fx.repo
            .count("SELECT COUNT(*) FROM media WHERE user_id = ''"),
        1,
        "preview images are attributed to no user, one row per content"
    );

    fx.pages.route(
        "/twitter.html",
        Action::ok(
            "text/html",
            r#"<meta name="twitter:card" content="summary"><meta name="twitter:title" content="Tweet title">
               <meta name="twitter:description" content="Tweet text"><meta name="twitter:image" content="img/cat.png">"#,
        ),
    );
    let tw = fx.preview_ok(&fx.page("/twitter.html"));
    assert_eq!(tw["og:title"], "Tweet title");
    assert_eq!(tw["og:description"], "Tweet text");
    assert_eq!(tw["og:image"], og["og:image"]);

    let words = "word ".repeat(80);
    fx.pages.route(
        "/title.html",
        Action::ok(
            "text/html",
            format!("<html><head><title>Only a title</title></head><body><div><p>{words}</p></div></body></html>"),
        ),
    );
    let t = fx.preview_ok(&fx.page("/title.html"));
    assert_eq!(t["og:title"], "Only a title");
    let d = t["og:description"].as_str().unwrap();
    assert!(d.starts_with("word word") && d.ends_with('…'), "{d}");
    assert!(
        d.split(' ').count() <= 50 && d.chars().count() <= 200,
        "{d}"
    );
    assert!(!t.contains_key("og:image"));

    // windows-1252 by the header, Shift_JIS by a meta tag.
    let mut latin = b"<title>Caf\xe9 cr\xe8me</title>".to_vec();
    latin.extend_from_slice(b"<meta name=description content='\x93quoted\x94'>");
    fx.pages.route(
        "/latin.html",
        Action::ok("text/html; charset=windows-1252", latin),
    );
    let l = fx.preview_ok(&fx.page("/latin.html"));
    assert_eq!(l["og:title"], "Café crème");
    assert_eq!(l["og:description"], "\u{201c}quoted\u{201d}");
    fx.pages.route(
        "/sjis.html",
        Action::ok(
            "text/html",
            b"<meta charset=\"Shift_JIS\"><title>\x93\xfa\x96\x7b\x8c\xea</title>".to_vec(),
        ),
    );
    assert_eq!(fx.preview_ok(&fx.page("/sjis.html"))["og:title"], "日本語");

    // A page larger than maxPageSizeBytes: what came before the cut makes the preview.
    let mut huge =
        br#"<html><head><meta property="og:title" content="Huge"></head><body>"#.to_vec();
    huge.extend(b"<div>filler filler filler</div>\n".repeat(100_000));
    huge.extend_from_slice(br#"<meta property="og:description" content="too late"></body>"#);
    assert!(huge.len() > 3 << 20);
    fx.pages.route("/huge.html", Action::ok("text/html", huge));
    let h = fx.preview_ok(&fx.page("/huge.html"));
    assert_eq!(h["og:title"], "Huge");
    assert!(!h.contains_key("og:description"), "{h:?}");

    // The URL is itself an image (filePreviewTypes: image/*).
    let file = fx.preview_ok(&fx.page("/img/cat.png"));
    assert_eq!(file["og:image"], og["og:image"]);
    assert_eq!(file["og:title"], "cat.png");
    assert_eq!(file["og:image:width"], 40);
    // A type that is not listed: an empty preview, nothing stored.
    fx.pages.route(
        "/archive.zip",
        Action::ok("application/zip", b"PK\x03\x04rest".to_vec()),
    );
    let zip = fx.preview_ok(&fx.page("/archive.zip"));
    assert_eq!(zip.len(), 1, "{zip:?}");
    assert_eq!(fx.repo.count("SELECT COUNT(*) FROM preview_images"), 1);

    // oEmbed, from the operator's provider list, for a page that says nothing itself.
    fx.pages
        .route("/video/1", Action::ok("text/html", "<title>bare</title>"));
    fx.pages
        .route("/img/thumb.png", Action::ok("image/png", png(16, 9)));
    fx.pages.route(
        "/oembed",
        Action::json(
            200,
            json!({
                "version": "1.0", "type": "video", "title": "A local video",
                "provider_name": "LocalTube",
                "thumbnail_url": format!("http://127.0.0.1:{}/img/thumb.png", fx.pages.port),
                "html": "<iframe src=x></iframe><p>What the video shows.</p>",
            }),
        ),
    );
    let v = fx.preview_ok(&fx.page("/video/1"));
    assert_eq!(v["og:title"], "A local video");
    assert_eq!(v["og:site_name"], "LocalTube");
    assert_eq!(v["og:description"], "What the video shows.");
    assert_eq!(v["og:type"], "video.other");
    assert_eq!(v["og:image:width"], 16);
    assert_eq!(fx.pages.count("/video/1"), 0, "the provider described it");
    let asked = fx
        .pages
        .seen()
        .into_iter()
        .find(|s| s.path() == "/oembed")
        .unwrap();
    assert!(
        asked
            .target
            .contains(&format!("url={}", encode(&fx.page("/video/1")))),
        "{}",
        asked.target
    );

    // Every fetch said who we are and which language is wanted: the default, or the client's.
    let seen = fx.pages.seen();
    assert!(
        seen.iter()
            .all(|s| s.user_agent.as_deref() == Some("preview-test-agent"))
    );
    assert_eq!(seen[0].accept_language.as_deref(), Some("en-US,en"));
    fx.pages.route(
        "/lang.html",
        Action::ok("text/html", "<title>Bonjour</title>"),
    );
    let r = fx.preview(&fx.page("/lang.html"), &[("Accept-Language", "fr-FR")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let lang = fx
        .pages
        .seen()
        .into_iter()
        .find(|s| s.path() == "/lang.html")
        .unwrap();
    assert_eq!(lang.accept_language.as_deref(), Some("fr-FR"));
    // Per language: another language is another fetch; the same one is cached.
    fx.preview(&fx.page("/lang.html"), &[("Accept-Language", "de")]);
    fx.preview(&fx.page("/lang.html"), &[("Accept-Language", "fr-FR")]);
    assert_eq!(fx.pages.count("/lang.html"), 2);

    // The legacy endpoints answer the same, and only to users.
    let auth = format!("Bearer {SHARED_SECRET}");
    for version in ["r0", "v3", "v1"] {
        let path = format!(
            "/_matrix/media/{version}/preview_url?url={}",
            encode(&fx.page("/og.html"))
        );
        let r = fx
            .repo
            .get(&path, &[("Host", HS), ("Authorization", &auth)]);
        assert_eq!(r.status, 200, "{version}: {}", r.text());
        assert_eq!(r.json()["og:title"], "An OpenGraph page & more");
        let anonymous = fx.repo.get(&path, &[("Host", HS)]);
        assert_eq!(anonymous.status, 401, "{version}");
    }
    assert_eq!(fx.pages.count("/og.html"), 1, "served from the cache");
    let missing = fx.repo.get_as(HS, "/_matrix/client/v1/media/preview_url");
    assert_eq!(
        (missing.status, missing.json()["errcode"].clone()),
        (400, json!("M_MISSING_PARAM"))
    );
    let bad_ts = fx.repo.get_as(
        HS,
        &format!(
            "/_matrix/client/v1/media/preview_url?url={}&ts=soon",
            encode(&fx.page("/og.html"))
        ),
    );
    assert_eq!(bad_ts.status, 400);
}

#[test]
fn denied_addresses_are_never_connected_to_by_any_route() {
    let fx = Fixture::start(|_| {});
    let dp = fx.denied.port;
    let pp = fx.pages.port;
    // Redirects from an allowed page to the denied address: directly, and down a chain.
    fx.pages.route(
        "/to-denied",
        Action::redirect(&format!("http://127.0.0.2:{dp}/")),
    );
    fx.pages.route("/chain1", Action::redirect("/chain2"));
    fx.pages.route(
        "/chain2",
        Action::redirect(&format!("http://pages.test:{pp}/chain3")),
    );
    fx.pages.route(
        "/chain3",
        Action::redirect(&format!("http://evil.test:{dp}/")),
    );
    fx.pages.route(
        "/to-mapped",
        Action::redirect(&format!("http://[::ffff:127.0.0.2]:{dp}/")),
    );
    fx.pages
        .route("/to-file", Action::redirect("file:///etc/passwd"));
    let denied_urls = [
        // The address in every notation the URL standard reads as 127.0.0.2.
        format!("http://127.0.0.2:{dp}/"),
        format!("http://2130706434:{dp}/"),
        format!("http://0x7f000002:{dp}/"),
        format!("http://0x7f.0.0.2:{dp}/"),
        format!("http://0177.0.0.02:{dp}/"),
        format!("http://127.2:{dp}/"),
        format!("http://127.0.2:{dp}/"),
        format!("http://127.0.0.2.:{dp}/"),
        format!("http://[::ffff:127.0.0.2]:{dp}/"),
        format!("http://[::ffff:7f00:2]:{dp}/"),
        format!("http://[::127.0.0.2]:{dp}/"),
        format!("http://[2002:7f00:2::1]:{dp}/"),
        format!("http://[64:ff9b::7f00:2]:{dp}/"),
        format!("http://[::1]:{dp}/"),
        // A name that resolves to it.
        format!("http://evil.test:{dp}/"),
        format!("http://EVIL.test.:{dp}/"),
        // Redirects.
        fx.page("/to-denied"),
        fx.page("/chain1"),
        fx.page("/to-mapped"),
    ];
    for url in &denied_urls {
        let r = fx.preview(url, &[]);
        assert_eq!(r.status, 403, "{url}: {}", r.text());
        assert_eq!(r.json()["errcode"], "M_FORBIDDEN", "{url}");
    }
    // Not http(s), credentials in the URL, a port not allowed, an address outside the allowed
    // networks: refused too.
    let other = Scripted::start("127.0.0.1");
    for url in [
        "file:///etc/passwd".to_owned(),
        "ftp://127.0.0.1/".to_owned(),
        "gopher://127.0.0.1:70/".to_owned(),
        format!("http://user:secret@127.0.0.1:{pp}/"),
        format!("http://user@127.0.0.1:{pp}/"),
        format!("http://127.0.0.1:{}/", other.port),
        "http://127.0.0.3/".to_owned(),
        "http://0.0.0.0/".to_owned(),
        fx.page("/to-file"),
    ] {
        let r = fx.preview(&url, &[]);
        assert!(
            matches!(r.status, 403 | 502),
            "{url}: {} {}",
            r.status,
            r.text()
        );
    }
    let r = fx.preview("not a url", &[]);
    assert_eq!(r.status, 400, "{}", r.text());

    assert_eq!(
        fx.denied.connections(),
        0,
        "a denied address was connected to"
    );
    assert_eq!(
        other.connections(),
        0,
        "a port not allowed was connected to"
    );
    // The redirect chain was followed up to the denied hop, through the allowed name.
    assert_eq!(fx.pages.count("/chain3"), 1);
    assert!(
        fx.dns.queries("evil.test") > 0,
        "the name was resolved, and refused"
    );
    // Denials are decided again each time (the rules may be reloaded), not remembered as pages.
    assert_eq!(
        fx.repo
            .count("SELECT COUNT(*) FROM url_previews WHERE preview IS NOT NULL"),
        0
    );
}

#[test]
fn one_fetch_however_many_ask_and_failures_are_remembered() {
    let fx = Fixture::start(|_| {});
    fx.pages.route(
        "/popular.html",
        Action::After(
            std::time::Duration::from_millis(1500),
            Box::new(Action::ok("text/html", "<title>Popular</title>")),
        ),
    );
    let url = fx.page("/popular.html");
    let answers: Vec<Response> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..100)
            .map(|_| s.spawn(|| fx.preview(&url, &[])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &answers {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["og:title"], "Popular");
    }
    assert_eq!(fx.pages.count("/popular.html"), 1);
    assert_eq!(fx.repo.count("SELECT COUNT(*) FROM url_previews"), 1);
    let metrics = fx.repo.metrics();
    assert!(
        metrics.contains("mmrctl_url_previews_fetched_total 1\n"),
        "{metrics}"
    );

    // A page that stops sending: the preview gives up within urlPreviewTimeoutSeconds, and the
    // failure is remembered (clients retry on every render).
    fx.pages.route(
        "/slow.html",
        Action::Stall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n<title>Sl".to_vec()),
    );
    let slow = fx.page("/slow.html");
    let r = fx.preview(&slow, &[]);
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("urlPreviewTimeoutSeconds"),
        "{}",
        r.text()
    );
    let again = fx.preview(&slow, &[]);
    assert_eq!(again.status, 502);
    assert_eq!(
        fx.pages.count("/slow.html"),
        1,
        "the failure was remembered"
    );

    // An endless page: read up to maxPageSizeBytes, then previewed from that.
    fx.pages.route(
        "/endless.html",
        Action::Endless(vec![("Content-Type".into(), "text/html".into())]),
    );
    let e = fx.preview_ok(&fx.page("/endless.html"));
    assert_eq!(e["og:description"], "and more");
    // And the server is fine: memory stayed bounded through all of it.
    let rss_mib = fx.repo.peak_rss_kib() / 1024;
    assert!(rss_mib < 200, "peak RSS {rss_mib} MiB");
    fx.pages.route("/status.html", Action::json(500, json!({})));
    let failed = fx.preview(&fx.page("/status.html"), &[]);
    assert_eq!(failed.status, 502, "{}", failed.text());
    assert!(failed.text().contains("500"), "{}", failed.text());
}

#[test]
fn certificates_are_checked_unless_allowed_and_previews_can_be_off() {
    // A TLS page whose certificate comes from a CA the repo does not trust.
    let tls = FakeRemote::start();
    tls.route(
        "/page.html",
        Action::ok("text/html", "<title>Over TLS</title>"),
    );
    let url = format!("https://127.0.0.1:{}/page.html", tls.port);
    for (unsafe_ok, status) in [(false, 502), (true, 200)] {
        let port = tls.port;
        let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
            c["urlPreviews"] = json!({
                "enabled": true,
                "allowedNetworks": ["127.0.0.1/32"],
                "disallowedNetworks": [],
                "allowedPorts": [port],
                "previewUnsafeCertificates": unsafe_ok,
            });
        });
        let r = preview(&repo, &url, &[]);
        assert_eq!(
            r.status,
            status,
            "previewUnsafeCertificates {unsafe_ok}: {}",
            r.text()
        );
        if unsafe_ok {
            assert_eq!(r.json()["og:title"], "Over TLS");
        }
        let log = repo.log();
        let unsupported: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("not supported yet"))
            .collect();
        assert!(
            unsupported.iter().all(|l| !l.contains("urlPreviews")),
            "{unsupported:?}"
        );
    }
    assert_eq!(
        tls.count("/page.html"),
        1,
        "the untrusted certificate stopped the first"
    );

    let off = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["urlPreviews"] = json!({ "enabled": false });
    });
    let r = preview(&off, &url, &[]);
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["errcode"], "M_UNRECOGNIZED");
}

#[test]
fn bad_preview_settings_stop_the_start_with_the_setting_named() {
    for (previews, says) in [
        (
            json!({ "enabled": true, "allowedNetworks": ["0.0.0.0/0"], "disallowedNetworks": ["10.0.0.0/33"] }),
            "urlPreviews.allowedNetworks/disallowedNetworks: `10.0.0.0/33` is not a network",
        ),
        (
            json!({ "enabled": true, "nat64Prefixes": ["64:ff9b::/64"] }),
            "urlPreviews.nat64Prefixes: `64:ff9b::/64` is not an IPv6 /96 network",
        ),
        (
            json!({ "enabled": true, "nameservers": ["localhost"] }),
            "urlPreviews.nameservers: `localhost` (want ip:port)",
        ),
        (
            json!({ "enabled": true, "oEmbedProvidersFile": "/nonexistent/providers.json" }),
            "urlPreviews.oEmbedProvidersFile: cannot read /nonexistent/providers.json",
        ),
    ] {
        let db = testkit::TestDb::new();
        let url = db.url().to_owned();
        let mut repo = MediaRepo::spawn(Some(db), &url, &[(HS, "http://127.0.0.1:9")], |c| {
            c["urlPreviews"] = previews.clone();
        });
        let status = repo.wait_exit(std::time::Duration::from_secs(30));
        assert!(!status.success());
        let log = repo.log();
        assert!(log.contains(says), "want {says:?} in:\n{log}");
    }
}

#[test]
fn guests_cannot_preview() {
    // The homeserver says every token is a guest's.
    let homeserver = Scripted::start("127.0.0.1");
    homeserver.route(
        "/_matrix/client/v3/account/whoami",
        Action::json(
            200,
            json!({ "user_id": "@guest:example.test", "is_guest": true }),
        ),
    );
    let pages = Scripted::start("127.0.0.1");
    pages.route("/page.html", Action::ok("text/html", "<title>x</title>"));
    let cs_api = format!("http://127.0.0.1:{}", homeserver.port);
    let port = pages.port;
    let repo = MediaRepo::start(&[(HS, &cs_api)], |c| {
        c["urlPreviews"] = json!({
            "enabled": true, "allowedNetworks": ["127.0.0.1/32"], "disallowedNetworks": [],
            "allowedPorts": [port],
        });
    });
    let r = repo.get(
        &format!(
            "/_matrix/client/v1/media/preview_url?url={}",
            encode(&format!("http://127.0.0.1:{port}/page.html"))
        ),
        &[("Host", HS), ("Authorization", "Bearer a-guest-token")],
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json()["errcode"], "M_GUEST_ACCESS_FORBIDDEN");
    assert_eq!(homeserver.count("/_matrix/client/v3/account/whoami"), 1);
    assert_eq!(pages.connections(), 0);
}
