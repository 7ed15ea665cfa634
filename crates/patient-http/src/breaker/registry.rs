//! [`BreakerRegistry`]: one [`CircuitBreaker`] per upstream key, created on
//! first use from a per-key or default [`BreakerPolicy`].

use std::{
    collections::HashMap,
    fmt,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::{Arc, Mutex, PoisonError},
};

use super::{BreakerOpen, BreakerPermit, BreakerPolicy, BreakerState, CircuitBreaker};

/// Called with `(key, from, to)` on every state change of a registry's
/// breakers.
type KeyedTransitionFn = Arc<dyn Fn(&str, BreakerState, BreakerState) + Send + Sync>;

/// The circuit breakers of many upstreams, by key.
///
/// A key is whatever the caller groups calls by: an origin such as
/// `"https://api.openai.com:443"` or a configured name such as `"openai"`.
/// Each key gets its own [`CircuitBreaker`] on first use, with the policy set
/// for that key by [`with_policy`](Self::with_policy) or else the default.
/// Breakers live as long as the registry.
///
/// State changes go to the [`on_transition`](Self::on_transition) callback
/// (for observers and metrics), called outside any lock, and to a `tracing`
/// event.
pub struct BreakerRegistry {
    default_policy: BreakerPolicy,
    policies: HashMap<String, BreakerPolicy>,
    breakers: Mutex<HashMap<String, Arc<CircuitBreaker>>>,
    on_transition: Option<KeyedTransitionFn>,
}

impl fmt::Debug for BreakerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerRegistry")
            .field("default_policy", &self.default_policy)
            .field("policies", &self.policies)
            .field("states", &self.states())
            .finish_non_exhaustive()
    }
}

impl Default for BreakerRegistry {
    /// Every key on [`BreakerPolicy::default`], no callback.
    fn default() -> Self {
        BreakerRegistry::new(BreakerPolicy::default())
    }
}

impl BreakerRegistry {
    /// A registry whose keys use `default_policy` unless
    /// [`with_policy`](Self::with_policy) says otherwise.
    pub fn new(default_policy: BreakerPolicy) -> Self {
        BreakerRegistry {
            default_policy,
            policies: HashMap::new(),
            breakers: Mutex::new(HashMap::new()),
            on_transition: None,
        }
    }

    /// Uses `policy` for `key` instead of the default. Default: none.
    #[must_use]
    pub fn with_policy(mut self, key: impl Into<String>, policy: BreakerPolicy) -> Self {
        self.policies.insert(key.into(), policy);
        self
    }

    /// Calls `callback(key, from, to)` on every state change of every breaker
    /// of this registry, outside any lock; a panic in it is caught and
    /// logged. Set it before the first [`get`](Self::get). Default: none.
    #[must_use]
    pub fn on_transition(
        mut self,
        callback: impl Fn(&str, BreakerState, BreakerState) + Send + Sync + 'static,
    ) -> Self {
        self.on_transition = Some(Arc::new(callback));
        self
    }

    /// The policy `key` runs on.
    pub fn policy_for(&self, key: &str) -> &BreakerPolicy {
        self.policies.get(key).unwrap_or(&self.default_policy)
    }

