//! A real deployment, configured only from what `mmrctl render` writes: homeserver A (a real
//! Synapse) behind nginx or Caddy with the rendered config, `mmrctl serve` on the rendered
//! `media-repo.yaml`, and a stock homeserver B federating with it. Every path is checked to reach
//! the backend the rendered Traefik routes say it should (the media repo marks its responses);
//! then a real Matrix client (matrix-nio) uploads an image on A, sends it in a room, and a user
//! on B syncs and downloads it and its thumbnail (B fetches the original over federation from
//! A's media repo); alice gets a thumbnail and a link preview from the media repo.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic: that is how a test fails.

mod support;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine as _;
use keys::{KeyFile, KeyFormat, SigningKey};
use provision::webserver::Rule;
use serde_json::{Value, json};
use support::remote::{Action, Scripted};
use support::{MediaRepo, free_port, render};
use testkit::{Federation, Front, HomeserverSetup, TestDb, Webserver};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Nginx,
    Caddy,
}

struct Deployment {
    fed: Federation,
    repo: MediaRepo,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 99]));
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// The inventory of homeserver A: the playbook's defaults plus where this machine's parts are.
fn vars(front: &Front, ports: Ports, db_url: &str, key: &Path, out: &Path) -> String {
    format!(
        r#"
matrix_domain: "localhost:{federation_port}"
matrix_server_fqn_matrix: localhost
matrix_homeserver_generic_secret_key: "nVZ6bdmuJTl7Ffr9uTqDpL7r5lhIuzqMEpQxuzyi"
matrix_homeserver_container_url: "http://127.0.0.1:{synapse_port}"
matrix_media_repo_enabled: true
matrix_media_repo_base_path: "{out}"
matrix_media_repo_generate_signing_key: true
matrix_media_repo_signing_key_path: "{key}"
matrix_media_repo_bind_address: 127.0.0.1
matrix_media_repo_port: {media_port}
matrix_media_repo_metrics_enabled: true
matrix_media_repo_metrics_bind_address: 127.0.0.1
matrix_media_repo_metrics_port: {metrics_port}
# Metrics exposed on the client host, behind basic auth (bcrypt, which all three webservers check).
matrix_metrics_exposure_enabled: true
matrix_metrics_exposure_http_basic_auth_enabled: true
matrix_metrics_exposure_http_basic_auth_users: '{METRICS_USER}:{METRICS_HASH}'
matrix_media_repo_database_postgres: "{db_url}"
matrix_media_repo_datastore_file_id: "Hv0dZ3x1IuGmL9cFyDqCkQnV6bE2sWtR8aJoP4lYzMhKfN7gU5iXeTwB3rSjOAdq"
# Everything here is on loopback.
matrix_media_repo_federation_disallowed_networks: []
matrix_media_repo_url_previews_disallowed_networks: []
matrix_media_repo_url_previews_allowed_networks: ["127.0.0.1/32"]
matrix_media_repo_url_previews_allowed_ports: [{pages_port}]
# Every request of this test comes from one client address, faster than the default 1/s with a
# burst of 10 allows (clients wait as 429's retry_after_ms says; this script does not).
matrix_media_repo_rate_limit_requests_per_second: 1000
matrix_media_repo_rate_limit_burst: 1000
matrix_media_repo_webserver_homeserver_client_url: "http://127.0.0.1:{synapse_port}"
matrix_media_repo_webserver_homeserver_federation_url: "http://127.0.0.1:{synapse_port}"
matrix_media_repo_webserver_client_port: {client_port}
matrix_media_repo_webserver_federation_port: {federation_port}
matrix_media_repo_webserver_bind_addresses: ["127.0.0.1"]
matrix_media_repo_webserver_tls_certificate: "{cert}"
matrix_media_repo_webserver_tls_certificate_key: "{cert_key}"
"#,
        federation_port = front.federation_port,
        client_port = front.client_port,
        synapse_port = front.synapse_port,
        out = out.display(),
        key = key.display(),
        cert = front.certificate.display(),
        cert_key = front.certificate_key.display(),
        media_port = ports.media,
        metrics_port = ports.metrics,
        pages_port = ports.pages,
    )
}

