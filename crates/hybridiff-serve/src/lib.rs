//! `hybridiff serve`: an HTTP image service over the engine's warm ranks.
//!
//! - `POST /v1/images/generations`: OpenAI's images API (`prompt`, `n`, `size`,
//!   `response_format` `b64_json`|`url`, `model`, `user`) plus `negative_prompt`, `seed`,
//!   `num_inference_steps`, `guidance_scale` and `stream` (server-sent per-step progress).
//! - `GET /v1/images/files/{id}.png`: images asked for as `url`, kept in a bounded store.
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text), `GET /` (the page).
//!
//! One job runs on the ranks at a time ([`queue`]); at most `max_queue` wait, the next get
//! 429 with `Retry-After`. A request that times out or whose client leaves is dropped from
//! the queue (or its running job cancelled). A request the backend would refuse (a size that
//! does not fit in memory) is answered 400 before it queues ([`Backend::request_check`]).
//! With an API key every route but `/health` and the static page needs
//! `Authorization: Bearer KEY` (compared in constant time), unknown routes included. Nothing
//! a request says reaches the filesystem.
//!
//! Connections are served by hyper: a request's head must arrive within `header_timeout`
//! (idle keep-alive connections are closed after it too), its body within `body_timeout`
//! (else 408), every write of its answer must make progress within `write_timeout` (else
//! the connection is closed: a client that never reads its answer does not hold its slot),
//! and at most `max_connections` are open; more wait in the listen backlog.

pub mod api;
pub mod backend;
mod metrics;
mod queue;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use api::ApiError;
pub use backend::{
    encode_png, Backend, BackendError, BackendInfo, Image, ImageJob, PipelineBackend, RequestCheck,
    RequestDefaults, StrategyFor,
};

use api::{GenerationRequest, ResponseFormat};
use metrics::Metrics;
use queue::{JobError, JobThread, Progress};

/// The service's bounds. Every one is a `hybridiff serve` flag.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Request body bytes (`--max-body-bytes`); larger gets 413.
    pub max_body_bytes: usize,
    /// Characters of `prompt` and of `negative_prompt` (`--max-prompt-chars`).
    pub max_prompt_chars: usize,
    /// Images per request (`--max-n`).
    pub max_n: usize,
    /// `num_inference_steps` (`--max-steps`).
    pub max_steps: usize,
    /// Width x height (`--max-pixels`).
    pub max_pixels: u64,
    /// `guidance_scale` (`--max-guidance`).
    pub max_guidance: f64,
    /// Requests waiting behind the running one (`--max-queue`); more get 429. With 0 a
    /// request runs only when the ranks are idle.
    pub max_queue: usize,
    /// From arrival to answer, queue wait included (`--request-timeout`); then 504 and the
    /// job is dropped or cancelled.
    pub request_timeout: Duration,
    /// Images kept for `response_format: url` (`--max-stored-images`); the oldest go first.
    pub max_stored_images: usize,
    /// A request's head (request line and headers) must arrive within this from the first
    /// read (`--header-timeout`); else the connection is closed. Idle keep-alive connections
    /// are closed after it too.
    pub header_timeout: Duration,
    /// A request's body must arrive within this once its head has (`--body-timeout`); else
    /// 408 and the connection is closed.
    pub body_timeout: Duration,
    /// Open connections (`--max-connections`); more wait in the listen backlog until one
    /// closes.
    pub max_connections: usize,
    /// A write to a client that makes no progress for this long (the client does not read
    /// its answer) closes the connection (`--write-timeout`); a slow reader that keeps
    /// reading is not cut off.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_prompt_chars: 2000,
            max_n: 4,
            max_steps: 150,
            max_pixels: 1024 * 1024,
            max_guidance: 50.0,
            max_queue: 8,
            request_timeout: Duration::from_secs(600),
            max_stored_images: 64,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 256,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// How the service runs.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub limits: Limits,
    /// When set, every route but `/health` and `/` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
}

/// Images kept for `url` answers: at most `cap`, oldest dropped first; ids are 128 random
/// bits, so they cannot be guessed.
struct Store {
    cap: usize,
    items: Mutex<VecDeque<(String, Bytes)>>,
}

