//! Writing an upload's temp file. Large files go to the disk in aligned blocks, straight from our
//! buffer (`O_DIRECT`) where the file system allows it: no copy into the page cache and no
//! writeback afterwards, CPU that a 2-core machine otherwise takes from hashing, and the final
//! fdatasync has only metadata left to do.
//!
//! Blocks come from a small pool shared by all uploads, which bounds their memory whatever the
//! number of uploads. The receiving task fills them ([`Filler`]), the hashing thread hands them to
//! a [`BlockWriter`], and they come back to be filled again. An upload that finds the pool empty,
//! or a file system that refuses direct writes, goes through the page cache, flushed in the
//! background as it accumulates. A file smaller than one block is written in one buffered piece:
//! there is nothing to save.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Mutex, PoisonError};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Large files are written in blocks of this size: a direct write of 1 MiB keeps a disk busy where
/// 256 KiB gets two thirds of its speed.
pub(crate) const BLOCK: usize = 1 << 20;
/// Blocks in the pool, shared by all uploads.
const POOL_BLOCKS: usize = 16;
/// Blocks one upload may hold: one filling, the others waiting for or in a write. When the disk
/// falls behind, those waiting go in one vectored write, which the kernel submits as several
/// requests at once: a virtual disk's latency no longer stalls hashing.
const UPLOAD_BLOCKS: usize = 8;
/// Buffered writes: bytes written between background flushes.
const FLUSH_EVERY: u64 = 16 * 1024 * 1024;

/// An upload's temp file: full blocks from a [`Filler`], written on the appender's thread, or (when
/// the pool had no block) chunks written here through the page cache.
pub(crate) struct BlockWriter {
    /// Where blocks are written: here until the first full block, then on the appender's thread.
    /// Exactly one of the two is set.
    out: Option<Output>,
    appender: Option<Appender>,
    /// Where written blocks go back to; it moves to the appender's thread.
    returns: Option<UnboundedSender<PooledBlock>>,
}

struct Output {
    file: File,
    /// Bytes of the file written so far.
    written: u64,
    mode: Mode,
}

enum Mode {
    /// No block written yet.
    Undecided,
    Direct,
    Buffered {
        flusher: Option<Flusher>,
        unflushed: u64,
    },
}

impl Mode {
    fn buffered() -> Mode {
        Mode::Buffered {
            flusher: None,
            unflushed: 0,
        }
    }
}

fn lost() -> io::Error {
    io::Error::other("the block writer stopped after an earlier error")
}

impl BlockWriter {
    /// A writer of chunks ([`BlockWriter::write`]), through the page cache.
    pub(crate) fn buffered(file: File) -> BlockWriter {
        BlockWriter::with(file, Mode::buffered(), None)
    }

    /// A writer of the blocks a [`Filler`] fills, handed over with [`BlockWriter::append_filled`]
    /// and given back to it through `returns` once written.
    pub(crate) fn for_filled(file: File, returns: UnboundedSender<PooledBlock>) -> BlockWriter {
        BlockWriter::with(file, Mode::Undecided, Some(returns))
    }

    fn with(file: File, mode: Mode, returns: Option<UnboundedSender<PooledBlock>>) -> BlockWriter {
        BlockWriter {
            out: Some(Output {
                file,
                written: 0,
                mode,
            }),
            appender: None,
            returns,
        }
    }

    /// Writes a chunk at the end of the file (before any block).
    pub(crate) fn write(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.as_mut().ok_or_else(lost)?.append(&[data])
    }

    /// Writes a full block from a [`Filler`], on the appender's thread.
    pub(crate) fn append_filled(&mut self, full: PooledBlock) -> io::Result<()> {
        if self.appender.is_none() {
            let out = self.out.take().ok_or_else(lost)?;
            let returns = self.returns.take().ok_or_else(lost)?;
            self.appender = Some(Appender::start(out, returns));
        }
        let appender = self.appender.as_mut().ok_or_else(lost)?;
        if appender.blocks.send(full).is_err() {
            // The thread stopped on an error: report that one.
            let appender = self.appender.take().ok_or_else(lost)?;
            return Err(appender.finish().err().unwrap_or_else(lost));
        }
        Ok(())
    }

