//! The Python tools venv (`xtask/requirements-tools.txt`).

use std::path::PathBuf;

const TOOLS_BIN_VAR: &str = "MMRCTL_TOOLS_BIN";

/// The tools venv's `bin` directory, from `MMRCTL_TOOLS_BIN` (set by `cargo xtask test`).
pub fn tools_bin() -> PathBuf {
    let Some(bin) = std::env::var_os(TOOLS_BIN_VAR).filter(|v| !v.is_empty()) else {
        panic!(
            "{TOOLS_BIN_VAR} is not set: run the tests with `cargo xtask test`, which installs the \
             Python tools (Synapse, signedjson, ansible, ...) into a venv and sets it"
        );
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.is_dir(),
        "{TOOLS_BIN_VAR}={} is not a directory: run `cargo xtask test`, which creates the venv",
        bin.display()
    );
    bin
}

/// A program of the tools venv; panics when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_bin().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask test`, which installs it (xtask/requirements-tools.txt)",
        path.display()
    );
    path
}

/// The venv's Python.
pub fn python() -> PathBuf {
    tool("python")
}

/// A program `cargo xtask test` provides through the environment variable `var` (found on PATH
/// or unpacked from Debian's package under target/); panics with what to do when it is not.
pub(crate) fn provided_binary(var: &str, what: &str) -> PathBuf {
    let Some(path) = std::env::var_os(var).filter(|v| !v.is_empty()) else {
        panic!(
            "{var} is not set: run the tests with `cargo xtask test`, which finds {what} on PATH \
             or unpacks Debian's package under target/ and sets it"
        );
    };
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{var}={} is not a file: run `cargo xtask test`, which provides {what}",
        path.display()
    );
    path
}

/// Prometheus's `promtool`, from `MMRCTL_PROMTOOL`.
pub fn promtool_bin() -> PathBuf {
    provided_binary("MMRCTL_PROMTOOL", "promtool")
}
