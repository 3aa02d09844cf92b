//! `multipart::read_media` on arbitrary responses, chunked in arbitrary ways: never panics, and
//! the outcome (part 2's headers and bytes, or the error) does not depend on the chunking.
//!
//! Input: byte 0 picks the chunking (low 2 bits: one chunk, one byte each, a fixed size, sizes
//! from a little generator seeded by byte 1); the rest is `<Content-Type>\n<body>`.
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use federation::multipart::{MediaPart, MultipartError, read_media};
use futures_util::StreamExt;
use libfuzzer_sys::fuzz_target;

/// The test streams are always ready, so one poll finishes any future here.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a ready stream made the future wait"),
    }
}

fn read(content_type: &str, chunks: Vec<Bytes>) -> Result<(MediaPart, Vec<u8>), MultipartError> {
    let chunks = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, &'static str>));
    block_on(async {
        let (part, mut body) = read_media(content_type, chunks).await?;
        let mut file = Vec::new();
        while let Some(item) = body.next().await {
            file.extend_from_slice(&item?);
        }
        assert!(
            body.next().await.is_none(),
            "the stream went on after its end"
        );
        Ok((part, file))
    })
}

fn chunk(body: &[u8], mode: u8, seed: u8) -> Vec<Bytes> {
    let body = Bytes::copy_from_slice(body);
    let mut chunks = Vec::new();
    let mut at = 0;
    let mut state = u32::from(seed) | 0x100;
    while at < body.len() {
        let size = match mode & 3 {
            0 => body.len(),
            1 => 1,
            2 => usize::from(mode >> 2) + 1,
            _ => {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 97) as usize
            }
        };
        let end = (at + size).min(body.len());
        chunks.push(body.slice(at..end));
        at = end;
    }
    chunks
}

fuzz_target!(|data: &[u8]| {
    let [mode, seed, rest @ ..] = data else {
        return;
    };
    let (content_type, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(n) => (&rest[..n], &rest[n + 1..]),
        None => (rest, &[][..]),
    };
    let content_type = String::from_utf8_lossy(content_type);
    let chunked = read(&content_type, chunk(body, *mode, *seed));
    let whole = read(&content_type, vec![Bytes::copy_from_slice(body)]);
    assert_eq!(chunked, whole, "the outcome depends on the chunking");
});
