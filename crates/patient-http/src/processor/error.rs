//! Errors of the processor's API.

use std::fmt;

use super::{JournalError, ProcessorState};
use crate::Task;

/// Why `enqueue` refused a task. The task comes back inside, so nothing is lost.
#[derive(thiserror::Error)]
#[error("{kind}")]
pub struct EnqueueError {
    kind: EnqueueErrorKind,
    task: Box<Task>,
    /// Why the journal did not record the task.
    #[source]
    journal: Option<Box<JournalError>>,
}

/// The reason a task was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnqueueErrorKind {
    /// The processor is not running.
    #[error("cannot enqueue request: processor is {state}")]
    NotRunning {
        /// The state it was in.
        state: ProcessorState,
    },
    /// Queued plus in-flight tasks reached `max_connections`.
    #[error("cannot enqueue request: already at max capacity ({max} connections)")]
    AtCapacity {
        /// The configured `max_connections`.
        max: usize,
    },
    /// The task journal did not record the task (disk full, database gone):
    /// it was not accepted. The [`source`](std::error::Error::source) is the
    /// [`JournalError`].
    #[error("cannot enqueue request: the task journal {journal} did not record it")]
    Journal {
        /// The journal's name.
        journal: String,
    },
}

impl EnqueueError {
    pub(crate) fn new(kind: EnqueueErrorKind, task: Task) -> Self {
        EnqueueError {
            kind,
            task: Box::new(task),
            journal: None,
        }
    }

    pub(crate) fn journal(error: JournalError, task: Task) -> Self {
        EnqueueError {
            kind: EnqueueErrorKind::Journal {
                journal: error.journal().to_owned(),
            },
            task: Box::new(task),
            journal: Some(Box::new(error)),
        }
    }

    /// The reason.
    pub fn kind(&self) -> &EnqueueErrorKind {
        &self.kind
    }

    /// Whether the processor was not running.
    pub fn is_not_running(&self) -> bool {
        matches!(self.kind, EnqueueErrorKind::NotRunning { .. })
    }

    /// Whether the processor was at capacity.
    pub fn is_at_capacity(&self) -> bool {
        matches!(self.kind, EnqueueErrorKind::AtCapacity { .. })
    }

    /// Whether the task journal did not record the task.
    pub fn is_journal(&self) -> bool {
        matches!(self.kind, EnqueueErrorKind::Journal { .. })
    }

    /// The journal's error, when it did not record the task.
    pub fn journal_error(&self) -> Option<&JournalError> {
        self.journal.as_deref()
    }

    /// The refused task, to try again later.
    pub fn into_task(self) -> Task {
        *self.task
    }

    /// The refused task.
    pub fn task(&self) -> &Task {
        &self.task
    }
}

impl fmt::Debug for EnqueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnqueueError")
            .field("kind", &self.kind)
            .field("task_id", &self.task.id)
            .finish()
    }
}

/// Why a lifecycle call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessorError {
    /// The call is not allowed in the current state (for example `start` while
    /// draining or stopping).
    #[error("cannot {action} a processor that is {state}")]
    InvalidState {
        /// What was asked.
        action: &'static str,
        /// The state it was in.
        state: ProcessorState,
    },
    /// The runtime or its thread could not be created.
    #[error("processor runtime failed to start: {0}")]
    Runtime(#[source] std::io::Error),
    /// The task journal could not be started or read at start (see
    /// [`Builder::journal`](crate::Builder::journal)); the processor stays
    /// stopped.
    #[error("processor cannot start: its task journal failed")]
    Journal(#[source] JournalError),
}
