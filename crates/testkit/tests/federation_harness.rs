//! The federation harness works on its own: media federates between two stock Synapses through
//! their nginx fronts, and a media upstream gets the media routes with the request target and
//! Host unchanged.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use testkit::http::{Response, encode};
use testkit::{Federation, HomeserverSetup, TestCerts, free_port};

fn auth(token: &str) -> String {
    format!("Bearer {token}")
}

fn get(certs: &TestCerts, url: &str, token: &str) -> Response {
    certs.get(url, &[("Authorization", &auth(token))])
}

/// Decodes `%XX` escapes (UTF-8).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).expect("ascii");
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("UTF-8")
}

#[test]
fn media_federates_between_the_homeservers_through_nginx() {
    let fed = Federation::start();
    let (a, b) = (fed.a(), fed.b());
    assert_eq!(a.server_name(), format!("localhost:{}", a.port()));
    assert_eq!(a.base_url(), format!("https://localhost:{}", a.port()));
    let (_, alice) = a.register_user("alice", false);
    let (_, bob) = b.register_user("bob", false);

    let filename = "Grüße ☃ 📎.bin";
    let content = b"bytes that cross the federation\n";
    let content_type = "application/x-testkit";
    let upload = fed.certs().send(
        "POST",
        &format!(
            "{}/_matrix/media/v3/upload?filename={}",
            a.base_url(),
            encode(filename)
        ),
        &[("Authorization", &auth(&alice))],
        Some(content_type),
        content,
    );
    assert_eq!(upload.status, 200, "upload: {}", upload.text());
    let uri = upload.json()["content_uri"]
        .as_str()
        .expect("content_uri")
        .to_owned();
    let media_id = uri
        .strip_prefix(&format!("mxc://{}/", a.server_name()))
        .unwrap_or_else(|| panic!("{uri} is not media of {}", a.server_name()));

    let download = get(
        fed.certs(),
        &format!(
            "{}/_matrix/client/v1/media/download/{}/{media_id}",
            b.base_url(),
            a.server_name()
        ),
        &bob,
    );
    assert_eq!(download.status, 200, "download from B: {}", download.text());
    assert_eq!(download.body, content);
    assert_eq!(download.header("content-type"), Some(content_type));
    let disposition = download.header("content-disposition").unwrap_or_default();
    let encoded = disposition
        .split("filename*=utf-8''")
        .nth(1)
        .unwrap_or_else(|| panic!("no UTF-8 filename in {disposition:?}"));
    assert_eq!(percent_decode(encoded.trim()), filename);

    // B fetched it from A over federation, through A's nginx; nginx logs just after answering.
    let wanted = format!("\"GET /_matrix/federation/v1/media/download/{media_id}");
    let made = |line: &String| line.contains(&wanted) && line.contains("\" 200 ");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.access_log().iter().any(made) {
        assert!(
            Instant::now() < deadline,
            "A's nginx logged no {wanted:?}:\n{}",
            a.access_log().join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Answers every request on `listener` with a small JSON body and sends its head (request line
/// and headers) to `heads`.
fn stub_media_server(listener: TcpListener, heads: mpsc::Sender<Vec<String>>) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { return };
        let mut head = Vec::new();
        let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        let body = r#"{"m.upload.size":1234}"#;
        let _ = write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        if heads.send(head).is_err() {
            return;
        }
    }
}

#[test]
fn a_media_upstream_gets_the_media_routes_unchanged() {
    // Reserved before the harness starts (nginx's config names it); listened on afterwards.
    let media_port = free_port();
    let key = "ed25519 mmr1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    let fed = Federation::builder()
        .a(HomeserverSetup::default()
            .media_upstream(media_port)
            .extra_signing_key(key))
        .start();
    let a = fed.a();
    let listener = TcpListener::bind(("127.0.0.1", media_port)).expect("bind the media port");
    let (tx, heads) = mpsc::channel();
    std::thread::spawn(move || stub_media_server(listener, tx));
    let (_, alice) = a.register_user("alice", false);

    let config = get(
        fed.certs(),
        &format!("{}/_matrix/client/v1/media/config?a=%2F&b=1", a.base_url()),
        &alice,
    );
    assert_eq!(config.status, 200, "media config: {}", config.text());
    assert_eq!(config.json()["m.upload.size"], 1234);
    let head = heads
        .recv_timeout(Duration::from_secs(10))
        .expect("the media upstream got the request");
    assert_eq!(
        head[0],
        "GET /_matrix/client/v1/media/config?a=%2F&b=1 HTTP/1.1"
    );
    let header = |name: &str| {
        head.iter()
            .find_map(|line| {
                let (n, v) = line.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_else(|| panic!("no {name} header in {head:?}"))
    };
    assert_eq!(header("host"), a.server_name());
    assert_eq!(header("x-forwarded-host"), a.server_name());
    assert_eq!(header("x-forwarded-proto"), "https");
    assert_eq!(header("x-forwarded-for"), "127.0.0.1");
    assert_eq!(header("authorization"), auth(&alice));

    // Everything else still reaches Synapse, whose own media repo is off.
    let versions = fed
        .certs()
        .get(&format!("{}/_matrix/client/versions", a.base_url()), &[]);
    assert_eq!(versions.status, 200, "versions: {}", versions.text());
    let direct = testkit::http::get(
        &format!("{}/_matrix/client/v1/media/config", a.client_url()),
        &[("Authorization", &auth(&alice))],
    );
    assert_eq!(
        direct.status,
        404,
        "Synapse's media repo: {}",
        direct.text()
    );
    assert!(
        heads.try_recv().is_err(),
        "only the media request went upstream"
    );

    // The extra key follows the homeserver's own in its key file, and Synapse publishes both.
    let keys = std::fs::read_to_string(a.signing_key_path()).expect("key file");
    let lines: Vec<&str> = keys.lines().collect();
    assert_eq!(lines.len(), 2, "{keys}");
    assert!(lines[0].starts_with("ed25519 a_"), "{keys}");
    assert_eq!(lines[1], key);
    let published = fed
        .certs()
        .get(&format!("{}/_matrix/key/v2/server", a.base_url()), &[])
        .json();
    let verify_keys = published["verify_keys"].as_object().expect("verify_keys");
    assert!(verify_keys.contains_key("ed25519:mmr1"), "{published}");
    assert_eq!(verify_keys.len(), 2, "{published}");
}
