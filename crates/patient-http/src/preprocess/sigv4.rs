//! AWS Signature Version 4, as a built-in preprocessor.
//!
//! Written here rather than taken from `aws-sigv4`: that crate brings the AWS
//! SDK's runtime and a second HTTP stack, for one page of HMAC over `ring`,
//! which the TLS stack already compiles.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use http::HeaderValue;
use ring::{digest, hmac};

use super::{PreparedRequest, Preprocessor};
use crate::secret::Secret;

/// AWS credentials for signing.
#[derive(Clone)]
pub struct AwsCredentials {
    /// The access key id (`AKIA…`).
    pub access_key_id: String,
    /// The secret access key; computed secrets are resolved on every request.
    pub secret_access_key: Secret,
    /// A session token for temporary credentials, sent as `x-amz-security-token`.
    pub session_token: Option<Secret>,
}

impl fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsCredentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Signs requests with AWS Signature Version 4 (header form).
///
/// Signs `host`, `content-type`, `content-md5`, `range`, `date` and every
/// `x-amz-*` header present, and sets `x-amz-date`, `authorization`,
/// `x-amz-security-token` (with a session token) and, for S3 or when asked,
/// `x-amz-content-sha256`.
#[derive(Debug, Clone)]
pub struct SigV4 {
    credentials: AwsCredentials,
    region: String,
    service: String,
    content_sha256_header: bool,
    clock: Option<SystemTime>,
}

impl SigV4 {
    /// A signer for a region and a service (`s3`, `execute-api`, `bedrock`, …).
    pub fn new(
        credentials: AwsCredentials,
        region: impl Into<String>,
        service: impl Into<String>,
    ) -> SigV4 {
        let service = service.into();
        SigV4 {
            content_sha256_header: service == "s3",
            credentials,
            region: region.into(),
            service,
            clock: None,
        }
    }

    /// Whether to send `x-amz-content-sha256` (default: only for service `s3`).
    #[must_use]
    pub fn content_sha256_header(mut self, send: bool) -> SigV4 {
        self.content_sha256_header = send;
        self
    }

    /// Signs as if the time were `at` (for tests against published examples).
    #[must_use]
    pub fn fixed_time(mut self, at: SystemTime) -> SigV4 {
        self.clock = Some(at);
        self
    }

    /// Signs a request at a given time.
    pub fn sign(&self, request: &mut PreparedRequest, at: SystemTime) -> Result<(), String> {
        let secret = resolve(&self.credentials.secret_access_key)?;
        let (date, datetime) = amz_dates(at);
        let payload_hash = hex(digest::digest(&digest::SHA256, request.body()).as_ref());

        let host = host_header(request)?;
        let headers = request.headers_mut();
        headers.insert("host", header_value(&host)?);
        headers.insert("x-amz-date", header_value(&datetime)?);
        if self.content_sha256_header {
            headers.insert("x-amz-content-sha256", header_value(&payload_hash)?);
        }
        if let Some(token) = &self.credentials.session_token {
            headers.insert("x-amz-security-token", header_value(&resolve(token)?)?);
        }

        let mut signed: Vec<(String, String)> = Vec::new();
        for (name, value) in request.headers() {
            let n = name.as_str();
            if matches!(
                n,
                "host" | "content-type" | "content-md5" | "range" | "date"
            ) || n.starts_with("x-amz-")
            {
                let v = value
                    .to_str()
                    .map_err(|_| format!("header {n} is not visible ASCII"))?;
                let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
                if let Some(existing) = signed.iter_mut().find(|(k, _)| k == n) {
                    existing.1.push(',');
                    existing.1.push_str(&v);
                } else {
                    signed.push((n.to_owned(), v));
                }
            }
        }
        signed.sort();
        let signed_headers = signed
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(";");
        let canonical_headers: String = signed.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();

        let canonical_request = format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            request.method().as_str(),
            self.canonical_uri(request.url().path()),
            canonical_query(request.url()),
            canonical_headers,
            signed_headers,
            payload_hash
        );
        let scope = format!("{date}/{}/{}/aws4_request", self.region, self.service);
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{datetime}\n{scope}\n{}",
            hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
        );
        let k_date = hmac_sha256(format!("AWS4{secret}").as_bytes(), date.as_bytes());
        let k_region = hmac_sha256(&k_date, self.region.as_bytes());
        let k_service = hmac_sha256(&k_region, self.service.as_bytes());
        let k_signing = hmac_sha256(&k_service, b"aws4_request");
        let signature = hex(&hmac_sha256(&k_signing, string_to_sign.as_bytes()));
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
            self.credentials.access_key_id
        );
        request
            .headers_mut()
            .insert("authorization", header_value(&authorization)?);
        Ok(())
    }

    fn canonical_uri(&self, path: &str) -> String {
        let path = if path.is_empty() { "/" } else { path };
        if self.service == "s3" {
            // S3 signs the path as sent (encoded once).
            path.to_owned()
        } else {
            // Other services sign each segment encoded twice.
            path.split('/')
                .map(|segment| uri_encode(segment, false))
                .collect::<Vec<_>>()
                .join("/")
        }
    }
}

