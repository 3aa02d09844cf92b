//! Crash-safe file writes: a temp file beside the target, fsync, rename (or link), fsync the
//! directory. Replacing keeps the target's owner, group and mode.
//!
//! The temp file has a fixed name (`.<name>.mmrctl-tmp`), so a run that was stopped half-way leaves
//! at most one behind, and the next run removes it before it writes.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write as _};
use std::ops::ControlFlow;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::Error;

/// A point in a write where a crash test may stop the operation, as a crash would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The temp file beside `target` is written and synced; `target` is unchanged.
    TempWritten { target: PathBuf },
    /// The temp file now is `target` (renamed or linked); the directory is not synced yet.
    Replaced { target: PathBuf },
    /// The directory is synced: the new `target` is durable.
    Synced { target: PathBuf },
}

impl Step {
    /// The file being written.
    pub fn target(&self) -> &Path {
        match self {
            Self::TempWritten { target } | Self::Replaced { target } | Self::Synced { target } => {
                target
            }
        }
    }
}

/// Called at each [`Step`]; `Break` stops the operation there, leaving everything as it is (the
/// operation then fails with [`Error::Stopped`]). Crash tests use it; the CLI always continues.
pub type Checkpoint<'a> = &'a mut dyn FnMut(&Step) -> ControlFlow<()>;

/// Owner, group and permission bits to give a written file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Meta {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) mode: u32,
}

impl Meta {
    pub(crate) fn of(metadata: &fs::Metadata) -> Self {
        Self {
            uid: metadata.uid(),
            gid: metadata.gid(),
            mode: metadata.permissions().mode() & 0o7777,
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Error + use<> {
    let path = path.to_path_buf();
    move |source| Error::Io {
        action,
        path,
        source,
    }
}

/// `path` with `suffix` appended to its file name.
pub(crate) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(suffix);
    PathBuf::from(name)
}

/// `<file>.backup`, beside the file.
pub fn backup_path(path: &Path) -> PathBuf {
    with_suffix(path, ".backup")
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// The fixed temp file name used when writing `target`.
pub fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(target).join(format!(".{name}.mmrctl-tmp"))
}

/// The file `path` resolves to: key files may be symlinks (we write the file, not the link).
pub(crate) fn resolve(path: &Path) -> PathBuf {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    }
}

/// Reads `path`; `Ok(None)` when it does not exist.
pub(crate) fn read_optional(path: &Path) -> Result<Option<(String, Meta)>, Error> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", path)(e)),
    };
    let meta = file.metadata().map_err(io_error("read", path))?;
    let text = io::read_to_string(file).map_err(io_error("read", path))?;
    Ok(Some((text, Meta::of(&meta))))
}

/// Removes a temp file a stopped run left beside `target`.
pub(crate) fn remove_stale_temp(target: &Path) -> Result<(), Error> {
    let temp = temp_path(target);
    match fs::remove_file(&temp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_error("remove", &temp)(e)),
        _ => Ok(()),
    }
}

fn check(checkpoint: Checkpoint<'_>, step: Step) -> Result<(), Error> {
    match checkpoint(&step) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(Error::Stopped(step)),
    }
}

/// Writes and syncs the temp file for `target` with `mode`, and `owner` (uid, gid) when given
/// (else this process's).
fn write_temp(
    target: &Path,
    contents: &[u8],
    owner: Option<(u32, u32)>,
    mode: u32,
) -> Result<PathBuf, Error> {
    let temp = temp_path(target);
    remove_stale_temp(target)?;
    let err = io_error("write", &temp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io_error("create", &temp))?;
    let result = (|| {
        file.write_all(contents)?;
        if let Some((uid, gid)) = owner {
            let have = file.metadata()?;
            if have.uid() != uid || have.gid() != gid {
                std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
            }
        }
        // After chown, which may clear set-id bits; and the umask may have narrowed `mode`.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&temp);
        return Err(err(e));
    }
    Ok(temp)
}

fn sync_dir(target: &Path) -> Result<(), Error> {
    let dir = parent(target);
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("sync the directory", dir))
}

/// Replaces (or creates) `target` with `contents`, owned and moded as `meta` says.
pub(crate) fn replace(
    target: &Path,
    contents: &[u8],
    meta: Meta,
    checkpoint: Checkpoint<'_>,
) -> Result<(), Error> {
    let temp = write_temp(target, contents, Some((meta.uid, meta.gid)), meta.mode)?;
    check(
        checkpoint,
        Step::TempWritten {
            target: target.to_path_buf(),
        },
    )?;
    if let Err(e) = fs::rename(&temp, target) {
        let _ = fs::remove_file(&temp);
        return Err(io_error("replace", target)(e));
    }
    in_place(target, checkpoint)
}

