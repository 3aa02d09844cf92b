//! What operators do to stored media: purges, quarantines, usage, size estimates, attributes.
//!
//! Purges and quarantines act on a [`Selection`] one content (SHA-256) at a time, each in one
//! transaction under that content's hash lock, so memory stays bounded however much is selected
//! and a run stopped anywhere is continued by running it again (what it selects shrinks as it
//! goes). Pinned media is never purged or quarantined.

use std::collections::BTreeMap;

use config::MediaKind;
use serde::{Deserialize, Serialize};
use tokio_postgres::types::ToSql;

use crate::thumbnails::delete_thumbnails_of;
use crate::{Error, Store};

/// Rows read per query.
const BATCH: i64 = 500;
/// At most this many mxc URIs are listed in a purge's report (the count is always exact).
pub const AFFECTED_LISTED: usize = 10_000;

/// Which media a purge or a quarantine names. Every timestamp is milliseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Selection {
    /// Remote media cached before `before_ts` (fetched again when asked for).
    Remote { before_ts: i64 },
    /// Media not served since `before_ts` (nor stored since): remote media only, unless
    /// `include_local`.
    Old { before_ts: i64, include_local: bool },
    /// Quarantined media.
    Quarantined,
    /// What `user_id` uploaded before `before_ts`.
    User { user_id: String, before_ts: i64 },
    /// Media of the server `origin` (ours or remote) stored before `before_ts`.
    Server { origin: String, before_ts: i64 },
    /// These media, as `(origin, media_id)` (one record, a room's media).
    Media { media: Vec<(String, String)> },
}

impl Selection {
    /// Whether quarantined media is part of the selection: only when named on purpose. Every
    /// other purge keeps quarantined rows, so that their quarantine stays on record.
    fn includes_quarantined(&self) -> bool {
        matches!(self, Selection::Quarantined | Selection::Media { .. })
    }

    /// The condition on `media m`, with its parameters from `$1`; `only_origin` restricts it to
    /// one origin (a homeserver admin acts for their own server only).
    fn condition(&self, only_origin: Option<&str>) -> Condition {
        let mut c = Condition::default();
        match self {
            Selection::Remote { before_ts } => {
                let kind = c.param(MediaKind::RemoteMedia.as_str().to_owned());
                let before = c.param(*before_ts);
                c.push(format!("m.kind = {kind} AND m.created_ts < {before}"));
            }
            Selection::Old {
                before_ts,
                include_local,
            } => {
                let before = c.param(*before_ts);
                let local = c.param(*include_local);
                let kind = c.param(MediaKind::RemoteMedia.as_str().to_owned());
                c.push(format!(
                    "COALESCE(m.last_access_ts, m.created_ts) < {before} AND ({local} OR m.kind = {kind})"
                ));
            }
            Selection::Quarantined => c.push("m.quarantined".to_owned()),
            Selection::User { user_id, before_ts } => {
                let user = c.param(user_id.clone());
                let before = c.param(*before_ts);
                c.push(format!("m.user_id = {user} AND m.created_ts < {before}"));
            }
            Selection::Server { origin, before_ts } => {
                let origin = c.param(origin.clone());
                let before = c.param(*before_ts);
                c.push(format!("m.origin = {origin} AND m.created_ts < {before}"));
            }
            Selection::Media { media } => {
                let (origins, ids): (Vec<String>, Vec<String>) = media.iter().cloned().unzip();
                let origins = c.param(origins);
                let ids = c.param(ids);
                c.push(format!(
                    "(m.origin, m.media_id) IN (SELECT * FROM unnest({origins}::text[], {ids}::text[]))"
                ));
            }
        }
        if !self.includes_quarantined() {
            c.push("NOT m.quarantined".to_owned());
        }
        if let Some(origin) = only_origin {
            let origin = c.param(origin.to_owned());
            c.push(format!("m.origin = {origin}"));
        }
        c.push(NOT_PINNED.to_owned());
        c
    }
}

const NOT_PINNED: &str = "NOT EXISTS (SELECT 1 FROM media_attributes a
     WHERE a.origin = m.origin AND a.media_id = m.media_id AND a.purpose = 'pinned')";

