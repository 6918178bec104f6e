//! The service over real sockets on 127.0.0.1, with a scripted backend: API shape, errors,
//! auth, the queue, timeouts, disconnects, failing jobs, shutdown, slow clients and the
//! connection cap.

mod common;

use std::io::Write;
use std::time::Duration;

use common::{decode_b64_png, post, sample, sum_samples, TestServer};
use hybridiff_serve::{Config, Limits};
use serde_json::{json, Value};

/// Sends the request on its own task.
fn spawn_post(
    c: &reqwest::Client,
    url: &str,
    body: Value,
) -> tokio::task::JoinHandle<reqwest::Response> {
    let (c, url) = (c.clone(), url.to_string());
    tokio::spawn(async move { post(&c, &url, body).await })
}

fn config(f: impl FnOnce(&mut Limits)) -> Config {
    let mut c = Config::default();
    f(&mut c.limits);
    c
}

/// Asserts OpenAI's error shape with `status` and, when given, `param`.
async fn expect_error(resp: reqwest::Response, status: u16, param: Option<&str>) -> Value {
    assert_eq!(resp.status().as_u16(), status);
    let v: Value = resp.json().await.unwrap();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
        assert!(
            e["message"].as_str().unwrap().contains(p),
            "the message names the field: {v}"
        );
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn b64_url_n_and_the_hybridiff_object() {
    let srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let r = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "a red circle", "n": 2, "seed": 40, "size": "32x48",
               "model": "fake-model", "user": "someone"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, d) in data.iter().enumerate() {
        assert!(d["revised_prompt"].is_null());
        let img = decode_b64_png(d["b64_json"].as_str().unwrap());
        assert_eq!(img.dimensions(), (32, 48));
        assert_eq!(img.get_pixel(0, 0).0[0], 40 + i as u8, "seed + i");
    }
    let h = &v["hybridiff"];
    assert_eq!(h["seed"], 40);
    // What OpenAI's clients send by default is served too: its image models and options.
    let r = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "a", "model": "dall-e-3", "quality": "hd", "style": "vivid"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    // A random seed fits JavaScript's exact integers.
    let v: Value = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "a"}),
    )
    .await
    .json()
    .await
    .unwrap();
    assert!(v["hybridiff"]["seed"].as_u64().unwrap() < 1 << 53);
    assert_eq!(h["strategy"], "serial");
    assert_eq!(h["steps"], 4);
    assert_eq!(h["size"], "32x48");
    assert!(h["seconds"].as_f64().unwrap() > 0.0);
    assert!(h.get("tau1").is_some() && h.get("tau2").is_some());
    assert_eq!(h["images"].as_array().unwrap().len(), 2);

    // url: served from the in-memory store, same PNG.
    let r = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "x", "seed": 3, "response_format": "url"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    let url = v["data"][0]["url"].as_str().unwrap();
    assert!(url.starts_with(&srv.url("/v1/images/files/")) && url.ends_with(".png"));
    let got = c.get(url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/png");
    let img = image::load_from_memory(&got.bytes().await.unwrap())
        .unwrap()
        .to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    let r = c
        .get(srv.url("/v1/images/files/0123456789abcdef0123456789abcdef.png"))
        .send()
        .await
        .unwrap();
    expect_error(r, 404, None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn models_health_metrics_and_page() {
    let srv = TestServer::start(Config::default()).await;
    let v: Value = reqwest::get(srv.url("/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "fake-model");
    assert_eq!(v["data"][0]["object"], "model");
    assert!(v["data"][0]["created"].is_u64() && v["data"][0]["owned_by"].is_string());
    let h = srv.health().await;
    assert_eq!(h["status"], "ok");
    let page = reqwest::get(srv.url("/")).await.unwrap();
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains("id=\"generate\"") && html.contains("/v1/images/generations"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page loads nothing from elsewhere"
    );
    let m = srv.metrics().await;
    for name in [
        "hybridiff_http_requests_total",
        "hybridiff_http_request_duration_seconds_bucket",
        "hybridiff_queue_depth",
        "hybridiff_images_generated_total",
        "hybridiff_model_loads",
        "hybridiff_rank_threads_started",
        "hybridiff_http_connections",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics:\n{m}");
    }
    assert_eq!(
        sample(
            &m,
            "hybridiff_http_requests_total{route=\"/v1/models\",status=\"200\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_name_the_field() {
    let srv = TestServer::start(config(|l| {
        l.max_prompt_chars = 20;
        l.max_pixels = 128 * 128;
        l.max_body_bytes = 2048;
    }))
    .await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let cases = [
        (json!({}), "prompt"),
        (json!({"prompt": "   "}), "prompt"),
        (json!({"prompt": 5}), "prompt"),
        (json!({"prompt": "x".repeat(21)}), "prompt"),
        (
            json!({"prompt": "a", "negative_prompt": "y".repeat(21)}),
            "negative_prompt",
        ),
        (json!({"prompt": "a", "n": 0}), "n"),
        (json!({"prompt": "a", "n": 5}), "n"),
        (json!({"prompt": "a", "n": 1.5}), "n"),
        (json!({"prompt": "a", "size": "64"}), "size"),
        (json!({"prompt": "a", "size": "60x64"}), "size"),
        (json!({"prompt": "a", "size": "256x256"}), "size"),
        (json!({"prompt": "a", "size": "0x64"}), "size"),
        // Digits only, as OpenAI's sizes are written.
        (json!({"prompt": "a", "size": "+64x64"}), "size"),
        (json!({"prompt": "a", "size": "64x+64"}), "size"),
        (json!({"prompt": "a", "size": "64X64"}), "size"),
        (json!({"prompt": "a", "size": "64x64 "}), "size"),
        (json!({"prompt": "a", "size": "-64x64"}), "size"),
        (
            json!({"prompt": "a", "response_format": "jpeg"}),
            "response_format",
        ),
        (
            json!({"prompt": "a", "num_inference_steps": 0}),
            "num_inference_steps",
        ),
        (
            json!({"prompt": "a", "num_inference_steps": 151}),
            "num_inference_steps",
        ),
        (
            json!({"prompt": "a", "guidance_scale": -1}),
            "guidance_scale",
        ),
        (
            json!({"prompt": "a", "guidance_scale": "high"}),
            "guidance_scale",
        ),
        (json!({"prompt": "a", "seed": -3}), "seed"),
        (json!({"prompt": "a", "stream": "yes"}), "stream"),
        (json!({"prompt": "a", "qualty": "hd"}), "qualty"),
        (json!({"prompt": "a", "quality": 3}), "quality"),
    ];
    for (body, field) in cases {
        let r = post(&c, &url, body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        expect_error(r, 400, Some(field)).await;
    }
    // Not JSON, not an object.
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    expect_error(r, 400, None).await;
    let r = post(&c, &url, json!([1, 2])).await;
    expect_error(r, 400, None).await;
    // Unknown model: 404 as OpenAI does (OpenAI's own image models are served by ours).
    let r = post(&c, &url, json!({"prompt": "a", "model": "no-such-model"})).await;
    let v = expect_error(r, 404, Some("model")).await;
    assert_eq!(v["error"]["code"], "model_not_found");
    // Too large a body, with and without Content-Length.
    let big = json!({"prompt": "a", "user": "u".repeat(4000)});
    let r = post(&c, &url, big.clone()).await;
    expect_error(r, 413, None).await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(big.to_string().into_bytes())];
    let r = c
        .post(&url)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    expect_error(r, 413, None).await;
    // Unknown route, wrong method.
    let r = c.get(srv.url("/v1/nothing")).send().await.unwrap();
    expect_error(r, 404, None).await;
    let r = c.get(&url).send().await.unwrap();
    expect_error(r, 405, None).await;
    // Nothing above ran a job.
    assert!(srv.record.started().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_guards_every_route_but_health_and_the_page() {
    let srv = TestServer::start(Config {
        api_key: Some("s3cret-key".into()),
        ..Config::default()
    })
    .await;
    let c = reqwest::Client::new();
    for (method, path) in [
        ("POST", "/v1/images/generations"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/v1/images/files/abc.png"),
    ] {
        for auth in [
            None,
            Some("Bearer wrong"),
            Some("s3cret-key"),
            Some("Bearer s3cret-keyX"),
        ] {
            let mut rb = c.request(method.parse().unwrap(), srv.url(path));
            if let Some(a) = auth {
                rb = rb.header("Authorization", a);
            }
            let r = rb.json(&json!({"prompt": "a"})).send().await.unwrap();
            let v = expect_error(r, 401, None).await;
            assert_eq!(
                v["error"]["code"], "invalid_api_key",
                "{method} {path} {auth:?}"
            );
        }
    }
    // Without the key, unknown paths and wrong methods are 401 too (not 404/405), so an
    // unauthenticated client learns nothing about the routes; with it they are 404/405.
    for (method, path, with_key) in [
        ("GET", "/v1/nothing", 404),
        ("POST", "/health/x", 404),
        ("GET", "/v1/images/generations", 405),
        ("DELETE", "/v1/models", 405),
        ("PUT", "/metrics", 405),
    ] {
        let r = c
            .request(method.parse().unwrap(), srv.url(path))
            .send()
            .await
            .unwrap();
        let v = expect_error(r, 401, None).await;
        assert_eq!(v["error"]["code"], "invalid_api_key", "{method} {path}");
        let r = c
            .request(method.parse().unwrap(), srv.url(path))
            .bearer_auth("s3cret-key")
            .send()
            .await
            .unwrap();
        expect_error(r, with_key, None).await;
    }
    assert_eq!(
        reqwest::get(srv.url("/health")).await.unwrap().status(),
        200
    );
    assert_eq!(reqwest::get(srv.url("/")).await.unwrap().status(), 200);
    let r = c
        .post(srv.url("/v1/images/generations"))
        .bearer_auth("s3cret-key")
        .json(&json!({"prompt": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(srv.url("/metrics"))
        .bearer_auth("s3cret-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The scheme name is case-insensitive (RFC 7235).
    let r = c
        .get(srv.url("/metrics"))
        .header("authorization", "bearer s3cret-key")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(srv.record.started(), vec!["a"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_queue_answers_429_with_retry_after() {
    let srv = TestServer::start(config(|l| l.max_queue = 2)).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let running = spawn_post(&c, &url, json!({"prompt": "hold"}));
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    let q1 = spawn_post(&c, &url, json!({"prompt": "q1"}));
    srv.wait_health("one queued", |h| h["queue_depth"] == 1)
        .await;
    let q2 = spawn_post(&c, &url, json!({"prompt": "q2"}));
    srv.wait_health("two queued", |h| h["queue_depth"] == 2)
        .await;
    let r = post(&c, &url, json!({"prompt": "q3"})).await;
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let v = expect_error(r, 429, None).await;
    assert_eq!(v["error"]["type"], "rate_limit_error");
    srv.record.release();
    for h in [running, q1, q2] {
        assert_eq!(h.await.unwrap().status(), 200);
    }
    assert_eq!(srv.record.started(), vec!["hold", "q1", "q2"]);
    let m = srv.metrics().await;
    assert_eq!(
        sample(
            &m,
            "hybridiff_http_requests_total{route=\"/v1/images/generations\",status=\"429\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&m, "hybridiff_images_generated_total"), Some(3.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn timeouts_drop_queued_jobs_and_cancel_running_ones() {
    let srv = TestServer::start(config(|l| l.request_timeout = Duration::from_millis(700))).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    // A job that ignores cancellation keeps the ranks busy past every timeout below.
    let stubborn = spawn_post(&c, &url, json!({"prompt": "stubborn"}));
    srv.wait_health("the stubborn job to run", |h| h["running"] == true)
        .await;
    let queued = post(&c, &url, json!({"prompt": "never"})).await;
    let v = expect_error(queued, 504, None).await;
    assert_eq!(v["error"]["code"], "timeout");
    let v = expect_error(stubborn.await.unwrap(), 504, None).await;
    assert_eq!(v["error"]["code"], "timeout");
    srv.wait_health("the queue to empty", |h| h["queue_depth"] == 0)
        .await;
    srv.record.release();
    srv.wait_health("idle", |h| h["running"] == false).await;
    assert_eq!(
        srv.record.started(),
        vec!["stubborn"],
        "the queued one never ran"
    );
    let m = srv.metrics().await;
    assert_eq!(sample(&m, "hybridiff_queue_dropped_total"), Some(1.0));

    // A running job that times out is cancelled; the service goes on.
    let srv = TestServer::start(config(|l| l.request_timeout = Duration::from_millis(300))).await;
    let r = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "hold"}),
    )
    .await;
    expect_error(r, 504, None).await;
    srv.wait_health("idle", |h| h["running"] == false).await;
    assert_eq!(
        srv.record
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    let m = srv.metrics().await;
    assert_eq!(
        sample(&m, "hybridiff_jobs_total{outcome=\"cancelled\"}"),
        Some(1.0)
    );
    let r = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "after"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(srv.record.started(), vec!["hold", "after"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_while_queued_is_dropped() {
    let srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let running = spawn_post(&c, &url, json!({"prompt": "hold"}));
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    // A raw socket, so the disconnect is exactly a close after the request is sent.
    let addr = srv.base.trim_start_matches("http://").to_string();
    let body = json!({"prompt": "leaver"}).to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    srv.wait_health("the leaver to queue", |h| h["queue_depth"] == 1)
        .await;
    drop(sock);
    srv.wait_health("the leaver to be dropped", |h| h["queue_depth"] == 0)
        .await;
    srv.record.release();
    assert_eq!(running.await.unwrap().status(), 200);
    let r = post(&c, &url, json!({"prompt": "next"})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        srv.record.started(),
        vec!["hold", "next"],
        "the leaver never ran"
    );
    let m = srv.metrics().await;
    assert_eq!(sample(&m, "hybridiff_queue_dropped_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_job_answers_500_and_the_service_goes_on() {
    let srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let r = post(&c, &url, json!({"prompt": "fail"})).await;
    let v = expect_error(r, 500, None).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("rank 1") && msg.contains("NaN"), "{msg}");
    let r = post(&c, &url, json!({"prompt": "panic"})).await;
    let v = expect_error(r, 500, None).await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("injected panic"));
    let r = post(&c, &url, json!({"prompt": "fine"})).await;
    assert_eq!(r.status(), 200);
    let m = srv.metrics().await;
    assert_eq!(
        sample(&m, "hybridiff_jobs_total{outcome=\"failed\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&m, "hybridiff_jobs_total{outcome=\"ok\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stopping_finishes_the_running_job_and_answers_the_queue_503() {
    let mut srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let running = spawn_post(&c, &url, json!({"prompt": "hold"}));
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    let q1 = spawn_post(&c, &url, json!({"prompt": "q1"}));
    let q2 = spawn_post(&c, &url, json!({"prompt": "q2"}));
    srv.wait_health("two queued", |h| h["queue_depth"] == 2)
        .await;
    srv.stop();
    for q in [q1, q2] {
        let v = expect_error(q.await.unwrap(), 503, None).await;
        assert_eq!(v["error"]["code"], "shutting_down");
    }
    srv.record.release();
    let r = running.await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    decode_b64_png(v["data"][0]["b64_json"].as_str().unwrap());
    let done = srv.done.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("serve returns after the running job")
        .unwrap()
        .unwrap();
    assert_eq!(srv.record.started(), vec!["hold"]);
    assert!(
        reqwest::get(srv.url("/health")).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_true_sends_queued_progress_and_completed_events() {
    let srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let r = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "a", "stream": true, "num_inference_steps": 6, "n": 2}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let text = r.text().await.unwrap();
    let events: Vec<(String, Value)> = text
        .split("\n\n")
        .filter_map(|block| {
            let name = block.lines().find_map(|l| l.strip_prefix("event: "))?;
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((name.to_string(), serde_json::from_str(data).unwrap()))
        })
        .collect();
    assert_eq!(events[0].0, "queued");
    assert_eq!(events[0].1["position"], 0);
    let progress: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, v)| v)
        .collect();
    assert!(!progress.is_empty(), "{text}");
    assert!(progress.iter().all(|p| p["steps"] == 6 && p["images"] == 2));
    let (last, body) = events.last().unwrap();
    assert_eq!(last, "completed", "{text}");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    decode_b64_png(body["data"][1]["b64_json"].as_str().unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn max_queue_0_runs_only_on_idle_ranks() {
    let srv = TestServer::start(config(|l| l.max_queue = 0)).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let running = spawn_post(&c, &url, json!({"prompt": "hold"}));
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    let r = post(&c, &url, json!({"prompt": "busy"})).await;
    expect_error(r, 429, None).await;
    srv.record.release();
    assert_eq!(running.await.unwrap().status(), 200);
    let r = post(&c, &url, json!({"prompt": "idle again"})).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_half_sent_request_does_not_hold_the_exit() {
    // Timeouts far beyond the bound below: the exit does not wait for them, as the
    // connection has no request in flight.
    let mut srv = TestServer::start(config(|l| {
        l.request_timeout = Duration::from_secs(600);
        l.header_timeout = Duration::from_secs(60);
    }))
    .await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\n"
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t0 = std::time::Instant::now();
    srv.stop();
    let done = srv.done.take().unwrap();
    tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("serve returns without waiting for the half-sent request")
        .unwrap()
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    drop(sock);
}

/// Reads what the server sends until it closes the connection (or `limit` passes: then
/// panics), returning the bytes and when the close came.
async fn read_until_closed(
    sock: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (Vec<u8>, std::time::Instant) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, sock.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open {limit:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, std::time::Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client without a connection pool, so that no request rides a connection the server
/// is about to close.
fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_by_the_header_and_body_timeouts_while_others_are_served() {
    use tokio::io::AsyncWriteExt;
    let (head_t, body_t) = (Duration::from_millis(600), Duration::from_millis(800));
    let srv = TestServer::start(config(|l| {
        l.header_timeout = head_t;
        l.body_timeout = body_t;
    }))
    .await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    let t0 = std::time::Instant::now();
    // Slowloris: half a head, never finished.
    let mut half_head = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half_head
        .write_all(format!("POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n").as_bytes())
        .await
        .unwrap();
    // A whole head, then 10 of the 100 body bytes it announces.
    let mut half_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    half_body
        .write_all(
            format!(
                "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\":"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // A client that connects and says nothing.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // Others are served meanwhile.
    let c = fresh_client();
    let r = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "a"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(
        t0.elapsed() < head_t,
        "served before the slow ones time out ({:?}); the test needs a faster machine",
        t0.elapsed()
    );

    let (got, closed) = read_until_closed(&mut half_head, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    let after = closed - t0;
    assert!(
        after >= head_t - Duration::from_millis(100) && after < head_t + Duration::from_secs(3),
        "half a head closed after {after:?}; --header-timeout is {head_t:?}"
    );

    let (got, _) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(got.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");

    let (got, closed) = read_until_closed(&mut half_body, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(
        text.contains("\"code\":\"body_timeout\"") && text.contains("--body-timeout"),
        "{text}"
    );
    let after = closed - t0;
    assert!(
        after >= body_t - Duration::from_millis(100) && after < body_t + Duration::from_secs(3),
        "half a body answered after {after:?}; --body-timeout is {body_t:?}"
    );

    let m = srv.metrics().await;
    let route = "route=\"/v1/images/generations\"";
    assert_eq!(
        sample(
            &m,
            &format!("hybridiff_http_requests_total{{{route},status=\"408\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(srv.record.started(), vec!["a"], "no slow request ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn beyond_max_connections_a_connection_waits_for_a_free_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = TestServer::start(config(|l| {
        l.max_connections = 2;
        l.header_timeout = Duration::from_secs(60);
    }))
    .await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    // Two idle connections take both slots (accepted in the order they connected).
    let first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(
            format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let waited = tokio::time::timeout(Duration::from_millis(800), third.read(&mut buf)).await;
    assert!(
        waited.is_err(),
        "a third connection was served past --max-connections 2: {waited:?}"
    );
    // A slot frees: the waiting connection is served, not refused.
    drop(first);
    let (got, _) = read_until_closed(&mut third, Duration::from_secs(10)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_that_leave_are_counted_499_and_the_request_metrics_add_up() {
    let srv = TestServer::start(Config::default()).await;
    let c = fresh_client();
    let url = srv.url("/v1/images/generations");
    let addr = srv.base.trim_start_matches("http://").to_string();
    let raw_post = |prompt: &str| {
        let body = json!({ "prompt": prompt }).to_string();
        let mut sock = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            sock,
            "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        sock
    };
    // One leaves while its job runs, one while queued.
    let running = raw_post("hold");
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    let queued = raw_post("queued");
    srv.wait_health("one queued", |h| h["queue_depth"] == 1)
        .await;
    drop(queued);
    srv.wait_health("the queued one dropped", |h| h["queue_depth"] == 0)
        .await;
    drop(running);
    srv.wait_health("the running one cancelled", |h| h["running"] == false)
        .await;
    assert_eq!(
        srv.record
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    // Answered ones.
    assert_eq!(
        post(&c, &url, json!({"prompt": "fine"})).await.status(),
        200
    );
    assert_eq!(post(&c, &url, json!({"n": 99})).await.status(), 400);
    let sent = 4.0;
    let route = "route=\"/v1/images/generations\"";
    let t0 = std::time::Instant::now();
    let m = loop {
        let m = srv.metrics().await;
        if sum_samples(&m, "hybridiff_http_requests_total", route) >= sent
            || t0.elapsed() > Duration::from_secs(10)
        {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let by = |status: &str| {
        sample(
            &m,
            &format!("hybridiff_http_requests_total{{{route},status=\"{status}\"}}"),
        )
    };
    assert_eq!(by("499"), Some(2.0), "{m}");
    assert_eq!(by("200"), Some(1.0), "{m}");
    assert_eq!(by("400"), Some(1.0), "{m}");
    assert_eq!(
        sum_samples(&m, "hybridiff_http_requests_total", route),
        sent,
        "every request received is counted under exactly one status:\n{m}"
    );
    assert_eq!(
        sample(
            &m,
            &format!("hybridiff_http_request_duration_seconds_count{{{route}}}")
        ),
        Some(sent)
    );
    assert_eq!(sample(&m, "hybridiff_queue_dropped_total"), Some(1.0));
    assert_eq!(
        sample(&m, "hybridiff_jobs_total{outcome=\"cancelled\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_the_backend_cannot_fit_is_400_on_size_before_it_queues() {
    let srv = TestServer::start(Config::default()).await;
    let c = fresh_client();
    let url = srv.url("/v1/images/generations");
    // The ranks are busy, so an answer now means the request never queued.
    let running = spawn_post(&c, &url, json!({"prompt": "hold"}));
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    // Within --max-pixels (1048576) but beyond what the backend fits.
    let r = post(
        &c,
        &url,
        json!({"prompt": "big", "size": "512x512", "n": 2}),
    )
    .await;
    let v = expect_error(r, 400, Some("size")).await;
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("512x512") && msg.contains("needs an estimated"),
        "{msg}"
    );
    assert_eq!(srv.health().await["queue_depth"], 0);
    srv.record.release();
    assert_eq!(running.await.unwrap().status(), 200);
    assert_eq!(srv.record.started(), vec!["hold"], "the big one never ran");
    // What fits still runs.
    let r = post(&c, &url, json!({"prompt": "fits", "size": "256x256"})).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_its_answers_loses_its_connection_after_write_timeout() {
    use tokio::io::AsyncWriteExt;
    let write_t = Duration::from_millis(800);
    let srv = TestServer::start(config(|l| {
        l.max_connections = 1;
        l.write_timeout = write_t;
        l.header_timeout = Duration::from_secs(60);
    }))
    .await;
    let addr = srv.base.trim_start_matches("http://").to_string();
    // A 197 kB PNG (random pixels), stored for `url`.
    let c = fresh_client();
    let v: Value = post(
        &c,
        &srv.url("/v1/images/generations"),
        json!({"prompt": "noise", "size": "256x256", "response_format": "url"}),
    )
    .await
    .json()
    .await
    .unwrap();
    let path = v["data"][0]["url"]
        .as_str()
        .unwrap()
        .trim_start_matches(&srv.base)
        .to_string();
    drop(c);
    // The one connection slot goes to a client with a small receive buffer that asks for
    // the image 40 times (8 MB, far more than the socket buffers hold) and never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut never_reads = sock.connect(addr.parse().unwrap()).await.unwrap();
    let one = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    never_reads
        .write_all(one.repeat(40).as_bytes())
        .await
        .unwrap();
    // Once its write has made no progress for --write-timeout, the slot is free again.
    let t0 = std::time::Instant::now();
    let r = fresh_client()
        .get(srv.url("/health"))
        .send()
        .await
        .unwrap_or_else(|e| {
            panic!(
                "a client that never reads held the only connection slot for {:?}: {e}",
                t0.elapsed()
            )
        });
    assert_eq!(r.status(), 200);
    assert!(
        t0.elapsed() < write_t + Duration::from_secs(5),
        "served after {:?}; --write-timeout is {write_t:?}",
        t0.elapsed()
    );
    drop(never_reads);
}
