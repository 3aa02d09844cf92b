//! The store on a real PostgreSQL and file datastores: the upload pipeline's dedup and its
//! nothing-left-behind failures, transfers between datastores, and the consistency check.

#![allow(clippy::unwrap_used)] // Tests fail by panicking.

use std::path::Path;

use bytes::Bytes;
use config::{Config, MediaKind};
use futures_util::stream;
use store::{Limits, NewMedia, Store, Target};
use testkit::TestDb;

/// Two file datastores: `a` takes every kind, `b` none (a transfer target).
fn config(db: &TestDb, dir: &Path) -> Config {
    let yaml = format!(
        "database: {{ postgres: '{}' }}\nhomeservers: [{{ name: example.test, csApi: 'http://127.0.0.1:9' }}]\n\
         datastores:\n  - {{ type: file, id: a, forKinds: [all], opts: {{ path: '{}' }} }}\n  \
         - {{ type: file, id: b, forKinds: [], opts: {{ path: '{}' }} }}\n",
        db.url(),
        dir.join("a").display(),
        dir.join("b").display()
    );
    Config::from_yaml(&yaml, "test").unwrap().config
}

/// Runs `test` on two stores (two instances) on one new database and the same datastores.
fn with_two_instances(test: impl AsyncFnOnce(Store, Store, &TestDb)) {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (a, b) = (
            Store::open(&config).await.unwrap(),
            Store::open(&config).await.unwrap(),
        );
        test(a, b, &db).await;
    });
}

/// Runs `test` on a store of its own (a new database and datastore directories).
fn with_store(test: impl AsyncFnOnce(Store, &Path)) {
    let db = TestDb::new();
    let dir = tempfile::tempdir().unwrap();
    let config = config(&db, dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = Store::open(&config).await.unwrap();
        test(store, dir.path()).await;
    });
}

fn new_media() -> NewMedia {
    NewMedia {
        origin: "example.test".into(),
        kind: MediaKind::LocalMedia,
        content_type: "application/octet-stream".into(),
        upload_name: None,
        user_id: "@alice:example.test".into(),
        requires_auth: false,
        quarantined: false,
        created_ts: None,
    }
}

fn body(bytes: &[u8]) -> impl futures_util::Stream<Item = Result<Bytes, String>> + Send {
    // Several pieces, as a network delivers them.
    let pieces: Vec<Result<Bytes, String>> = bytes
        .chunks(100_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(pieces)
}

fn files_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.unwrap().path())
        .map(|p| if p.is_dir() { files_in(&p) } else { 1 })
        .sum()
}

fn sample(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn the_pipeline_dedups_and_a_failed_upload_leaves_nothing() {
    with_store(async |store, dir| {
        let content = sample(3 * 1024 * 1024 + 17, 1);
        let first = store
            .upload(
                new_media(),
                Target::NewId,
                body(&content),
                Limits::default(),
            )
            .await
            .unwrap();
        let second = store
            .upload(
                new_media(),
                Target::NewId,
                body(&content),
                Limits::default(),
            )
            .await
            .unwrap();
        assert!(!first.deduplicated && second.deduplicated);
        assert_ne!(first.media.media_id, second.media.media_id);
        assert_eq!(first.media.object, second.media.object);
        assert_eq!(files_in(&dir.join("a")), 1, "one object for both");

        // Broken off midway, over the size limit, or with the wrong content: nothing is left.
        let broken = stream::iter([Ok(Bytes::from(sample(500_000, 2))), Err("reset".to_owned())]);
        let e = store
            .upload(new_media(), Target::NewId, broken, Limits::default())
            .await
            .unwrap_err();
        assert!(matches!(e, store::Error::Aborted(_)), "{e}");
        let limits = Limits {
            max_bytes: 1000,
            ..Limits::default()
        };
        let e = store
            .upload(new_media(), Target::NewId, body(&sample(5000, 3)), limits)
            .await
            .unwrap_err();
        assert!(matches!(e, store::Error::TooLarge { max: 1000 }), "{e}");
        let limits = Limits {
            expected_sha256: Some([0; 32]),
            ..Limits::default()
        };
        let e = store
            .upload(
                new_media(),
                Target::Id("fixedid".into()),
                body(&sample(5000, 4)),
                limits,
            )
            .await
            .unwrap_err();
        assert!(matches!(e, store::Error::HashMismatch { .. }), "{e}");
        assert_eq!(files_in(&dir.join("a")), 1, "no object, no temp file left");
        assert!(
            store
                .media("example.test", "fixedid")
                .await
                .unwrap()
                .is_none()
        );

        // The right expected hash passes.
        let content = sample(5000, 4);
        let sha: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&content).into();
        let limits = Limits {
            expected_sha256: Some(sha),
            ..Limits::default()
        };
        store
            .upload(
                new_media(),
                Target::Id("fixedid".into()),
                body(&content),
                limits,
            )
            .await
            .unwrap();
        assert_eq!(store.usage("@alice:example.test").await.unwrap().files, 3);
    });
}

