//! AWS Signature Version 4, as a built-in preprocessor.
//!
//! Written here rather than taken from `aws-sigv4`: that crate brings the AWS
//! SDK's runtime and a second HTTP stack, for one page of HMAC over `ring`,
//! which the TLS stack already compiles.

use std::{
    fmt,
    time::{SystemTime, UNIX_EPOCH},
};

use http::{
    header::{AUTHORIZATION, HOST},
    HeaderMap, HeaderName, HeaderValue,
};
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

/// Headers never signed: the signature itself, and the headers that proxies
/// and the transport may add, change or drop on the way.
const UNSIGNED_HEADERS: [&str; 12] = [
    "authorization",
    "connection",
    "expect",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "x-amzn-trace-id",
];

const X_AMZ_DATE: HeaderName = HeaderName::from_static("x-amz-date");
const X_AMZ_CONTENT_SHA256: HeaderName = HeaderName::from_static("x-amz-content-sha256");
const X_AMZ_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");

/// Signs requests with AWS Signature Version 4 (header form).
///
/// Sets `host` (from the URL), `x-amz-date`, `authorization`,
/// `x-amz-security-token` (with a session token) and, for S3 or when asked,
/// `x-amz-content-sha256`. Every header of the request is signed except
/// `authorization`, `user-agent`, `expect`, `x-amzn-trace-id` and the
/// hop-by-hop headers (`connection`, `keep-alive`, `proxy-authorization`,
/// `proxy-connection`, `te`, `trailer`, `transfer-encoding`, `upgrade`),
/// which proxies and the transport may change on the way. Header values are
/// signed trimmed, with each run of spaces and tabs as one space, and the
/// values of a repeated header joined with commas.
///
/// The path is signed the way the service checks it: S3 signs it as sent,
/// each segment decoded and encoded once; other services first remove `.`,
/// `..` and empty segments, then encode the path as sent a second time (see
/// [`s3_path_rules`](Self::s3_path_rules)). Query parameters are read as form
/// data (`+` is a space), encoded again and sorted by name, then value.
#[derive(Debug, Clone)]
pub struct SigV4 {
    credentials: AwsCredentials,
    region: String,
    service: String,
    content_sha256_header: bool,
    s3_path_rules: bool,
    sign_session_token: bool,
    clock: Option<SystemTime>,
}

/// What [`SigV4::sign`] computed, step by step.
///
/// When a service rejects a signature, its error quotes the canonical request
/// and the string to sign it computed; these are ours to compare.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SignatureParts {
    /// The canonical request: method, path, query, headers, signed header
    /// names and payload hash, one per line.
    pub canonical_request: String,
    /// The string to sign: algorithm, time, credential scope and the hash of
    /// the canonical request.
    pub string_to_sign: String,
    /// The names of the signed headers, sorted and joined with `;`.
    pub signed_headers: String,
    /// The signature, in lower-case hex.
    pub signature: String,
    /// The `authorization` header value that was set.
    pub authorization: String,
}

