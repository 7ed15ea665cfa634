//! A payload store in S3-compatible object storage: one object per payload
//! under a bucket and a key prefix, over patient's own HTTP client and its
//! built-in SigV4 signing.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use patient_http::{
    client::{ClientConfig, HttpClient, HttpVersionPref, OutgoingRequest, RawResponse},
    preprocess::{AwsCredentials, PreparedRequest, SigV4},
    Secret,
};
use url::Url;

use super::PayloadStore;
use crate::StoreError;

/// The object key prefix of [`S3Config::default`] (the gem's default).
pub const DEFAULT_PREFIX: &str = "patient_http/payloads/";

/// The region of [`S3Config::default`].
pub const DEFAULT_REGION: &str = "us-east-1";

/// How long one S3 request may take unless [`S3Store::request_timeout`] says
/// otherwise: 30 s.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest object [`S3Store::fetch`] reads: 1 GiB.
pub const MAX_OBJECT_SIZE: usize = 1 << 30;

/// How many times a request is retried after a 500, 502, 503 or 504 or a
/// network failure (every request of the store is idempotent).
const RETRIES: u32 = 2;

const STORE: &str = "s3";

/// Where and how to reach the bucket.
///
/// ```
/// use patient_store::store::{S3Config, S3Store};
///
/// // A local S3-compatible server: path-style URLs.
/// let local = S3Store::new(S3Config {
///     endpoint: "http://127.0.0.1:9000".into(),
///     bucket: "payloads".into(),
///     access_key_id: "test".into(),
///     secret_access_key: "test".into(),
///     path_style: true,
///     ..S3Config::default()
/// })?;
///
/// // AWS: virtual-host-style URLs (`https://my-bucket.s3.eu-west-1.amazonaws.com/…`).
/// let aws = S3Store::new(S3Config {
///     bucket: "my-bucket".into(),
///     region: "eu-west-1".into(),
///     access_key_id: "AKIA…".into(),
///     secret_access_key: "…".into(),
///     ..S3Config::default()
/// })?;
/// # Ok::<(), patient_store::StoreError>(())
/// ```
#[derive(Clone)]
pub struct S3Config {
    /// The service's base URL, `http` or `https`, optionally with a base
    /// path. Empty (the default) means AWS: `https://s3.<region>.amazonaws.com`.
    pub endpoint: String,
    /// The bucket. Required.
    pub bucket: String,
    /// Prepended to every key to form the object key (default
    /// [`DEFAULT_PREFIX`], `patient_http/payloads/`, the gem's); may be
    /// empty. It must not contain `.` or `..` path segments.
    pub prefix: String,
    /// The region used for signing (default [`DEFAULT_REGION`], `us-east-1`).
    pub region: String,
    /// The access key id. Required.
    pub access_key_id: String,
    /// The secret access key. Required.
    pub secret_access_key: String,
    /// Path-style URLs (`<endpoint>/<bucket>/<object key>`), for local and
    /// most self-hosted servers; otherwise (the default) virtual-host style
    /// (`<bucket>.<endpoint host>/<object key>`).
    pub path_style: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: String::new(),
            bucket: String::new(),
            prefix: DEFAULT_PREFIX.to_owned(),
            region: DEFAULT_REGION.to_owned(),
            access_key_id: String::new(),
            secret_access_key: String::new(),
            path_style: false,
        }
    }
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("path_style", &self.path_style)
            .finish_non_exhaustive()
    }
}

