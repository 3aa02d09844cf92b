//! `keys::manage` on real files: merge, revoke, generate, convert; their errors; and crash tests
//! that stop each operation at every step of its writes and check that a rerun converges.
#![allow(clippy::unwrap_used)] // Test helpers may panic: that is how a test fails.

use std::fs;
use std::ops::ControlFlow;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::slice::from_ref;

use keys::manage::{self, Convert, Generate, Merge, Revoke};
use keys::{Error, Homeserver, KeyFile, KeyFormat, KeyId, SigningKey, Step};

const NOW: u64 = 1_700_000_000_000;

fn key(version: &str) -> SigningKey {
    let seed = SigningKey::generate().unwrap();
    seed.with_id(KeyId::from_version(version).unwrap())
}

fn write(path: &Path, format: KeyFormat, keys: &[&SigningKey]) -> String {
    let text = KeyFile::new(format, keys.iter().map(|k| (*k).clone()).collect()).to_text(format);
    fs::write(path, &text).unwrap();
    text
}

fn read(path: &Path) -> KeyFile {
    KeyFile::parse(&fs::read_to_string(path).unwrap(), "test").unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A homeserver key file and a media repo key file in a temp dir.
struct Setup {
    dir: tempfile::TempDir,
    hs: PathBuf,
    media: PathBuf,
    hs_key: SigningKey,
    media_key: SigningKey,
    /// The homeserver key file's text before the operation.
    original: String,
}

impl Setup {
    fn new(homeserver: Homeserver) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let hs = dir.path().join("example.com.signing.key");
        let media = dir.path().join("media-repo.signing.key");
        let hs_key = key("a_AbCd");
        let media_key = key("Mm01_z");
        let original = write(&hs, homeserver.key_format(), &[&hs_key]);
        fs::set_permissions(&hs, fs::Permissions::from_mode(0o640)).unwrap();
        write(&media, KeyFormat::Mmr, &[&media_key]);
        fs::set_permissions(&media, fs::Permissions::from_mode(0o600)).unwrap();
        Self {
            dir,
            hs,
            media,
            hs_key,
            media_key,
            original,
        }
    }

    fn hs(&self) -> &Path {
        &self.hs
    }

    fn hs_backup(&self) -> PathBuf {
        self.dir.path().join("example.com.signing.key.backup")
    }

    fn media(&self) -> &Path {
        &self.media
    }

    fn merge_opts(&self, homeserver: Homeserver) -> Merge<'_> {
        Merge {
            homeserver,
            homeserver_key: &self.hs,
            media_repo_key: &self.media,
            replace_key_id: None,
            now_ms: NOW,
        }
    }
}

#[test]
fn synapse_merge_adds_the_key_after_the_homeservers_and_backs_up_once() {
    let s = Setup::new(Homeserver::Synapse);
    let report = manage::merge(&s.merge_opts(Homeserver::Synapse)).unwrap();
    assert!(report.changed);
    assert_eq!(report.backups, [s.hs_backup()]);
    assert_eq!(report.written, [s.hs()]);
    assert!(report.notes[0].contains("added the media repo's key ed25519:Mm01_z"));
    assert!(report.old_keys.is_empty());

    let merged = read(s.hs());
    assert_eq!(merged.format(), KeyFormat::Synapse);
    assert_eq!(merged.keys(), [s.hs_key.clone(), s.media_key.clone()]);
    assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), s.original);
    assert_eq!(mode(s.hs()), 0o640);
    assert_eq!(mode(&s.hs_backup()), 0o640);

    // Idempotent: a second merge changes nothing and says so.
    let merged_text = fs::read_to_string(s.hs()).unwrap();
    let again = manage::merge(&s.merge_opts(Homeserver::Synapse)).unwrap();
    assert!(!again.changed);
    assert!(again.backups.is_empty());
    assert!(
        again.notes[0].contains("nothing changed"),
        "{:?}",
        again.notes
    );
    assert_eq!(fs::read_to_string(s.hs()).unwrap(), merged_text);
    assert_eq!(
        names(s.dir.path()),
        [
            "example.com.signing.key",
            "example.com.signing.key.backup",
            "media-repo.signing.key"
        ]
    );
}

