//! The Ansible role as the playbook runs it: lint, syntax, and its validation step calling this binary.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A program from the tools venv that `cargo xtask test` prepares.
fn tool(name: &str) -> PathBuf {
    let bin = std::env::var_os("MMRCTL_TOOLS_BIN").map(PathBuf::from).unwrap_or_else(|| {
        panic!("MMRCTL_TOOLS_BIN is not set: run the tests with `cargo xtask test`, which installs {name}")
    });
    let path = bin.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`, which installs it",
        path.display()
    );
    path
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .current_dir(root())
        .env("ANSIBLE_CONFIG", root().join("ansible.cfg"))
        .output()
        .unwrap();
    if !out.status.success() {
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

#[test]
fn ansible_lint_passes_with_the_production_profile() {
    let out = run(Command::new(tool("ansible-lint")).args(["--nocolor", "--offline"]));
    assert!(out.status.success(), "ansible-lint failed (output above)");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("Profile 'production' was required, and it passed"),
        "{text}"
    );
}

#[test]
fn the_playbook_passes_syntax_check() {
    let out = run(Command::new(tool("ansible-playbook")).args([
        "--syntax-check",
        "-i",
        "localhost,",
        "setup.yml",
    ]));
    assert!(
        out.status.success(),
        "ansible-playbook --syntax-check failed (output above)"
    );
}

/// An inventory with this host in `matrix_servers`, the playbook's other roles' defaults, and `vars`.
fn inventory(dir: &Path, vars: &str) -> PathBuf {
    let inv = dir.join("inventory");
    fs::create_dir_all(inv.join("group_vars/all")).unwrap();
    fs::create_dir_all(inv.join("host_vars/localhost")).unwrap();
    let python = tool("python").canonicalize().unwrap();
    fs::write(
        inv.join("hosts"),
        format!(
            "[matrix_servers]\nlocalhost ansible_connection=local ansible_python_interpreter={}\n",
            python.display()
        ),
    )
    .unwrap();
    fs::copy(
        root().join("crates/provision/data/playbook-defaults.yml"),
        inv.join("group_vars/all/playbook.yml"),
    )
    .unwrap();
    let quickstart = fs::read_to_string(root().join("examples/quickstart/vars.yml")).unwrap();
    let host = format!(
        "{quickstart}matrix_media_repo_binary_path: {}\nmatrix_base_data_path: {}\nansible_become: false\n{vars}",
        env!("CARGO_BIN_EXE_mmrctl"),
        dir.join("data").display()
    );
    fs::write(inv.join("host_vars/localhost/vars.yml"), host).unwrap();
    inv.join("hosts")
}

fn playbook(dir: &Path, vars: &str) -> (bool, String) {
    let tmp = dir.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let out = run(Command::new(tool("ansible-playbook"))
        .args(["-i", inventory(dir, vars).to_str().unwrap(), "setup.yml"])
        .env("TMPDIR", &tmp));
    // The variables file holds secrets: it must be gone, whatever happened.
    let left: Vec<_> = fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.iter()
            .all(|p| !p.to_string_lossy().ends_with(".mmrctl")),
        "left behind: {left:?}"
    );
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_role_validates_through_mmrctl() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = playbook(dir.path(), "");
    assert!(ok, "the quickstart must validate");
    assert!(
        output.contains("Check the configuration with mmrctl render --check"),
        "{output}"
    );

    let dir = tempfile::tempdir().unwrap();
    let (ok, output) = playbook(dir.path(), "matrix_media_repo_max_byts: 5\n");
    assert!(!ok, "a misspelled variable must fail the run");
    assert!(
        output.contains("did you mean `matrix_media_repo_max_bytes`?"),
        "{output}"
    );
}