/// A `WHERE` condition and its parameters.
#[derive(Default)]
struct Condition {
    sql: Vec<String>,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Condition {
    /// Adds a parameter; returns its placeholder.
    fn param(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn push(&mut self, sql: String) {
        self.sql.push(sql);
    }

    fn sql(&self) -> String {
        self.sql.join(" AND ")
    }

    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// What a purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    /// Media rows deleted.
    pub media: u64,
    /// Thumbnail rows deleted with them.
    pub thumbnails: u64,
    /// Objects deleted because nothing referenced them any more.
    pub objects: u64,
    /// The purged media, as mxc URIs (the first [`AFFECTED_LISTED`]).
    pub affected: Vec<String>,
}

/// A server's or a user's stored media, as matrix-media-repo's usage endpoints count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
}

/// One user's uploads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UserUsage {
    pub media: Tally,
    pub uploaded: Vec<String>,
}

/// One upload, as `usage/<server>/uploads` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Upload {
    pub size_bytes: u64,
    pub uploaded_by: String,
    pub datastore_id: String,
    pub datastore_location: String,
    pub sha256_hash: String,
    pub quarantined: bool,
    pub upload_name: String,
    pub content_type: String,
    pub created_ts: i64,
}

/// A user's line in Synapse's users' media statistics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserStats {
    pub user_id: String,
    pub displayname: String,
    pub media_count: u64,
    pub media_length: u64,
}

/// Which page of users' statistics, as Synapse's `statistics/users/media` takes it.
#[derive(Debug, Clone, Default)]
pub struct StatsQuery {
    pub from: u64,
    pub limit: u64,
    /// `user_id`, `displayname`, `media_length` or `media_count`.
    pub order_by: String,
    pub backwards: bool,
    pub from_ts: Option<i64>,
    pub until_ts: Option<i64>,
    pub search_term: Option<String>,
}

/// What a datastore holds, as matrix-media-repo's size estimate reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SizeEstimate {
    pub thumbnails_affected: u64,
    pub thumbnail_hashes_affected: u64,
    pub thumbnail_bytes: u64,
    pub media_affected: u64,
    pub media_hashes_affected: u64,
    pub media_bytes: u64,
    pub total_hashes_affected: u64,
    pub total_bytes: u64,
}

fn count(row: &tokio_postgres::Row, i: usize) -> u64 {
    u64::try_from(row.get::<_, i64>(i)).unwrap_or(0)
}

/// A media attribute's purpose: matrix-media-repo knows `none` and `pinned`.
pub const PURPOSES: [&str; 2] = ["none", "pinned"];

impl Store {
    /// Deletes the selected media, their thumbnails, and every object no row references any
    /// more. Content that was quarantined stays refused after its rows are gone. `progress` is
    /// called after each content with the report so far.
    pub async fn purge(
        &self,
        selection: &Selection,
        only_origin: Option<&str>,
        mut progress: impl FnMut(&PurgeReport),
    ) -> Result<PurgeReport, Error> {
        // A run a crash stopped may have left files of deleted objects behind.
        self.finish_pending_deletions().await?;
        let condition = selection.condition(only_origin);
        let mut report = PurgeReport::default();
        // Pending uploads have no content: their rows just go.
        let pending = self
            .client()
            .await?
            .query(
                &format!(
                    "DELETE FROM media m WHERE m.sha256 IS NULL AND {} RETURNING origin, media_id",
                    condition.sql()
                ),
                &condition.refs(),
            )
            .await?;
        for row in &pending {
            report.media += 1;
            list(&mut report, row.get(0), row.get(1));
        }
        let select = format!(
            "SELECT DISTINCT m.sha256 FROM media m WHERE m.sha256 IS NOT NULL AND {} LIMIT {BATCH}",
            condition.sql()
        );
        let delete = format!(
            "DELETE FROM media m WHERE m.sha256 = ${} AND {} RETURNING origin, media_id, quarantined",
            condition.params.len() + 1,
            condition.sql()
        );
        loop {
            let hashes = self.contents(&select, &condition.refs()).await?;
            if hashes.is_empty() {
                return Ok(report);
            }
            for sha256 in &hashes {
                let ((gone, thumbs), dropped) = self
                    .under_content_lock(sha256, async |tx| {
                        let mut params = condition.refs();
                        params.push(sha256);
                        let gone = tx.query(&delete, &params).await?;
                        if gone.iter().any(|r| r.get::<_, bool>(2)) {
                            tx.execute(
                                "INSERT INTO quarantined_content (sha256, quarantined_ts)
                                 VALUES ($1, $2) ON CONFLICT DO NOTHING",
                                &[sha256, &crate::now_ms()],
                            )
                            .await?;
                        }
                        let media: Vec<(String, String)> =
                            gone.iter().map(|r| (r.get(0), r.get(1))).collect();
                        let thumbs = delete_thumbnails_of(tx, &media).await?;
                        Ok((media, thumbs))
                    })
                    .await?;
                report.thumbnails += thumbs.len() as u64;
                report.objects += u64::from(dropped) + self.drop_unused(thumbs, sha256).await?;
                for (origin, media_id) in gone {
                    report.media += 1;
                    list(&mut report, origin, media_id);
                }
                progress(&report);
            }
        }
    }