impl Store {
    fn put(&self, png: Vec<u8>) -> String {
        let id = format!("{:032x}", rand::random::<u128>());
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        while items.len() >= self.cap.max(1) {
            items.pop_front();
        }
        items.push_back((id.clone(), Bytes::from(png)));
        id
    }

    fn get(&self, id: &str) -> Option<Bytes> {
        let items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        items.iter().find(|(i, _)| i == id).map(|(_, b)| b.clone())
    }
}

struct AppState {
    limits: Limits,
    key_hash: Option<[u8; 32]>,
    info: BackendInfo,
    queue: Arc<queue::Queue>,
    /// The backend's check of a request before it queues.
    check: Option<RequestCheck>,
    metrics: Arc<Metrics>,
    store: Store,
    /// Unix seconds at start, `created` of the model.
    started: u64,
    /// The bound address, for `url`s when the request has no usable Host header.
    local: Mutex<Option<SocketAddr>>,
}

/// A started service: the backend is built and its job thread runs; [`Service::serve`]
/// answers HTTP on a listener.
pub struct Service {
    state: Arc<AppState>,
    jobs: JobThread,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Service {
    /// Builds the backend with `make` on the service's job thread (where it stays) and
    /// returns when it is ready; `make`'s error is returned as is.
    pub fn start<F>(make: F, config: Config) -> Result<Self, String>
    where
        F: FnOnce() -> Result<Box<dyn Backend>, String> + Send + 'static,
    {
        let metrics = Arc::new(Metrics::new());
        let jobs = JobThread::start(make, config.limits.max_queue, Arc::clone(&metrics))?;
        let state = Arc::new(AppState {
            key_hash: config
                .api_key
                .as_deref()
                .map(|k| Sha256::digest(k.as_bytes()).into()),
            info: jobs.info.clone(),
            queue: Arc::clone(&jobs.queue),
            check: jobs.check.clone(),
            metrics,
            store: Store {
                cap: config.limits.max_stored_images,
                items: Mutex::new(VecDeque::new()),
            },
            limits: config.limits,
            started: unix_now(),
            local: Mutex::new(None),
        });
        Ok(Self { state, jobs })
    }

    /// What the backend serves.
    pub fn info(&self) -> &BackendInfo {
        &self.state.info
    }

    /// The HTTP routes, to mount elsewhere or drive without a socket.
    pub fn router(&self) -> Router {
        router(Arc::clone(&self.state))
    }

    /// Answers HTTP on `listener` until `shutdown` completes; then stops accepting, answers
    /// the queued requests 503, lets the running job finish and its answer go out, and
    /// returns once every request in flight is answered and the job thread has stopped.
    /// Connections with no request in flight (idle, or a client still sending its head) are
    /// closed then; requests in flight are bounded by the body and request timeouts (and
    /// past both plus 2 s their connections are closed too).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        *self
            .state
            .local
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = listener.local_addr().ok();
        let limits = self.state.limits.clone();
        let app = self.router();
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let http = Arc::new(http);
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut conns = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                (slot, accepted) = accept_with_slot(&listener, &slots) => match accepted {
                    Ok((stream, _)) => {
                        conns.spawn(serve_connection(
                            stream,
                            app.clone(),
                            Arc::clone(&http),
                            stop_rx.clone(),
                            slot,
                            Arc::clone(&self.state.metrics),
                            limits.write_timeout,
                        ));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        tracing::warn!("accepting a connection failed: {e}");
                        drop(slot);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(listener);
        tracing::info!("shutting down: no new requests, queued ones get 503");
        self.state.queue.close();
        let _ = stop_tx.send(true);
        let grace = limits.request_timeout + limits.body_timeout + Duration::from_secs(2);
        let drained =
            tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("connections still busy {grace:?} after the stop signal: closing them");
            conns.shutdown().await;
        }
        let Service { state, jobs } = self;
        drop(state);
        // Joining waits for the running job, whose request has been answered above.
        tokio::task::spawn_blocking(move || drop(jobs))
            .await
            .map_err(std::io::Error::other)?;
        Ok(())
    }
}

/// A connection slot, then a connection (cancel-safe: a connection is only taken when both
/// are had).
async fn accept_with_slot(
    listener: &tokio::net::TcpListener,
    slots: &Arc<tokio::sync::Semaphore>,
) -> (
    tokio::sync::OwnedSemaphorePermit,
    std::io::Result<(tokio::net::TcpStream, SocketAddr)>,
) {
    let slot = Arc::clone(slots)
        .acquire_owned()
        .await
        .expect("the connection semaphore is never closed");
    (slot, listener.accept().await)
}

/// Requests of one connection in flight, from the head read to the last byte of the answer
/// handed to hyper.
struct Busy(Arc<tokio::sync::watch::Sender<usize>>);

impl Busy {
    fn enter(count: &Arc<tokio::sync::watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        Self(Arc::clone(count))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct BusyBody {
    inner: Body,
    _busy: Busy,
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

/// How long a connection with nothing in flight gets after the stop signal to finish writing
/// its last answer before it is dropped.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// Serves one connection until it closes, or, once `stop` is set, until no request of it is
/// in flight (plus [`STOP_FLUSH`]), or until a write makes no progress for `write_timeout`.
/// Holds `_slot` (a `max_connections` permit) meanwhile.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    http: Arc<hyper::server::conn::http1::Builder>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    write_timeout: Duration,
) {
    // Without it, a client that never reads its answer blocks the write once the socket
    // buffers are full, and holds the connection (and its slot) for ever.
    let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
    stream.set_write_timeout(Some(write_timeout));
    let stream = Box::pin(stream);
    metrics.connections.inc();
    let _open = OpenConnection(metrics);
    let (busy_tx, mut busy) = tokio::sync::watch::channel(0usize);
    let busy_tx = Arc::new(busy_tx);
    let tower = hyper_util::service::TowerToHyperService::new(app);
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let guard = Busy::enter(&busy_tx);
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
    let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!("connection ended: {e}");
            }
            return;
        }
        // Set, or the server is gone: stop either way.
        _ = stop.wait_for(|s| *s) => {}
    }
    // No more requests on this connection once the one in flight (if any) is answered.
    conn.as_mut().graceful_shutdown();
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = busy.wait_for(|n| *n == 0) => {}
        }
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(STOP_FLUSH) => {
                if *busy.borrow() == 0 {
                    return;
                }
            }
        }
    }
}