    /// Writes `tail` (the last block, not a full one) and makes the whole file durable.
    pub(crate) fn finish(self, tail: Option<Filled>) -> io::Result<()> {
        let mut out = match (self.appender, self.out) {
            (Some(appender), _) => appender.finish()?,
            (None, Some(out)) => out,
            (None, None) => return Err(lost()),
        };
        if matches!(out.mode, Mode::Direct) {
            // The tail is not a whole block.
            set_direct(&out.file, false)?;
        }
        if let Some(tail) = tail {
            out.file.write_all_at(tail.bytes(), out.written)?;
            out.written += tail.len as u64;
        }
        if let Mode::Buffered {
            flusher: Some(f), ..
        } = out.mode
        {
            f.finish()?;
        }
        out.file.sync_data()
    }
}

/// A thread that writes full blocks while the next ones fill (a direct write waits for the disk),
/// then gives them back to be filled again.
struct Appender {
    blocks: SyncSender<PooledBlock>,
    thread: std::thread::JoinHandle<io::Result<Output>>,
}

impl Appender {
    fn start(mut out: Output, returns: UnboundedSender<PooledBlock>) -> Appender {
        // Handing over never waits for room: an upload has no more blocks than this holds.
        let (blocks, to_write) = sync_channel::<PooledBlock>(UPLOAD_BLOCKS);
        let thread = std::thread::spawn(move || {
            while let Ok(first) = to_write.recv() {
                let mut batch = vec![first];
                batch.extend(to_write.try_iter().take(UPLOAD_BLOCKS - 1));
                let parts: Vec<&[u8]> = batch.iter().map(PooledBlock::filled).collect();
                out.append(&parts)?;
                for block in batch {
                    // A filler that has gone lets the block drop, back to the pool.
                    let _ = returns.send(block);
                }
            }
            Ok(out)
        });
        Appender { blocks, thread }
    }

    /// Waits for the blocks handed over; returns the output.
    fn finish(self) -> io::Result<Output> {
        drop(self.blocks);
        self.thread
            .join()
            .map_err(|_| io::Error::other("the block writer thread panicked"))?
    }
}

impl Output {
    /// Writes `parts` at the end of the file: directly (in one vectored write) when they are blocks
    /// and the file system takes them, else through the page cache.
    fn append(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let len = parts.iter().map(|p| p.len() as u64).sum::<u64>();
        if matches!(self.mode, Mode::Undecided) {
            self.mode = match set_direct(&self.file, true) {
                Ok(()) => Mode::Direct,
                Err(e) => {
                    tracing::debug!(error = %e, "direct writes refused; writing through the page cache");
                    Mode::buffered()
                }
            };
        }
        if matches!(self.mode, Mode::Direct) {
            match write_all_vectored_at(&self.file, parts, self.written) {
                Ok(()) => {
                    self.written += len;
                    return Ok(());
                }
                // An alignment this file system does not take: rewrite the block (positioned, so
                // a partial direct write is simply overwritten) and go on buffered.
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                    tracing::debug!(error = %e, "direct write refused; writing through the page cache");
                    set_direct(&self.file, false)?;
                    self.mode = Mode::buffered();
                }
                Err(e) => return Err(e),
            }
        }
        write_all_vectored_at(&self.file, parts, self.written)?;
        self.written += len;
        if let Mode::Buffered { flusher, unflushed } = &mut self.mode {
            *unflushed += len;
            // Flush what is written so far on another thread while writing goes on, so that the
            // final fdatasync has little left to do.
            if *unflushed >= FLUSH_EVERY {
                *unflushed = 0;
                match flusher {
                    Some(f) => f.request(),
                    None => *flusher = Some(Flusher::start(self.file.try_clone()?)),
                }
            }
        }
        Ok(())
    }
}

/// The receiving side of an upload copies what arrives into blocks, so that the thread that hashes
/// them has nothing else to do: each received chunk is copied on the core that received it, while
/// it is in that core's cache, and freed at once. The blocks go round: this filler, the hashing
/// thread, the [`Appender`] writing them, and back; at most [`UPLOAD_BLOCKS`] of them.
pub(crate) struct Filler {
    block: Option<PooledBlock>,
    filled: usize,
    held: usize,
    returned: UnboundedReceiver<PooledBlock>,
    pool: &'static Pool,
}