#[test]
fn a_transfer_moves_every_object_and_the_check_finds_what_went_wrong() {
    with_store(async |store, dir| {
        let mut uploaded = Vec::new();
        for seed in 0..3 {
            let content = sample(200_000 + usize::from(seed), seed);
            let u = store
                .upload(
                    new_media(),
                    Target::NewId,
                    body(&content),
                    Limits::default(),
                )
                .await
                .unwrap();
            uploaded.push((u.media.media_id, content));
        }
        let report = store.check_datastore("a").await.unwrap();
        assert!(report.is_clean(), "{report:?}");
        assert_eq!((report.listed, report.rows), (3, 3));

        let report = store.transfer("a", "b", |_, _| {}).await.unwrap();
        assert_eq!((report.moved, report.total), (3, 3), "{report:?}");
        assert!(report.failed.is_empty());
        assert_eq!(files_in(&dir.join("a")), 0, "the source is emptied");
        for (id, content) in &uploaded {
            let media = store.media("example.test", id).await.unwrap().unwrap();
            let object = media.object.unwrap();
            assert_eq!(object.datastore_id, "b");
            let mut reader = store.read(&object, 0, None).await.unwrap();
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut got)
                .await
                .unwrap();
            assert_eq!(&got, content);
        }
        // A rerun finds nothing left to move.
        let report = store.transfer("a", "b", |_, _| {}).await.unwrap();
        assert_eq!((report.moved, report.total), (0, 0));

        // An object lost from under its row, and a file no row knows, are both reported.
        let b = dir.join("b");
        let first = store
            .media("example.test", &uploaded[0].0)
            .await
            .unwrap()
            .unwrap()
            .object
            .unwrap();
        std::fs::remove_file(b.join(&first.location)).unwrap();
        let stray = b.join("ab/cd/abcd00");
        std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
        std::fs::write(&stray, b"stray").unwrap();
        let report = store.check_datastore("b").await.unwrap();
        assert!(!report.is_clean());
        assert_eq!(report.missing.len(), 1, "{report:?}");
        assert_eq!(report.missing[0].sha256, first.sha256);
        assert_eq!(report.orphans.len(), 1, "{report:?}");
        assert!(report.orphans[0].contains("abcd00"), "{report:?}");
    });
}

