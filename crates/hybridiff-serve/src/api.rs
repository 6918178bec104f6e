//! The wire format: OpenAI's images API (`POST /v1/images/generations`) with hybridiff's
//! extensions, and OpenAI's error shape.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::backend::{BackendInfo, ImageJob};
use crate::Limits;

/// An error answer: `{"error": {"message", "type", "param", "code"}}` with its HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`,
    /// `server_error`.
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After` (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// 400 naming the field.
    pub fn bad_field(param: &str, message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message);
        e.param = Some(param.to_string());
        e.code = Some("invalid_value");
        e
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 with a `code`.
    pub fn bad_request_code(message: impl Into<String>, code: &'static str) -> Self {
        let mut e = Self::bad_request(message);
        e.code = Some(code);
        e
    }

    /// 403: a request this service does not take from where it comes (its Host, its Origin).
    pub fn forbidden(message: impl Into<String>, code: &'static str) -> Self {
        let mut e = Self::new(StatusCode::FORBIDDEN, "invalid_request_error", message);
        e.code = Some(code);
        e
    }

    /// 415: a body that is not declared as JSON.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            message,
        );
        e.code = Some("unsupported_media_type");
        e
    }

    /// 414: a request target longer than `limit` bytes.
    pub fn uri_too_long(len: usize, limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::URI_TOO_LONG,
            "invalid_request_error",
            format!("the request target is {len} bytes long; at most {limit}"),
        );
        e.code = Some("uri_too_long");
        e
    }

    /// The answer to a request the HTTP layer refused before any route saw it (`status` is
    /// hyper's: 400 for a malformed head, 414 for a target too long to parse, 431 for too
    /// many or too large headers; 408 for a head that did not arrive in time).
    pub fn http_layer(status: StatusCode) -> Self {
        let (message, code) = match status.as_u16() {
            408 => (
                "the request head did not arrive within this service's header timeout",
                "header_timeout",
            ),
            414 => ("the request target is too long", "uri_too_long"),
            431 => (
                "the request head is too large (too many headers, or headers too long)",
                "headers_too_large",
            ),
            505 => (
                "this service speaks HTTP/1.1 (and 1.0) only",
                "http_version",
            ),
            _ => (
                "the request could not be parsed as HTTP/1.1 (a malformed request line, header or \
                 body framing)",
                "malformed_request",
            ),
        };
        let kind = if status.is_server_error() {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let mut e = Self::new(status, kind, message);
        e.code = Some(code);
        e
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message);
        e.code = Some("invalid_api_key");
        e
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::NOT_FOUND, "invalid_request_error", message);
        e.code = Some("not_found");
        e
    }

    pub fn too_large(limit: usize) -> Self {
        let mut e = Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("request body larger than {limit} bytes (--max-body-bytes)"),
        );
        e.code = Some("request_too_large");
        e
    }

    pub fn queue_full(retry_after: u64, max_queue: usize) -> Self {
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the job queue is full ({max_queue} waiting, --max-queue); retry in about {retry_after} s"
            ),
        );
        e.code = Some("queue_full");
        e.retry_after = Some(retry_after);
        e
    }

    pub fn shutting_down() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the service is shutting down; this request was not run",
        );
        e.code = Some("shutting_down");
        e
    }

    /// 503: the service stopped (Ctrl-C) while this request's job ran; the job was
    /// cancelled.
    pub fn stopped() -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the service is stopping; this request's job was cancelled",
        );
        e.code = Some("shutting_down");
        e
    }

    pub fn timeout(seconds: f64) -> Self {
        let mut e = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            format!("no image within the request timeout of {seconds} s (--request-timeout)"),
        );
        e.code = Some("timeout");
        e
    }

    /// 408: the body did not arrive in time; the connection is closed after the answer.
    pub fn body_timeout(seconds: f64) -> Self {
        let mut e = Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!("the request body did not arrive within {seconds} s (--body-timeout)"),
        );
        e.code = Some("body_timeout");
        e
    }

    /// 499 (nginx's "client closed request"): the client closed the connection before its
    /// answer. Nobody reads it; it is what the metrics count.
    pub fn client_closed() -> Self {
        let mut e = Self::new(
            StatusCode::from_u16(499).expect("499 is a valid status code"),
            "invalid_request_error",
            "the client closed the connection before the request was complete",
        );
        e.code = Some("client_closed_request");
        e
    }

    /// 500 for a fault of the service itself (not of the request nor of a job).
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn job_failed(message: &str) -> Self {
        let mut e = Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            format!("the image job failed: {message}"),
        );
        e.code = Some("job_failed");
        e
    }

    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method not allowed on this route",
        )
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of a late body may still come; it is not read.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// How images come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

/// A checked `POST /v1/images/generations` body.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// One job per image; seeds `seed`, `seed + 1`, ...
    pub jobs: Vec<ImageJob>,
    pub response_format: ResponseFormat,
    /// `stream: true`: answer as server-sent events with per-step progress (hybridiff's
    /// extension; the web page uses it).
    pub stream: bool,
    /// Whether the seed came from the request (else it was drawn at random).
    pub seed_given: bool,
}

/// The fields we accept; anything else is rejected by name.
const FIELDS: &[&str] = &[
    "prompt",
    "n",
    "size",
    "response_format",
    "model",
    "user",
    "negative_prompt",
    "seed",
    "noise",
    "num_inference_steps",
    "guidance_scale",
    "stream",
    // OpenAI's own image options, accepted and ignored so that existing clients work.
    "quality",
    "style",
];

/// Whether `model` names one of OpenAI's image models, which clients send by default: served
/// by this service's model, as any OpenAI-compatible server would.
fn is_openai_image_model(model: &str) -> bool {
    model.starts_with("dall-e") || model.starts_with("gpt-image")
}

fn opt_str<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::bad_field(k, format!("`{k}` must be a string"))),
    }
}

fn opt_uint(m: &Map<String, Value>, k: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if (lo..=hi).contains(&x) => Ok(Some(x)),
            _ => Err(ApiError::bad_field(
                k,
                format!("`{k}` must be an integer from {lo} to {hi}; got {v}"),
            )),
        },
    }
}

fn check_text(k: &str, s: &str, max_chars: usize) -> Result<(), ApiError> {
    let n = s.chars().count();
    if n > max_chars {
        return Err(ApiError::bad_field(
            k,
            format!("`{k}` has {n} characters; this service takes at most {max_chars}"),
        ));
    }
    Ok(())
}

/// `WxH` (or `auto`) checked against the model's multiple and `--max-pixels`.
fn parse_size(s: &str, info: &BackendInfo, limits: &Limits) -> Result<(u32, u32), ApiError> {
    if s == "auto" {
        return Ok(info.default_size);
    }
    let bad = || {
        ApiError::bad_field(
            "size",
            format!(
                "`size` must be \"WIDTHxHEIGHT\" in pixels (e.g. \"{}x{}\") or \"auto\"; got {s:?}",
                info.default_size.0, info.default_size.1
            ),
        )
    };
    let (w, h) = s.split_once('x').ok_or_else(bad)?;
    // `parse` alone would take "+64".
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(w) || !digits(h) {
        return Err(bad());
    }
    let (w, h): (u32, u32) = (w.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if w == 0 || h == 0 {
        return Err(ApiError::bad_field(
            "size",
            format!("`size` {w}x{h}: width and height must be positive"),
        ));
    }
    // What the model takes (multiples of its VAE factor, what fits in memory, the
    // strategy's layout) is the backend's request check: the engine's own checks.
    let pixels = w as u64 * h as u64;
    if pixels > limits.max_pixels {
        return Err(ApiError::bad_field(
            "size",
            format!(
                "`size` {w}x{h} is {pixels} pixels; this service takes at most {}",
                limits.max_pixels
            ),
        ));
    }
    Ok((w, h))
}

/// Parses and checks a request body; every error names the field.
pub fn parse_generation(
    body: &[u8],
    info: &BackendInfo,
    limits: &Limits,
) -> Result<GenerationRequest, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    };
    if let Some(k) = m.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(ApiError::bad_field(
            k,
            format!("unknown parameter `{k}`; accepted: {}", FIELDS.join(", ")),
        ));
    }
    let prompt = opt_str(&m, "prompt")?
        .ok_or_else(|| ApiError::bad_field("prompt", "`prompt` is required"))?;
    if prompt.trim().is_empty() {
        return Err(ApiError::bad_field("prompt", "`prompt` is empty"));
    }
    check_text("prompt", prompt, limits.max_prompt_chars)?;
    // Absent (or null) is diffusers' None; "" is encoded, as `generate --negative-prompt ""`.
    let negative = opt_str(&m, "negative_prompt")?;
    if let Some(n) = negative {
        check_text("negative_prompt", n, limits.max_prompt_chars)?;
    }
    opt_str(&m, "quality")?;
    opt_str(&m, "style")?;
    if let Some(model) = opt_str(&m, "model")? {
        if model != info.model_id && !is_openai_image_model(model) {
            let mut e = ApiError::not_found(format!(
                "the model `{model}` does not exist; this service has `{}`",
                info.model_id
            ));
            e.param = Some("model".into());
            e.code = Some("model_not_found");
            return Err(e);
        }
    }
    opt_str(&m, "user")?; // accepted and ignored, as OpenAI's is for abuse tracking
    let n = opt_uint(&m, "n", 1, limits.max_n as u64)?.unwrap_or(1) as usize;
    let (width, height) = match opt_str(&m, "size")? {
        Some(s) => parse_size(s, info, limits)?,
        None => info.default_size,
    };
    let response_format = match opt_str(&m, "response_format")? {
        None | Some("b64_json") => ResponseFormat::B64Json,
        Some("url") => ResponseFormat::Url,
        Some(other) => {
            return Err(ApiError::bad_field(
                "response_format",
                format!("`response_format` must be \"b64_json\" or \"url\"; got {other:?}"),
            ))
        }
    };
    // A `url` answer's links must all be live when it is sent: its images go into the
    // store together and push out older ones only.
    if response_format == ResponseFormat::Url && n > limits.max_stored_images {
        return Err(ApiError::bad_field(
            "n",
            format!(
                "`n` {n} with `response_format` \"url\": this service keeps {} images for links",
                limits.max_stored_images
            ),
        ));
    }
    let steps = opt_uint(&m, "num_inference_steps", 1, limits.max_steps as u64)?
        .map(|s| s as usize)
        .unwrap_or(info.default_steps);
    if steps > limits.max_steps {
        return Err(ApiError::bad_field(
            "num_inference_steps",
            format!(
                "the service's default of {steps} steps is above its limit of {}; give `num_inference_steps`",
                limits.max_steps
            ),
        ));
    }
    let guidance = match m.get("guidance_scale") {
        None | Some(Value::Null) => info.default_guidance,
        Some(v) => match v.as_f64() {
            Some(g) if g.is_finite() && (0.0..=limits.max_guidance).contains(&g) => g,
            _ => {
                return Err(ApiError::bad_field(
                    "guidance_scale",
                    format!(
                        "`guidance_scale` must be a number from 0 to {}; got {v}",
                        limits.max_guidance
                    ),
                ))
            }
        },
    };
    let (seed, seed_given) = match opt_uint(&m, "seed", 0, u64::MAX - limits.max_n as u64)? {
        Some(s) => (s, true),
        // 53 bits, so that JavaScript clients (the page, openai-node) keep it exact.
        None => (rand::random::<u64>() >> 11, false),
    };
    let noise = match m.get("noise") {
        None | Some(Value::Null) => hybridiff_engine::pipeline::NoiseKind::default(),
        Some(Value::String(v)) => v
            .parse()
            .map_err(|e: String| ApiError::bad_field("noise", format!("`noise` {e}")))?,
        Some(_) => {
            return Err(ApiError::bad_field(
                "noise",
                "`noise` must be \"chacha8\" or \"torch\"",
            ))
        }
    };
    let stream = match m.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_field(
                "stream",
                "`stream` must be true or false",
            ))
        }
    };
    let jobs = (0..n)
        .map(|i| ImageJob {
            prompt: prompt.to_string(),
            negative_prompt: negative.map(str::to_string),
            seed: seed + i as u64,
            noise,
            steps,
            guidance,
            width,
            height,
        })
        .collect();
    Ok(GenerationRequest {
        jobs,
        response_format,
        stream,
        seed_given,
    })
}
