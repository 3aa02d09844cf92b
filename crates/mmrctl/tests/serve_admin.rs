//! The admin API against a real Synapse: repo admins from `admins`, homeserver admins made through
//! Synapse's admin API and checked through it, uploaders, everyone else refused; quarantine by
//! content, by room (Synapse's room media listing), by user; purges that free disk exactly when
//! the last reference goes; usage, datastores, attributes; a transfer task that survives a restart.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{FILE_ID, MediaRepo, SHARED_SECRET, check_clean, encode, sample};
use testkit::Synapse;
use testkit::http::Response;

const HS: &str = "hs1.test";
const OTHER_HS: &str = "hs2.test";
const PREFIXES: [&str; 2] = [
    "/_matrix/media/unstable/admin",
    "/_matrix/media/unstable/io.t2bot.media/admin",
];

fn call(repo: &MediaRepo, method: &str, path: &str, token: &str, body: &[u8]) -> Response {
    let auth = format!("Bearer {token}");
    repo.send(
        method,
        path,
        &[("Host", HS), ("Authorization", &auth)],
        Some("application/json"),
        body,
    )
}

fn admin(repo: &MediaRepo, method: &str, path: &str, token: &str) -> Response {
    call(repo, method, &format!("{}{path}", PREFIXES[0]), token, b"")
}

fn forbidden(r: &Response) {
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (403, Some("M_FORBIDDEN")),
        "{}",
        r.text()
    );
}

fn ok(r: Response) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn status_of(repo: &MediaRepo, id: &str) -> u16 {
    repo.download(HS, id, &[]).status
}

/// A new room of `token`'s user with an `m.image` event for each of `media_ids` (ours): what
/// Synapse's room media listing then lists.
fn room_with_images(synapse: &Synapse, token: &str, media_ids: &[&str]) -> String {
    let room = synapse
        .post_json("/_matrix/client/v3/createRoom", &json!({}), Some(token))
        .json()["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for (i, id) in media_ids.iter().enumerate() {
        let event =
            json!({ "msgtype": "m.image", "body": "x.png", "url": format!("mxc://{HS}/{id}") });
        let sent = testkit::http::send(
            "PUT",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/send/m.room.message/t{i}",
                synapse.base_url(),
                encode(&room)
            ),
            &[("Authorization", &format!("Bearer {token}"))],
            Some("application/json"),
            event.to_string().as_bytes(),
        );
        assert_eq!(sent.status, 200, "{}", sent.text());
    }
    room
}