#[test]
fn synapse_merge_reads_any_media_repo_key_format_and_keeps_an_existing_backup() {
    for format in [KeyFormat::Synapse, KeyFormat::Dendrite, KeyFormat::Mmr] {
        let s = Setup::new(Homeserver::Synapse);
        write(s.media(), format, &[&s.media_key]);
        fs::write(s.hs_backup(), "older backup\n").unwrap();
        let report = manage::merge(&s.merge_opts(Homeserver::Synapse)).unwrap();
        assert!(report.changed);
        assert!(report.backups.is_empty());
        assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), "older backup\n");
        assert_eq!(read(s.hs()).keys()[1], s.media_key);
    }
}

#[test]
fn synapse_merge_keeps_owner_group_and_mode() {
    let s = Setup::new(Homeserver::Synapse);
    let is_root = fs::metadata("/proc/self").unwrap().uid() == 0;
    // As root (CI), give the file another owner and group; otherwise they stay ours, and the
    // check is that they are kept.
    if is_root {
        std::os::unix::fs::chown(s.hs(), Some(4242), Some(4343)).unwrap();
    }
    fs::set_permissions(s.hs(), fs::Permissions::from_mode(0o604)).unwrap();
    let before = fs::metadata(s.hs()).unwrap();
    manage::merge(&s.merge_opts(Homeserver::Synapse)).unwrap();
    for path in [s.hs().to_path_buf(), s.hs_backup()] {
        let after = fs::metadata(&path).unwrap();
        assert_eq!(
            (after.uid(), after.gid(), mode(&path)),
            (before.uid(), before.gid(), 0o604),
            "{}",
            path.display()
        );
    }
    if is_root {
        assert_eq!((before.uid(), before.gid()), (4242, 4343));
    }
}

#[test]
fn a_symlinked_key_file_is_written_through_the_link() {
    let s = Setup::new(Homeserver::Synapse);
    let real = s.dir.path().join("real.key");
    fs::rename(s.hs(), &real).unwrap();
    std::os::unix::fs::symlink(&real, s.hs()).unwrap();
    manage::merge(&s.merge_opts(Homeserver::Synapse)).unwrap();
    assert!(
        fs::symlink_metadata(s.hs())
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(read(&real).keys().len(), 2);
    assert!(s.dir.path().join("real.key.backup").exists());
}

#[test]
fn synapse_merge_of_the_homeservers_own_key_changes_nothing() {
    let s = Setup::new(Homeserver::Synapse);
    write(s.media(), KeyFormat::Mmr, &[&s.hs_key]);
    let report = manage::merge(&s.merge_opts(Homeserver::Synapse)).unwrap();
    assert!(!report.changed);
    assert!(report.notes[0].contains("is the homeserver's own key"));
    assert_eq!(fs::read_to_string(s.hs()).unwrap(), s.original);
    assert!(!s.hs_backup().exists());
}

/// Runs `f`, expects an error whose message contains every one of `needles`, and checks that no
/// file of the directory changed.
fn refused(s: &Setup, f: impl FnOnce() -> Result<manage::Report, Error>, needles: &[&str]) {
    let before: Vec<(String, Vec<u8>)> = names(s.dir.path())
        .into_iter()
        .map(|n| {
            let bytes = fs::read(s.dir.path().join(&n)).unwrap();
            (n, bytes)
        })
        .collect();
    let err = f().expect_err("should be refused").to_string();
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    let after: Vec<(String, Vec<u8>)> = names(s.dir.path())
        .into_iter()
        .map(|n| {
            let bytes = fs::read(s.dir.path().join(&n)).unwrap();
            (n, bytes)
        })
        .collect();
    assert_eq!(before, after, "files changed although refused: {err}");
}

#[test]
fn merge_errors_name_the_file_and_line_and_write_nothing() {
    // A different key under the media repo key's id, first or later in the file.
    let s = Setup::new(Homeserver::Synapse);
    let impostor = key("Mm01_z");
    write(s.hs(), KeyFormat::Synapse, &[&s.hs_key, &impostor]);
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &[
            &format!("{}:2:", s.hs().display()),
            "a different key under the same key id ed25519:Mm01_z",
        ],
    );
    let s = Setup::new(Homeserver::Synapse);
    write(s.media(), KeyFormat::Mmr, &[&key("a_AbCd")]);
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &[&format!("{}:1:", s.hs().display()), "ed25519:a_AbCd"],
    );

    // Malformed lines, unsupported algorithms, malformed blocks.
    let s = Setup::new(Homeserver::Synapse);
    fs::write(
        s.hs(),
        format!("{}\nthis is not a key\n", s.original.trim_end()),
    )
    .unwrap();
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &[&format!("{}:2:", s.hs().display()), "expected `ed25519"],
    );
    let s = Setup::new(Homeserver::Synapse);
    fs::write(s.hs(), s.original.replace("ed25519 a_AbCd", "ed448 a_AbCd")).unwrap();
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &[
            &format!("{}:1:", s.hs().display()),
            "unsupported algorithm `ed448`",
        ],
    );
    let s = Setup::new(Homeserver::Synapse);
    let media = fs::read_to_string(s.media()).unwrap();
    fs::write(s.media(), media.replace("Version: 1", "Version: 2")).unwrap();
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &[&format!("{}:3:", s.media().display()), "`Version: 1`"],
    );

    // The wrong homeserver's format, a media repo file with two keys, missing files.
    let s = Setup::new(Homeserver::Dendrite);
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &[
            "is a Dendrite key file",
            "but Synapse reads a Synapse key file",
        ],
    );
    let s = Setup::new(Homeserver::Synapse);
    write(s.media(), KeyFormat::Mmr, &[&s.media_key, &key("x")]);
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &["holds 2 keys"],
    );
    let s = Setup::new(Homeserver::Synapse);
    fs::remove_file(s.media()).unwrap();
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &["no such file", "mmrctl keys generate --out"],
    );
    let s = Setup::new(Homeserver::Synapse);
    fs::remove_file(s.hs()).unwrap();
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &["no such file", "Synapse creates its key file"],
    );
}