impl Preprocessor for SigV4 {
    fn process(&self, request: &mut PreparedRequest) -> Result<(), String> {
        self.sign(request, self.clock.unwrap_or_else(SystemTime::now))
    }
}

fn resolve(secret: &Secret) -> Result<String, String> {
    match secret {
        Secret::Static(v) => Ok(v.clone()),
        Secret::Computed(f) => f(),
    }
}

fn header_value(v: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(v).map_err(|_| "a signed header value is not valid".to_owned())
}

fn host_header(request: &PreparedRequest) -> Result<String, String> {
    let url = request.url();
    let host = url.host_str().ok_or("the URL has no host")?;
    Ok(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

fn canonical_query(url: &url::Url) -> String {
    let mut pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (uri_encode(&k, true), uri_encode(&v, true)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// AWS's URI encoding: every byte but the unreserved characters as `%XX`.
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data).as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `(YYYYMMDD, YYYYMMDDTHHMMSSZ)` in UTC.
fn amz_dates(at: SystemTime) -> (String, String) {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    let date = format!("{y:04}{m:02}{d:02}");
    let datetime = format!(
        "{date}T{:02}{:02}{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    );
    (date, datetime)
}

/// Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Method};

    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn dates() {
        // 2013-05-24T00:00:00Z
        assert_eq!(
            amz_dates(at(1_369_353_600)),
            ("20130524".into(), "20130524T000000Z".into())
        );
        // 2015-08-30T12:36:00Z
        assert_eq!(amz_dates(at(1_440_938_160)).1, "20150830T123600Z");
    }

    /// The GET Object example of the S3 documentation ("Signature Calculations
    /// for the Authorization Header").
    #[test]
    fn s3_get_object_example() {
        let signer = SigV4::new(
            AwsCredentials {
                access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
                session_token: None,
            },
            "us-east-1",
            "s3",
        );
        let mut headers = HeaderMap::new();
        headers.insert("range", HeaderValue::from_static("bytes=0-9"));
        let mut req = PreparedRequest::new(
            Method::GET,
            "https://examplebucket.s3.amazonaws.com/test.txt"
                .parse()
                .unwrap(),
            headers,
            Bytes::new(),
        );
        signer.sign(&mut req, at(1_369_353_600)).unwrap();
        let auth = req.headers()["authorization"].to_str().unwrap();
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// `get-vanilla` of the AWS Signature Version 4 test suite.
    #[test]
    fn get_vanilla() {
        let signer = SigV4::new(
            AwsCredentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
                session_token: None,
            },
            "us-east-1",
            "service",
        );
        let mut req = PreparedRequest::new(
            Method::GET,
            "https://example.amazonaws.com/".parse().unwrap(),
            HeaderMap::new(),
            Bytes::new(),
        );
        signer.sign(&mut req, at(1_440_938_160)).unwrap();
        let auth = req.headers()["authorization"].to_str().unwrap();
        assert!(
            auth.ends_with(
                "SignedHeaders=host;x-amz-date, \
                 Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
            ),
            "{auth}"
        );
    }
}
