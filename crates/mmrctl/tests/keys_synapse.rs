//! `mmrctl keys` against a real Synapse (from the tools venv): Synapse reads the merged key file,
//! publishes both keys, and a request the media repo signs verifies with Synapse's own X-Matrix
//! header parser and signedjson against the published key; after `revoke`, the printed
//! `old_signing_keys` is what Synapse publishes as old keys.
#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use keys::{KeyFile, SigningKey};
use serde_json::{Value, json};
use testkit::Synapse;

const SERVER: &str = "syn.test";

/// What Synapse's federation server does with an incoming request (`authenticate_request`):
/// parse the X-Matrix header with Synapse's own parser, build the signed JSON, and verify it with
/// signedjson against the key the origin publishes in `verify_keys` (whose response must itself
/// be signed by that key). Reads the case as JSON on stdin; exits non-zero with the reason.
const VERIFY_PY: &str = r#"
import json, sys
from signedjson.key import decode_verify_key_bytes
from signedjson.sign import verify_signed_json, SignatureVerifyException
from unpaddedbase64 import decode_base64
from synapse.federation.transport.server._base import _parse_auth_header

case = json.load(sys.stdin)
keys = case["server_keys"]
origin, key_id, sig, destination = _parse_auth_header(case["header"].encode())
if destination != case["destination"]:
    sys.exit(f"destination {destination!r} is not {case['destination']!r}")
if keys["server_name"] != origin:
    sys.exit(f"the keys are {keys['server_name']}'s, the request is from {origin}")
published = keys["verify_keys"].get(key_id)
if published is None:
    sys.exit(f"{key_id} is not in {origin}'s verify_keys")
verify_key = decode_verify_key_bytes(key_id, decode_base64(published["key"]))
try:
    verify_signed_json(keys, origin, verify_key)
except SignatureVerifyException as e:
    sys.exit(f"the key response is not signed by {key_id}: {e}")
request = {
    "method": case["method"],
    "uri": case["uri"],
    "origin": origin,
    "destination": case["destination"],
    "signatures": {origin: {key_id: sig}},
}
if "content" in case:
    request["content"] = case["content"]
try:
    verify_signed_json(request, origin, verify_key)
except SignatureVerifyException as e:
    sys.exit(f"bad signature: {e}")
print(f"verified {key_id}")
"#;

/// Synapse's own reader of `signing_key_path` (`KeyConfig.read_signing_keys`): prints
/// `<key id> <public key>` per key.
const READ_KEYS_PY: &str = r#"
import sys
from signedjson.key import encode_verify_key_base64, get_verify_key
from synapse.config._base import RootConfig
from synapse.config.key import KeyConfig

for key in KeyConfig(RootConfig()).read_signing_keys(sys.argv[1], "signing_key"):
    print(f"{key.alg}:{key.version} {encode_verify_key_base64(get_verify_key(key))}")
"#;

fn mmrctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(args)
        .output()
        .unwrap()
}

