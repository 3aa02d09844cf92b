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
    run_with_db(async |media, config, _| f(media, config).await, extra);
}

/// [`run`], with the test's database for what the service does not show.
fn run_with_db(f: impl AsyncFnOnce(&Service, &Config, &TestDb), extra: &str) {
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
        f(&Service::new(store), &config, &db).await;
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
            assert_eq!(
                did,
                "1 expired reservations deleted, 0 interrupted file deletions finished, 0 idle shared buckets and notes deleted"
            );
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

/// Runs `f` on a thread of its own: the sync database client starts a runtime, which it cannot
/// do on one of this runtime's threads.
fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| s.spawn(f).join().unwrap())
}

/// A `w`x`h` PNG.
fn png(w: u32, h: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn expired_thumbnails_go_and_take_only_their_own_objects() {
    run_with_db(
        async |media, config, db| {
            let mut up = upload("@a:example.test", None, None);
            up.content_type = "image/png".into();
            let source = media
                .upload(config, up, Target::NewId, body(png(400, 300)))
                .await
                .unwrap();
            let id = source.media.media_id.clone();
            let ask = async |w, h| {
                let params = media::ThumbnailParams {
                    width: w,
                    height: h,
                    method: media::Method::Crop,
                    animated: None,
                    authenticated: true,
                };
                media
                    .thumbnail(
                        config,
                        "example.test",
                        &id,
                        params,
                        Wait::from_millis(Some(0)),
                        Fetch::CachedOnly,
                    )
                    .await
                    .unwrap()
                    .1
            };
            // A made thumbnail, and the source as its own thumbnail (it fits 800x600).
            assert!(matches!(ask(96, 96).await, media::Thumb::Made { .. }));
            assert!(matches!(ask(800, 600).await, media::Thumb::Original(_)));
            // The sync client runs a runtime of its own: off this one's threads.
            let count = |sql: &'static str| {
                off_runtime(|| db.client().query_one(sql, &[]).unwrap().get::<_, i64>(0))
            };
            let rows = || count("SELECT COUNT(*) FROM thumbnails");
            let objects = || count("SELECT COUNT(*) FROM objects");
            // Stored just after being answered.
            for _ in 0..500 {
                if rows() == 2 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(rows(), 2);
            assert_eq!(objects(), 2);
            let job = media::jobs::Job::ExpireThumbnails;
            assert_eq!(
                job.run(media, config).await.unwrap(),
                "0 thumbnails older than 1 days deleted"
            );
            off_runtime(|| {
                db.client()
                    .execute(
                        "UPDATE thumbnails SET created_ts = created_ts - 2 * 86400000",
                        &[],
                    )
                    .unwrap()
            });
            assert_eq!(
                job.run(media, config).await.unwrap(),
                "2 thumbnails older than 1 days deleted"
            );
            assert_eq!(rows(), 0);
            assert_eq!(objects(), 1, "the source stays: its media row uses it");
            let check = media.store().check_datastore("a").await.unwrap();
            assert!(check.is_clean(), "{check:?}");
            assert_eq!(check.listed, 1, "the thumbnail's file went with its row");
            // Made again when asked for.
            assert!(matches!(ask(96, 96).await, media::Thumb::Made { .. }));
        },
        "thumbnails: { expireAfterDays: 1 }",
    );
}
