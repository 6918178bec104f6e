//! What every request passes before its route: one of each header that must be single, a
//! `Host` this service answers to, an `Origin` of its own where a browser sends one, a
//! bounded target; and the headers every answer carries (nosniff, no framing, a
//! Content-Security-Policy).
//!
//! Why: without an API key, a loopback service is reachable from any web page its operator
//! opens. A page cannot read a cross-origin answer, but it can send a form (CSRF: `text/plain`
//! or form-encoded bodies, which the API refuses with 415) and, through DNS rebinding (its
//! own name resolving to 127.0.0.1), read answers as if it were same-origin: then its
//! requests carry `Host: evil.example`, refused here. A browser's cross-origin request
//! carries its page's `Origin`, refused unless it names this service.
//!
//! Which hosts are this service's ([`Hosts::allows`]):
//! - bound to one address: that address literally (`127.0.0.1:8000`, `[::1]:8000`), and when
//!   it is loopback also `localhost` and every loopback literal, each with the bound port
//!   (no port means 80);
//! - bound to every address (`0.0.0.0`, `::`): any IP literal with the bound port (an IP
//!   literal cannot be rebound to another machine's name) and `localhost`; names other than
//!   `localhost` only through `--allowed-host`;
//! - `--allowed-host NAME` (any port, or none: a reverse proxy's public name) or
//!   `--allowed-host NAME:PORT` (that port only), for names this service is reached by (a
//!   proxy, an SSH tunnel or container port mapping that changes the port).
//!
//! An `Origin` is allowed when its host and port (80 or 443 by scheme when absent) are, so
//! the service's own page (same origin) works and another site's does not; `Origin: null`
//! (sandboxed frames, `file://` pages) is refused.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};

use crate::api::ApiError;

/// The longest request target (path and query) in bytes; longer gets 414.
pub const MAX_TARGET_BYTES: usize = 8 * 1024;

/// Headers a request may carry once at most: a second `Authorization`, `Host`,
/// `Content-Type` or `Content-Length` makes the request mean different things to different
/// readers (which one wins?), so it is refused rather than guessed.
const SINGLE: [HeaderName; 6] = [
    header::HOST,
    header::AUTHORIZATION,
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    header::ORIGIN,
    header::TRANSFER_ENCODING,
];

/// A host as a `Host` header or an origin names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostName {
    Ip(IpAddr),
    /// Lowercase, without a trailing dot.
    Name(String),
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostName::Ip(IpAddr::V6(a)) => write!(f, "[{a}]"),
            HostName::Ip(a) => write!(f, "{a}"),
            HostName::Name(n) => f.write_str(n),
        }
    }
}

/// `host[:port]` (an IPv6 host in brackets): the host and the port, or `None` when it is not
/// one (a user part, a path, an empty or non-numeric port, characters a host name cannot
/// have).
pub fn parse_authority(a: &str) -> Option<(HostName, Option<u16>)> {
    if a.is_empty() || a.len() > 255 {
        return None;
    }
    let port = |p: &str| -> Option<u16> {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = h.parse().ok()?;
        let p = match after {
            "" => None,
            p => Some(port(p.strip_prefix(':')?)?),
        };
        return Some((HostName::Ip(IpAddr::V6(ip)), p));
    }
    let (h, p) = match a.split_once(':') {
        Some((h, p)) => (h, Some(port(p)?)),
        None => (a, None),
    };
    if h.is_empty()
        || !h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return None;
    }
    let name = h.strip_suffix('.').unwrap_or(h).to_ascii_lowercase();
    if name.is_empty() {
        return None;
    }
    let host = match name.parse::<std::net::Ipv4Addr>() {
        Ok(ip) => HostName::Ip(IpAddr::V4(ip)),
        Err(_) => HostName::Name(name),
    };
    Some((host, p))
}

/// An `--allowed-host` value: `NAME` or `NAME:PORT` (an IP literal too).
///
/// # Errors
/// Anything else (a scheme, a path, a user part, an empty name or port), saying what is
/// expected.
pub fn parse_allowed_host(s: &str) -> Result<(HostName, Option<u16>), String> {
    parse_authority(s.trim()).ok_or_else(|| {
        format!(
            "--allowed-host {s:?}: expected a host name or address, optionally with :PORT \
             (e.g. images.example.com, images.example.com:8443, [::1]:9000), without a \
             scheme or path"
        )
    })
}

/// The hosts this service answers to (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct Hosts {
    /// The bound address; `None` when the routes run without a listener (then loopback
    /// hosts with any port).
    pub bound: Option<SocketAddr>,
    /// `--allowed-host` entries.
    pub allowed: Vec<(HostName, Option<u16>)>,
}