    /// Quarantines the selected media and, with each, every media row with the same content
    /// (within `only_origin` when given): it is served no more, and the content cannot be
    /// uploaded again. Pinned media is left alone. Returns how many rows were quarantined.
    pub async fn quarantine(
        &self,
        selection: &Selection,
        only_origin: Option<&str>,
    ) -> Result<u64, Error> {
        let condition = selection.condition(only_origin);
        let mut changed = self
            .client()
            .await?
            .execute(
                &format!(
                    "UPDATE media m SET quarantined = TRUE
                     WHERE m.sha256 IS NULL AND NOT m.quarantined AND {}",
                    condition.sql()
                ),
                &condition.refs(),
            )
            .await?;
        let after = condition.params.len() + 1;
        let select = format!(
            "SELECT DISTINCT m.sha256 FROM media m
             WHERE m.sha256 IS NOT NULL AND m.sha256 > ${after} AND {}
             ORDER BY m.sha256 LIMIT {BATCH}",
            condition.sql()
        );
        let mut last = String::new();
        loop {
            let mut params = condition.refs();
            params.push(&last);
            let hashes = self.contents(&select, &params).await?;
            let Some(next) = hashes.last().cloned() else {
                return Ok(changed);
            };
            for sha256 in &hashes {
                changed += self.quarantine_content(sha256, only_origin).await?;
            }
            last = next;
        }
    }

