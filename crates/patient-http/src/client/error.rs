//! Errors of the transport: [`TransportError`] for a failed request and
//! [`ClientConfigError`] for an invalid [`ClientConfig`](super::ClientConfig).

use std::{error::Error as StdError, fmt, io};

pub use patient_wire::ErrorType;

/// The largest response head (status line and header fields) the client
/// reads: 64 KiB. A longer one, or one of more than 100 fields (HTTP/1.1),
/// fails the request with a `response_too_large` error of class
/// [`RESPONSE_HEAD_TOO_LARGE`], which is not retried: the same server
/// sends the same head again.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The class name of a response whose head is over [`MAX_RESPONSE_HEAD`]
/// (a body over its limit is `"ResponseTooLarge"`).
pub const RESPONSE_HEAD_TOO_LARGE: &str = "ResponseHeadTooLarge";

/// Where in the life of a request an error happened; chooses the wording of
/// the message and whether request bytes may have reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for a connection of an origin at its connection limit.
    Pool,
    /// Resolving, TCP connect, proxy tunnel, TLS and HTTP handshakes.
    Connect,
    /// Writing the request and waiting for the response head.
    Request,
    /// Reading the response body.
    Body,
}

impl Phase {
    fn describe(self) -> &'static str {
        match self {
            Phase::Pool => "waiting for a free connection to",
            Phase::Connect => "connecting to",
            Phase::Request => "sending the request to",
            Phase::Body => "reading the response body from",
        }
    }

    pub(crate) fn request_sent(self) -> bool {
        !matches!(self, Phase::Pool | Phase::Connect)
    }
}

/// A request that failed below HTTP semantics: the connection, TLS, a
/// timeout, or a response over `max_response_size`.
///
/// [`kind`](Self::kind) is the wire-level [`ErrorType`];
/// [`class_name`](Self::class_name) is a stable CamelCase name of the
/// underlying failure (`"Timeout"`, `"ConnectionRefused"`, `"TlsError"`, ...);
/// the message names what happened and the host.
pub struct TransportError {
    kind: ErrorType,
    class_name: &'static str,
    message: String,
    request_sent: bool,
    source: Option<Box<dyn StdError + Send + Sync>>,
}

impl TransportError {
    pub(crate) fn new(kind: ErrorType, class_name: &'static str, message: String) -> Self {
        TransportError {
            kind,
            class_name,
            message,
            request_sent: false,
            source: None,
        }
    }

