//! [`DaemonClient`]: the handle, its builder and the API's calls.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use patient_http::client::{ClientConfig, HttpClient, OutgoingRequest};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use url::Url;

use crate::{
    blocking::Worker,
    error::ClientError,
    submit::{Deliver, Submit},
    ListFilter, TaskInfo, TaskList,
};

/// The environment variable [`DaemonClient::from_env`] reads the daemon's
/// URL from.
pub const URL_ENV: &str = "PATIENT_URL";

/// The environment variable [`DaemonClient::from_env`] reads the API token
/// from.
pub const TOKEN_ENV: &str = "PATIENT_API_TOKEN";

/// The daemon's URL when none is given: its default `listen` address.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8750";

/// A client of the daemon's API (`patient serve`): submit tasks, read,
/// list, cancel, redeliver and retry them, wait for their outcome; and, as
/// a [`Dispatch`](patient_http::Dispatch), hand tasks over from synchronous
/// code (see [`DaemonClient::submit_blocking`]).
///
/// Cheap to clone: clones share the connection pool and the dispatch
/// thread. The `async` calls run on the caller's tokio runtime.
///
/// The inherent [`get`](Self::get) reads a task; the
/// [`Dispatch`](patient_http::Dispatch) shortcut of the same name submits a
/// GET request: call it as `Dispatch::get(&client, url, callback, options)`.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
///
/// use patient_client::{DaemonClient, Submit};
/// use patient_wire::Request;
///
/// let client = DaemonClient::from_env()?;
/// let request = Request::get("https://api.example.com/v1/report").build()?;
/// let task = client.submit(&Submit::new(request).with_callback("ReportReady")).await?;
/// let done = client.wait(&task.id, Some(Duration::from_secs(60))).await?;
/// if let Some(response) = done.outcome.as_ref().map(|o| o.response()).transpose()?.flatten() {
///     println!("{} {}", done.id, response.status);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct DaemonClient {
    pub(crate) core: Arc<Core>,
    /// Started by the first blocking call; shared by clones.
    pub(crate) worker: Arc<OnceLock<Result<Worker, String>>>,
    /// What [`Dispatch::dispatch`](patient_http::Dispatch::dispatch) adds to
    /// each submit.
    pub(crate) dispatch: DispatchDefaults,
}

impl std::fmt::Debug for DaemonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonClient")
            .field("base_url", &self.core.base.as_str())
            .field("token", &self.core.token.as_ref().map(|_| "<redacted>"))
            .field("deliver", &self.dispatch.deliver)
            .finish_non_exhaustive()
    }
}

/// The submit options [`Dispatch`](patient_http::Dispatch) adds to a task.
#[derive(Debug, Clone, Default)]
pub(crate) struct DispatchDefaults {
    pub(crate) deliver: Option<Deliver>,
    pub(crate) key_from_task_id: bool,
    pub(crate) idempotency_key: Option<String>,
}

/// What the calls share: where the daemon is, the token and the transport.
pub(crate) struct Core {
    pub(crate) base: Url,
    pub(crate) token: Option<HeaderValue>,
    pub(crate) http: HttpClient,
    pub(crate) poll_interval: Duration,
}

impl Core {
    /// The same daemon and settings over a new connection pool (for another
    /// runtime).
    pub(crate) fn with_new_pool(&self) -> Result<Core, ClientError> {
        Ok(Core {
            base: self.base.clone(),
            token: self.token.clone(),
            http: HttpClient::new(self.http.config().clone())
                .map_err(|e| ClientError::config("transport", e.to_string()))?,
            poll_interval: self.poll_interval,
        })
    }