/// A block from a [`Filler`]: full, or the last of an upload.
pub(crate) struct Filled {
    block: PooledBlock,
    len: usize,
}

impl Filled {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.block.filled()[..self.len]
    }

    /// A full block, or else the upload's last.
    pub(crate) fn into_full(self) -> Result<PooledBlock, Filled> {
        if self.len == BLOCK {
            Ok(self.block)
        } else {
            Err(self)
        }
    }
}

impl Filler {
    /// A filler, with the channel its written blocks come back on; none when the pool is empty.
    pub(crate) fn start() -> Option<(Filler, UnboundedSender<PooledBlock>)> {
        Filler::start_in(&POOL)
    }

    fn start_in(pool: &'static Pool) -> Option<(Filler, UnboundedSender<PooledBlock>)> {
        let block = pool.take()?;
        let (returns, returned) = tokio::sync::mpsc::unbounded_channel();
        let filler = Filler {
            block: Some(block),
            filled: 0,
            held: 1,
            returned,
            pool,
        };
        Some((filler, returns))
    }

    /// Copies from the front of `data` into the block, advancing `data`; returns the block when
    /// it is full. Then [`Filler::next_block`] must be awaited before filling again.
    pub(crate) fn fill(&mut self, data: &mut &[u8]) -> Option<Filled> {
        let block = self.block.as_mut()?;
        let (now, later) = data.split_at((BLOCK - self.filled).min(data.len()));
        crate::streamcopy::copy_streaming(
            &mut block.bytes()[self.filled..self.filled + now.len()],
            now,
        );
        self.filled += now.len();
        *data = later;
        if self.filled < BLOCK {
            return None;
        }
        self.filled = 0;
        self.block.take().map(|block| Filled { block, len: BLOCK })
    }

    /// An empty block to fill: a written one, a new one while this upload holds fewer than
    /// [`UPLOAD_BLOCKS`] and the pool has one, else the next written. False when the writer has
    /// stopped (it reports why).
    pub(crate) async fn next_block(&mut self) -> bool {
        use tokio::sync::mpsc::error::TryRecvError as Nothing;
        let block = match self.returned.try_recv() {
            Ok(block) => Some(block),
            Err(Nothing::Disconnected) => None,
            Err(Nothing::Empty) if self.held < UPLOAD_BLOCKS => match self.pool.take() {
                Some(block) => {
                    self.held += 1;
                    Some(block)
                }
                None => self.returned.recv().await,
            },
            Err(Nothing::Empty) => self.returned.recv().await,
        };
        self.block = block;
        self.block.is_some()
    }

    /// The last block, partly filled (or empty).
    pub(crate) fn tail(self) -> Option<Filled> {
        let len = self.filled;
        self.block.map(|block| Filled { block, len })
    }
}

/// `pwritev` until all of `parts` is written at `offset`.
fn write_all_vectored_at(file: &File, parts: &[&[u8]], offset: u64) -> io::Result<()> {
    let slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
    let mut done = rustix::io::pwritev(file, &slices, offset)?;
    // A short write (a full disk, say): the rest part by part, which reports the error.
    let mut at = 0;
    for part in parts {
        let end = at + part.len();
        if done < end {
            let skip = done.saturating_sub(at);
            file.write_all_at(&part[skip..], offset + (at + skip) as u64)?;
            done = end;
        }
        at = end;
    }
    Ok(())
}

/// Blocks for direct writes, at most `capacity` of them, cut from one mapping made when the first
/// is needed and kept for the life of the process. The mapping asks for transparent huge pages: a
/// direct write then pins a few large pages instead of 256 small ones, which halved both the
/// writer thread's CPU and the time a 100 MiB upload spends writing on the bench machine.
struct Pool {
    capacity: usize,
    state: Mutex<PoolState>,
}

struct PoolState {
    free: Vec<&'static mut [u8]>,
    /// Mapping was tried (the pool stays empty if it failed).
    map_tried: bool,
    /// The fewest blocks ever left free: how many were in use at most.
    fewest_free: usize,
}

