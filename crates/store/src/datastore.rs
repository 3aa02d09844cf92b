//! Datastores hold objects (content) at locations derived from their SHA-256. The pipeline and the
//! handlers only see this module's small interface, never a file path or a bucket.
//!
//! Two backends: files under a directory (`ab/cd/<sha256>`) and S3 (`crate::s3`, key `<sha256>`
//! or `<prefix>/<rest>` with `prefixLength`).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use config::MediaKind;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _, AsyncWriteExt as _};

use crate::Error;
use crate::s3::S3Store;

/// A readable object body.
pub type Reader = Pin<Box<dyn AsyncRead + Send + Sync>>;

/// One configured datastore.
#[derive(Debug)]
pub struct Datastore {
    id: String,
    for_kinds: Vec<MediaKind>,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    File(FileStore),
    S3(Box<S3Store>),
}

/// A datastore's service failed (S3 unreachable, timing out, refusing).
#[derive(Debug, thiserror::Error)]
#[error("datastore `{datastore}`: {operation} failed: {message}")]
pub struct BackendError {
    pub datastore: String,
    pub operation: &'static str,
    pub message: String,
    /// Unreachable, timed out, 5xx or throttled: worth a 503 and a retry. Otherwise the service
    /// refused (credentials, bucket, permissions) and the operator must act.
    pub transient: bool,
}

/// Where a listing of a datastore's objects stands (see [`Datastore::list_page`]).
#[derive(Debug)]
pub(crate) struct ListCursor(CursorState);

#[derive(Debug)]
enum CursorState {
    Start,
    /// Directories still to read (file store).
    Dirs(Vec<PathBuf>),
    /// The continuation token of the next page (S3).
    Token(String),
}

impl ListCursor {
    pub(crate) fn start() -> ListCursor {
        ListCursor(CursorState::Start)
    }
}

