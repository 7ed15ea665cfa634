//! HTTP proxies: [`ProxyConfig`], the environment variables, `NO_PROXY`
//! matching and the `CONNECT` tunnel.

use std::{fmt, sync::Arc};

use base64::Engine as _;
use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use url::Url;

use super::{
    connect::Stream,
    error::{ClientConfigError, ErrorType, Phase, TransportError},
};

/// An HTTP proxy: `http://` or `https://` (TLS to the proxy), with optional
/// basic credentials taken from the URL (`http://user:pass@proxy:3128`) or
/// set with [`basic_auth`](Self::basic_auth).
///
/// Plain-`http` targets are requested in absolute form through the proxy;
/// `https` targets go through a `CONNECT` tunnel.
#[derive(Clone)]
pub struct ProxyConfig {
    url: Url,
    auth: Option<HeaderValue>,
    no_proxy: NoProxy,
}

impl fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("url", &self.url.as_str())
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl ProxyConfig {
    /// Parses a proxy URL; a URL without a scheme is taken as `http://`.
    /// Credentials in the URL become basic `Proxy-Authorization`.
    pub fn new(url: impl AsRef<str>) -> Result<Self, ClientConfigError> {
        Self::parse(url.as_ref(), "proxy")
    }

    fn parse(raw: &str, field: &'static str) -> Result<Self, ClientConfigError> {
        let raw = raw.trim();
        let parsed = if raw.contains("://") {
            Url::parse(raw)
        } else {
            Url::parse(&format!("http://{raw}"))
        };
        let mut url =
            parsed.map_err(|e| ClientConfigError::new(field, format!("invalid proxy URL: {e}")))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(ClientConfigError::new(
                field,
                format!("unsupported proxy scheme `{}`", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(ClientConfigError::new(field, "proxy URL has no host"));
        }
        let mut auth = None;
        if !url.username().is_empty() {
            let user = percent_decode(url.username());
            let pass = url.password().map(percent_decode).unwrap_or_default();
            auth = Some(
                basic(&user, &pass)
                    .map_err(|()| ClientConfigError::new(field, "invalid proxy credentials"))?,
            );
            // Never keep the credentials in the URL (it appears in messages).
            let _ = url.set_username("");
            let _ = url.set_password(None);
        }
        Ok(ProxyConfig {
            url,
            auth,
            no_proxy: NoProxy::default(),
        })
    }

    /// Sets basic credentials sent as `Proxy-Authorization`.
    #[must_use]
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.auth = basic(user, password).ok();
        self
    }

    /// Hosts that bypass this proxy, in `NO_PROXY` syntax: comma-separated
    /// host names (matching the host and its subdomains), IP addresses, or
    /// `*` for all.
    #[must_use]
    pub fn no_proxy(mut self, list: &str) -> Self {
        self.no_proxy = NoProxy::parse(list);
        self
    }

    /// The proxy URL, without credentials.
    pub fn url(&self) -> &Url {
        &self.url
    }

    fn endpoint(&self) -> ProxyEndpoint {
        let host = self.url.host_str().unwrap_or_default();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = self.url.port_or_known_default().unwrap_or(80);
        ProxyEndpoint {
            https: self.url.scheme() == "https",
            authority: format!("{}:{port}", self.url.host_str().unwrap_or_default()),
            host,
            port,
            auth: self.auth.clone(),
        }
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn basic(user: &str, password: &str) -> Result<HeaderValue, ()> {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut value = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| ())?;
    value.set_sensitive(true);
    Ok(value)
}

/// A `NO_PROXY` list.
#[derive(Clone, Debug, Default)]
struct NoProxy {
    all: bool,
    entries: Vec<String>,
}

impl NoProxy {
    fn parse(list: &str) -> Self {
        let mut no_proxy = NoProxy::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                no_proxy.all = true;
                continue;
            }
            let entry = entry.to_ascii_lowercase();
            // Drop a port (`host:8080`), but keep IPv6 literals intact.
            let entry = match entry.rsplit_once(':') {
                Some((host, port))
                    if !host.contains(':') && port.chars().all(|c| c.is_ascii_digit()) =>
                {
                    host.to_owned()
                }
                _ => entry,
            };
            let entry = entry.trim_start_matches("*.").trim_start_matches('.');
            let entry = entry.trim_start_matches('[').trim_end_matches(']');
            no_proxy.entries.push(entry.to_owned());
        }
        no_proxy
    }

    fn matches(&self, host: &str) -> bool {
        if self.all {
            return true;
        }
        self.entries.iter().any(|entry| {
            host.eq_ignore_ascii_case(entry)
                || (host.len() > entry.len()
                    && host.as_bytes()[host.len() - entry.len() - 1] == b'.'
                    && host[host.len() - entry.len()..].eq_ignore_ascii_case(entry))
        })
    }
}

/// A resolved proxy to connect through.
#[derive(Debug)]
pub(crate) struct ProxyEndpoint {
    pub(crate) https: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// `host:port`, for messages and the pool.
    pub(crate) authority: String,
    pub(crate) auth: Option<HeaderValue>,
}

/// The proxies of a client, chosen once at construction.
#[derive(Debug, Default)]
pub(crate) struct Proxies {
    http: Option<(Arc<ProxyEndpoint>, NoProxy)>,
    https: Option<(Arc<ProxyEndpoint>, NoProxy)>,
}

