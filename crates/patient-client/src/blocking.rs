//! Blocking submits and the [`Dispatch`] implementation.
//!
//! [`Dispatch::dispatch`] is synchronous while the client is async, so the
//! first blocking call starts a named thread (`patient-client`) that owns a
//! current-thread tokio runtime and its own connection pool. Submits travel
//! to it over a channel, each with a channel for its answer; the caller
//! waits for that answer. Start-up failures come back to the first caller;
//! when the last clone of the client is dropped, the channel closes and the
//! thread is joined.
//!
//! Waiting is done so it never stalls a tokio runtime wrongly: outside a
//! runtime (a plain thread, a `spawn_blocking` closure) it just blocks; on
//! a multi-thread runtime it blocks inside
//! [`tokio::task::block_in_place`], which hands the worker's other tasks to
//! another thread first; on a current-thread runtime, where nothing can
//! take over (and where an in-process daemon could never answer), it
//! refuses with an error for which
//! [`ClientError::is_blocking`] is true. There, call
//! [`DaemonClient::submit`] and `.await` it instead.

use std::{sync::mpsc as std_mpsc, thread::JoinHandle};

use patient_http::{Dispatch, DispatchError, Task};
use tokio::{runtime::RuntimeFlavor, sync::mpsc};

use crate::{
    client::{Core, DaemonClient},
    error::ClientError,
    submit::Submit,
    TaskInfo,
};

type Answer = Result<TaskInfo, ClientError>;

/// One submit for the dispatch thread and where its answer goes.
struct Job {
    submit: Submit,
    reply: std_mpsc::SyncSender<Answer>,
}

/// The dispatch thread: its runtime submits what arrives on `jobs`.
pub(crate) struct Worker {
    jobs: Option<mpsc::UnboundedSender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the thread and its runtime; the error says why it could not.
    fn start(core: Core) -> Result<Worker, String> {
        let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
        let (ready, started) = std_mpsc::sync_channel::<Result<(), String>>(1);
        let thread = std::thread::Builder::new()
            .name("patient-client".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(format!("cannot start its runtime: {e}")));
                        return;
                    }
                };
                let _ = ready.send(Ok(()));
                let core = std::sync::Arc::new(core);
                runtime.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        let core = std::sync::Arc::clone(&core);
                        tokio::spawn(async move {
                            let answer = core.submit(&job.submit).await;
                            let _ = job.reply.send(answer);
                        });
                    }
                });
            })
            .map_err(|e| format!("cannot spawn its thread: {e}"))?;
        match started.recv() {
            Ok(Ok(())) => Ok(Worker {
                jobs: Some(jobs),
                thread: Some(thread),
            }),
            Ok(Err(message)) => {
                let _ = thread.join();
                Err(message)
            }
            Err(_) => {
                let _ = thread.join();
                Err("its thread stopped while starting".to_owned())
            }
        }
    }

    /// Hands a submit to the thread; the answer arrives on the receiver.
    fn send(&self, submit: Submit) -> Result<std_mpsc::Receiver<Answer>, ClientError> {
        let (reply, answer) = std_mpsc::sync_channel(1);
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(Job { submit, reply })
            .map_err(|_| stopped())?;
        Ok(answer)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop. Every caller waits for
        // its answer while holding the client, so none is in flight when the
        // last clone goes: the join is immediate.
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn stopped() -> ClientError {
    ClientError::blocking("the client's dispatch thread has stopped")
}

/// Refuses to block the thread of a current-thread runtime.
fn check_may_block() -> Result<(), ClientError> {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::CurrentThread => {
            Err(ClientError::blocking(
                "a blocking submit cannot run on a current-thread tokio runtime (it would stall the runtime); \
                 await DaemonClient::submit there, or call from spawn_blocking on a multi-thread runtime or a plain thread",
            ))
        }
        _ => Ok(()),
    }
}

impl DaemonClient {
    /// [`submit`](Self::submit) for synchronous code: runs the submit on the
    /// client's dispatch thread and blocks until the daemon answers (within
    /// the transport's `request_timeout`).
    ///
    /// Callable from any thread: a plain thread, a `spawn_blocking`
    /// closure of a multi-thread runtime, or a task of a multi-thread tokio
    /// runtime (it waits in [`tokio::task::block_in_place`]). On a
    /// current-thread runtime it returns an error
    /// ([`ClientError::is_blocking`]) instead of stalling the runtime; that
    /// includes the runtime's blocking pool, which cannot be told apart
    /// from its thread: use a plain thread there. The dispatch thread
    /// starts with the first call; if it cannot start, every call returns
    /// that error.
    pub fn submit_blocking(&self, submit: &Submit) -> Result<TaskInfo, ClientError> {
        check_may_block()?;
        let answer = self.worker()?.send(submit.clone())?;
        tokio::task::block_in_place(|| answer.recv()).map_err(|_| stopped())?
    }

    /// The dispatch thread, started by the first call.
    fn worker(&self) -> Result<&Worker, ClientError> {
        self.worker
            .get_or_init(|| {
                self.core
                    .with_new_pool()
                    .map_err(|e| e.to_string())
                    .and_then(Worker::start)
            })
            .as_ref()
            .map_err(|message| {
                ClientError::blocking(format!("cannot start the dispatch thread: {message}"))
            })
    }

    /// The submit of a dispatched task: its request, callback, callback
    /// arguments and `raise_error_responses`, with this handle's delivery
    /// target and idempotency key.
    pub fn submit_of(&self, task: Task) -> Submit {
        let key = match (
            &self.dispatch.idempotency_key,
            self.dispatch.key_from_task_id,
        ) {
            (Some(key), _) => Some(key.clone()),
            (None, true) => Some(task.id),
            (None, false) => None,
        };
        Submit {
            request: task.request,
            callback: Some(task.callback).filter(|c| !c.is_empty()),
            callback_args: task.callback_args,
            raise_error_responses: task.raise_error_responses,
            deliver: self.dispatch.deliver.clone(),
            idempotency_key: key,
            delay: None,
            not_before: None,
        }
    }
}

impl Dispatch for DaemonClient {
    /// Submits the task to the daemon ([`DaemonClient::submit_of`], then
    /// [`DaemonClient::submit_blocking`]) and returns the daemon's task id
    /// (`tsk_…`). The daemon's refusal, or a daemon that cannot be reached,
    /// is [`DispatchError::Remote`] holding the [`ClientError`].
    fn dispatch(&self, task: Task) -> Result<String, DispatchError> {
        self.submit_blocking(&self.submit_of(task))
            .map(|task| task.id)
            .map_err(|e| DispatchError::Remote(Box::new(e)))
    }
}