static POOL: Pool = Pool::new(POOL_BLOCKS);

impl Pool {
    const fn new(capacity: usize) -> Pool {
        Pool {
            capacity,
            state: Mutex::new(PoolState {
                free: Vec::new(),
                map_tried: false,
                fewest_free: capacity,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A block, unless all of them are in use (or the pool cannot be mapped).
    fn take(&'static self) -> Option<PooledBlock> {
        let mut state = self.state();
        if !state.map_tried {
            state.map_tried = true;
            state.free = self.map()?;
        }
        let block = state.free.pop()?;
        state.fewest_free = state.fewest_free.min(state.free.len());
        Some(PooledBlock {
            block: Some(block),
            pool: self,
        })
    }

    /// The pool's blocks, in one anonymous mapping: page-aligned, and its memory is committed only
    /// as blocks are first used.
    fn map(&self) -> Option<Vec<&'static mut [u8]>> {
        let map = memmap2::MmapMut::map_anon(self.capacity * BLOCK)
            .map_err(|e| tracing::warn!(error = %e, "cannot map the upload blocks; uploads go through the page cache"))
            .ok()?;
        #[cfg(target_os = "linux")]
        if let Err(e) = map.advise(memmap2::Advice::HugePage) {
            tracing::debug!(error = %e, "no transparent huge pages for the upload blocks");
        }
        // Never unmapped: the blocks are reused until the process exits.
        let map: &'static mut memmap2::MmapMut = Box::leak(Box::new(map));
        Some(map.chunks_exact_mut(BLOCK).rev().collect())
    }
}

/// A block of a pool, back to it when dropped.
pub(crate) struct PooledBlock {
    block: Option<&'static mut [u8]>,
    pool: &'static Pool,
}

impl PooledBlock {
    fn bytes(&mut self) -> &mut [u8] {
        self.block.as_deref_mut().unwrap_or_default()
    }

    fn filled(&self) -> &[u8] {
        self.block.as_deref().unwrap_or_default()
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        if let Some(block) = self.block.take() {
            self.pool.state().free.push(block);
        }
    }
}

#[cfg(target_os = "linux")]
fn set_direct(file: &File, on: bool) -> io::Result<()> {
    use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
    let flags = fcntl_getfl(file)?;
    let flags = if on {
        flags | OFlags::DIRECT
    } else {
        flags - OFlags::DIRECT
    };
    Ok(fcntl_setfl(file, flags)?)
}

#[cfg(not(target_os = "linux"))]
fn set_direct(_: &File, on: bool) -> io::Result<()> {
    match on {
        true => Err(io::ErrorKind::Unsupported.into()),
        false => Ok(()),
    }
}

/// A thread that fdatasyncs a file whenever asked, coalescing requests, so that writing and flushing
/// overlap.
struct Flusher {
    wake: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<io::Result<()>>,
}

impl Flusher {
    fn start(file: File) -> Flusher {
        let (wake, wakes) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::spawn(move || {
            while wakes.recv().is_ok() {
                file.sync_data()?;
            }
            Ok(())
        });
        let flusher = Flusher { wake, thread };
        flusher.request();
        flusher
    }

    /// Asks for a flush; one already pending covers this one too.
    fn request(&self) {
        let _ = self.wake.try_send(());
    }

    fn finish(self) -> io::Result<()> {
        drop(self.wake);
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the flusher thread panicked")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct bytes everywhere, so that a block written at the wrong offset shows.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ (i / 4093) as u8)
            .collect()
    }

    /// How a test's writer is set up.
    #[derive(Clone, Copy, Debug)]
    enum Setup {
        /// As uploads get it: a block, direct writes where the file system takes them.
        Pooled,
        /// A block, but direct writes refused.
        Refused,
        /// The pool empty: written through.
        NoBlock,
    }

    /// A pool of the test's own, so that tests running side by side do not share one.
    fn own_pool() -> &'static Pool {
        Box::leak(Box::new(Pool::new(2 * UPLOAD_BLOCKS)))
    }

    /// Writes `len` bytes in pieces of `piece` bytes as the pipeline does; returns what was sent and
    /// what the file holds.
    async fn round_trip(
        pool: &'static Pool,
        len: usize,
        piece: usize,
        setup: Setup,
    ) -> (Vec<u8>, Vec<u8>) {
        let data = pattern(len);
        let temp = tempfile::NamedTempFile::new().unwrap();
        let file = temp.reopen().unwrap();
        let Setup::NoBlock = setup else {
            let (mut filler, returns) = Filler::start_in(pool).expect("the pool has a block");
            let mut out = BlockWriter::for_filled(file, returns);
            if let Setup::Refused = setup {
                out.output().mode = Mode::buffered();
            }
            for mut piece in data.chunks(piece) {
                while !piece.is_empty() {
                    if let Some(full) = filler.fill(&mut piece) {
                        let full = full.into_full().ok().expect("a full block");
                        out.append_filled(full).unwrap();
                        assert!(filler.next_block().await, "a block to fill");
                    }
                }
            }
            out.finish(filler.tail()).unwrap();
            return (data, std::fs::read(temp.path()).unwrap());
        };
        let mut out = BlockWriter::buffered(file);
        for piece in data.chunks(piece) {
            out.write(piece).unwrap();
        }
        out.finish(None).unwrap();
        (data, std::fs::read(temp.path()).unwrap())
    }

    #[tokio::test]
    async fn every_size_around_the_block_comes_back_intact() {
        let pool = own_pool();
        for setup in [Setup::Pooled, Setup::Refused, Setup::NoBlock] {
            for len in [
                0,
                1,
                4095,
                4096,
                BLOCK - 1,
                BLOCK,
                BLOCK + 1,
                3 * BLOCK + 12345,
            ] {
                for piece in [1000, 65536, 3 * BLOCK] {
                    let (sent, got) = round_trip(pool, len, piece, setup).await;
                    let case = format!("{len} bytes in {piece}-byte pieces, {setup:?}");
                    assert_eq!(got.len(), sent.len(), "length of {case}");
                    assert!(got == sent, "content of {case}");
                }
            }
        }
    }

    #[tokio::test]
    async fn buffered_writes_are_flushed_in_the_background_and_come_back_intact() {
        // Past two background flushes.
        let len = 2 * FLUSH_EVERY as usize + BLOCK + 5;
        for setup in [Setup::Refused, Setup::NoBlock] {
            let (sent, got) = round_trip(own_pool(), len, 300_000, setup).await;
            assert!(got == sent, "{setup:?}");
        }
    }

    #[test]
    fn blocks_are_written_directly_where_the_file_system_takes_it() {
        let dir = std::env::temp_dir();
        let probe = tempfile::tempfile_in(&dir).unwrap();
        let supported = set_direct(&probe, true).is_ok();
        let temp = tempfile::NamedTempFile::new_in(&dir).unwrap();
        let mut out = Output {
            file: temp.reopen().unwrap(),
            written: 0,
            mode: Mode::Undecided,
        };
        let mut block = POOL.take().unwrap();
        block.bytes().copy_from_slice(&pattern(BLOCK));
        out.append(&[block.bytes()]).unwrap();
        let direct = matches!(out.mode, Mode::Direct);
        assert_eq!(direct, supported, "direct writes in {}", dir.display());
        assert!(std::fs::read(temp.path()).unwrap() == pattern(BLOCK));
    }

    impl BlockWriter {
        /// The output, before the first block moves it to a thread.
        fn output(&mut self) -> &mut Output {
            self.out
                .as_mut()
                .expect("the output has not moved to a thread yet")
        }
    }

    #[test]
    fn a_pool_bounds_the_blocks_in_use_and_takes_them_back() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(3)));
        let taken: Vec<PooledBlock> = std::iter::from_fn(|| pool.take()).take(4).collect();
        assert_eq!(taken.len(), 3);
        assert!(pool.take().is_none(), "all in use");
        drop(taken);
        let again: Vec<PooledBlock> = std::iter::from_fn(|| pool.take()).take(4).collect();
        assert_eq!(again.len(), 3, "returned blocks are taken again");
        // Direct writes need aligned buffers; the blocks are distinct parts of one mapping.
        let mut starts: Vec<usize> = again.iter().map(|b| b.filled().as_ptr() as usize).collect();
        assert!(
            starts.iter().all(|a| a % 4096 == 0),
            "page-aligned: {starts:x?}"
        );
        starts.sort_unstable();
        assert!(
            starts.windows(2).all(|w| w[1] - w[0] == BLOCK),
            "{starts:x?}"
        );
    }

    #[test]
    fn blocks_written_together_come_back_in_order() {
        let data = pattern(3 * BLOCK);
        let pool: &'static Pool = Box::leak(Box::new(Pool::new(3)));
        for direct in [true, false] {
            let temp = tempfile::NamedTempFile::new().unwrap();
            let mut out = Output {
                file: temp.reopen().unwrap(),
                written: 0,
                mode: if direct {
                    Mode::Undecided
                } else {
                    Mode::buffered()
                },
            };
            let mut blocks: Vec<PooledBlock> = std::iter::from_fn(|| pool.take()).collect();
            for (block, part) in blocks.iter_mut().zip(data.chunks(BLOCK)) {
                block.bytes().copy_from_slice(part);
            }
            // After a first write, at its end.
            out.append(&[blocks[0].filled()]).unwrap();
            out.append(&[blocks[1].filled(), blocks[2].filled()])
                .unwrap();
            assert_eq!(out.written, 3 * BLOCK as u64);
            assert!(
                std::fs::read(temp.path()).unwrap() == data,
                "direct: {direct}"
            );
        }
    }

    #[tokio::test]
    async fn an_upload_holds_a_bounded_number_of_blocks() {
        let pool = own_pool();
        let (sent, got) = round_trip(pool, 40 * BLOCK + 7, 65536, Setup::Pooled).await;
        let state = pool.state();
        let most_in_use = pool.capacity - state.fewest_free;
        assert!(
            (2..=UPLOAD_BLOCKS).contains(&most_in_use),
            "{most_in_use} blocks"
        );
        assert_eq!(state.free.len(), pool.capacity, "all back in the pool");
        assert!(got == sent);
    }

    #[tokio::test]
    async fn a_filler_hands_over_full_blocks_in_order_then_the_tail() {
        let data = pattern(3 * BLOCK + 5);
        let (mut filler, returns) = Filler::start().expect("the pool has a block");
        let mut got = Vec::new();
        for chunk in data.chunks(300_000) {
            let mut chunk = chunk;
            while !chunk.is_empty() {
                if let Some(full) = filler.fill(&mut chunk) {
                    got.extend_from_slice(full.bytes());
                    let block = full.into_full().ok().expect("a full block");
                    // Written: back to the filler.
                    returns.send(block).unwrap();
                    assert!(filler.next_block().await);
                }
            }
        }
        let tail = filler.tail().expect("the last block");
        assert_eq!(tail.bytes().len(), 5);
        got.extend_from_slice(tail.bytes());
        assert!(got == data);
    }

    #[tokio::test]
    async fn a_filler_stops_when_its_writer_has_gone() {
        let (mut filler, returns) = Filler::start().expect("the pool has a block");
        let data = pattern(BLOCK);
        let full = filler.fill(&mut &data[..]).expect("one full block");
        drop((full, returns));
        assert!(!filler.next_block().await, "no block comes back");
    }

    #[tokio::test]
    async fn a_full_block_moves_the_writes_to_a_thread() {
        let temp = tempfile::NamedTempFile::new().unwrap();
        let (mut filler, returns) = Filler::start_in(own_pool()).unwrap();
        let mut out = BlockWriter::for_filled(temp.reopen().unwrap(), returns);
        let data = pattern(BLOCK + 3);
        let mut rest = &data[..];
        let full = filler.fill(&mut rest).expect("one full block");
        out.append_filled(full.into_full().ok().unwrap()).unwrap();
        assert!(out.appender.is_some());
        assert!(filler.next_block().await);
        assert!(filler.fill(&mut rest).is_none());
        out.finish(filler.tail()).unwrap();
        assert!(std::fs::read(temp.path()).unwrap() == data);
    }
}