    pub(crate) fn with_source(
        mut self,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn sent(mut self, request_sent: bool) -> Self {
        self.request_sent = request_sent;
        self
    }

    /// A request timeout (`Timeout`) or connect timeout (`ConnectTimeout`).
    pub(crate) fn timeout(
        class_name: &'static str,
        authority: &str,
        phase: Phase,
        after: std::time::Duration,
    ) -> Self {
        TransportError::new(
            ErrorType::Timeout,
            class_name,
            format!(
                "timed out after {after:?} while {} {authority}",
                phase.describe()
            ),
        )
        .sent(phase.request_sent())
    }

    /// The response is larger than `max_response_size`.
    pub(crate) fn too_large(authority: &str, limit: usize, detail: &str) -> Self {
        TransportError::new(
            ErrorType::ResponseTooLarge,
            "ResponseTooLarge",
            format!(
                "response from {authority} exceeds max_response_size of {limit} bytes ({detail})"
            ),
        )
        .sent(true)
    }

    /// An I/O error while `phase` with `authority`.
    pub(crate) fn from_io(err: io::Error, authority: &str, phase: Phase) -> Self {
        Self::from_io_ref(&err, authority, phase).with_source(err)
    }

    /// Like [`from_io`](Self::from_io), for an I/O error found inside
    /// another error (the caller sets the source).
    fn from_io_ref(err: &io::Error, authority: &str, phase: Phase) -> Self {
        let (kind, class_name) = classify_io(err, phase);
        TransportError::new(
            kind,
            class_name,
            format!(
                "{} while {} {authority}",
                describe_io(err, class_name),
                phase.describe()
            ),
        )
        .sent(phase.request_sent())
    }

    /// A failed TCP connect (resolving, or connecting to every address) to
    /// `authority`: a [`DnsError`] inside becomes `DnsError`, an I/O error is
    /// classified like any other (refused, reset, unreachable...).
    pub(crate) fn from_connect(err: Box<dyn StdError + Send + Sync>, authority: &str) -> Self {
        let chain: &(dyn StdError + 'static) = &*err;
        if let Some(dns) = find::<DnsError>(chain) {
            let message = dns.to_string();
            if dns.denied.is_some() {
                return TransportError::new(ErrorType::Unknown, "EgressDenied", message)
                    .with_source(err);
            }
            return TransportError::new(ErrorType::Connection, "DnsError", message)
                .with_source(err);
        }
        match find::<io::Error>(chain) {
            Some(io) => Self::from_io_ref(io, authority, Phase::Connect).with_source(err),
            None => TransportError::new(
                ErrorType::Connection,
                "ConnectionError",
                format!("{err} while connecting to {authority}"),
            )
            .with_source(err),
        }
    }

    /// The request body failed while it was being sent: the request was
    /// sent in part.
    pub(crate) fn request_body(source: Box<dyn StdError + Send + Sync>, authority: &str) -> Self {
        TransportError::new(
            ErrorType::Unknown,
            "RequestBodyError",
            format!("the request body failed while sending it to {authority}: {source}"),
        )
        .sent(true)
        .with_source(source)
    }

    /// A hyper error while `phase` with `authority`.
    pub(crate) fn from_hyper(err: hyper::Error, authority: &str, phase: Phase) -> Self {
        if err.is_parse_too_large() {
            return TransportError::new(
                ErrorType::ResponseTooLarge,
                RESPONSE_HEAD_TOO_LARGE,
                format!(
                    "the response head from {authority} is over {MAX_RESPONSE_HEAD} bytes or has too many fields"
                ),
            )
            .sent(phase.request_sent())
            .with_source(err);
        }
        let (kind, class_name, sent) = classify_hyper(&err, phase);
        TransportError::new(
            kind,
            class_name,
            format!("{err} while {} {authority}", phase.describe()),
        )
        .sent(sent)
        .with_source(err)
    }

    /// The wire-level error type.
    pub fn kind(&self) -> ErrorType {
        self.kind
    }

    /// A stable CamelCase name of the underlying failure, e.g. `"Timeout"`,
    /// `"ConnectTimeout"`, `"ConnectionRefused"`, `"ConnectionReset"`,
    /// `"ConnectionClosed"`, `"DnsError"`, `"TlsError"`, `"ResponseTooLarge"`,
    /// `"ResponseHeadTooLarge"`,
    /// `"IncompleteMessage"`, `"InvalidResponse"`, `"ProxyError"`,
    /// `"ProxyAuthenticationRequired"`, `"DecompressionError"`,
    /// `"StallTimeout"`, `"RequestBodyError"`.
    pub fn class_name(&self) -> &str {
        self.class_name
    }

    /// The human-readable message (also the `Display` output).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the request or the connect timed out.
    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorType::Timeout
    }

    /// Whether the error is a connection failure (refused, reset, closed,
    /// malformed response, proxy failure).
    pub fn is_connect(&self) -> bool {
        self.kind == ErrorType::Connection
    }

    /// Whether the error is a TLS failure (handshake, untrusted certificate).
    pub fn is_tls(&self) -> bool {
        self.kind == ErrorType::Ssl
    }

    /// Whether the response exceeded `max_response_size`, or its head
    /// [`MAX_RESPONSE_HEAD`].
    pub fn is_too_large(&self) -> bool {
        self.kind == ErrorType::ResponseTooLarge
    }

    /// Whether the response head was over [`MAX_RESPONSE_HEAD`] (or had too
    /// many fields).
    pub fn is_head_too_large(&self) -> bool {
        self.class_name == RESPONSE_HEAD_TOO_LARGE
    }

    /// Whether the request body (a stream) failed while it was being sent
    /// (`"RequestBodyError"`; the body's own error is the
    /// [`source`](StdError::source)).
    pub fn is_request_body(&self) -> bool {
        self.class_name == "RequestBodyError"
    }

    /// Whether any byte of the request may have reached the server. `false`
    /// means the request certainly was not sent and can be retried safely,
    /// whatever its method.
    pub fn request_sent(&self) -> bool {
        self.request_sent
    }
}

impl fmt::Debug for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TransportError")
            .field("kind", &self.kind)
            .field("class_name", &self.class_name)
            .field("message", &self.message)
            .field("request_sent", &self.request_sent)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for TransportError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

fn describe_io(err: &io::Error, class_name: &str) -> String {
    match class_name {
        "TlsError" => format!("TLS error ({err})"),
        _ => err.to_string(),
    }
}

/// Finds a rustls error inside an I/O error.
fn tls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

pub(crate) fn classify_io(err: &io::Error, phase: Phase) -> (ErrorType, &'static str) {
    if tls_error(err).is_some() {
        return (ErrorType::Ssl, "TlsError");
    }
    use io::ErrorKind as K;
    match err.kind() {
        K::ConnectionRefused => (ErrorType::Connection, "ConnectionRefused"),
        K::ConnectionReset | K::BrokenPipe => (ErrorType::Connection, "ConnectionReset"),
        K::ConnectionAborted => (ErrorType::Connection, "ConnectionAborted"),
        K::UnexpectedEof if phase == Phase::Body => (ErrorType::Connection, "IncompleteMessage"),
        K::UnexpectedEof => (ErrorType::Connection, "ConnectionClosed"),
        K::TimedOut => (ErrorType::Timeout, "Timeout"),
        K::InvalidData | K::InvalidInput => (ErrorType::Connection, "InvalidResponse"),
        K::AddrNotAvailable | K::NetworkUnreachable | K::HostUnreachable => {
            (ErrorType::Connection, "ConnectionFailed")
        }
        _ => (ErrorType::Connection, "ConnectionError"),
    }
}

/// The first `T` in the source chain of `err` (`err` included).
fn find<'a, T: StdError + 'static>(err: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// A host name that could not be resolved.
#[derive(Debug)]
pub(crate) struct DnsError {
    host: String,
    source: Option<io::Error>,
    /// Every address was refused by the address filter: the first, and why.
    denied: Option<(std::net::IpAddr, String)>,
}

impl DnsError {
    pub(crate) fn new(host: &str, source: Option<io::Error>) -> Self {
        DnsError {
            host: host.to_owned(),
            source,
            denied: None,
        }
    }

    pub(crate) fn denied(host: &str, ip: std::net::IpAddr, reason: String) -> Self {
        DnsError {
            host: host.to_owned(),
            source: None,
            denied: Some((ip, reason)),
        }
    }
}

impl fmt::Display for DnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.denied, &self.source) {
            (Some((ip, reason)), _) => write!(
                f,
                "refused to connect to {ip} ({} resolved to it): {reason}",
                self.host
            ),
            (None, Some(e)) => write!(f, "failed to resolve {}: {e}", self.host),
            (None, None) => write!(f, "{} resolved to no address", self.host),
        }
    }
}