/// Paths anyone may ask for, key or not.
const PUBLIC: [&str; 2] = ["/health", "/"];

fn router(state: Arc<AppState>) -> Router {
    // `auth` wraps every route and the fallbacks, so that without the key unknown paths and
    // wrong methods get 401 too and say nothing about which routes exist.
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/models", get(models))
        .route("/v1/images/files/{file}", get(file))
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/", get(page))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(middleware::from_fn_with_state(Arc::clone(&state), auth))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// One request's entry in the metrics, made when it is dropped: with the answer's status,
/// or 499 (nginx's "client closed request") when the client left before the answer.
struct Tally {
    s: Arc<AppState>,
    route: String,
    start: Instant,
    status: Option<StatusCode>,
}

impl Drop for Tally {
    fn drop(&mut self) {
        let status = self.status.map_or(499, |s| s.as_u16()).to_string();
        let m = &self.s.metrics;
        m.requests
            .with_label_values(&[self.route.as_str(), status.as_str()])
            .inc();
        m.latency
            .with_label_values(&[self.route.as_str()])
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Counts every request by route and status, and times it to the response head.
async fn track(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    // Dropped with this future when the client disconnects first: counted as 499.
    let mut tally = Tally {
        s,
        route,
        start: Instant::now(),
        status: None,
    };
    let resp = next.run(req).await;
    tally.status = Some(resp.status());
    resp
}

/// `Authorization: Bearer KEY` on every path but [`PUBLIC`], compared as SHA-256 digests in
/// constant time (so neither the key's bytes nor its length leak through timing).
async fn auth(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let Some(want) = &s.key_hash else {
        return next.run(req).await;
    };
    if PUBLIC.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme name is case-insensitive (RFC 7235).
            let (scheme, key) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(key)
        });
    let Some(given) = given else {
        return ApiError::unauthorized(
            "missing API key: send `Authorization: Bearer KEY` (the key given to --api-key)",
        )
        .into_response();
    };
    let got: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
    if bool::from(got.ct_eq(want)) {
        next.run(req).await
    } else {
        ApiError::unauthorized("incorrect API key").into_response()
    }
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    let st = s.queue.status();
    let body = json!({
        "status": if st.open { "ok" } else { "shutting_down" },
        "queue_depth": st.waiting,
        "running": st.running,
    });
    let code = if st.open {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let i = &s.info;
    Json(json!({
        "object": "list",
        "data": [{
            "id": i.model_id,
            "object": "model",
            "created": s.started,
            "owned_by": "hybridiff",
            "hybridiff": {
                "default_size": format!("{}x{}", i.default_size.0, i.default_size.1),
                "size_multiple": i.size_multiple,
                "default_steps": i.default_steps,
                "default_guidance_scale": i.default_guidance,
                "strategy": i.strategy,
                "world_size": i.world_size,
                "threads_per_rank": i.threads_per_rank,
                "model_source": i.model_source,
                "loras": i.loras,
                "max_n": s.limits.max_n,
                "max_steps": s.limits.max_steps,
                "max_pixels": s.limits.max_pixels,
            },
        }],
    }))
}

async fn file(State(s): State<Arc<AppState>>, Path(file): Path<String>) -> Response {
    let found = file.strip_suffix(".png").and_then(|id| s.store.get(id));
    match found {
        Some(png) => (
            [(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))],
            png,
        )
            .into_response(),
        None => ApiError::not_found(format!(
            "no stored image `{file}` (the store keeps the last {} images)",
            s.limits.max_stored_images
        ))
        .into_response(),
    }
}

/// The request body, at most `limit` bytes, all of it within `timeout`: 413 past the limit,
/// 408 past the timeout, 499 when the client closed the connection mid-body.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(body_error(&e, limit)),
        Err(_) => Err(ApiError::body_timeout(timeout.as_secs_f64())),
    }
}

