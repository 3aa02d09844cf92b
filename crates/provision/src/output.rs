//! Writing rendered files: only when content or mode changed, atomically (temp file in the same
//! directory, fsync, rename, fsync the directory), secrets 0640 and everything else 0644.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    /// Relative to the output directory.
    pub path: PathBuf,
    pub contents: String,
    /// Holds passwords or tokens: readable by the service's group only.
    pub secret: bool,
}

impl OutputFile {
    pub fn new(path: impl Into<PathBuf>, contents: String, secret: bool) -> OutputFile {
        OutputFile {
            path: path.into(),
            contents,
            secret,
        }
    }

    pub fn mode(&self) -> u32 {
        if self.secret { 0o640 } else { 0o644 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Created,
    Changed,
    /// Same content, but the mode was wrong.
    Mode,
    Unchanged,
}

/// What writing a file would do, with the current content for diffs.
#[derive(Debug)]
pub struct Planned<'a> {
    pub file: &'a OutputFile,
    pub target: PathBuf,
    pub change: Change,
    pub current: Option<String>,
}

/// Compares each file with what is on disk under `out_dir`.
pub fn plan<'a>(out_dir: &Path, files: &'a [OutputFile]) -> Result<Vec<Planned<'a>>, Error> {
    files
        .iter()
        .map(|file| {
            let target = out_dir.join(&file.path);
            let (change, current) = match fs::read(&target) {
                Ok(bytes) => {
                    let current = String::from_utf8_lossy(&bytes).into_owned();
                    let mode = fs::metadata(&target)
                        .map_err(|source| Error::Io {
                            path: target.clone(),
                            source,
                        })?
                        .permissions()
                        .mode()
                        & 0o777;
                    let change = if bytes != file.contents.as_bytes() {
                        Change::Changed
                    } else if mode != file.mode() {
                        Change::Mode
                    } else {
                        Change::Unchanged
                    };
                    (change, Some(current))
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Change::Created, None),
                Err(source) => {
                    return Err(Error::Io {
                        path: target,
                        source,
                    });
                }
            };
            Ok(Planned {
                file,
                target,
                change,
                current,
            })
        })
        .collect()
}

/// Applies a plan: writes what changed, leaves the rest untouched.
pub fn apply(planned: &[Planned<'_>]) -> Result<(), Error> {
    for p in planned {
        match p.change {
            Change::Unchanged => {}
            Change::Mode => {
                fs::set_permissions(&p.target, fs::Permissions::from_mode(p.file.mode())).map_err(
                    |source| Error::Io {
                        path: p.target.clone(),
                        source,
                    },
                )?
            }
            Change::Created | Change::Changed => {
                write_atomic(&p.target, p.file.contents.as_bytes(), p.file.mode())?;
            }
        }
    }
    Ok(())
}

/// Replaces `path` with `contents` so that a crash leaves either the old file or the new one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(io)?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("mmrctl")
        ))
        .suffix(".tmp")
        .permissions(fs::Permissions::from_mode(mode))
        .tempfile_in(dir)
        .map_err(io)?;
    tmp.write_all(contents).map_err(io)?;
    // The umask may have narrowed the mode given at creation.
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

use std::os::unix::fs::DirBuilderExt as _;

/// A unified diff of what a plan would change.
pub fn diff(p: &Planned<'_>) -> Option<String> {
    if !matches!(p.change, Change::Created | Change::Changed) {
        return None;
    }
    let old = p.current.as_deref().unwrap_or("");
    let name = p.target.display().to_string();
    Some(
        similar::TextDiff::from_lines(old, &p.file.contents)
            .unified_diff()
            .context_radius(3)
            .header(
                if p.current.is_some() {
                    &name
                } else {
                    "/dev/null"
                },
                &name,
            )
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_what_changed_and_fixes_modes() {
        let dir = tempfile::tempdir().unwrap();
        let files = vec![
            OutputFile::new("config/a.yaml", "secret: 1\n".into(), true),
            OutputFile::new("b.service", "[Unit]\n".into(), false),
        ];
        let p = plan(dir.path(), &files).unwrap();
        assert!(p.iter().all(|p| p.change == Change::Created));
        apply(&p).unwrap();
        let mode = |rel: &str| {
            fs::metadata(dir.path().join(rel))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode("config/a.yaml"), 0o640);
        assert_eq!(mode("b.service"), 0o644);
        assert_eq!(mode("config"), 0o750);

        let p = plan(dir.path(), &files).unwrap();
        assert!(p.iter().all(|p| p.change == Change::Unchanged));

        fs::set_permissions(
            dir.path().join("config/a.yaml"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let changed = vec![
            files[0].clone(),
            OutputFile::new("b.service", "[Unit]\nX=1\n".into(), false),
        ];
        let p = plan(dir.path(), &changed).unwrap();
        assert_eq!(p[0].change, Change::Mode);
        assert_eq!(p[1].change, Change::Changed);
        assert!(diff(&p[1]).unwrap().contains("+X=1"));
        apply(&p).unwrap();
        assert_eq!(mode("config/a.yaml"), 0o640);
        assert_eq!(
            fs::read_to_string(dir.path().join("b.service")).unwrap(),
            "[Unit]\nX=1\n"
        );
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
