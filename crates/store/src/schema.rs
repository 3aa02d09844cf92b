//! The schema, as numbered migrations compiled into the binary. They run at start-up under an
//! advisory lock, so any number of instances may start at once.

use tokio_postgres::Client;

use crate::Error;

/// Any fixed number: the lock every instance takes while migrating.
const MIGRATION_LOCK: i64 = 0x6d6d_7263_746c; // "mmrctl"

/// Append only: a released migration never changes.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
    -- Content: one row per SHA-256, in exactly one datastore at a location derived from the hash.
    CREATE TABLE objects (
        sha256       TEXT PRIMARY KEY,
        size_bytes   BIGINT NOT NULL,
        datastore_id TEXT NOT NULL,
        location     TEXT NOT NULL,
        created_ts   BIGINT NOT NULL
    );
    CREATE INDEX objects_datastore ON objects (datastore_id);

    -- Media: what an mxc:// URI names. `sha256` is NULL while an MSC2246 upload is pending.
    CREATE TABLE media (
        origin        TEXT NOT NULL,
        media_id      TEXT NOT NULL,
        kind          TEXT NOT NULL,
        sha256        TEXT REFERENCES objects (sha256),
        content_type  TEXT NOT NULL DEFAULT 'application/octet-stream',
        upload_name   TEXT,
        user_id       TEXT NOT NULL DEFAULT '',
        created_ts    BIGINT NOT NULL,
        quarantined   BOOLEAN NOT NULL DEFAULT FALSE,
        -- Uploaded after unauthenticated media was frozen: served only on authenticated endpoints.
        requires_auth BOOLEAN NOT NULL DEFAULT FALSE,
        -- Pending uploads only: when the reserved id expires.
        expires_ts    BIGINT,
        PRIMARY KEY (origin, media_id)
    );
    CREATE INDEX media_sha256 ON media (sha256);
    CREATE INDEX media_user ON media (user_id) WHERE user_id <> '';
    CREATE INDEX media_pending ON media (user_id, expires_ts) WHERE sha256 IS NULL;

    -- Thumbnails point at objects too; they never create media rows of their own.
    CREATE TABLE thumbnails (
        origin       TEXT NOT NULL,
        media_id     TEXT NOT NULL,
        width        INTEGER NOT NULL,
        height       INTEGER NOT NULL,
        method       TEXT NOT NULL,
        animated     BOOLEAN NOT NULL,
        content_type TEXT NOT NULL,
        sha256       TEXT NOT NULL REFERENCES objects (sha256),
        created_ts   BIGINT NOT NULL,
        PRIMARY KEY (origin, media_id, width, height, method, animated)
    );
    CREATE INDEX thumbnails_sha256 ON thumbnails (sha256);
    "#,
    ),
    (
        2,
        r#"
    -- URL previews per (origin, URL, time bucket, language): the preview's JSON, or why it
    -- failed until `expires_ts`.
    CREATE TABLE url_previews (
        origin      TEXT NOT NULL,
        url         TEXT NOT NULL,
        bucket_ts   BIGINT NOT NULL,
        language    TEXT NOT NULL,
        preview     TEXT,
        error_kind  TEXT,
        error       TEXT,
        expires_ts  BIGINT,
        created_ts  BIGINT NOT NULL,
        PRIMARY KEY (origin, url, bucket_ts, language)
    );
    CREATE INDEX url_previews_created ON url_previews (created_ts);

    -- The media row each origin's previews use for an image's content.
    CREATE TABLE preview_images (
        origin   TEXT NOT NULL,
        sha256   TEXT NOT NULL,
        media_id TEXT NOT NULL,
        PRIMARY KEY (origin, sha256),
        FOREIGN KEY (origin, media_id) REFERENCES media (origin, media_id) ON DELETE CASCADE
    );
    "#,
    ),
    (
        3,
        r#"
    -- Content whose quarantine outlives its media rows (they were purged): never stored again
    -- until unquarantined.
    CREATE TABLE quarantined_content (
        sha256         TEXT PRIMARY KEY,
        quarantined_ts BIGINT NOT NULL
    );

    -- matrix-media-repo's media attributes: `pinned` media is never purged or quarantined.
    CREATE TABLE media_attributes (
        origin   TEXT NOT NULL,
        media_id TEXT NOT NULL,
        purpose  TEXT NOT NULL,
        PRIMARY KEY (origin, media_id),
        FOREIGN KEY (origin, media_id) REFERENCES media (origin, media_id) ON DELETE CASCADE
    );

    -- Background tasks in matrix-media-repo's shape: `end_ts` 0 while unfinished (a restarted
    -- server resumes them), `error` empty unless the task failed; `progress` what it did so far.
    CREATE TABLE background_tasks (
        id       BIGSERIAL PRIMARY KEY,
        task     TEXT NOT NULL,
        params   JSONB NOT NULL,
        start_ts BIGINT NOT NULL,
        end_ts   BIGINT NOT NULL DEFAULT 0,
        error    TEXT NOT NULL DEFAULT '',
        progress JSONB NOT NULL DEFAULT '{}'
    );
    CREATE INDEX background_tasks_unfinished ON background_tasks (id) WHERE end_ts = 0;
    CREATE INDEX media_origin_created ON media (origin, created_ts);
    -- When the media was last served (recorded a minute late at most); NULL: not since stored.
    ALTER TABLE media ADD COLUMN last_access_ts BIGINT;

    -- GDPR exports (matrix-media-repo's shape): the parts are objects in an `archives`
    -- datastore, `export_id` is the secret that fetches them.
    CREATE TABLE exports (
        export_id  TEXT PRIMARY KEY,
        entity     TEXT NOT NULL,
        created_ts BIGINT NOT NULL
    );
    CREATE TABLE export_parts (
        export_id  TEXT NOT NULL REFERENCES exports (export_id) ON DELETE CASCADE,
        part_index INTEGER NOT NULL,
        file_name  TEXT NOT NULL,
        sha256     TEXT NOT NULL REFERENCES objects (sha256),
        PRIMARY KEY (export_id, part_index)
    );
    CREATE INDEX export_parts_sha256 ON export_parts (sha256);

    -- Archives being imported through the admin API: the parts received so far, kept as
    -- objects until the import has finished.
    CREATE TABLE imports (
        import_id  TEXT PRIMARY KEY,
        created_ts BIGINT NOT NULL,
        closed     BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE TABLE import_parts (
        import_id  TEXT NOT NULL REFERENCES imports (import_id) ON DELETE CASCADE,
        part_index INTEGER NOT NULL,
        sha256     TEXT NOT NULL REFERENCES objects (sha256),
        PRIMARY KEY (import_id, part_index)
    );
    CREATE INDEX import_parts_sha256 ON import_parts (sha256);

    -- Files whose object row is gone (a purge, a transfer's source), recorded in the same
    -- transaction; the row goes once the file did. A crash in between leaves the row, and the
    -- deletion is finished later: never a file that nothing remembers.
    CREATE TABLE pending_deletions (
        datastore_id TEXT NOT NULL,
        location     TEXT NOT NULL,
        sha256       TEXT NOT NULL,
        PRIMARY KEY (datastore_id, location)
    );
    "#,
    ),
    (
        4,
        r#"
    -- What instances share without Redis (see shared.rs). UNLOGGED: a database crash empties
    -- them, which only forgets a bucket or a failure.
    CREATE UNLOGGED TABLE shared_buckets (
        key      TEXT PRIMARY KEY,
        -- When the bucket is empty again (ms since the epoch).
        empty_at DOUBLE PRECISION NOT NULL
    );
    -- A file being placed for an upload, recorded first with the database session of the
    -- process placing it: once that session is gone (the process died) and no object row
    -- references the file, it is deleted. UNLOGGED: no WAL flush per upload; a database crash
    -- (which also ends every placing session) forgets them.
    CREATE UNLOGGED TABLE placements (
        datastore_id  TEXT NOT NULL,
        location      TEXT NOT NULL,
        sha256        TEXT NOT NULL,
        owner_pid     INT NOT NULL,
        owner_started TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (datastore_id, location)
    );
    CREATE UNLOGGED TABLE shared_notes (
        key      TEXT PRIMARY KEY,
        value    TEXT NOT NULL,
        until_ts BIGINT NOT NULL
    );
    "#,
    ),
];

/// Brings the schema up to date.
pub(crate) async fn migrate(client: &mut Client) -> Result<(), Error> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let result = apply(client).await;
    // Released even when a migration failed; the session ending would release it too.
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await?;
    result
}

async fn apply(client: &mut Client) -> Result<(), Error> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS mmrctl_migrations (version INTEGER PRIMARY KEY, applied_ts BIGINT NOT NULL)",
        )
        .await?;
    let current: i32 = client
        .query_one(
            "SELECT COALESCE(MAX(version), 0) FROM mmrctl_migrations",
            &[],
        )
        .await?
        .get(0);
    let newest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    if current > newest {
        return Err(Error::SchemaTooNew {
            found: current,
            known: newest,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO mmrctl_migrations (version, applied_ts) VALUES ($1, $2)",
            &[version, &crate::now_ms()],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}