/// Why a body could not be read: too large, the client gone, or a malformed body.
fn body_error(e: &axum::Error, limit: usize) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<http_body_util::LengthLimitError>() {
            return ApiError::too_large(limit);
        }
        if c.downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message())
        {
            return ApiError::client_closed();
        }
        cause = c.source();
    }
    ApiError::bad_request(format!("the request body could not be read: {e}"))
}

/// `http://HOST` for `url`s: the request's Host header when it looks like one, else the
/// bound address.
fn base_url(s: &AppState, headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
        })
        .map(str::to_string)
        .or_else(|| {
            s.local
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map(|a| a.to_string())
        })
        .unwrap_or_else(|| "127.0.0.1".into());
    format!("http://{host}")
}

/// The OpenAI answer for made images, with hybridiff's `hybridiff` object.
fn images_body(
    s: &AppState,
    req: &GenerationRequest,
    images: Vec<Image>,
    base: &str,
    seconds: f64,
) -> Value {
    let extras: Vec<Value> = images
        .iter()
        .zip(&req.jobs)
        .map(|(img, job)| {
            json!({"seed": job.seed, "seconds": img.seconds, "tau1": img.tau1, "tau2": img.tau2})
        })
        .collect();
    let first = &req.jobs[0];
    let (tau1, tau2) = images.first().map(|i| (i.tau1, i.tau2)).unwrap_or_default();
    let data: Vec<Value> = images
        .into_iter()
        .map(|img| match req.response_format {
            ResponseFormat::B64Json => json!({
                "b64_json": base64::engine::general_purpose::STANDARD.encode(&img.png),
                "revised_prompt": null,
            }),
            ResponseFormat::Url => {
                let id = s.store.put(img.png);
                json!({"url": format!("{base}/v1/images/files/{id}.png"), "revised_prompt": null})
            }
        })
        .collect();
    json!({
        "created": unix_now(),
        "data": data,
        "hybridiff": {
            "seed": first.seed,
            "seed_given": req.seed_given,
            "seconds": seconds,
            "tau1": tau1,
            "tau2": tau2,
            "strategy": s.info.strategy,
            "world_size": s.info.world_size,
            "steps": first.steps,
            "guidance_scale": first.guidance,
            "size": format!("{}x{}", first.width, first.height),
            "images": extras,
        },
    })
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::ShuttingDown => ApiError::shutting_down(),
        // Only a dropped handle cancels, so nobody normally sees this.
        JobError::Cancelled => ApiError::job_failed("cancelled"),
        JobError::Failed(m) => ApiError::job_failed(&m),
    }
}

