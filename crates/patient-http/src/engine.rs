//! The request path shared by the processor, the inline executor and the
//! awaitable client: secrets, preprocessors, the transport, redirects and the
//! wrapping of every failure into a wire-format error.

use std::{
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue as HttpHeaderValue};
use patient_wire::{
    ErrorType, HeaderValue, Headers, HttpError, Method, RedirectError, RedirectErrorKind,
    RequestError, Response, TaskError,
};
use url::Url;

use crate::{
    client::{HttpClient, OutgoingRequest, TransportError},
    observer::{RequestEnd, RequestStart},
    preprocess::{PreparedRequest, Preprocessors},
    secret::Secrets,
    Config, ProcessorObserver, Task,
};

/// Everything needed to run a task, shared by every face.
pub(crate) struct Engine {
    pub(crate) config: Config,
    pub(crate) client: HttpClient,
    pub(crate) secrets: Secrets,
    pub(crate) preprocessors: Preprocessors,
    pub(crate) observers: Vec<Arc<dyn ProcessorObserver>>,
    /// Panics caught in handlers and observers.
    pub(crate) panics: AtomicU64,
}

/// One hop of a task: what is sent next.
struct Hop {
    method: Method,
    /// The URL as the task knows it (no secret values).
    url: Url,
    headers: Headers,
    body: Option<Bytes>,
    preprocessors: bool,
    secret_params: bool,
}

impl Engine {
    /// Calls `f` on every observer, catching and reporting panics.
    pub(crate) fn notify(&self, f: impl Fn(&dyn ProcessorObserver)) {
        for observer in &self.observers {
            if catch_unwind(AssertUnwindSafe(|| f(observer.as_ref()))).is_err() {
                self.panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!("a processor observer panicked; the panic was contained");
            }
        }
    }

    /// Runs a task to its outcome: a response, or a wire-format error.
    pub(crate) async fn execute(&self, task: &Task) -> Result<Response, TaskError> {
        let started = Instant::now();
        let request = &task.request;
        let timeout = request
            .timeout()
            .unwrap_or(self.config.client.request_timeout);
        let deadline = started + timeout;
        let max_redirects = request.max_redirects().unwrap_or(self.config.max_redirects);
        let raise = task
            .raise_error_responses
            .unwrap_or(self.config.raise_error_responses);

        let mut hop = Hop {
            method: request.method(),
            url: request.url().clone(),
            headers: request.headers().clone(),
            body: request.body().cloned(),
            preprocessors: true,
            secret_params: true,
        };
        let mut redirects: Vec<String> = Vec::new();
        let mut hop_number = 1u32;

        let result = loop {
            let hop_id = if hop_number == 1 {
                task.id.clone()
            } else {
                format!("{}/{hop_number}", task.id)
            };
            let now = Instant::now();
            if now >= deadline {
                break Err(self.request_error(
                    task,
                    &hop,
                    started,
                    ErrorType::Timeout,
                    "Timeout",
                    format!("request timed out after {:.3}s", timeout.as_secs_f64()),
                ));
            }
            let outgoing = match self.prepare(task, &hop, deadline - now) {
                Ok(outgoing) => outgoing,
                Err((class, message)) => {
                    break Err(self.request_error(
                        task,
                        &hop,
                        started,
                        ErrorType::Unknown,
                        class,
                        message,
                    ))
                }
            };
            let url_str = hop.url.as_str();
            self.notify(|o| {
                o.on_request_start(&RequestStart {
                    hop_id: &hop_id,
                    method: hop.method,
                    url: url_str,
                })
            });
            let sent_at = Instant::now();
            let raw = match self.client.send(outgoing).await {
                Ok(raw) => raw,
                Err(e) => break Err(self.transport_error(task, &hop, started, e)),
            };
            self.notify(|o| {
                o.on_request_end(&RequestEnd {
                    hop_id: &hop_id,
                    method: hop.method,
                    url: url_str,
                    status: raw.status,
                    duration: sent_at.elapsed(),
                })
            });

            // Redirects.
            if matches!(raw.status, 301 | 302 | 303 | 307 | 308) && max_redirects > 0 {
                if let Some(location) = raw
                    .headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                {
                    let next = match hop.url.join(location) {
                        Ok(next) => next,
                        Err(e) => {
                            break Err(self.request_error(
                                task,
                                &hop,
                                started,
                                ErrorType::Unknown,
                                "InvalidRedirectLocation",
                                format!("redirect to an invalid location {location:?}: {e}"),
                            ))
                        }
                    };
                    if redirects.len() >= max_redirects as usize {
                        let mut chain = redirects.clone();
                        chain.push(hop.url.to_string());
                        break Err(TaskError::Redirect(RedirectError {
                            kind: RedirectErrorKind::TooManyRedirects,
                            url: next.to_string(),
                            method: hop.method,
                            duration: started.elapsed(),
                            request_id: task.id.clone(),
                            redirects: chain,
                            callback_args: task.callback_args.clone(),
                        }));
                    }
                    let next_str = next.as_str();
                    if next_str == hop.url.as_str() || redirects.iter().any(|u| u == next_str) {
                        let mut chain = redirects.clone();
                        chain.push(hop.url.to_string());
                        break Err(TaskError::Redirect(RedirectError {
                            kind: RedirectErrorKind::RecursiveRedirect,
                            url: next.to_string(),
                            method: hop.method,
                            duration: started.elapsed(),
                            request_id: task.id.clone(),
                            redirects: chain,
                            callback_args: task.callback_args.clone(),
                        }));
                    }
                    redirects.push(hop.url.to_string());
                    hop = redirect_hop(hop, raw.status, next);
                    hop_number += 1;
                    continue;
                }
            }

            let response = Response {
                status: raw.status,
                headers: wire_headers(&raw.headers),
                body: if raw.body.is_empty() {
                    None
                } else {
                    Some(raw.body)
                },
                duration: started.elapsed(),
                request_id: task.id.clone(),
                url: hop.url.to_string(),
                method: hop.method,
                callback_args: task.callback_args.clone(),
                redirects,
            };
            if raise && !response.is_success() {
                break Err(TaskError::Http(HttpError { response }));
            }
            break Ok(response);
        };
        if let Err(error) = &result {
            self.notify(|o| o.on_request_error(error));
        }
        result
    }

