//! Who may call, before any route runs: the `Host` a request names must be
//! one the daemon answers (`allowed_hosts`, against DNS rebinding), a
//! request carrying an `Origin` must come from the daemon's own origin (no
//! cross-site form or script can submit, cancel or read), and a `/v1`
//! request with a body must say `Content-Type: application/json` (what a
//! browser sends without a preflight never is). The token is checked by the
//! API and by each proxy route after this.
//!
//! It runs as the outermost [`tower`](tower_layer) layer of the listener,
//! so it covers the API, the dashboard, the metrics and the proxy routes
//! alike.

use std::{
    net::SocketAddr,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{body::Body, response::IntoResponse};
use futures_util::future::{Either, Ready};
use http::{header, HeaderMap, Request, Response, StatusCode};
use tower_layer::Layer;
use tower_service::Service;

use crate::api::error::ApiError;

/// One entry of `allowed_hosts` (or of a secret's `hosts`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// `*`: any host.
    Any,
    /// `*.suffix`: every name under the domain (not the domain itself).
    Suffix(String),
    /// A name or address, with a port when one was given.
    Exact { host: String, port: Option<u16> },
}

impl HostPattern {
    fn parse(pattern: &str) -> HostPattern {
        let pattern = pattern.trim().to_ascii_lowercase();
        if pattern == "*" {
            return HostPattern::Any;
        }
        if let Some(suffix) = pattern.strip_prefix("*.") {
            return HostPattern::Suffix(format!(".{suffix}"));
        }
        match split_host_port(&pattern) {
            Some((host, port)) => HostPattern::Exact {
                host: host.to_owned(),
                port,
            },
            None => HostPattern::Exact {
                host: pattern,
                port: None,
            },
        }
    }

    fn matches(&self, host: &str, port: Option<u16>) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Suffix(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
            HostPattern::Exact { host: h, port: p } => h == host && (p.is_none() || *p == port),
        }
    }
}

/// Checks one entry of `allowed_hosts` (`with_port`: a `:PORT` and a lone
/// `*` are allowed) or of a secret's `hosts`.
pub fn check_host_pattern(pattern: &str, with_port: bool) -> Result<(), String> {
    let trimmed = pattern.trim();
    if trimmed.is_empty() {
        return Err("must not be empty".into());
    }
    if trimmed == "*" {
        return if with_port {
            Ok(())
        } else {
            Err("\"*\" would send the secret anywhere; list the hosts".into())
        };
    }
    let name = trimmed.strip_prefix("*.").unwrap_or(trimmed);
    if name.contains('*') {
        return Err("a wildcard is allowed only as a leading \"*.\"".into());
    }
    let (host, port) = split_host_port(name).ok_or("not a host name or address")?;
    if port.is_some() && !with_port {
        return Err("give a host name without a port".into());
    }
    if host.is_empty()
        || !host.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']')
        })
    {
        return Err("not a host name or address".into());
    }
    Ok(())
}

/// `host[:port]` or `[v6][:port]`, the host lowercased by the caller;
/// `None` when the port is not a number.
fn split_host_port(value: &str) -> Option<(&str, Option<u16>)> {
    if value.starts_with('[') {
        let end = value.find(']')?;
        let host = &value[..=end];
        return match &value[end + 1..] {
            "" => Some((host, None)),
            rest => Some((host, Some(rest.strip_prefix(':')?.parse().ok()?))),
        };
    }
    match value.rsplit_once(':') {
        // A bare IPv6 address has several colons: no port.
        Some((host, _)) if host.contains(':') => Some((value, None)),
        Some((host, port)) => Some((host, Some(port.parse().ok()?))),
        None => Some((value, None)),
    }
}

/// The rules of [`AccessLayer`].
#[derive(Debug, Clone)]
pub struct AccessRules {
    hosts: Vec<HostPattern>,
}

