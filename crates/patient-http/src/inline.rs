//! Synchronous execution: one task on the calling thread with the full
//! lifecycle (timeouts, redirects, error wrapping), for tests, consoles and
//! scripts — and the same from async code with [`InlineExecutor::run_async`].

use std::sync::Arc;

use patient_wire::{Response, TaskError};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

use crate::{
    engine::Engine, propagation::Admission, Builder, ConfigError, Outcome, Task, TaskHandler,
};

/// Runs tasks on the calling thread and returns (or hands over) their outcome.
///
/// It keeps a small runtime of its own (one worker thread, which drives the
/// pooled connections between calls) and a connection pool between calls.
/// From async code, [`run_async`](InlineExecutor::run_async) runs the task on
/// the caller's runtime instead; [`run`](InlineExecutor::run) there says how it
/// behaves on each kind of runtime.
pub struct InlineExecutor {
    engine: Arc<Engine>,
    handler: Arc<dyn TaskHandler>,
    /// The runtime's handle: `block_on` through it runs the task on the
    /// calling thread.
    handle: Handle,
    _runtime: OwnedRuntime,
}

/// Owns the runtime; shuts it down without waiting when dropped, so an
/// executor may be dropped inside async code (a plain `Runtime` would panic
/// there).
struct OwnedRuntime(Option<Runtime>);

impl Drop for OwnedRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl InlineExecutor {
    /// A builder for the configuration, secrets, preprocessors and observers.
    pub fn builder() -> Builder {
        Builder::new()
    }

    pub(crate) fn from_engine(
        engine: Arc<Engine>,
        handler: Arc<dyn TaskHandler>,
    ) -> Result<InlineExecutor, ConfigError> {
        // A worker thread of its own keeps the connections it opened going
        // between calls, so `run_async` on another runtime may reuse them.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("patient-inline")
            .enable_all()
            .build()
            .map_err(|e| ConfigError::new("runtime", e.to_string()))?;
        Ok(InlineExecutor {
            engine,
            handler,
            handle: runtime.handle().clone(),
            _runtime: OwnedRuntime(Some(runtime)),
        })
    }

    /// Runs a task and returns its outcome without calling the handler. It
    /// blocks the calling thread until the task has ended:
    ///
    /// * outside any async runtime, the task runs on the calling thread;
    /// * on a worker of a multi-thread tokio runtime, it runs there inside
    ///   [`block_in_place`](tokio::task::block_in_place): the runtime moves its
    ///   other tasks to another thread meanwhile, so they keep running;
    /// * inside a current-thread runtime, it runs on a helper thread and the
    ///   runtime waits: none of its other tasks run until the task has ended
    ///   (an upstream served by that same runtime cannot answer, and the task
    ///   runs into its timeout). Use [`run_async`](InlineExecutor::run_async)
    ///   there.
    pub fn run(&self, task: Task) -> Outcome {
        // Before any hand-over to another thread: the served request's
        // context is a task-local of this one.
        let admitted = Admission::now();
        match Handle::try_current().map(|h| h.runtime_flavor()) {
            Err(_) => self.run_here(task, admitted),
            Ok(RuntimeFlavor::MultiThread) => {
                tokio::task::block_in_place(|| self.run_here(task, admitted))
            }
            // A current-thread runtime cannot hand its work to another thread
            // and `block_on` would panic here: run on a helper thread.
            Ok(_) => std::thread::scope(|s| {
                s.spawn(|| self.run_here(task, admitted))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            }),
        }
    }

    /// Runs a task on the caller's async runtime and returns its outcome
    /// without calling the handler; the runtime runs its other tasks while it
    /// waits (a current-thread one too).
    ///
    /// Connections it opens are driven by the caller's runtime and join the
    /// pool that [`run`](InlineExecutor::run) shares. On a current-thread
    /// runtime, stay with `run_async`: a blocking `run` there stops the very
    /// runtime that drives those connections, and a request reusing one
    /// waits for its timeout.
    pub async fn run_async(&self, task: Task) -> Outcome {
        let result = self.engine.execute(&task, Admission::now()).await;
        outcome(task, result)
    }

    fn run_here(&self, task: Task, admitted: Admission) -> Outcome {
        let result = self.handle.block_on(self.engine.execute(&task, admitted));
        outcome(task, result)
    }

    /// Adds an observer: it sees every task run from now on.
    pub fn add_observer(&self, observer: impl crate::ProcessorObserver) {
        self.engine.observers.add(Arc::new(observer));
    }

    /// Runs a task and hands its outcome to the handler, as the processor
    /// would. It blocks like [`run`](InlineExecutor::run).
    pub fn execute(&self, task: Task) {
        let outcome = self.run(task);
        let id = outcome.task_id().to_owned();
        let handler = self.handler.as_ref();
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| outcome.deliver(handler)))
            .is_err()
        {
            tracing::error!(task_id = %id, "the task handler panicked; the panic was contained");
        }
    }
}

fn outcome(task: Task, result: Result<Response, TaskError>) -> Outcome {
    match result {
        Ok(response) => Outcome::Completed {
            response,
            callback: task.callback,
        },
        Err(error) => Outcome::Failed {
            error,
            callback: task.callback,
        },
    }
}