    /// The breaker of `key`, created closed on first use.
    pub fn get(&self, key: &str) -> Arc<CircuitBreaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(breaker) = breakers.get(key) {
            return Arc::clone(breaker);
        }
        let breaker = Arc::new(CircuitBreaker::build(
            self.policy_for(key).clone(),
            Some(self.keyed_callback(key)),
        ));
        breakers.insert(key.to_owned(), Arc::clone(&breaker));
        breaker
    }

    /// [`CircuitBreaker::try_acquire`] on the breaker of `key`.
    pub fn try_acquire(&self, key: &str) -> Result<BreakerPermit, BreakerOpen> {
        self.get(key).try_acquire()
    }

    /// The state of every breaker created so far, sorted by key, for
    /// dashboards. Open breakers whose break has ended show as half-open.
    pub fn states(&self) -> Vec<(String, BreakerState)> {
        let breakers: Vec<(String, Arc<CircuitBreaker>)> = self
            .breakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(key, breaker)| (key.clone(), Arc::clone(breaker)))
            .collect();
        // `state()` may call the transition callback: not under our lock.
        let mut states: Vec<(String, BreakerState)> = breakers
            .into_iter()
            .map(|(key, breaker)| (key, breaker.state()))
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    fn keyed_callback(&self, key: &str) -> super::breaker::TransitionFn {
        let key: Arc<str> = Arc::from(key);
        let callback = self.on_transition.clone();
        Arc::new(move |from: BreakerState, to: BreakerState| {
            tracing::info!(
                upstream = &*key,
                from = from.as_str(),
                to = to.as_str(),
                "circuit breaker state changed"
            );
            if let Some(callback) = &callback {
                if catch_unwind(AssertUnwindSafe(|| callback(&key, from, to))).is_err() {
                    tracing::error!(
                        upstream = &*key,
                        "circuit breaker transition callback panicked"
                    );
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::advance;

    use super::*;

    fn quick() -> BreakerPolicy {
        BreakerPolicy::builder()
            .consecutive_failures(Some(1))
            .break_duration(Duration::from_secs(1))
            .success_threshold(1)
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn keys_have_their_own_breakers_and_policies() {
        let registry = BreakerRegistry::new(quick()).with_policy(
            "tolerant",
            BreakerPolicy::builder()
                .consecutive_failures(Some(3))
                .build()
                .unwrap(),
        );
        assert!(Arc::ptr_eq(
            &registry.get("https://a.example:443"),
            &registry.get("https://a.example:443")
        ));
        assert_eq!(
            registry.policy_for("tolerant").consecutive_failures(),
            Some(3)
        );
        assert_eq!(registry.policy_for("other").consecutive_failures(), Some(1));

        registry
            .try_acquire("https://a.example:443")
            .unwrap()
            .failure();
        registry.try_acquire("tolerant").unwrap().failure();
        assert!(registry.try_acquire("https://a.example:443").is_err());
        assert!(registry.try_acquire("https://b.example:443").is_ok());
        assert_eq!(
            registry.states(),
            vec![
                ("https://a.example:443".to_owned(), BreakerState::Open),
                ("https://b.example:443".to_owned(), BreakerState::Closed),
                ("tolerant".to_owned(), BreakerState::Closed),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transition_callback_gets_key_and_sequence() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let registry = BreakerRegistry::new(quick()).on_transition(move |key, from, to| {
            log.lock().unwrap().push((key.to_owned(), from, to));
        });
        registry.try_acquire("a").unwrap().failure();
        advance(Duration::from_secs(1)).await;
        registry.try_acquire("a").unwrap().success();
        registry.try_acquire("b").unwrap().success();
        use BreakerState::*;
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                ("a".to_owned(), Closed, Open),
                ("a".to_owned(), Open, HalfOpen),
                ("a".to_owned(), HalfOpen, Closed),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn callback_may_use_the_registry() {
        // The callback runs outside the registry's and the breaker's locks.
        let registry = Arc::new(Mutex::new(None::<Arc<BreakerRegistry>>));
        let handle = Arc::clone(&registry);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let r = Arc::new(
            BreakerRegistry::new(quick()).on_transition(move |key, _, _| {
                let registry = handle.lock().unwrap().clone();
                if let Some(registry) = registry {
                    log.lock()
                        .unwrap()
                        .push((key.to_owned(), registry.states()));
                }
            }),
        );
        *registry.lock().unwrap() = Some(Arc::clone(&r));
        r.try_acquire("a").unwrap().failure();
        assert_eq!(
            *seen.lock().unwrap(),
            vec![("a".to_owned(), vec![("a".to_owned(), BreakerState::Open)])]
        );
        // Break the cycle.
        registry.lock().unwrap().take();
    }

    #[test]
    fn registry_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<BreakerRegistry>();
    }
}
