//! `GET /metrics`: Prometheus text from a registry of this server's own (not the process
//! global one, so servers started side by side in tests count separately).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub(crate) struct Metrics {
    registry: Registry,
    /// By route (the matched pattern, `unmatched` for 404s, `unparsed` for requests the
    /// HTTP layer refused before routing) and final status code; 499 when the client closed
    /// the connection before its answer; a stream under the status of its last event. Every
    /// request received is counted once, when it ends.
    pub requests: IntCounterVec,
    /// Time to the response head, by route.
    pub latency: HistogramVec,
    pub queue_depth: IntGauge,
    pub jobs_running: IntGauge,
    pub images: IntCounter,
    /// Finished jobs by outcome: ok, failed, cancelled.
    pub jobs: IntCounterVec,
    /// Requests that left the queue before running (client gone, timeout).
    pub dropped: IntCounter,
    /// Open HTTP connections (at most `max_connections`).
    pub connections: IntGauge,
    model_loads: IntGauge,
    threads: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "hybridiff_http_requests_total",
                "HTTP requests by route and status",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "hybridiff_http_request_duration_seconds",
                "Seconds from request to response head, by route",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        let queue_depth = IntGauge::new(
            "hybridiff_queue_depth",
            "Requests waiting for the ranks (the running one excluded)",
        )
        .expect("valid metric");
        let jobs_running =
            IntGauge::new("hybridiff_jobs_running", "Jobs on the ranks now (0 or 1)")
                .expect("valid metric");
        let images = IntCounter::new("hybridiff_images_generated_total", "Images made")
            .expect("valid metric");
        let jobs = IntCounterVec::new(
            Opts::new("hybridiff_jobs_total", "Finished jobs by outcome"),
            &["outcome"],
        )
        .expect("valid metric");
        let dropped = IntCounter::new(
            "hybridiff_queue_dropped_total",
            "Queued requests dropped before running (client gone or timed out)",
        )
        .expect("valid metric");
        let connections = IntGauge::new(
            "hybridiff_http_connections",
            "Open HTTP connections (at most --max-connections)",
        )
        .expect("valid metric");
        let model_loads = IntGauge::new(
            "hybridiff_model_loads",
            "Model folders this process has loaded (stays at 1 while serving)",
        )
        .expect("valid metric");
        let threads = IntGauge::new(
            "hybridiff_rank_threads_started",
            "Rank threads and rank-pool workers this process has started (constant while serving)",
        )
        .expect("valid metric");
        for m in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(latency.clone()),
            Box::new(queue_depth.clone()),
            Box::new(jobs_running.clone()),
            Box::new(images.clone()),
            Box::new(jobs.clone()),
            Box::new(dropped.clone()),
            Box::new(connections.clone()),
            Box::new(model_loads.clone()),
            Box::new(threads.clone()),
        ] {
            registry.register(m).expect("unique metric names");
        }
        Self {
            registry,
            requests,
            latency,
            queue_depth,
            jobs_running,
            images,
            jobs,
            dropped,
            connections,
            model_loads,
            threads,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.model_loads
            .set(hybridiff_engine::model::loads() as i64);
        self.threads.set(hybridiff_comm::threads_started() as i64);
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}
