//! One run per key, however many ask at once: the first caller starts it as a task of its own
//! (so that it finishes for the others, and for the store, when that caller goes away), later
//! callers join it, and the key is free again once it ended. Remote fetches and URL previews
//! share this.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};

/// A run every caller awaits.
pub(crate) type Run<V> = Shared<BoxFuture<'static, V>>;

/// The runs going on, by key.
pub(crate) struct Inflight<K, V: Clone> {
    runs: Arc<Mutex<HashMap<K, Run<V>>>>,
}

/// Frees a run's key when dropped; it waits for the lock, so never before the run was inserted.
struct Leave<K: Eq + Hash, V: Clone> {
    runs: Arc<Mutex<HashMap<K, Run<V>>>>,
    key: K,
}

impl<K: Eq + Hash, V: Clone> Drop for Leave<K, V> {
    fn drop(&mut self) {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// What [`Inflight::join_or_start`] found.
pub(crate) enum Joined<V: Clone> {
    /// This caller started the run.
    Started(Run<V>),
    /// It was running already.
    Running(Run<V>),
    /// `max` runs are going on: none was started.
    Full,
}

impl<K, V> Inflight<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub(crate) fn new() -> Self {
        Inflight {
            runs: Arc::default(),
        }
    }

    /// Joins the run of `key`, or (while fewer than `max` go on) spawns `start()`; `stopped` is
    /// the outcome of a run whose task panicked or was cancelled.
    pub(crate) fn join_or_start(
        &self,
        key: K,
        max: usize,
        start: impl FnOnce() -> BoxFuture<'static, V>,
        stopped: impl FnOnce(String) -> V + Send + 'static,
    ) -> Joined<V> {
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = runs.get(&key) {
            return Joined::Running(running.clone());
        }
        if runs.len() >= max {
            return Joined::Full;
        }
        let leave = Leave {
            runs: self.runs.clone(),
            key: key.clone(),
        };
        let run = start();
        let task = tokio::spawn(async move {
            // The key is freed when the run ends, however it ends (a panic too).
            let _leave = leave;
            run.await
        });
        let run = async move { task.await.unwrap_or_else(|e| stopped(e.to_string())) }
            .boxed()
            .shared();
        runs.insert(key, run.clone());
        Joined::Started(run)
    }
}