    /// Resolves secrets, builds the outgoing request and runs preprocessors.
    fn prepare(
        &self,
        task: &Task,
        hop: &Hop,
        remaining: Duration,
    ) -> Result<OutgoingRequest, (&'static str, String)> {
        let mut url = hop.url.clone();
        if hop.secret_params && !task.request.secret_params().is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, secret) in task.request.secret_params() {
                let value = self
                    .secrets
                    .resolve(&secret.name)
                    .map_err(|e| ("SecretError", e.to_string()))?;
                pairs.append_pair(name, &value);
            }
        }
        let mut headers = HeaderMap::with_capacity(hop.headers.len() + 2);
        for (name, value) in hop.headers.iter() {
            let header_name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ("InvalidHeader", format!("invalid header name {name:?}")))?;
            let value = match value {
                HeaderValue::Value(v) => HttpHeaderValue::from_str(v),
                HeaderValue::Secret(secret) => {
                    let v = self
                        .secrets
                        .resolve(&secret.name)
                        .map_err(|e| ("SecretError", e.to_string()))?;
                    let mut v = HttpHeaderValue::from_str(&v);
                    if let Ok(v) = &mut v {
                        v.set_sensitive(true);
                    }
                    v
                }
            }
            .map_err(|_| ("InvalidHeader", format!("invalid value for header {name}")))?;
            headers.append(header_name, value);
        }
        let method = http_method(hop.method);
        let body = hop.body.clone().unwrap_or_default();
        let names = task.request.preprocessors();
        let (method, url, headers, body) = if hop.preprocessors && !names.is_empty() {
            let mut prepared = PreparedRequest::new(method, url, headers, body);
            self.preprocessors
                .run(names, &mut prepared)
                .map_err(|e| ("PreprocessError", e.to_string()))?;
            prepared.into_parts()
        } else {
            (method, url, headers, body)
        };
        Ok(OutgoingRequest {
            method,
            url,
            headers,
            body,
            timeout: Some(remaining),
        })
    }

    fn request_error(
        &self,
        task: &Task,
        hop: &Hop,
        started: Instant,
        error_type: ErrorType,
        class_name: &str,
        message: String,
    ) -> TaskError {
        TaskError::Request(RequestError {
            class_name: class_name.to_owned(),
            message,
            backtrace: Vec::new(),
            request_id: task.id.clone(),
            error_type,
            duration: started.elapsed(),
            url: hop.url.to_string(),
            method: hop.method,
            callback_args: task.callback_args.clone(),
        })
    }

    fn transport_error(
        &self,
        task: &Task,
        hop: &Hop,
        started: Instant,
        error: TransportError,
    ) -> TaskError {
        self.request_error(
            task,
            hop,
            started,
            error.kind(),
            error.class_name(),
            error.to_string(),
        )
    }
}

/// The next hop after a redirect response.
fn redirect_hop(mut hop: Hop, status: u16, next: Url) -> Hop {
    let cross_origin = next.scheme() != hop.url.scheme()
        || next.host_str() != hop.url.host_str()
        || next.port_or_known_default() != hop.url.port_or_known_default();
    if matches!(status, 301..=303) {
        if hop.method != Method::Head {
            hop.method = Method::Get;
        }
        hop.body = None;
        hop.headers.remove("content-type");
        hop.headers.remove("content-length");
        hop.headers.remove("content-encoding");
    }
    if cross_origin {
        hop.headers.remove("authorization");
        hop.headers.remove("cookie");
        // A secret never follows a redirect to another origin.
        let secret_names: Vec<String> = hop
            .headers
            .iter()
            .filter(|(_, v)| matches!(v, HeaderValue::Secret(_)))
            .map(|(k, _)| k.to_owned())
            .collect();
        for name in secret_names {
            hop.headers.remove(&name);
        }
        hop.preprocessors = false;
    }
    // Secret query parameters were sent to the first URL only.
    hop.secret_params = false;
    hop.url = next;
    hop
}

fn http_method(method: Method) -> http::Method {
    match method {
        Method::Get => http::Method::GET,
        Method::Post => http::Method::POST,
        Method::Put => http::Method::PUT,
        Method::Patch => http::Method::PATCH,
        Method::Delete => http::Method::DELETE,
        Method::Head => http::Method::HEAD,
        Method::Options => http::Method::OPTIONS,
    }
}

/// Response headers in wire form: lower-cased names, repeated headers joined
/// with `, `. A value that is not UTF-8 is read as Latin-1, so no byte is lost.
pub(crate) fn wire_headers(map: &HeaderMap) -> Headers {
    let mut headers = Headers::new();
    for name in map.keys() {
        let mut joined = String::new();
        for (i, value) in map.get_all(name).iter().enumerate() {
            if i > 0 {
                joined.push_str(", ");
            }
            match std::str::from_utf8(value.as_bytes()) {
                Ok(s) => joined.push_str(s),
                Err(_) => joined.extend(value.as_bytes().iter().map(|&b| b as char)),
            }
        }
        headers.insert(name.as_str(), joined);
    }
    headers
}