impl Datastore {
    pub fn from_config(ds: &config::Datastore) -> Result<Datastore, Error> {
        let backend = match &ds.opts {
            config::DatastoreOpts::File(opts) => {
                Backend::File(FileStore::open(Path::new(&opts.path))?)
            }
            config::DatastoreOpts::S3(opts) => Backend::S3(Box::new(S3Store::new(&ds.id, opts)?)),
        };
        Ok(Datastore {
            id: ds.id.clone(),
            for_kinds: ds.for_kinds.clone(),
            backend,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn accepts(&self, kind: MediaKind) -> bool {
        self.for_kinds
            .iter()
            .any(|k| *k == kind || *k == MediaKind::All)
    }

    /// Where uploads are buffered before they are placed: on the same filesystem as the objects for
    /// the file store, so placing is a link, not a copy; `tempPath` (else the system's temp
    /// directory, never memory) for S3.
    pub(crate) fn temp_dir(&self) -> &Path {
        match &self.backend {
            Backend::File(f) => &f.tmp,
            Backend::S3(s) => &s.tmp,
        }
    }

    /// Where the object with this hash lives in this datastore.
    pub(crate) fn location_for(&self, sha256: &str) -> String {
        match &self.backend {
            Backend::File(_) => FileStore::location(sha256),
            Backend::S3(s) => s.location(sha256),
        }
    }

    /// Where clients may fetch the object themselves instead of through us: S3's `publicBaseUrl`
    /// (a CDN or a public bucket) followed by the key.
    pub fn redirect_url(&self, location: &str) -> Option<String> {
        match &self.backend {
            Backend::File(_) => None,
            Backend::S3(s) => s.redirect_url(location),
        }
    }

    /// Puts a complete, durable temp file at the object's location. Idempotent: the same bytes land
    /// on the same name, so an object already there is left as it is.
    pub(crate) async fn place(&self, temp: &Path, sha256: &str) -> Result<String, Error> {
        match &self.backend {
            Backend::File(f) => f.place(temp, sha256).await,
            Backend::S3(s) => s.place(temp, sha256).await,
        }
    }

    pub(crate) async fn exists(&self, location: &str) -> Result<bool, Error> {
        match &self.backend {
            Backend::File(f) => Ok(tokio::fs::try_exists(f.path(location)?).await?),
            Backend::S3(s) => s.exists(location).await,
        }
    }

    /// Opens `len` bytes from `start` (the whole object when `len` is `None`).
    pub async fn open(
        &self,
        location: &str,
        start: u64,
        len: Option<u64>,
    ) -> Result<Reader, Error> {
        match &self.backend {
            Backend::File(f) => {
                let path = f.path(location)?;
                let mut file = tokio::fs::File::open(&path).await.map_err(|e| {
                    if e.kind() == io::ErrorKind::NotFound {
                        Error::ObjectMissing {
                            datastore: self.id.clone(),
                            location: location.to_owned(),
                        }
                    } else {
                        Error::Io(e)
                    }
                })?;
                if start > 0 {
                    file.seek(io::SeekFrom::Start(start)).await?;
                }
                let reader = tokio::io::BufReader::with_capacity(256 * 1024, file);
                Ok(match len {
                    Some(len) => Box::pin(reader.take(len)),
                    None => Box::pin(reader),
                })
            }
            Backend::S3(s) => {
                s.open(location, start, len)
                    .await?
                    .ok_or_else(|| Error::ObjectMissing {
                        datastore: self.id.clone(),
                        location: location.to_owned(),
                    })
            }
        }
    }

    /// Opens the datastore `ds` describes and [`probes`](Datastore::probe) it, leaving nothing
    /// behind: directories the probe created (a file datastore's root, `.tmp`, the object's
    /// shard directories) are removed again, so that whoever runs it (root, say) owns nothing
    /// the service must write to later.
    pub async fn probe_config(ds: &config::Datastore) -> Result<Probe, Error> {
        let mut created = Vec::new();
        if let config::DatastoreOpts::File(opts) = &ds.opts {
            let root = PathBuf::from(&opts.path);
            for dir in [root.clone(), root.join(".tmp")] {
                if !dir.exists() {
                    created.push(dir);
                }
            }
        }
        let result = match Datastore::from_config(ds) {
            Ok(datastore) => datastore.probe().await,
            Err(e) => Err(e),
        };
        // Deepest first; only empty directories go (`remove_dir` refuses the others).
        for dir in created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
        result
    }

    /// Writes a small object, reads it back and deletes it: whether the datastore works now, as
    /// `mmrctl doctor` checks it. For a file datastore, also the space left on its filesystem.
    pub async fn probe(&self) -> Result<Probe, Error> {
        use sha2::Digest as _;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let content = format!("mmrctl doctor probe {} {nanos}\n", std::process::id());
        let sha256 = hex::encode(sha2::Sha256::digest(content.as_bytes()));
        // The object's shard directories (`ab/cd/`, `ab/`) go again when the probe made them.
        let new_dirs: Vec<PathBuf> = match &self.backend {
            Backend::File(f) => {
                let shard = f.root.join(&sha256[0..2]);
                [shard.join(&sha256[2..4]), shard]
                    .into_iter()
                    .filter(|d| !d.exists())
                    .collect()
            }
            Backend::S3(_) => Vec::new(),
        };
        let temp_dir = match &self.backend {
            Backend::File(f) => f.tmp.clone(),
            Backend::S3(_) => std::env::temp_dir(),
        };
        let temp = temp_dir.join(format!("mmrctl-probe-{sha256}"));
        let written = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            file.write_all(content.as_bytes()).await?;
            file.sync_all().await?;
            Ok::<(), io::Error>(())
        }
        .await;
        let placed = match written {
            Ok(()) => self.place(&temp, &sha256).await,
            Err(e) => Err(e.into()),
        };
        let _ = tokio::fs::remove_file(&temp).await;
        let remove_new_dirs = || {
            for dir in &new_dirs {
                let _ = std::fs::remove_dir(dir);
            }
        };
        let location = match placed {
            Ok(location) => location,
            Err(e) => {
                remove_new_dirs();
                return Err(e);
            }
        };
        let mut read = Vec::new();

        let result = async {
            self.open(&location, 0, None)
                .await?
                .read_to_end(&mut read)
                .await?;
            Ok::<(), Error>(())
        }
        .await;
        let deleted = self.delete(&location).await;
        remove_new_dirs();
        result?;
        deleted?;
        if read != content.as_bytes() {
            return Err(Error::Corrupt(format!(
                "datastore {}: the probe object read back differs from what was written",
                self.id
            )));
        }
        let space = match &self.backend {
            Backend::File(f) => rustix::fs::statvfs(&f.root).ok().map(|s| Space {
                free_bytes: s.f_bavail.saturating_mul(s.f_frsize),
                total_bytes: s.f_blocks.saturating_mul(s.f_frsize),
            }),
            Backend::S3(_) => None,
        };
        Ok(Probe { space })
    }

    pub(crate) async fn delete(&self, location: &str) -> Result<(), Error> {
        match &self.backend {
            Backend::File(f) => match tokio::fs::remove_file(f.path(location)?).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
            Backend::S3(s) => s.delete(location).await,
        }
    }

    /// The next page of the locations of every object in the datastore (whatever wrote them),
    /// and the cursor of the page after it (`None` at the end). Pages are small: a directory
    /// of the file store, 1000 keys of S3.
    pub(crate) async fn list_page(
        &self,
        cursor: ListCursor,
    ) -> Result<(Vec<String>, Option<ListCursor>), Error> {
        match (&self.backend, cursor.0) {
            (Backend::File(f), CursorState::Start) => f.list_page(vec![f.root.clone()]).await,
            (Backend::File(f), CursorState::Dirs(dirs)) => f.list_page(dirs).await,
            (Backend::S3(s), state) => {
                let token = match state {
                    CursorState::Token(token) => Some(token),
                    _ => None,
                };
                let (keys, next) = s.list_page(token).await?;
                Ok((keys, next.map(|t| ListCursor(CursorState::Token(t)))))
            }
            (Backend::File(_), CursorState::Token(_)) => Err(Error::Corrupt(
                "a listing cursor of another datastore".to_owned(),
            )),
        }
    }
}

/// What [`Datastore::probe`] found besides that the datastore works.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// The filesystem of a file datastore.
    pub space: Option<Space>,
}

#[derive(Debug, Clone, Copy)]
pub struct Space {
    /// Available to unprivileged writers (`f_bavail`).
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Objects as files under `root`, at `ab/cd/<sha256>`.
#[derive(Debug)]
struct FileStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl FileStore {
    fn open(root: &Path) -> Result<FileStore, Error> {
        let tmp = root.join(".tmp");
        create_dirs(&tmp).map_err(|e| {
            Error::Config(format!(
                "file datastore {}: cannot create {}: {e}",
                root.display(),
                tmp.display()
            ))
        })?;
        Ok(FileStore {
            root: root.to_path_buf(),
            tmp,
        })
    }