impl StdError for DnsError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_ref().map(|e| e as &(dyn StdError + 'static))
    }
}

/// Kind, class name and whether the request may have been sent.
fn classify_hyper(err: &hyper::Error, phase: Phase) -> (ErrorType, &'static str, bool) {
    let sent = phase.request_sent();
    if err.is_timeout() {
        return (ErrorType::Timeout, "Timeout", sent);
    }
    if err.is_parse() || err.is_parse_status() {
        return (ErrorType::Connection, "InvalidResponse", sent);
    }
    if err.is_incomplete_message() {
        return (ErrorType::Connection, "IncompleteMessage", sent);
    }
    if err.is_canceled() && phase != Phase::Body {
        // hyper reports "canceled" when the connection closed before the
        // request was written.
        return (ErrorType::Connection, "ConnectionClosed", false);
    }
    if let Some(io) = find::<io::Error>(err) {
        let (kind, class_name) = classify_io(io, phase);
        return (kind, class_name, sent);
    }
    if err.is_closed() || err.is_canceled() {
        return (ErrorType::Connection, "ConnectionClosed", sent);
    }
    if err.is_user() {
        return (ErrorType::Unknown, "InvalidRequest", false);
    }
    (ErrorType::Connection, "ProtocolError", sent)
}

/// An invalid client setting; [`field`](Self::field) names it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid client config `{field}`: {reason}")]
pub struct ClientConfigError {
    field: &'static str,
    reason: String,
}

impl ClientConfigError {
    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ClientConfigError {
            field,
            reason: reason.into(),
        }
    }

    /// The name of the invalid setting, e.g. `"max_response_size"`.
    pub fn field(&self) -> &'static str {
        self.field
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}
