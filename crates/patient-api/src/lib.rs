//! The JSON of `patient serve`'s HTTP API, typed once: the daemon writes it
//! and [`patient-client`](https://docs.rs/patient-client) reads it with the
//! same types, so the two cannot drift apart. Serde only, no runtime.
//!
//! * [`TaskState`], [`DeliveryState`], [`DeliveryChannel`]: the names the
//!   contract fixes.
//! * [`TaskInfo`] (with [`AttemptInfo`], [`DeliveryInfo`],
//!   [`OutcomeEvent`]), [`TaskList`] and [`ListFilter`]: what the task
//!   routes answer and take.
//! * [`ErrorBody`]: `{"error": {"code", "message", "field"}}`, every non-2xx
//!   answer of the API, with the stable codes in [`code`].
//!
//! ```
//! use patient_api::{ErrorBody, TaskState};
//!
//! let state: TaskState = "queued".parse()?;
//! assert!(!state.is_finished());
//! let body = ErrorBody::new(patient_api::code::NOT_FOUND, "no task tsk_1");
//! assert_eq!(
//!     serde_json::to_string(&body)?,
//!     r#"{"error":{"code":"not_found","message":"no task tsk_1"}}"#
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod task;

pub use error::{code, ErrorBody, ErrorDetail};
pub use task::{
    AttemptInfo, DeliveryChannel, DeliveryInfo, DeliveryState, ListFilter, OutcomeEvent,
    OutcomeType, TaskInfo, TaskList, TaskState,
};