/// Payloads as objects `<prefix><key>` in an S3-compatible bucket, written
/// with `content-type: application/json`.
///
/// Requests are signed with AWS Signature Version 4 and sent by patient's
/// [`HttpClient`]; a request that fails with a 5xx status or a network error
/// is retried twice. Cheap to clone (clones share the connection pool).
#[derive(Clone)]
#[must_use]
pub struct S3Store {
    client: HttpClient,
    signer: SigV4,
    credentials: AwsCredentials,
    region: String,
    /// `scheme://host[:port]` and base path of the bucket's URLs.
    base: Url,
    /// The path of the bucket under `base`: `/<bucket>` (path style) or empty.
    bucket_path: String,
    bucket: String,
    prefix: String,
    timeout: Duration,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("base", &self.base.as_str())
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn config_error(field: &str, problem: impl fmt::Display) -> StoreError {
    StoreError::Config(format!("S3 {field}: {problem}"))
}

impl S3Store {
    /// A store for `config`; checks every field and fails with
    /// [`StoreError::Config`] naming the first invalid one. Connects lazily.
    pub fn new(config: S3Config) -> Result<S3Store, StoreError> {
        if config.region.trim().is_empty() {
            return Err(config_error("region", "is empty"));
        }
        if config.bucket.is_empty() {
            return Err(config_error("bucket", "is empty"));
        }
        if config.bucket.contains('/') {
            return Err(config_error("bucket", "must not contain '/'"));
        }
        if config.access_key_id.is_empty() {
            return Err(config_error("access_key_id", "is empty"));
        }
        if config.secret_access_key.is_empty() {
            return Err(config_error("secret_access_key", "is empty"));
        }
        if config
            .prefix
            .split('/')
            .any(|segment| segment == "." || segment == "..")
        {
            return Err(config_error(
                "prefix",
                "must not contain '.' or '..' path segments",
            ));
        }

        let endpoint = if config.endpoint.is_empty() {
            format!("https://s3.{}.amazonaws.com", config.region)
        } else {
            config.endpoint.clone()
        };
        let mut base = Url::parse(&endpoint).map_err(|e| config_error("endpoint", e))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(config_error("endpoint", "must be an http or https URL"));
        }
        if base.query().is_some() || base.fragment().is_some() {
            return Err(config_error(
                "endpoint",
                "must not have a query or fragment",
            ));
        }
        if !base.username().is_empty() || base.password().is_some() {
            return Err(config_error("endpoint", "must not contain credentials"));
        }
        let Some(host) = base.host_str().map(str::to_owned) else {
            return Err(config_error("endpoint", "has no host"));
        };
        let base_path = base.path().trim_end_matches('/').to_owned();
        base.set_path(&base_path);

        let bucket_path = if config.path_style {
            format!("/{}", aws_encode(&config.bucket, true))
        } else {
            let virtual_host = format!("{}.{host}", config.bucket);
            base.set_host(Some(&virtual_host)).map_err(|e| {
                config_error(
                    "bucket",
                    format!("{e} as a host name {virtual_host:?}; use path_style for this bucket"),
                )
            })?;
            String::new()
        };