#[test]
fn admin_api_with_synapse_admins_quarantine_purge_usage() {
    let synapse = Synapse::start(HS);
    let (root, root_token) = synapse.register_user("root", false);
    let (_hsadmin, hs_admin) = synapse.register_user("hsadmin", true);
    let (alice, alice_token) = synapse.register_user("alice", false);
    let (_bob, bob_token) = synapse.register_user("bob", false);
    let repo = MediaRepo::start(&[(HS, &synapse.base_url())], |c| {
        c["admins"] = json!([root]);
        c["quarantine"] = json!({ "allowLocalAdmins": true });
    });

    // --- Quarantine holds for the content: two ids, one object; both blocked, and a re-upload.
    let shared = sample(100_000, 1);
    let a1 = repo.upload(HS, &alice_token, "image/png", Some("a.png"), &shared);
    let b1 = repo.upload(HS, &bob_token, "image/png", Some("b.png"), &shared);
    assert_eq!(repo.objects(), 1);
    forbidden(&admin(
        &repo,
        "POST",
        &format!("/quarantine/{HS}/{a1}"),
        &bob_token,
    ));
    assert_eq!(
        status_of(&repo, &a1),
        200,
        "a refused caller changed nothing"
    );
    let r = ok(admin(
        &repo,
        "POST",
        &format!("/quarantine/{HS}/{a1}"),
        &hs_admin,
    ));
    assert_eq!(r["num_quarantined"], 2, "{r}");
    assert_eq!((status_of(&repo, &a1), status_of(&repo, &b1)), (404, 404));
    let again = repo.upload_response(HS, &bob_token, "image/png", None, &shared);
    forbidden(&again);

    // --- A room's media through Synapse's room media listing (and Synapse's own alias path).
    let in_room = repo.upload(HS, &alice_token, "image/png", None, &sample(2_000, 2));
    let room = room_with_images(&synapse, &alice_token, &[&in_room]);
    let alias = format!(
        "/_matrix/client/v3/admin/quarantine_media/{}",
        encode(&room)
    );
    forbidden(&call(&repo, "POST", &alias, &alice_token, b""));
    let r = ok(call(&repo, "POST", &alias, &hs_admin, b""));
    assert_eq!(r["num_quarantined"], 1, "{r}");
    assert_eq!(status_of(&repo, &in_room), 404);

    // --- Unquarantine: served and accepted again.
    let r = ok(admin(
        &repo,
        "POST",
        &format!("/unquarantine/{HS}/{a1}"),
        &hs_admin,
    ));
    assert_eq!(r["num_unquarantined"], 2, "{r}");
    assert_eq!((status_of(&repo, &a1), status_of(&repo, &b1)), (200, 200));
    repo.upload(HS, &bob_token, "image/png", None, &shared);

    // --- Pinned media is never quarantined, and never purged.
    let pinned = repo.upload(HS, &alice_token, "text/plain", None, &sample(500, 9));
    let attributes = format!("/media/{HS}/{pinned}/attributes");
    forbidden(&call(
        &repo,
        "POST",
        &format!("{}{attributes}", PREFIXES[1]),
        &alice_token,
        br#"{"purpose":"pinned"}"#,
    ));
    let r = ok(call(
        &repo,
        "POST",
        &format!("{}{attributes}/set", PREFIXES[1]),
        &root_token,
        br#"{"purpose":"pinned"}"#,
    ));
    assert_eq!(r["purpose"], "pinned");
    assert_eq!(
        ok(admin(&repo, "GET", &attributes, &hs_admin))["purpose"],
        "pinned"
    );
    forbidden(&admin(
        &repo,
        "POST",
        &format!("/quarantine/{HS}/{pinned}"),
        &root_token,
    ));

    // --- Purges free disk exactly when the last reference goes.
    let twice = sample(50_000, 3);
    let e = repo.upload(HS, &alice_token, "image/png", None, &twice);
    let f = repo.upload(HS, &bob_token, "image/png", None, &twice);
    let own = repo.upload(HS, &alice_token, "image/png", None, &sample(30_000, 4));
    let twice_file = repo.object_path(&hex::encode(sha2_256(&twice)));
    forbidden(&admin(
        &repo,
        "POST",
        &format!("/purge/{HS}/{own}"),
        &bob_token,
    ));
    let r = ok(admin(
        &repo,
        "POST",
        &format!("/purge/{HS}/{e}"),
        &alice_token,
    ));
    assert_eq!(r["affected"], json!([format!("mxc://{HS}/{e}")]), "{r}");
    assert_eq!(r["objects_deleted"], 0, "bob's media still uses the bytes");
    assert!(twice_file.exists());
    assert_eq!(status_of(&repo, &f), 200);
    let r = ok(admin(&repo, "POST", &format!("/purge/{HS}/{f}"), &hs_admin));
    assert_eq!(r["objects_deleted"], 1, "{r}");
    assert!(
        !twice_file.exists(),
        "the last reference went: so did the file"
    );
    assert_eq!(status_of(&repo, &f), 404);

    // A user purge: repo admins, homeserver admins for their own users; pinned media stays.
    forbidden(&admin(
        &repo,
        "POST",
        &format!("/purge/user/{}", encode(&alice)),
        &bob_token,
    ));
    let r = ok(admin(
        &repo,
        "POST",
        &format!("/purge/user/{}", encode(&alice)),
        &hs_admin,
    ));
    let affected: Vec<&str> = r["affected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        affected.contains(&format!("mxc://{HS}/{own}").as_str()),
        "{r}"
    );
    assert!(
        !affected.contains(&format!("mxc://{HS}/{pinned}").as_str()),
        "{r}"
    );
    assert_eq!(status_of(&repo, &own), 404);
    assert_eq!(status_of(&repo, &pinned), 200);
    // Other servers' users are not a homeserver admin's business.
    forbidden(&admin(
        &repo,
        "POST",
        "/purge/user/%40x%3Aother.test",
        &hs_admin,
    ));
    forbidden(&admin(&repo, "POST", "/purge/server/other.test", &hs_admin));

    // Remote media purges and Synapse's purge_media_cache: repo admins only.
    forbidden(&admin(&repo, "POST", "/purge/remote", &hs_admin));
    assert_eq!(
        ok(admin(&repo, "POST", "/purge/remote", &root_token))["num_removed"],
        0
    );
    let cache = "/_matrix/client/v3/admin/purge_media_cache?before_ts=1";
    forbidden(&call(&repo, "POST", cache, &hs_admin, b""));
    assert_eq!(
        ok(call(&repo, "POST", cache, SHARED_SECRET, b""))["deleted"],
        0
    );

    // --- Quarantined purge: the content stays refused after its rows are gone.
    let bad = sample(10_000, 5);
    let bad_id = repo.upload(HS, &bob_token, "image/png", None, &bad);
    ok(admin(
        &repo,
        "POST",
        &format!("/quarantine/user/{}", encode("@bob:hs1.test")),
        &hs_admin,
    ));
    assert_eq!(status_of(&repo, &bad_id), 404);
    let r = ok(admin(&repo, "POST", "/purge/quarantined", &hs_admin));
    assert!(r["total"].as_u64().unwrap() >= 1, "{r}");
    forbidden(&repo.upload_response(HS, &alice_token, "image/png", None, &bad));

    // --- Usage, statistics, uploads, datastores: who may see them.
    let usage = admin(&repo, "GET", &format!("/usage/{HS}"), &hs_admin);
    forbidden(&usage);
    let usage = ok(admin(&repo, "GET", &format!("/usage/{HS}"), &root_token));
    let media_count = repo.count("SELECT COUNT(*) FROM media WHERE sha256 IS NOT NULL");
    assert_eq!(usage["raw_counts"]["media"], media_count, "{usage}");
    let users = ok(admin(
        &repo,
        "GET",
        &format!("/usage/{HS}/users?user_id={}", encode(&alice)),
        &root_token,
    ));
    assert_eq!(users.as_object().unwrap().len(), 1, "{users}");
    assert_eq!(
        users[&alice]["uploaded"],
        json!([format!("mxc://{HS}/{pinned}")]),
        "{users}"
    );
    let stats = ok(admin(
        &repo,
        "GET",
        &format!("/usage/{HS}/users-stats?order_by=media_count&dir=b"),
        &hs_admin,
    ));
    assert_eq!(stats["total"], 1, "only alice has media left: {stats}");
    assert_eq!(stats["users"][0]["user_id"], alice.as_str(), "{stats}");
    forbidden(&admin(
        &repo,
        "GET",
        &format!("/usage/{HS}/users-stats"),
        &alice_token,
    ));
    let uploads = ok(admin(
        &repo,
        "GET",
        &format!(
            "/usage/{HS}/uploads?mxc={}",
            encode(&format!("mxc://{HS}/{pinned}"))
        ),
        &root_token,
    ));
    assert_eq!(
        uploads[format!("mxc://{HS}/{pinned}")]["uploaded_by"],
        alice.as_str(),
        "{uploads}"
    );
    let stores = ok(admin(&repo, "GET", "/datastores", &root_token));
    assert_eq!(stores[FILE_ID]["type"], "file", "{stores}");
    forbidden(&admin(&repo, "GET", "/datastores", &hs_admin));
    let estimate = ok(admin(
        &repo,
        "GET",
        &format!("/datastores/{FILE_ID}/size_estimate"),
        &root_token,
    ));
    assert_eq!(
        estimate["total_hashes_affected"],
        repo.objects() as u64,
        "{estimate}"
    );

    // Every purge was a task, finished and visible.
    let tasks = ok(admin(&repo, "GET", "/tasks/all", &root_token));
    let tasks = tasks.as_array().unwrap();
    assert!(tasks.len() >= 6, "{tasks:?}");
    assert!(
        tasks
            .iter()
            .all(|t| t["is_finished"] == true && t["error_message"] == ""),
        "{tasks:?}"
    );
    assert_eq!(
        ok(admin(&repo, "GET", "/tasks/unfinished", &root_token)),
        json!([])
    );
    forbidden(&admin(&repo, "GET", "/tasks/all", &hs_admin));

    // `mmrctl admin` on the same API, with the config's shared secret or a given token.
    let cli = |args: &[&str]| {
        let out = mmrctl_on(&repo, "admin", args);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = cli(&["usage", HS, "--json"]);
    assert_eq!(code, Some(0));
    let cli_usage: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(cli_usage["raw_counts"]["media"], media_count, "{stdout}");
    let (code, _, stderr) = cli(&["--token", &alice_token, "tasks"]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("HTTP 403") && stderr.contains("M_FORBIDDEN"),
        "{stderr}"
    );
    let doomed = repo.upload(HS, &alice_token, "image/png", None, &sample(3_000, 6));
    let (code, stdout, stderr) = cli(&["purge", "media", &format!("mxc://{HS}/{doomed}")]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout.trim(),
        "1 media purged (0 thumbnails, 1 files deleted)"
    );
    assert_eq!(status_of(&repo, &doomed), 404);

    // The rest of what homeserver admins may do, and others may not.
    let room = encode(&room);
    for (path, allowed) in [
        (format!("/purge/room/{room}"), "purged"),
        (format!("/server/{HS}/export"), "export_id"),
        (format!("/quarantine/server/{HS}"), "num_quarantined"),
    ] {
        forbidden(&admin(&repo, "POST", &path, &bob_token));
        let r = ok(admin(&repo, "POST", &path, &hs_admin));
        assert!(r.get(allowed).is_some(), "{path}: {r}");
    }
    for (method, path) in [
        ("POST", format!("/purge/server/{HS}")),
        ("POST", format!("/unquarantine/{HS}/{pinned}")),
        ("POST", format!("/quarantine/user/{}", encode(&alice))),
        ("POST", "/purge/quarantined".to_owned()),
        ("GET", format!("/media/{HS}/{pinned}/attributes")),
        ("GET", format!("/usage/{HS}/users")),
        ("GET", format!("/usage/{HS}/uploads")),
    ] {
        forbidden(&admin(&repo, method, &path, &bob_token));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ok(admin(&repo, "GET", "/tasks/unfinished", &root_token)) != json!([]) {
        assert!(Instant::now() < deadline, "the export did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Exporting oneself needs archiving.selfService.
    forbidden(&admin(
        &repo,
        "POST",
        &format!("/user/{}/export", encode(&alice)),
        &alice_token,
    ));

    // Nothing points at a missing object, and nothing is left unreferenced.
    check_clean(&repo.config_path(), FILE_ID);
}

/// A task's row once it has finished (failing the test after 60 s).
fn finished_task(repo: &MediaRepo, task: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let t = ok(admin(repo, "GET", &format!("/tasks/{task}"), SHARED_SECRET));
        if t["is_finished"] == true {
            return t;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The second prefix, the native room endpoints, pinned media under room and user quarantines,
/// `allowLocalAdmins: false`, user exports by an admin and by the user (`selfService`), and the
/// `mmrctl admin` calls the first test does not make.
#[test]
fn room_user_and_export_operations_for_each_kind_of_caller() {
    let synapse = Synapse::start(HS);
    let (root, root_token) = synapse.register_user("root", false);
    let (root2, synapse_admin_root) = synapse.register_user("root2", true);
    let (_hsadmin, hs_admin) = synapse.register_user("hsadmin", true);
    let (alice, alice_token) = synapse.register_user("alice", false);
    let (_bob, bob_token) = synapse.register_user("bob", false);
    let repo = MediaRepo::start(&[(HS, &synapse.base_url())], |c| {
        c["admins"] = json!([root, root2]);
        c["quarantine"] = json!({ "allowLocalAdmins": false });
        c["archiving"] = json!({ "enabled": true, "selfService": true });
    });
    let at = |method: &str, path: &str, token: &str| {
        call(&repo, method, &format!("{}{path}", PREFIXES[1]), token, b"")
    };

    // A room with two of alice's media, one of them pinned (by the attributes endpoint MMR
    // registers, without `/set`; repo admins only).
    let plain = repo.upload(HS, &alice_token, "image/png", None, &sample(4_000, 61));
    let pinned = repo.upload(HS, &alice_token, "image/png", None, &sample(4_000, 62));
    let room = room_with_images(&synapse, &alice_token, &[&plain, &pinned]);
    let attributes = format!("{}/media/{HS}/{pinned}/attributes", PREFIXES[1]);
    let pin = br#"{"purpose":"pinned"}"#;
    forbidden(&call(
        &repo,
        "POST",
        &format!("{attributes}/set"),
        &alice_token,
        pin,
    ));
    assert_eq!(
        ok(call(&repo, "POST", &attributes, &root_token, pin))["purpose"],
        "pinned"
    );

    // allowLocalAdmins off: a homeserver admin may not quarantine, a repo admin may; the room's
    // media come from Synapse's listing with the caller's token, so a repo admin who is not
    // Synapse's is refused by Synapse. Pinned media stays served.
    let room_path = format!("/quarantine/room/{}", encode(&room));
    forbidden(&at("POST", &room_path, &hs_admin));
    forbidden(&at("POST", &room_path, &bob_token));
    forbidden(&at("POST", &room_path, &root_token));
    let root_token = synapse_admin_root.clone();
    forbidden(&call(
        &repo,
        "POST",
        &format!(
            "/_matrix/client/unstable/io.t2bot.media/admin/quarantine_media/{}",
            encode(&room)
        ),
        &hs_admin,
        b"",
    ));
    assert_eq!(status_of(&repo, &plain), 200);
    let r = ok(at("POST", &room_path, &root_token));
    assert_eq!(r["num_quarantined"], 1, "{r}");
    assert_eq!(
        (status_of(&repo, &plain), status_of(&repo, &pinned)),
        (404, 200)
    );
    ok(at(
        "POST",
        &format!("/unquarantine/{HS}/{plain}"),
        &root_token,
    ));
    let user_path = format!("/quarantine/user/{}", encode(&alice));
    forbidden(&at("POST", &user_path, &hs_admin));
    ok(at("POST", &user_path, &root_token));
    assert_eq!(
        (status_of(&repo, &plain), status_of(&repo, &pinned)),
        (404, 200)
    );
    ok(at(
        "POST",
        &format!("/unquarantine/{HS}/{plain}"),
        &root_token,
    ));

    // Purges stay open to homeserver admins: the room's media go, the pinned one stays.
    let purge_room = format!("/purge/room/{}", encode(&room));
    forbidden(&at("POST", &purge_room, &bob_token));
    let r = ok(at("POST", &purge_room, &hs_admin));
    assert_eq!(r["affected"], json!([format!("mxc://{HS}/{plain}")]), "{r}");
    assert_eq!(
        (status_of(&repo, &plain), status_of(&repo, &pinned)),
        (404, 200)
    );

    // A user's export: by a repo admin, and by the user (selfService); not by another user.
    let export = format!("/user/{}/export", encode(&alice));
    forbidden(&at("POST", &export, &bob_token));
    for token in [&root_token, &alice_token] {
        let r = ok(at("POST", &export, token));
        let t = finished_task(&repo, r["task_id"].as_i64().unwrap());
        assert_eq!(t["error_message"], "", "{t}");
        let meta = repo.get(
            &format!(
                "{}/export/{}/metadata",
                PREFIXES[0],
                r["export_id"].as_str().unwrap()
            ),
            &[("Host", HS)],
        );
        assert_eq!(meta.status, 200, "{}", meta.text());
        assert_eq!(meta.json()["entity"], alice.as_str(), "{}", meta.text());
    }

    // Every endpoint under the second prefix refuses an ordinary user (the first test and the
    // others answer them under the first).
    let room = encode(&room);
    let user = encode(&alice);
    for (method, path) in [
        ("POST", "/purge/remote".to_owned()),
        ("POST", "/purge_remote".to_owned()),
        ("POST", "/purge/old".to_owned()),
        ("POST", "/purge/quarantined".to_owned()),
        ("POST", format!("/purge/user/{user}")),
        ("POST", format!("/purge/room/{room}")),
        ("POST", format!("/purge/server/{HS}")),
        ("POST", format!("/purge/{HS}/{pinned}")),
        ("POST", format!("/quarantine/room/{room}")),
        ("POST", format!("/quarantine/user/{user}")),
        ("POST", format!("/quarantine/server/{HS}")),
        ("POST", format!("/quarantine/{HS}/{pinned}")),
        ("POST", format!("/unquarantine/{HS}/{plain}")),
        ("GET", "/datastores".to_owned()),
        ("GET", format!("/datastores/{FILE_ID}/size_estimate")),
        (
            "POST",
            format!("/datastores/{FILE_ID}/transfer_to/{FILE_ID}"),
        ),
        ("GET", format!("/federation/test/{HS}")),
        ("GET", format!("/usage/{HS}")),
        ("GET", format!("/usage/{HS}/users")),
        ("GET", format!("/usage/{HS}/users-stats")),
        ("GET", format!("/usage/{HS}/uploads")),
        ("GET", "/tasks/all".to_owned()),
        ("GET", "/tasks/unfinished".to_owned()),
        ("GET", "/tasks/1".to_owned()),
        ("GET", format!("/media/{HS}/{pinned}/attributes")),
        ("POST", format!("/media/{HS}/{pinned}/attributes")),
        ("POST", format!("/media/{HS}/{pinned}/attributes/set")),
        ("POST", format!("/user/{user}/export")),
        ("POST", format!("/server/{HS}/export")),
        ("POST", "/import".to_owned()),
        ("POST", "/import/x/part".to_owned()),
        ("POST", "/import/x/close".to_owned()),
    ] {
        let r = at(method, &path, &bob_token);
        assert_eq!(
            (r.status, r.json()["errcode"].as_str()),
            (403, Some("M_FORBIDDEN")),
            "{method} {path}: {}",
            r.text()
        );
    }

    // `mmrctl admin quarantine` and an allowed `tasks`, as a script would call them.
    let cli = |args: &[&str]| {
        let out = mmrctl_on(&repo, "admin", args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let other = repo.upload(HS, &bob_token, "image/png", None, &sample(3_000, 63));
    let out = cli(&[
        "--json",
        "quarantine",
        "media",
        &format!("mxc://{HS}/{other}"),
    ]);
    let answer: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(answer["num_quarantined"], 1, "{out}");
    assert_eq!(status_of(&repo, &other), 404);
    let tasks: Value = serde_json::from_str(&cli(&["--json", "tasks"])).unwrap();
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["task_name"] == "export_data" && t["is_finished"] == true),
        "{tasks}"
    );
    check_clean(&repo.config_path(), FILE_ID);
}

fn sha2_256(bytes: &[u8]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes).to_vec()
}

#[test]
fn a_transfer_task_shows_progress_and_survives_a_restart() {
    const SECOND: &str = "second-store";
    let db = testkit::TestDb::new();
    let url = db.url().to_owned();
    let mut first = MediaRepo::spawn_with_env(
        Some(db),
        &url,
        &[(HS, "http://127.0.0.1:9")],
        &[("MMRCTL_TEST_TASK_STEP_MS", "300")],
        |c| {
            let second = support::repo_dir(c).join("second");
            c["datastores"].as_array_mut().unwrap().push(
                json!({ "type": "file", "id": SECOND, "forKinds": [], "opts": { "path": second } }),
            );
        },
    );
    first.wait_healthy();
    let bodies: Vec<Vec<u8>> = (0..10)
        .map(|i| sample(20_000 + i, 100 + i as u64))
        .collect();
    let ids: Vec<String> = bodies
        .iter()
        .map(|b| first.upload(HS, SHARED_SECRET, "application/octet-stream", None, b))
        .collect();
    let r = ok(admin(
        &first,
        "POST",
        &format!("/datastores/{FILE_ID}/transfer_to/{SECOND}"),
        SHARED_SECRET,
    ));
    assert_eq!(r["media_affected"], 10, "{r}");
    let task = r["task_id"].as_i64().unwrap();
    let task_path = format!("/tasks/{task}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = ok(admin(&first, "GET", &task_path, SHARED_SECRET));
        assert_eq!(t["task_name"], "storage_migration", "{t}");
        assert_eq!(t["params"]["target_datastore_id"], SECOND, "{t}");
        if t["progress"]["moved"].as_u64().unwrap_or(0) >= 2 {
            assert_eq!(t["is_finished"], false, "{t}");
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {t}");
        std::thread::sleep(Duration::from_millis(100));
    }
    first.signal("KILL");
    let _ = first.wait_exit(Duration::from_secs(10));
    let second = MediaRepo::start_with_config_file(&first.config_path(), first.port, None, &[]);
    let done = finished_task(&second, task);
    assert_eq!(done["error_message"], "", "{done}");
    assert_eq!(done["progress"]["failed"], 0, "{done}");
    for (id, body) in ids.iter().zip(&bodies) {
        let r = second.download(HS, id, &[]);
        assert_eq!((r.status, &r.body), (200, body));
    }
    let in_first = first.count(&format!(
        "SELECT COUNT(*) FROM objects WHERE datastore_id = '{FILE_ID}'"
    ));
    assert_eq!(in_first, 0);
    for store in [FILE_ID, SECOND] {
        check_clean(&first.config_path(), store);
    }
}

#[test]
fn rate_limits_answer_429_per_client_and_stay_bounded_for_10000_addresses() {
    let synapse = Synapse::start(HS);
    let (root, root_token) = synapse.register_user("root", false);
    let (_bob, bob_token) = synapse.register_user("bob", false);
    let repo = MediaRepo::start(&[(HS, &synapse.base_url())], |c| {
        c["admins"] = json!([root]);
        c["accessTokens"]["appservices"] = json!([{ "id": "bridge", "asToken": "bridge-secret",
            "senderUserId": "@bridge:hs1.test", "userNamespaces": [{ "regex": "@bridge_.*" }] }]);
        c["repo"]["freezeUnauthenticatedMedia"] = json!(false);
        c["rateLimit"] = json!({
            "enabled": true, "requestsPerSecond": 1, "burst": 5,
            "buckets": { "downloads": {
                "capacityBytes": 300_000, "drainBytesPerMinute": 60_000, "overflowLimitBytes": 0 } },
        });
    });
    // The shared secret is not limited: it uploads as often as it likes.
    let body = sample(200_000, 7);
    let ids: Vec<String> = (0..8)
        .map(|i| {
            repo.upload(
                HS,
                SHARED_SECRET,
                "image/png",
                None,
                &sample(200 + i, i as u64),
            )
        })
        .collect();
    let big = repo.upload(HS, SHARED_SECRET, "image/png", None, &body);
    let from = |ip: &str, path: &str| repo.get(path, &[("Host", HS), ("X-Forwarded-For", ip)]);
    let download = |id: &str| format!("/_matrix/media/v3/download/{HS}/{id}");

    // A burst of 5, then 429 with when to come back; another client is served meanwhile.
    for id in &ids[..5] {
        assert_eq!(from("203.0.113.5", &download(id)).status, 200);
    }
    let r = from("203.0.113.5", &download(&ids[5]));
    assert_eq!(
        (r.status, r.json()["errcode"].as_str()),
        (429, Some("M_LIMIT_EXCEEDED")),
        "{}",
        r.text()
    );
    let wait = r.json()["retry_after_ms"].as_u64().unwrap();
    assert!((1..=1000).contains(&wait), "{wait}");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(from("203.0.113.6", &download(&ids[5])).status, 200);

    // Bytes: 200 kB fit the 300 kB bucket; the next 200 kB would overflow it, and must wait
    // until 100 kB drained at 1 kB/s.
    let r = from("203.0.113.7", &download(&big));
    assert_eq!((r.status, r.body.len()), (200, body.len()));
    let r = from("203.0.113.7", &download(&big));
    assert_eq!(r.status, 429, "{}", r.text());
    let wait = r.json()["retry_after_ms"].as_u64().unwrap();
    assert!((95_000..=100_000).contains(&wait), "{wait}");
    assert_eq!(from("203.0.113.8", &download(&big)).status, 200);

    // Repo admins (once the homeserver said who they are) and appservices are not limited;
    // an ordinary user from one address is.
    let as_token = |ip: &str, token: &str| {
        let auth = format!("Bearer {token}");
        repo.get(
            "/_matrix/client/v1/media/config",
            &[
                ("Host", HS),
                ("X-Forwarded-For", ip),
                ("Authorization", &auth),
            ],
        )
        .status
    };
    let statuses = |ip: &str, token: &str| (0..8).map(|_| as_token(ip, token)).collect::<Vec<_>>();
    assert_eq!(statuses("203.0.113.20", &root_token), [200; 8]);
    let bridge = statuses("203.0.113.21", "bridge-secret");
    assert!(bridge.iter().all(|s| *s != 429), "{bridge:?}");
    assert_eq!(
        statuses("203.0.113.22", &bob_token),
        [200, 200, 200, 200, 200, 429, 429, 429]
    );

    // 10,000 addresses, one request each: memory stays flat.
    let before = repo.peak_rss_kib();
    for i in 0..10_000u32 {
        let ip = format!("198.18.{}.{}", i / 256, i % 256);
        let r = from(&ip, "/_matrix/media/v3/config");
        assert_eq!(r.status, 401, "{}", r.text());
    }
    let grown = repo.peak_rss_kib().saturating_sub(before);
    assert!(
        grown < 16 * 1024,
        "peak RSS grew by {grown} KiB for 10,000 addresses"
    );
    // And the limits still hold, for a new client as for the first.
    let statuses: Vec<u16> = (0..6)
        .map(|_| from("203.0.113.99", &download(&ids[6])).status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429]);
}

#[test]
fn quarantined_media_is_replaced_as_configured() {
    let mut repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["quarantine"] = json!({ "replaceThumbnails": true, "replaceDownloads": true });
    });
    let id = repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(5_000, 11));
    ok(admin(
        &repo,
        "POST",
        &format!("/quarantine/{HS}/{id}"),
        SHARED_SECRET,
    ));
    let auth = format!("Bearer {SHARED_SECRET}");
    let thumb = |repo: &MediaRepo| {
        repo.get(
            &format!("/_matrix/client/v1/media/thumbnail/{HS}/{id}?width=64&height=48"),
            &[("Host", HS), ("Authorization", &auth)],
        )
    };
    // No thumbnailPath: a placeholder of the size asked, for thumbnails and downloads alike.
    let r = thumb(&repo);
    assert_eq!(
        (r.status, r.header("content-type")),
        (200, Some("image/png"))
    );
    let image = image::load_from_memory(&r.body).unwrap();
    assert_eq!((image.width(), image.height()), (64, 48));
    let r = repo.download(HS, &id, &[]);
    assert_eq!(r.status, 200);
    let image = image::load_from_memory(&r.body).unwrap();
    assert_eq!((image.width(), image.height()), (512, 512));

    // The operator's image, as it is; downloads not replaced: 404.
    let mut png = Vec::new();
    image::DynamicImage::new_rgb8(7, 5)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let path = repo.dir.path().join("quarantined.png");
    std::fs::write(&path, &png).unwrap();
    repo.rewrite_config(|c| {
        c["quarantine"] =
            json!({ "replaceThumbnails": true, "replaceDownloads": false, "thumbnailPath": path });
    });
    repo.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while thumb(&repo).body != png {
        assert!(
            Instant::now() < deadline,
            "thumbnailPath not served after reload"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(repo.download(HS, &id, &[]).status, 404);
}

/// The entries of a tar.gz part: name to bytes.
fn entries(part: &[u8]) -> std::collections::BTreeMap<String, Vec<u8>> {
    use std::io::Read as _;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(part));
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            e.read_to_end(&mut bytes).unwrap();
            (name, bytes)
        })
        .collect()
}

/// A tar.gz of `files`, as matrix-media-repo writes its parts.
fn tgz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for (name, bytes) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, name, *bytes).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// `mmrctl COMMAND --config <the repo's config> ARGS...`.
fn mmrctl_on(repo: &MediaRepo, command: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args([command, "--config"])
        .arg(repo.config_path())
        .args(args)
        .output()
        .unwrap()
}

