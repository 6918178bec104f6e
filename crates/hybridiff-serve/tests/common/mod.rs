//! A scripted backend and a server on 127.0.0.1:0 for the service tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use hybridiff_serve::{
    encode_png, ApiError, Backend, BackendError, BackendInfo, Config, Image, ImageJob,
    RequestCheck, Service, Stop,
};

/// What the fake backend did, shared with the test.
#[derive(Default)]
pub struct Record {
    /// Jobs started, by prompt.
    pub started: Mutex<Vec<String>>,
    pub cancelled: AtomicUsize,
    /// Opened by `release`; jobs whose prompt is `hold` wait for it.
    gate: Mutex<bool>,
    gate_cv: Condvar,
}

impl Record {
    pub fn release(&self) {
        *self.gate.lock().unwrap() = true;
        self.gate_cv.notify_all();
    }
    pub fn started(&self) -> Vec<String> {
        self.started.lock().unwrap().clone()
    }
}

/// Prompts script it: `fail` returns an error, `panic` panics, `hold` waits for
/// `Record::release` (watching the cancel flag), `stubborn` too but ignores the flag;
/// anything else takes `steps` x 2 ms. Images
/// are a flat colour picked by the seed (`noise`: random pixels, so a large PNG). Its request check refuses more than
/// [`FAKE_MAX_FIT`] pixels, as a model that cannot fit them in memory would.
pub struct Fake {
    info: BackendInfo,
    record: Arc<Record>,
}

pub fn fake_info() -> BackendInfo {
    BackendInfo {
        model_id: "fake-model".into(),
        default_size: (64, 64),
        size_multiple: 8,
        default_steps: 4,
        default_guidance: 5.0,
        strategy: "serial".into(),
        world_size: 1,
        threads_per_rank: 1,
        model_source: "diffusers folder".into(),
        loras: Vec::new(),
    }
}

/// Pixels the fake backend "fits in memory".
pub const FAKE_MAX_FIT: u64 = 256 * 256;

/// The fewest steps the fake backend's "strategy" takes.
pub const FAKE_MIN_STEPS: usize = 2;

impl Backend for Fake {
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn request_check(&self) -> Option<RequestCheck> {
        Some(Arc::new(|job: &ImageJob| {
            // As the engine's `check_size` (a model with a VAE factor of 8).
            if !job.width.is_multiple_of(8) || !job.height.is_multiple_of(8) {
                return Err(ApiError::bad_field(
                    "size",
                    format!(
                        "`size` {}x{}: width and height must be positive multiples of 8 for this model",
                        job.width, job.height
                    ),
                ));
            }
            // As hybrid's thresholds on a service with fixed --k and --tau-cap.
            if job.steps < FAKE_MIN_STEPS {
                return Err(ApiError::bad_field(
                    "num_inference_steps",
                    format!(
                        "`num_inference_steps` {}: this service's strategy needs at least {FAKE_MIN_STEPS} steps",
                        job.steps
                    ),
                ));
            }
            let pixels = job.width as u64 * job.height as u64;
            if pixels > FAKE_MAX_FIT {
                return Err(ApiError::bad_field(
                    "size",
                    format!(
                        "`size` {}x{}: this job needs an estimated {} bytes, more than the {} available",
                        job.width,
                        job.height,
                        pixels * 1000,
                        FAKE_MAX_FIT * 1000
                    ),
                ));
            }
            Ok(())
        }))
    }

    fn generate(
        &mut self,
        job: &ImageJob,
        progress: &(dyn Fn(usize, usize) + Sync),
        cancel: &AtomicBool,
    ) -> Result<Image, BackendError> {
        self.record.started.lock().unwrap().push(job.prompt.clone());
        match job.prompt.as_str() {
            "fail" => {
                return Err(BackendError::Failed(
                    "rank 1 failed: injected failure (NaN in the latents)".into(),
                ))
            }
            "panic" => panic!("injected panic"),
            "hold" | "stubborn" => {
                let mut open = self.record.gate.lock().unwrap();
                while !*open {
                    if job.prompt == "hold" && cancel.load(Ordering::SeqCst) {
                        self.record.cancelled.fetch_add(1, Ordering::SeqCst);
                        return Err(BackendError::Cancelled);
                    }
                    open = self
                        .record
                        .gate_cv
                        .wait_timeout(open, Duration::from_millis(5))
                        .unwrap()
                        .0;
                }
            }
            _ => {}
        }
        for s in 1..=job.steps {
            std::thread::sleep(Duration::from_millis(2));
            if cancel.load(Ordering::SeqCst) {
                self.record.cancelled.fetch_add(1, Ordering::SeqCst);
                return Err(BackendError::Cancelled);
            }
            progress(s, job.steps);
        }
        let colour = [(job.seed % 251) as u8, 7, 9];
        let rgb: Vec<u8> = if job.prompt == "noise" {
            // Incompressible, for answers larger than the socket buffers.
            let mut x = job.seed | 1;
            (0..job.width * job.height * 3)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        } else {
            (0..job.width * job.height).flat_map(|_| colour).collect()
        };
        Ok(Image {
            png: encode_png(job.width, job.height, rgb).unwrap(),
            width: job.width,
            height: job.height,
            seconds: 0.01,
            tau1: None,
            tau2: None,
        })
    }
}

