//! One HTTP connection: hyper over the socket, plus what hyper does not do the way a service
//! must.
//!
//! - **Answers after a read-side EOF.** A client may send its request and then close its
//!   sending side (`shutdown(SHUT_WR)`, as `nc -N` does) while it waits for the answer.
//!   hyper (without `half_close`) takes that EOF for a client that left and drops the
//!   request; with `half_close` it stops reading, so it could not tell a client that left.
//!   Here the EOF is held back from hyper while a request is in flight, and the client is
//!   asked whether it is still there: if no byte of the answer has gone out after
//!   [`PROBE_DELAY`] (a job is running), an interim `HTTP/1.1 102 Processing` is sent (HTTP
//!   allows any number of 1xx answers before the final one; never to HTTP/1.0 clients). A
//!   client that only half-closed reads past it; one that closed its socket answers it with
//!   a reset, and its request is then dropped (the queued job withdrawn, the running one
//!   cancelled, the request counted 499), as for a client whose close hyper sees.
//! - **Every refusal in the OpenAI error shape, counted.** hyper answers a head it cannot
//!   parse (400), a target it cannot hold (414) and a head too large (431) itself, with an
//!   empty body, before any route sees the request. Its answer is replaced here by the same
//!   status with the JSON error body and the headers every answer carries, and counted in
//!   the metrics under the route `unparsed`. A head that does not arrive within the header
//!   timeout is answered 408 likewise (a connection that sent nothing is just closed).
//! - Write timeouts (a client that never reads its answer loses its connection), the
//!   connection count, and the graceful stop.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::api::ApiError;
use crate::metrics::Metrics;

/// How long an answer may take, after its client closed its sending side, before the
/// client is asked (an interim 102) whether it is still there.
pub(crate) const PROBE_DELAY: Duration = Duration::from_millis(250);

/// How often a half-closed client's socket is checked for the reset that says it left.
const PROBE_TICK: Duration = Duration::from_millis(100);

/// How long a connection with nothing in flight gets after the stop signal to finish writing
/// its last answer before it is dropped.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// The route label of requests refused before routing (see the module documentation).
pub(crate) const UNPARSED: &str = "unparsed";

/// The socket of one connection, shared by hyper (through [`Io`]) and the connection's own
/// task (the probe, the replaced refusals).
struct Wire {
    stream: TcpStream,
    state: Mutex<WireState>,
    /// Told when a request enters or leaves, or the client's EOF is held back.
    changed: Notify,
    metrics: Arc<Metrics>,
}

struct WireState {
    /// Requests handed to the routes whose answer has not been handed back in full.
    in_flight: usize,
    /// The request in flight speaks HTTP/1.1 (so an interim 1xx may be sent to it).
    http11: bool,
    /// A byte of the answer to the request in flight has been written.
    answer_started: bool,
    /// No request in flight, and hyper has flushed since the last one ended: whatever hyper
    /// writes now is its own answer to a head it refused.
    idle: bool,
    /// When the first byte of a head arrived while nothing was in flight.
    head_started: Option<Instant>,
    /// The client's EOF, held back from hyper while a request is in flight.
    eof_held: bool,
    /// hyper's read, to wake once the EOF may be passed on.
    read_waker: Option<Waker>,
    /// Bytes of ours to go out before anything hyper writes next, and how many went.
    pending: Vec<u8>,
    pending_sent: usize,
    /// hyper's own refusal, gathered until its head ends.
    refusal: Vec<u8>,
    /// Its replacement is queued: hyper's further bytes go nowhere.
    swallow: bool,
}

