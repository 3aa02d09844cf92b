//! The homeserver's database: its media tables, read page by page (keyset pagination on the unique
//! keys, so memory stays flat and nothing is read twice), and where each item's file lies.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use config::MediaKind;
use tokio_postgres::{NoTls, Row};

use crate::item::Item;
use crate::{Error, Homeserver, Options};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Local,
    Remote,
    Done,
}

/// Rows and bytes to import, and what is left out.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Totals {
    pub(crate) items: u64,
    pub(crate) bytes: u64,
    pub(crate) pending: u64,
    pub(crate) url_cache: u64,
    pub(crate) remote: u64,
}

pub(crate) struct Source {
    client: tokio_postgres::Client,
    homeserver: Homeserver,
    dbname: String,
    server_name: String,
    media_path: Option<PathBuf>,
    include_remote: bool,
    include_url_cache: bool,
    /// Synapse: `local_media_repository`'s optional columns.
    local_columns: HashSet<String>,
    /// Synapse: `remote_media_cache`'s columns, when the table exists.
    remote_columns: Option<HashSet<String>>,
    local_sql: String,
    remote_sql: String,
    phase: Phase,
    after_origin: String,
    after_id: String,
}

/// A database error with its detail: `tokio_postgres::Error`'s own text is often only "db error".
pub(crate) fn pg_message(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            s.push_str(&format!(" ({detail})"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s
}

/// `user@host:port/dbname`, for messages (never the password).
fn describe(cfg: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{}@{host}:{port}/{}",
        cfg.get_user().unwrap_or("?"),
        cfg.get_dbname().unwrap_or("?")
    )
}

impl Source {
    pub(crate) async fn connect(options: &Options) -> Result<Source, Error> {
        let hs = options.homeserver;
        if !store::ids::is_valid_server_name(&options.server_name) {
            return Err(Error::Source(format!(
                "`{}` is not a valid server name",
                options.server_name
            )));
        }
        let mut cfg = options.database.clone();
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(10));
        }
        let target = describe(&cfg);
        let (client, connection) = cfg.connect(NoTls).await.map_err(|e| Error::Connect {
            homeserver: hs.name(),
            target: target.clone(),
            message: pg_message(&e),
        })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %pg_message(&e), "the connection to the homeserver's database failed");
            }
        });
        let dbname = cfg.get_dbname().unwrap_or("?").to_owned();
        let query_err = |what: &'static str| {
            move |e: tokio_postgres::Error| Error::Query {
                homeserver: hs.name(),
                what,
                message: pg_message(&e),
            }
        };

        let (local_table, remote_table) = match hs {
            Homeserver::Synapse => ("local_media_repository", "remote_media_cache"),
            Homeserver::Dendrite => ("mediaapi_media_repository", ""),
        };
        let columns = |table: &str| {
            let table = table.to_owned();
            let client = &client;
            async move {
                let rows = client
                    .query(
                        "SELECT column_name::TEXT FROM information_schema.columns
                         WHERE table_schema = current_schema() AND table_name = $1",
                        &[&table],
                    )
                    .await?;
                Ok::<_, tokio_postgres::Error>(
                    rows.iter()
                        .map(|r| r.get::<_, String>(0))
                        .collect::<HashSet<_>>(),
                )
            }
        };
        let local_columns = columns(local_table)
            .await
            .map_err(query_err("listing columns"))?;
        if local_columns.is_empty() {
            let hint = match hs {
                Homeserver::Synapse => {
                    "is it Synapse's database? (matrix_synapse_database_database, `synapse` by default)"
                }
                Homeserver::Dendrite => {
                    "is it Dendrite's media API database? (matrix_dendrite_media_api_database, \
                     `dendrite_mediaapi` by default)"
                }
            };
            return Err(Error::Source(format!(
                "database {target} has no table {local_table}: {hint}"
            )));
        }
        let remote_columns = if remote_table.is_empty() {
            None
        } else {
            Some(
                columns(remote_table)
                    .await
                    .map_err(query_err("listing columns"))?,
            )
            .filter(|c| !c.is_empty())
        };

        let mut source = Source {
            client,
            homeserver: hs,
            dbname,
            server_name: options.server_name.clone(),
            media_path: options.media_path.clone(),
            include_remote: options.include_remote,
            include_url_cache: options.include_url_cache,
            local_columns,
            remote_columns,
            local_sql: String::new(),
            remote_sql: String::new(),
            phase: Phase::Local,
            after_origin: String::new(),
            after_id: String::new(),
        };
        source.local_sql = source.build_local_sql();
        source.remote_sql = source.build_remote_sql();
        Ok(source)
    }

    fn query_error(&self, what: &'static str) -> impl Fn(tokio_postgres::Error) -> Error + use<> {
        let homeserver = self.homeserver.name();
        move |e| Error::Query {
            homeserver,
            what,
            message: pg_message(&e),
        }
    }

    fn has(columns: &HashSet<String>, name: &str) -> bool {
        columns.contains(name)
    }

    /// The select list's optional columns, as expressions that work whichever Synapse wrote the table.
    fn optional(columns: &HashSet<String>) -> String {
        let pick = |name: &str, present: &str, absent: &str| {
            if Self::has(columns, name) {
                present.to_owned()
            } else {
                absent.to_owned()
            }
        };
        [
            pick("quarantined_by", "quarantined_by IS NOT NULL", "FALSE"),
            pick("authenticated", "authenticated", "FALSE"),
            pick("sha256", "sha256", "NULL::TEXT"),
        ]
        .join(", ")
    }

    fn url_cache_excluded(&self) -> bool {
        !self.include_url_cache && Self::has(&self.local_columns, "url_cache")
    }

    fn build_local_sql(&self) -> String {
        match self.homeserver {
            Homeserver::Synapse => {
                let url_cache = if Self::has(&self.local_columns, "url_cache") {
                    "url_cache IS NOT NULL"
                } else {
                    "FALSE"
                };
                let filter = if self.url_cache_excluded() {
                    "AND url_cache IS NULL"
                } else {
                    ""
                };
                format!(
                    "SELECT media_id, media_type, media_length::BIGINT, created_ts::BIGINT, upload_name,
                            user_id, {}, {url_cache}
                     FROM local_media_repository
                     WHERE media_id > $1 AND media_length IS NOT NULL {filter}
                     ORDER BY media_id LIMIT $2",
                    Self::optional(&self.local_columns)
                )
            }
            Homeserver::Dendrite => {
                "SELECT media_id, media_origin, content_type, file_size_bytes::BIGINT,
                        creation_ts::BIGINT, upload_name, base64hash, user_id
                 FROM mediaapi_media_repository
                 WHERE media_origin = $1 AND media_id > $2
                 ORDER BY media_id LIMIT $3"
                    .to_owned()
            }
        }
    }

    fn build_remote_sql(&self) -> String {
        match (self.homeserver, &self.remote_columns) {
            (Homeserver::Synapse, Some(columns)) => format!(
                "SELECT media_origin, media_id, media_type, media_length::BIGINT, created_ts::BIGINT,
                        upload_name, {}, filesystem_id
                 FROM remote_media_cache
                 WHERE (media_origin, media_id) > ($1, $2) AND media_length IS NOT NULL
                 ORDER BY media_origin, media_id LIMIT $3",
                Self::optional(columns)
            ),
            (Homeserver::Synapse, None) => String::new(),
            (Homeserver::Dendrite, _) => "SELECT media_id, media_origin, content_type, file_size_bytes::BIGINT,
                        creation_ts::BIGINT, upload_name, base64hash, user_id
                 FROM mediaapi_media_repository
                 WHERE media_origin <> $1 AND (media_origin, media_id) > ($2, $3)
                 ORDER BY media_origin, media_id LIMIT $4"
                .to_owned(),
        }
    }

    /// Refuses a server name that is not the homeserver's: its media would be imported under an
    /// origin nobody asks for.
    pub(crate) async fn check_server_name(&self) -> Result<(), Error> {
        let sql = match self.homeserver {
            // Local media is uploaded by local users: their domain is the server name.
            Homeserver::Synapse => {
                "SELECT user_id, substr(user_id, strpos(user_id, ':') + 1) FROM local_media_repository
                 WHERE user_id LIKE '@%:%' AND media_length IS NOT NULL LIMIT 1"
            }
            Homeserver::Dendrite => {
                "SELECT user_id, media_origin FROM mediaapi_media_repository
                 WHERE user_id LIKE '@%:%' AND substr(user_id, strpos(user_id, ':') + 1) = media_origin
                 LIMIT 1"
            }
        };
        let row = self
            .client
            .query_opt(sql, &[])
            .await
            .map_err(self.query_error("checking the server name"))?;
        if let Some(row) = row {
            let (user, domain): (String, String) = (row.get(0), row.get(1));
            if domain != self.server_name {
                return Err(Error::Source(format!(
                    "the media in database `{}` belongs to `{domain}` (uploaded by {user}), not to `{}`: \
                     set the server name to `{domain}`",
                    self.dbname, self.server_name
                )));
            }
        }
        Ok(())
    }

    pub(crate) async fn totals(&self) -> Result<Totals, Error> {
        let err = self.query_error("counting media");
        let n = |row: &Row, i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
        let mut t = Totals::default();
        match self.homeserver {
            Homeserver::Synapse => {
                let (wanted, url_cache) = if Self::has(&self.local_columns, "url_cache") {
                    (
                        if self.include_url_cache {
                            "media_length IS NOT NULL"
                        } else {
                            "media_length IS NOT NULL AND url_cache IS NULL"
                        },
                        "media_length IS NOT NULL AND url_cache IS NOT NULL",
                    )
                } else {
                    ("media_length IS NOT NULL", "FALSE")
                };
                let row = self
                    .client
                    .query_one(
                        &format!(
                            "SELECT count(*) FILTER (WHERE {wanted}),
                                    COALESCE(sum(media_length::BIGINT) FILTER (WHERE {wanted}), 0)::BIGINT,
                                    count(*) FILTER (WHERE media_length IS NULL),
                                    count(*) FILTER (WHERE {url_cache})
                             FROM local_media_repository"
                        ),
                        &[],
                    )
                    .await
                    .map_err(&err)?;
                t.items = n(&row, 0);
                t.bytes = n(&row, 1);
                t.pending = n(&row, 2);
                t.url_cache = if self.include_url_cache {
                    0
                } else {
                    n(&row, 3)
                };
                if self.remote_columns.is_some() {
                    let row = self
                        .client
                        .query_one(
                            "SELECT count(*) FILTER (WHERE media_length IS NOT NULL),
                                    COALESCE(sum(media_length::BIGINT), 0)::BIGINT
                             FROM remote_media_cache",
                            &[],
                        )
                        .await
                        .map_err(&err)?;
                    if self.include_remote {
                        t.items += n(&row, 0);
                        t.bytes += n(&row, 1);
                    } else {
                        t.remote = n(&row, 0);
                    }
                }
            }
            Homeserver::Dendrite => {
                let row = self
                    .client
                    .query_one(
                        "SELECT count(*) FILTER (WHERE media_origin = $1),
                                COALESCE(sum(file_size_bytes::BIGINT) FILTER (WHERE media_origin = $1), 0)::BIGINT,
                                count(*) FILTER (WHERE media_origin <> $1),
                                COALESCE(sum(file_size_bytes::BIGINT) FILTER (WHERE media_origin <> $1), 0)::BIGINT
                         FROM mediaapi_media_repository",
                        &[&self.server_name],
                    )
                    .await
                    .map_err(&err)?;
                t.items = n(&row, 0);
                t.bytes = n(&row, 1);
                if self.include_remote {
                    t.items += n(&row, 2);
                    t.bytes += n(&row, 3);
                } else {
                    t.remote = n(&row, 2);
                }
            }
        }
        Ok(t)
    }

    /// The next page of items, `None` when every table has been read.
    pub(crate) async fn next_page(&mut self, limit: i64) -> Result<Option<Vec<Item>>, Error> {
        loop {
            let rows = match self.phase {
                Phase::Done => return Ok(None),
                Phase::Local => {
                    let rows = match self.homeserver {
                        Homeserver::Synapse => {
                            self.client
                                .query(&self.local_sql, &[&self.after_id, &limit])
                                .await
                        }
                        Homeserver::Dendrite => {
                            self.client
                                .query(
                                    &self.local_sql,
                                    &[&self.server_name, &self.after_id, &limit],
                                )
                                .await
                        }
                    }
                    .map_err(self.query_error("reading media rows; rerun to resume"))?;
                    if let Some(last) = rows.last() {
                        self.after_id = last.get(0);
                    }
                    rows
                }
                Phase::Remote => {
                    let rows = match self.homeserver {
                        Homeserver::Synapse => {
                            self.client
                                .query(
                                    &self.remote_sql,
                                    &[&self.after_origin, &self.after_id, &limit],
                                )
                                .await
                        }
                        Homeserver::Dendrite => {
                            self.client
                                .query(
                                    &self.remote_sql,
                                    &[
                                        &self.server_name,
                                        &self.after_origin,
                                        &self.after_id,
                                        &limit,
                                    ],
                                )
                                .await
                        }
                    }
                    .map_err(self.query_error("reading remote media rows; rerun to resume"))?;
                    if let Some(last) = rows.last() {
                        let (origin, id) = match self.homeserver {
                            Homeserver::Synapse => (last.get(0), last.get(1)),
                            Homeserver::Dendrite => (last.get(1), last.get(0)),
                        };
                        self.after_origin = origin;
                        self.after_id = id;
                    }
                    rows
                }
            };
            if rows.is_empty() {
                self.phase = match self.phase {
                    Phase::Local
                        if self.include_remote
                            && (self.homeserver == Homeserver::Dendrite
                                || self.remote_columns.is_some()) =>
                    {
                        Phase::Remote
                    }
                    _ => Phase::Done,
                };
                self.after_origin.clear();
                self.after_id.clear();
                continue;
            }
            let items = rows.iter().map(|r| self.item(r)).collect();
            return Ok(Some(items));
        }
    }

    fn item(&self, r: &Row) -> Item {
        let base = self.media_path.as_deref();
        match (self.homeserver, self.phase) {
            (Homeserver::Synapse, Phase::Local) => {
                let media_id: String = r.get(0);
                let url_cache: bool = r.get(9);
                let path = base.and_then(|b| {
                    if url_cache {
                        synapse_url_cache_path(b, &media_id)
                    } else {
                        synapse_local_path(b, &media_id)
                    }
                });
                Item {
                    valid: store::ids::is_valid_media_id(&media_id),
                    origin: self.server_name.clone(),
                    kind: MediaKind::LocalMedia,
                    content_type: content_type(r.get(1)),
                    size: size(r.get(2)),
                    created_ts: r.get(3),
                    upload_name: non_empty(r.get(4)),
                    user_id: r.get::<_, Option<String>>(5).unwrap_or_default(),
                    quarantined: r.get(6),
                    requires_auth: r.get(7),
                    sha256: hex_sha256(r.get(8)),
                    path,
                    media_id,
                    present: false,
                }
            }
            (Homeserver::Synapse, _) => {
                let origin: String = r.get(0);
                let media_id: String = r.get(1);
                let filesystem_id: Option<String> = r.get(9);
                let path = base.and_then(|b| {
                    synapse_remote_path(b, &origin, filesystem_id.as_deref().unwrap_or(""))
                });
                Item {
                    valid: store::ids::is_valid_media_id(&media_id)
                        && store::ids::is_valid_server_name(&origin),
                    kind: MediaKind::RemoteMedia,
                    content_type: content_type(r.get(2)),
                    size: size(r.get(3)),
                    created_ts: r.get(4),
                    upload_name: non_empty(r.get(5)),
                    user_id: String::new(),
                    quarantined: r.get(6),
                    requires_auth: r.get(7),
                    sha256: hex_sha256(r.get(8)),
                    path,
                    origin,
                    media_id,
                    present: false,
                }
            }
            (Homeserver::Dendrite, phase) => {
                let media_id: String = r.get(0);
                let origin: String = r.get(1);
                let hash: String = r.get(6);
                let upload_name: String = r.get(5);
                let upload_name = percent_encoding::percent_decode_str(&upload_name)
                    .decode_utf8()
                    .map_or(upload_name.clone(), |s| s.into_owned());
                Item {
                    valid: store::ids::is_valid_media_id(&media_id)
                        && store::ids::is_valid_server_name(&origin),
                    kind: if phase == Phase::Local {
                        MediaKind::LocalMedia
                    } else {
                        MediaKind::RemoteMedia
                    },
                    content_type: content_type(r.get(2)),
                    size: size(r.get(3)),
                    created_ts: r.get(4),
                    upload_name: non_empty(Some(upload_name)),
                    user_id: if phase == Phase::Local {
                        r.get(7)
                    } else {
                        String::new()
                    },
                    quarantined: false,
                    requires_auth: false,
                    sha256: dendrite_sha256(&hash),
                    path: base.and_then(|b| dendrite_path(b, &hash)),
                    origin,
                    media_id,
                    present: false,
                }
            }
        }
    }
}