impl SigV4 {
    /// A signer for a region and a service (`s3`, `execute-api`, `bedrock`, …).
    pub fn new(
        credentials: AwsCredentials,
        region: impl Into<String>,
        service: impl Into<String>,
    ) -> SigV4 {
        let service = service.into();
        let s3 = service == "s3";
        SigV4 {
            content_sha256_header: s3,
            s3_path_rules: s3,
            sign_session_token: true,
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

    /// Whether to sign the path by S3's rules (default: only for service `s3`).
    ///
    /// S3 signs the path as sent: `.`, `..` and empty segments stay, and each
    /// segment is signed encoded once (decoded, then encoded the AWS way).
    /// Other services sign the path with those segments removed and encoded
    /// a second time, as sent (`%20` is signed as `%2520`).
    #[must_use]
    pub fn s3_path_rules(mut self, s3: bool) -> SigV4 {
        self.s3_path_rules = s3;
        self
    }

    /// Whether the session token is part of the signature (default: yes).
    ///
    /// With `false`, `x-amz-security-token` is still sent but added after
    /// signing, as some services want it.
    #[must_use]
    pub fn sign_session_token(mut self, sign: bool) -> SigV4 {
        self.sign_session_token = sign;
        self
    }

    /// Signs as if the time were `at` (for tests against published examples).
    #[must_use]
    pub fn fixed_time(mut self, at: SystemTime) -> SigV4 {
        self.clock = Some(at);
        self
    }

    /// Signs a request at a given time: sets the headers listed on [`SigV4`]
    /// and returns what the signature was computed from.
    ///
    /// Computed secrets are resolved here; an async one
    /// ([`Secret::ComputedAsync`]) cannot be, and is an error: sign through
    /// [`Preprocessor::process`], which awaits it.
    pub fn sign(
        &self,
        request: &mut PreparedRequest,
        at: SystemTime,
    ) -> Result<SignatureParts, String> {
        let secret = resolve(&self.credentials.secret_access_key)?;
        let token = match &self.credentials.session_token {
            Some(token) => Some(resolve(token)?),
            None => None,
        };
        self.sign_with(request, at, &secret, token.as_deref())
    }

    /// [`sign`](Self::sign) with the credentials' secrets resolved.
    fn sign_with(
        &self,
        request: &mut PreparedRequest,
        at: SystemTime,
        secret: &str,
        token: Option<&str>,
    ) -> Result<SignatureParts, String> {
        let token = match token {
            Some(token) => {
                let mut value = header_value(&X_AMZ_SECURITY_TOKEN, token)?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let (date, datetime) = amz_dates(at);
        let payload_hash = hex(digest::digest(&digest::SHA256, request.body()).as_ref());
        let host = host_header(request.url())?;

        let headers = request.headers_mut();
        headers.insert(HOST, header_value(&HOST, &host)?);
        headers.insert(X_AMZ_DATE, header_value(&X_AMZ_DATE, &datetime)?);
        if self.content_sha256_header {
            headers.insert(
                X_AMZ_CONTENT_SHA256,
                header_value(&X_AMZ_CONTENT_SHA256, &payload_hash)?,
            );
        }
        if let Some(token) = &token {
            if self.sign_session_token {
                headers.insert(X_AMZ_SECURITY_TOKEN, token.clone());
            } else {
                // Set after signing: a value the request carried is not signed either.
                headers.remove(X_AMZ_SECURITY_TOKEN);
            }
        }

        let signed = canonical_headers(request.headers())?;
        let mut canonical_headers = String::new();
        let mut signed_headers = String::new();
        for (name, value) in &signed {
            canonical_headers.push_str(name);
            canonical_headers.push(':');
            canonical_headers.push_str(value);
            canonical_headers.push('\n');
            if !signed_headers.is_empty() {
                signed_headers.push(';');
            }
            signed_headers.push_str(name);
        }
        let canonical_request = format!(
            "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
            request.method().as_str(),
            self.canonical_uri(request.url().path()),
            canonical_query(request.url().query()),
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
        let mut value = header_value(&AUTHORIZATION, &authorization)?;
        value.set_sensitive(true);
        let headers = request.headers_mut();
        headers.insert(AUTHORIZATION, value);
        if let (Some(token), false) = (token, self.sign_session_token) {
            headers.insert(X_AMZ_SECURITY_TOKEN, token);
        }
        Ok(SignatureParts {
            canonical_request,
            string_to_sign,
            signed_headers,
            signature,
            authorization,
        })
    }

    /// The canonical URI of a path as sent (the URL's, percent-encoded).
    fn canonical_uri(&self, path: &str) -> String {
        let mut out = String::with_capacity(path.len() + 8);
        if self.s3_path_rules {
            if path.is_empty() {
                out.push('/');
            }
            for (i, segment) in path.split('/').enumerate() {
                if i > 0 {
                    out.push('/');
                }
                uri_encode_into(&mut out, &percent_decode(segment, false));
            }
        } else {
            let (segments, trailing_slash) = normalized_segments(path);
            out.push('/');
            for (i, segment) in segments.iter().enumerate() {
                if i > 0 {
                    out.push('/');
                }
                uri_encode_into(&mut out, segment.as_bytes());
            }
            if trailing_slash && !segments.is_empty() {
                out.push('/');
            }
        }
        out
    }
}

#[async_trait::async_trait]
impl Preprocessor for SigV4 {
    /// Signs the request now (or at the [`fixed_time`](SigV4::fixed_time)),
    /// awaiting secrets that are computed asynchronously.
    async fn process(&self, request: &mut PreparedRequest) -> Result<(), String> {
        let secret = self.credentials.secret_access_key.value().await?;
        let token = match &self.credentials.session_token {
            Some(token) => Some(token.value().await?),
            None => None,
        };
        let at = self.clock.unwrap_or_else(SystemTime::now);
        self.sign_with(request, at, &secret, token.as_deref())
            .map(|_| ())
    }
}

fn resolve(secret: &Secret) -> Result<String, String> {
    match secret {
        Secret::Static(v) => Ok(v.clone()),
        Secret::Computed(f) => f(),
        Secret::ComputedAsync(_) => Err(
            "a secret computed asynchronously cannot be resolved here: sign through the preprocessor"
                .to_owned(),
        ),
    }
}

fn header_value(name: &HeaderName, value: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(value).map_err(|_| format!("the value for header {name} is not valid"))
}

/// `host[:port]` of the URL, as the transport sends it (no default port).
fn host_header(url: &url::Url) -> Result<String, String> {
    let host = url.host_str().ok_or("the URL has no host")?;
    Ok(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// The signed headers, sorted by name: each value trimmed, runs of spaces
/// and tabs made one space, repeated headers joined with commas.
fn canonical_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, String> {
    let mut signed = Vec::with_capacity(headers.keys_len());
    for name in headers.keys() {
        let name = name.as_str();
        if UNSIGNED_HEADERS.contains(&name) {
            continue;
        }
        let mut joined = String::new();
        for (i, value) in headers.get_all(name).iter().enumerate() {
            let value = std::str::from_utf8(value.as_bytes())
                .map_err(|_| format!("header {name} is not UTF-8, so it cannot be signed"))?;
            if i > 0 {
                joined.push(',');
            }
            for (j, word) in value
                .split([' ', '\t'])
                .filter(|w| !w.is_empty())
                .enumerate()
            {
                if j > 0 {
                    joined.push(' ');
                }
                joined.push_str(word);
            }
        }
        signed.push((name.to_owned(), joined));
    }
    signed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(signed)
}

/// The segments of a path with `.`, `..` and empty segments resolved
/// (RFC 3986 section 5.2.4, repeated slashes collapsed), and whether the
/// normalized path ends in a slash.
fn normalized_segments(path: &str) -> (Vec<&str>, bool) {
    let mut segments = Vec::new();
    let mut trailing_slash = false;
    for segment in path.split('/') {
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop();
                trailing_slash = true;
            }
            _ => {
                segments.push(segment);
                trailing_slash = false;
            }
        }
    }
    (segments, trailing_slash)
}

/// The canonical query string: parameters read as form data, encoded the
/// AWS way and sorted by name, then value.
fn canonical_query(query: Option<&str>) -> String {
    let Some(query) = query else {
        return String::new();
    };
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (
                uri_encode(&percent_decode(name, true)),
                uri_encode(&percent_decode(value, true)),
            )
        })
        .collect();
    pairs.sort_unstable();
    let mut out = String::with_capacity(query.len() + 8);
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(name);
        out.push('=');
        out.push_str(value);
    }
    out
}

/// The bytes `%XX` escapes stand for (and `+` a space, in form data); a `%`
/// not followed by two hex digits stays as it is.
fn percent_decode(s: &str, plus_is_space: bool) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex_digit(b)),
                bytes.get(i + 2).and_then(|&b| hex_digit(b)),
            ) {
                (Some(high), Some(low)) => {
                    out.push(high << 4 | low);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' if plus_is_space => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// AWS's URI encoding: every byte but the unreserved characters as `%XX`.
fn uri_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    uri_encode_into(&mut out, bytes);
    out
}

fn uri_encode_into(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&key, data).as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 0xf)] as char);
    }
    out
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
    fn signer(service: &str) -> SigV4 {
        SigV4::new(
            AwsCredentials {
                access_key_id: "AKIDEXAMPLE".into(),
                secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
                session_token: None,
            },
            "us-east-1",
            service,
        )
    }

    #[test]
    fn paths_normalize_like_rfc_3986_with_repeated_slashes_collapsed() {
        let cases = [
            ("", "/"),
            ("/", "/"),
            ("//", "/"),
            ("//example//", "/example/"),
            ("/example/..", "/"),
            ("/a/b/..", "/a/"),
            ("/a/./b/.", "/a/b/"),
            ("/../a", "/a"),
            ("/a//b", "/a/b"),
            ("/a/b", "/a/b"),
        ];
        for (path, normalized) in cases {
            let (segments, trailing_slash) = normalized_segments(path);
            let mut joined = format!("/{}", segments.join("/"));
            if trailing_slash && !segments.is_empty() {
                joined.push('/');
            }
            assert_eq!(joined, normalized, "{path:?}");
        }
    }

    #[test]
    fn other_services_encode_the_path_as_sent_a_second_time() {
        let signer = signer("execute-api");
        assert_eq!(
            signer.canonical_uri("/a%20b/%2F/x+y"),
            "/a%2520b/%252F/x%2By"
        );
        assert_eq!(signer.canonical_uri("//a//b/"), "/a/b/");
    }

    #[test]
    fn s3_encodes_each_segment_once_and_keeps_the_separators() {
        let signer = signer("s3");
        // `%2F` inside a segment is not a separator.
        assert_eq!(signer.canonical_uri("/a%2Fb//c/"), "/a%2Fb//c/");
        // Characters a URL sends unescaped, and lower-case escapes.
        assert_eq!(
            signer.canonical_uri("/a+b!$*(')"),
            "/a%2Bb%21%24%2A%28%27%29"
        );
        assert_eq!(signer.canonical_uri("/%e1%88%b4"), "/%E1%88%B4");
        // A `%` that is no escape is a character of its own.
        assert_eq!(signer.canonical_uri("/100%/%zz"), "/100%25/%25zz");
    }

    #[test]
    fn query_parameters_are_form_data_encoded_again() {
        let canonical = |q| canonical_query(Some(q));
        assert_eq!(canonical(""), "");
        assert_eq!(canonical("&&"), "");
        assert_eq!(canonical("q=a+b%2Bc"), "q=a%20b%2Bc");
        assert_eq!(canonical("%e1%88%b4=%7e"), "%E1%88%B4=~");
        assert_eq!(canonical("k=a=b"), "k=a%3Db");
        // Bytes that are not UTF-8 are signed as sent, not replaced.
        assert_eq!(canonical("a=%FF"), "a=%FF");
        assert_eq!(canonical("b=1&a=2&a=10"), "a=10&a=2&b=1");
        assert_eq!(canonical_query(None), "");
    }

    #[test]
    fn header_values_trim_spaces_and_tabs_and_join_repeats() {
        let mut headers = HeaderMap::new();
        headers.append("x-b", HeaderValue::from_static("\t a \t\t b  "));
        headers.append("x-b", HeaderValue::from_static(""));
        headers.append("x-a", HeaderValue::from_static("1"));
        headers.append("user-agent", HeaderValue::from_static("agent"));
        headers.append("x-c", HeaderValue::from_str("caf\u{e9}").unwrap());
        assert_eq!(
            canonical_headers(&headers).unwrap(),
            [
                ("x-a".to_owned(), "1".to_owned()),
                ("x-b".to_owned(), "a b,".to_owned()),
                ("x-c".to_owned(), "caf\u{e9}".to_owned()),
            ]
        );
    }

    #[test]
    fn a_header_that_is_not_utf8_is_refused_by_name() {
        let mut req = PreparedRequest::new(
            Method::GET,
            "https://example.amazonaws.com/".parse().unwrap(),
            HeaderMap::new(),
            Bytes::new(),
        );
        req.headers_mut()
            .insert("x-odd", HeaderValue::from_bytes(b"\xff").unwrap());
        let error = signer("service").sign(&mut req, at(0)).unwrap_err();
        assert!(error.contains("x-odd"), "{error}");
    }
}