fn success(out: &Output) -> String {
    assert!(
        out.status.success(),
        "mmrctl failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn python(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(testkit::python())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn read_key(path: &Path) -> KeyFile {
    KeyFile::parse(
        &fs::read_to_string(path).unwrap(),
        &path.display().to_string(),
    )
    .unwrap()
}

/// Synapse's key (written by Synapse's own `generate_signing_key` script), the media repo's key
/// (`mmrctl keys generate`), merged (`mmrctl keys merge`). Returns the homeserver's key file and
/// the media repo's key.
fn merged_key_file(dir: &Path) -> (PathBuf, SigningKey, SigningKey) {
    let hs = dir.join(format!("{SERVER}.signing.key"));
    let out = python(
        &[
            "-m",
            "synapse._scripts.generate_signing_key",
            "-o",
            hs.to_str().unwrap(),
        ],
        "",
    );
    assert!(out.status.success(), "{out:?}");
    let hs_key = read_key(&hs).keys()[0].clone();
    let mr = dir.join("media-repo.signing.key");
    success(&mmrctl(&[
        "keys",
        "generate",
        "--out",
        mr.to_str().unwrap(),
    ]));
    let merged = success(&mmrctl(&[
        "keys",
        "merge",
        "--homeserver",
        "synapse",
        "--homeserver-key",
        hs.to_str().unwrap(),
        "--media-repo-key",
        mr.to_str().unwrap(),
    ]));
    assert!(merged.starts_with("added the media repo's key"), "{merged}");
    let media_key = read_key(&mr).keys()[0].clone();
    (hs, hs_key, media_key)
}

/// Runs [`VERIFY_PY`] on a request signed by `key` (as `origin`), checked against `server_keys`.
fn verify(
    server_keys: &Value,
    key: &SigningKey,
    origin: &str,
    signed: (&str, &str, Option<&Value>),
    received: (&str, &str, Option<&Value>),
) -> Result<String, String> {
    let destination = "remote.test";
    let header =
        keys::sign_request(key, origin, destination, signed.0, signed.1, signed.2).unwrap();
    let mut case = json!({
        "server_keys": server_keys,
        "header": header,
        "method": received.0,
        "uri": received.1,
        "destination": destination,
    });
    if let Some(content) = received.2 {
        case["content"] = content.clone();
    }
    let out = python(&["-c", VERIFY_PY], &case.to_string());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn synapse_publishes_the_merged_key_and_requests_signed_with_it_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, hs_key, media_key) = merged_key_file(dir.path());

    // Synapse's own key reader accepts the merged file: the homeserver's key first.
    let read = python(&["-c", READ_KEYS_PY, hs.to_str().unwrap()], "");
    assert!(read.status.success(), "{read:?}");
    assert_eq!(
        String::from_utf8_lossy(&read.stdout),
        format!(
            "{} {}\n{} {}\n",
            hs_key.id(),
            hs_key.public_key_base64(),
            media_key.id(),
            media_key.public_key_base64()
        )
    );

    let synapse = Synapse::builder(SERVER).signing_key_path(&hs).start();
    let published = synapse.server_keys();
    eprintln!(
        "GET /_matrix/key/v2/server: verify_keys = {}",
        published["verify_keys"]
    );
    assert_eq!(published["server_name"], SERVER);
    assert_eq!(
        published["verify_keys"],
        json!({
            hs_key.id().to_string(): {"key": hs_key.public_key_base64()},
            media_key.id().to_string(): {"key": media_key.public_key_base64()},
        })
    );

    // Requests the media repo signs verify against what Synapse publishes: a media download
    // (no body), and a request with a body (canonical JSON must agree with Python's).
    let download = "/_matrix/federation/v1/media/download/abcDEF123?timeout_ms=20000";
    let ok = verify(
        &published,
        &media_key,
        SERVER,
        ("GET", download, None),
        ("GET", download, None),
    )
    .unwrap();
    assert_eq!(ok.trim(), format!("verified {}", media_key.id()));
    let content = json!({
        "z": [1, -2, 9007199254740991_i64, null, true],
        "a": {"é": "日本語 \u{1F600}", "\u{7f}": "\"\\\n\t\u{1}", "A": {}},
    });
    verify(
        &published,
        &media_key,
        SERVER,
        ("PUT", "/_matrix/federation/v1/send/1", Some(&content)),
        ("PUT", "/_matrix/federation/v1/send/1", Some(&content)),
    )
    .unwrap();
    // The homeserver's own key verifies too (it keeps signing).
    verify(
        &published,
        &hs_key,
        SERVER,
        ("GET", download, None),
        ("GET", download, None),
    )
    .unwrap();

    // And the checks can fail: another URI, another body, a key Synapse does not publish.
    let err = verify(
        &published,
        &media_key,
        SERVER,
        ("GET", download, None),
        ("GET", "/_matrix/federation/v1/media/download/other", None),
    )
    .unwrap_err();
    assert!(err.contains("bad signature"), "{err}");
    let err = verify(
        &published,
        &media_key,
        SERVER,
        ("PUT", "/x", Some(&content)),
        ("PUT", "/x", Some(&json!({"z": 1}))),
    )
    .unwrap_err();
    assert!(err.contains("bad signature"), "{err}");
    let stranger = SigningKey::generate().unwrap();
    let err = verify(
        &published,
        &stranger,
        SERVER,
        ("GET", download, None),
        ("GET", download, None),
    )
    .unwrap_err();
    assert!(err.contains("is not in syn.test's verify_keys"), "{err}");
}

#[test]
fn after_revoke_synapse_publishes_the_printed_old_signing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let (hs, hs_key, media_key) = merged_key_file(dir.path());
    let media_id = media_key.id().to_string();
    let printed = success(&mmrctl(&[
        "keys",
        "revoke",
        "--homeserver",
        "synapse",
        "--homeserver-key",
        hs.to_str().unwrap(),
        "--key-id",
        &media_id,
    ]));
    // The config block, exactly as printed for the operator to paste into homeserver.yaml.
    let at = printed
        .find("old_signing_keys:")
        .unwrap_or_else(|| panic!("no old_signing_keys in:\n{printed}"));
    let yaml = &printed[at..];
    let expired_ts: u64 = yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("expired_ts: "))
        .unwrap()
        .parse()
        .unwrap();

    let synapse = Synapse::builder(SERVER)
        .signing_key_path(&hs)
        .config_yaml(yaml)
        .start();
    let published = synapse.server_keys();
    eprintln!(
        "GET /_matrix/key/v2/server: verify_keys = {}, old_verify_keys = {}",
        published["verify_keys"], published["old_verify_keys"]
    );
    assert_eq!(
        published["verify_keys"],
        json!({hs_key.id().to_string(): {"key": hs_key.public_key_base64()}})
    );
    assert_eq!(
        published["old_verify_keys"],
        json!({media_id.clone(): {"key": media_key.public_key_base64(), "expired_ts": expired_ts}})
    );
    // A request signed with the revoked key no longer verifies.
    let err = verify(
        &published,
        &media_key,
        SERVER,
        ("GET", "/_matrix/federation/v1/media/download/x", None),
        ("GET", "/_matrix/federation/v1/media/download/x", None),
    )
    .unwrap_err();
    assert!(err.contains("is not in syn.test's verify_keys"), "{err}");
}
