//! Video (MP4/QuickTime, WebM/Matroska): the first frame, through the `ffmpeg` and `ffprobe` on
//! PATH when there are (else the format is unsupported), as a PNG that the still pipeline then
//! thumbnails under the same limits. ffprobe reads the frame size first, so `max_pixels` holds
//! before anything is decoded (a pixel bomb renamed `.mp4` costs ffmpeg hundreds of MB otherwise).
//! Both read a temp file (mode 0600) through argv only, the `file` protocol only, each in its own
//! process group, killed at [`DEADLINE`]; ffmpeg's output is bounded.

use std::io::Read as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{Error, Format};

/// One tool's run, at most this long.
const DEADLINE: Duration = Duration::from_secs(20);

/// ffmpeg and ffprobe are both on PATH (looked up once).
fn available() -> bool {
    static FOUND: OnceLock<bool> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let on_path = |name: &str| {
            std::env::var_os("PATH").is_some_and(|path| {
                std::env::split_paths(&path).any(|dir| {
                    use std::os::unix::fs::PermissionsExt as _;
                    dir.join(name)
                        .metadata()
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
            })
        };
        on_path("ffmpeg") && on_path("ffprobe")
    })
}

/// Runs `cmd`, its stdout read up to `max` bytes, killed (its whole process group) at the
/// deadline.
fn run(mut cmd: Command, max: u64) -> Result<Vec<u8>, Error> {
    use std::os::unix::process::CommandExt as _;
    let name = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Unavailable(format!("cannot run {name}: {e}")))?;
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::Unavailable(format!("{name} has no output")));
    };
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = stdout.take(max + 1).read_to_end(&mut out);
        read.map(|_| out)
    });
    // All of stderr is read (a full pipe would stop the tool), its start kept for the error.
    let errors = std::thread::spawn(move || {
        let mut head = Vec::new();
        let _ = (&mut stderr).take(4096).read_to_end(&mut head);
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&head).into_owned()
    });
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => break None,
        }
    };
    let Some(status) = status else {
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
        let _ = child.wait();
        return Err(Error::Unavailable(format!(
            "{name} did not finish within {} s",
            DEADLINE.as_secs()
        )));
    };
    let out = reader
        .join()
        .map_err(|_| Error::Unavailable(format!("reading {name}'s output failed")))?
        .map_err(|e| Error::Unavailable(format!("reading {name}'s output: {e}")))?;
    let errors = errors.join().unwrap_or_default();
    if !status.success() {
        let why = errors.lines().next().unwrap_or("no message");
        return Err(Error::Corrupt(format!("{name} failed ({status}): {why}")));
    }
    if out.len() as u64 > max {
        return Err(Error::Corrupt(format!(
            "{name}'s output is over {max} bytes"
        )));
    }
    Ok(out)
}

/// The coded size of the first video stream.
fn size(path: &Path, demuxer: &str) -> Result<(u32, u32), Error> {
    let mut cmd = Command::new("ffprobe");
    cmd.args(["-v", "error", "-protocol_whitelist", "file", "-f", demuxer])
        .args(["-select_streams", "v:0"])
        .args(["-show_entries", "stream=width,height", "-of", "csv=p=0:s=x"])
        .arg(path);
    let out = run(cmd, 4096)?;
    let text = String::from_utf8_lossy(&out);
    let parsed = text
        .trim()
        .split_once('x')
        .and_then(|(w, h)| Some((w.trim().parse::<u32>().ok()?, h.trim().parse::<u32>().ok()?)));
    match parsed {
        Some((w, h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => Err(Error::Corrupt(
            "the file has no video stream ffprobe can read".into(),
        )),
    }
}

/// The first frame as a PNG (rotated as the video says it is shown).
pub(crate) fn first_frame(data: &[u8], format: Format, max_pixels: u64) -> Result<Vec<u8>, Error> {
    if !available() {
        return Err(Error::Unsupported);
    }
    // The demuxer of the sniffed container, never ffmpeg's own guess (which would accept, say, a
    // playlist naming other files).
    let demuxer = match format {
        Format::Webm => "matroska",
        _ => "mov",
    };
    let io = |e: std::io::Error| Error::Unavailable(format!("a temp file for ffmpeg: {e}"));
    let mut file = tempfile::Builder::new()
        .prefix("mmrctl-video-")
        .tempfile()
        .map_err(io)?;
    std::io::Write::write_all(&mut file, data).map_err(io)?;
    let (w, h) = size(file.path(), demuxer)?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels > max_pixels {
        return Err(Error::TooManyPixels {
            pixels,
            max: max_pixels,
        });
    }
    let mut cmd = Command::new("ffmpeg");
    cmd.args(["-nostdin", "-v", "error", "-protocol_whitelist", "file"])
        .args(["-f", demuxer, "-i"])
        .arg(file.path())
        .args([
            "-map",
            "0:v:0",
            "-frames:v",
            "1",
            "-f",
            "image2pipe",
            "-c:v",
            "png",
            "-",
        ]);
    // 16-bit RGBA at most, and the container's share.
    run(cmd, pixels * 8 + (1 << 20))
}