    fn location(sha256: &str) -> String {
        format!("{}/{}/{}", &sha256[0..2], &sha256[2..4], sha256)
    }

    /// Locations come from our own rows, but a path never leaves the root whatever a row says.
    fn path(&self, location: &str) -> Result<PathBuf, Error> {
        let safe = !location.is_empty()
            && location
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..");
        if !safe {
            return Err(Error::Corrupt(format!(
                "unsafe object location `{location}`"
            )));
        }
        Ok(self.root.join(location))
    }

    /// Reads directories from `dirs` until one has files (or none is left): the files' locations,
    /// relative to the root, and the directories still to read. The temp directory is skipped.
    async fn list_page(
        &self,
        mut dirs: Vec<PathBuf>,
    ) -> Result<(Vec<String>, Option<ListCursor>), Error> {
        let mut locations = Vec::new();
        while locations.is_empty()
            && let Some(dir) = dirs.pop()
        {
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            while let Some(entry) = entries.next_entry().await? {
                let path = entry.path();
                if path == self.tmp {
                    continue;
                }
                if entry.file_type().await?.is_dir() {
                    dirs.push(path);
                } else if let Ok(relative) = path.strip_prefix(&self.root) {
                    locations.push(relative.to_string_lossy().into_owned());
                }
            }
        }
        locations.sort();
        let next = (!dirs.is_empty()).then_some(ListCursor(CursorState::Dirs(dirs)));
        Ok((locations, next))
    }