/// Concurrent writers of one preview (on any instance) never fail on its key (MMR #649): the first
/// success stays, failures give way to a success and never replace one. Concurrent identical
/// preview images make one media row, attributed to no user.
#[test]
fn previews_and_their_images_are_written_once_whoever_races() {
    use store::{PreviewKey, StoredPreview};
    with_store(async |store, _| {
        let key = PreviewKey {
            origin: "example.test".into(),
            url: "https://site.example/".into(),
            bucket_ts: 3_600_000,
            language: "en".into(),
        };
        let failed = StoredPreview::Failed {
            kind: "failed".into(),
            message: "timed out".into(),
            until: store::now_ms() + 60_000,
        };
        store.put_preview(&key, &failed).await.unwrap();
        assert_eq!(store.preview(&key).await.unwrap(), Some(failed.clone()));
        let writers = (0..20).map(|i| {
            let (store, key) = (store.clone(), key.clone());
            async move {
                let p = StoredPreview::Found(format!("{{\"n\": {i}}}"));
                store.put_preview(&key, &p).await
            }
        });
        for r in futures_util::future::join_all(writers).await {
            r.unwrap();
        }
        let Some(StoredPreview::Found(first)) = store.preview(&key).await.unwrap() else {
            panic!("a success replaces a failure");
        };
        store.put_preview(&key, &failed).await.unwrap();
        store
            .put_preview(&key, &StoredPreview::Found("{\"n\": 99}".into()))
            .await
            .unwrap();
        assert_eq!(
            store.preview(&key).await.unwrap(),
            Some(StoredPreview::Found(first)),
            "a success is never replaced"
        );
        // A failure whose time ran out is no answer, and expiry deletes it.
        let other = PreviewKey {
            url: "https://other.example/".into(),
            ..key.clone()
        };
        let stale = StoredPreview::Failed {
            kind: "failed".into(),
            message: "old".into(),
            until: store::now_ms() - 1,
        };
        store.put_preview(&other, &stale).await.unwrap();
        assert_eq!(store.preview(&other).await.unwrap(), None);
        assert_eq!(store.expire_previews(i64::MIN).await.unwrap(), 1);
        assert_eq!(store.expire_previews(i64::MAX).await.unwrap(), 1);
        assert_eq!(store.preview(&key).await.unwrap(), None);

        let image = sample(50_000, 9);
        let uploads = (0..10).map(|_| {
            let store = store.clone();
            let image = image.clone();
            let new = NewMedia {
                user_id: String::new(),
                ..new_media()
            };
            async move {
                store
                    .upload(new, Target::PreviewImage, body(&image), Limits::default())
                    .await
            }
        });
        let ids: std::collections::HashSet<String> = futures_util::future::join_all(uploads)
            .await
            .into_iter()
            .map(|r| r.unwrap().media.media_id)
            .collect();
        assert_eq!(ids.len(), 1, "{ids:?}");
        // A user's upload of the same bytes is theirs, not the previews' row.
        let mine = store
            .upload(new_media(), Target::NewId, body(&image), Limits::default())
            .await
            .unwrap();
        assert!(!ids.contains(&mine.media.media_id));
        assert!(mine.deduplicated);
    });
}

/// `downloads.expireAfterDays`: remote media cached before the cut goes with its thumbnails and
/// every object nothing else uses; content a local upload shares stays, and so do recent and
/// quarantined remote media.
#[test]
fn remote_media_expires_with_its_thumbnails_and_only_unshared_objects() {
    use store::ThumbnailKey;
    with_store(async |store, dir| {
        let old = store::now_ms() - 10 * 86_400_000;
        let remote = |created_ts: Option<i64>| NewMedia {
            origin: "remote.example".into(),
            kind: MediaKind::RemoteMedia,
            user_id: String::new(),
            created_ts,
            ..new_media()
        };
        let (alone, shared, recent, quarantined) = (
            sample(20_000, 1),
            sample(20_000, 2),
            sample(20_000, 3),
            sample(20_000, 4),
        );
        for (id, bytes, created) in [
            ("alone", &alone, Some(old)),
            ("shared", &shared, Some(old)),
            ("recent", &recent, None),
            ("quarantined", &quarantined, Some(old)),
        ] {
            store
                .upload(
                    remote(created),
                    Target::Id(id.into()),
                    body(bytes),
                    Limits::default(),
                )
                .await
                .unwrap();
        }
        assert!(
            store
                .quarantine_media("remote.example", "quarantined")
                .await
                .unwrap()
        );
        // A local user uploaded the same bytes as `shared`.
        store
            .upload(new_media(), Target::NewId, body(&shared), Limits::default())
            .await
            .unwrap();
        let key = ThumbnailKey {
            origin: "remote.example".into(),
            media_id: "alone".into(),
            width: 32,
            height: 32,
            method: "crop",
            animated: false,
        };
        store
            .put_thumbnail(&key, "image/png", Bytes::from(sample(500, 9)))
            .await
            .unwrap();
        let files_before = files_in(&dir.join("a"));
        let selection = store::admin::Selection::Remote { before_ts: old + 1 };
        let expire = async || store.purge(&selection, None, |_| {}).await.unwrap().media;

        assert_eq!(expire().await, 2);
        for (id, kept) in [
            ("alone", false),
            ("shared", false),
            ("recent", true),
            ("quarantined", true),
        ] {
            let found = store.media("remote.example", id).await.unwrap();
            assert_eq!(found.is_some(), kept, "{id}");
        }
        assert_eq!(store.thumbnail(&key).await.unwrap(), None);
        // `alone` and its thumbnail were deleted; `shared` stays for the local upload.
        assert_eq!(files_in(&dir.join("a")), files_before - 2);
        // Nothing more to do on a second run.
        assert_eq!(expire().await, 0);
    });
}