    /// Quarantines every unpinned media row with this content (of `only_origin` when given).
    async fn quarantine_content(
        &self,
        sha256: &str,
        only_origin: Option<&str>,
    ) -> Result<u64, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.query_one(crate::LOCK_HASH, &[&sha256]).await?;
        let n = tx
            .execute(
                &format!(
                    "UPDATE media m SET quarantined = TRUE
                     WHERE m.sha256 = $1 AND NOT m.quarantined
                       AND ($2::text IS NULL OR m.origin = $2) AND {NOT_PINNED}"
                ),
                &[&sha256, &only_origin],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// Lifts the quarantine of this media's content: every row with it is served again and the
    /// content may be uploaded again. Returns how many rows changed (`None`: no such media).
    pub async fn unquarantine(&self, origin: &str, media_id: &str) -> Result<Option<u64>, Error> {
        let Some(media) = self.media(origin, media_id).await? else {
            return Ok(None);
        };
        let Some(object) = media.object else {
            let n = self
                .client()
                .await?
                .execute(
                    "UPDATE media SET quarantined = FALSE WHERE origin = $1 AND media_id = $2",
                    &[&origin, &media_id],
                )
                .await?;
            return Ok(Some(n));
        };
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        tx.query_one(crate::LOCK_HASH, &[&object.sha256]).await?;
        let n = tx
            .execute(
                "UPDATE media SET quarantined = FALSE WHERE sha256 = $1 AND quarantined",
                &[&object.sha256],
            )
            .await?;
        tx.execute(
            "DELETE FROM quarantined_content WHERE sha256 = $1",
            &[&object.sha256],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(n))
    }

    /// What the server `origin` stores: its media, and the thumbnails made of them.
    pub async fn server_usage(&self, origin: &str) -> Result<(Tally, Tally), Error> {
        let client = self.client().await?;
        let tally = |row: tokio_postgres::Row| Tally {
            count: count(&row, 0),
            bytes: count(&row, 1),
        };
        let media = client
            .query_one(
                "SELECT COUNT(*), COALESCE(SUM(o.size_bytes), 0)::BIGINT
                 FROM media m JOIN objects o ON o.sha256 = m.sha256 WHERE m.origin = $1",
                &[&origin],
            )
            .await?;
        let thumbs = client
            .query_one(
                "SELECT COUNT(*), COALESCE(SUM(o.size_bytes), 0)::BIGINT
                 FROM thumbnails t JOIN objects o ON o.sha256 = t.sha256 WHERE t.origin = $1",
                &[&origin],
            )
            .await?;
        Ok((tally(media), tally(thumbs)))
    }

    /// Each user of `origin` (or only those of `users`, when given) with what they uploaded.
    pub async fn users_usage(
        &self,
        origin: &str,
        users: Option<&[String]>,
    ) -> Result<BTreeMap<String, UserUsage>, Error> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT m.user_id, m.media_id, COALESCE(o.size_bytes, 0)
                 FROM media m LEFT JOIN objects o ON o.sha256 = m.sha256
                 WHERE m.origin = $1 AND m.user_id <> '' AND ($2::text[] IS NULL OR m.user_id = ANY($2))
                 ORDER BY m.user_id, m.created_ts",
                &[&origin, &users],
            )
            .await?;
        let mut usage: BTreeMap<String, UserUsage> = BTreeMap::new();
        for row in rows {
            let entry = usage.entry(row.get(0)).or_default();
            entry.media.count += 1;
            entry.media.bytes += count(&row, 2);
            entry
                .uploaded
                .push(format!("mxc://{origin}/{}", row.get::<_, String>(1)));
        }
        Ok(usage)
    }

    /// The uploads of `origin` (or only `media_ids`, when given), keyed by mxc URI.
    pub async fn uploads(
        &self,
        origin: &str,
        media_ids: Option<&[String]>,
    ) -> Result<BTreeMap<String, Upload>, Error> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT m.media_id, o.size_bytes, m.user_id, o.datastore_id, o.location, m.sha256,
                        m.quarantined, COALESCE(m.upload_name, ''), m.content_type, m.created_ts
                 FROM media m JOIN objects o ON o.sha256 = m.sha256
                 WHERE m.origin = $1 AND ($2::text[] IS NULL OR m.media_id = ANY($2))
                 ORDER BY m.created_ts",
                &[&origin, &media_ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    format!("mxc://{origin}/{}", r.get::<_, String>(0)),
                    Upload {
                        size_bytes: count(r, 1),
                        uploaded_by: r.get(2),
                        datastore_id: r.get(3),
                        datastore_location: r.get(4),
                        sha256_hash: r.get(5),
                        quarantined: r.get(6),
                        upload_name: r.get(7),
                        content_type: r.get(8),
                        created_ts: r.get(9),
                    },
                )
            })
            .collect())
    }

    /// One page of `origin`'s users by what they uploaded, as Synapse's statistics endpoint
    /// answers; with the total number of users matched.
    pub async fn users_stats(
        &self,
        origin: &str,
        q: &StatsQuery,
    ) -> Result<(Vec<UserStats>, u64), Error> {
        let order = match q.order_by.as_str() {
            "media_length" => "media_length",
            "media_count" => "media_count",
            // The display name is the user id here.
            _ => "m.user_id",
        };
        let dir = if q.backwards { "DESC" } else { "ASC" };
        let like = q.search_term.as_ref().map(|t| {
            format!(
                "%{}%",
                t.replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            )
        });
        let filter = "m.origin = $1 AND m.user_id <> '' AND m.sha256 IS NOT NULL
             AND ($2::bigint IS NULL OR m.created_ts >= $2)
             AND ($3::bigint IS NULL OR m.created_ts <= $3)
             AND ($4::text IS NULL OR m.user_id ILIKE $4)";
        let client = self.client().await?;
        let total: i64 = client
            .query_one(
                &format!("SELECT COUNT(DISTINCT m.user_id) FROM media m WHERE {filter}"),
                &[&origin, &q.from_ts, &q.until_ts, &like],
            )
            .await?
            .get(0);
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let offset = i64::try_from(q.from).unwrap_or(i64::MAX);
        let rows = client
            .query(
                &format!(
                    "SELECT m.user_id, COUNT(*) AS media_count,
                            COALESCE(SUM(o.size_bytes), 0)::BIGINT AS media_length
                     FROM media m JOIN objects o ON o.sha256 = m.sha256
                     WHERE {filter}
                     GROUP BY m.user_id ORDER BY {order} {dir}, m.user_id {dir}
                     LIMIT $5 OFFSET $6"
                ),
                &[&origin, &q.from_ts, &q.until_ts, &like, &limit, &offset],
            )
            .await?;
        let users = rows
            .iter()
            .map(|r| UserStats {
                user_id: r.get(0),
                displayname: r.get(0),
                media_count: count(r, 1),
                media_length: count(r, 2),
            })
            .collect();
        Ok((users, u64::try_from(total).unwrap_or(0)))
    }

    /// What the datastore `id` holds: media and thumbnails with their distinct contents, and
    /// the bytes of its objects.
    pub async fn size_estimate(&self, id: &str) -> Result<SizeEstimate, Error> {
        let client = self.client().await?;
        let refs = |table: &str| {
            format!(
                "SELECT COUNT(*), COUNT(DISTINCT o.sha256), COALESCE(SUM(o.size_bytes), 0)::BIGINT
                 FROM {table} r JOIN objects o ON o.sha256 = r.sha256 WHERE o.datastore_id = $1"
            )
        };
        let media = client.query_one(&refs("media"), &[&id]).await?;
        let thumbs = client.query_one(&refs("thumbnails"), &[&id]).await?;
        let total = client
            .query_one(
                "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0)::BIGINT
                 FROM objects WHERE datastore_id = $1",
                &[&id],
            )
            .await?;
        Ok(SizeEstimate {
            media_affected: count(&media, 0),
            media_hashes_affected: count(&media, 1),
            media_bytes: count(&media, 2),
            thumbnails_affected: count(&thumbs, 0),
            thumbnail_hashes_affected: count(&thumbs, 1),
            thumbnail_bytes: count(&thumbs, 2),
            total_hashes_affected: count(&total, 0),
            total_bytes: count(&total, 1),
        })
    }

    /// Records that these media (`(origin, media_id)`) were served at `ts`.
    pub async fn record_access(&self, media: &[(String, String)], ts: i64) -> Result<u64, Error> {
        let (origins, ids): (Vec<&str>, Vec<&str>) =
            media.iter().map(|(o, m)| (o.as_str(), m.as_str())).unzip();
        Ok(self
            .client()
            .await?
            .execute(
                "UPDATE media m SET last_access_ts = $3
                 FROM unnest($1::text[], $2::text[]) AS a(origin, media_id)
                 WHERE m.origin = a.origin AND m.media_id = a.media_id
                   AND (m.last_access_ts IS NULL OR m.last_access_ts < $3)",
                &[&origins, &ids, &ts],
            )
            .await?)
    }

    /// The purpose of a media (`none` unless set); `None` when there is no such media.
    pub async fn media_purpose(
        &self,
        origin: &str,
        media_id: &str,
    ) -> Result<Option<String>, Error> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT COALESCE(a.purpose, 'none') FROM media m
                 LEFT JOIN media_attributes a ON a.origin = m.origin AND a.media_id = m.media_id
                 WHERE m.origin = $1 AND m.media_id = $2",
                &[&origin, &media_id],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Sets a media's purpose (one of [`PURPOSES`]); returns false when there is no such media.
    pub async fn set_media_purpose(
        &self,
        origin: &str,
        media_id: &str,
        purpose: &str,
    ) -> Result<bool, Error> {
        if !PURPOSES.contains(&purpose) {
            return Err(Error::Config(format!(
                "unknown purpose `{purpose}`: it must be one of {}",
                PURPOSES.join(", ")
            )));
        }
        let n = self
            .client()
            .await?
            .execute(
                "INSERT INTO media_attributes (origin, media_id, purpose)
                 SELECT origin, media_id, $3 FROM media WHERE origin = $1 AND media_id = $2
                 ON CONFLICT (origin, media_id) DO UPDATE SET purpose = EXCLUDED.purpose",
                &[&origin, &media_id, &purpose],
            )
            .await?;
        Ok(n > 0)
    }
}

fn list(report: &mut PurgeReport, origin: String, media_id: String) {
    if report.affected.len() < AFFECTED_LISTED {
        report.affected.push(format!("mxc://{origin}/{media_id}"));
    }
}
