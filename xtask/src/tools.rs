//! Outside programs the tests drive: the Python tools venv (everything pinned in
//! `xtask/requirements-tools.txt`), `systemd-analyze` and nginx.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{self, note};

pub(crate) const TOOLS_BIN_VAR: &str = "MMRCTL_TOOLS_BIN";

/// The nginx binary the federation tests put in front of their homeservers (testkit reads it).
pub(crate) const NGINX_VAR: &str = "MMRCTL_NGINX";
/// Caddy and promtool for the deployment tests (testkit reads them).
pub(crate) const CADDY_VAR: &str = "MMRCTL_CADDY";
pub(crate) const PROMTOOL_VAR: &str = "MMRCTL_PROMTOOL";

/// The pinned requirements; adding a tool is adding a line there.
fn requirements_file() -> PathBuf {
    util::workspace_root()
        .join("xtask")
        .join("requirements-tools.txt")
}

/// Records which requirements the venv was last installed from (their content hash).
const STAMP: &str = ".xtask-requirements-hash";

/// Makes sure `<target>/tools-venv` exists and holds what the requirements file pins, running
/// pip only when that file changed since the last install. Returns the venv's `bin` directory.
pub(crate) fn ensure_venv(target: &Path) -> Result<PathBuf> {
    let requirements_path = requirements_file();
    let requirements = std::fs::read(&requirements_path).with_context(|| {
        format!(
            "cannot read {} (the pinned Python tools the tests use)",
            requirements_path.display()
        )
    })?;
    let want = util::content_hash(&requirements);
    let venv = target.join("tools-venv");
    let bin = venv.join("bin");
    let python = bin.join("python");
    let stamp = venv.join(STAMP);

    if !util::is_executable(&python) {
        create_venv(&venv)?;
    }
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    if have.trim() != want {
        note!(
            "installing Python tools into {} (pip, from {})",
            venv.display(),
            requirements_path.display()
        );
        // A failed install must not leave a stamp that claims success.
        let _ = std::fs::remove_file(&stamp);
        let mut pip = Command::new(&python);
        pip.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-r",
        ])
        .arg(&requirements_path);
        let status = util::run_status(&mut pip)?;
        if !status.success() {
            bail!(
                "`{}` failed ({status}). PyPI must be reachable and the pins in {} must \
                 install together on this Python; fix the pins, or delete {} to start over.",
                util::display_command(&pip),
                requirements_path.display(),
                venv.display()
            );
        }
        std::fs::write(&stamp, format!("{want}\n"))
            .with_context(|| format!("cannot write {}", stamp.display()))?;
    }
    note!(
        "tools venv ready ({}: {})",
        venv.display(),
        pins(&String::from_utf8_lossy(&requirements)).join(", ")
    );
    Ok(bin)
}

fn create_venv(venv: &Path) -> Result<()> {
    let Some(python3) = util::find_on_path("python3") else {
        bail!(
            "python3 is not on PATH; the tests need it for their Python tools. Install it \
             (Debian/Ubuntu: `apt-get install python3 python3-venv`)."
        );
    };
    if venv.exists() {
        // Left half-made, or its Python is gone: start over.
        std::fs::remove_dir_all(venv)
            .with_context(|| format!("cannot remove the broken venv {}", venv.display()))?;
    }
    note!("creating the tools venv {}", venv.display());
    let mut cmd = Command::new(python3);
    cmd.args(["-m", "venv"]).arg(venv);
    let result = util::run_captured(
        &mut cmd,
        "python3 could not create a venv. Debian/Ubuntu ship that part separately: \
         `apt-get install python3-venv`.",
    );
    if result.is_err() {
        let _ = std::fs::remove_dir_all(venv);
    }
    result.map(drop)
}

/// The requirement lines of a requirements file, without comments and blanks.
fn pins(requirements: &str) -> Vec<&str> {
    requirements
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|line| !line.is_empty())
        .collect()
}

/// Makes sure `systemd-analyze` is on PATH, installing Debian's `systemd` package when running as
/// root.
pub(crate) fn ensure_systemd_analyze() -> Result<()> {
    if let Some(path) = util::find_on_path("systemd-analyze") {
        note!("systemd-analyze at {}", path.display());
        return Ok(());
    }
    let how = "install the `systemd` package (Debian/Ubuntu: \
               `apt-get install --no-install-recommends systemd`, as root)";
    if !util::is_root() {
        bail!("systemd-analyze is not on PATH; the tests check the rendered unit with it: {how}");
    }
    if util::find_on_path("apt-get").is_none() {
        bail!(
            "systemd-analyze is not on PATH and there is no apt-get to install it with; {how}, \
             or whatever package provides systemd-analyze on this system"
        );
    }
    note!("systemd-analyze is not on PATH: installing Debian's `systemd` package");
    let install = || {
        let mut cmd = Command::new("apt-get");
        cmd.args(["install", "-y", "--no-install-recommends", "systemd"])
            .env("DEBIAN_FRONTEND", "noninteractive");
        util::run_status(&mut cmd).is_ok_and(|s| s.success())
    };
    if !install() {
        note!("apt-get install failed: running apt-get update and trying again");
        let mut update = Command::new("apt-get");
        update.arg("update");
        let updated = util::run_status(&mut update).is_ok_and(|s| s.success());
        if !updated || !install() {
            bail!("could not install systemd with apt-get (see its output above); {how}");
        }
    }
    match util::find_on_path("systemd-analyze") {
        Some(path) => {
            note!("systemd-analyze at {}", path.display());
            Ok(())
        }
        None => bail!(
            "installed `systemd` but systemd-analyze is still not on PATH ({}); add its \
             directory to PATH",
            std::env::var("PATH").unwrap_or_default()
        ),
    }
}

