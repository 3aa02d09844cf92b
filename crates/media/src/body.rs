//! Bodies as the store's pipeline takes them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _};

/// The stream's pieces, failing when it yields nothing for `timeout` (and then setting `stalled`):
/// a client that stalls mid-upload fails like any interrupted upload, and leaves nothing behind.
pub(crate) fn with_idle_timeout<S, E>(
    stream: S,
    timeout: Duration,
    stalled: Arc<AtomicBool>,
) -> impl Stream<Item = Result<Bytes, String>> + Send
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    let stream = Box::pin(stream);
    futures_util::stream::unfold(Some(stream), move |stream| {
        let stalled = stalled.clone();
        async move {
            let mut stream = stream?;
            match tokio::time::timeout(timeout, stream.next()).await {
                Ok(Some(piece)) => Some((piece.map_err(|e| e.to_string()), Some(stream))),
                Ok(None) => None,
                Err(_) => {
                    stalled.store(true, Ordering::Relaxed);
                    Some((
                        Err(format!("no data received for {} s", timeout.as_secs())),
                        None,
                    ))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_pauses_too_long_fails_once_and_ends() {
        let pieces = futures_util::stream::iter([Ok::<_, String>(Bytes::from_static(b"ab"))])
            .chain(futures_util::stream::pending());
        let stalled = Arc::new(AtomicBool::new(false));
        let mut s = Box::pin(with_idle_timeout(
            pieces,
            Duration::from_secs(5),
            stalled.clone(),
        ));
        assert_eq!(s.next().await, Some(Ok(Bytes::from_static(b"ab"))));
        assert!(!stalled.load(Ordering::Relaxed));
        assert_eq!(
            s.next().await,
            Some(Err("no data received for 5 s".to_owned()))
        );
        assert!(stalled.load(Ordering::Relaxed));
        assert_eq!(s.next().await, None);
    }

    #[tokio::test]
    async fn errors_and_the_end_pass_through() {
        let pieces =
            futures_util::stream::iter([Ok(Bytes::from_static(b"a")), Err("reset".to_owned())]);
        let stalled = Arc::new(AtomicBool::new(false));
        let got: Vec<_> = with_idle_timeout(pieces, Duration::from_secs(5), stalled.clone())
            .collect()
            .await;
        assert!(!stalled.load(Ordering::Relaxed));
        assert_eq!(got, [Ok(Bytes::from_static(b"a")), Err("reset".to_owned())]);
    }
}
