//! The media service on a real PostgreSQL: what an upload may be (limits, quotas, names), an
//! asynchronous upload from reservation to download, and what a download finds.

#![allow(clippy::unwrap_used)] // Tests fail by panicking.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use config::Config;
use futures_util::{StreamExt as _, stream};
use media::{Error, Fetch, Service, Upload, Wait};
use store::Target;
use testkit::TestDb;

fn config(db: &TestDb, dir: &Path, extra: &str) -> Config {
    let yaml = format!(
        "database: {{ postgres: '{}' }}\nhomeservers: [{{ name: example.test, csApi: 'http://127.0.0.1:9' }}]\n\
         datastores: [{{ type: file, id: a, forKinds: [all], opts: {{ path: '{}' }} }}]\n{extra}",
        db.url(),
        dir.display(),
    );
    let loaded = Config::from_yaml(&yaml, "test").unwrap();
    assert!(loaded.config.validate().is_empty());
    loaded.config
}

fn upload(user: &str, file_name: Option<&str>, declared: Option<u64>) -> Upload {
    Upload {
        origin: "example.test".into(),
        user_id: user.into(),
        content_type: "text/plain".into(),
        file_name: file_name.map(Into::into),
        declared_len: declared,
    }
}

fn body(bytes: Vec<u8>) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Send {
    stream::iter([Ok(Bytes::from(bytes))])
}

/// A body that must never be read (the upload is refused before).
fn unread() -> impl futures_util::Stream<Item = Result<Bytes, String>> + Send {
    stream::once(async { panic!("the body was read") })
}

fn run(f: impl AsyncFnOnce(&Service, &Config), extra: &str) {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, dir.path(), extra);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = store::Store::open(&config).await.unwrap();
        let maintain = {
            let store = store.clone();
            tokio::spawn(async move { store.maintain().await })
        };
        f(&Service::new(store), &config).await;
        maintain.abort();
    });
}

#[test]
fn uploads_are_refused_before_their_body_when_they_cannot_fit() {
    run(
        async |media, config| {
            let alice = "@alice:example.test";
            let e = media
                .upload(
                    config,
                    upload(alice, None, Some(2000)),
                    Target::NewId,
                    unread(),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::Store(store::Error::TooLarge { max: 1000 })),
                "{e}"
            );
            let e = media
                .upload(
                    config,
                    upload(alice, Some("a\0b"), None),
                    Target::NewId,
                    unread(),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Error::InvalidParam(m) if m.contains("NUL")),
                "{e}"
            );
            let long = "x".repeat(256);
            let e = media
                .upload(
                    config,
                    upload(alice, Some(&long), None),
                    Target::NewId,
                    unread(),
                )
                .await
                .unwrap_err();
            assert!(matches!(e, Error::InvalidParam(_)), "{e}");

            // The quota: 2 files, 900 bytes.
            for _ in 0..2 {
                media
                    .upload(
                        config,
                        upload(alice, None, None),
                        Target::NewId,
                        body(vec![1; 400]),
                    )
                    .await
                    .unwrap();
            }
            let e = media
                .upload(
                    config,
                    upload(alice, None, Some(10)),
                    Target::NewId,
                    unread(),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::Store(store::Error::QuotaFiles(2))),
                "{e}"
            );
            // Another user's quota is their own; the byte quota cuts a body as it streams.
            let bob = "@bob:example.test";
            let e = media
                .upload(
                    config,
                    upload(bob, None, None),
                    Target::NewId,
                    body(vec![2; 950]),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::Store(store::Error::QuotaBytes(900))),
                "{e}"
            );
            media
                .upload(
                    config,
                    upload(bob, None, None),
                    Target::NewId,
                    body(vec![2; 900]),
                )
                .await
                .unwrap();
        },
        "uploads: { maxBytes: 1000, minBytes: 1, quotas: { enabled: true, users: [{ glob: '@*:example.test', maxFiles: 2, maxBytes: 900 }] } }",
    );
}