#[test]
fn a_third_key_is_refused_unless_the_old_one_is_named() {
    // The homeserver's file has an earlier media repo key; the media repo's key file was
    // generated again.
    let s = Setup::new(Homeserver::Synapse);
    let earlier = key("old_mr");
    write(s.hs(), KeyFormat::Synapse, &[&s.hs_key, &earlier]);
    let text = fs::read_to_string(s.hs()).unwrap();
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Synapse)),
        &[
            "already holds ed25519:old_mr besides the homeserver's own key ed25519:a_AbCd",
            "A third key is not added",
            "--replace-key-id ed25519:old_mr",
            "mmrctl keys revoke --key-id ed25519:old_mr",
        ],
    );

    let old: KeyId = "ed25519:old_mr".parse().unwrap();
    let replace = Merge {
        replace_key_id: Some(&old),
        ..s.merge_opts(Homeserver::Synapse)
    };
    let report = manage::merge(&replace).unwrap();
    assert!(report.changed);
    assert_eq!(read(s.hs()).keys(), [s.hs_key.clone(), s.media_key.clone()]);
    assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), text);
    assert_eq!(report.old_keys.len(), 1);
    assert_eq!(report.old_keys[0].id, old);
    assert_eq!(
        report.old_keys[0].public_key_base64(),
        earlier.public_key_base64()
    );
    // Again, with the same arguments: converged.
    let again = manage::merge(&replace).unwrap();
    assert!(!again.changed);
    assert!(again.notes.iter().any(|n| n.contains("already replaced")));

    // The homeserver's own key is never replaced.
    let own: KeyId = "ed25519:a_AbCd".parse().unwrap();
    refused(
        &s,
        || {
            manage::merge(&Merge {
                replace_key_id: Some(&own),
                ..s.merge_opts(Homeserver::Synapse)
            })
        },
        &["is the homeserver's own key", ":1:"],
    );
}

#[test]
fn dendrite_merge_gives_the_media_repo_the_homeservers_key() {
    let s = Setup::new(Homeserver::Dendrite);
    let report = manage::merge(&s.merge_opts(Homeserver::Dendrite)).unwrap();
    assert!(report.changed);
    let media_backup = s.dir.path().join("media-repo.signing.key.backup");
    assert_eq!(report.backups, from_ref(&media_backup));
    assert_eq!(report.written, [s.media()]);
    let text = report.notes.join("\n");
    assert!(
        text.contains("Dendrite publishes only the first key of its key file"),
        "{text}"
    );
    assert!(text.contains("was not changed"), "{text}");
    // Dendrite's file is untouched; the media repo's holds Dendrite's key in the MMR format.
    assert_eq!(fs::read_to_string(s.hs()).unwrap(), s.original);
    let media = read(s.media());
    assert_eq!(media.format(), KeyFormat::Mmr);
    assert_eq!(media.keys(), from_ref(&s.hs_key));
    assert_eq!(mode(s.media()), 0o600);
    assert_eq!(read(&media_backup).keys(), from_ref(&s.media_key));

    let again = manage::merge(&s.merge_opts(Homeserver::Dendrite)).unwrap();
    assert!(!again.changed);
    assert!(again.notes[0].contains("nothing changed"));

    // Without a media repo key file, it is created (0600).
    fs::remove_file(s.media()).unwrap();
    let report = manage::merge(&s.merge_opts(Homeserver::Dendrite)).unwrap();
    assert!(report.changed && report.backups.is_empty());
    assert_eq!(read(s.media()).keys(), from_ref(&s.hs_key));
    assert_eq!(mode(s.media()), 0o600);
}

