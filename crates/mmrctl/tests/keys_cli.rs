//! `mmrctl keys` as an operator and the Ansible role run it: output, exit codes, files.
#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use keys::{KeyFile, KeyFormat, KeyId, SigningKey};
use serde_json::Value;

fn mmrctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed ({}): {}{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

fn failed(o: &Output) -> String {
    assert_eq!(o.status.code(), Some(1), "{}{}", stdout(o), stderr(o));
    stderr(o)
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn read(path: &Path) -> KeyFile {
    KeyFile::parse(&fs::read_to_string(path).unwrap(), "test").unwrap()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A homeserver key file holding one key, in `format`.
fn homeserver_key(path: &Path, format: KeyFormat) -> SigningKey {
    let key = SigningKey::generate()
        .unwrap()
        .with_id(KeyId::from_version("a_AbCd").unwrap());
    fs::write(
        path,
        KeyFile::new(format, vec![key.clone()]).to_text(format),
    )
    .unwrap();
    key
}

#[test]
fn generate_writes_a_new_mmr_key_0600_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mr.signing.key");
    let text = ok(&mmrctl(&["keys", "generate", "--out", s(&out)]));
    let file = read(&out);
    let key = &file.keys()[0];
    assert_eq!(file.format(), KeyFormat::Mmr);
    assert_eq!(mode(&out), 0o600);
    assert_eq!(
        text,
        format!(
            "wrote a new key to {} (mmr format): {} {}\n",
            out.display(),
            key.id(),
            key.public_key_base64()
        )
    );
    let pem = fs::read_to_string(&out).unwrap();
    assert!(pem.starts_with("-----BEGIN MMR PRIVATE KEY-----\nKey-ID: ed25519:"));
    assert!(pem.contains("\nVersion: 1\n"));

    let err = failed(&mmrctl(&["keys", "generate", "--out", s(&out)]));
    assert!(err.contains("already exists: not overwriting it"), "{err}");
    assert_eq!(fs::read_to_string(&out).unwrap(), pem);

    // What the role runs on every play: keeps the key, says so, reports no change.
    let kept = json(&mmrctl(&[
        "keys",
        "generate",
        "--out",
        s(&out),
        "--if-missing",
        "--json",
    ]));
    assert_eq!(kept["changed"], false);
    assert_eq!(kept["key_id"], key.id().to_string());
    assert_eq!(kept["public_key"], key.public_key_base64());
    assert_eq!(fs::read_to_string(&out).unwrap(), pem);

    ok(&mmrctl(&[
        "keys",
        "generate",
        "--out",
        s(&out),
        "--force",
        "--format",
        "synapse",
    ]));
    let forced = read(&out);
    assert_eq!(forced.format(), KeyFormat::Synapse);
    assert!(!forced.keys()[0].same_secret(key));

    let dendrite = dir.path().join("d.pem");
    ok(&mmrctl(&[
        "keys",
        "generate",
        "--out",
        s(&dendrite),
        "--format",
        "dendrite",
    ]));
    assert_eq!(read(&dendrite).format(), KeyFormat::Dendrite);
}

#[test]
fn merge_for_synapse_then_list_then_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let hs = dir.path().join("example.com.signing.key");
    let mr = dir.path().join("mr.signing.key");
    let hs_key = homeserver_key(&hs, KeyFormat::Synapse);
    ok(&mmrctl(&["keys", "generate", "--out", s(&mr)]));
    let mr_key = read(&mr).keys()[0].clone();
    let merge = [
        "keys",
        "merge",
        "--homeserver",
        "synapse",
        "--homeserver-key",
        s(&hs),
        "--media-repo-key",
        s(&mr),
    ];
    let text = ok(&mmrctl(&merge));
    assert!(
        text.starts_with(&format!(
            "added the media repo's key {} to {}, after the homeserver's own key ed25519:a_AbCd",
            mr_key.id(),
            hs.display()
        )),
        "{text}"
    );
    assert!(text.contains("Restart Synapse"), "{text}");
    assert_eq!(read(&hs).keys(), [hs_key.clone(), mr_key.clone()]);
    assert!(dir.path().join("example.com.signing.key.backup").exists());

    let mut again = merge.to_vec();
    again.push("--json");
    let report = json(&mmrctl(&again));
    assert_eq!(report["changed"], false);
    assert!(
        report["notes"][0]
            .as_str()
            .unwrap()
            .contains("nothing changed")
    );

    let listed = ok(&mmrctl(&["keys", "list", s(&hs), s(&mr)]));
    assert_eq!(
        listed,
        format!(
            "{}: synapse, 2 keys\n  ed25519:a_AbCd  {}  signs; published\n  {}  {}  published\n\
             {}: mmr, 1 key\n  {}  {}  signs\n",
            hs.display(),
            hs_key.public_key_base64(),
            mr_key.id(),
            mr_key.public_key_base64(),
            mr.display(),
            mr_key.id(),
            mr_key.public_key_base64(),
        )
    );
    let listed = json(&mmrctl(&["keys", "list", "--json", s(&hs)]));
    assert_eq!(listed[0]["format"], "synapse");
    assert_eq!(listed[0]["keys"][1]["key_id"], mr_key.id().to_string());

    let revoke = |id: &str| {
        mmrctl(&[
            "keys",
            "revoke",
            "--homeserver",
            "synapse",
            "--homeserver-key",
            s(&hs),
            "--key-id",
            id,
        ])
    };
    let err = failed(&revoke("ed25519:a_AbCd"));
    assert!(
        err.contains(":1: ed25519:a_AbCd is the homeserver's own key"),
        "{err}"
    );
    let text = ok(&revoke(&mr_key.id().to_string()));
    assert!(
        text.contains("Add this to Synapse's homeserver.yaml"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "old_signing_keys:\n  \"{}\":\n    key: \"{}\"\n    expired_ts: ",
            mr_key.id(),
            mr_key.public_key_base64()
        )),
        "{text}"
    );
    assert_eq!(read(&hs).keys(), [hs_key]);
}

