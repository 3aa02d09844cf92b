use serde::{Deserialize, Deserializer, Serialize};

use crate::lenient;

/// What a datastore holds; `forKinds` lists these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MediaKind {
    Thumbnails,
    RemoteMedia,
    LocalMedia,
    Archives,
    /// Shorthand for every kind.
    All,
}

impl MediaKind {
    pub const ALL: [MediaKind; 4] = [
        MediaKind::Thumbnails,
        MediaKind::RemoteMedia,
        MediaKind::LocalMedia,
        MediaKind::Archives,
    ];

    /// The name in `forKinds` and in the database's `media.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            MediaKind::Thumbnails => "thumbnails",
            MediaKind::RemoteMedia => "remote_media",
            MediaKind::LocalMedia => "local_media",
            MediaKind::Archives => "archives",
            MediaKind::All => "all",
        }
    }

    /// The kind named `name` (one of [`MediaKind::as_str`]'s names).
    pub fn from_name(name: &str) -> Option<MediaKind> {
        MediaKind::ALL
            .into_iter()
            .chain([MediaKind::All])
            .find(|k| k.as_str() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatastoreKind {
    File,
    S3,
}

/// One `datastores[]` entry. The `id` is recorded with every object and must never change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Datastore {
    #[serde(rename = "type")]
    pub kind: DatastoreKind,
    pub id: String,
    /// `[]` makes the store read-only: its media stays readable, nothing new is written to it.
    pub for_kinds: Vec<MediaKind>,
    pub opts: DatastoreOpts,
}

impl Datastore {
    /// Whether new media of `kind` may be written here.
    pub fn accepts(&self, kind: MediaKind) -> bool {
        self.for_kinds
            .iter()
            .any(|k| *k == kind || *k == MediaKind::All)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum DatastoreOpts {
    File(FileOpts),
    S3(S3Opts),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileOpts {
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct S3Opts {
    /// Where bodies of unknown size are buffered before upload; empty means in memory upstream,
    /// which mmrctl never does (it falls back to the system temp directory).
    #[serde(default)]
    pub temp_path: String,
    pub endpoint: String,
    #[serde(default)]
    pub access_key_id: String,
    #[serde(default)]
    pub access_secret: String,
    #[serde(default = "yes", deserialize_with = "lenient::bool")]
    pub ssl: bool,
    pub bucket_name: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_string"
    )]
    pub region: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_string"
    )]
    pub storage_class: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::opt_string"
    )]
    pub public_base_url: Option<String>,
    #[serde(default, deserialize_with = "lenient::bool")]
    pub redirect_when_cached: bool,
    #[serde(default, deserialize_with = "lenient::u64")]
    pub prefix_length: u64,
    #[serde(default = "yes", deserialize_with = "lenient::bool")]
    pub multipart_uploads: bool,
}

fn yes() -> bool {
    true
}

impl<'de> Deserialize<'de> for Datastore {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        struct Raw {
            #[serde(rename = "type")]
            kind: DatastoreKind,
            id: String,
            for_kinds: Vec<MediaKind>,
            opts: serde_norway::Value,
        }
        let raw = Raw::deserialize(d)?;
        let opts = match raw.kind {
            DatastoreKind::File => serde_norway::from_value(raw.opts).map(DatastoreOpts::File),
            DatastoreKind::S3 => serde_norway::from_value(raw.opts).map(DatastoreOpts::S3),
        }
        .map_err(|e| serde::de::Error::custom(format!("datastore `{}` opts: {e}", raw.id)))?;
        Ok(Datastore {
            kind: raw.kind,
            id: raw.id,
            for_kinds: raw.for_kinds,
            opts,
        })
    }
}