#[test]
fn dendrite_merge_reports_ignored_blocks_and_refuses_replace() {
    let s = Setup::new(Homeserver::Dendrite);
    // What the old playbook's merge left: a second block Dendrite never reads.
    write(s.hs(), KeyFormat::Dendrite, &[&s.hs_key, &key("old_mr")]);
    let report = manage::merge(&s.merge_opts(Homeserver::Dendrite)).unwrap();
    let text = report.notes.join("\n");
    assert!(text.contains("also holds ed25519:old_mr"), "{text}");
    assert!(text.contains("Dendrite ignores them"), "{text}");
    assert_eq!(read(s.media()).keys(), from_ref(&s.hs_key));

    let id: KeyId = "ed25519:old_mr".parse().unwrap();
    refused(
        &s,
        || {
            manage::merge(&Merge {
                replace_key_id: Some(&id),
                ..s.merge_opts(Homeserver::Dendrite)
            })
        },
        &["--replace-key-id", "revoke --homeserver dendrite"],
    );
    let s = Setup::new(Homeserver::Synapse);
    refused(
        &s,
        || manage::merge(&s.merge_opts(Homeserver::Dendrite)),
        &["is a Synapse key file", "but Dendrite reads"],
    );
}

#[test]
fn revoke_removes_a_later_key_and_reports_it_for_the_config() {
    for homeserver in [Homeserver::Synapse, Homeserver::Dendrite] {
        let s = Setup::new(homeserver);
        write(s.hs(), homeserver.key_format(), &[&s.hs_key, &s.media_key]);
        let text = fs::read_to_string(s.hs()).unwrap();
        let id = s.media_key.id().clone();
        let opts = Revoke {
            homeserver,
            homeserver_key: s.hs(),
            key_id: &id,
            now_ms: NOW,
        };
        let report = manage::revoke(&opts).unwrap();
        assert!(report.changed);
        assert_eq!(read(s.hs()).keys(), from_ref(&s.hs_key));
        assert_eq!(read(s.hs()).format(), homeserver.key_format());
        assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), text);
        assert_eq!(report.old_keys.len(), 1);
        let config = manage::old_keys_config(homeserver, &report.old_keys);
        let expected = match homeserver {
            Homeserver::Synapse => format!(
                "old_signing_keys:\n  \"ed25519:Mm01_z\":\n    key: \"{}\"\n    expired_ts: {NOW}\n",
                s.media_key.public_key_base64()
            ),
            Homeserver::Dendrite => format!(
                "global:\n  old_private_keys:\n    - public_key: \"{}\"\n      key_id: \
                 \"ed25519:Mm01_z\"\n      expired_at: {NOW}\n",
                s.media_key.public_key_base64_padded()
            ),
        };
        assert_eq!(config, expected);

        // Again: nothing to remove, but the config is still given (the key is in the backup).
        let again = manage::revoke(&opts).unwrap();
        assert!(!again.changed);
        assert_eq!(again.old_keys, report.old_keys);

        // The first key is never revoked; an unknown key is an error.
        let own = s.hs_key.id().clone();
        refused(
            &s,
            || {
                manage::revoke(&Revoke {
                    key_id: &own,
                    ..opts.clone()
                })
            },
            &["is the homeserver's own key"],
        );
        let unknown: KeyId = "ed25519:nope".parse().unwrap();
        refused(
            &s,
            || {
                manage::revoke(&Revoke {
                    key_id: &unknown,
                    ..opts.clone()
                })
            },
            &["no key ed25519:nope", "holds ed25519:a_AbCd"],
        );
    }
}

