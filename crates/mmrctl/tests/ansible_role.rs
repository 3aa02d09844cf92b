//! The Ansible role as the playbook runs it: lint, syntax, and its validation step calling this binary.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Test helpers panic and print: that is how a test fails.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

mod support;

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

#[test]
fn the_role_validates_through_mmrctl_and_leaves_no_secrets_behind() {
    let run = RoleRun::new();
    let (ok, output) = run.play("matrix_media_repo_max_byts: 5\n");
    assert!(!ok, "a misspelled variable must fail the run");
    assert!(
        output.contains("Check the configuration with mmrctl render --check"),
        "{output}"
    );
    assert!(
        output.contains("did you mean `matrix_media_repo_max_bytes`?"),
        "{output}"
    );
    // The variables file holds secrets: it must be gone, whatever happened.
    let left: Vec<_> = fs::read_dir(run.dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(
        left.iter()
            .all(|p| !p.to_string_lossy().ends_with(".mmrctl")),
        "left behind: {left:?}"
    );
    // Nothing was installed.
    assert!(!run.path("systemd/matrix-media-repo.service").exists());
}

/// The role installing into a temporary root: everything under one directory through its variables.
struct RoleRun {
    dir: tempfile::TempDir,
    db: testkit::TestDb,
    port: u16,
}

impl RoleRun {
    fn new() -> RoleRun {
        let dir = tempfile::tempdir().unwrap();
        for sub in [
            "systemd",
            "traefik-dynamic",
            "synapse",
            "nginx-conf.d",
            "caddy-conf.d",
        ] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        // The homeserver's key file, as Synapse would have it.
        let hs_key = dir.path().join("synapse/example.com.signing.key");
        let out = Command::new(env!("CARGO_BIN_EXE_mmrctl"))
            .args(["keys", "generate", "--format", "synapse", "--out"])
            .arg(&hs_key)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        RoleRun {
            dir,
            db: testkit::TestDb::new(),
            port,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn base(&self) -> PathBuf {
        self.path("matrix/matrix-media-repo")
    }

    /// Runs the role with the quickstart, the temp-root variables and `extra`; returns (ok, output).
    fn play(&self, extra: &str) -> (bool, String) {
        let inv = self.path("inventory");
        fs::create_dir_all(inv.join("group_vars/all")).unwrap();
        fs::create_dir_all(inv.join("group_vars/matrix_servers")).unwrap();
        fs::create_dir_all(inv.join("host_vars/localhost")).unwrap();
        let python = tool("python").canonicalize().unwrap();
        fs::write(
            inv.join("hosts"),
            format!("[matrix_servers]\nlocalhost ansible_connection=local ansible_python_interpreter={}\n", python.display()),
        )
        .unwrap();
        fs::copy(
            root().join("crates/provision/data/playbook-defaults.yml"),
            inv.join("group_vars/all/playbook.yml"),
        )
        .unwrap();
        fs::copy(
            root().join("group_vars/matrix_servers/matrix-media-repo.yml"),
            inv.join("group_vars/matrix_servers/matrix-media-repo.yml"),
        )
        .unwrap();
        let id = |flag: &str| {
            String::from_utf8(Command::new("id").arg(flag).output().unwrap().stdout)
                .unwrap()
                .trim()
                .to_owned()
        };
        let support::Pg { host, port, user } = support::pg();
        let quickstart = fs::read_to_string(root().join("examples/quickstart/vars.yml")).unwrap();
        let vars = format!(
            "{quickstart}\
             ansible_become: false\n\
             matrix_base_data_path: {root}/matrix\n\
             matrix_media_repo_binary_src: {bin}\n\
             matrix_media_repo_binary_path: {root}/bin/mmrctl\n\
             matrix_media_repo_systemd_path: {root}/systemd\n\
             matrix_media_repo_bash_completion_path: {root}/share/bash-completion/completions/mmrctl\n\
             matrix_media_repo_zsh_completion_path: {root}/share/zsh/site-functions/_mmrctl\n\
             matrix_media_repo_fish_completion_path: {root}/share/fish/vendor_completions.d/mmrctl.fish\n\
             matrix_media_repo_man_path: {root}/share/man/man1\n\
             matrix_media_repo_traefik_config_dir: {root}/traefik-dynamic\n\
             matrix_media_repo_webserver_nginx_config_dir: {root}/nginx-conf.d\n\
             matrix_media_repo_webserver_caddy_config_dir: {root}/caddy-conf.d\n\
             matrix_media_repo_user: {user_name}\n\
             matrix_media_repo_group: {group_name}\n\
             matrix_media_repo_bind_address: 127.0.0.1\n\
             matrix_media_repo_port: {port_http}\n\
             matrix_media_repo_database_hostname: {host}\n\
             matrix_media_repo_database_port: {port}\n\
             matrix_media_repo_database_username: {user}\n\
             matrix_media_repo_database_password: ''\n\
             matrix_media_repo_database_name: {db}\n\
             matrix_media_repo_homeserver_signing_key: {root}/synapse/example.com.signing.key\n\
             matrix_media_repo_shared_secret_auth_enabled: true\n\
             matrix_media_repo_shared_secret_auth_token: role-test-secret\n\
             matrix_media_repo_container_image_tag: v1.3.8\n\
             {extra}",
            root = self.dir.path().display(),
            bin = env!("CARGO_BIN_EXE_mmrctl"),
            user_name = id("-un"),
            group_name = id("-gn"),
            port_http = self.port,
            db = self.db.name(),
        );
        fs::write(inv.join("host_vars/localhost/vars.yml"), vars).unwrap();
        let playbook = self.path("play.yml");
        fs::write(
            &playbook,
            "- name: Media repo\n  hosts: matrix_servers\n  roles:\n    - role: custom/matrix-media-repo\n  post_tasks:\n    \
             - name: Show the restart flag\n      ansible.builtin.debug:\n        \
             msg: \"restart_necessary={{ matrix_media_repo_restart_necessary }}\"\n",
        )
        .unwrap();
        let out = Command::new(tool("ansible-playbook"))
            .args([
                "-i",
                inv.join("hosts").to_str().unwrap(),
                playbook.to_str().unwrap(),
            ])
            .env("ANSIBLE_ROLES_PATH", root().join("roles"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("TMPDIR", self.path(""))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

fn changed_count(output: &str) -> u32 {
    let recap = output
        .lines()
        .find(|l| l.contains("localhost") && l.contains("changed="))
        .unwrap_or_else(|| panic!("{output}"));
    recap
        .split("changed=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn the_role_installs_runs_is_idempotent_and_uninstalls() {
    let run = RoleRun::new();
    let (ok, out) = run.play("");
    assert!(ok, "{out}");
    assert!(out.contains("restart_necessary=True"), "{out}");
    assert!(
        out.contains("matrix_media_repo_container_image_tag"),
        "an old container variable warns: {out}"
    );
    let base = run.base();
    assert!(base.join("config/media-repo.yaml").is_file());
    assert!(run.path("systemd/matrix-media-repo.service").is_file());
    // Completions and man pages, generated from the binary's command line.
    let bash = fs::read_to_string(run.path("share/bash-completion/completions/mmrctl")).unwrap();
    assert!(
        bash.contains("doctor") && bash.contains("complete"),
        "{bash}"
    );
    assert!(run.path("share/zsh/site-functions/_mmrctl").is_file());
    assert!(
        run.path("share/fish/vendor_completions.d/mmrctl.fish")
            .is_file()
    );
    let man = fs::read_to_string(run.path("share/man/man1/mmrctl-doctor.1")).unwrap();
    assert!(man.contains(".TH mmrctl-doctor 1"), "{man}");
    assert!(run.path("share/man/man1/mmrctl.1").is_file());
    assert!(run.path("traefik-dynamic/matrix-media-repo.yml").is_file());
    // The webservers' copies, readable by their workers.
    for copy in [
        "nginx-conf.d/matrix-media-repo.conf",
        "caddy-conf.d/matrix-media-repo.Caddyfile",
    ] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(run.path(copy)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644, "{copy}");
    }
    assert!(run.path("bin/import_synapse").is_symlink());
    // The media repo's key, merged behind the homeserver's own, with a backup of the original.
    let hs_key = run.path("synapse/example.com.signing.key");
    assert!(run.path("synapse/example.com.signing.key.backup").is_file());
    assert_eq!(fs::read_to_string(&hs_key).unwrap().lines().count(), 2);
    assert!(base.join("config/matrix-media-repo.signing.key").is_file());

    // The service, started the way the unit starts it, serves media.
    let unit = fs::read_to_string(run.path("systemd/matrix-media-repo.service")).unwrap();
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    let argv: Vec<&str> = exec.split_whitespace().collect();
    let mut server = Command::new(argv[0])
        .args(&argv[1..])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base_url = format!("http://127.0.0.1:{}", run.port);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", run.port)).is_err()
        || testkit::http::get(&format!("{base_url}/healthz"), &[]).status != 200
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the installed service did not become healthy"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let auth = [
        ("Host", "example.com"),
        ("Authorization", "Bearer role-test-secret"),
    ];
    let body = vec![7u8; 4096];
    let r = testkit::http::send(
        "POST",
        &format!("{base_url}/_matrix/media/v3/upload"),
        &auth,
        Some("image/png"),
        &body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mxc = r.json()["content_uri"].as_str().unwrap().to_owned();
    let r = testkit::http::get(
        &format!(
            "{base_url}/_matrix/client/v1/media/download/{}",
            &mxc["mxc://".len()..]
        ),
        &auth,
    );
    assert_eq!((r.status, r.body.clone()), (200, body));
    let _ = server.kill();
    let _ = server.wait();

    // A second run changes nothing.
    let (ok, out) = run.play("");
    assert!(ok, "{out}");
    assert_eq!(changed_count(&out), 0, "{out}");
    assert!(out.contains("restart_necessary=False"), "{out}");

    // One variable changes one file, and asks for a restart.
    let unit_before = fs::read_to_string(run.path("systemd/matrix-media-repo.service")).unwrap();
    let (ok, out) = run.play("matrix_media_repo_max_bytes: 12345678\n");
    assert!(ok, "{out}");
    let changed: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("\"msg\": \"changed: "))
        .collect();
    // The config, and the webservers' body size limits, which follow the upload limit.
    assert_eq!(
        changed.len(),
        3,
        "only the config and webserver files change: {out}"
    );
    for file in [
        "config/media-repo.yaml",
        "nginx/matrix-media-repo.conf",
        "caddy/matrix-media-repo.Caddyfile",
    ] {
        assert!(
            changed.iter().any(|l| l.contains(file)),
            "{file} unchanged: {out}"
        );
    }
    assert_eq!(
        fs::read_to_string(run.path("systemd/matrix-media-repo.service")).unwrap(),
        unit_before
    );
    assert!(out.contains("restart_necessary=True"), "{out}");
    assert!(
        fs::read_to_string(base.join("config/media-repo.yaml"))
            .unwrap()
            .contains("maxBytes: 12345678")
    );

    // Uninstalling removes the unit and keeps the data, and says what to do about the key.
    let (ok, out) = run.play("matrix_media_repo_enabled: false\n");
    assert!(ok, "{out}");
    assert!(!run.path("systemd/matrix-media-repo.service").exists());
    assert!(base.join("config/media-repo.yaml").is_file());
    assert!(base.join("data").is_dir());
    assert!(out.contains("mmrctl keys revoke"), "{out}");
}
