//! HTTP proxies: [`ProxyConfig`], the proxy environment variables and the
//! choice of a proxy per request (the tunnel is in `tunnel`, `NO_PROXY`
//! matching in `no_proxy`).

use std::{fmt, sync::Arc};

use base64::Engine as _;
use http::HeaderValue;
use url::Url;

use super::{error::ClientConfigError, no_proxy::NoProxy};

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
    /// domains (`example.com` or `.example.com`, matching the host and its
    /// subdomains), IP addresses (`10.0.0.1`, `::1`), CIDR blocks
    /// (`10.0.0.0/8`, `::1/128`), or `*` for all; a `:port` suffix is
    /// ignored, and so are invalid entries. Default: none.
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

/// A resolved proxy to connect through.
#[derive(Debug)]
pub(crate) struct ProxyEndpoint {
    pub(crate) https: bool,
    /// The host without IPv6 brackets (the TLS server name).
    pub(crate) host: String,
    /// `host:port` (IPv6 in brackets), to connect to and for messages.
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
        Proxies::from_env(|name| std::env::var(name).ok())
    }

    /// The proxies the environment asks for, `var` reading one variable:
    /// `http_proxy` (or `HTTP_PROXY`), `https_proxy` (or `HTTPS_PROXY`) and
    /// `no_proxy` (or `NO_PROXY`), the lower-case form first, as curl reads
    /// them; empty values count as unset. When `REQUEST_METHOD` is set the
    /// program runs as a CGI script, where `HTTP_PROXY` holds the request's
    /// `Proxy` header: it is then ignored ("httpoxy"), as curl and reqwest
    /// do.
    fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ClientConfigError> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let cgi = var("REQUEST_METHOD").is_some();
        let http = var("http_proxy").or_else(|| {
            let upper = var("HTTP_PROXY");
            if cgi && upper.is_some() {
                tracing::warn!("ignoring HTTP_PROXY: REQUEST_METHOD is set (CGI)");
                return None;
            }
            upper
        });
        let https = var("https_proxy").or_else(|| var("HTTPS_PROXY"));
        let no_proxy = NoProxy::parse(
            &var("no_proxy")
                .or_else(|| var("NO_PROXY"))
                .unwrap_or_default(),
        );
        let load = |value: Option<String>| -> Result<_, ClientConfigError> {
            match value {
                Some(value) => {
                    let config = ProxyConfig::parse(&value, "proxy_from_env")?;
                    Ok(Some((Arc::new(config.endpoint()), no_proxy.clone())))
                }
                None => Ok(None),
            }
        };
        Ok(Proxies {
            http: load(http)?,
            https: load(https)?,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn proxy_for(proxies: &Proxies, https: bool, host: &str) -> Option<String> {
        proxies.for_target(https, host).map(|p| p.authority.clone())
    }

    #[test]
    fn environment_variables_choose_the_proxies() {
        let proxies = Proxies::from_env(env(&[
            ("http_proxy", "http://lower:3128"),
            ("HTTP_PROXY", "http://upper:3128"),
            ("HTTPS_PROXY", "secure:8443"),
            ("NO_PROXY", "10.0.0.0/8, .internal.test, ::1/128"),
        ]))
        .unwrap();
        assert_eq!(
            proxy_for(&proxies, false, "example.com").as_deref(),
            Some("lower:3128")
        );
        assert_eq!(
            proxy_for(&proxies, true, "example.com").as_deref(),
            Some("secure:8443")
        );
        assert_eq!(proxy_for(&proxies, false, "10.1.2.3"), None);
        assert_eq!(proxy_for(&proxies, true, "api.internal.test"), None);
        assert_eq!(proxy_for(&proxies, true, "::1"), None);
        assert!(proxy_for(&proxies, true, "11.1.2.3").is_some());

        // Upper case when there is no lower-case form; empty values are unset.
        let proxies = Proxies::from_env(env(&[
            ("http_proxy", " "),
            ("HTTP_PROXY", "http://upper:3128"),
            ("no_proxy", "*"),
        ]))
        .unwrap();
        assert!(proxies.http.is_some());
        assert_eq!(proxy_for(&proxies, false, "example.com"), None);

        let none = Proxies::from_env(env(&[])).unwrap();
        assert!(none.http.is_none() && none.https.is_none());
        let err = Proxies::from_env(env(&[("https_proxy", "socks5://x:1")])).unwrap_err();
        assert_eq!(err.field(), "proxy_from_env");
    }

    #[test]
    fn cgi_ignores_upper_case_http_proxy() {
        let cgi = Proxies::from_env(env(&[
            ("REQUEST_METHOD", "GET"),
            ("HTTP_PROXY", "http://attacker:8080"),
            ("HTTPS_PROXY", "http://secure:3128"),
        ]))
        .unwrap();
        assert!(cgi.http.is_none());
        assert_eq!(
            proxy_for(&cgi, true, "example.com").as_deref(),
            Some("secure:3128")
        );
        // The lower-case form is not a request header: still honoured.
        let lower = Proxies::from_env(env(&[
            ("REQUEST_METHOD", "GET"),
            ("http_proxy", "http://chosen:3128"),
        ]))
        .unwrap();
        assert_eq!(
            proxy_for(&lower, false, "example.com").as_deref(),
            Some("chosen:3128")
        );
        // Without REQUEST_METHOD, HTTP_PROXY counts.
        let plain = Proxies::from_env(env(&[("HTTP_PROXY", "http://upper:3128")])).unwrap();
        assert!(plain.http.is_some());
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