#[test]
fn an_asynchronous_upload_from_reservation_to_download() {
    run(
        async |media, config| {
            let alice = "@alice:example.test";
            let created = media.create(config, "example.test", alice).await.unwrap();
            assert!(created.expires_ts > store::now_ms());
            // Nobody else may upload into it, and an id that was never created is not found.
            let e = media
                .check_pending(
                    config,
                    "example.test",
                    &created.media_id,
                    "@eve:example.test",
                )
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::Store(store::Error::PendingOtherUser)),
                "{e}"
            );
            let e = media
                .check_pending(config, "example.test", "neverCreated", alice)
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::Store(store::Error::PendingNotFound)),
                "{e}"
            );

            // Not uploaded yet: a short wait ends with "not yet".
            let e = media
                .media(
                    config,
                    "example.test",
                    &created.media_id,
                    Wait::from_millis(Some(200)),
                    Fetch::CachedOnly,
                )
                .await
                .unwrap_err();
            assert!(matches!(e, Error::NotYetUploaded), "{e}");

            // A download waiting when the content comes is woken with it.
            let waiting = {
                let (media, config, id) = (media.clone(), config.clone(), created.media_id.clone());
                tokio::spawn(async move {
                    media
                        .media(
                            &config,
                            "example.test",
                            &id,
                            Wait::from_millis(Some(20_000)),
                            Fetch::CachedOnly,
                        )
                        .await
                })
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            media
                .check_pending(config, "example.test", &created.media_id, alice)
                .await
                .unwrap();
            media
                .upload(
                    config,
                    upload(alice, Some("later.txt"), None),
                    Target::Pending(created.media_id.clone()),
                    body(b"arrived later".to_vec()),
                )
                .await
                .unwrap();
            let found = tokio::time::timeout(Duration::from_secs(10), waiting)
                .await
                .expect("the waiting download was not woken")
                .unwrap()
                .unwrap();
            assert_eq!(found.upload_name.as_deref(), Some("later.txt"));
            assert_eq!(found.object.unwrap().size, 13);
        },
        "uploads: { minBytes: 1 }",
    );
}

#[test]
fn downloads_find_only_what_is_ours_and_not_quarantined() {
    run(
        async |media, config| {
            let e = media
                .media(
                    config,
                    "other.test",
                    "abcdef",
                    Wait::from_millis(Some(0)),
                    Fetch::As("example.test"),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(&e, Error::NotFound(m) if m.contains("other.test")),
                "{e}"
            );
            let e = media
                .media(
                    config,
                    "example.test",
                    "../etc",
                    Wait::from_millis(Some(0)),
                    Fetch::CachedOnly,
                )
                .await
                .unwrap_err();
            assert!(matches!(e, Error::NotFound(_)), "{e}");
            let up = media
                .upload(
                    config,
                    upload("@alice:example.test", None, None),
                    Target::NewId,
                    body(vec![7; 300]),
                )
                .await
                .unwrap();
            let id = up.media.media_id;
            let found = media
                .media(
                    config,
                    "example.test",
                    &id,
                    Wait::from_millis(None),
                    Fetch::CachedOnly,
                )
                .await
                .unwrap();
            assert_eq!(found.object.unwrap().size, 300);
            assert!(
                media
                    .store()
                    .quarantine_media("example.test", &id)
                    .await
                    .unwrap()
            );
            let e = media
                .media(
                    config,
                    "example.test",
                    &id,
                    Wait::from_millis(None),
                    Fetch::CachedOnly,
                )
                .await
                .unwrap_err();
            assert!(matches!(e, Error::Quarantined), "{e}");
        },
        "uploads: { minBytes: 1 }",
    );
}

#[test]
fn the_reservation_job_deletes_only_expired_reservations() {
    run(
        async |media, config| {
            let short = {
                let mut c = config.clone();
                c.uploads.max_age_seconds = 1;
                c
            };
            media
                .create(&short, "example.test", "@a:example.test")
                .await
                .unwrap();
            let kept = media
                .create(config, "example.test", "@a:example.test")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(1100)).await;
            let did = media::jobs::Job::ExpireReservations
                .run(media, config)
                .await
                .unwrap();
            assert_eq!(did, "1 expired reservations deleted");
            media
                .check_pending(config, "example.test", &kept.media_id, "@a:example.test")
                .await
                .unwrap();
        },
        "uploads: { minBytes: 1, maxPending: 5 }",
    );
}

#[test]
fn a_body_that_stalls_fails_the_upload_as_stalled_and_leaves_nothing() {
    run(
        async |media, config| {
            let stalls = stream::iter([Ok::<_, String>(Bytes::from_static(b"first piece"))])
                .chain(stream::pending());
            let e = media
                .upload(
                    config,
                    upload("@alice:example.test", None, None),
                    Target::NewId,
                    stalls,
                )
                .await
                .unwrap_err();
            assert!(matches!(e, Error::BodyStalled(1)), "{e}");
            assert_eq!(
                media
                    .store()
                    .usage("@alice:example.test")
                    .await
                    .unwrap()
                    .files,
                0
            );
        },
        "uploads: { minBytes: 1 }\nconnections: { bodyTimeoutSeconds: 1 }",
    );
}