async fn generations(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let bytes = read_body(
        &headers,
        body,
        s.limits.max_body_bytes,
        s.limits.body_timeout,
    )
    .await?;
    let req = api::parse_generation(&bytes, &s.info, &s.limits)?;
    // Before queueing: a request the backend would refuse must not wait for its turn. The
    // jobs of a request differ only in seed.
    if let Some(check) = &s.check {
        check(&req.jobs[0])?;
    }
    let base = base_url(&s, &headers);
    let mut handle = s.queue.submit(req.jobs.clone())?;
    let timeout = s.limits.request_timeout;
    if req.stream {
        return Ok(stream(s, req, handle, base, start).into_response());
    }
    // Dropping `handle` (timeout below, or this future dropped because the client left)
    // takes the job out of the queue or cancels it.
    let outcome = match tokio::time::timeout(timeout, &mut handle.answer).await {
        Ok(Ok(o)) => o,
        Ok(Err(_)) => Err(JobError::Failed("the job thread has stopped".into())),
        Err(_) => return Err(ApiError::timeout(timeout.as_secs_f64())),
    };
    let images = outcome.map_err(job_error)?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(Json(images_body(&s, &req, images, &base, seconds)).into_response())
}

/// The answer as server-sent events: `queued` (`position`), `progress` (`image`, `images`,
/// `step`, `steps`), then `completed` (the JSON answer) or `error` (`status` and the error).
fn stream(
    s: Arc<AppState>,
    req: GenerationRequest,
    handle: queue::Handle,
    base: String,
    start: Instant,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    struct St {
        s: Arc<AppState>,
        req: GenerationRequest,
        handle: queue::Handle,
        base: String,
        start: Instant,
        deadline: tokio::time::Instant,
        queued_sent: bool,
        progress_open: bool,
    }
    fn error_event(e: &ApiError) -> Event {
        let mut body = e.body();
        body["status"] = json!(e.status.as_u16());
        Event::default().event("error").data(body.to_string())
    }
    let deadline = tokio::time::Instant::now() + s.limits.request_timeout;
    let init = Some(St {
        s,
        req,
        handle,
        base,
        start,
        deadline,
        queued_sent: false,
        progress_open: true,
    });
    let events = futures_util::stream::unfold(init, |st| async move {
        let mut st = st?;
        if !st.queued_sent {
            st.queued_sent = true;
            let ev = Event::default()
                .event("queued")
                .data(json!({"position": st.handle.position}).to_string());
            return Some((Ok(ev), Some(st)));
        }
        tokio::select! {
            biased;
            answer = &mut st.handle.answer => {
                let ev = match answer {
                    Ok(Ok(images)) => {
                        let seconds = st.start.elapsed().as_secs_f64();
                        let body = images_body(&st.s, &st.req, images, &st.base, seconds);
                        Event::default().event("completed").data(body.to_string())
                    }
                    Ok(Err(e)) => error_event(&job_error(e)),
                    Err(_) => error_event(&ApiError::job_failed("the job thread has stopped")),
                };
                Some((Ok(ev), None))
            }
            changed = st.handle.progress.changed(), if st.progress_open => {
                if changed.is_err() {
                    // Cannot happen while we hold the ticket; wait for the answer alone.
                    st.progress_open = false;
                    return Some((Ok(Event::default().comment("")), Some(st)));
                }
                let p: Progress = *st.handle.progress.borrow_and_update();
                let ev = Event::default().event("progress").data(
                    json!({"image": p.image, "images": p.images, "step": p.step, "steps": p.steps})
                        .to_string(),
                );
                Some((Ok(ev), Some(st)))
            }
            _ = tokio::time::sleep_until(st.deadline) => {
                let e = ApiError::timeout(st.s.limits.request_timeout.as_secs_f64());
                Some((Ok(error_event(&e)), None))
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
