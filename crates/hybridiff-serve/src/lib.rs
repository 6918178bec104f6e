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
//! the queue (or its running job cancelled). A request the backend would refuse (steps,
//! size, guidance its strategy or model cannot take, a size that does not fit in memory) is
//! answered 400 naming the field before it queues ([`Backend::request_check`]: the engine's
//! own checks); `GET /v1/models` says the limits a request must keep. With an API key every
//! route but `/health` and the static page needs `Authorization: Bearer KEY` (compared in
//! constant time), unknown routes included. Nothing a request says reaches the filesystem.
//!
//! Key or not, every request must name this service in `Host` and, where a browser sends
//! one, in `Origin`; the API takes JSON bodies only (415 otherwise); headers that must be
//! single (`Authorization`, `Host`, `Content-Type`, `Content-Length`) are 400 when repeated;
//! every answer carries `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY` and a
//! Content-Security-Policy ([`guard`]). `url` answers link to `http://HOST/...` with the
//! `Host` the request was accepted with (so the links reach the service the way the client
//! did); an answer's images enter the store together and `n` is never above the store's
//! size, so its links are all live when it is sent.
//!
//! Connections are served by hyper ([`conn`]): a request's head must arrive within
//! `header_timeout` (idle keep-alive connections are closed after it too), its body within
//! `body_timeout` (else 408), every write of its answer must make progress within
//! `write_timeout` (else the connection is closed: a client that never reads its answer does
//! not hold its slot), and at most `max_connections` are open; more wait in the listen
//! backlog. A client that closes its sending side after its request still gets its answer;
//! refusals of the HTTP layer (400, 414, 431, 408) have the OpenAI error body. Every request
//! is counted once in the metrics, under its final status (a stream that ends in an error
//! event under that error's status; 499 when the client left first).

pub mod api;
pub mod backend;
mod conn;
pub mod guard;
mod metrics;
mod queue;

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, MatchedPath, Path, Request, State};
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
    encode_png, refusal, Backend, BackendError, BackendInfo, Image, ImageJob, PipelineBackend,
    RequestCheck, RequestDefaults, StrategyFor,
};

use api::{GenerationRequest, ResponseFormat};
use guard::{AcceptedHost, Hosts};
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
    /// Host names (`NAME` or `NAME:PORT`) the service answers to besides its own address
    /// and `localhost` (`--allowed-host`); see [`guard`].
    pub allowed_hosts: Vec<String>,
}

/// How [`Service::serve_until`] stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Take no more requests, answer the queued ones 503, let the running job finish and
    /// answer it (SIGTERM).
    Drain,
    /// As `Drain`, but cancel the running job at its next step and answer it 503 (Ctrl-C).
    Cancel,
}

/// Images kept for `url` answers: at most `cap`, oldest dropped first; ids are 128 random
/// bits, so they cannot be guessed.
struct Store {
    cap: usize,
    items: Mutex<VecDeque<(String, Bytes)>>,
}