        let credentials = AwsCredentials {
            access_key_id: config.access_key_id.clone(),
            secret_access_key: Secret::Static(config.secret_access_key.clone()),
            session_token: None,
        };
        let client = HttpClient::new(
            ClientConfig::builder()
                .max_response_size(MAX_OBJECT_SIZE)
                .request_timeout(DEFAULT_REQUEST_TIMEOUT)
                .http_version(HttpVersionPref::Http1Only)
                .user_agent("patient-store")
                .build()
                .map_err(|e| config_error("client", e))?,
        )
        .map_err(|e| config_error("client", e))?;
        Ok(S3Store {
            client,
            signer: SigV4::new(credentials.clone(), config.region.clone(), "s3"),
            credentials,
            region: config.region,
            base,
            bucket_path,
            bucket: config.bucket,
            prefix: config.prefix,
            timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    /// Sets a session token for temporary credentials, sent as
    /// `x-amz-security-token` (default none).
    pub fn session_token(mut self, token: impl Into<String>) -> S3Store {
        self.credentials.session_token = Some(Secret::Static(token.into()));
        self.signer = SigV4::new(self.credentials.clone(), self.region.clone(), "s3");
        self
    }

    /// Sets how long one request may take, reading the whole object included
    /// (default [`DEFAULT_REQUEST_TIMEOUT`], 30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> S3Store {
        self.timeout = timeout;
        self
    }

    /// The object key of the payload `key`: the prefix and the key.
    pub fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The URL of the payload `key`.
    pub fn object_url(&self, key: &str) -> Result<Url, StoreError> {
        if key.is_empty() || key.split('/').any(|s| s == "." || s == "..") {
            return Err(StoreError::Backend {
                store: STORE.to_owned(),
                message: format!("invalid key {key:?}: empty, or with a '.' or '..' segment"),
                source: None,
            });
        }
        let mut url = self.base.clone();
        let path = format!(
            "{}{}/{}",
            self.base.path().trim_end_matches('/'),
            self.bucket_path,
            aws_encode(&self.object_key(key), false)
        );
        url.set_path(&path);
        Ok(url)
    }

    fn bucket_url(&self) -> Url {
        let mut url = self.base.clone();
        let path = format!(
            "{}{}/",
            self.base.path().trim_end_matches('/'),
            self.bucket_path
        );
        url.set_path(&path);
        url
    }

    /// Creates the bucket (for tests and setup); a bucket that already
    /// exists and is reachable with these credentials is not an error.
    pub async fn create_bucket(&self) -> Result<(), StoreError> {
        let url = self.bucket_url();
        let body = if self.region == DEFAULT_REGION {
            Bytes::new()
        } else {
            Bytes::from(format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                xml_escape(&self.region)
            ))
        };
        let response = self.send(Method::PUT, url.clone(), body, None).await?;
        if (200..300).contains(&response.status) {
            return Ok(());
        }
        let error = S3Error::of(&response);
        match error.code.as_str() {
            "BucketAlreadyOwnedByYou" => Ok(()),
            "BucketAlreadyExists" => {
                // Ours or someone else's: ours when we can reach it.
                let head = self.send(Method::HEAD, url, Bytes::new(), None).await?;
                if (200..300).contains(&head.status) {
                    Ok(())
                } else {
                    Err(self.status_error("create bucket", &error))
                }
            }
            _ => Err(self.status_error("create bucket", &error)),
        }
    }

    fn status_error(&self, operation: &str, error: &S3Error) -> StoreError {
        StoreError::Backend {
            store: STORE.to_owned(),
            message: format!("{operation} in bucket {:?}: {error}", self.bucket),
            source: None,
        }
    }

    /// Signs and sends one request, retrying 5xx and network failures.
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Bytes,
        content_type: Option<&'static str>,
    ) -> Result<RawResponse, StoreError> {
        let mut attempt = 0;
        loop {
            let mut headers = HeaderMap::new();
            if let Some(content_type) = content_type {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static(content_type),
                );
            }
            let mut prepared =
                PreparedRequest::new(method.clone(), url.clone(), headers, body.clone());
            self.signer
                .sign(&mut prepared, SystemTime::now())
                .map_err(|reason| StoreError::Backend {
                    store: STORE.to_owned(),
                    message: format!("cannot sign the request: {reason}"),
                    source: None,
                })?;
            let mut request = OutgoingRequest::new(method.clone(), url.clone());
            request.headers = prepared.headers().clone();
            request.body = body.clone();
            request.timeout = Some(self.timeout);

            let retry_delay = Duration::from_millis(50 << (2 * attempt));
            match self.client.send(request).await {
                Ok(response)
                    if matches!(response.status, 500 | 502 | 503 | 504) && attempt < RETRIES =>
                {
                    tracing::debug!(status = response.status, attempt, %method, "retrying S3 request");
                }
                Ok(response) => return Ok(response),
                Err(error) if attempt < RETRIES && !error.is_too_large() => {
                    tracing::debug!(%error, attempt, %method, "retrying S3 request");
                }
                Err(error) => {
                    return Err(StoreError::backend(
                        STORE,
                        format!("{method} {} failed", redact_url(&url)),
                        error,
                    ))
                }
            }
            attempt += 1;
            tokio::time::sleep(retry_delay).await;
        }
    }
}