/// The nginx binary for the tests: the one on PATH, else Debian's `nginx` package unpacked under
/// `<target>/nginx` (downloaded once with `apt-get download`, never installed: its postinst
/// could start a system nginx on port 80).
pub(crate) fn ensure_nginx(target: &Path) -> Result<PathBuf> {
    ensure_unpacked(
        target,
        "nginx",
        &["nginx", "nginx-common"],
        "usr/sbin/nginx",
        "-v",
    )
}

/// Caddy, the other webserver the deployment tests put in front of `mmrctl serve` (from the
/// Caddyfile `mmrctl render` writes). Debian's package, unpacked: its postinst would start a
/// system Caddy on port 80.
pub(crate) fn ensure_caddy(target: &Path) -> Result<PathBuf> {
    ensure_unpacked(target, "caddy", &["caddy"], "usr/bin/caddy", "version")
}

/// Prometheus's `promtool`, which checks the metrics exposition (`promtool check metrics`) and the
/// dashboard's queries. From Debian's `prometheus` package, unpacked (never started).
pub(crate) fn ensure_promtool(target: &Path) -> Result<PathBuf> {
    ensure_unpacked(
        target,
        "promtool",
        &["prometheus"],
        "usr/bin/promtool",
        "--version",
    )
}

/// nasm, for the SIMD parts of libjpeg-turbo that mozjpeg-sys builds (without it the build works,
/// and full-size JPEG decodes take about twice as long).
pub(crate) fn ensure_nasm(target: &Path) -> Result<PathBuf> {
    ensure_unpacked(target, "nasm", &["nasm"], "usr/bin/nasm", "-v")
}

/// libjpeg-turbo's `djpeg`: the thumbnail bench's physical limit (`djpeg -scale 1/8`).
pub(crate) fn ensure_djpeg(target: &Path) -> Result<PathBuf> {
    ensure_unpacked(
        target,
        "djpeg",
        &["libjpeg-turbo-progs"],
        "usr/bin/djpeg",
        "-version",
    )
}