fn mmrctl_archive(repo: &MediaRepo, args: &[&str]) -> (Option<i32>, String) {
    let out = mmrctl_on(repo, "archive", args);
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn gdpr_exports_in_parts_import_back_byte_identical_and_mmr_archives_import() {
    let archiving =
        |c: &mut Value| c["archiving"] = json!({ "enabled": true, "targetBytesPerPart": 150_000 });
    let mut repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], archiving);
    let bodies: Vec<Vec<u8>> = (0..3).map(|i| sample(100_000, 40 + i)).collect();
    let ids: Vec<String> = bodies
        .iter()
        .enumerate()
        .map(|(i, b)| {
            repo.upload(
                HS,
                SHARED_SECRET,
                "image/png",
                Some(&format!("pic {i}.png")),
                b,
            )
        })
        .collect();

    // Exported by a task; listed in parts of about targetBytesPerPart, the manifest last.
    let r = ok(admin(
        &repo,
        "POST",
        &format!("/server/{HS}/export"),
        SHARED_SECRET,
    ));
    let (export_id, task) = (
        r["export_id"].as_str().unwrap().to_owned(),
        r["task_id"].as_i64().unwrap(),
    );
    let t = finished_task(&repo, task);
    assert_eq!(
        (t["task_name"].as_str(), t["error_message"].as_str()),
        (Some("export_data"), Some("")),
        "{t}"
    );
    // The export id is the secret: no token needed.
    let anonymous = |path: &str| {
        repo.get(
            &format!("{}/export/{export_id}{path}", PREFIXES[1]),
            &[("Host", HS)],
        )
    };
    let meta = anonymous("/metadata");
    assert_eq!(meta.status, 200, "{}", meta.text());
    let meta = meta.json();
    assert_eq!(meta["entity"], HS);
    let names: Vec<&str> = meta["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "export-part-1.tgz",
            "export-part-2.tgz",
            "export-manifest.tgz"
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    let mut all = std::collections::BTreeMap::new();
    for p in meta["parts"].as_array().unwrap() {
        let r = anonymous(&format!("/part/{}", p["index"]));
        assert_eq!(
            (r.status, r.body.len() as u64),
            (200, p["size"].as_u64().unwrap())
        );
        let path = dir.path().join(p["name"].as_str().unwrap());
        std::fs::write(&path, &r.body).unwrap();
        files.push(path);
        all.extend(entries(&r.body));
    }
    let manifest: Value = serde_json::from_slice(&all["manifest.json"]).unwrap();
    assert_eq!(
        (manifest["version"].as_i64(), manifest["entity_id"].as_str()),
        (Some(2), Some(HS))
    );
    for (id, body) in ids.iter().zip(&bodies) {
        let record = &manifest["media"][format!("mxc://{HS}/{id}")];
        let file = record["file_name"].as_str().unwrap();
        assert_eq!(file, format!("{HS}__{id}.png"));
        assert_eq!(&all[file], body);
        assert_eq!(record["sha256"], hex::encode(sha2_256(body)));
        assert_eq!(record["content_type"], "image/png");
    }
    assert!(String::from_utf8_lossy(&all["index.html"]).contains("pic 0.png"));
    let view = anonymous("/view");
    assert!(
        view.text().contains("export-manifest.tgz"),
        "{}",
        view.text()
    );

    // Imported into another repo byte-identical; a second run finds everything there.
    let other = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], archiving);
    let paths: Vec<&str> = files.iter().map(|p| p.to_str().unwrap()).collect();
    let mut import = vec!["import"];
    import.extend(paths.iter().rev());
    let (code, out) = mmrctl_archive(&other, &import);
    assert_eq!(
        (code, out.trim()),
        (
            Some(0),
            format!(
                "import of {HS}: 3 imported, 0 already here, 0 missing from the parts, 0 failed"
            )
            .as_str()
        )
    );
    for (id, body) in ids.iter().zip(&bodies) {
        let r = other.download(HS, id, &[]);
        assert_eq!((r.status, &r.body), (200, body));
        assert_eq!(r.header("content-type"), Some("image/png"));
    }
    let (_, out) = mmrctl_archive(&other, &import);
    assert!(out.contains("0 imported, 3 already here"), "{out}");

    // An archive as matrix-media-repo writes it: a media part, then the manifest part. A record
    // whose bytes do not match its hash is refused; one with no file is reported missing.
    let (good, bad) = (sample(5_000, 50), sample(6_000, 51));
    let record = |id: &str, file: &str, sha: &str, size: usize| {
        json!({
        "name": format!("{id}.bin"), "file_name": file, "size_bytes": size, "content_type": "application/pdf",
        "s3_url": "", "sha256": sha, "origin": "remote.example", "media_id": id,
        "created_ts": 1_600_000_000_000i64, "uploader": "@carol:remote.example" })
    };
    let mmr_manifest = json!({ "version": 2, "entity_id": "@carol:remote.example", "created_ts": 1, "media": {
        "mxc://remote.example/good": record("good", "remote.example__good.pdf", &hex::encode(sha2_256(&good)), good.len()),
        "mxc://remote.example/bad": record("bad", "remote.example__bad.pdf", &hex::encode(sha2_256(&good)), bad.len()),
        "mxc://remote.example/gone": record("gone", "remote.example__gone.pdf", &hex::encode(sha2_256(&good)), good.len()),
    }});
    let part1 = dir.path().join("mmr-export-part-1.tgz");
    std::fs::write(
        &part1,
        tgz(&[
            ("remote.example__good.pdf", &good),
            ("remote.example__bad.pdf", &bad),
        ]),
    )
    .unwrap();
    let part2 = dir.path().join("mmr-export-manifest.tgz");
    std::fs::write(
        &part2,
        tgz(&[
            ("manifest.json", mmr_manifest.to_string().as_bytes()),
            ("index.html", b"<html></html>"),
        ]),
    )
    .unwrap();
    // Through the admin API: parts as they come; what the manifest lists is imported once it
    // is there, and the task ends once closed (a listed file never came).
    let import_path = |rest: &str| format!("{}/import{rest}", PREFIXES[0]);
    let r = ok(call(
        &other,
        "POST",
        &import_path(""),
        SHARED_SECRET,
        &std::fs::read(&part1).unwrap(),
    ));
    let (import_id, task) = (
        r["import_id"].as_str().unwrap().to_owned(),
        r["task_id"].as_i64().unwrap(),
    );
    let task_state = || {
        ok(admin(
            &other,
            "GET",
            &format!("/tasks/{task}"),
            SHARED_SECRET,
        ))
    };
    assert_eq!(task_state()["is_finished"], false);
    ok(call(
        &other,
        "POST",
        &import_path(&format!("/{import_id}/part")),
        SHARED_SECRET,
        &std::fs::read(&part2).unwrap(),
    ));
    let served = |repo: &MediaRepo| {
        repo.get(
            "/_matrix/client/v1/media/download/remote.example/good",
            &[
                ("Host", HS),
                ("Authorization", &format!("Bearer {SHARED_SECRET}")),
            ],
        )
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let waiting = loop {
        let t = task_state();
        if t["progress"]["missing"].is_array() {
            break t;
        }
        assert!(Instant::now() < deadline, "{t}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(served(&other).body, good, "imported while the import waits");
    assert_eq!(waiting["is_finished"], false, "{waiting}");
    assert_eq!(
        waiting["progress"]["missing"],
        json!(["mxc://remote.example/gone"]),
        "{waiting}"
    );
    ok(call(
        &other,
        "POST",
        &import_path(&format!("/{import_id}/close")),
        SHARED_SECRET,
        b"",
    ));
    let done = finished_task(&other, task);
    assert_eq!(
        (done["task_name"].as_str(), done["error_message"].as_str()),
        (Some("import_data"), Some("")),
        "{done}"
    );
    assert_eq!(
        done["progress"]["failed"][0][0], "mxc://remote.example/bad",
        "{done}"
    );
    assert_eq!(
        other.count("SELECT COUNT(*) FROM import_parts"),
        0,
        "a finished import's parts go"
    );

    // And on the command line, into a third repo.
    let third = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], archiving);
    let (code, out) = mmrctl_archive(
        &third,
        &["import", part1.to_str().unwrap(), part2.to_str().unwrap()],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("1 imported, 0 already here, 1 missing from the parts, 1 failed"),
        "{out}"
    );
    assert!(
        out.contains("missing: mxc://remote.example/gone")
            && out.contains("failed: mxc://remote.example/bad"),
        "{out}"
    );
    // Imported as remote media, served from the cache to our users.
    let r = served(&third);
    assert_eq!((r.status, &r.body), (200, &good));
    assert_eq!(third.count("SELECT COUNT(*) FROM media WHERE origin = 'remote.example' AND kind = 'remote_media' AND user_id = '@carol:remote.example'"), 1);

    // The command line exports too, and lists; deleting an export frees its parts.
    let out_dir = dir.path().join("cli");
    let (code, out) = mmrctl_archive(&repo, &["export", HS, "--out", out_dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("3 media, 300000 bytes, 3 parts"), "{out}");
    assert!(out_dir.join("export-manifest.tgz").exists());
    let (_, list) = mmrctl_archive(&repo, &["list"]);
    assert_eq!(list.lines().count(), 2, "{list}");
    let r = call(
        &repo,
        "DELETE",
        &format!("{}/export/{export_id}", PREFIXES[0]),
        "",
        b"",
    );
    assert_eq!((r.status, r.json()), (200, json!({})));
    assert_eq!(anonymous("/metadata").status, 404);
    let (_, list) = mmrctl_archive(&repo, &["list"]);
    assert_eq!(list.lines().count(), 1, "{list}");
    check_clean(&repo.config_path(), FILE_ID);

    // Exports expire after a week: the job, which runs at start, deletes the older one with its
    // parts' objects.
    repo.execute("UPDATE exports SET created_ts = 1000");
    let parts = repo.count("SELECT COUNT(*) FROM export_parts");
    assert!(parts >= 1);
    let objects = repo.objects();
    let config = repo.config_path();
    repo.stop();
    let repo = MediaRepo::start_with_config_file(&config, repo.port, repo.db.take(), &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while repo.count("SELECT COUNT(*) FROM exports") > 0 {
        assert!(Instant::now() < deadline, "{}", repo.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(repo.count("SELECT COUNT(*) FROM export_parts"), 0);
    assert!(repo.objects() < objects, "the parts' files went");
    check_clean(&config, FILE_ID);
}

#[test]
fn purge_old_goes_by_last_access_and_repo_admin_endpoints_refuse_other_users() {
    const BOT: &str = "appservice-token";
    let mut repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["accessTokens"]["useLocalAppserviceConfig"] = json!(true);
        c["accessTokens"]["appservices"] = json!([{ "id": "bridge", "asToken": BOT,
            "senderUserId": "@bot:hs1.test", "userNamespaces": [] }]);
    });
    let used = repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(1_000, 60));
    let unused = repo.upload(HS, SHARED_SECRET, "image/png", None, &sample(1_000, 61));
    repo.execute("UPDATE media SET created_ts = 1000");
    assert_eq!(repo.download(HS, &used, &[]).status, 200);
    // Access times are written a minute late at most, and when the server stops.
    repo.stop();
    assert_eq!(
        repo.count("SELECT COUNT(*) FROM media WHERE last_access_ts IS NOT NULL"),
        1
    );
    let repo =
        MediaRepo::start_with_config_file(&repo.config_path(), repo.port, repo.db.take(), &[]);
    let hour_ago = store_now_ms() - 3_600_000;
    let r = ok(admin(
        &repo,
        "POST",
        &format!("/purge/old?before_ts={hour_ago}&include_local=true"),
        SHARED_SECRET,
    ));
    assert_eq!(
        r["affected"],
        json!([format!("mxc://{HS}/{unused}")]),
        "{r}"
    );
    assert_eq!(repo.download(HS, &used, &[]).status, 200);

    // Every endpoint for repo admins only: an appservice's user is refused, the shared secret
    // is answered.
    let ds = format!("/datastores/{FILE_ID}");
    let refused_only = [
        ("POST", format!("{ds}/transfer_to/elsewhere")),
        ("POST", "/import".to_owned()),
        ("POST", "/import/x/part".to_owned()),
        ("POST", "/import/x/close".to_owned()),
    ];
    let both = [
        ("POST", "/purge/remote".to_owned()),
        ("POST", "/purge_remote".to_owned()),
        ("POST", format!("/purge/old?before_ts={hour_ago}")),
        ("GET", "/datastores".to_owned()),
        ("GET", format!("{ds}/size_estimate")),
        ("GET", "/federation/test/127.0.0.1:9".to_owned()),
        ("GET", format!("/usage/{HS}")),
        ("GET", format!("/usage/{HS}/users")),
        ("GET", format!("/usage/{HS}/uploads")),
        ("GET", "/tasks/all".to_owned()),
        ("GET", "/tasks/unfinished".to_owned()),
        ("GET", "/tasks/1".to_owned()),
    ];
    for (method, path) in refused_only.iter().chain(&both) {
        for prefix in PREFIXES {
            let r = call(&repo, method, &format!("{prefix}{path}"), BOT, b"");
            forbidden(&r);
        }
    }
    for (method, path) in &both {
        ok(admin(&repo, method, path, SHARED_SECRET));
    }
    let cache = "/_matrix/client/r0/admin/purge_media_cache?before_ts=1";
    forbidden(&call(&repo, "POST", cache, BOT, b""));
    assert_eq!(
        ok(call(&repo, "POST", cache, SHARED_SECRET, b""))["deleted"],
        0
    );
    // Federation reaches only where the filter allows: loopback is refused by default.
    let test = ok(admin(
        &repo,
        "GET",
        "/federation/test/127.0.0.1:9",
        SHARED_SECRET,
    ));
    assert_eq!(test["can_reach"], false, "{test}");
}

fn store_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn a_purge_killed_midway_resumes_after_restart_and_ends_consistent() {
    let db = testkit::TestDb::new();
    let url = db.url().to_owned();
    let mut first = MediaRepo::spawn_with_env(
        Some(db),
        &url,
        &[(HS, "http://127.0.0.1:9"), (OTHER_HS, "http://127.0.0.1:9")],
        &[("MMRCTL_TEST_TASK_STEP_MS", "300")],
        |_| {},
    );
    first.wait_healthy();
    // Ten contents, one shared with media that stays (another server's).
    let shared = sample(4_000, 70);
    for i in 0..9 {
        first.upload(
            HS,
            SHARED_SECRET,
            "image/png",
            None,
            &sample(4_000 + i, 71 + i as u64),
        );
    }
    first.upload(HS, SHARED_SECRET, "image/png", None, &shared);
    let kept = first.upload(OTHER_HS, SHARED_SECRET, "image/png", None, &shared);
    let url = first.url(&format!("{}/purge/server/{HS}", PREFIXES[0]));
    let purge = std::thread::spawn(move || {
        testkit::http::send(
            "POST",
            &url,
            &[
                ("Host", HS),
                ("Authorization", &format!("Bearer {SHARED_SECRET}")),
            ],
            None,
            b"",
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while first.count(&format!("SELECT COUNT(*) FROM media WHERE origin = '{HS}'")) > 7 {
        assert!(Instant::now() < deadline, "the purge did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.signal("KILL");
    let _ = first.wait_exit(Duration::from_secs(10));
    let _ = purge.join();
    assert!(
        first.count(&format!("SELECT COUNT(*) FROM media WHERE origin = '{HS}'")) > 0,
        "stopped midway"
    );
    assert_eq!(
        first.count("SELECT COUNT(*) FROM background_tasks WHERE end_ts = 0"),
        1
    );

    let second = MediaRepo::start_with_config_file(&first.config_path(), first.port, None, &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while first.count("SELECT COUNT(*) FROM background_tasks WHERE end_ts = 0") > 0 {
        assert!(Instant::now() < deadline, "the purge was not resumed");
        std::thread::sleep(Duration::from_millis(100));
    }
    let task = ok(admin(&second, "GET", "/tasks/all", SHARED_SECRET))[0].clone();
    assert_eq!(
        (task["task_name"].as_str(), task["error_message"].as_str()),
        (Some("purge"), Some("")),
        "{task}"
    );
    // The resumed run adds to what the first recorded (up to a second before it died).
    let counted = task["progress"]["media"].as_u64().unwrap();
    assert!((7..=10).contains(&counted), "{task}");
    assert_eq!(
        first.count(&format!("SELECT COUNT(*) FROM media WHERE origin = '{HS}'")),
        0
    );
    let r = second.download(OTHER_HS, &kept, &[]);
    assert_eq!(
        (r.status, &r.body),
        (200, &shared),
        "the shared content stays for the other server"
    );
    assert_eq!(first.count("SELECT COUNT(*) FROM objects"), 1);
    check_clean(&first.config_path(), FILE_ID);
}
