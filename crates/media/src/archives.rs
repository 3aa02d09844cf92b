//! GDPR archives in matrix-media-repo's v2 format, both ways: an entity's media written as
//! gzip-compressed tar parts (`export-part-N.tgz`, each closed once it passes
//! `archiving.targetBytesPerPart`, then `export-manifest.tgz` with `manifest.json` and
//! `index.html`), and archives read back into the store through the upload pipeline.
//!
//! Nothing is held whole: each media is copied from its datastore into a temp file and appended
//! to the part's tar on a blocking thread; the manifest and the index are written as they grow;
//! an import streams each tar entry into the pipeline through a bounded channel.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use config::MediaKind;
use flate2::Compression;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::Error;

/// Media read from the database per query while exporting.
const PAGE: i64 = 100;
/// How much of a tar entry is read at once when importing.
const CHUNK: usize = 256 * 1024;

/// One media in `manifest.json` (matrix-media-repo's `ManifestRecord`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// The upload's file name.
    #[serde(default)]
    pub name: String,
    /// The entry's name in the tar.
    pub file_name: String,
    pub size_bytes: i64,
    #[serde(default)]
    pub content_type: String,
    #[serde(default)]
    pub s3_url: String,
    pub sha256: String,
    pub origin: String,
    pub media_id: String,
    #[serde(default)]
    pub created_ts: i64,
    #[serde(default)]
    pub uploader: String,
}

#[derive(Debug, Clone, Deserialize)]
struct Manifest {
    version: i64,
    #[serde(default)]
    entity_id: String,
    media: HashMap<String, ManifestRecord>,
}

/// What an export wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportReport {
    pub media: u64,
    pub bytes: u64,
    pub parts: u64,
}

fn io_err(e: impl std::fmt::Display) -> Error {
    Error::from(std::io::Error::other(e.to_string()))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(io_err)?
        .map_err(Error::from)
}

/// The tar.gz part being written.
struct Part {
    index: i32,
    path: PathBuf,
    tar: tar::Builder<GzEncoder<std::fs::File>>,
    bytes: u64,
    entries: u64,
}

impl Part {
    fn start(dir: &Path, export_id: &str, index: i32) -> std::io::Result<Part> {
        let path = dir.join(format!(
            "{}{export_id}-{index}",
            store::archives::EXPORT_TEMP_PREFIX
        ));
        let file = std::fs::File::create(&path)?;
        let mut tar = tar::Builder::new(GzEncoder::new(file, Compression::default()));
        tar.mode(tar::HeaderMode::Deterministic);
        Ok(Part {
            index,
            path,
            tar,
            bytes: 0,
            entries: 0,
        })
    }

    /// Appends the file at `from` as `name`, with mode 0644 and `mtime` (seconds).
    fn append(&mut self, name: &str, from: &Path, mtime: u64) -> std::io::Result<()> {
        let mut file = std::fs::File::open(from)?;
        let size = file.metadata()?.len();
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar.append_data(&mut header, name, &mut file)?;
        self.bytes += size;
        self.entries += 1;
        Ok(())
    }

    /// Closes the tar and the gzip stream, and makes the file durable.
    fn finish(self) -> std::io::Result<(i32, PathBuf)> {
        let gz = self.tar.into_inner()?;
        let file = gz.finish()?;
        file.sync_all()?;
        Ok((self.index, self.path))
    }
}

/// A file extension for a content type, for the tar entry's name.
fn extension(content_type: &str) -> &'static str {
    match content_type.split(';').next().unwrap_or("").trim() {
        "image/png" => ".png",
        "image/jpeg" => ".jpg",
        "image/gif" => ".gif",
        "image/webp" => ".webp",
        "image/svg+xml" => ".svg",
        "video/mp4" => ".mp4",
        "video/webm" => ".webm",
        "audio/ogg" => ".ogg",
        "audio/mpeg" => ".mp3",
        "text/plain" => ".txt",
        "application/pdf" => ".pdf",
        _ => "",
    }
}

