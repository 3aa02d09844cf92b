//! The rendered Traefik routers send exactly the media repo's paths to it: checked by evaluating each
//! router's rule (a small interpreter of Traefik v3's rule language) against request paths.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use provision::webserver::Rule;
use provision::{Route, VarsInput};

const VARS: &str = "\
matrix_domain: example.com
matrix_homeserver_generic_secret_key: s3cr3t
matrix_media_repo_enabled: true
matrix_media_repo_datastore_file_id: abc
matrix_media_repo_metrics_enabled: true
matrix_metrics_exposure_enabled: true
";

fn routes() -> Vec<Route> {
    let input = VarsInput::Text {
        name: "vars.yml".into(),
        text: VARS.into(),
    };
    let (_, rendered) = provision::render(&[input], Some(tempfile::tempdir().unwrap().path()))
        .unwrap_or_else(|d| panic!("{:?}", d.errors));
    rendered.settings.routes.routes
}

/// The router Traefik would pick on an entrypoint: explicit priority first, else the longest rule.
fn route<'a>(routes: &'a [Route], entrypoint: &str, host: &str, path: &str) -> Option<&'a str> {
    routes
        .iter()
        .filter(|r| r.entrypoints.iter().any(|e| e == entrypoint))
        .filter(|r| Rule::parse(&r.rule).unwrap().matches(host, path))
        .max_by_key(|r| {
            if r.priority > 0 {
                r.priority
            } else {
                r.rule.len() as i64
            }
        })
        .map(|r| r.name.as_str())
}

const HOST: &str = "matrix.example.com";

#[test]
fn client_media_paths_reach_the_media_repo() {
    let routes = routes();
    for path in [
        "/_matrix/media/v3/upload",
        "/_matrix/media/r0/upload",
        "/_matrix/media/v1/create",
        "/_matrix/media/v3/download/example.com/abcDEF123",
        "/_matrix/media/v3/thumbnail/example.com/abc",
        "/_matrix/media/v3/config",
        "/_matrix/media/v3/preview_url",
    ] {
        assert_eq!(
            route(&routes, "web-secure", HOST, path),
            Some("matrix-media-repo-public-media"),
            "{path}"
        );
    }
    for path in [
        "/_matrix/client/v1/media/download/example.com/abc",
        "/_matrix/client/v1/media/download/example.com/abc/file.png",
        "/_matrix/client/v1/media/thumbnail/example.com/abc",
        "/_matrix/client/v1/media/config",
        "/_matrix/client/v1/media/preview_url",
    ] {
        assert_eq!(
            route(&routes, "web-secure", HOST, path),
            Some("matrix-media-repo-public-client-matrix-client-media"),
            "{path}"
        );
    }
}

#[test]
fn logout_and_admin_paths_reach_the_media_repo() {
    let routes = routes();
    for path in [
        "/_matrix/client/v3/logout",
        "/_matrix/client/v3/logout/all",
        "/_matrix/client/r0/logout",
    ] {
        assert_eq!(
            route(&routes, "web-secure", HOST, path),
            Some("matrix-media-repo-public-logout"),
            "{path}"
        );
    }
    for path in [
        "/_matrix/client/v3/admin/purge_media_cache",
        "/_matrix/client/v1/admin/quarantine_media/abc",
    ] {
        assert_eq!(
            route(&routes, "web-secure", HOST, path),
            Some("matrix-media-repo-public-admin"),
            "{path}"
        );
    }
    assert_eq!(
        route(
            &routes,
            "web-secure",
            HOST,
            "/_matrix/client/unstable/io.t2bot.media/usage"
        ),
        Some("matrix-media-repo-public-t2bot")
    );
}