/// A service on 127.0.0.1:0 with the fake backend.
pub struct TestServer {
    pub base: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub record: Arc<Record>,
    shutdown: Option<tokio::sync::oneshot::Sender<Stop>>,
    pub done: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        let record = Arc::new(Record::default());
        let r = Arc::clone(&record);
        let service = Service::start(
            move || {
                Ok(Box::new(Fake {
                    info: fake_info(),
                    record: r,
                }) as Box<dyn Backend>)
            },
            config,
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let base = format!("http://{addr}");
        let (tx, rx) = tokio::sync::oneshot::channel::<Stop>();
        let done = tokio::spawn(
            service.serve_until(listener, async move { rx.await.unwrap_or(Stop::Drain) }),
        );
        Self {
            base,
            addr,
            record,
            shutdown: Some(tx),
            done: Some(done),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Sends the stop signal (as SIGTERM would).
    pub fn stop(&mut self) {
        self.stop_with(Stop::Drain);
    }

    /// Sends the stop signal `how` (Ctrl-C: [`Stop::Cancel`]).
    pub fn stop_with(&mut self, how: Stop) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(how);
        }
    }

    /// Sends `request` as is on a new connection (then half-closes it when `half_close`)
    /// and returns everything the server sent until it closed (at most 10 s).
    pub async fn raw(&self, request: &[u8], half_close: bool) -> Raw {
        raw_exchange(&self.addr, request, half_close).await
    }

    pub async fn health(&self) -> serde_json::Value {
        reqwest::get(self.url("/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until `/health` satisfies `f` (at most 10 s).
    pub async fn wait_health(&self, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
        let t0 = Instant::now();
        loop {
            let h = self.health().await;
            if f(&h) {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "waited 10 s for {what}; /health says {h}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The sum of the samples of `name` whose labels include `label` (e.g. `route="/x"`).
pub fn sum_samples(metrics: &str, name: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The value of a Prometheus sample line `name{labels} value` (labels as written).
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub async fn post(
    client: &reqwest::Client,
    url: &str,
    body: serde_json::Value,
) -> reqwest::Response {
    client.post(url).json(&body).send().await.unwrap()
}

/// The decoded PNG of a `b64_json` item.
pub fn decode_b64_png(b64: &str) -> image::RgbImage {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// What a server sent on one connection, parsed as HTTP/1.1 answers.
#[derive(Debug)]
pub struct Raw {
    pub bytes: Vec<u8>,
}

impl Raw {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The interim (1xx) statuses, then the final answer's status, headers (names
    /// lowercase) and body (as text, lossily).
    pub fn answer(&self) -> (Vec<u16>, u16, Vec<(String, String)>, String) {
        let text = self.text();
        let mut rest: &[u8] = &self.bytes;
        let mut interim = Vec::new();
        loop {
            let end = rest
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or_else(|| panic!("no complete answer in {text:?}"));
            let head = String::from_utf8_lossy(&rest[..end]).into_owned();
            let after = &rest[end + 4..];
            let mut lines = head.split("\r\n");
            let status: u16 = lines
                .next()
                .and_then(|l| l.split(' ').nth(1))
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("no status line in {text:?}"));
            let headers: Vec<(String, String)> = lines
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            if (100..200).contains(&status) {
                interim.push(status);
                rest = after;
                continue;
            }
            let len = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse::<usize>().unwrap());
            let body = match len {
                Some(n) => &after[..n.min(after.len())],
                None => after,
            };
            return (
                interim,
                status,
                headers,
                String::from_utf8_lossy(body).into_owned(),
            );
        }
    }

    /// The final status and its JSON body.
    pub fn json(&self) -> (u16, serde_json::Value) {
        let (_, status, _, body) = self.answer();
        let v = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{e}: not JSON: {:?}", self.text()));
        (status, v)
    }
}

/// See [`TestServer::raw`].
pub async fn raw_exchange(addr: &str, request: &[u8], half_close: bool) -> Raw {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(addr).await.unwrap();
    sock.write_all(request).await.unwrap();
    if half_close {
        sock.shutdown().await.unwrap();
    }
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 8192];
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open 10 s; got {:?}",
        String::from_utf8_lossy(&bytes)
    );
    Raw { bytes }
}

/// A `POST /v1/images/generations` with `body`, `Host: host` and `extra` header lines
/// (each ending in CRLF), closing the connection after the answer.
pub fn post_bytes(host: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
