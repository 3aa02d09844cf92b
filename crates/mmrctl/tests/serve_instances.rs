//! Several `mmrctl serve` instances on one database and one datastore: what one instance learns
//! (a logout) holds on the others, what they do at once (identical uploads) stays one object, and
//! a client's rate limit is one for all of them (in Postgres, or in Redis when configured).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{MediaRepo, SHARED_SECRET, sample};
use testkit::{RedisServer, Synapse};

const HS: &str = "hs1.test";

fn config_status(repo: &MediaRepo, token: &str) -> u16 {
    repo.get(
        "/_matrix/client/v1/media/config",
        &[("Host", HS), ("Authorization", &format!("Bearer {token}"))],
    )
    .status
}

fn logout(repo: &MediaRepo, token: &str, all: bool) {
    let path = if all {
        "/_matrix/client/v3/logout/all"
    } else {
        "/_matrix/client/v3/logout"
    };
    let r = repo.send(
        "POST",
        path,
        &[("Host", HS), ("Authorization", &format!("Bearer {token}"))],
        Some("application/json"),
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Waits (at most a second after the logout) until every token is refused by every repo.
fn refused_everywhere_within_a_second(repos: &[&MediaRepo], tokens: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let statuses: Vec<u16> = repos
            .iter()
            .flat_map(|r| tokens.iter().map(|t| config_status(r, t)))
            .collect();
        if statuses.iter().all(|s| *s == 401) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still accepted a second after the logout: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_logout_on_one_instance_ends_the_token_on_the_others_within_a_second() {
    let synapse = Synapse::start(HS);
    let (_, alice) = synapse.register_user("alice", false);
    let (_, bob) = synapse.register_user("bob", false);
    let login = synapse.post_json(
        "/_matrix/client/v3/login",
        &json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "bob" },
                 "password": Synapse::password_of("bob") }),
        None,
    );
    let bob_again = login.json()["access_token"].as_str().unwrap().to_owned();
    let repos = MediaRepo::start_many(3, &[(HS, &synapse.base_url())]);
    // Every instance has cached every token (accessTokens.maxCacheTimeSeconds is 600).
    for repo in &repos {
        for token in [&alice, &bob, &bob_again] {
            assert_eq!(config_status(repo, token), 200);
        }
    }
    let (a, b, c) = (&repos[0], &repos[1], &repos[2]);

    logout(a, &alice, false);
    refused_everywhere_within_a_second(&[b, c], &[&alice]);
    // Bob's tokens are untouched, on every instance.
    assert_eq!(config_status(c, &bob), 200);

    // `/logout/all` on another instance ends both of bob's.
    logout(b, &bob, true);
    refused_everywhere_within_a_second(&[a, c], &[&bob, &bob_again]);
}

#[test]
fn identical_uploads_spread_over_three_instances_make_one_object() {
    let repos = MediaRepo::start_many(3, &[(HS, "http://127.0.0.1:9")]);
    twenty_identical_uploads(&repos, &sample(1024 * 1024, 9));
    assert_eq!(repos[0].objects(), 1);
    assert_eq!(repos[0].media_rows(), 20);
}