impl AccessRules {
    /// The rules of a daemon listening on `listen` with `allowed_hosts`
    /// (unset: on a loopback listener `localhost`, `127.0.0.1`, `[::1]` and
    /// the listener's own address, any port; elsewhere any host).
    pub fn new(listen: SocketAddr, allowed_hosts: Option<&[String]>) -> AccessRules {
        let hosts = match allowed_hosts {
            Some(list) => list.iter().map(|p| HostPattern::parse(p)).collect(),
            None if listen.ip().is_loopback() => {
                let own = match listen.ip() {
                    std::net::IpAddr::V4(ip) => ip.to_string(),
                    std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                };
                ["localhost", "127.0.0.1", "[::1]", own.as_str()]
                    .into_iter()
                    .map(HostPattern::parse)
                    .collect()
            }
            None => vec![HostPattern::Any],
        };
        AccessRules { hosts }
    }

    /// Why `request` is refused, if it is.
    pub fn refusal<B>(&self, request: &Request<B>) -> Option<ApiError> {
        let headers = request.headers();
        let host = request_host(request);
        if let Some(host) = &host {
            let lowered = host.to_ascii_lowercase();
            let allowed = split_host_port(&lowered).is_some_and(|(name, port)| {
                let name = name.trim_end_matches('.');
                self.hosts.iter().any(|p| p.matches(name, port))
            });
            if !allowed {
                return Some(ApiError::forbidden(format!(
                    "this daemon does not answer for the host {host:?} (allowed_hosts)"
                )));
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let own = host
                .as_deref()
                .is_some_and(|host| is_own_origin(origin.as_bytes(), host));
            if !own {
                return Some(ApiError::forbidden(format!(
                    "requests from the origin {:?} are refused: only the daemon's own pages may call it from a browser",
                    String::from_utf8_lossy(origin.as_bytes())
                )));
            }
        }
        let path = request.uri().path();
        if (path == "/v1" || path.starts_with("/v1/")) && has_body(headers) {
            if let Err(error) = check_json_content_type(headers) {
                return Some(error);
            }
        }
        None
    }
}

/// The host a request names: its `Host` field, or the authority of an
/// absolute-form target.
fn request_host<B>(request: &Request<B>) -> Option<String> {
    if let Some(authority) = request.uri().authority() {
        return Some(authority.as_str().to_owned());
    }
    request
        .headers()
        .get(header::HOST)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Whether `origin` (`scheme://host[:port]`) is the origin of a page
/// served by this daemon under `host`.
fn is_own_origin(origin: &[u8], host: &str) -> bool {
    let Ok(origin) = std::str::from_utf8(origin) else {
        return false;
    };
    let origin = origin.trim().to_ascii_lowercase();
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    authority.is_some_and(|a| a == host.trim().to_ascii_lowercase())
}

/// Whether the request declares a body.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
        || headers.contains_key(header::CONTENT_TYPE)
}

/// `415 unsupported_media_type` unless the body is declared JSON
/// (`application/json` or a `+json` type): a browser sends neither without
/// asking the daemon first, so no cross-site page can post a body.
pub fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            patient_api::code::UNSUPPORTED_MEDIA_TYPE,
            "the body has no Content-Type; send the header Content-Type: application/json",
        ));
    };
    let essence = value
        .to_str()
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            patient_api::code::UNSUPPORTED_MEDIA_TYPE,
            format!(
                "the body must be application/json, not {essence} (send the header Content-Type: application/json)"
            ),
        ))
    }
}

/// The layer that applies [`AccessRules`] to every request.
#[derive(Debug, Clone)]
pub struct AccessLayer {
    rules: Arc<AccessRules>,
}

impl AccessLayer {
    /// A layer with `rules`.
    pub fn new(rules: AccessRules) -> AccessLayer {
        AccessLayer {
            rules: Arc::new(rules),
        }
    }
}

impl<S> Layer<S> for AccessLayer {
    type Service = Access<S>;

