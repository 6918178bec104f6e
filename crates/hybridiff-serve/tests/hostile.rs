//! The service against hostile and careless clients (issue 28), over real sockets on
//! 127.0.0.1 with the scripted backend: a keyless service that web pages cannot drive
//! (Host, Origin, JSON only, duplicate headers, security headers, links from accepted hosts
//! only), requests the backend would refuse answered before they queue, every request
//! answered and counted (half-closed clients, refusals of the HTTP layer, streams that end
//! in an error), and Ctrl-C's stop.

mod common;

use std::time::Duration;

use common::{post, post_bytes, sample, TestServer, FAKE_MAX_FIT, FAKE_MIN_STEPS};
use hybridiff_serve::{Config, Limits, Stop};
use serde_json::{json, Value};

fn config(f: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::default();
    f(&mut c);
    c
}

fn limits(f: impl FnOnce(&mut Limits)) -> Config {
    config(|c| f(&mut c.limits))
}

/// OpenAI's error shape with `status` and `code`.
fn expect_error(status: u16, v: &Value, want_status: u16, code: &str) {
    assert_eq!(status, want_status, "{v}");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string() && e.get("param").is_some(), "{v}");
    assert_eq!(e["code"], code, "{v}");
}

const JSON: &str = "Content-Type: application/json\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn a_keyless_service_takes_no_request_a_web_page_could_forge() {
    let srv = TestServer::start(Config::default()).await;
    let port = srv.addr.rsplit(':').next().unwrap().to_string();
    let body = json!({"prompt": "a"}).to_string();
    // The issue's example: a form-like POST from another site, through a rebound name.
    let r = srv
        .raw(
            &post_bytes(
                "evil.example",
                &body,
                "Content-Type: text/plain\r\nOrigin: http://evil.example\r\n",
            ),
            false,
        )
        .await;
    let (status, v) = r.json();
    expect_error(status, &v, 403, "host_not_allowed");
    // Each member on its own, everything else right.
    let evil_host = [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.nip.io:{port}"),
        format!("localhost:{}", port.parse::<u16>().unwrap() + 1),
        "localhost".to_string(),
    ];
    for host in &evil_host {
        let (status, v) = srv.raw(&post_bytes(host, &body, JSON), false).await.json();
        expect_error(status, &v, 403, "host_not_allowed");
    }
    for bad in ["", "user@127.0.0.1", "local host", "[::1"] {
        let (status, v) = srv.raw(&post_bytes(bad, &body, JSON), false).await.json();
        assert_eq!(status, 400, "Host {bad:?}: {v}");
    }
    let no_host = format!(
        "POST /v1/images/generations HTTP/1.0\r\n{JSON}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, v) = srv.raw(no_host.as_bytes(), false).await.json();
    expect_error(status, &v, 400, "missing_host");
    let own = srv.addr.clone();
    for origin in [
        "http://evil.example".to_string(),
        "null".to_string(),
        format!("http://evil.example:{port}"),
        format!("http://localhost:{}", port.parse::<u16>().unwrap() + 1),
        "file://".to_string(),
        format!("http://{own}/path"),
    ] {
        let extra = format!("{JSON}Origin: {origin}\r\n");
        let (status, v) = srv
            .raw(&post_bytes(&own, &body, &extra), false)
            .await
            .json();
        expect_error(status, &v, 403, "origin_not_allowed");
    }
    // What an HTML form (or a no-cors fetch) can send is not JSON.
    for ct in [
        Some("text/plain"),
        Some("text/plain; charset=utf-8"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/json; charset=latin1"),
        None,
    ] {
        let extra = ct
            .map(|c| format!("Content-Type: {c}\r\n"))
            .unwrap_or_default();
        let (status, v) = srv
            .raw(&post_bytes(&own, &body, &extra), false)
            .await
            .json();
        expect_error(status, &v, 415, "unsupported_media_type");
    }
    assert!(srv.record.started().is_empty(), "no refused request ran");
    // The service's own names and pages.
    for (host, origin) in [
        (own.clone(), None),
        (format!("localhost:{port}"), None),
        (format!("[::1]:{port}"), None),
        (own.clone(), Some(format!("http://{own}"))),
        (own.clone(), Some(format!("http://localhost:{port}"))),
    ] {
        let extra = match &origin {
            Some(o) => format!("Content-Type: application/json; charset=utf-8\r\nOrigin: {o}\r\n"),
            None => JSON.to_string(),
        };
        let (status, v) = srv
            .raw(&post_bytes(&host, &body, &extra), false)
            .await
            .json();
        assert_eq!(status, 200, "Host {host} Origin {origin:?}: {v}");
    }
    let m = srv.metrics().await;
    let route = "route=\"/v1/images/generations\"";
    let by = |s: &str| {
        sample(
            &m,
            &format!("hybridiff_http_requests_total{{{route},status=\"{s}\"}}"),
        )
    };
    assert_eq!(by("403"), Some(13.0), "{m}");
    assert_eq!(by("415"), Some(6.0), "{m}");
    assert_eq!(by("200"), Some(5.0), "{m}");
}

#[tokio::test(flavor = "multi_thread")]
async fn allowed_hosts_extend_the_names_and_links_use_the_accepted_host() {
    let srv = TestServer::start(config(|c| {
        c.allowed_hosts = vec!["images.example".into(), "tunnel.example:9000".into()];
    }))
    .await;
    let port = srv.addr.rsplit(':').next().unwrap().to_string();
    let body = json!({"prompt": "a", "response_format": "url"}).to_string();
    for (host, origin, ok) in [
        ("images.example", None, true),
        ("images.example:443", Some("https://images.example"), true),
        (
            "tunnel.example:9000",
            Some("http://tunnel.example:9000"),
            true,
        ),
        ("tunnel.example", None, false),
        ("other.example", None, false),
    ] {
        let extra = match origin {
            Some(o) => format!("{JSON}Origin: {o}\r\n"),
            None => JSON.to_string(),
        };
        let (status, v) = srv
            .raw(&post_bytes(host, &body, &extra), false)
            .await
            .json();
        if !ok {
            expect_error(status, &v, 403, "host_not_allowed");
            continue;
        }
        assert_eq!(status, 200, "{host}: {v}");
        // The link names the host the request was accepted with, and is live.
        let url = v["data"][0]["url"].as_str().unwrap();
        let want = format!("http://{host}/v1/images/files/");
        assert!(url.starts_with(&want), "{url} for Host {host}");
        let path = url.trim_start_matches(&format!("http://{host}"));
        let get =
            format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n");
        let (_, status, headers, _) = srv.raw(get.as_bytes(), false).await.answer();
        assert_eq!(status, 200);
        assert!(headers.contains(&("content-type".into(), "image/png".into())));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_that_must_be_single_are_400_when_repeated() {
    let srv = TestServer::start(config(|c| c.api_key = Some("k-1".into()))).await;
    let own = srv.addr.clone();
    let body = json!({"prompt": "a"}).to_string();
    for extra in [
        // The right key first or second: neither wins.
        format!("{JSON}Authorization: Bearer k-1\r\nAuthorization: Bearer wrong\r\n"),
        format!("{JSON}Authorization: Bearer wrong\r\nAuthorization: Bearer k-1\r\n"),
        format!("{JSON}Authorization: Bearer k-1\r\nAuthorization: Bearer k-1\r\n"),
        format!("{JSON}Authorization: Bearer k-1\r\nHost: {own}\r\n"),
        format!("{JSON}Content-Type: text/plain\r\nAuthorization: Bearer k-1\r\n"),
        format!(
            "{JSON}Authorization: Bearer k-1\r\nOrigin: http://{own}\r\nOrigin: http://{own}\r\n"
        ),
    ] {
        let (status, v) = srv
            .raw(&post_bytes(&own, &body, &extra), false)
            .await
            .json();
        expect_error(status, &v, 400, "duplicate_header");
    }
    // Two different Content-Lengths: hyper refuses the head (two equal ones it folds into
    // one); the answer still has the error shape.
    let differ = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: {own}\r\n{JSON}Content-Length: {}\r\nContent-Length: 3\r\n\r\n{body}",
        body.len()
    );
    let (status, v) = srv.raw(differ.as_bytes(), false).await.json();
    expect_error(status, &v, 400, "malformed_request");
    assert!(srv.record.started().is_empty());
    let ok = format!("{JSON}Authorization: Bearer k-1\r\n");
    let (status, _) = srv.raw(&post_bytes(&own, &body, &ok), false).await.json();
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_says_nosniff_no_framing_and_a_csp() {
    let srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let page = c.get(srv.url("/")).send().await.unwrap();
    let h = page.headers().clone();
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    let csp = h["content-security-policy"].to_str().unwrap().to_string();
    for part in [
        "default-src 'none'",
        "script-src 'sha256-",
        "style-src 'sha256-",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(part), "{part} missing from {csp}");
    }
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    // The hashes are those of the page's inline script and style.
    use base64::Engine as _;
    use sha2::Digest as _;
    let html = page.text().await.unwrap();
    let script = html
        .split("<script>")
        .nth(1)
        .and_then(|s| s.split("</script>").next())
        .unwrap();
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script));
    assert!(csp.contains(&format!("'sha256-{hash}'")), "{csp}");
    for r in [
        post(
            &c,
            &srv.url("/v1/images/generations"),
            json!({"prompt": "a"}),
        )
        .await,
        post(&c, &srv.url("/v1/images/generations"), json!({"n": 0})).await,
        c.get(srv.url("/v1/models")).send().await.unwrap(),
        c.get(srv.url("/nothing")).send().await.unwrap(),
        c.get(srv.url("/metrics")).send().await.unwrap(),
    ] {
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{}", r.url());
        assert_eq!(h["x-frame-options"], "DENY", "{}", r.url());
        assert!(h["content-security-policy"]
            .to_str()
            .unwrap()
            .contains("default-src 'none'"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn url_answers_never_link_to_images_already_gone() {
    // More images per request than the store keeps: refused when the service starts.
    let err = hybridiff_serve::Service::start(
        || unreachable!("the backend is not built"),
        limits(|l| {
            l.max_n = 4;
            l.max_stored_images = 3;
        }),
    )
    .err()
    .unwrap();
    assert!(
        err.contains("max-stored-images 3") && err.contains("max-n 4"),
        "{err}"
    );
    // A store of exactly n: every answer's links live when it is sent, also with answers
    // side by side.
    let srv = TestServer::start(limits(|l| {
        l.max_n = 3;
        l.max_stored_images = 3;
    }))
    .await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let answers: Vec<_> = (0..4)
        .map(|i| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move {
                post(
                    &c,
                    &url,
                    json!({"prompt": "a", "n": 3, "seed": i * 10, "response_format": "url"}),
                )
                .await
                .json::<Value>()
                .await
                .unwrap()
            })
        })
        .collect();
    let mut all = Vec::new();
    for a in answers {
        let v = a.await.unwrap();
        let links: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["url"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(links.len(), 3);
        all.push(links);
    }
    // The store holds one whole answer (the last one built), never a mix of answers.
    let mut live = Vec::new();
    for (i, links) in all.iter().enumerate() {
        for l in links {
            if c.get(l).send().await.unwrap().status() == 200 {
                live.push(i);
            }
        }
    }
    assert_eq!(live.len(), 3, "{live:?}");
    assert!(live.iter().all(|&i| i == live[0]), "{live:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_the_backend_would_refuse_is_400_before_it_queues_and_models_says_the_limits() {
    let srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let running = {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move { post(&c, &url, json!({"prompt": "hold"})).await })
    };
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    for (body, param) in [
        (
            json!({"prompt": "a", "num_inference_steps": 1}),
            "num_inference_steps",
        ),
        (json!({"prompt": "a", "size": "60x64"}), "size"),
        (json!({"prompt": "a", "size": "512x512"}), "size"),
    ] {
        let r = post(&c, &url, body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["param"], param, "{v}");
        assert_eq!(srv.health().await["queue_depth"], 0, "{body} queued");
    }
    srv.record.release();
    assert_eq!(running.await.unwrap().status(), 200);
    assert_eq!(srv.record.started(), vec!["hold"]);
    let v: Value = c
        .get(srv.url("/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let l = &v["data"][0]["hybridiff"]["limits"];
    assert_eq!(l["num_inference_steps"]["min"], FAKE_MIN_STEPS, "{l}");
    assert_eq!(l["num_inference_steps"]["max"], 150, "{l}");
    let side = (FAKE_MAX_FIT as f64).sqrt() as u32;
    assert_eq!(l["size"]["max_square"], format!("{side}x{side}"), "{l}");
    assert_eq!(l["size"]["min_square"], "8x8", "{l}");
    assert_eq!(l["n"]["max"], 4, "{l}");
    assert_eq!(l["guidance_scale"]["max"], 50.0, "{l}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_half_closes_still_gets_its_answer() {
    let srv = TestServer::start(Config::default()).await;
    let own = srv.addr.clone();
    // A quick answer, a refusal and a job that waits: each after the client's FIN.
    let (interim, status, _, body) = srv
        .raw(&post_bytes(&own, r#"{"prompt":"a","seed":3}"#, JSON), true)
        .await
        .answer();
    assert_eq!(status, 200, "{body}");
    // A quick answer normally goes out before the interim one would (a loaded machine may
    // take longer than its delay).
    assert!(interim.iter().all(|&s| s == 102), "{interim:?}");
    let v: Value = serde_json::from_str(&body).unwrap();
    common::decode_b64_png(v["data"][0]["b64_json"].as_str().unwrap());
    let (status, v) = srv
        .raw(&post_bytes(&own, r#"{"prompt":"a","n":0}"#, JSON), true)
        .await
        .json();
    assert_eq!(status, 400, "{v}");
    let rec = std::sync::Arc::clone(&srv.record);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        rec.release();
    });
    let r = srv
        .raw(&post_bytes(&own, r#"{"prompt":"hold"}"#, JSON), true)
        .await;
    let (interim, status, _, body) = r.answer();
    assert_eq!(status, 200, "{}", r.text());
    assert_eq!(
        interim,
        vec![102],
        "a late answer is announced once: {}",
        r.text()
    );
    assert!(body.contains("b64_json"));
    let m = srv.metrics().await;
    assert_eq!(
        sample(
            &m,
            "hybridiff_http_requests_total{route=\"/v1/images/generations\",status=\"200\"}"
        ),
        Some(2.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn refusals_of_the_http_layer_have_the_error_shape_and_are_counted() {
    let srv = TestServer::start(limits(|l| l.header_timeout = Duration::from_millis(500))).await;
    let own = srv.addr.clone();
    let many_headers: String = (0..120).map(|i| format!("X-H{i}: v\r\n")).collect();
    let big_header = format!("X-Big: {}\r\n", "a".repeat(70 * 1024));
    let long_target = format!("/v1/models?{}", "q".repeat(9 * 1024));
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"GARBAGE\r\n\r\n".to_vec(), 400, "malformed_request"),
        (
            format!("GET / HTTP/1.1\r\nHost: {own}\r\nBad Header: x\r\n\r\n").into_bytes(),
            400,
            "malformed_request",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: {own}\r\n{many_headers}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: {own}\r\n{big_header}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            format!("GET {long_target} HTTP/1.1\r\nHost: {own}\r\nConnection: close\r\n\r\n")
                .into_bytes(),
            414,
            "uri_too_long",
        ),
        // Half a head, then nothing: 408 after the header timeout.
        (
            format!("GET / HTTP/1.1\r\nHost: {own}\r\n").into_bytes(),
            408,
            "header_timeout",
        ),
    ];
    for (req, want, code) in &cases {
        let r = srv.raw(req, false).await;
        let (_, status, headers, body) = r.answer();
        let v: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{want} {code} {}: {e}: {:?}", req.len(), r.text()));
        expect_error(status, &v, *want, code);
        assert!(
            headers.contains(&("content-type".into(), "application/json".into()))
                && headers.contains(&("x-content-type-options".into(), "nosniff".into())),
            "{headers:?}"
        );
    }
    // A connection that says nothing is closed without an answer (there was no request).
    let r = srv.raw(b"", false).await;
    assert!(r.bytes.is_empty(), "{:?}", r.text());
    let m = srv.metrics().await;
    for (status, n) in [("400", 2.0), ("431", 2.0), ("408", 1.0)] {
        assert_eq!(
            sample(
                &m,
                &format!("hybridiff_http_requests_total{{route=\"unparsed\",status=\"{status}\"}}")
            ),
            Some(n),
            "{status}:\n{m}"
        );
    }
    assert_eq!(
        sample(
            &m,
            "hybridiff_http_requests_total{route=\"/v1/models\",status=\"414\"}"
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "hybridiff_http_request_duration_seconds_count{route=\"unparsed\"}"
        ),
        Some(5.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stream_that_ends_in_an_error_is_counted_under_that_error() {
    let srv = TestServer::start(limits(|l| l.request_timeout = Duration::from_millis(1000))).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    for (prompt, want) in [("fail", 500), ("hold", 504), ("fine", 200)] {
        let r = post(&c, &url, json!({"prompt": prompt, "stream": true})).await;
        assert_eq!(r.status(), 200, "the stream's head");
        let text = r.text().await.unwrap();
        let last = text
            .split("\n\n")
            .filter(|b| b.contains("event: "))
            .last()
            .unwrap()
            .to_string();
        if want == 200 {
            assert!(last.contains("event: completed"), "{text}");
        } else {
            assert!(
                last.contains("event: error") && last.contains(&format!("\"status\":{want}")),
                "{text}"
            );
        }
    }
    srv.record.release();
    let m = srv.metrics().await;
    let route = "route=\"/v1/images/generations\"";
    for (status, n) in [("500", 1.0), ("504", 1.0), ("200", 1.0)] {
        assert_eq!(
            sample(
                &m,
                &format!("hybridiff_http_requests_total{{{route},status=\"{status}\"}}")
            ),
            Some(n),
            "{status}:\n{m}"
        );
    }
    assert_eq!(
        common::sum_samples(&m, "hybridiff_http_requests_total", route),
        3.0,
        "each stream counted once:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_cancel_cancels_the_running_job_and_answers_everyone_503() {
    let mut srv = TestServer::start(Config::default()).await;
    let c = reqwest::Client::new();
    let url = srv.url("/v1/images/generations");
    let spawn = |body: Value| {
        let (c, url) = (c.clone(), url.clone());
        tokio::spawn(async move {
            let r = post(&c, &url, body).await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let running = spawn(json!({"prompt": "hold"}));
    srv.wait_health("the held job to run", |h| h["running"] == true)
        .await;
    let queued = spawn(json!({"prompt": "q"}));
    srv.wait_health("one queued", |h| h["queue_depth"] == 1)
        .await;
    srv.stop_with(Stop::Cancel);
    for h in [running, queued] {
        let (status, v) = h.await.unwrap();
        expect_error(status, &v, 503, "shutting_down");
    }
    let done = srv.done.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), done)
        .await
        .expect("serve returns once the cancelled job stopped")
        .unwrap()
        .unwrap();
    assert_eq!(
        srv.record
            .cancelled
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the held job saw the cancel flag (it was never released)"
    );
}