#[test]
fn other_client_paths_stay_with_the_homeserver() {
    let routes = routes();
    for path in [
        "/_matrix/client/v3/sync",
        "/_matrix/client/v3/login",
        "/_matrix/client/v3/logout_not",
        "/_matrix/client/v3/rooms/!a:example.com/send/m.room.message/1",
        "/_matrix/client/v3/media/download/example.com/abc",
        "/_matrix/client/v1/mediax",
        "/_matrix/client/v3/admin/purge_media_cache_now",
        "/_matrix/mediafoo",
        "/foo/_matrix/client/v1/media/config",
        "/_matrix/key/v2/server",
        "/_synapse/admin/v1/media/example.com",
    ] {
        assert_eq!(
            route(&routes, "web-secure", HOST, path),
            None,
            "{path} must not reach the media repo"
        );
    }
    // Public routers answer only for the homeserver's host.
    assert_eq!(
        route(
            &routes,
            "web-secure",
            "other.example.org",
            "/_matrix/media/v3/upload"
        ),
        None
    );
}

#[test]
fn federation_media_paths_reach_the_media_repo() {
    let routes = routes();
    for path in [
        "/_matrix/federation/v1/media/download/abc",
        "/_matrix/federation/v1/media/thumbnail/abc",
    ] {
        assert_eq!(
            route(&routes, "matrix-federation", HOST, path),
            Some("matrix-media-repo-public-federation-matrix-federation-media"),
            "{path}"
        );
    }
    assert_eq!(
        route(
            &routes,
            "matrix-federation",
            HOST,
            "/_matrix/media/v3/download/example.com/abc"
        ),
        Some("matrix-media-repo-public-media-federation")
    );
    for path in [
        "/_matrix/federation/v1/send/123",
        "/_matrix/key/v2/server",
        "/_matrix/federation/v1/version",
    ] {
        assert_eq!(
            route(&routes, "matrix-federation", HOST, path),
            None,
            "{path}"
        );
    }
}

#[test]
fn the_internal_entrypoint_serves_media_for_any_host() {
    let routes = routes();
    let internal = "matrix-internal-matrix-client-api";
    assert_eq!(
        route(
            &routes,
            internal,
            "matrix-traefik",
            "/_matrix/client/v1/media/download/example.com/abc"
        ),
        Some("matrix-media-repo-internal-matrix-client-media")
    );
    assert_eq!(
        route(&routes, internal, "anything", "/_matrix/media/v3/upload"),
        Some("matrix-media-repo-internal-media")
    );
    assert_eq!(
        route(&routes, internal, "anything", "/_matrix/client/v3/sync"),
        None
    );
}

#[test]
fn metrics_are_exposed_only_under_their_path() {
    let routes = routes();
    assert_eq!(
        route(&routes, "web-secure", HOST, "/metrics/matrix-media-repo"),
        Some("matrix-media-repo-metrics")
    );
    let metrics = routes
        .iter()
        .find(|r| r.name == "matrix-media-repo-metrics")
        .unwrap();
    assert_eq!(metrics.service, "matrix-media-repo-metrics");
    assert!(
        metrics
            .middlewares
            .iter()
            .all(|m| !m.contains("add-headers"))
    );
    // Every other router sets the homeserver name for the media repo's Host matching.
    for r in routes
        .iter()
        .filter(|r| r.name != "matrix-media-repo-metrics")
    {
        assert_eq!(
            r.middlewares,
            ["matrix-media-repo-add-headers"],
            "{}",
            r.name
        );
    }
}

#[test]
fn logout_routers_exist_only_with_the_token_cache() {
    let input = VarsInput::Text {
        name: "vars.yml".into(),
        text: format!("{VARS}matrix_media_repo_access_tokens_max_cache_time_seconds: 0\n"),
    };
    let (_, rendered) = provision::render(&[input], Some(tempfile::tempdir().unwrap().path()))
        .unwrap_or_else(|d| panic!("{:?}", d.errors));
    let names: Vec<&str> = rendered
        .settings
        .routes
        .routes
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert!(!names.iter().any(|n| n.contains("logout")), "{names:?}");
    assert!(names.contains(&"matrix-media-repo-public-media"));
}