    async fn place(&self, temp: &Path, sha256: &str) -> Result<String, Error> {
        let location = Self::location(sha256);
        let target = self.path(&location)?;
        let temp = temp.to_path_buf();
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            let dir = target.parent().unwrap_or(Path::new("/"));
            create_dirs(dir)?;
            match std::fs::hard_link(&temp, &target) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
            // The link is durable only once its directory entry is.
            std::fs::File::open(dir)?.sync_all()
        })
        .await
        .map_err(|e| Error::Io(io::Error::other(e)))??;
        Ok(location)
    }
}

pub(crate) fn create_dirs(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
}

/// The configured datastores, in config order.
#[derive(Debug, Default)]
pub struct Datastores {
    stores: Vec<Datastore>,
}

impl Datastores {
    pub fn from_config(config: &config::Config) -> Result<Datastores, Error> {
        let stores = config
            .datastores
            .iter()
            .map(Datastore::from_config)
            .collect::<Result<_, _>>()?;
        Ok(Datastores { stores })
    }

    /// Where new media of `kind` goes: the first datastore that accepts it.
    pub fn for_kind(&self, kind: MediaKind) -> Option<&Datastore> {
        self.stores.iter().find(|d| d.accepts(kind))
    }

    pub fn get(&self, id: &str) -> Option<&Datastore> {
        self.stores.iter().find(|d| d.id == id)
    }

    /// Every configured datastore, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Datastore> {
        self.stores.iter()
    }

    /// The datastore `id`, or an error naming the configured ones (for ids an operator typed).
    pub(crate) fn named(&self, id: &str) -> Result<&Datastore, Error> {
        self.get(id).ok_or_else(|| {
            let known: Vec<&str> = self.stores.iter().map(|d| d.id.as_str()).collect();
            Error::Config(format!(
                "no datastore `{id}` in the config (configured: {})",
                known.join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3_opts() -> config::S3Opts {
        config::S3Opts {
            temp_path: String::new(),
            endpoint: "127.0.0.1:9".to_owned(),
            access_key_id: "k".to_owned(),
            access_secret: "s".to_owned(),
            ssl: false,
            bucket_name: "media".to_owned(),
            region: None,
            storage_class: None,
            public_base_url: Some("https://cdn.example.org/media/".to_owned()),
            redirect_when_cached: false,
            prefix_length: 2,
            multipart_uploads: true,
        }
    }

    #[test]
    fn kinds_pick_the_store_and_only_s3_redirects() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let file = config::Datastore {
            kind: config::DatastoreKind::File,
            id: "file".to_owned(),
            for_kinds: vec![MediaKind::Thumbnails],
            opts: config::DatastoreOpts::File(config::FileOpts {
                path: dir.path().display().to_string(),
            }),
        };
        let s3 = config::Datastore {
            kind: config::DatastoreKind::S3,
            id: "s3".to_owned(),
            for_kinds: vec![MediaKind::LocalMedia, MediaKind::RemoteMedia],
            opts: config::DatastoreOpts::S3(s3_opts()),
        };
        let read_only = config::Datastore {
            id: "old".to_owned(),
            for_kinds: Vec::new(),
            ..s3.clone()
        };
        let stores = Datastores {
            stores: [read_only, file, s3]
                .iter()
                .map(Datastore::from_config)
                .collect::<Result<_, _>>()
                .unwrap_or_else(|e| panic!("{e}")),
        };
        let pick = |kind| stores.for_kind(kind).map(Datastore::id);
        assert_eq!(pick(MediaKind::Thumbnails), Some("file"));
        assert_eq!(pick(MediaKind::LocalMedia), Some("s3"));
        assert_eq!(pick(MediaKind::RemoteMedia), Some("s3"));
        assert_eq!(pick(MediaKind::Archives), None);
        // The read-only store is never picked, but stays reachable by id.
        assert!(stores.get("old").is_some());

        let hash = "0123456789abcdef".repeat(4);
        let s3 = stores.get("s3").unwrap_or_else(|| panic!("no s3"));
        let location = s3.location_for(&hash);
        assert_eq!(location, format!("01/{}", &hash[2..]));
        assert_eq!(
            s3.redirect_url(&location),
            Some(format!("https://cdn.example.org/media/01/{}", &hash[2..]))
        );
        let file = stores.get("file").unwrap_or_else(|| panic!("no file"));
        assert_eq!(file.redirect_url(&file.location_for(&hash)), None);
    }
}
