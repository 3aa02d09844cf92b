//! Serving client connections, with the bounds `axum::serve` does not have: a cap on connections,
//! on header bytes, and deadlines for headers, idle keep-alive and blocked writes (the config's
//! `connections` section). A stalled request body is bounded where bodies are read (`media`).
//!
//! Each connection is one task: hyper's HTTP/1 state machine, the router's handlers and the
//! response bodies are all polled there, so the connection's clock ([`Activity`]) is only ever
//! touched from that task; atomics just make it `Sync`.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt as _;

/// The `connections` section, as durations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    pub(crate) header_read: Duration,
    pub(crate) idle: Duration,
    pub(crate) send: Duration,
    pub(crate) max_header_bytes: usize,
}

impl Limits {
    pub(crate) fn from_config(c: &config::Connections) -> Limits {
        let secs = |s: u32| Duration::from_secs(u64::from(s.max(1)));
        Limits {
            max_connections: (c.max_connections.max(1)) as usize,
            header_read: secs(c.header_read_timeout_seconds),
            idle: secs(c.idle_timeout_seconds),
            send: secs(c.send_timeout_seconds),
            max_header_bytes: (c.max_header_bytes as usize).max(1024),
        }
    }
}

/// Accepts and serves connections until `shutdown` fires, then lets each connection finish its
/// request in flight (idle ones close at once) and returns when all have, or `drain` has passed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    // Every connection task holds a receiver; when the last is gone, all have finished.
    let (done_tx, done_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        // At the cap, stop accepting: further clients wait in the kernel's backlog.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (router, stop, done) = (router.clone(), stop_rx.clone(), done_rx.clone());
        tokio::spawn(async move {
            serve_connection(stream, peer, router, limits, stop).await;
            drop((permit, done));
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(done_rx);
    if tokio::time::timeout(drain, done_tx.closed()).await.is_err() {
        tracing::warn!(
            "requests still in flight after {} s: stopping without them",
            drain.as_secs()
        );
    }
}

/// Errors of one connection (the client hung up) are not the listener's; running out of file
/// descriptors is, and accepting again at once would spin.
async fn accept_error(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept connections; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let service_activity = activity.clone();
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let in_flight = InFlight::start(service_activity.clone());
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(ConnectInfo(peer));
        let response = router.clone().oneshot(request);
        async move {
            let response = response.await?;
            // The request stays in flight until its response body is written (or dropped).
            Ok::<_, Infallible>(response.map(|body| Tracked {
                inner: body,
                _in_flight: in_flight,
            }))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.max_header_size(limits.max_header_bytes);
    let connection = builder.serve_connection(io, service);
    tokio::pin!(connection);
    let mut stopping = false;
    loop {
        let (deadline, why) = activity.deadline(&limits);
        tokio::select! {
            // The connection changed phase: its deadline is another.
            () = activity.changed.notified() => {}
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                connection.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep_until(deadline) => {
                if let Some(why) = why && activity.deadline(&limits).0 <= Instant::now() {
                    tracing::debug!(%peer, why, "closing connection");
                    return;
                }
            }
        }
    }
}

/// What a connection did last, in milliseconds since it opened (+1, so that 0 means "not set").
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// When the last request finished (or the connection opened).
    idle_since: AtomicU64,
    /// The first byte of the next request's head, while none is in flight.
    head_started: AtomicU64,
    /// When a write started waiting for the client to take bytes.
    write_blocked: AtomicU64,
    /// Signalled when the phase changes (a head starts, a request starts or ends, a write
    /// blocks), so that the connection's task looks at the new deadline at once.
    changed: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    fn at(&self, ms: u64, plus: Duration) -> Instant {
        self.opened + Duration::from_millis(ms - 1) + plus
    }

    /// When the connection must next be looked at, and why it would be closed then (`None`: only
    /// to look again, a request being busy).
    fn deadline(&self, limits: &Limits) -> (Instant, Option<&'static str>) {
        if self.in_flight.load(Relaxed) == 0 {
            match self.head_started.load(Relaxed) {
                0 => (
                    self.at(self.idle_since.load(Relaxed), limits.idle),
                    Some("idle keep-alive timeout"),
                ),
                t => (
                    self.at(t, limits.header_read),
                    Some("request headers not complete in time"),
                ),
            }
        } else {
            match self.write_blocked.load(Relaxed) {
                // Nothing to time here: a busy request's body has its own timeout, and a blocked
                // write signals `changed`.
                0 => (Instant::now() + limits.idle, None),
                t => (
                    self.at(t, limits.send),
                    Some("the client stopped reading the response"),
                ),
            }
        }
    }

    fn read(&self) {
        if self.in_flight.load(Relaxed) == 0 && self.head_started.load(Relaxed) == 0 {
            self.head_started.store(self.now(), Relaxed);
            self.changed.notify_one();
        }
    }

    fn wrote<T>(&self, poll: &Poll<T>) {
        if poll.is_pending() {
            if self.write_blocked.load(Relaxed) == 0 {
                self.write_blocked.store(self.now(), Relaxed);
                self.changed.notify_one();
            }
        } else {
            self.write_blocked.store(0, Relaxed);
        }
    }
}

/// One request, from its parsed head until its response body is done.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Relaxed);
        activity.head_started.store(0, Relaxed);
        activity.changed.notify_one();
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Relaxed) == 1 {
            self.0.idle_since.store(self.0.now(), Relaxed);
            self.0.changed.notify_one();
        }
    }
}

/// A response body that keeps its request in flight.
struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting reads and blocked writes in the connection's [`Activity`].
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.activity.wrote(&poll);
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.activity.wrote(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.activity.wrote(&poll);
        poll
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 1,
            header_read: Duration::from_secs(30),
            idle: Duration::from_secs(120),
            send: Duration::from_secs(60),
            max_header_bytes: 16384,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_phase_of_a_connection_has_its_own_deadline() {
        let a = Arc::new(Activity::new());
        let opened = a.opened;
        let (deadline, why) = a.deadline(&limits());
        assert_eq!(
            (deadline, why),
            (
                opened + Duration::from_secs(120),
                Some("idle keep-alive timeout")
            )
        );

        tokio::time::advance(Duration::from_secs(5)).await;
        a.read();
        let (deadline, why) = a.deadline(&limits());
        assert_eq!(deadline, opened + Duration::from_secs(35));
        assert_eq!(why, Some("request headers not complete in time"));

        let request = InFlight::start(a.clone());
        // Reading a body does not start a new head.
        a.read();
        assert_eq!(a.head_started.load(Relaxed), 0);
        assert_eq!(
            a.deadline(&limits()).1,
            None,
            "a busy request is not timed here"
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        a.wrote(&Poll::<()>::Pending);
        tokio::time::advance(Duration::from_secs(1)).await;
        a.wrote(&Poll::<()>::Pending);
        let (deadline, why) = a.deadline(&limits());
        assert_eq!(
            deadline,
            opened + Duration::from_secs(66),
            "from the first blocked write"
        );
        assert_eq!(why, Some("the client stopped reading the response"));
        a.wrote(&Poll::Ready(()));
        assert_eq!(a.deadline(&limits()).1, None);

        tokio::time::advance(Duration::from_secs(3)).await;
        drop(request);
        let (deadline, why) = a.deadline(&limits());
        assert_eq!(deadline, opened + Duration::from_secs(10 + 120));
        assert_eq!(why, Some("idle keep-alive timeout"));
    }
}
