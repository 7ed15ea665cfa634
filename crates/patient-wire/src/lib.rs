//! The wire types of patient: requests, responses, errors and their payloads,
//! and the exact JSON they travel as between processes (job queues, webhooks,
//! the daemon's API, payload stores).
//!
//! The JSON is the one the Ruby PatientHttp gem uses, so a callback written
//! against the gem can load what patient delivers, and a request the gem
//! serialized can be executed by patient:
//!
//! * [`Request`] (built and validated with [`RequestBuilder`], or from a
//!   [`RequestTemplate`]) and [`Response`];
//! * [`TaskError`]: an [`HttpError`], a [`RequestError`] or a
//!   [`RedirectError`], loaded by [`TaskError::load`];
//! * [`Payload`]: a body as text, gzipped text or Base64 binary;
//! * [`Headers`] with [`SecretRef`] values, [`CallbackArgs`],
//!   [`StorageRef`] and [`EncryptedEnvelope`].
//!
//! Every type has `to_json` / `from_json` and implements `Serialize` /
//! `Deserialize` with the same JSON. Loading errors are [`WireError`]s naming
//! the offending field.
//!
//! # Bounds
//!
//! Everything here may come from the network, so loading (and
//! [`RequestBuilder::build`]) keeps every value within [`WireLimits`]:
//! durations (`timeout`, `options.deadline`, each hedge and retry delay) from
//! 0 to a maximum, counts (headers, hedge delays, `max_attempts`,
//! `max_redirects`, secret parameters, preprocessors), lengths (URL, header
//! names and values, keys), decoded body sizes (a gzipped body stops
//! inflating as soon as it passes the bound), and the depth and size of
//! callback arguments. A value outside them is refused with a
//! [`WireErrorKind::Limit`] naming the field, the bound and the
//! [`WireLimits`] setting. `from_json`, `load`, `decode` and `build` use
//! [`WireLimits::default`]; the `*_with_limits` variants take others.
//!
//! # Credentials in URLs
//!
//! A user name and password in a request's URL (`https://user:pass@host/`)
//! are taken out of it when it is built or loaded, and kept beside it as
//! [`Request::url_credentials`]: they never appear in the request's JSON,
//! its [`Request::url`] (so in no outcome's `url` or `redirects`), an error
//! message or `Debug`. So they do not survive serialization: persist
//! credentials as a secret header instead.
//!
//! ```
//! use std::time::Duration;
//!
//! use patient_wire::{Request, TaskError};
//! use serde_json::json;
//!
//! let request = Request::post("https://api.example.com/users")
//!     .secret_header("Authorization", "api_key")
//!     .json(&json!({"name": "Ada"}))
//!     .param("notify", "true")
//!     .timeout(Duration::from_secs(30))
//!     .build()?;
//!
//! let wire = request.to_json();
//! assert_eq!(wire["http_method"], "post");
//! assert_eq!(wire["url"], "https://api.example.com/users?notify=true");
//! assert_eq!(wire["headers"]["authorization"], json!({"$secret": "api_key"}));
//! assert_eq!(wire["headers"]["content-type"], "application/json; charset=utf-8");
//! assert_eq!(wire["body"], json!({"encoding": "text", "value": r#"{"name":"Ada"}"#, "charset": "UTF-8"}));
//! assert_eq!(Request::from_json(&wire)?, request);
//!
//! let error = TaskError::load(&json!({
//!     "error_class": "PatientHttp::TooManyRedirectsError",
//!     "url": "https://a.example/3", "http_method": "get", "duration": 0.4,
//!     "request_id": "b5c3", "redirects": ["https://a.example/1", "https://a.example/2"],
//!     "callback_args": {}
//! }))?;
//! assert!(error.is_redirect());
//!
//! // A timeout of 10¹⁹ seconds is refused where it enters, naming the bound.
//! let hostile = json!({"http_method": "get", "url": "https://a.example/", "timeout": 1.8e19});
//! let error = Request::from_json(&hostile).unwrap_err();
//! assert_eq!(error.path(), "timeout");
//! assert_eq!(error.limit().map(|l| l.limit()), Some("max_timeout"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod attempt;
pub mod callback_args;
pub mod credentials;
pub mod envelope;
pub mod error;
mod fields;
pub mod headers;
pub mod limits;
pub mod method;
pub mod options;
pub mod payload;
pub mod request;
pub mod response;
pub mod secret;
pub mod storage;
pub mod template;
pub mod wire_error;

pub use attempt::Attempt;
pub use callback_args::{CallbackArgs, CallbackArgsError};
pub use credentials::UrlCredentials;
pub use envelope::{is_encrypted, EncryptedEnvelope, ENCRYPTED_KEY};
pub use error::{ErrorType, HttpError, RedirectError, RedirectErrorKind, RequestError, TaskError};
pub use headers::{HeaderValue, Headers};
pub use limits::{Bound, LimitError, WireLimits};
pub use method::{Method, ParseMethodError};
pub use options::{DeadlineMode, Priority, RequestOptions, RetryOptions, Strategy};
pub use payload::{
    charset_param, is_text_content_type, Payload, PayloadEncoding, BINARY_CHARSET, GZIP_THRESHOLD,
    TEXT_CHARSET,
};
pub use request::{
    Request, RequestBuilder, RequestValidationError, IDEMPOTENCY_KEY_HEADERS, JSON_CONTENT_TYPE,
};
pub use response::{Response, ResponseJsonError};
pub use secret::{is_secret_ref, SecretRef, SECRET_KEY};
pub use storage::{is_storage_ref, StorageRef, REF_KEY};
pub use template::RequestTemplate;
pub use url::Url;
pub use wire_error::{WireError, WireErrorKind};
