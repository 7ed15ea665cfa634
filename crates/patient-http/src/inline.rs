//! Synchronous execution: one task on the calling thread with the full
//! lifecycle (timeouts, redirects, error wrapping), for tests, consoles and
//! scripts.

use std::sync::{Arc, Mutex};

use crate::{engine::Engine, Builder, ConfigError, Outcome, Task, TaskHandler};

/// Runs tasks on the calling thread and returns (or hands over) their outcome.
///
/// It keeps a single-threaded runtime and a connection pool between calls.
/// Called from inside an async runtime, it runs the task on a helper thread
/// instead of panicking.
pub struct InlineExecutor {
    engine: Arc<Engine>,
    handler: Arc<dyn TaskHandler>,
    runtime: Mutex<tokio::runtime::Runtime>,
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
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ConfigError::new("runtime", e.to_string()))?;
        Ok(InlineExecutor {
            engine,
            handler,
            runtime: Mutex::new(runtime),
        })
    }

    /// Runs a task and returns its outcome without calling the handler.
    pub fn run(&self, task: Task) -> Outcome {
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside an async context: block_on would panic, so use a thread.
            return std::thread::scope(|s| {
                s.spawn(|| self.run_here(task))
                    .join()
                    .unwrap_or_else(|p| std::panic::resume_unwind(p))
            });
        }
        self.run_here(task)
    }

    fn run_here(&self, task: Task) -> Outcome {
        let runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner());
        let result = runtime.block_on(self.engine.execute(&task, tokio::time::Instant::now()));
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

    /// Runs a task and hands its outcome to the handler, as the processor would.
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
