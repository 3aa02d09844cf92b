//! What /proc tells about the servers: resident memory (current and peak) and CPU time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Bytes in a MiB.
pub(crate) const MIB: u64 = 1 << 20;

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in bytes.
pub(crate) fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?;
    let kib: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Resident set size now, in bytes.
pub(crate) fn rss(pid: u32) -> Option<u64> {
    status_bytes(pid, "VmRSS")
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS (`clear_refs` value 5, Linux 4.0+).
pub(crate) fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// User plus system CPU time of the process, in seconds (clock ticks at Linux's usual 100 Hz).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its `)` are plain.
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The machine's CPU time so far, busy and in all, in clock ticks (`/proc/stat`'s first line).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// The share of the machine's CPU time that was busy over `window`, in percent.
pub(crate) fn machine_busy(window: Duration) -> Option<f64> {
    let (busy0, total0) = cpu_ticks()?;
    std::thread::sleep(window);
    let (busy1, total1) = cpu_ticks()?;
    let total = total1.saturating_sub(total0);
    (total > 0).then(|| 100.0 * busy1.saturating_sub(busy0) as f64 / total as f64)
}

/// The process whose command line contains `needle` (a path unique to it), when there is one.
pub(crate) fn find_pid(needle: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|b| *b == 0)
                    .any(|arg| arg == needle.as_bytes())
            })
        })
}

/// The direct children of process `parent` (from the parent pid in each `/proc/<pid>/stat`).
pub(crate) fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // The parent pid is the second field after the command name's `)`.
                stat.rfind(')')
                    .and_then(|at| stat[at + 1..].split_whitespace().nth(1)?.parse().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// Samples a process's RSS every 10 ms on a thread, and its `VmHWM` (reset when sampling starts),
/// until [`PeakRss::stop`]; reports the larger of the two.
pub(crate) struct PeakRss {
    pid: u32,
    hwm_reset: bool,
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<u64>,
}

impl PeakRss {
    pub(crate) fn start(pid: u32) -> PeakRss {
        let hwm_reset = reset_peak(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let sampler = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(rss(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak.max(rss(pid).unwrap_or(0))
        });
        PeakRss {
            pid,
            hwm_reset,
            stop,
            sampler,
        }
    }

    /// The peak RSS in bytes since [`PeakRss::start`].
    pub(crate) fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let sampled = self.sampler.join().unwrap_or(0);
        let hwm = if self.hwm_reset {
            status_bytes(self.pid, "VmHWM").unwrap_or(0)
        } else {
            0
        };
        sampled.max(hwm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let rss = rss(me).expect("VmRSS");
        assert!(rss > MIB, "{rss}");
        assert!(status_bytes(me, "VmHWM").expect("VmHWM") >= rss / 2);
        assert!(cpu_seconds(me).is_some());
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert_eq!(children(me), vec![child.id()]);
        child.kill().unwrap();
        child.wait().unwrap();
        let peak = PeakRss::start(me);
        let big = vec![1u8; 64 * MIB as usize];
        std::thread::sleep(Duration::from_millis(50));
        let peak = peak.stop();
        assert!(peak >= 64 * MIB, "{peak}");
        drop(big);
    }
}