impl Hosts {
    /// Whether `host` with `port` (`None`: the default port, 80) names this service.
    pub fn allows(&self, host: &HostName, port: Option<u16>) -> bool {
        let listed = self
            .allowed
            .iter()
            .any(|(h, p)| h == host && (p.is_none() || *p == port));
        if listed {
            return true;
        }
        let (bound_ip, bound_port) = match self.bound {
            Some(a) => (Some(a.ip()), Some(a.port())),
            None => (None, None),
        };
        if bound_port.is_some_and(|b| port.unwrap_or(80) != b) {
            return false;
        }
        let loopback_bound = bound_ip.is_none_or(|ip| ip.is_loopback());
        let every_address = bound_ip.is_some_and(|ip| ip.is_unspecified());
        match host {
            HostName::Ip(ip) => {
                every_address
                    || Some(*ip) == bound_ip
                    || (loopback_bound && ip.is_loopback())
                    || ipv4_mapped(*ip).is_some_and(|v4| Some(IpAddr::V4(v4)) == bound_ip)
            }
            HostName::Name(n) => n == "localhost" && (loopback_bound || every_address),
        }
    }

    /// `Host`: present, well formed and one of this service's.
    fn check_host(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        let Some(raw) = headers.get(header::HOST) else {
            return Err(ApiError::bad_request_code(
                "the request has no Host header (HTTP/1.1 requires one)",
                "missing_host",
            ));
        };
        let text = raw.to_str().unwrap_or("");
        let Some((host, port)) = parse_authority(text) else {
            return Err(ApiError::bad_request_code(
                format!(
                    "the Host header {raw:?} is not a host name or address with an optional port"
                ),
                "invalid_host",
            ));
        };
        if !self.allows(&host, port) {
            return Err(ApiError::forbidden(
                format!(
                    "this service does not answer to the host {text:?} (it answers to its own \
                     address and localhost; the operator can add names with --allowed-host)"
                ),
                "host_not_allowed",
            ));
        }
        Ok(text.to_string())
    }