    fn layer(&self, inner: S) -> Access<S> {
        Access {
            inner,
            rules: Arc::clone(&self.rules),
        }
    }
}

/// The service of [`AccessLayer`].
#[derive(Debug, Clone)]
pub struct Access<S> {
    inner: S,
    rules: Arc<AccessRules>,
}

impl<S, B> Service<Request<B>> for Access<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        match self.rules.refusal(&request) {
            Some(refused) => {
                let mut response = refused.into_response();
                if response.status() == StatusCode::FORBIDDEN {
                    response
                        .headers_mut()
                        .insert(header::VARY, header::HeaderValue::from_static("Origin"));
                }
                Either::Left(futures_util::future::ready(Ok(response)))
            }
            None => Either::Right(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(host: Option<&str>, origin: Option<&str>) -> Request<()> {
        let mut builder = Request::builder().uri("/v1/tasks");
        if let Some(host) = host {
            builder = builder.header("host", host);
        }
        if let Some(origin) = origin {
            builder = builder.header("origin", origin);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn loopback_defaults_answer_loopback_names_only() {
        let rules = AccessRules::new("127.0.0.1:8750".parse().unwrap(), None);
        for ok in [
            "localhost:8750",
            "LOCALHOST",
            "127.0.0.1:1",
            "[::1]:8750",
            "localhost.",
        ] {
            assert!(rules.refusal(&request(Some(ok), None)).is_none(), "{ok}");
        }
        for bad in [
            "evil.example:8750",
            "127.0.0.1.nip.io",
            "localhost.evil",
            "[::2]",
            "x:y",
        ] {
            assert!(rules.refusal(&request(Some(bad), None)).is_some(), "{bad}");
        }
        let open = AccessRules::new("0.0.0.0:8750".parse().unwrap(), None);
        assert!(open.refusal(&request(Some("anything"), None)).is_none());
    }

    #[test]
    fn listed_hosts_with_and_without_ports_and_wildcards() {
        let list = [
            "patient.internal:8750".to_owned(),
            "*.corp.example".to_owned(),
        ];
        let rules = AccessRules::new("10.0.0.1:8750".parse().unwrap(), Some(&list));
        assert!(rules
            .refusal(&request(Some("patient.internal:8750"), None))
            .is_none());
        assert!(rules
            .refusal(&request(Some("patient.internal:9000"), None))
            .is_some());
        assert!(rules
            .refusal(&request(Some("a.corp.example"), None))
            .is_none());
        assert!(rules
            .refusal(&request(Some("corp.example"), None))
            .is_some());
    }

    #[test]
    fn only_the_own_origin_passes() {
        let rules = AccessRules::new("127.0.0.1:8750".parse().unwrap(), None);
        let host = Some("127.0.0.1:8750");
        assert!(rules
            .refusal(&request(host, Some("http://127.0.0.1:8750")))
            .is_none());
        for bad in [
            "http://evil.example",
            "null",
            "http://127.0.0.1:8751",
            "http://localhost:8750",
        ] {
            assert!(rules.refusal(&request(host, Some(bad))).is_some(), "{bad}");
        }
    }

    #[test]
    fn secret_hosts() {
        use patient_http::host_listed;
        let list = ["api.openai.com".to_owned(), "*.example.com".to_owned()];
        assert!(host_listed(&list, "api.openai.com"));
        assert!(host_listed(&list, "API.OpenAI.com."));
        assert!(host_listed(&list, "a.b.example.com"));
        assert!(!host_listed(&list, "example.com"));
        assert!(!host_listed(&list, "badexample.com"));
        assert!(!host_listed(&list, "api.openai.com.evil"));
        assert!(check_host_pattern("*", false).is_err());
        assert!(check_host_pattern("a.com:443", false).is_err());
        assert!(check_host_pattern("a.*.com", true).is_err());
    }
}