/// 20 uploads of `body` at once, spread over `repos`; each downloaded again through another
/// instance.
fn twenty_identical_uploads(repos: &[MediaRepo], body: &[u8]) {
    let ids: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let repo = &repos[i % repos.len()];
                s.spawn(move || repo.upload(HS, SHARED_SECRET, "image/png", None, body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, id) in ids.iter().enumerate() {
        let r = repos[(i + 1) % repos.len()].download(HS, id, &[]);
        assert_eq!((r.status, r.body.len()), (200, body.len()));
        assert!(r.body == body);
    }
}

/// Three instances limiting every client to a burst of 6 requests (and next to no refill),
/// sharing through `redis` when given.
fn rate_limited_instances(redis: Option<&RedisServer>) -> Vec<MediaRepo> {
    let redis = redis.map(|r| r.addr());
    MediaRepo::start_many_with(3, &[(HS, "http://127.0.0.1:9")], |c| {
        c["rateLimit"] = json!({ "enabled": true, "requestsPerSecond": 0.001, "burst": 6 });
        if let Some(addr) = &redis {
            c["redis"] = json!({ "enabled": true, "databaseNumber": 0,
                                 "shards": [{ "name": "only", "addr": addr }] });
        }
    })
}

/// One request without a token: 401 while under the limit, 429 over it.
fn status(repo: &MediaRepo) -> u16 {
    let r = repo.get("/_matrix/client/v1/media/config", &[("Host", HS)]);
    if r.status == 429 {
        assert!(
            r.json()["retry_after_ms"].as_u64().unwrap() > 0,
            "{}",
            r.text()
        );
    }
    r.status
}

/// Six requests spread over the instances pass; then every instance refuses the client.
fn one_limit_for_all(repos: &[MediaRepo]) {
    let first: Vec<u16> = (0..6).map(|i| status(&repos[i % 3])).collect();
    assert_eq!(first, [401; 6]);
    let then: Vec<u16> = repos.iter().map(status).collect();
    assert_eq!(then, [429; 3], "the burst is spent on every instance");
}

#[test]
fn a_rate_limit_is_shared_by_the_instances_through_postgres() {
    let repos = rate_limited_instances(None);
    one_limit_for_all(&repos);
    assert!(repos[0].count("SELECT COUNT(*) FROM shared_buckets") >= 1);
}

#[test]
fn a_rate_limit_is_shared_through_redis_and_per_instance_while_redis_is_down() {
    let mut redis = RedisServer::start();
    let repos = rate_limited_instances(Some(&redis));
    one_limit_for_all(&repos);
    assert!(redis.keys() >= 1, "the bucket is in Redis");
    assert_eq!(repos[0].count("SELECT COUNT(*) FROM shared_buckets"), 0);

    // Redis gone: nothing fails, each instance limits by itself (a burst of 6 each).
    redis.stop();
    for repo in &repos {
        let statuses: Vec<u16> = (0..7).map(|_| status(repo)).collect();
        assert_eq!(
            statuses,
            [401, 401, 401, 401, 401, 401, 429],
            "{}",
            repo.log()
        );
    }

    // Back (empty): once an instance reaches it again, the shared bucket decides once more,
    // although every instance's own bucket is spent.
    redis.start_again();
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.keys() == 0 {
        assert!(Instant::now() < deadline, "no instance went back to Redis");
        for repo in &repos {
            status(repo);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // A fresh shared bucket: each instance's requests pass again as soon as it asks Redis (its
    // own bucket answers 429 meanwhile, charging nothing shared).
    redis.command(&["FLUSHALL"]);
    for repo in &repos {
        let deadline = Instant::now() + Duration::from_secs(5);
        while status(repo) != 401 {
            assert!(
                Instant::now() < deadline,
                "not back on Redis: {}",
                repo.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `mmrctl_thumbnails_generated_total` of one instance.
fn thumbnails_generated(repo: &MediaRepo) -> u64 {
    let metrics = repo.metrics();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("mmrctl_thumbnails_generated_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no thumbnail counter in:\n{metrics}"))
}

#[test]
fn identical_thumbnail_requests_over_three_instances_make_one_generation() {
    let repos = MediaRepo::start_many(3, &[(HS, "http://127.0.0.1:9")]);
    let picture = image::RgbImage::from_fn(2400, 1800, |x, y| {
        image::Rgb([(x * 255 / 2400) as u8, (y * 255 / 1800) as u8, 128])
    });
    let mut jpeg = std::io::Cursor::new(Vec::new());
    picture
        .write_to(&mut jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    let id = repos[0].upload(HS, SHARED_SECRET, "image/jpeg", None, jpeg.get_ref());
    let path =
        format!("/_matrix/client/v1/media/thumbnail/{HS}/{id}?width=320&height=240&method=scale");
    let bodies: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..21)
            .map(|i| {
                let (repo, path) = (&repos[i % 3], &path);
                s.spawn(move || {
                    let auth = format!("Bearer {SHARED_SECRET}");
                    let r = repo.get(path, &[("Host", HS), ("Authorization", &auth)]);
                    assert_eq!(r.status, 200, "{}", r.text());
                    r.body
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(bodies.iter().all(|b| *b == bodies[0]));
    let generated: Vec<u64> = repos.iter().map(thumbnails_generated).collect();
    assert_eq!(generated.iter().sum::<u64>(), 1, "{generated:?}");
    assert_eq!(repos[0].count("SELECT COUNT(*) FROM thumbnails"), 1);
}

#[test]
fn three_instances_on_s3_and_redis_store_once_and_wake_each_other() {
    let s3 = testkit::S3Server::start("media");
    let redis = RedisServer::start();
    let db = testkit::TestDb::new();
    let url = db.url().to_owned();
    let mut db = Some(db);
    let repos: Vec<MediaRepo> = (0..3)
        .map(|_| {
            let repo = MediaRepo::spawn(db.take(), &url, &[(HS, "http://127.0.0.1:9")], |c| {
                c["datastores"] = json!([support::s3_datastore(&s3, c, json!(["all"]), json!({}))]);
                c["redis"] =
                    json!({ "enabled": true, "shards": [{ "name": "a", "addr": redis.addr() }] });
            });
            repo.wait_healthy();
            repo
        })
        .collect();

    // 20 identical uploads spread over the instances: one object in S3.
    twenty_identical_uploads(&repos, &sample(300_000, 12));
    assert_eq!(s3.keys().len(), 1);

    // An asynchronous upload: created on A, waited for on B, completed on C; B's download wakes
    // on the completion (NOTIFY), well before its timeout.
    let created = repos[0].create(HS);
    assert_eq!(created.status, 200, "{}", created.text());
    let uri = created.json()["content_uri"].as_str().unwrap().to_owned();
    let id = uri.rsplit('/').next().unwrap().to_owned();
    let late = sample(50_000, 13);
    let (waited, took) = std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let started = Instant::now();
            let r = repos[1].get(
                &format!("/_matrix/client/v1/media/download/{HS}/{id}?timeout_ms=20000"),
                &[
                    ("Host", HS),
                    ("Authorization", &format!("Bearer {SHARED_SECRET}")),
                ],
            );
            (r, started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        let put = repos[2].send(
            "PUT",
            &format!("/_matrix/media/v3/upload/{HS}/{id}"),
            &[
                ("Host", HS),
                ("Authorization", &format!("Bearer {SHARED_SECRET}")),
            ],
            Some("image/png"),
            &late,
        );
        assert_eq!(put.status, 200, "{}", put.text());
        waiter.join().unwrap()
    });
    assert_eq!(waited.status, 200, "{}", waited.text());
    assert!(waited.body == late);
    assert!(
        took < Duration::from_secs(15),
        "woke only at its timeout: {took:?}"
    );
    support::check_clean(&repos[0].config_path(), support::S3_ID);
}