    /// `{base}/v1/tasks` followed by the segments (each percent-encoded).
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["v1", "tasks"]).extend(segments);
        }
        url
    }

    /// Sends one call and reads its JSON answer into `T`; an error answer
    /// becomes the [`ClientError`] it describes.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: Url,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let mut headers = HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("patient-client/", env!("CARGO_PKG_VERSION"))),
        );
        if let Some(token) = &self.token {
            headers.insert(header::AUTHORIZATION, token.clone());
        }
        let mut request = OutgoingRequest::new(method, url);
        if let Some(body) = body {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            request.body = Bytes::from(body);
        }
        request.headers = headers;
        let response = self
            .http
            .send(request)
            .await
            .map_err(|e| ClientError::transport(&self.base, e))?;
        let status = response.status;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&response.body).map_err(|e| {
                ClientError::unexpected(status, format!("the answer is not the API's JSON: {e}"))
            });
        }
        Err(error_answer(status, &response.body))
    }

    pub(crate) async fn submit(&self, submit: &Submit) -> Result<TaskInfo, ClientError> {
        let body = to_body(submit)?;
        self.call(Method::POST, self.url(&[]), Some(body)).await
    }
}

/// Serializes a request body.
fn to_body<T: Serialize>(value: &T) -> Result<Vec<u8>, ClientError> {
    serde_json::to_vec(value).map_err(|e| ClientError::config("submit", e.to_string()))
}

/// The error an error answer describes: the contract's
/// `{"error": {"code", "message", "field"}}`, or an unexpected answer.
fn error_answer(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<patient_api::ErrorBody>(body) {
        Ok(patient_api::ErrorBody { error }) => {
            ClientError::api(status, error.code, error.message, error.field)
        }
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text: String = text.chars().take(200).collect();
            ClientError::unexpected(
                status,
                if text.trim().is_empty() {
                    "an empty body".to_owned()
                } else {
                    format!("{:?}", text.trim())
                },
            )
        }
    }
}

/// Builds a [`DaemonClient`]; every setting's default is on its setter.
#[derive(Debug, Clone)]
#[must_use]
pub struct DaemonClientBuilder {
    base_url: String,
    token: Option<String>,
    transport: Option<ClientConfig>,
    poll_interval: Duration,
    dispatch: DispatchDefaults,
}

impl DaemonClientBuilder {
    /// A client of the daemon at `base_url` (`http://127.0.0.1:8750`; a path
    /// prefix is kept: `https://host/patient/` calls `/patient/v1/...`).
    pub fn new(base_url: impl Into<String>) -> DaemonClientBuilder {
        DaemonClientBuilder {
            base_url: base_url.into(),
            token: None,
            transport: None,
            poll_interval: Duration::from_secs(1),
            dispatch: DispatchDefaults::default(),
        }
    }

    /// The bearer token of the daemon's `api_token` setting (default: none;
    /// an empty token counts as none).
    pub fn token(mut self, token: Option<String>) -> DaemonClientBuilder {
        self.token = token.filter(|t| !t.is_empty());
        self
    }

    /// The transport's settings (default: [`ClientConfig`]'s defaults with
    /// a `request_timeout` of 30 s, a `max_response_size` of 64 MiB, and no
    /// proxy from the environment). Set extra root certificates here for a
    /// daemon behind TLS.
    pub fn transport(mut self, config: ClientConfig) -> DaemonClientBuilder {
        self.transport = Some(config);
        self
    }

    /// The longest pause between two polls of
    /// [`wait`](DaemonClient::wait) (default 1 s; polls start at 50 ms and
    /// grow by half each time up to this).
    pub fn poll_interval(mut self, interval: Duration) -> DaemonClientBuilder {
        self.poll_interval = interval;
        self
    }

    /// Where the outcomes of dispatched tasks go
    /// ([`Dispatch::dispatch`](patient_http::Dispatch::dispatch); default:
    /// nowhere, the application polls).
    pub fn deliver(mut self, deliver: Option<Deliver>) -> DaemonClientBuilder {
        self.dispatch.deliver = deliver;
        self
    }