    /// `Origin`, where sent: one of this service's.
    fn check_origin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(raw) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let text = raw.to_str().unwrap_or("");
        let parsed = text.split_once("://").and_then(|(scheme, auth)| {
            let default = match scheme {
                "http" => 80,
                "https" => 443,
                _ => return None,
            };
            let (h, p) = parse_authority(auth)?;
            Some((h, p.unwrap_or(default)))
        });
        match parsed {
            Some((h, p)) if self.allows(&h, Some(p)) => Ok(()),
            _ => Err(ApiError::forbidden(
                format!(
                    "requests from the web page at {text:?} are not allowed: this service takes \
                     browser requests from its own pages only (the operator can add names with \
                     --allowed-host)"
                ),
                "origin_not_allowed",
            )),
        }
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d`.
fn ipv4_mapped(ip: IpAddr) -> Option<std::net::Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        IpAddr::V4(_) => None,
    }
}

/// The `Host` a request was accepted with: the only host `url` answers are built from.
#[derive(Debug, Clone)]
pub struct AcceptedHost(pub String);

/// Refuses what no route should see: a request target longer than [`MAX_TARGET_BYTES`]
/// (414), a second copy of a [`SINGLE`] header (400), a `Host` that is not this service's
/// (400 when missing or malformed, 403 otherwise), an `Origin` that is not (403). Returns the
/// accepted host.
pub(crate) fn check(
    hosts: &Hosts,
    target_len: usize,
    headers: &HeaderMap,
) -> Result<AcceptedHost, ApiError> {
    if target_len > MAX_TARGET_BYTES {
        return Err(ApiError::uri_too_long(target_len, MAX_TARGET_BYTES));
    }
    for name in &SINGLE {
        let n = headers.get_all(name).iter().count();
        if n > 1 {
            return Err(ApiError::bad_request_code(
                format!(
                    "the request has {n} `{name}` headers; send one (with more, which one counts \
                     would be a guess)"
                ),
                "duplicate_header",
            ));
        }
    }
    let host = hosts.check_host(headers)?;
    hosts.check_origin(headers)?;
    Ok(AcceptedHost(host))
}

/// The Content-Security-Policy of API answers (JSON, PNG): nothing to run, load or frame.
pub const API_CSP: &str = "default-src 'none'; frame-ancestors 'none'";

/// Headers every answer carries: no MIME sniffing (a PNG or JSON answer is never taken for
/// HTML), no framing (clickjacking), no referrer, and a Content-Security-Policy when the
/// route set none.
pub(crate) fn secure(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY) {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(API_CSP),
        );
    }
}

/// The page's Content-Security-Policy: its own inline script and style (by SHA-256), images
/// from `data:` (the answers), requests to this service only, no plugins, forms, base URL
/// or framing.
pub(crate) fn page_csp(page: &str) -> String {
    use base64::Engine as _;
    use sha2::{Digest, Sha256};
    let hashes = |open: &str, close: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = page;
        while let Some(i) = rest.find(open) {
            let body = &rest[i + open.len()..];
            let Some(j) = body.find(close) else { break };
            let digest = Sha256::digest(&body.as_bytes()[..j]);
            out.push(format!(
                "'sha256-{}'",
                base64::engine::general_purpose::STANDARD.encode(digest)
            ));
            rest = &body[j..];
        }
        out
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; img-src data:; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hashes("<script>", "</script>").join(" "),
        hashes("<style>", "</style>").join(" ")
    )
}

/// Whether `Content-Type` says JSON: `application/json`, with an optional `charset` of
/// UTF-8 (JSON's only encoding, RFC 8259). Everything else is 415, a missing type included:
/// an HTML form can send `text/plain`, `application/x-www-form-urlencoded` and
/// `multipart/form-data` to any site without asking, never `application/json`.
pub(crate) fn check_json_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(v) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media_type(
            "the request has no Content-Type: send the body as JSON with `Content-Type: application/json`",
        ));
    };
    let text = v.to_str().unwrap_or("");
    let mut parts = text.split(';');
    let essence = parts.next().unwrap_or("").trim();
    let charset_ok = parts.all(|p| match p.split_once('=') {
        Some((k, v)) if k.trim().eq_ignore_ascii_case("charset") => {
            let v = v.trim().trim_matches('"');
            v.eq_ignore_ascii_case("utf-8") || v.eq_ignore_ascii_case("utf8")
        }
        Some(_) => true,
        None => p.trim().is_empty(),
    });
    if essence.eq_ignore_ascii_case("application/json") && charset_ok {
        return Ok(());
    }
    Err(ApiError::unsupported_media_type(format!(
        "Content-Type {text:?}: this API takes JSON only; send `Content-Type: application/json`"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(bound: &str, allowed: &[&str]) -> Hosts {
        Hosts {
            bound: Some(bound.parse().unwrap()),
            allowed: allowed
                .iter()
                .map(|a| parse_allowed_host(a).unwrap())
                .collect(),
        }
    }

    fn ok(h: &Hosts, host: &str) -> bool {
        let (n, p) = parse_authority(host).unwrap();
        h.allows(&n, p)
    }

    #[test]
    fn loopback_binding_answers_to_loopback_names_with_its_port() {
        let h = hosts("127.0.0.1:8000", &[]);
        for good in [
            "127.0.0.1:8000",
            "localhost:8000",
            "LOCALHOST:8000",
            "localhost.:8000",
            "[::1]:8000",
        ] {
            assert!(ok(&h, good), "{good}");
        }
        for bad in [
            "evil.example",
            "evil.example:8000",
            "localhost:9000",
            "localhost",
            "127.0.0.1",
            "192.168.1.5:8000",
            "localhost.evil.example:8000",
        ] {
            assert!(!ok(&h, bad), "{bad}");
        }
        let h = hosts("127.0.0.1:80", &[]);
        assert!(ok(&h, "localhost") && ok(&h, "127.0.0.1:80"));
    }

    #[test]
    fn every_address_binding_takes_ip_literals_and_listed_names() {
        let h = hosts(
            "0.0.0.0:8000",
            &["images.example.com", "tunnel.example:9000"],
        );
        for good in [
            "192.168.1.5:8000",
            "10.0.0.1:8000",
            "[fe80::1]:8000",
            "localhost:8000",
            "images.example.com",
            "images.example.com:443",
            "tunnel.example:9000",
        ] {
            assert!(ok(&h, good), "{good}");
        }
        for bad in [
            "evil.example:8000",
            "192.168.1.5:9000",
            "tunnel.example:8000",
            "tunnel.example",
        ] {
            assert!(!ok(&h, bad), "{bad}");
        }
        // A specific non-loopback address: itself only (and listed names).
        let h = hosts("192.168.1.5:8000", &[]);
        assert!(ok(&h, "192.168.1.5:8000"));
        assert!(!ok(&h, "localhost:8000") && !ok(&h, "10.0.0.1:8000"));
    }

    #[test]
    fn malformed_authorities_are_not_hosts() {
        for bad in [
            "",
            "user@localhost:8000",
            "localhost:",
            "localhost:+80",
            "localhost:99999",
            "localhost/x",
            "[::1",
            "[::1]x",
            "a b",
            "local\u{e9}host",
            ".",
            "localhost:80:80",
        ] {
            assert!(parse_authority(bad).is_none(), "{bad:?}");
        }
        assert!(parse_allowed_host("http://x.example").is_err());
        assert!(parse_allowed_host("x.example/path").is_err());
        assert_eq!(
            parse_allowed_host("X.Example:81").unwrap(),
            (HostName::Name("x.example".into()), Some(81))
        );
    }

    #[test]
    fn json_content_types() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            check_json_type(&h).is_ok()
        };
        for good in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
        ] {
            assert!(with(good), "{good}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/json",
            "application/json; charset=iso-8859-1",
            "application/jsonx",
            "",
        ] {
            assert!(!with(bad), "{bad}");
        }
        assert!(check_json_type(&HeaderMap::new()).is_err());
    }

    #[test]
    fn the_page_csp_hashes_its_inline_script_and_style() {
        let csp = page_csp("<style>a{}</style><script>x()</script>");
        assert!(csp.contains("script-src 'sha256-"), "{csp}");
        assert!(csp.contains("style-src 'sha256-"), "{csp}");
        assert!(!csp.contains("unsafe-inline"), "{csp}");
    }
}