#[test]
fn merge_errors_exit_1_and_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let hs = dir.path().join("hs.key");
    let mr = dir.path().join("mr.key");
    let hs_key = homeserver_key(&hs, KeyFormat::Synapse);
    ok(&mmrctl(&["keys", "generate", "--out", s(&mr)]));
    let bad = format!(
        "{}ed25519 broken\n",
        KeyFile::new(KeyFormat::Synapse, vec![hs_key]).to_text(KeyFormat::Synapse)
    );
    fs::write(&hs, &bad).unwrap();
    let err = failed(&mmrctl(&[
        "keys",
        "merge",
        "--homeserver",
        "synapse",
        "--homeserver-key",
        s(&hs),
        "--media-repo-key",
        s(&mr),
    ]));
    assert!(
        err.starts_with(&format!(
            "error: {}:2: expected `ed25519 <version> <base64 seed>`",
            hs.display()
        )),
        "{err}"
    );
    assert_eq!(fs::read_to_string(&hs).unwrap(), bad);
    assert!(!dir.path().join("hs.key.backup").exists());

    // An unknown homeserver is a usage error (exit 2).
    let usage = mmrctl(&[
        "keys",
        "merge",
        "--homeserver",
        "conduit",
        "--homeserver-key",
        s(&hs),
        "--media-repo-key",
        s(&mr),
    ]);
    assert_eq!(usage.status.code(), Some(2));

    // list reports each unreadable file and still lists the others.
    let listed = mmrctl(&["keys", "list", s(&hs), s(&mr)]);
    assert_eq!(listed.status.code(), Some(1));
    assert!(
        stderr(&listed).contains(":2: expected"),
        "{}",
        stderr(&listed)
    );
    assert!(
        stdout(&listed).contains(": mmr, 1 key"),
        "{}",
        stdout(&listed)
    );
}

#[test]
fn merge_for_dendrite_gives_the_media_repo_dendrites_key_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("matrix_key.pem");
    let mr = dir.path().join("mr.signing.key");
    let hs_key = homeserver_key(&pem, KeyFormat::Dendrite);
    let dendrite_file = fs::read_to_string(&pem).unwrap();
    ok(&mmrctl(&["keys", "generate", "--out", s(&mr)]));
    let text = ok(&mmrctl(&[
        "keys",
        "merge",
        "--homeserver",
        "dendrite",
        "--homeserver-key",
        s(&pem),
        "--media-repo-key",
        s(&mr),
    ]));
    assert!(
        text.contains("Dendrite publishes only the first key of its key file"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "the media repo now signs with Dendrite's own key ed25519:a_AbCd: wrote it, in the \
             MMR format, to {}; its previous key is kept in {}.backup. {} was not changed",
            mr.display(),
            mr.display(),
            pem.display()
        )),
        "{text}"
    );
    assert!(
        text.contains("keep it as secret as Dendrite's own key file"),
        "{text}"
    );
    assert_eq!(fs::read_to_string(&pem).unwrap(), dendrite_file);
    let media = read(&mr);
    assert_eq!(media.format(), KeyFormat::Mmr);
    assert_eq!(media.keys(), [hs_key]);
    assert_eq!(mode(&mr), 0o600);
}

#[test]
fn convert_writes_another_format() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("matrix_key.pem");
    let out = dir.path().join("mr.key");
    let key = homeserver_key(&pem, KeyFormat::Dendrite);
    let text = ok(&mmrctl(&[
        "keys",
        "convert",
        "--in",
        s(&pem),
        "--out",
        s(&out),
        "--format",
        "mmr",
    ]));
    assert_eq!(
        text,
        format!(
            "wrote ed25519:a_AbCd to {} in the mmr format\n",
            out.display()
        )
    );
    assert_eq!(read(&out).keys(), [key]);
    assert_eq!(read(&out).format(), KeyFormat::Mmr);
    assert_eq!(mode(&out), 0o600);
}