/// Who may read the metrics through the webserver: `METRICS_USER`/`METRICS_PASSWORD`, stored as
/// a bcrypt hash (`htpasswd -nbB`).
const METRICS_USER: &str = "prometheus";
const METRICS_PASSWORD: &str = "metrics-pass";
const METRICS_HASH: &str = "$2b$04$Utp5xxVoVX.WqgkxdFpF1uHzc2llyfigpJ50Pl9JYES21Vezmcc/W";

/// The media repo's listeners, and the port of the pages that previews fetch.
#[derive(Clone, Copy)]
struct Ports {
    media: u16,
    metrics: u16,
    pages: u16,
}

fn deploy(kind: Kind, pages_port: u16) -> Deployment {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("matrix-media-repo");
    std::fs::create_dir_all(&out).unwrap();
    // The repo's key, merged into A's key file before A starts (what `mmrctl keys merge` does).
    let key = SigningKey::generate().unwrap();
    let seed = base64::engine::general_purpose::STANDARD_NO_PAD.encode(key.seed());
    let line = format!("ed25519 {} {seed}", key.id().version());
    let key_path = dir.path().join("media-repo.signing.key");
    std::fs::write(
        &key_path,
        KeyFile::new(KeyFormat::Mmr, vec![key]).to_text(KeyFormat::Mmr),
    )
    .unwrap();

    let db = TestDb::new();
    let ports = Ports {
        media: free_port(),
        metrics: free_port(),
        pages: pages_port,
    };
    let db_url = db.url().to_owned();
    let (out_for_front, key_for_front) = (out.clone(), key_path.clone());
    let webserver = move |front: &Front| {
        render(
            &vars(front, ports, &db_url, &key_for_front, &out_for_front),
            &out_for_front,
        );
        match kind {
            Kind::Nginx => Webserver::Nginx(
                std::fs::read_to_string(out_for_front.join("nginx/matrix-media-repo.conf"))
                    .unwrap(),
            ),
            Kind::Caddy => Webserver::Caddy(
                std::fs::read_to_string(out_for_front.join("caddy/matrix-media-repo.Caddyfile"))
                    .unwrap(),
            ),
        }
    };
    let fed = Federation::builder()
        .a(HomeserverSetup::default()
            .extra_signing_key(&line)
            .webserver(webserver))
        .start();
    let ca = fed.ca_path();
    let repo = MediaRepo::start_with_config_file(
        &out.join("config/media-repo.yaml"),
        ports.media,
        Some(db),
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    Deployment {
        fed,
        repo,
        out,
        _dir: dir,
    }
}

/// The rendered Traefik file-provider routers: (entrypoint, rule) pairs.
fn traefik_routers(out: &Path) -> Vec<(Vec<String>, Rule)> {
    let text = std::fs::read_to_string(out.join("traefik/matrix-media-repo.yml")).unwrap();
    let doc: Value = serde_norway::from_str(&text).unwrap();
    doc["http"]["routers"]
        .as_object()
        .unwrap()
        .values()
        .map(|r| {
            let entrypoints = r["entryPoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_str().unwrap().to_owned())
                .collect();
            (
                entrypoints,
                Rule::parse(r["rule"].as_str().unwrap()).unwrap(),
            )
        })
        .collect()
}

/// Requests on each port reach the media repo exactly when the rendered Traefik routes send them
/// there: what Traefik, nginx and Caddy do agrees, judged by the marker on the response.
fn check_routing(d: &Deployment) {
    let a = d.fed.a();
    let routers = traefik_routers(&d.out);
    let traefik_sends_to_repo = |entrypoint: &str, path: &str| {
        routers.iter().any(|(eps, rule)| {
            eps.iter().any(|e| e == entrypoint) && rule.matches("localhost", path)
        })
    };
    let client_paths = [
        "/_matrix/media/v3/config",
        "/_matrix/media/r0/download/localhost/abc",
        "/_matrix/media/v3/thumbnail/localhost/abc?width=32&height=32",
        "/_matrix/client/v1/media/config",
        "/_matrix/client/v1/media/download/localhost/abc",
        "/_matrix/client/v1/media/preview_url?url=http://127.0.0.1/",
        "/_matrix/client/v3/logout",
        "/_matrix/client/r0/logout/all",
        "/_matrix/client/v3/admin/purge_media_cache",
        "/_matrix/client/unstable/io.t2bot.media/usage",
        "/_matrix/client/versions",
        "/_matrix/client/v3/login",
        "/_matrix/client/v3/sync",
        "/_matrix/client/v3/profile/@alice:localhost",
        "/_matrix/key/v2/server",
        "/_synapse/admin/v1/server_version",
        "/health",
    ];
    let federation_paths = [
        "/_matrix/federation/v1/media/download/abc",
        "/_matrix/federation/v1/media/thumbnail/abc?width=32&height=32&method=scale",
        "/_matrix/media/v3/download/localhost/abc",
        "/_matrix/federation/v1/version",
        "/_matrix/federation/v1/query/profile?user_id=@alice:localhost",
        "/_matrix/key/v2/server",
    ];
    let tls = d.fed.certs();
    for (entrypoint, port, paths) in [
        ("web-secure", a.client_port(), &client_paths[..]),
        ("matrix-federation", a.port(), &federation_paths[..]),
    ] {
        for path in paths {
            let route_path = path.split('?').next().unwrap();
            let expected = traefik_sends_to_repo(entrypoint, route_path);
            let r = tls.get(&format!("https://localhost:{port}{path}"), &[]);
            let reached_repo = r.header(server::INSTANCE_HEADER).is_some();
            assert_eq!(
                reached_repo,
                expected,
                "{entrypoint} {path}: reached the {} (status {}), Traefik's routes send it to the {}",
                if reached_repo {
                    "media repo"
                } else {
                    "homeserver"
                },
                r.status,
                if expected { "media repo" } else { "homeserver" },
            );
        }
    }
}

/// alice@A uploads an image with matrix-nio and sends it in a room; bob@B joins, syncs and
/// downloads it and its thumbnail (B fetches both over federation from A's media repo).
fn client_flow(d: &Deployment) -> Value {
    let (a, b) = (d.fed.a(), d.fed.b());
    let (alice, _) = a.register_user("alice", false);
    let (bob, _) = b.register_user("bob", false);
    let image = d._dir.path().join("cat.png");
    std::fs::write(&image, png(640, 480)).unwrap();
    let script = r#"
import asyncio, json, ssl, sys
from nio import AsyncClient, DownloadResponse, ThumbnailResponse, UploadResponse, RoomCreateResponse, JoinResponse

async def main(a_url, b_url, ca, alice_id, alice_password, bob_id, bob_password, image_path):
    ctx = ssl.create_default_context(cafile=ca)
    alice = AsyncClient(a_url, alice_id, ssl=ctx)
    bob = AsyncClient(b_url, bob_id, ssl=ctx)
    try:
        assert (await alice.login(alice_password)).access_token
        assert (await bob.login(bob_password)).access_token
        data = open(image_path, "rb").read()
        with open(image_path, "rb") as f:
            up, _ = await alice.upload(f, content_type="image/png", filename="cat.png", filesize=len(data))
        assert isinstance(up, UploadResponse), up
        room = await alice.room_create(invite=[bob_id])
        assert isinstance(room, RoomCreateResponse), room
        # B gets no history from before its join: bob joins first, then alice sends.
        joined = await bob.join(room.room_id)
        assert isinstance(joined, JoinResponse), joined
        await alice.room_send(room.room_id, "m.room.message", {
            "msgtype": "m.image", "body": "cat.png", "url": up.content_uri,
            "info": {"mimetype": "image/png", "size": len(data), "w": 640, "h": 480}})
        url = None
        for _ in range(60):
            s = await bob.sync(timeout=1000)
            room_sync = s.rooms.join.get(room.room_id)
            for event in (room_sync.timeline.events if room_sync else []):
                if getattr(event, "url", None) == up.content_uri:
                    url = event.url
            if url:
                break
        assert url, "bob never saw the image event"
        got = await bob.download(mxc=url)
        assert isinstance(got, DownloadResponse), got
        server, media_id = url[len("mxc://"):].split("/", 1)
        thumb = await bob.thumbnail(server, media_id, 64, 64)
        assert isinstance(thumb, ThumbnailResponse), thumb
        print(json.dumps({
            "mxc": up.content_uri,
            "alice_token": alice.access_token,
            "downloaded_equal": got.body == data,
            "thumbnail_type": thumb.content_type,
            "thumbnail_png": thumb.body[:8] == b"\x89PNG\r\n\x1a\n" or thumb.body[:3] == b"\xff\xd8\xff",
            "thumbnail_bytes": len(thumb.body),
        }))
    finally:
        await alice.close()
        await bob.close()

asyncio.run(main(*sys.argv[1:]))
"#;
    let out = Command::new(testkit::python())
        .arg("-c")
        .arg(script)
        .arg(a.base_url())
        .arg(b.base_url())
        .arg(d.fed.ca_path())
        .arg(&alice)
        .arg(testkit::Synapse::password_of("alice"))
        .arg(&bob)
        .arg(testkit::Synapse::password_of("bob"))
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the matrix-nio client failed:\n{}\n--- media repo log ---\n{}\n--- webserver log ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.repo.log(),
        a.webserver_log(),
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// matrix-media-repo's dashboard (the one the playbook installed for it) queries these; its Go
/// runtime panels (`go_*`) have no counterpart in a Rust server, and its evictions panel queries a
/// metric matrix-media-repo itself no longer has.
const MMR_DASHBOARD_METRICS: &[&str] = &[
    "media_http_requests_total",
    "media_invalid_http_requests_total",
    "media_http_responses_total",
    "media_http_response_time_seconds_bucket",
    "media_s3_operations_total",
    "media_cache_hits_total",
    "media_cache_misses_total",
    "media_thumbnails_generated_total",
    "media_age_accessed_media_seconds_bucket",
    "media_downloaded_total",
    "media_url_previews_generated_total",
];

/// After the mixed workload: the exposition passes `promtool check metrics`, has every series
/// matrix-media-repo's dashboard queries, and every query of our dashboard returns data from a
/// real Prometheus scraping the server.
fn check_metrics(
    d: &Deployment,
    prometheus: &mut testkit::Prometheus,
    second_round: impl FnOnce(),
) {
    // A remote fetch is counted once it is stored, which can be just after its client got it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let exposition = loop {
        let exposition = d.repo.metrics();
        if exposition.contains("media_downloaded_total{") || std::time::Instant::now() > deadline {
            break exposition;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut promtool = Command::new(testkit::promtool_bin())
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut promtool.stdin.take().unwrap(), exposition.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{exposition}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    for name in MMR_DASHBOARD_METRICS {
        assert!(
            exposition
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{"))),
            "matrix-media-repo's dashboard queries {name}, which is not exported:\n{exposition}"
        );
    }

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../roles/custom/matrix-media-repo/templates/grafana/media-repo.json"),
        )
        .unwrap(),
    )
    .unwrap();
    // Rates and quantiles need increases between two scrapes: a second round of the workload
    // once the first one's series were scraped, then two scrapes more.
    prometheus.wait_scrapes(prometheus.scrapes() + 1);
    second_round();
    prometheus.wait_scrapes(prometheus.scrapes() + 2);
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let result = prometheus.query(expr);
            // A number for some series (a broken histogram or ratio gives NaN).
            let finite = result.iter().any(|series| {
                series["value"][1]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .is_some_and(f64::is_finite)
            });
            assert!(
                finite,
                "panel {:?}: {expr} has no value after the workload: {result:?}",
                panel["title"]
            );
            queries += 1;
        }
    }
    assert!(queries >= 20, "the dashboard has only {queries} queries");
}

fn deployment_works(kind: Kind) {
    let pages = Scripted::start("127.0.0.1");
    pages.route(
        "/article",
        Action::ok(
            "text/html",
            "<html><head><meta property=\"og:title\" content=\"An article\"></head></html>",
        ),
    );
    let d = deploy(kind, pages.port);
    // A real Prometheus scrapes the nginx deployment from the start, as in production, so
    // that rates and quantiles see the workload.
    let mut prometheus = matches!(kind, Kind::Nginx).then(|| {
        let port = d.repo.config["metrics"]["port"].as_u64().unwrap();
        testkit::Prometheus::start("media-repo", &[format!("127.0.0.1:{port}")], 2)
    });
    check_routing(&d);

    let flow = client_flow(&d);
    assert_eq!(flow["downloaded_equal"], json!(true), "{flow}");
    assert_eq!(flow["thumbnail_png"], json!(true), "{flow}");
    let mxc = flow["mxc"].as_str().unwrap();
    let media_id = mxc.rsplit('/').next().unwrap();
    // The original and a thumbnail were served to B by the media repo, over federation.
    assert_eq!(
        d.repo.count(&format!(
            "SELECT COUNT(*) FROM media WHERE media_id = '{media_id}' AND sha256 IS NOT NULL"
        )),
        1
    );
    // B fetched the original over federation (Synapse thumbnails remote media itself).
    let metrics = d.repo.metrics();
    let served = "mmrctl_http_requests_total{route=\"/_matrix/federation/v1/media/download/{media_id}\",method=\"GET\",status=\"200\"}";
    assert!(
        metrics.contains(served),
        "B's download did not reach the media repo over federation:\n{metrics}"
    );

    // alice's thumbnail through A's webserver comes from the media repo.
    let token = flow["alice_token"].as_str().unwrap();
    let auth = format!("Bearer {token}");
    let r = d.fed.certs().get(
        &format!(
            "{}/_matrix/client/v1/media/thumbnail/{}/{media_id}?width=64&height=64&method=scale",
            d.fed.a().base_url(),
            d.fed.a().server_name()
        ),
        &[("Authorization", &auth)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header(server::INSTANCE_HEADER).is_some());
    assert_eq!(r.header("content-type"), Some("image/png"));

    // alice previews a link through A's webserver: the media repo fetches the page.
    let page = format!("http://127.0.0.1:{}/article", pages.port);
    let r = d.fed.certs().get(
        &format!(
            "{}/_matrix/client/v1/media/preview_url?url={}",
            d.fed.a().base_url(),
            support::encode(&page)
        ),
        &[("Authorization", &auth)],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["og:title"], json!("An article"));
    assert!(r.header(server::INSTANCE_HEADER).is_some());
    assert_eq!(pages.count("/article"), 1);

    // The metrics, through the webserver: the path replaced, basic auth checked.
    let metrics_url = format!("{}/metrics/matrix-media-repo", d.fed.a().base_url());
    assert_eq!(d.fed.certs().get(&metrics_url, &[]).status, 401);
    let wrong = base64::engine::general_purpose::STANDARD.encode(format!("{METRICS_USER}:nope"));
    let r = d.fed.certs().get(
        &metrics_url,
        &[("Authorization", &format!("Basic {wrong}"))],
    );
    assert_eq!(r.status, 401);
    let right = base64::engine::general_purpose::STANDARD
        .encode(format!("{METRICS_USER}:{METRICS_PASSWORD}"));
    let r = d.fed.certs().get(
        &metrics_url,
        &[("Authorization", &format!("Basic {right}"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("media_http_requests_total{"),
        "{}",
        r.text()
    );

    if let Some(prometheus) = prometheus.as_mut() {
        let (_, carol) = d.fed.b().register_user("carol", false);
        let round = |i: u32| mixed_workload(&d, &pages, &auth, &carol, i);
        round(0);
        check_metrics(&d, prometheus, || round(1));
    }
}

/// The rest of a mixed workload, round `i`: alice gets carol@B's new media (the repo fetches it
/// from B), uploads her image again (stored once), downloads it, asks for a new thumbnail size
/// and a new preview; and a request names a host that is not served here.
fn mixed_workload(d: &Deployment, pages: &Scripted, auth: &str, carol: &str, i: u32) {
    let (a, b, tls) = (d.fed.a(), d.fed.b(), d.fed.certs());
    let body = png(50 + i, 40);
    let up = tls.send(
        "POST",
        &format!("{}/_matrix/media/v3/upload?filename=b.png", b.base_url()),
        &[("Authorization", &format!("Bearer {carol}"))],
        Some("image/png"),
        &body,
    );
    assert_eq!(up.status, 200, "{}", up.text());
    let remote = up.json()["content_uri"].as_str().unwrap()["mxc://".len()..].to_owned();
    let r = tls.get(
        &format!("{}/_matrix/client/v1/media/download/{remote}", a.base_url()),
        &[("Authorization", auth)],
    );
    assert_eq!((r.status, r.body.as_slice()), (200, body.as_slice()));

    let image = png(640, 480);
    let up = tls.send(
        "POST",
        &format!(
            "{}/_matrix/media/v3/upload?filename=again.png",
            a.base_url()
        ),
        &[("Authorization", auth)],
        Some("image/png"),
        &image,
    );
    assert_eq!(up.status, 200, "{}", up.text());
    let own = up.json()["content_uri"].as_str().unwrap()["mxc://".len()..].to_owned();
    let r = tls.get(
        &format!("{}/_matrix/client/v1/media/download/{own}", a.base_url()),
        &[("Authorization", auth)],
    );
    assert_eq!(r.status, 200);
    let size = 100 + 50 * i;
    let r = tls.get(
        &format!(
            "{}/_matrix/client/v1/media/thumbnail/{own}?width={size}&height={size}&method=crop",
            a.base_url()
        ),
        &[("Authorization", auth)],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let page = format!("/article-{i}");
    pages.route(
        &page,
        Action::ok(
            "text/html",
            "<html><head><title>Another one</title></head></html>",
        ),
    );
    let url = format!("http://127.0.0.1:{}{page}", pages.port);
    let r = tls.get(
        &format!(
            "{}/_matrix/client/v1/media/preview_url?url={}",
            a.base_url(),
            support::encode(&url)
        ),
        &[("Authorization", auth)],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    let r = testkit::http::get(
        &d.repo.url("/_matrix/media/v3/config"),
        &[("Host", "not-served.example")],
    );
    assert_eq!(r.status, 404);
}

#[test]
fn nginx_from_the_rendered_config_fronts_a_federating_deployment() {
    deployment_works(Kind::Nginx);
}

#[test]
fn caddy_from_the_rendered_config_fronts_a_federating_deployment() {
    deployment_works(Kind::Caddy);
}

/// Runs `mmrctl doctor --json` on `config`; returns whether it passed and the checks that failed.
fn doctor(d: &Deployment, config: &Path) -> (bool, Vec<String>, Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(["doctor", "--json", "--config"])
        .arg(config)
        .env("SSL_CERT_FILE", d.fed.ca_path())
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor printed no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let failed: Vec<String> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "failed")
        .map(|c| c["check"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(out.status.success(), failed.is_empty(), "{report:#}");
    assert_eq!(report["ok"], json!(failed.is_empty()), "{report:#}");
    (out.status.success(), failed, report)
}

/// A copy of the rendered config with `edit` applied.
fn config_with(d: &Deployment, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut config = d.repo.config.clone();
    edit(&mut config);
    let path = d._dir.path().join(name);
    std::fs::write(&path, serde_norway::to_string(&config).unwrap()).unwrap();
    path
}

/// A directory nobody can write, root included (`chattr +i`), made writable again when dropped.
struct Immutable(PathBuf);

impl Immutable {
    fn new(path: PathBuf) -> Immutable {
        std::fs::create_dir_all(path.join(".tmp")).unwrap();
        let status = Command::new("chattr")
            .arg("+i")
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "chattr +i {} failed: the read-only datastore check needs a filesystem with \
             immutable attributes (ext4, xfs, btrfs) under the temp dir",
            path.display()
        );
        Immutable(path)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn doctor_passes_a_good_deployment_and_names_each_planted_fault() {
    let pages = Scripted::start("127.0.0.1");
    let d = deploy(Kind::Nginx, pages.port);
    let rendered = d.out.join("config/media-repo.yaml");
    let (ok, failed, report) = doctor(&d, &rendered);
    assert!(ok, "doctor fails a good deployment: {failed:?}\n{report:#}");
    let checks: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for check in [
        "client routing",
        "federation routing",
        "homeserver media off",
        "key published",
        "signature accepted",
        "database",
        "datastore",
        "disk space",
        "clock",
    ] {
        assert!(
            checks.contains(&check),
            "doctor did not check {check}: {report:#}"
        );
    }

    // The key not merged into the homeserver's key file.
    let other_key = d._dir.path().join("unmerged.signing.key");
    std::fs::write(
        &other_key,
        KeyFile::new(KeyFormat::Mmr, vec![SigningKey::generate().unwrap()]).to_text(KeyFormat::Mmr),
    )
    .unwrap();
    let config = config_with(&d, "unmerged.yaml", |c| {
        c["homeservers"][0]["signingKeyPath"] = json!(other_key)
    });
    assert_eq!(
        doctor(&d, &config).1,
        ["key published", "signature accepted"],
        "an unmerged key"
    );

    // The homeserver's own media repo left on (B's Synapse serves media itself).
    let b_client = d.fed.b().client_url();
    let config = config_with(&d, "media-on.yaml", |c| {
        c["homeservers"][0]["csApi"] = json!(b_client)
    });
    assert_eq!(
        doctor(&d, &config).1,
        ["homeserver media off"],
        "media left on"
    );

    // A read-only datastore.
    let read_only = Immutable::new(d._dir.path().join("read-only-media"));
    let config = config_with(&d, "read-only.yaml", |c| {
        c["datastores"][0]["opts"]["path"] = json!(read_only.0)
    });
    let (_, failed, report) = doctor(&d, &config);
    assert_eq!(failed, ["datastore"], "a read-only datastore: {report:#}");
    drop(read_only);

    // The database down (nothing listens there).
    let config = config_with(&d, "database-down.yaml", |c| {
        c["database"]["postgres"] = json!("postgres://postgres@127.0.0.1:1/mmrctl?sslmode=disable")
    });
    assert_eq!(doctor(&d, &config).1, ["database"], "the database down");

    // A media path routed to the homeserver: the client media router switched off, nginx reloaded.
    let vars_path = d.out.join("vars.yml");
    let vars_text = std::fs::read_to_string(&vars_path).unwrap();
    render(
        &format!(
            "{vars_text}matrix_media_repo_container_labels_traefik_client_matrix_client_media_enabled: false\n"
        ),
        &d.out,
    );
    d.fed.a().reload_nginx(
        &std::fs::read_to_string(d.out.join("nginx/matrix-media-repo.conf")).unwrap(),
    );
    let probe = format!("{}/_matrix/client/v1/media/config", d.fed.a().base_url());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d
        .fed
        .certs()
        .get(&probe, &[])
        .header(server::INSTANCE_HEADER)
        .is_some()
    {
        assert!(std::time::Instant::now() < deadline, "nginx did not reload");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, failed, report) = doctor(&d, &rendered);
    assert_eq!(
        failed,
        ["client routing"],
        "a media path routed to Synapse: {report:#}"
    );
    let routing = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "client routing")
        .unwrap();
    assert!(
        routing["message"]
            .as_str()
            .unwrap()
            .contains("/_matrix/client/v1/media/config reached the homeserver"),
        "{routing}"
    );
}

/// With the federation API on the client port (443 for both), each host gets one server block
/// that sends federation paths to the homeserver's federation listener: nginx and Caddy accept
/// what `render` writes.
#[test]
fn one_port_for_both_apis_renders_one_server_per_host_that_both_webservers_accept() {
    let dir = tempfile::tempdir().unwrap();
    let certs = testkit::TestCerts::new();
    let port = free_port();
    let front = Front {
        federation_port: port,
        client_port: port,
        synapse_port: 8008,
        certificate: certs.cert_path(),
        certificate_key: certs.key_path(),
    };
    let ports = Ports {
        media: 8000,
        metrics: 9000,
        pages: 8080,
    };
    let db = "postgres://postgres@127.0.0.1:5432/none";
    let text = vars(&front, ports, db, &dir.path().join("key"), dir.path()).replace(
        "matrix_media_repo_webserver_homeserver_federation_url: \"http://127.0.0.1:8008\"",
        "matrix_media_repo_webserver_homeserver_federation_url: \"http://127.0.0.1:8048\"",
    );
    render(&text, dir.path());
    let nginx = std::fs::read_to_string(dir.path().join("nginx/matrix-media-repo.conf")).unwrap();
    assert_eq!(
        nginx.matches("server_name localhost;").count(),
        1,
        "{nginx}"
    );
    assert!(
        nginx.contains("location ~ ^/_matrix/(federation|key)/ {"),
        "{nginx}"
    );
    assert!(nginx.contains("server 127.0.0.1:8048;"), "{nginx}");
    // Each starts (and listens) only with a config it accepts.
    drop(testkit::Nginx::start(&nginx, &[port]));
    let caddyfile =
        std::fs::read_to_string(dir.path().join("caddy/matrix-media-repo.Caddyfile")).unwrap();
    let sites = caddyfile
        .lines()
        .filter(|l| l.starts_with("localhost:") && l.ends_with(" {"))
        .count();
    assert_eq!(sites, 1, "{caddyfile}");
    assert!(
        caddyfile.contains("path_regexp ^/_matrix/(federation|key)/"),
        "{caddyfile}"
    );
    drop(testkit::Caddy::start(&caddyfile, &[port]));
}