    /// Whether each dispatched task's `id` is its submit's idempotency key,
    /// so dispatching the same [`Task`](patient_http::Task) again (after a
    /// timeout, say) returns the first task instead of running a second
    /// (default: false).
    pub fn idempotency_key_from_task_id(mut self, enabled: bool) -> DaemonClientBuilder {
        self.dispatch.key_from_task_id = enabled;
        self
    }

    /// Checks the settings and builds the client. Fails naming the setting
    /// (`base_url`, `token`, `transport`, `poll_interval`).
    pub fn build(self) -> Result<DaemonClient, ClientError> {
        let base = parse_base_url(&self.base_url)?;
        let token = match self.token {
            None => None,
            Some(token) => {
                let mut value = HeaderValue::try_from(format!("Bearer {token}")).map_err(|_| {
                    ClientError::config("token", "must be printable ASCII without line breaks")
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        if self.poll_interval.is_zero() {
            return Err(ClientError::config("poll_interval", "must not be zero"));
        }
        let config = match self.transport {
            Some(config) => config,
            None => ClientConfig::builder()
                .request_timeout(Duration::from_secs(30))
                .max_response_size(64 * 1024 * 1024)
                .build()
                .map_err(|e| ClientError::config("transport", e.to_string()))?,
        };
        let http =
            HttpClient::new(config).map_err(|e| ClientError::config("transport", e.to_string()))?;
        Ok(DaemonClient {
            core: Arc::new(Core {
                base,
                token,
                http,
                poll_interval: self.poll_interval,
            }),
            worker: Arc::new(OnceLock::new()),
            dispatch: self.dispatch,
        })
    }
}

fn parse_base_url(text: &str) -> Result<Url, ClientError> {
    let fail = |message: String| ClientError::config("base_url", message);
    let url = Url::parse(text).map_err(|e| fail(format!("{text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(fail(format!(
            "{text:?}: scheme {} is not http or https",
            url.scheme()
        )));
    }
    if url.host().is_none() {
        return Err(fail(format!("{text:?} has no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(fail(format!("{text:?} must not have a query or fragment")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(fail(format!(
            "{text:?}: put the API token in the token setting, not in the URL"
        )));
    }
    Ok(url)
}

impl DaemonClient {
    /// A client of the daemon at `base_url` with an optional bearer token,
    /// the other settings at their defaults ([`DaemonClientBuilder`]).
    pub fn new(base_url: impl AsRef<str>, token: Option<String>) -> Result<Self, ClientError> {
        DaemonClient::builder(base_url.as_ref())
            .token(token)
            .build()
    }

    /// A builder for a client of the daemon at `base_url`.
    pub fn builder(base_url: impl Into<String>) -> DaemonClientBuilder {
        DaemonClientBuilder::new(base_url)
    }

    /// A client of the daemon at `PATIENT_URL` (default
    /// `http://127.0.0.1:8750`) with the token in `PATIENT_API_TOKEN` (if
    /// set); empty variables count as unset.
    pub fn from_env() -> Result<Self, ClientError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        DaemonClient::builder(var(URL_ENV).unwrap_or_else(|| DEFAULT_URL.to_owned()))
            .token(var(TOKEN_ENV))
            .build()
    }

    /// The daemon's base URL.
    pub fn base_url(&self) -> &Url {
        &self.core.base
    }

    /// Submits a task: `POST /v1/tasks`. Returns the task once the daemon
    /// has it on disk; with an idempotency key already used, the first
    /// task, unchanged.
    pub async fn submit(&self, submit: &Submit) -> Result<TaskInfo, ClientError> {
        self.core.submit(submit).await
    }

    /// Submits tasks all or nothing: `POST /v1/tasks/batch`. Returns them in
    /// order; one invalid item fails the batch (the error's
    /// [`field`](ClientError::field) is `tasks[i].…`) and none is stored.
    pub async fn submit_batch(&self, submits: &[Submit]) -> Result<Vec<TaskInfo>, ClientError> {
        #[derive(Serialize)]
        struct Batch<'a> {
            tasks: &'a [Submit],
        }
        #[derive(Deserialize)]
        struct Tasks {
            tasks: Vec<TaskInfo>,
        }
        let body = to_body(&Batch { tasks: submits })?;
        let answer: Tasks = self
            .core
            .call(Method::POST, self.core.url(&["batch"]), Some(body))
            .await?;
        Ok(answer.tasks)
    }

    /// The task: `GET /v1/tasks/{id}`.
    pub async fn get(&self, id: &str) -> Result<TaskInfo, ClientError> {
        self.core
            .call(Method::GET, self.core.url(&[id]), None)
            .await
    }

    /// A page of tasks, newest first: `GET /v1/tasks`.
    pub async fn list(&self, filter: &ListFilter) -> Result<TaskList, ClientError> {
        let mut url = self.core.url(&[]);
        let query = filter.query();
        if !query.is_empty() {
            url.set_query(Some(&query));
        }
        self.core.call(Method::GET, url, None).await
    }

    /// Cancels a task that has not finished: `POST /v1/tasks/{id}/cancel`
    /// (`409 conflict` once it has).
    pub async fn cancel(&self, id: &str) -> Result<TaskInfo, ClientError> {
        self.post_action(id, "cancel").await
    }

    /// Delivers a finished task's outcome again (after a failed delivery):
    /// `POST /v1/tasks/{id}/redeliver`.
    pub async fn redeliver(&self, id: &str) -> Result<TaskInfo, ClientError> {
        self.post_action(id, "redeliver").await
    }

    /// Runs a failed task again as a new series of attempts:
    /// `POST /v1/tasks/{id}/retry`.
    pub async fn retry(&self, id: &str) -> Result<TaskInfo, ClientError> {
        self.post_action(id, "retry").await
    }

    async fn post_action(&self, id: &str, action: &str) -> Result<TaskInfo, ClientError> {
        self.core
            .call(Method::POST, self.core.url(&[id, action]), None)
            .await
    }

    /// Polls the task until it has finished (completed, failed or
    /// cancelled) and returns it. Polls start 50 ms apart and grow by half
    /// each time up to the builder's `poll_interval`. With a `timeout`,
    /// gives up once it has passed ([`ClientError::is_wait_timeout`]; the
    /// task goes on); a failed poll ends the wait with its error.
    pub async fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<TaskInfo, ClientError> {
        let started = tokio::time::Instant::now();
        let deadline = timeout.map(|t| started + t);
        let mut pause = Duration::from_millis(50).min(self.core.poll_interval);
        loop {
            let task = self.get(id).await?;
            if task.state.is_finished() {
                return Ok(task);
            }
            let now = tokio::time::Instant::now();
            let sleep = match deadline {
                Some(deadline) if now >= deadline => {
                    return Err(ClientError::wait_timeout(id, task.state, now - started))
                }
                Some(deadline) => pause.min(deadline - now),
                None => pause,
            };
            tokio::time::sleep(sleep).await;
            pause = pause.mul_f64(1.5).min(self.core.poll_interval);
        }
    }

    /// A handle on the same daemon, pool and dispatch thread whose
    /// dispatched tasks go to `deliver` (see
    /// [`DaemonClientBuilder::deliver`]).
    pub fn with_deliver(&self, deliver: Option<Deliver>) -> DaemonClient {
        let mut client = self.clone();
        client.dispatch.deliver = deliver;
        client
    }

    /// A handle whose dispatched tasks carry the idempotency key `key`:
    /// every dispatch through it is the same logical task, so the daemon
    /// runs the first and answers the others with it. Make one per call:
    /// `client.with_idempotency_key("order-17").dispatch(task)`.
    pub fn with_idempotency_key(&self, key: impl Into<String>) -> DaemonClient {
        let mut client = self.clone();
        client.dispatch.idempotency_key = Some(key.into());
        client
    }
}