impl Proxies {
    pub(crate) fn new(
        explicit: Option<&ProxyConfig>,
        from_env: bool,
    ) -> Result<Self, ClientConfigError> {
        if let Some(proxy) = explicit {
            let endpoint = Arc::new(proxy.endpoint());
            return Ok(Proxies {
                http: Some((endpoint.clone(), proxy.no_proxy.clone())),
                https: Some((endpoint, proxy.no_proxy.clone())),
            });
        }
        if !from_env {
            return Ok(Proxies::default());
        }
        let no_proxy = NoProxy::parse(&env_var("no_proxy").unwrap_or_default());
        let load =
            |name: &str| -> Result<Option<(Arc<ProxyEndpoint>, NoProxy)>, ClientConfigError> {
                match env_var(name).filter(|v| !v.trim().is_empty()) {
                    Some(value) => {
                        let config = ProxyConfig::parse(&value, "proxy_from_env")?;
                        Ok(Some((Arc::new(config.endpoint()), no_proxy.clone())))
                    }
                    None => Ok(None),
                }
            };
        Ok(Proxies {
            http: load("http_proxy")?,
            https: load("https_proxy")?,
        })
    }

    /// The proxy for a target, if any.
    pub(crate) fn for_target(&self, https: bool, host: &str) -> Option<&Arc<ProxyEndpoint>> {
        let (endpoint, no_proxy) = if https {
            self.https.as_ref()?
        } else {
            self.http.as_ref()?
        };
        (!no_proxy.matches(host)).then_some(endpoint)
    }
}

/// Lower-case form first (as curl does), then upper case.
fn env_var(lower: &str) -> Option<String> {
    std::env::var(lower)
        .ok()
        .or_else(|| std::env::var(lower.to_ascii_uppercase()).ok())
}

/// Opens a `CONNECT` tunnel to `target` (`host:port`) through an established
/// connection to the proxy.
pub(crate) async fn tunnel(
    mut stream: Stream,
    proxy: &ProxyEndpoint,
    target: &str,
) -> Result<Stream, TransportError> {
    let mut request = Vec::with_capacity(128);
    request.extend_from_slice(b"CONNECT ");
    request.extend_from_slice(target.as_bytes());
    request.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    request.extend_from_slice(target.as_bytes());
    request.extend_from_slice(b"\r\n");
    if let Some(auth) = &proxy.auth {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    let io_err = |e| TransportError::from_io(e, &proxy.authority, Phase::Connect);
    stream.write_all(&request).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;

    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io_err)?;
        if n == 0 {
            return Err(proxy_error(
                proxy,
                target,
                "the proxy closed the connection during CONNECT",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if buf.len() > 16 * 1024 {
            return Err(proxy_error(
                proxy,
                target,
                "the CONNECT response head is too large",
            ));
        }
    }
    let status = std::str::from_utf8(&buf)
        .ok()
        .and_then(|head| head.split("\r\n").next())
        .and_then(|line| {
            let mut parts = line.split(' ');
            let version = parts.next()?;
            let code = parts.next()?.parse::<u16>().ok()?;
            version.starts_with("HTTP/1.").then_some(code)
        });
    match status {
        Some(code) if (200..300).contains(&code) => Ok(stream),
        Some(407) => Err(TransportError::new(
            ErrorType::Connection,
            "ProxyAuthenticationRequired",
            format!(
                "proxy {} requires authentication (407) for CONNECT to {target}",
                proxy.authority
            ),
        )),
        Some(code) => Err(proxy_error(
            proxy,
            target,
            &format!("the proxy answered CONNECT with status {code}"),
        )),
        None => Err(proxy_error(
            proxy,
            target,
            "the proxy sent a malformed CONNECT response",
        )),
    }
}

fn proxy_error(proxy: &ProxyEndpoint, target: &str, what: &str) -> TransportError {
    TransportError::new(
        ErrorType::Connection,
        "ProxyError",
        format!("{what} (proxy {}, target {target})", proxy.authority),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_proxy_matching() {
        let list = NoProxy::parse("localhost, .internal.example, 10.0.0.1, foo.com:8080");
        assert!(list.matches("localhost"));
        assert!(list.matches("a.internal.example"));
        assert!(list.matches("internal.example"));
        assert!(!list.matches("xinternal.example"));
        assert!(list.matches("10.0.0.1"));
        assert!(list.matches("foo.com"));
        assert!(!list.matches("example.com"));
        assert!(NoProxy::parse("*").matches("anything"));
    }

    #[test]
    fn proxy_url_credentials_are_moved_to_auth() {
        let proxy = ProxyConfig::new("http://us%40er:p%3Ass@proxy.local:3128").unwrap();
        assert_eq!(proxy.url().as_str(), "http://proxy.local:3128/");
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert_eq!(
            proxy.auth.unwrap().to_str().unwrap(),
            format!("Basic {expected}")
        );
        assert!(ProxyConfig::new("socks5://x:1").is_err());
        assert_eq!(
            ProxyConfig::new("proxy:8080").unwrap().url().as_str(),
            "http://proxy:8080/"
        );
    }
}
