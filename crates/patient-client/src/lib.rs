//! A Rust client of the patient daemon's API (`patient serve`).
//!
//! [`DaemonClient`] submits tasks ([`Submit`]: a wire-format
//! [`Request`](patient_wire::Request), a callback and its arguments, where
//! to [`Deliver`] the outcome, an idempotency key, a delay), reads and lists
//! them ([`TaskInfo`], [`TaskList`], [`ListFilter`]), cancels, redelivers
//! and retries them, and [`wait`](DaemonClient::wait)s for their outcome
//! ([`OutcomeEvent`]). Errors are [`ClientError`]s carrying the API's
//! `code`, `message`, `field` and HTTP status.
//!
//! It implements [`patient_http::Dispatch`], so application code written
//! against the in-process [`Processor`](patient_http::Processor) hands its
//! tasks to the daemon unchanged; the synchronous `dispatch` runs on a
//! thread the client owns (see [`DaemonClient::submit_blocking`] for where
//! it may be called).
//!
//! The client depends on the transport and the wire types only, not on the
//! daemon.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use patient_client::{DaemonClient, Deliver, Submit};
//! use patient_http::{Dispatch, DispatchOptions};
//! use patient_wire::Request;
//!
//! // PATIENT_URL (default http://127.0.0.1:8750) and PATIENT_API_TOKEN.
//! let client = DaemonClient::from_env()?;
//!
//! let request = Request::post("https://api.example.com/v1/chat")
//!     .json(&serde_json::json!({"prompt": "hello"}))
//!     .build()?;
//! let submit = Submit::new(request)
//!     .with_callback("ChatCallback")
//!     .with_deliver(Deliver::webhook("https://app.example.com/hooks/patient"))
//!     .with_idempotency_key("chat-42");
//! let task = client.submit(&submit).await?;
//! println!("{} is {}", task.id, task.state);
//!
//! // Or through the Dispatch trait, from synchronous code.
//! let dispatcher = DaemonClient::builder("http://127.0.0.1:8750")
//!     .deliver(Some(Deliver::redis_list("outcomes")))
//!     .build()?;
//! let id = tokio::task::spawn_blocking(move || {
//!     let url = "https://api.example.com/v1/status";
//!     Dispatch::get(&dispatcher, url, "StatusCallback", DispatchOptions::default())
//! })
//! .await??;
//! println!("submitted {id}");
//! # Ok(())
//! # }
//! ```

mod blocking;
mod client;
mod error;
mod submit;

pub use client::{DaemonClient, DaemonClientBuilder, DEFAULT_URL, TOKEN_ENV, URL_ENV};
pub use error::ClientError;
pub use patient_api::{
    AttemptInfo, DeliveryChannel, DeliveryInfo, DeliveryState, ListFilter, OutcomeEvent,
    OutcomeType, TaskInfo, TaskList, TaskState,
};
pub use submit::{Deliver, Submit, DEFAULT_SIDEKIQ_WORKER};
