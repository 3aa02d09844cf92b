//! `mmrctl render` as an operator and the Ansible role run it.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn mmrctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mmrctl"))
        .args(args)
        .output()
        .expect("mmrctl runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Writes a vars file: the quickstart plus `extra`.
fn vars(dir: &Path, extra: &str) -> PathBuf {
    let quickstart = fs::read_to_string(root().join("examples/quickstart/vars.yml")).unwrap();
    let path = dir.join("vars.yml");
    fs::write(&path, format!("{quickstart}{extra}")).unwrap();
    path
}

fn render(vars: &Path, out: &Path, flags: &[&str]) -> Output {
    let mut args = vec![
        "render",
        vars.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(flags);
    mmrctl(&args)
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn first_render_writes_everything_and_a_second_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let vars = vars(dir.path(), "");

    let first = render(&vars, &out, &["--json"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let report = json(&first);
    assert_eq!(report["ok"], true);
    assert_eq!(report["changed"], true);
    let files = report["files"].as_array().unwrap();
    assert_eq!(files.len(), 7);
    assert!(files.iter().all(|f| f["status"] == "created"), "{report}");

    assert_eq!(
        mode(&out.join("config/media-repo.yaml")),
        0o640,
        "the config holds the database password"
    );
    assert_eq!(mode(&out.join("labels")), 0o640);
    assert_eq!(mode(&out.join("matrix-media-repo.service")), 0o644);
    assert!(out.join("traefik/matrix-media-repo.yml").is_file());
    assert!(out.join("homeserver-snippet.yaml").is_file());
    assert!(out.join("nginx/matrix-media-repo.conf").is_file());
    assert!(out.join("caddy/matrix-media-repo.Caddyfile").is_file());

    let second = render(&vars, &out, &["--json"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let report = json(&second);
    assert_eq!(report["changed"], false, "{report}");
    assert!(
        report["files"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["status"] == "unchanged")
    );

    let human = render(&vars, &out, &[]);
    assert!(
        stdout(&human).contains("everything is up to date"),
        "{}",
        stdout(&human)
    );
}

#[test]
fn changing_one_variable_rewrites_only_the_affected_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    assert!(render(&vars(dir.path(), ""), &out, &[]).status.success());
    let unit_before = fs::read_to_string(out.join("matrix-media-repo.service")).unwrap();

    let changed = vars(dir.path(), "matrix_media_repo_max_bytes: 1048576\n");
    let check = render(&changed, &out, &["--check", "--diff"]);
    assert!(check.status.success(), "{}", stderr(&check));
    let text = stdout(&check);
    assert!(text.contains("+  maxBytes: 1048576"), "{text}");
    assert!(
        text.contains("would change") && text.contains("check passed; 3 file(s) would change"),
        "{text}"
    );
    assert!(
        !fs::read_to_string(out.join("config/media-repo.yaml"))
            .unwrap()
            .contains("maxBytes: 1048576\n")
    );

    let report = json(&render(&changed, &out, &["--json"]));
    let status = |suffix: &str| {
        report["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"].as_str().unwrap().ends_with(suffix))
            .unwrap()["status"]
            .clone()
    };
    assert_eq!(status("media-repo.yaml"), "changed");
    // The webservers' body size limits follow the upload limit.
    assert_eq!(status("matrix-media-repo.conf"), "changed");
    assert_eq!(status("matrix-media-repo.Caddyfile"), "changed");
    // Dendrite's snippet carries the upload limit; Synapse's does not.
    assert_eq!(status("homeserver-snippet.yaml"), "unchanged");
    assert_eq!(status("labels"), "unchanged");
    assert_eq!(status(".service"), "unchanged");
    assert_eq!(
        fs::read_to_string(out.join("matrix-media-repo.service")).unwrap(),
        unit_before
    );
}

#[test]
fn check_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = render(&vars(dir.path(), ""), &out, &["--check"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("would create"));
    assert!(!out.exists());
}

#[test]
fn errors_fail_with_file_and_line_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let vars = vars(dir.path(), "matrix_media_repo_port: not-a-port\n");
    let o = render(&vars, &out, &[]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("`matrix_media_repo_port` ({}:", vars.display())),
        "{err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    assert!(!out.exists());

    let o = render(&vars, &out, &["--json"]);
    assert_eq!(o.status.code(), Some(1));
    let report = json(&o);
    assert_eq!(report["ok"], false);
    assert!(
        report["errors"][0]
            .as_str()
            .unwrap()
            .contains("matrix_media_repo_port")
    );
}

#[test]
fn a_missing_vars_file_is_named() {
    let o = mmrctl(&["render", "/nonexistent/vars.yml", "--out", "/tmp/never"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/nonexistent/vars.yml"),
        "{}",
        stderr(&o)
    );
}

/// `systemd-analyze verify` accepts the unit, with stub units for its dependencies.
#[test]
fn systemd_accepts_the_generated_unit() {
    let analyze = which("systemd-analyze").unwrap_or_else(|| {
        panic!("systemd-analyze is missing: install Debian's `systemd` package or run `cargo xtask test`, which does")
    });
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let data = dir.path().join("data");
    fs::create_dir_all(&data).unwrap();
    let extra = format!(
        "matrix_media_repo_binary_path: {}\nmatrix_media_repo_data_path: {}\n",
        env!("CARGO_BIN_EXE_mmrctl"),
        data.display()
    );
    let o = render(&vars(dir.path(), &extra), &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let unit = fs::read_to_string(out.join("matrix-media-repo.service")).unwrap();

    let units = dir.path().join("units");
    fs::create_dir_all(&units).unwrap();
    for line in unit.lines() {
        if let Some(dep) = line
            .strip_prefix("Requires=")
            .or_else(|| line.strip_prefix("Wants="))
            && !dep.starts_with("network")
        {
            fs::write(
                units.join(dep),
                "[Unit]\nDescription=stub\n[Service]\nExecStart=/bin/true\n",
            )
            .unwrap();
        }
    }
    fs::write(units.join("matrix-media-repo.service"), &unit).unwrap();
    let o = Command::new(analyze)
        .arg("verify")
        .arg(units.join("matrix-media-repo.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", units.display()))
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "systemd-analyze verify: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(unit.contains(&format!(
        "ExecStart={} serve --config",
        env!("CARGO_BIN_EXE_mmrctl")
    )));
    assert!(unit.contains(&format!("ReadWritePaths={}", data.display())));
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let o = mmrctl(&["--version"]);
    assert!(o.status.success());
    let text = stdout(&o);
    let commit = text
        .split("(commit ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no commit in {text:?}"));
    let head = std::process::Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short=12",
            "HEAD",
        ])
        .output()
        .unwrap();
    assert!(head.status.success(), "the tests run in a git checkout");
    assert_eq!(commit, String::from_utf8_lossy(&head.stdout).trim());
}
