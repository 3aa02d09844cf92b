//! `mmrctl datastores transfer` and `mmrctl datastores check` against a running `mmrctl serve`, a
//! real PostgreSQL and a real S3-compatible server (moto).

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

mod support;

use std::process::Command;

use serde_json::json;
use support::{FILE_ID, MediaRepo, S3_ID, SHARED_SECRET, s3_datastore, sample};
use testkit::S3Server;

const HS: &str = "example.test";

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn mmrctl(repo: &MediaRepo, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(args)
        .arg("--config")
        .arg(repo.config_path())
        .output()
        .unwrap();
    let run = Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    eprintln!(
        "$ mmrctl {}\n{}{}(exit {})",
        args.join(" "),
        run.stdout,
        run.stderr,
        run.code
    );
    run
}

fn datastore_of_every_object(repo: &MediaRepo) -> Vec<String> {
    let mut client = repo.db.as_ref().unwrap().client();
    client
        .query("SELECT DISTINCT datastore_id FROM objects", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Every item downloads whole and byte-identical, and a range of it too.
fn assert_all_served(repo: &MediaRepo, items: &[(String, Vec<u8>)]) {
    for (id, body) in items {
        let r = repo.download(HS, id, &[]);
        assert_eq!(r.status, 200, "{id}: {}", r.text());
        assert!(r.body == *body, "{id}: the bytes differ");
        let r = repo.download(HS, id, &[("Range", "bytes=100-149")]);
        assert_eq!(r.status, 206, "{id}");
        assert_eq!(r.body, &body[100..150], "{id}");
    }
}

#[test]
fn transfer_file_to_s3_and_back_keeps_every_item_downloadable() {
    let mut s3 = S3Server::start("media");
    // New media on the file store; the S3 store takes nothing new (`forKinds: []`).
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["uploads"] = json!({ "maxBytes": 64 * 1024 * 1024 });
        let s3_entry = s3_datastore(&s3, c, json!([]), json!({ "prefixLength": 2 }));
        c["datastores"].as_array_mut().unwrap().push(s3_entry);
    });
    // Sizes around S3's multipart threshold (16 MiB), and one content uploaded twice.
    let mut items: Vec<(String, Vec<u8>)> = [200usize, 70_000, 1 << 20, 20 << 20]
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let body = sample(len, 100 + i as u64);
            let id = repo.upload(HS, SHARED_SECRET, "application/octet-stream", None, &body);
            (id, body)
        })
        .collect();
    let twice = items[1].1.clone();
    let id = repo.upload(HS, SHARED_SECRET, "text/plain", Some("again.txt"), &twice);
    items.push((id, twice));
    assert_eq!(repo.objects(), 4);

    // S3 is down: the transfer stops, says how to continue, and has lost nothing.
    s3.stop();
    let run = mmrctl(
        &repo,
        &["datastores", "transfer", "--from", FILE_ID, "--to", S3_ID],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("run the same command again to continue"),
        "{}",
        run.stderr
    );
    assert_eq!(repo.objects(), 4);
    assert_eq!(datastore_of_every_object(&repo), vec![FILE_ID]);
    assert_all_served(&repo, &items);

    // S3 is back: run it again, while the server keeps serving.
    s3.restart();
    let run = mmrctl(
        &repo,
        &["datastores", "transfer", "--from", FILE_ID, "--to", S3_ID],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "moved 4 object(s) (21.1 MiB) from `{FILE_ID}` to `{S3_ID}`"
        )),
        "{}",
        run.stdout
    );
    assert_eq!(repo.objects(), 0, "the source files are deleted");
    let keys = s3.keys();
    assert_eq!(keys.len(), 4);
    assert!(
        keys.iter()
            .all(|k| k.len() == 65 && k.as_bytes()[2] == b'/')
    );
    assert_eq!(datastore_of_every_object(&repo), vec![S3_ID]);
    assert_all_served(&repo, &items);
    // The 20 MiB object went up in parts.
    assert!(s3.log_contains("?uploads"));

    // Nothing left: a rerun moves nothing.
    let run = mmrctl(
        &repo,
        &["datastores", "transfer", "--from", FILE_ID, "--to", S3_ID],
    );
    assert_eq!(run.code, 0);
    assert!(run.stdout.contains("moved 0 object(s)"), "{}", run.stdout);

    // And back to the file store.
    let run = mmrctl(
        &repo,
        &["datastores", "transfer", "--from", S3_ID, "--to", FILE_ID],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("moved 4 object(s)"), "{}", run.stdout);
    assert!(s3.keys().is_empty());
    assert_eq!(repo.objects(), 4);
    assert_eq!(datastore_of_every_object(&repo), vec![FILE_ID]);
    assert_all_served(&repo, &items);

    // Both stores agree with the database.
    for id in [FILE_ID, S3_ID] {
        let run = mmrctl(&repo, &["datastores", "check", id]);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        assert!(
            run.stdout.contains("0 orphan(s), 0 missing"),
            "{}",
            run.stdout
        );
    }

    // The file store's check finds a stray file and a deleted object.
    let media = repo.dir.path().join("media");
    std::fs::create_dir_all(media.join("zz/zz")).unwrap();
    std::fs::write(media.join("zz/zz/stray"), b"not ours").unwrap();
    let mut client = repo.db.as_ref().unwrap().client();
    let location: String = client
        .query_one(
            "SELECT location FROM objects ORDER BY size_bytes LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    std::fs::remove_file(media.join(&location)).unwrap();
    let run = mmrctl(&repo, &["datastores", "check", FILE_ID]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.contains("orphan: zz/zz/stray"), "{}", run.stdout);
    assert!(
        run.stdout.contains(&format!("missing: {location}")),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("4 row(s); 1 orphan(s), 1 missing"),
        "{}",
        run.stdout
    );
}

#[test]
fn the_s3_check_finds_a_planted_orphan_and_a_missing_object() {
    let s3 = S3Server::start("media");
    let repo = MediaRepo::start(&[(HS, "http://127.0.0.1:9")], |c| {
        c["datastores"] = json!([s3_datastore(
            &s3,
            c,
            json!(["all"]),
            json!({ "prefixLength": 2 })
        )]);
    });
    let ids: Vec<String> = (0..3)
        .map(|i| {
            repo.upload(
                HS,
                SHARED_SECRET,
                "image/png",
                None,
                &sample(1000 + i, 200 + i as u64),
            )
        })
        .collect();
    let run = mmrctl(&repo, &["datastores", "check", S3_ID]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "datastore `{S3_ID}`: 3 object(s) listed, 3 row(s); 0 orphan(s), 0 missing"
        )),
        "{}",
        run.stdout
    );

    // An object no row references (what an interrupted upload could leave), and an object deleted
    // behind our back.
    s3.put_object("ab/planted-orphan", b"nobody references this");
    let hash = repo
        .download(HS, &ids[1], &[])
        .header("etag")
        .unwrap()
        .trim_matches('"')
        .to_owned();
    let missing_key = format!("{}/{}", &hash[..2], &hash[2..]);
    s3.delete_object(&missing_key);

    let run = mmrctl(&repo, &["datastores", "check", S3_ID]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("orphan: ab/planted-orphan"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "missing: {missing_key} (sha256 {hash}, 1001 bytes"
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("3 object(s) listed, 3 row(s); 1 orphan(s), 1 missing"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("check again"), "{}", run.stdout);

    // An unknown datastore is an error, not a clean report.
    let run = mmrctl(&repo, &["datastores", "check", "nope"]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains(&format!(
            "no datastore `nope` in the config (configured: {S3_ID})"
        )),
        "{}",
        run.stderr
    );
}