#[test]
fn generate_writes_0600_and_never_overwrites_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mr.key");
    let opts = Generate {
        out: &out,
        format: KeyFormat::Mmr,
        force: false,
        if_missing: false,
    };
    let made = manage::generate(&opts).unwrap();
    assert!(made.created);
    assert_eq!(made.id.version().len(), 6);
    assert_eq!(mode(&out), 0o600);
    let file = read(&out);
    assert_eq!(file.format(), KeyFormat::Mmr);
    assert_eq!(file.keys()[0].id(), &made.id);
    assert_eq!(file.keys()[0].public_key_base64(), made.public_key);
    let text = fs::read_to_string(&out).unwrap();

    let err = manage::generate(&opts).unwrap_err();
    assert!(matches!(err, Error::Exists { .. }), "{err}");
    assert_eq!(fs::read_to_string(&out).unwrap(), text);

    let kept = manage::generate(&Generate {
        if_missing: true,
        ..opts.clone()
    })
    .unwrap();
    assert!(!kept.created);
    assert_eq!(kept.id, made.id);
    assert_eq!(fs::read_to_string(&out).unwrap(), text);

    fs::set_permissions(&out, fs::Permissions::from_mode(0o640)).unwrap();
    let forced = manage::generate(&Generate {
        force: true,
        format: KeyFormat::Synapse,
        ..opts.clone()
    })
    .unwrap();
    assert_ne!(forced.public_key, made.public_key);
    assert_eq!(read(&out).format(), KeyFormat::Synapse);
    assert_eq!(mode(&out), 0o640);
    assert_eq!(names(dir.path()), ["mr.key"]);
}

#[test]
fn convert_between_formats() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("matrix_key.pem");
    let a = key("a");
    let b = key("b");
    write(&input, KeyFormat::Dendrite, &[&a, &b]);
    let out = dir.path().join("mr.key");
    let b_id = b.id().clone();
    let opts = Convert {
        input: &input,
        output: &out,
        format: KeyFormat::Mmr,
        key_id: Some(&b_id),
        force: false,
    };
    assert!(manage::convert(&opts).unwrap().changed);
    assert_eq!(read(&out).keys(), from_ref(&b));
    assert_eq!(read(&out).format(), KeyFormat::Mmr);
    assert_eq!(mode(&out), 0o600);
    // Same content again: nothing to do. Other content: needs force.
    assert!(!manage::convert(&opts).unwrap().changed);
    let all = Convert {
        key_id: None,
        format: KeyFormat::Synapse,
        ..opts.clone()
    };
    assert!(matches!(
        manage::convert(&all).unwrap_err(),
        Error::Exists { .. }
    ));
    manage::convert(&Convert { force: true, ..all }).unwrap();
    assert_eq!(read(&out).keys(), [a, b]);
    let missing: KeyId = "ed25519:zz".parse().unwrap();
    let err = manage::convert(&Convert {
        key_id: Some(&missing),
        ..opts
    })
    .unwrap_err();
    assert!(err.to_string().contains("no key ed25519:zz"), "{err}");
}