impl Store {
    /// Stores one answer's images together (at most `cap` of them: the request check keeps
    /// `n` within it), pushing out the oldest of earlier answers only; returns their ids.
    fn put_all(&self, pngs: Vec<Vec<u8>>) -> Vec<String> {
        let mut items = self.items.lock().unwrap_or_else(PoisonError::into_inner);
        let cap = self.cap.max(pngs.len()).max(1);
        while items.len() + pngs.len() > cap {
            items.pop_front();
        }
        pngs.into_iter()
            .map(|png| {
                let id = format!("{:032x}", rand::random::<u128>());
                items.push_back((id.clone(), Bytes::from(png)));
                id
            })
            .collect()
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
    /// The hosts this service answers to; the bound address is set when it serves.
    hosts: Mutex<Hosts>,
    /// The limits a request must keep, as `GET /v1/models` says them (found with the
    /// backend's request check when the service started).
    request_limits: Value,
    /// The page's Content-Security-Policy (hashes of its inline script and style).
    page_csp: HeaderValue,
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
        let limits = &config.limits;
        if limits.max_stored_images < limits.max_n {
            return Err(format!(
                "--max-stored-images {} is below --max-n {}: a `url` answer of n images would \
                 push its own first images out of the store before it is sent",
                limits.max_stored_images, limits.max_n
            ));
        }
        let allowed = config
            .allowed_hosts
            .iter()
            .map(|h| guard::parse_allowed_host(h))
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = Arc::new(Metrics::new());
        let jobs = JobThread::start(make, config.limits.max_queue, Arc::clone(&metrics))?;
        let request_limits = request_limits(&jobs.info, &config.limits, jobs.check.as_ref());
        let page_csp = HeaderValue::from_str(&guard::page_csp(PAGE))
            .map_err(|e| format!("the page's Content-Security-Policy: {e}"))?;
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
            hosts: Mutex::new(Hosts {
                bound: None,
                allowed,
            }),
            request_limits,
            page_csp,
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

    /// Answers HTTP on `listener` until `shutdown` completes; then stops as
    /// [`Stop::Drain`] says.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_until(listener, async move {
            shutdown.await;
            Stop::Drain
        })
        .await
    }

    /// Answers HTTP on `listener` until `stop` completes; then stops accepting, answers the
    /// queued requests 503, lets the running job finish ([`Stop::Drain`]) or cancels it at
    /// its next step ([`Stop::Cancel`]), and returns once every request in flight is
    /// answered and the job thread has stopped. Connections with no request in flight
    /// (idle, or a client still sending its head) are closed then; requests in flight are
    /// bounded by the body and request timeouts (and past both plus 2 s their connections
    /// are closed too).
    pub async fn serve_until(
        self,
        listener: tokio::net::TcpListener,
        stop: impl Future<Output = Stop> + Send + 'static,
    ) -> std::io::Result<()> {
        self.state
            .hosts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .bound = listener.local_addr().ok();
        let limits = self.state.limits.clone();
        let app = self.router();
        let mut http = hyper::server::conn::http1::Builder::new();
        // A head larger than this is refused 431, and a connection's read buffer is bounded
        // by it (hyper's default is about 400 KiB).
        http.timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .max_header_size(MAX_HEAD_BYTES)
            .max_buf_size(MAX_HEAD_BYTES);
        let http = Arc::new(http);
        let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut conns = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        let how = loop {
            tokio::select! {
                biased;
                how = &mut stop => break how,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                (slot, accepted) = accept_with_slot(&listener, &slots) => match accepted {
                    Ok((stream, _)) => {
                        conns.spawn(conn::serve_connection(
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
        };
        drop(listener);
        tracing::info!("shutting down: no new requests, queued ones get 503");
        self.state.queue.close();
        if how == Stop::Cancel {
            self.state.queue.cancel_running();
        }
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
        .layer(middleware::from_fn_with_state(Arc::clone(&state), guard))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), track))
        .with_state(state)
}

/// The page, compiled in.
const PAGE: &str = include_str!("page.html");

/// The largest request head (request line and headers) in bytes; larger is refused 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// [`guard::check`] before auth (a request that is not for this service learns nothing,
/// not even whether a key is needed), and the headers every answer carries.
async fn guard(State(s): State<Arc<AppState>>, mut req: Request, next: Next) -> Response {
    let target_len = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path().len(), |p| p.as_str().len());
    let checked = {
        let hosts = s.hosts.lock().unwrap_or_else(PoisonError::into_inner);
        guard::check(&hosts, target_len, req.headers())
    };
    let mut resp = match checked {
        Ok(host) => {
            req.extensions_mut().insert(host);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    };
    guard::secure(resp.headers_mut());
    resp
}

/// One request's entry in the metrics, made when it is dropped: with the answer's status,
/// or 499 (nginx's "client closed request") when the client left before the answer.
struct Tally {
    s: Arc<AppState>,
    route: String,
    start: Instant,
    status: Option<StatusCode>,
    /// The latency (to the response head) is already observed.
    timed: bool,
}

impl Tally {
    fn time(&mut self) {
        if !self.timed {
            self.timed = true;
            self.s
                .metrics
                .latency
                .with_label_values(&[self.route.as_str()])
                .observe(self.start.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        self.time();
        let status = self.status.map_or(499, |s| s.as_u16()).to_string();
        self.s
            .metrics
            .requests
            .with_label_values(&[self.route.as_str(), status.as_str()])
            .inc();
    }
}

/// The final status of a streamed answer, set by the stream when it ends (`completed`: 200,
/// `error`: that error's status); unset when the client left first (499).
#[derive(Clone, Default)]
struct StreamOutcome(Arc<Mutex<Option<StatusCode>>>);

impl StreamOutcome {
    fn set(&self, status: StatusCode) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(status);
    }
}

/// A streamed answer's body, which counts its request when it is dropped, under the status
/// the stream ended with.
struct TalliedBody {
    inner: Body,
    tally: Tally,
    outcome: StreamOutcome,
}

impl http_body::Body for TalliedBody {
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

impl Drop for TalliedBody {
    fn drop(&mut self) {
        self.tally.status = *self
            .outcome
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Counts every request once by route and final status, and times it to the response head.
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
        timed: false,
    };
    let mut resp = next.run(req).await;
    tally.time();
    match resp.extensions_mut().remove::<StreamOutcome>() {
        // A stream's status is known when it ends: counted then, by its body.
        Some(outcome) => resp.map(|inner| {
            Body::new(TalliedBody {
                inner,
                tally,
                outcome,
            })
        }),
        None => {
            tally.status = Some(resp.status());
            resp
        }
    }
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

async fn page(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_SECURITY_POLICY, s.page_csp.clone())],
        Html(PAGE),
    )
        .into_response()
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
                "limits": s.request_limits,
            },
        }],
    }))
}