/// The URL without its query, for messages.
fn redact_url(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// AWS's URI encoding: every byte except `A-Z a-z 0-9 - . _ ~` (and `/`
/// unless `encode_slash`) as `%XX`.
fn aws_encode(input: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(input.len());
    for &byte in input.as_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(byte));
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The status and the error code and message of an S3 error response.
#[derive(Debug, PartialEq, Eq)]
struct S3Error {
    status: u16,
    code: String,
    message: String,
}

impl S3Error {
    fn of(response: &RawResponse) -> S3Error {
        let body = String::from_utf8_lossy(&response.body);
        S3Error {
            status: response.status,
            code: xml_element(&body, "Code").unwrap_or_default(),
            message: xml_element(&body, "Message").unwrap_or_default(),
        }
    }
}

impl fmt::Display for S3Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "status {}", self.status)?;
        if !self.code.is_empty() {
            write!(f, " {}", self.code)?;
        }
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        Ok(())
    }
}

/// The text of the first `<name>…</name>` element, unescaped.
fn xml_element(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let len = xml[start..].find(&close)?;
    let text = &xml[start..start + len];
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

#[async_trait]
impl PayloadStore for S3Store {
    async fn store(&self, key: &str, json: &str) -> Result<(), StoreError> {
        let url = self.object_url(key)?;
        let body = Bytes::copy_from_slice(json.as_bytes());
        let response = self
            .send(Method::PUT, url, body, Some("application/json"))
            .await?;
        if (200..300).contains(&response.status) {
            Ok(())
        } else {
            Err(self.status_error(
                &format!("PUT {}", self.object_key(key)),
                &S3Error::of(&response),
            ))
        }
    }

    async fn fetch(&self, key: &str) -> Result<Option<String>, StoreError> {
        let url = self.object_url(key)?;
        let response = self.send(Method::GET, url, Bytes::new(), None).await?;
        if (200..300).contains(&response.status) {
            return match std::str::from_utf8(&response.body) {
                Ok(text) => Ok(Some(text.to_owned())),
                Err(e) => Err(StoreError::Corrupt {
                    store: STORE.to_owned(),
                    key: key.to_owned(),
                    message: format!("not UTF-8: {e}"),
                }),
            };
        }
        let error = S3Error::of(&response);
        if response.status == 404 && error.code != "NoSuchBucket" {
            return Ok(None);
        }
        Err(self.status_error(&format!("GET {}", self.object_key(key)), &error))
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let url = self.object_url(key)?;
        let response = self.send(Method::DELETE, url, Bytes::new(), None).await?;
        let error = S3Error::of(&response);
        if (200..300).contains(&response.status)
            || (response.status == 404 && error.code != "NoSuchBucket")
        {
            return Ok(());
        }
        Err(self.status_error(&format!("DELETE {}", self.object_key(key)), &error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> S3Config {
        S3Config {
            endpoint: "http://127.0.0.1:9000".into(),
            bucket: "payloads".into(),
            access_key_id: "test".into(),
            secret_access_key: "test".into(),
            path_style: true,
            ..S3Config::default()
        }
    }

    fn config_message(config: S3Config) -> String {
        match S3Store::new(config) {
            Err(StoreError::Config(message)) => message,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn path_style_urls() {
        let store = S3Store::new(local()).unwrap();
        assert_eq!(
            store.object_url("0b4e").unwrap().as_str(),
            "http://127.0.0.1:9000/payloads/patient_http/payloads/0b4e"
        );
        assert_eq!(
            store.bucket_url().as_str(),
            "http://127.0.0.1:9000/payloads/"
        );
        assert_eq!(store.object_key("k"), "patient_http/payloads/k");

        let store = S3Store::new(S3Config {
            endpoint: "http://localhost:4566/gateway/".into(),
            prefix: "a b+c=/".into(),
            ..local()
        })
        .unwrap();
        assert_eq!(
            store.object_url("k@1").unwrap().as_str(),
            "http://localhost:4566/gateway/payloads/a%20b%2Bc%3D/k%401"
        );
        assert_eq!(
            store.object_url("k@1").unwrap().path(),
            "/gateway/payloads/a%20b%2Bc%3D/k%401"
        );
    }

    #[test]
    fn virtual_host_urls_and_aws_default_endpoint() {
        let store = S3Store::new(S3Config {
            endpoint: String::new(),
            region: "eu-west-1".into(),
            bucket: "my-bucket".into(),
            prefix: String::new(),
            path_style: false,
            ..local()
        })
        .unwrap();
        assert_eq!(
            store.object_url("id").unwrap().as_str(),
            "https://my-bucket.s3.eu-west-1.amazonaws.com/id"
        );
        assert_eq!(
            store.bucket_url().as_str(),
            "https://my-bucket.s3.eu-west-1.amazonaws.com/"
        );
    }

    #[test]
    fn invalid_keys_are_refused() {
        let store = S3Store::new(local()).unwrap();
        for key in ["", ".", "..", "a/../b", "./x"] {
            assert!(
                matches!(store.object_url(key), Err(StoreError::Backend { .. })),
                "{key:?}"
            );
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        for (config, field) in [
            (
                S3Config {
                    bucket: String::new(),
                    ..local()
                },
                "bucket",
            ),
            (
                S3Config {
                    bucket: "a/b".into(),
                    ..local()
                },
                "bucket",
            ),
            (
                S3Config {
                    region: " ".into(),
                    ..local()
                },
                "region",
            ),
            (
                S3Config {
                    access_key_id: String::new(),
                    ..local()
                },
                "access_key_id",
            ),
            (
                S3Config {
                    secret_access_key: String::new(),
                    ..local()
                },
                "secret_access_key",
            ),
            (
                S3Config {
                    endpoint: "ftp://x".into(),
                    ..local()
                },
                "endpoint",
            ),
            (
                S3Config {
                    endpoint: "not a url".into(),
                    ..local()
                },
                "endpoint",
            ),
            (
                S3Config {
                    endpoint: "http://x/?a=1".into(),
                    ..local()
                },
                "endpoint",
            ),
            (
                S3Config {
                    endpoint: "http://u:p@x/".into(),
                    ..local()
                },
                "endpoint",
            ),
            (
                S3Config {
                    prefix: "a/../".into(),
                    ..local()
                },
                "prefix",
            ),
            (
                S3Config {
                    bucket: "bad bucket".into(),
                    path_style: false,
                    ..local()
                },
                "bucket",
            ),
        ] {
            let message = config_message(config);
            assert!(
                message.starts_with(&format!("S3 {field}:")),
                "{field}: {message}"
            );
        }
        let debug = format!(
            "{:?}",
            S3Config {
                secret_access_key: "hidden!".into(),
                ..local()
            }
        );
        assert!(!debug.contains("hidden!"), "{debug}");
    }

    #[test]
    fn error_codes_come_from_the_xml_body() {
        let response = RawResponse {
            status: 403,
            headers: HeaderMap::new(),
            body: Bytes::from_static(
                b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
                  <Message>Access &amp; denied</Message><RequestId>1</RequestId></Error>",
            ),
            version: http::Version::HTTP_11,
        };
        let error = S3Error::of(&response);
        assert_eq!(error.code, "AccessDenied");
        assert_eq!(
            error.to_string(),
            "status 403 AccessDenied: Access & denied"
        );

        let empty = RawResponse {
            body: Bytes::new(),
            ..response
        };
        assert_eq!(S3Error::of(&empty).to_string(), "status 403");
    }

    #[test]
    fn aws_encoding() {
        assert_eq!(aws_encode("a-b_c.d~e/f", false), "a-b_c.d~e/f");
        assert_eq!(aws_encode("a/b", true), "a%2Fb");
        assert_eq!(aws_encode("é *", false), "%C3%A9%20%2A");
    }
}
