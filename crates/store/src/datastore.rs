//! Datastores hold objects (content) at locations derived from their SHA-256. The pipeline and the
//! handlers only see this module's small interface, never a file path.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use config::MediaKind;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _};

use crate::Error;

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
}

impl Datastore {
    pub fn from_config(ds: &config::Datastore) -> Result<Datastore, Error> {
        let backend = match &ds.opts {
            config::DatastoreOpts::File(opts) => {
                Backend::File(FileStore::open(Path::new(&opts.path))?)
            }
            config::DatastoreOpts::S3(_) => {
                return Err(Error::Config(format!(
                    "datastore `{}`: the S3 datastore is not available in this build yet",
                    ds.id
                )));
            }
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
    /// the file store, so placing is a link, not a copy.
    pub(crate) fn temp_dir(&self) -> &Path {
        match &self.backend {
            Backend::File(f) => &f.tmp,
        }
    }

    /// Where the object with this hash lives in this datastore.
    pub(crate) fn location_for(&self, sha256: &str) -> String {
        match &self.backend {
            Backend::File(_) => FileStore::location(sha256),
        }
    }

    /// Puts a complete, durable temp file at the object's location. Idempotent: the same bytes land
    /// on the same name, so an object already there is left as it is.
    pub(crate) async fn place(&self, temp: &Path, sha256: &str) -> Result<String, Error> {
        match &self.backend {
            Backend::File(f) => f.place(temp, sha256).await,
        }
    }

    pub(crate) async fn exists(&self, location: &str) -> Result<bool, Error> {
        match &self.backend {
            Backend::File(f) => Ok(tokio::fs::try_exists(f.path(location)?).await?),
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
        }
    }

    pub(crate) async fn delete(&self, location: &str) -> Result<(), Error> {
        match &self.backend {
            Backend::File(f) => match tokio::fs::remove_file(f.path(location)?).await {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
        }
    }
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

fn create_dirs(dir: &Path) -> io::Result<()> {
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
}