/// A directory with `ffmpeg` and `ffprobe` for the video thumbnail tests: PATH's, else Debian's
/// ffmpeg and the libraries it needs that the system lacks, unpacked under `<target>/ffmpeg`
/// (never installed), with wrapper scripts in `<target>/ffmpeg/bin` that point the loader at
/// them (so nothing else run by the tests sees those libraries).
pub(crate) fn ensure_ffmpeg(target: &Path) -> Result<PathBuf> {
    // Returns the ffmpeg to put first on PATH (ffprobe beside it).
    if let (Some(ffmpeg), Some(_)) = (util::find_on_path("ffmpeg"), util::find_on_path("ffprobe")) {
        note!("ffmpeg at {}", ffmpeg.display());
        return Ok(ffmpeg);
    }
    let root = target.join("ffmpeg");
    let bin = root.join("bin");
    let real = root.join("usr/bin/ffmpeg");
    if !util::is_executable(&real) {
        let how = "install ffmpeg (`apt-get install ffmpeg`) or put ffmpeg and ffprobe on PATH";
        // What ffmpeg needs beyond what is installed: the packages `apt-get install` would add.
        let mut plan = Command::new("apt-get");
        plan.args(["install", "-s", "--no-install-recommends", "ffmpeg"]);
        let listed = util::run_captured(&mut plan, how)?;
        let packages: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.strip_prefix("Inst "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        if packages.is_empty() {
            bail!("`apt-get install -s ffmpeg` lists nothing to install; {how}");
        }
        unpack(target, &root, "ffmpeg", &packages, how)?;
    }
    let libs = root.join("usr/lib/x86_64-linux-gnu");
    let mut lib_dirs = vec![libs.clone()];
    // BLAS/LAPACK live in subdirectories (alternatives on an installed system).
    for sub in ["blas", "lapack", "pulseaudio"] {
        lib_dirs.push(libs.join(sub));
    }
    let lib_path = std::env::join_paths(&lib_dirs)?;
    std::fs::create_dir_all(&bin).with_context(|| format!("cannot create {}", bin.display()))?;
    for tool in ["ffmpeg", "ffprobe"] {
        let wrapper = bin.join(tool);
        let script = format!(
            "#!/bin/sh\nLD_LIBRARY_PATH={} exec {} \"$@\"\n",
            lib_path.to_string_lossy(),
            root.join("usr/bin").join(tool).display()
        );
        std::fs::write(&wrapper, script)
            .with_context(|| format!("cannot write {}", wrapper.display()))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
    }
    let mut version = Command::new(bin.join("ffmpeg"));
    version.arg("-version");
    util::run_captured(
        &mut version,
        &format!(
            "the unpacked ffmpeg does not run (a library may be missing: `LD_LIBRARY_PATH={} ldd {}`)",
            lib_path.to_string_lossy(),
            real.display()
        ),
    )?;
    note!("ffmpeg at {} (unpacked, not installed)", bin.display());
    Ok(bin.join("ffmpeg"))
}

/// `PATH` with the directories of `tools` first, for the commands we run (build scripts find nasm
/// there, the thumbnailer ffmpeg).
pub(crate) fn path_with(tools: &[&Path]) -> std::ffi::OsString {
    let mut dirs: Vec<PathBuf> = tools
        .iter()
        .filter_map(|t| t.parent().map(Path::to_path_buf))
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// `tool` from PATH, else Debian's `packages` unpacked under `<target>/<tool>` (downloaded once
/// with `apt-get download`, never installed, so no service starts), checked by running it with
/// `version_flag`.
fn ensure_unpacked(
    target: &Path,
    tool: &str,
    packages: &[&str],
    inside: &str,
    version_flag: &str,
) -> Result<PathBuf> {
    if let Some(path) = util::find_on_path(tool) {
        note!("{tool} at {}", path.display());
        return Ok(path);
    }
    let root = target.join(tool);
    let binary = root.join(inside);
    let how = format!(
        "install {} (`apt-get install {}`) or put a {tool} binary on PATH",
        packages[0], packages[0]
    );
    if !util::is_executable(&binary) {
        unpack(target, &root, tool, packages, &how)?;
    }
    if !util::is_executable(&binary) {
        bail!(
            "unpacked Debian's {} into {} but there is no {}; {how}",
            packages.join(" "),
            root.display(),
            binary.display()
        );
    }
    let mut version = Command::new(&binary);
    version.arg(version_flag);
    util::run_captured(
        &mut version,
        &format!(
            "the unpacked {tool} does not run (a shared library it needs may be missing; \
             `ldd {}` shows which). {how}",
            binary.display(),
        ),
    )?;
    note!("{tool} at {} (unpacked, not installed)", binary.display());
    Ok(binary)
}

/// `apt-get download <packages>` into `<target>/<tool>-debs`, then `dpkg -x` each into `root`,
/// both directories made afresh.
fn unpack(target: &Path, root: &Path, tool: &str, packages: &[&str], how: &str) -> Result<()> {
    for needed in ["apt-get", "dpkg"] {
        if util::find_on_path(needed).is_none() {
            bail!(
                "{tool} is not on PATH and there is no {needed} to fetch Debian's packages \
                 with; {how}"
            );
        }
    }
    let debs = target.join(format!("{tool}-debs"));
    for dir in [&debs, root] {
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let list = packages.join(" ");
    note!(
        "{tool} is not on PATH: downloading Debian's {list} into {} (not installing)",
        debs.display()
    );
    let download = || {
        let mut cmd = Command::new("apt-get");
        cmd.arg("download").args(packages).current_dir(&debs);
        util::run_status(&mut cmd).is_ok_and(|s| s.success())
    };
    if !download() {
        if !util::is_root() {
            bail!(
                "`apt-get download {list}` failed (see its output above); the package lists may \
                 be missing or stale: run `apt-get update` as root and try again, or {how}"
            );
        }
        note!("apt-get download failed: running apt-get update and trying again");
        let mut update = Command::new("apt-get");
        update.arg("update");
        let updated = util::run_status(&mut update).is_ok_and(|s| s.success());
        if !updated || !download() {
            bail!(
                "`apt-get download {list}` failed (see its output above), also after \
                 `apt-get update`; {how}"
            );
        }
    }
    let mut debs_found: Vec<PathBuf> = std::fs::read_dir(&debs)
        .with_context(|| format!("cannot list {}", debs.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "deb"))
        .collect();
    debs_found.sort();
    if debs_found.is_empty() {
        bail!(
            "`apt-get download {list}` left no .deb in {}; {how}",
            debs.display()
        );
    }
    for deb in &debs_found {
        let mut cmd = Command::new("dpkg");
        cmd.arg("-x").arg(deb).arg(root);
        util::run_captured(
            &mut cmd,
            &format!(
                "cannot unpack {}; delete {} and retry, or {how}",
                deb.display(),
                debs.display()
            ),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_skip_comments_and_blanks() {
        let text = "# tools\nansible-core==2.19.14  # core\n\n  ansible-lint==26.10.1\n";
        assert_eq!(
            pins(text),
            ["ansible-core==2.19.14", "ansible-lint==26.10.1"]
        );
    }

    #[test]
    fn requirements_file_pins_every_line() {
        let text = std::fs::read_to_string(requirements_file()).expect("requirements file");
        for pin in pins(&text) {
            assert!(
                pin.contains("=="),
                "{pin}: pin an exact version (name==x.y.z)"
            );
        }
    }
}
