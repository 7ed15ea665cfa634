//! Hand off slow HTTP calls to an in-process processor; get every outcome
//! back exactly once.
//!
//! Any thread hands a [`Task`] (a [`Request`] plus the name of a callback and
//! its arguments) to a [`Processor`] and returns at once. The processor runs
//! thousands of requests at once on its own async runtime and hands each
//! outcome to your [`TaskHandler`]: `on_complete` with a [`Response`],
//! `on_error` with a [`TaskError`], or `retry` with the task when it could not
//! finish before a stop.
//!
//! With a [`TaskJournal`] ([`Builder::journal`]) the processor keeps its
//! accepted tasks on disk too, and after a crash the next start takes up
//! what was left ([`journal`]).
//!
//! The same request path runs inline on the calling thread
//! ([`InlineExecutor`]) and as an `async fn` ([`AwaitableClient`]);
//! application code can depend on the [`Dispatch`] trait instead of any of
//! them. Requests, responses and errors serialize to the JSON of the
//! PatientHttp gem ([`patient_wire`]).
//!
//! ```no_run
//! use std::sync::mpsc;
//!
//! use patient_http::{CallbackArgs, Outcome, Processor, Request, Task};
//!
//! let (tx, rx) = mpsc::channel::<Outcome>();
//! let processor = Processor::builder().secret("api_key", "s3cr3t").build(tx)?;
//! processor.start()?;
//!
//! let request = Request::post("https://api.example.com/v1/complete")
//!     .secret_header("authorization", "api_key")
//!     .json(&serde_json::json!({"prompt": "hello"}))
//!     .build()?;
//! let mut args = CallbackArgs::new();
//! args.insert("user_id", 42);
//! processor.enqueue(Task::new(request, "CompletionCallback").with_callback_args(args))?;
//!
//! match rx.recv()? {
//!     Outcome::Completed { response, .. } => println!("{}", response.status),
//!     Outcome::Failed { error, .. } => eprintln!("{error}"),
//!     Outcome::Retry(task) => println!("enqueue {} again", task.id),
//! }
//! processor.stop(None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod attempt;
mod awaitable;
pub mod breaker;
mod builder;
pub mod call;
pub mod client;
mod config;
pub mod decision;
mod dispatch;
mod engine;
pub mod exchange;
mod handler;
mod health;
mod inline;
pub mod interceptor;
pub mod limit;
pub mod metrics;
mod observer;
pub mod preprocess;
mod processor;
pub mod propagation;
pub mod resilience;
pub mod retry;
mod secret;
mod strategy;
mod task;
pub mod testing;
mod time;
mod upstream;

/// The attribute that implements the async hook traits
/// ([`Interceptor`](interceptor::Interceptor), [`Preprocessor`],
/// [`TokenSource`](interceptor::TokenSource)) with `async fn`s.
pub use async_trait::async_trait;
pub use awaitable::{AwaitableClient, AwaitableDispatch, ResponseFuture};
pub use builder::Builder;
pub use call::{CallError, CallPolicy};
pub use config::{Config, ConfigBuilder, ConfigError};
pub use decision::{Decision, LimitWait, Refusal, TaskProgress};
pub use dispatch::{Body, Dispatch, DispatchError, DispatchOptions, TemplateDispatch};
pub use handler::{Outcome, TaskHandler};
pub use health::{HealthSummary, UpstreamHealth};
pub use inline::InlineExecutor;
pub use observer::{ProcessorObserver, RequestEnd, RequestStart};
pub use patient_wire::{
    self as wire, Attempt, CallbackArgs, DeadlineMode, ErrorType, HeaderValue, Headers, HttpError,
    Method, Payload, Priority, RedirectError, RedirectErrorKind, Request, RequestBuilder,
    RequestError, RequestOptions, RequestTemplate, Response, RetryOptions, SecretRef, Strategy,
    TaskError, UrlCredentials, WireLimits,
};
pub use preprocess::{Preprocessor, SigV4};
pub use processor::{
    journal, EnqueueError, EnqueueErrorKind, JournalChange, JournalEntry, JournalEntryError,
    JournalError, JournalRecovery, Processor, ProcessorCounts, ProcessorError, ProcessorState,
    TaskJournal,
};
pub use resilience::{Fallback, HedgeDelay, ResilienceConfig, UpstreamPolicy};
pub use secret::{host_listed, Secret, SecretError, Secrets};
pub use task::Task;
