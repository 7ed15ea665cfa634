//! One builder for every face of the engine: the processor, the inline
//! executor and the awaitable client.

use std::sync::{atomic::AtomicU64, Arc};

use crate::{
    client::HttpClient,
    engine::Engine,
    interceptor::{Interceptor, Interceptors},
    metrics::Metrics,
    preprocess::{Preprocessor, Preprocessors},
    processor::journal::JournalSlot,
    resilience::ResilienceConfig,
    secret::{Secret, Secrets},
    AwaitableClient, Config, ConfigError, InlineExecutor, JournalRecovery, Processor,
    ProcessorObserver, TaskHandler, TaskJournal,
};

/// Collects the configuration, secrets, preprocessors and observers, then
/// builds a [`Processor`], an [`InlineExecutor`] or an [`AwaitableClient`].
#[must_use]
#[derive(Default)]
pub struct Builder {
    config: Config,
    secrets: Secrets,
    preprocessors: Preprocessors,
    interceptors: Interceptors,
    observers: Vec<Arc<dyn ProcessorObserver>>,
    resilience: ResilienceConfig,
    metrics: Option<Metrics>,
    journal: Option<Box<dyn TaskJournal>>,
    journal_recovery: JournalRecovery,
}

impl Builder {
    /// Default configuration, no secrets, no preprocessors, no observers.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The configuration (default: [`Config::default`]).
    pub fn config(mut self, config: Config) -> Builder {
        self.config = config;
        self
    }

    /// Registers a named secret that requests reference as `{"$secret": name}`.
    pub fn secret(mut self, name: impl Into<String>, secret: impl Into<Secret>) -> Builder {
        self.secrets.insert(name, secret);
        self
    }

    /// Registers every secret of a registry.
    pub fn secrets(mut self, secrets: Secrets) -> Builder {
        self.secrets = secrets;
        self
    }

    /// Registers a named preprocessor that requests list in `preprocessors`.
    pub fn preprocessor(mut self, name: impl Into<String>, p: impl Preprocessor) -> Builder {
        self.preprocessors.insert(name, p);
        self
    }

    /// Appends an interceptor to the chain: request hooks run in the order
    /// added, response hooks in reverse.
    pub fn interceptor(mut self, interceptor: impl Interceptor) -> Builder {
        self.interceptors.push(interceptor);
        self
    }

    /// The resilience settings: retries, hedging, deadlines, breakers, limits,
    /// fallbacks, by upstream (default: [`ResilienceConfig::default`] — one
    /// attempt per task, as the gem makes, no breaker, no limits).
    pub fn resilience(mut self, resilience: ResilienceConfig) -> Builder {
        self.resilience = resilience;
        self
    }

    /// Records metrics into this instance (default: a new one per engine,
    /// reachable from the processor or client).
    pub fn metrics(mut self, metrics: Metrics) -> Builder {
        self.metrics = Some(metrics);
        self
    }

    /// Adds an observer.
    pub fn observer(mut self, observer: impl ProcessorObserver) -> Builder {
        self.observers.push(Arc::new(observer));
        self
    }

    /// Adds a shared observer.
    pub fn observer_arc(mut self, observer: Arc<dyn ProcessorObserver>) -> Builder {
        self.observers.push(observer);
        self
    }

    /// Keeps the processor's accepted tasks in `journal` until their outcome
    /// was delivered, so that a processor started after a crash takes up
    /// what was left (default: none — a crash loses the tasks in memory).
    ///
    /// With a journal, `enqueue` returns once the task is recorded and
    /// refuses it when the journal fails; a POST or PATCH that is not safe to
    /// send twice is marked started before it is sent; `start` takes up what
    /// an earlier run left as [`journal_recovery`](Self::journal_recovery)
    /// says; delivery becomes at least once across a crash. The
    /// [`journal`](crate::journal) module has the details, and
    /// `patient_store::journal::SqliteJournal` is a journal in a SQLite file.
    /// `enqueue` then blocks its thread for the write (about one `fsync`,
    /// shared with the threads enqueuing at the same moment); from async code
    /// that cares, call it inside `spawn_blocking`.
    /// Only the processor keeps a journal: `build_inline` and
    /// `build_awaitable` refuse a builder that has one.
    pub fn journal(mut self, journal: impl TaskJournal) -> Builder {
        self.journal = Some(Box::new(journal));
        self
    }

    /// What `start` does with the tasks the journal still holds (default
    /// [`JournalRecovery::Rerun`]: run them again; a started request that is
    /// not safe to send twice ends as interrupted either way).
    pub fn journal_recovery(mut self, recovery: JournalRecovery) -> Builder {
        self.journal_recovery = recovery;
        self
    }

    /// Refuses a journal for the faces that keep none.
    fn no_journal(&self, face: &str) -> Result<(), ConfigError> {
        match self.journal {
            Some(_) => Err(ConfigError::new(
                "journal",
                format!("only the processor keeps a task journal, not the {face}"),
            )),
            None => Ok(()),
        }
    }

    fn engine(self) -> Result<Arc<Engine>, ConfigError> {
        let client = HttpClient::new(self.config.client.clone())
            .map_err(|e| ConfigError::new(e.field(), e.reason().to_string()))?;
        let upstreams = crate::upstream::Upstreams::new(self.resilience.max_upstreams());
        Ok(Arc::new(Engine {
            config: self.config,
            client,
            secrets: self.secrets,
            preprocessors: self.preprocessors,
            interceptors: self.interceptors,
            observers: Arc::new(crate::observer::Observers::new(self.observers)),
            resilience: self.resilience,
            default_retry: crate::retry::RetryPolicy::none(),
            metrics: self.metrics.unwrap_or_default(),
            upstreams,
            panics: AtomicU64::new(0),
        }))
    }

    /// A processor that hands outcomes to `handler`. It is stopped: call
    /// [`Processor::start`].
    pub fn build(mut self, handler: impl TaskHandler) -> Result<Processor, ConfigError> {
        let journal = self
            .journal
            .take()
            .map(|journal| JournalSlot::new(journal, self.journal_recovery));
        Ok(Processor::from_engine(
            self.engine()?,
            Arc::new(handler),
            journal,
        ))
    }

    /// An inline executor that runs each task on the calling thread and hands
    /// outcomes to `handler`.
    pub fn build_inline(self, handler: impl TaskHandler) -> Result<InlineExecutor, ConfigError> {
        self.no_journal("inline executor")?;
        InlineExecutor::from_engine(self.engine()?, Arc::new(handler))
    }

    /// An awaitable client for async code.
    pub fn build_awaitable(self) -> Result<AwaitableClient, ConfigError> {
        self.no_journal("awaitable client")?;
        Ok(AwaitableClient::from_engine(self.engine()?))
    }
}