/// The limits a request must keep, found with `check` (the backend's request check, the
/// engine's own checks) for the defaults of the other fields: the step counts and square
/// sizes it accepts within the service's bounds. With guidance at or below 1 (no
/// classifier-free guidance) some strategies accept fewer steps than `min`.
fn request_limits(info: &BackendInfo, limits: &Limits, check: Option<&RequestCheck>) -> Value {
    let job = |steps: usize, (width, height): (u32, u32)| ImageJob {
        prompt: String::new(),
        negative_prompt: None,
        seed: 0,
        noise: Default::default(),
        steps,
        guidance: info.default_guidance,
        width,
        height,
    };
    let passes = |j: &ImageJob| check.is_none_or(|c| c(j).is_ok());
    let steps: Vec<usize> = (1..=limits.max_steps)
        .filter(|&n| passes(&job(n, info.default_size)))
        .collect();
    let m = info.size_multiple.max(1);
    let most_side = ((limits.max_pixels as f64).sqrt() as u32 / m) * m;
    let sides: Vec<u32> = (1..=most_side / m)
        .map(|i| i * m)
        .filter(|&side| passes(&job(info.default_steps, (side, side))))
        .collect();
    let square = |s: Option<&u32>| s.map(|s| format!("{s}x{s}"));
    json!({
        "n": {"min": 1, "max": limits.max_n},
        "num_inference_steps": {
            "min": steps.first(),
            "max": steps.last(),
            "default": info.default_steps,
        },
        "size": {
            "default": format!("{}x{}", info.default_size.0, info.default_size.1),
            "multiple": info.size_multiple,
            "max_pixels": limits.max_pixels,
            "min_square": square(sides.first()),
            "max_square": square(sides.last()),
        },
        "guidance_scale": {
            "min": 0.0,
            "max": limits.max_guidance,
            "default": info.default_guidance,
        },
        "prompt_chars": {"max": limits.max_prompt_chars},
        "response_format": ["b64_json", "url"],
        "max_stored_images": limits.max_stored_images,
        "max_body_bytes": limits.max_body_bytes,
    })
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

/// `http://HOST` for `url`s: HOST is the `Host` the request was accepted with (see
/// [`guard`]), never one the service did not accept.
fn base_url(host: &AcceptedHost) -> String {
    format!("http://{}", host.0)
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
    let data: Vec<Value> = match req.response_format {
        ResponseFormat::B64Json => images
            .into_iter()
            .map(|img| {
                json!({
                    "b64_json": base64::engine::general_purpose::STANDARD.encode(&img.png),
                    "revised_prompt": null,
                })
            })
            .collect(),
        ResponseFormat::Url => s
            .store
            .put_all(images.into_iter().map(|img| img.png).collect())
            .into_iter()
            .map(|id| {
                json!({"url": format!("{base}/v1/images/files/{id}.png"), "revised_prompt": null})
            })
            .collect(),
    };
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
        JobError::Stopped => ApiError::stopped(),
        // Only a dropped handle cancels, so nobody normally sees this.
        JobError::Cancelled => ApiError::job_failed("cancelled"),
        JobError::Failed(m) => ApiError::job_failed(&m),
    }
}

async fn generations(
    State(s): State<Arc<AppState>>,
    Extension(host): Extension<AcceptedHost>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    guard::check_json_type(&headers)?;
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
    let base = base_url(&host);
    let mut handle = s.queue.submit(req.jobs.clone())?;
    let timeout = s.limits.request_timeout;
    if req.stream {
        let outcome = StreamOutcome::default();
        let mut resp = stream(s, req, handle, base, start, outcome.clone()).into_response();
        resp.extensions_mut().insert(outcome);
        return Ok(resp);
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
/// The request is counted under the status of the last event ([`StreamOutcome`]).
fn stream(
    s: Arc<AppState>,
    req: GenerationRequest,
    handle: queue::Handle,
    base: String,
    start: Instant,
    outcome: StreamOutcome,
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
        outcome: StreamOutcome,
    }
    fn error_event(e: &ApiError, outcome: &StreamOutcome) -> Event {
        outcome.set(e.status);
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
        outcome,
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
                        st.outcome.set(StatusCode::OK);
                        Event::default().event("completed").data(body.to_string())
                    }
                    Ok(Err(e)) => error_event(&job_error(e), &st.outcome),
                    Err(_) => error_event(
                        &ApiError::job_failed("the job thread has stopped"),
                        &st.outcome,
                    ),
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
                Some((Ok(error_event(&e, &st.outcome)), None))
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