/// The new file is in place: make its directory entry durable, reporting both steps.
fn in_place(target: &Path, checkpoint: Checkpoint<'_>) -> Result<(), Error> {
    check(
        checkpoint,
        Step::Replaced {
            target: target.to_path_buf(),
        },
    )?;
    sync_dir(target)?;
    check(
        checkpoint,
        Step::Synced {
            target: target.to_path_buf(),
        },
    )
}

/// Creates `target` with `contents` and `mode`, owned by this process; fails with
/// [`Error::Exists`] if it exists (checked atomically where the filesystem has hard links).
pub(crate) fn create_new(
    target: &Path,
    contents: &[u8],
    mode: u32,
    checkpoint: Checkpoint<'_>,
) -> Result<(), Error> {
    if fs::symlink_metadata(target).is_ok() {
        return Err(Error::Exists {
            path: target.to_path_buf(),
        });
    }
    let temp = write_temp(target, contents, None, mode)?;
    check(
        checkpoint,
        Step::TempWritten {
            target: target.to_path_buf(),
        },
    )?;
    let linked = match fs::hard_link(&temp, target) {
        Ok(()) => fs::remove_file(&temp).map_err(io_error("remove", &temp)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let _ = fs::remove_file(&temp);
            return Err(Error::Exists {
                path: target.to_path_buf(),
            });
        }
        // No hard links here (some network or FUSE filesystems): checked above, so rename.
        Err(_) => fs::rename(&temp, target).map_err(io_error("create", target)),
    };
    if let Err(e) = linked {
        let _ = fs::remove_file(&temp);
        return Err(e);
    }
    in_place(target, checkpoint)
}

/// Writes `<target>.backup` holding `contents` with `meta`, unless a backup exists already (it
/// holds the original and is never overwritten). Returns the backup's path when it wrote it.
pub(crate) fn backup_once(
    target: &Path,
    contents: &[u8],
    meta: Meta,
    checkpoint: Checkpoint<'_>,
) -> Result<Option<PathBuf>, Error> {
    let backup = backup_path(target);
    match fs::symlink_metadata(&backup) {
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("check", &backup)(e)),
    }
    replace(&backup, contents, meta, checkpoint)?;
    Ok(Some(backup))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn go() -> impl FnMut(&Step) -> ControlFlow<()> {
        |_| ControlFlow::Continue(())
    }

    #[test]
    fn replace_keeps_mode_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("k");
        fs::write(&target, "old").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o640)).unwrap();
        let meta = Meta::of(&fs::metadata(&target).unwrap());
        replace(&target, b"new", meta, &mut go()).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
        assert_eq!(Meta::of(&fs::metadata(&target).unwrap()), meta);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn create_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("k");
        create_new(&target, b"one", 0o600, &mut go()).unwrap();
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let err = create_new(&target, b"two", 0o600, &mut go()).unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "one");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn backups_are_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("k");
        fs::write(&target, "orig").unwrap();
        let meta = Meta::of(&fs::metadata(&target).unwrap());
        let first = backup_once(&target, b"orig", meta, &mut go()).unwrap();
        assert_eq!(first, Some(dir.path().join("k.backup")));
        assert_eq!(
            backup_once(&target, b"later", meta, &mut go()).unwrap(),
            None
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("k.backup")).unwrap(),
            "orig"
        );
    }

    #[test]
    fn a_stop_leaves_the_target_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("k");
        fs::write(&target, "old").unwrap();
        let meta = Meta::of(&fs::metadata(&target).unwrap());
        let mut stop = |s: &Step| {
            if matches!(s, Step::TempWritten { .. }) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let err = replace(&target, b"new", meta, &mut stop).unwrap_err();
        assert!(matches!(err, Error::Stopped(Step::TempWritten { .. })));
        assert_eq!(fs::read_to_string(&target).unwrap(), "old");
        assert!(temp_path(&target).exists());
        // The next write replaces the stale temp file.
        replace(&target, b"new", meta, &mut go()).unwrap();
        assert!(!temp_path(&target).exists());
        assert_eq!(fs::read_to_string(&target).unwrap(), "new");
    }
}
