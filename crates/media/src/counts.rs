//! Running totals by label values, for the metrics the server exports (what was generated,
//! fetched or previewed, and how). Bounded: past [`MAX_KEYS`] distinct label sets, new ones are
//! counted under `other`, however many remote servers appear.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

const MAX_KEYS: usize = 1024;

#[derive(Debug, Default)]
pub struct Counts {
    totals: Mutex<HashMap<Vec<String>, u64>>,
}

impl Counts {
    pub(crate) fn add(&self, labels: &[&str]) {
        let mut totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        let key: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        if let Some(n) = totals.get_mut(&key) {
            *n += 1;
        } else if totals.len() < MAX_KEYS {
            totals.insert(key, 1);
        } else {
            *totals
                .entry(vec!["other".to_owned(); labels.len()])
                .or_default() += 1;
        }
    }

    /// Every label set with its total so far.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        let totals = self.totals.lock().unwrap_or_else(PoisonError::into_inner);
        totals.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_past_the_bound_count_as_other() {
        let c = Counts::default();
        for i in 0..MAX_KEYS + 10 {
            c.add(&[&format!("server{i}.example")]);
        }
        c.add(&["server0.example"]);
        let snap = c.snapshot();
        assert_eq!(snap.len(), MAX_KEYS + 1);
        let get = |k: &str| snap.iter().find(|(l, _)| l[0] == k).map(|(_, n)| *n);
        assert_eq!(get("server0.example"), Some(2));
        assert_eq!(get("other"), Some(10));
    }
}
