//! The machine's limits for an upload: hashing (every byte is hashed, on one core) and writing to the
//! datastore's disk until durable (an upload is acknowledged only after its fsync). Each is the best
//! of [`RUNS`] runs, as a limit should be: a shared or virtual machine's disk varies from one second
//! to the next.

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use sha2::{Digest as _, Sha256};

use crate::procfs::MIB;
use crate::{mb_per_s, pattern};

/// Runs of each measure.
pub(crate) const RUNS: usize = 3;

/// SHA-256 over `total` bytes fed in 1 MiB chunks, on this thread: MB/s, the best of [`RUNS`].
pub(crate) fn sha256(total: u64) -> f64 {
    (0..RUNS).map(|_| sha256_once(total)).fold(0.0, f64::max)
}

fn sha256_once(total: u64) -> f64 {
    let block = pattern(MIB as usize, 1);
    let mut hasher = Sha256::new();
    let start = Instant::now();
    for _ in 0..total / MIB {
        hasher.update(&block);
    }
    std::hint::black_box(hasher.finalize());
    mb_per_s(total, start.elapsed())
}

/// Writes `total` bytes in 1 MiB chunks to a new file in `dir`, then fsyncs it: MB/s over the whole
/// (writes plus fsync), the best of [`RUNS`]. The files are removed afterwards.
pub(crate) fn write_fsync(dir: &Path, total: u64) -> Result<f64> {
    let mut best = 0.0;
    for _ in 0..RUNS {
        let rate = write_fsync_once(dir, total)?;
        progress!("write + fsync run: {rate:.0} MB/s");
        best = f64::max(best, rate);
    }
    Ok(best)
}

fn write_fsync_once(dir: &Path, total: u64) -> Result<f64> {
    let block = pattern(MIB as usize, 2);
    let file = tempfile::Builder::new()
        .prefix("bench-fsync-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let mut out = file.as_file();
    let start = Instant::now();
    for _ in 0..total / MIB {
        out.write_all(&block)?;
    }
    out.sync_all()?;
    let elapsed = start.elapsed();
    file.close()?;
    Ok(mb_per_s(total, elapsed))
}