impl Wire {
    fn lock(&self) -> MutexGuard<'_, WireState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes what is pending, as far as the socket takes it.
    fn poll_pending(&self, st: &mut WireState, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while st.pending_sent < st.pending.len() {
            ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(&st.pending[st.pending_sent..]) {
                Ok(n) => st.pending_sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        st.pending.clear();
        st.pending_sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Queues `bytes` before hyper's next write and sends what the socket takes now.
    fn push(&self, st: &mut WireState, bytes: &[u8]) {
        st.pending.extend_from_slice(bytes);
        while st.pending_sent < st.pending.len() {
            match self.stream.try_write(&st.pending[st.pending_sent..]) {
                Ok(n) => st.pending_sent += n,
                // The rest goes with hyper's next write, or in `finish`.
                Err(_) => return,
            }
        }
        st.pending.clear();
        st.pending_sent = 0;
    }

    /// Counts a request that never reached the routes.
    fn count_unparsed(&self, st: &WireState, status: StatusCode) {
        self.metrics
            .requests
            .with_label_values(&[UNPARSED, status.as_str()])
            .inc();
        self.metrics
            .latency
            .with_label_values(&[UNPARSED])
            .observe(st.head_started.map_or(0.0, |t| t.elapsed().as_secs_f64()));
    }
}

/// The full answer that replaces hyper's empty one: the status, the JSON error and the
/// headers every answer carries; the connection closes after it.
fn refusal_bytes(status: StatusCode) -> Vec<u8> {
    let body = ApiError::http_layer(status).body().to_string();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\nx-content-type-options: nosniff\r\nx-frame-options: DENY\r\n\
         referrer-policy: no-referrer\r\ncontent-security-policy: {}\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
        crate::guard::API_CSP,
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// The status of an HTTP/1.x answer's first line.
fn status_of(head: &[u8]) -> Option<StatusCode> {
    let line = head.split(|&b| b == b'\r').next()?;
    let code = line.split(|&b| b == b' ').nth(1)?;
    StatusCode::from_bytes(code).ok()
}

/// hyper's view of the socket.
struct Io(Arc<Wire>);

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let wire = &self.0;
        loop {
            ready!(wire.stream.poll_read_ready(cx))?;
            match wire.stream.try_read(buf.initialize_unfilled()) {
                Ok(0) => {
                    let mut st = wire.lock();
                    if st.in_flight > 0 && buf.remaining() > 0 {
                        // The client closed its sending side and waits for its answer.
                        st.eof_held = true;
                        st.read_waker = Some(cx.waker().clone());
                        drop(st);
                        wire.changed.notify_one();
                        return Poll::Pending;
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(n) => {
                    buf.advance(n);
                    let mut st = wire.lock();
                    if st.in_flight == 0 && st.head_started.is_none() {
                        st.head_started = Some(Instant::now());
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let wire = &self.0;
        let mut st = wire.lock();
        ready!(wire.poll_pending(&mut st, cx))?;
        if st.swallow {
            return Poll::Ready(Ok(buf.len()));
        }
        if st.in_flight == 0 && st.idle && (!st.refusal.is_empty() || buf.starts_with(b"HTTP/1.")) {
            // hyper writes unasked only its answer to a head it refused: gather its head,
            // then answer in full instead.
            st.refusal.extend_from_slice(buf);
            if let Some(end) = st.refusal.windows(4).position(|w| w == b"\r\n\r\n") {
                let status = status_of(&st.refusal[..end]).unwrap_or(StatusCode::BAD_REQUEST);
                wire.count_unparsed(&st, status);
                let bytes = refusal_bytes(status);
                st.swallow = true;
                wire.push(&mut st, &bytes);
            }
            return Poll::Ready(Ok(buf.len()));
        }
        st.idle = false;
        st.answer_started = true;
        loop {
            ready!(wire.stream.poll_write_ready(cx))?;
            match wire.stream.try_write(buf) {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let wire = &self.0;
        let mut st = wire.lock();
        ready!(wire.poll_pending(&mut st, cx))?;
        if st.in_flight == 0 {
            st.idle = true;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let wire = &self.0;
        let mut st = wire.lock();
        ready!(wire.poll_pending(&mut st, cx))?;
        let _ = socket2::SockRef::from(&wire.stream).shutdown(std::net::Shutdown::Write);
        Poll::Ready(Ok(()))
    }
}

/// A request of this connection in flight, from the routes' call to the last byte of the
/// answer handed to hyper.
struct InFlight(Arc<Wire>);

impl InFlight {
    fn enter(wire: &Arc<Wire>, version: axum::http::Version) -> Self {
        let mut st = wire.lock();
        st.in_flight += 1;
        st.http11 = version == axum::http::Version::HTTP_11;
        st.answer_started = false;
        st.idle = false;
        st.head_started = None;
        drop(st);
        wire.changed.notify_one();
        Self(Arc::clone(wire))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.in_flight -= 1;
        // The held EOF may go to hyper now, which then closes the connection.
        let waker = if st.in_flight == 0 {
            st.eof_held = false;
            st.read_waker.take()
        } else {
            None
        };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        self.0.changed.notify_one();
    }
}

/// A response body that keeps its request in flight until it is dropped.
struct BusyBody {
    inner: Body,
    _busy: InFlight,
}

impl http_body::Body for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts an open connection in the metrics while it lives.
struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections.dec();
    }
}

/// What the connection's task knows of a client that closed its sending side.
#[derive(Default)]
struct HalfClose {
    since: Option<Instant>,
    probed: bool,
}

/// Serves one connection until it closes, or, once `stop` is set, until no request of it is
/// in flight (plus [`STOP_FLUSH`]), or until a write makes no progress for `write_timeout`,
/// or until a half-closed client turns out to have left. Holds `_slot` (a
/// `max_connections` permit) meanwhile.
pub(crate) async fn serve_connection(
    stream: TcpStream,
    app: Router,
    http: Arc<hyper::server::conn::http1::Builder>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    write_timeout: Duration,
) {
    let wire = Arc::new(Wire {
        stream,
        state: Mutex::new(WireState {
            in_flight: 0,
            http11: true,
            answer_started: false,
            idle: true,
            head_started: None,
            eof_held: false,
            read_waker: None,
            pending: Vec::new(),
            pending_sent: 0,
            refusal: Vec::new(),
            swallow: false,
        }),
        changed: Notify::new(),
        metrics: Arc::clone(&metrics),
    });
    // Without it, a client that never reads its answer blocks the write once the socket
    // buffers are full, and holds the connection (and its slot) for ever.
    let mut io = tokio_io_timeout::TimeoutStream::new(Io(Arc::clone(&wire)));
    io.set_write_timeout(Some(write_timeout));
    let io = Box::pin(io);
    metrics.connections.inc();
    let _open = OpenConnection(metrics);
    let tower = hyper_util::service::TowerToHyperService::new(app);
    let w = Arc::clone(&wire);
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = InFlight::enter(&w, req.version());
        let answer = hyper::service::Service::call(&tower, req);
        async move {
            let resp = answer.await?;
            Ok::<_, Infallible>(resp.map(|b| {
                Body::new(BusyBody {
                    inner: b,
                    _busy: guard,
                })
            }))
        }
    });
    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    let mut half = HalfClose::default();
    // What woke the connection's task (no await inside `select!`: a `watch` guard is not
    // `Send`).
    enum Woke {
        Done(Result<(), hyper::Error>),
        Stop,
        Changed,
    }
    loop {
        let watching = half.since.is_some();
        let woke = tokio::select! {
            r = conn.as_mut() => Woke::Done(r),
            // Set, or the server is gone: stop either way.
            _ = stop.wait_for(|s| *s) => Woke::Stop,
            _ = wire.changed.notified() => Woke::Changed,
            _ = tokio::time::sleep(PROBE_TICK), if watching => Woke::Changed,
        };
        match woke {
            Woke::Done(r) => return finish(&wire, r, write_timeout).await,
            Woke::Stop => break,
            Woke::Changed => {}
        }
        if !watch_half_close(&wire, &mut half) {
            tracing::debug!("a half-closed client left before its answer");
            return;
        }
    }
    // No more requests on this connection once the one in flight (if any) is answered.
    conn.as_mut().graceful_shutdown();
    loop {
        while wire.lock().in_flight > 0 {
            let woke = tokio::select! {
                r = conn.as_mut() => Woke::Done(r),
                _ = wire.changed.notified() => Woke::Changed,
                _ = tokio::time::sleep(PROBE_TICK) => Woke::Changed,
            };
            match woke {
                Woke::Done(r) => return finish(&wire, r, write_timeout).await,
                _ => {
                    if !watch_half_close(&wire, &mut half) {
                        return;
                    }
                }
            }
        }
        let woke = tokio::select! {
            r = conn.as_mut() => Woke::Done(r),
            _ = tokio::time::sleep(STOP_FLUSH) => Woke::Changed,
        };
        match woke {
            Woke::Done(r) => return finish(&wire, r, write_timeout).await,
            _ => {
                if wire.lock().in_flight == 0 {
                    return;
                }
            }
        }
    }
}

/// The half-close bookkeeping after any change: starts watching when the client's EOF is
/// held back, sends the interim 102 once the answer is late, and returns `false` once the
/// socket says the client is gone (reset after the probe).
fn watch_half_close(wire: &Wire, half: &mut HalfClose) -> bool {
    let mut st = wire.lock();
    if !(st.eof_held && st.in_flight > 0) {
        *half = HalfClose::default();
        return true;
    }
    let since = *half.since.get_or_insert_with(Instant::now);
    if !half.probed && !st.answer_started && st.http11 && since.elapsed() >= PROBE_DELAY {
        half.probed = true;
        wire.push(&mut st, b"HTTP/1.1 102 Processing\r\n\r\n");
        return true;
    }
    drop(st);
    if half.probed {
        // A closed socket answers the probe with a reset: ECONNRESET or, as this side has
        // seen the client's FIN, EPIPE.
        return !matches!(wire.stream.take_error(), Ok(Some(_)) | Err(_));
    }
    true
}

/// After hyper is done with the connection: our bytes still pending go out, and a head that
/// timed out half-sent is answered 408.
async fn finish(wire: &Wire, r: Result<(), hyper::Error>, write_timeout: Duration) {
    let mut bytes = {
        let mut st = wire.lock();
        let sent = st.pending_sent;
        let mut rest = st.pending.split_off(sent);
        st.pending.clear();
        st.pending_sent = 0;
        match &r {
            Err(e) if e.is_timeout() && st.in_flight == 0 && st.head_started.is_some() => {
                wire.count_unparsed(&st, StatusCode::REQUEST_TIMEOUT);
                rest.extend(refusal_bytes(StatusCode::REQUEST_TIMEOUT));
            }
            _ => {}
        }
        rest
    };
    if let Err(e) = &r {
        tracing::debug!("connection ended: {e}");
    }
    let write = async {
        while !bytes.is_empty() {
            wire.stream.writable().await?;
            match wire.stream.try_write(&bytes) {
                Ok(n) => {
                    bytes.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        socket2::SockRef::from(&wire.stream).shutdown(std::net::Shutdown::Write)
    };
    let _ = tokio::time::timeout(write_timeout, write).await;
}