/// Quarantine holds for the content: once some media with these bytes is quarantined, nobody
/// stores them again under another id (an import may still bring quarantined media over as
/// quarantined), and other content is unaffected.
#[test]
fn quarantined_content_is_not_stored_again() {
    with_store(async |store, _| {
        let content = sample(50_000, 9);
        let first = store
            .upload(
                new_media(),
                Target::NewId,
                body(&content),
                Limits::default(),
            )
            .await
            .unwrap();
        assert!(
            store
                .quarantine_media("example.test", &first.media.media_id)
                .await
                .unwrap()
        );
        let again = store
            .upload(
                new_media(),
                Target::NewId,
                body(&content),
                Limits::default(),
            )
            .await;
        assert!(
            matches!(again, Err(store::Error::ContentQuarantined)),
            "{again:?}"
        );
        let imported = NewMedia {
            quarantined: true,
            ..new_media()
        };
        let carried = store
            .upload(
                imported,
                Target::Id("imported-1".into()),
                body(&content),
                Limits::default(),
            )
            .await
            .unwrap();
        assert!(carried.media.quarantined);
        let other = sample(50_000, 10);
        store
            .upload(new_media(), Target::NewId, body(&other), Limits::default())
            .await
            .unwrap();
    });
}

#[test]
fn tasks_announced_by_one_instance_reach_the_others() {
    with_two_instances(async |a, b, _| {
        let mut heard = b.subscribe_tasks();
        let listener = {
            let b = b.clone();
            tokio::spawn(async move { b.maintain().await })
        };
        // The listener connects and LISTENs in the background: announce until it hears.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            a.announce_tasks().await.unwrap();
            match tokio::time::timeout(std::time::Duration::from_millis(200), heard.recv()).await {
                Ok(Ok(_)) => break,
                _ => assert!(
                    tokio::time::Instant::now() < deadline,
                    "instance b never heard instance a's announcement"
                ),
            }
        }
        listener.abort();
    });
}

/// Job locks: a released lock's session is kept for the next lock (no new backend per remote
/// fetch or thumbnail), never with a lock still in it; a lock dropped unreleased ends its session.
#[test]
fn job_lock_sessions_are_reused_and_never_keep_a_lock() {
    with_two_instances(async |a, b, db| {
        let (watch, connection) = tokio_postgres::connect(db.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        // The sessions holding advisory locks in this database.
        let holders = async || -> Vec<i32> {
            let rows = watch
                .query(
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    &[],
                )
                .await
                .unwrap();
            rows.iter().map(|r| r.get(0)).collect()
        };

        let lock = a.lock_job("x").await.unwrap();
        let first = holders().await;
        assert_eq!(first.len(), 1, "one session holds x");
        lock.release().await;
        assert_eq!(
            holders().await,
            Vec::<i32>::new(),
            "a kept session holds nothing"
        );
        let theirs = b.try_lock_job("x").await.unwrap().expect("x was released");
        assert!(a.try_lock_job("x").await.unwrap().is_none(), "b holds x");
        theirs.release().await;

        let lock = a.lock_job("y").await.unwrap();
        assert_eq!(
            holders().await,
            first,
            "the released session was used again"
        );
        lock.release().await;

        // Cancelled while held: the session ends, the lock with it, and it is not kept.
        drop(a.lock_job("z").await.unwrap());
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        let theirs = loop {
            if let Some(lock) = b.try_lock_job("z").await.unwrap() {
                break lock;
            }
            assert!(tokio::time::Instant::now() < deadline, "z never freed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        theirs.release().await;
        let lock = a.lock_job("w").await.unwrap();
        let now = holders().await;
        assert_eq!(now.len(), 1);
        assert_ne!(now, first, "the cancelled lock's session was not kept");
        lock.release().await;
    });
}