fn content_type(value: Option<String>) -> String {
    value
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "application/octet-stream".to_owned())
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

fn size(value: Option<i64>) -> u64 {
    value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

/// A lower-case hex SHA-256, when the column holds one.
fn hex_sha256(value: Option<String>) -> Option<String> {
    value
        .map(|v| v.to_ascii_lowercase())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Dendrite's `base64hash` (unpadded URL-safe base64 of the SHA-256) as hex.
fn dendrite_sha256(hash: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(hash)
        .ok()?;
    (bytes.len() == 32).then(|| hex::encode(bytes))
}

/// A path component that cannot leave its directory.
fn safe(part: &str) -> bool {
    !part.is_empty() && part != "." && part != ".." && !part.contains('/') && !part.contains('\0')
}

/// `local_content/aa/bb/cccc…` (Synapse's `local_media_filepath_rel`).
pub(crate) fn synapse_local_path(base: &Path, media_id: &str) -> Option<PathBuf> {
    split_path(&base.join("local_content"), media_id)
}

/// `url_cache/yyyy-mm-dd/rest` for date-prefixed ids, else `url_cache/aa/bb/cccc…`.
pub(crate) fn synapse_url_cache_path(base: &Path, media_id: &str) -> Option<PathBuf> {
    let b = media_id.as_bytes();
    let dated = b.len() > 11
        && b[..10].iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    if dated {
        let (date, rest) = (&media_id[..10], &media_id[11..]);
        (safe(date) && safe(rest)).then(|| base.join("url_cache").join(date).join(rest))
    } else {
        split_path(&base.join("url_cache"), media_id)
    }
}

/// `remote_content/<origin>/aa/bb/cccc…` from the row's `filesystem_id`.
pub(crate) fn synapse_remote_path(
    base: &Path,
    origin: &str,
    filesystem_id: &str,
) -> Option<PathBuf> {
    if !safe(origin) {
        return None;
    }
    split_path(&base.join("remote_content").join(origin), filesystem_id)
}

fn split_path(dir: &Path, id: &str) -> Option<PathBuf> {
    if id.len() < 5 || !id.is_char_boundary(2) || !id.is_char_boundary(4) {
        return None;
    }
    let (a, b, c) = (&id[..2], &id[2..4], &id[4..]);
    (safe(a) && safe(b) && safe(c)).then(|| dir.join(a).join(b).join(c))
}

/// `<h[0]>/<h[1]>/<h[2:]>/file` (Dendrite's `fileutils.GetPathFromBase64Hash`).
pub(crate) fn dendrite_path(base: &Path, hash: &str) -> Option<PathBuf> {
    let ok = hash.len() > 2
        && hash
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_');
    ok.then(|| {
        base.join(&hash[..1])
            .join(&hash[1..2])
            .join(&hash[2..])
            .join("file")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synapse_paths() {
        let b = Path::new("/m");
        assert_eq!(
            synapse_local_path(b, "GerZNDnDZVjsOtardLuwfIBg").unwrap(),
            Path::new("/m/local_content/Ge/rZ/NDnDZVjsOtardLuwfIBg")
        );
        assert_eq!(
            synapse_url_cache_path(b, "2017-09-28_fsdRDt24DS234dsf").unwrap(),
            Path::new("/m/url_cache/2017-09-28/fsdRDt24DS234dsf")
        );
        assert_eq!(
            synapse_url_cache_path(b, "GerZNDnDZVjsOtardLuwfIBg").unwrap(),
            Path::new("/m/url_cache/Ge/rZ/NDnDZVjsOtardLuwfIBg")
        );
        assert_eq!(
            synapse_remote_path(b, "matrix.org", "abcdefghij").unwrap(),
            Path::new("/m/remote_content/matrix.org/ab/cd/efghij")
        );
        assert_eq!(synapse_local_path(b, "ab"), None);
        assert_eq!(synapse_local_path(b, "ab/../cd"), None);
        assert_eq!(synapse_local_path(b, "....x"), None);
        assert_eq!(synapse_remote_path(b, "..", "abcdefghij"), None);
    }

    #[test]
    fn dendrite_paths_and_hashes() {
        let b = Path::new("/d");
        assert_eq!(
            dendrite_path(b, "qwerty").unwrap(),
            Path::new("/d/q/w/erty/file")
        );
        assert_eq!(dendrite_path(b, "../x"), None);
        // SHA-256 of "" in Dendrite's encoding.
        assert_eq!(
            dendrite_sha256("47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU").as_deref(),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
        );
        assert_eq!(dendrite_sha256("nope"), None);
    }

    #[test]
    fn column_values() {
        assert_eq!(content_type(None), "application/octet-stream");
        assert_eq!(content_type(Some("image/png".into())), "image/png");
        assert_eq!(size(Some(-1)), 0);
        assert_eq!(hex_sha256(Some("AB".repeat(32))), Some("ab".repeat(32)));
        assert_eq!(hex_sha256(Some("zz".into())), None);
    }
}
