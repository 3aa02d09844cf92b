//! Background tasks as rows (matrix-media-repo's `background_tasks` shape), so that every instance
//! sees them and a task outlives the instance that started it.

use crate::{Error, Store, now_ms};

/// One background task.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub id: i64,
    pub name: String,
    /// The task's parameters, as JSON.
    pub params: String,
    pub start_ts: i64,
    /// 0 while unfinished.
    pub end_ts: i64,
    /// Empty unless the task failed.
    pub error: String,
    /// What it did so far (or in all, once finished), as JSON.
    pub progress: String,
}

const COLUMNS: &str = "id, task, params::text, start_ts, end_ts, error, progress::text";

fn task_from_row(r: &tokio_postgres::Row) -> TaskRow {
    TaskRow {
        id: r.get(0),
        name: r.get(1),
        params: r.get(2),
        start_ts: r.get(3),
        end_ts: r.get(4),
        error: r.get(5),
        progress: r.get(6),
    }
}

impl Store {
    /// Records a new unfinished task; returns its id.
    pub async fn create_task(&self, name: &str, params_json: &str) -> Result<i64, Error> {
        Ok(self
            .client()
            .await?
            .query_one(
                "INSERT INTO background_tasks (task, params, start_ts)
                 VALUES ($1, $2::text::jsonb, $3) RETURNING id",
                &[&name, &params_json, &now_ms()],
            )
            .await?
            .get(0))
    }

    pub async fn task(&self, id: i64) -> Result<Option<TaskRow>, Error> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {COLUMNS} FROM background_tasks WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(task_from_row))
    }

    /// Every task, or the unfinished ones, oldest first.
    pub async fn tasks(&self, unfinished_only: bool) -> Result<Vec<TaskRow>, Error> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM background_tasks WHERE NOT $1 OR end_ts = 0 ORDER BY id"
                ),
                &[&unfinished_only],
            )
            .await?;
        Ok(rows.iter().map(task_from_row).collect())
    }

    /// Records what an unfinished task did so far.
    pub async fn set_task_progress(&self, id: i64, progress_json: &str) -> Result<(), Error> {
        self.client()
            .await?
            .execute(
                "UPDATE background_tasks SET progress = $2::text::jsonb WHERE id = $1 AND end_ts = 0",
                &[&id, &progress_json],
            )
            .await?;
        Ok(())
    }

    /// Marks a task finished, failed when `error` is not empty.
    pub async fn finish_task(
        &self,
        id: i64,
        progress_json: &str,
        error: &str,
    ) -> Result<(), Error> {
        self.client()
            .await?
            .execute(
                "UPDATE background_tasks SET progress = $2::text::jsonb, error = $3, end_ts = $4
                 WHERE id = $1 AND end_ts = 0",
                &[&id, &progress_json, &error, &now_ms().max(1)],
            )
            .await?;
        Ok(())
    }
}