/// Text for HTML (the export's index, and its page on the admin API).
pub fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Writes export `export_id` of `entity` (a user id, or a server name) into the archives
/// datastore, replacing any parts an interrupted run left. `include_s3_urls` records the public
/// URL of objects on an S3 datastore with `publicBaseUrl`.
pub async fn export(
    store: &store::Store,
    export_id: &str,
    entity: &str,
    part_bytes: u64,
    include_s3_urls: bool,
) -> Result<ExportReport, Error> {
    store.clear_export_parts(export_id).await?;
    let dir = store.archives_temp_dir()?;
    tokio::fs::create_dir_all(&dir).await?;
    let scratch = tempfile::Builder::new()
        .prefix(store::archives::EXPORT_TEMP_PREFIX)
        .tempdir_in(&dir)?;
    let manifest_path = scratch.path().join("manifest.json");
    let index_path = scratch.path().join("index.html");
    let mut manifest = std::io::BufWriter::new(std::fs::File::create(&manifest_path)?);
    let mut index = std::io::BufWriter::new(std::fs::File::create(&index_path)?);
    write!(
        manifest,
        r#"{{"version":2,"entity_id":{},"created_ts":{},"media":{{"#,
        json!(entity),
        store::now_ms()
    )?;
    write!(
        index,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>Export of {0}</title></head>\
         <body><h1>Media of {0}</h1><table><tr><th>File</th><th>Name</th><th>Type</th>\
         <th>Bytes</th><th>Uploaded (ms)</th><th>SHA-256</th></tr>",
        escape_html(entity)
    )?;

    let mut report = ExportReport::default();
    let mut part = Some(Part::start(&dir, export_id, 1)?);
    let mut after = (String::new(), String::new());
    loop {
        let page = store
            .entity_media(entity, (&after.0, &after.1), PAGE)
            .await?;
        let Some(last) = page.last() else {
            break;
        };
        after = (last.origin.clone(), last.media_id.clone());
        for media in page {
            let Some(object) = &media.object else {
                continue;
            };
            let copy = scratch.path().join("media");
            let mut reader = store.read(object, 0, None).await?;
            let mut out = tokio::fs::File::create(&copy).await?;
            tokio::io::copy(&mut reader, &mut out).await?;
            drop(out);
            let archived = format!(
                "{}__{}{}",
                media.origin,
                media.media_id,
                extension(&media.content_type)
            );
            let mtime = u64::try_from(media.created_ts / 1000).unwrap_or(0);
            let mut current = part.take().ok_or_else(|| io_err("no part"))?;
            let name = archived.clone();
            current =
                blocking(move || current.append(&name, &copy, mtime).map(|()| current)).await?;
            let s3_url = if include_s3_urls {
                store
                    .datastores()
                    .get(&object.datastore_id)
                    .and_then(|ds| ds.redirect_url(&object.location))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            let record = ManifestRecord {
                name: media.upload_name.clone().unwrap_or_default(),
                file_name: archived.clone(),
                size_bytes: i64::try_from(object.size).unwrap_or(i64::MAX),
                content_type: media.content_type.clone(),
                s3_url,
                sha256: object.sha256.clone(),
                origin: media.origin.clone(),
                media_id: media.media_id.clone(),
                created_ts: media.created_ts,
                uploader: media.user_id.clone(),
            };
            if report.media > 0 {
                manifest.write_all(b",")?;
            }
            write!(
                manifest,
                "{}:{}",
                json!(media.mxc()),
                serde_json::to_string(&record).map_err(io_err)?
            )?;
            write!(
                index,
                "<tr><td><a href=\"{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td>\
                 <td>{4}</td><td>{5}</td></tr>",
                escape_html(&archived),
                escape_html(&record.name),
                escape_html(&record.content_type),
                object.size,
                media.created_ts,
                object.sha256
            )?;
            report.media += 1;
            report.bytes += object.size;
            if current.bytes >= part_bytes {
                let next = current.index + 1;
                store_part(store, export_id, current, &mut report).await?;
                part = Some(Part::start(&dir, export_id, next)?);
            } else {
                part = Some(current);
            }
        }
    }
    let current = part.take().ok_or_else(|| io_err("no part"))?;
    let manifest_index = if current.entries > 0 {
        let next = current.index + 1;
        store_part(store, export_id, current, &mut report).await?;
        next
    } else {
        let (_, path) = blocking(move || current.finish()).await?;
        let _ = tokio::fs::remove_file(path).await;
        i32::try_from(report.parts).unwrap_or(i32::MAX) + 1
    };
    manifest.write_all(b"}}")?;
    index.write_all(b"</table></body></html>")?;
    manifest.into_inner().map_err(io_err)?.sync_all()?;
    index.into_inner().map_err(io_err)?.sync_all()?;
    let mut last = Part::start(&dir, export_id, manifest_index)?;
    let now = u64::try_from(store::now_ms() / 1000).unwrap_or(0);
    last = blocking(move || {
        last.append("manifest.json", &manifest_path, now)?;
        last.append("index.html", &index_path, now)?;
        Ok(last)
    })
    .await?;
    let (i, path) = blocking(move || last.finish()).await?;
    let placed = store
        .put_export_part(export_id, i, "export-manifest.tgz", &path)
        .await;
    let _ = tokio::fs::remove_file(&path).await;
    placed?;
    report.parts += 1;
    Ok(report)
}

async fn store_part(
    store: &store::Store,
    export_id: &str,
    part: Part,
    report: &mut ExportReport,
) -> Result<(), Error> {
    let (i, path) = blocking(move || part.finish()).await?;
    let placed = store
        .put_export_part(export_id, i, &format!("export-part-{i}.tgz"), &path)
        .await;
    let _ = tokio::fs::remove_file(&path).await;
    placed?;
    report.parts += 1;
    Ok(())
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImportReport {
    pub entity: String,
    pub imported: u64,
    /// Already here (same origin and id).
    pub existing: u64,
    /// Listed in the manifest, missing from every part.
    pub missing: Vec<String>,
    /// Refused, with why (a hash mismatch, quarantined content, no datastore).
    pub failed: Vec<(String, String)>,
}

/// Reads `manifest.json` from whichever of `parts` (tar.gz files) has it.
fn read_manifest(parts: &[PathBuf]) -> std::io::Result<Manifest> {
    for part in parts {
        let mut archive =
            tar::Archive::new(flate2::read::GzDecoder::new(std::fs::File::open(part)?));
        for entry in archive.entries()? {
            let mut entry = entry?;
            if entry.path()?.as_os_str() == "manifest.json" {
                let mut text = String::new();
                entry.read_to_string(&mut text)?;
                return serde_json::from_str(&text).map_err(std::io::Error::other);
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        NO_MANIFEST,
    ))
}

const NO_MANIFEST: &str = "no part has a manifest.json: give every part of the export (the manifest is in the last, export-manifest.tgz)";

type Chunks = tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>;

/// Imports an export from its parts (tar.gz files, any order): every media of the manifest, under
/// its origin and id, checked against its SHA-256; media already here is left as it is.
/// `is_local` says which origins are ours (local media), the rest is remote media.
pub async fn import(
    store: &store::Store,
    parts: Vec<PathBuf>,
    is_local: impl Fn(&str) -> bool,
) -> Result<ImportReport, Error> {
    let scan = parts.clone();
    let manifest = tokio::task::spawn_blocking(move || read_manifest(&scan))
        .await
        .map_err(io_err)?
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound(NO_MANIFEST.to_owned()),
            _ => Error::from(e),
        })?;
    if manifest.version != 2 {
        return Err(Error::InvalidParam(format!(
            "the manifest is version {}; this mmrctl reads matrix-media-repo's version 2",
            manifest.version
        )));
    }
    let mut report = ImportReport {
        entity: manifest.entity_id.clone(),
        ..ImportReport::default()
    };
    let by_file: HashMap<String, ManifestRecord> = manifest
        .media
        .into_values()
        .map(|r| (r.file_name.clone(), r))
        .collect();
    let mut pending: std::collections::HashSet<String> = by_file.keys().cloned().collect();
    let wanted = std::sync::Arc::new(by_file);
    // The blocking reader hands over one entry at a time, its bytes through a bounded channel.
    let (entries_tx, mut entries) = tokio::sync::mpsc::channel::<(ManifestRecord, Chunks)>(1);
    let reader = {
        let wanted = wanted.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            for part in parts {
                let file = std::fs::File::open(&part)?;
                let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
                for entry in archive.entries()? {
                    let mut entry = entry?;
                    let name = entry.path()?.to_string_lossy().into_owned();
                    let Some(record) = wanted.get(&name) else {
                        continue;
                    };
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    if entries_tx.blocking_send((record.clone(), rx)).is_err() {
                        return Ok(());
                    }
                    let mut buf = vec![0; CHUNK];
                    loop {
                        match entry.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if tx
                                    .blocking_send(Ok(Bytes::copy_from_slice(&buf[..n])))
                                    .is_err()
                                {
                                    break;
                                }
                            }
                            Err(e) => {
                                let _ = tx.blocking_send(Err(e));
                                break;
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    };
    while let Some((record, chunks)) = entries.recv().await {
        let mxc = format!("mxc://{}/{}", record.origin, record.media_id);
        if !pending.remove(&record.file_name) {
            continue;
        }
        if store
            .media(&record.origin, &record.media_id)
            .await?
            .is_some()
        {
            report.existing += 1;
            continue;
        }
        let expected = hex::decode(&record.sha256)
            .ok()
            .and_then(|h| <[u8; 32]>::try_from(h).ok());
        let local = is_local(&record.origin);
        let new = store::NewMedia {
            origin: record.origin.clone(),
            kind: if local {
                MediaKind::LocalMedia
            } else {
                MediaKind::RemoteMedia
            },
            content_type: if record.content_type.is_empty() {
                "application/octet-stream".to_owned()
            } else {
                record.content_type.clone()
            },
            upload_name: (!record.name.is_empty()).then(|| record.name.clone()),
            user_id: record.uploader.clone(),
            requires_auth: false,
            quarantined: false,
            created_ts: (record.created_ts > 0).then_some(record.created_ts),
        };
        let size = u64::try_from(record.size_bytes).unwrap_or(0);
        let limits = store::Limits {
            max_bytes: size,
            min_bytes: size,
            expected_sha256: expected,
            ..store::Limits::default()
        };
        let body = futures_util::stream::unfold(chunks, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        match store
            .upload(
                new,
                store::Target::Id(record.media_id.clone()),
                body,
                limits,
            )
            .await
        {
            Ok(_) => report.imported += 1,
            Err(store::Error::MediaIdTaken) => report.existing += 1,
            Err(e) if e.is_unavailable() => return Err(e.into()),
            Err(e) => report.failed.push((mxc, e.to_string())),
        }
    }
    reader.await.map_err(io_err)??;
    let mut missing: Vec<String> = pending
        .into_iter()
        .filter_map(|f| {
            wanted
                .get(&f)
                .map(|r| format!("mxc://{}/{}", r.origin, r.media_id))
        })
        .collect();
    missing.sort();
    report.missing = missing;
    Ok(report)
}
