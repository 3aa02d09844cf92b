//! The consistency check of one datastore: objects that no row references (left by an upload or a
//! transfer that stopped half-way, or by something else writing to the bucket) and rows whose object
//! is missing (deleted behind our back).
//!
//! Memory stays bounded whatever the store's size: keys are compared with the rows a page at a
//! time, and rows are checked in batches.

use futures_util::{StreamExt as _, TryStreamExt as _};

use crate::datastore::ListCursor;
use crate::{Error, ObjectRef, Store};

/// Object rows checked per batch.
const BATCH: i64 = 500;
/// Existence checks in flight (S3 `HeadObject`s).
const CHECKS_IN_FLIGHT: usize = 16;

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Objects listed in the store.
    pub listed: u64,
    /// Object rows that name the store.
    pub rows: u64,
    /// Locations in the store that no object row references.
    pub orphans: Vec<String>,
    /// Object rows whose object is not in the store.
    pub missing: Vec<ObjectRef>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.orphans.is_empty() && self.missing.is_empty()
    }
}

impl Store {
    /// Lists datastore `id` and compares it with the object rows. Uploads in flight place their
    /// object a moment before their row commits, so an orphan found on a busy store may be one of
    /// them: check again later before deleting anything.
    pub async fn check_datastore(&self, id: &str) -> Result<CheckReport, Error> {
        let ds = self.datastores.named(id)?;
        let mut report = CheckReport::default();

        let mut cursor = Some(ListCursor::start());
        while let Some(at) = cursor.take() {
            let (locations, next) = ds.list_page(at).await?;
            cursor = next;
            if locations.is_empty() {
                continue;
            }
            report.listed += locations.len() as u64;
            let known: std::collections::HashSet<String> = self
                .client()
                .await?
                .query(
                    "SELECT location FROM objects WHERE datastore_id = $1 AND location = ANY($2)",
                    &[&id, &locations],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            report
                .orphans
                .extend(locations.into_iter().filter(|l| !known.contains(l)));
        }

        let mut after = String::new();
        loop {
            let objects = self.objects_page(id, &after, BATCH).await?;
            let Some(last) = objects.last() else {
                break;
            };
            after.clone_from(&last.sha256);
            report.rows += objects.len() as u64;
            let missing: Vec<ObjectRef> = futures_util::stream::iter(objects)
                .map(|object| async move {
                    let there = ds.exists(&object.location).await?;
                    Ok::<_, Error>((!there).then_some(object))
                })
                .buffered(CHECKS_IN_FLIGHT)
                .try_filter_map(|o| async move { Ok(o) })
                .try_collect()
                .await?;
            report.missing.extend(missing);
        }
        report.orphans.sort();
        Ok(report)
    }
}