/// Stops `run` at its `n`th checkpoint; `Ok(true)` when it stopped, `Ok(false)` when it finished
/// first.
fn stop_at(n: usize, run: &dyn Fn(keys::Checkpoint<'_>) -> Result<manage::Report, Error>) -> bool {
    let mut seen = 0;
    let mut stop = |_: &Step| {
        seen += 1;
        if seen > n {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    match run(&mut stop) {
        Ok(_) => false,
        Err(Error::Stopped(_)) => true,
        Err(e) => panic!("failed instead of stopping: {e}"),
    }
}

/// For every pair of stopping points (n, then m on the rerun): stop there, check `invariant`, then
/// run to the end and check `converged`, then once more and check that nothing changes. Returns
/// how many stopping points the first run had.
fn crash_sweep(
    setup: &dyn Fn() -> Setup,
    run: &dyn Fn(&Setup, keys::Checkpoint<'_>) -> Result<manage::Report, Error>,
    invariant: &dyn Fn(&Setup),
    converged: &dyn Fn(&Setup),
) -> usize {
    let mut steps = 0;
    for n in 0.. {
        let s = setup();
        if !stop_at(n, &|cp| run(&s, cp)) {
            steps = n;
            break;
        }
        invariant(&s);
        for m in 0.. {
            let s2 = setup();
            assert!(stop_at(n, &|cp| run(&s2, cp)));
            let stopped_again = stop_at(m, &|cp| run(&s2, cp));
            invariant(&s2);
            if !stopped_again {
                converged(&s2);
                break;
            }
            run(&s2, &mut |_| ControlFlow::Continue(())).unwrap();
            converged(&s2);
        }
        let last = run(&s, &mut |_| ControlFlow::Continue(())).unwrap();
        converged(&s);
        let _ = last;
        let again = run(&s, &mut |_| ControlFlow::Continue(())).unwrap();
        assert!(!again.changed, "a run after convergence changed something");
        converged(&s);
    }
    steps
}

fn no_temp_files(dir: &Path) {
    for name in names(dir) {
        assert!(!name.ends_with(".mmrctl-tmp"), "left behind: {name}");
    }
}

#[test]
fn synapse_merge_converges_after_a_stop_at_any_step() {
    let setup = || Setup::new(Homeserver::Synapse);
    let run = |s: &Setup, cp: keys::Checkpoint<'_>| {
        manage::merge_with(&s.merge_opts(Homeserver::Synapse), cp)
    };
    let invariant = |s: &Setup| {
        let file = read(s.hs());
        assert_eq!(
            file.keys()[0],
            s.hs_key,
            "the homeserver's key must stay first"
        );
        assert!(file.keys().len() <= 2);
        if let Some(k) = file.keys().get(1) {
            assert_eq!(k, &s.media_key);
        }
        if s.hs_backup().exists() {
            assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), s.original);
        }
        assert_eq!(mode(s.hs()), 0o640);
    };
    let converged = |s: &Setup| {
        assert_eq!(read(s.hs()).keys(), [s.hs_key.clone(), s.media_key.clone()]);
        assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), s.original);
        assert_eq!(mode(s.hs()), 0o640);
        no_temp_files(s.dir.path());
    };
    let steps = crash_sweep(&setup, &run, &invariant, &converged);
    // Backup: temp written, renamed, synced; then the key file: the same three.
    assert_eq!(steps, 6);
}

#[test]
fn dendrite_merge_converges_after_a_stop_at_any_step() {
    let setup = || Setup::new(Homeserver::Dendrite);
    let run = |s: &Setup, cp: keys::Checkpoint<'_>| {
        manage::merge_with(&s.merge_opts(Homeserver::Dendrite), cp)
    };
    let media_backup = |s: &Setup| s.dir.path().join("media-repo.signing.key.backup");
    let invariant = |s: &Setup| {
        assert_eq!(fs::read_to_string(s.hs()).unwrap(), s.original);
        let media = read(s.media());
        assert!(
            media.keys() == from_ref(&s.media_key) || media.keys() == from_ref(&s.hs_key),
            "{media:?}"
        );
        if media_backup(s).exists() {
            assert_eq!(read(&media_backup(s)).keys(), from_ref(&s.media_key));
        }
    };
    let converged = |s: &Setup| {
        assert_eq!(fs::read_to_string(s.hs()).unwrap(), s.original);
        assert_eq!(read(s.media()).keys(), from_ref(&s.hs_key));
        assert_eq!(read(&media_backup(s)).keys(), from_ref(&s.media_key));
        no_temp_files(s.dir.path());
    };
    assert_eq!(crash_sweep(&setup, &run, &invariant, &converged), 6);
}

#[test]
fn revoke_converges_after_a_stop_at_any_step() {
    let setup = || {
        let s = Setup::new(Homeserver::Synapse);
        let original = write(s.hs(), KeyFormat::Synapse, &[&s.hs_key, &s.media_key]);
        Setup { original, ..s }
    };
    let run = |s: &Setup, cp: keys::Checkpoint<'_>| {
        let report = manage::revoke_with(
            &Revoke {
                homeserver: Homeserver::Synapse,
                homeserver_key: s.hs(),
                key_id: s.media_key.id(),
                now_ms: NOW,
            },
            cp,
        )?;
        // Every finished run gives the config for the removed key.
        assert_eq!(report.old_keys.len(), 1);
        assert_eq!(
            report.old_keys[0].public_key_base64(),
            s.media_key.public_key_base64()
        );
        Ok(report)
    };
    let invariant = |s: &Setup| {
        let file = read(s.hs());
        assert_eq!(file.keys()[0], s.hs_key);
        if s.hs_backup().exists() {
            assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), s.original);
        }
    };
    let converged = |s: &Setup| {
        assert_eq!(read(s.hs()).keys(), from_ref(&s.hs_key));
        assert_eq!(fs::read_to_string(s.hs_backup()).unwrap(), s.original);
        no_temp_files(s.dir.path());
    };
    assert_eq!(crash_sweep(&setup, &run, &invariant, &converged), 6);
}
