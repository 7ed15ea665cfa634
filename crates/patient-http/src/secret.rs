//! Named secrets, resolved only when a request is sent.
//!
//! A [`Secret`] is a fixed value, a value computed on each use by a quick
//! synchronous function ([`Secret::computed`]), or one computed by an async
//! function ([`Secret::computed_async`]): a vault lookup or a token exchange
//! awaits its I/O instead of blocking a runtime worker. Secrets are resolved
//! on every attempt (and again when a response hook asks for a replay, see
//! [`ResponseAction::Replay`](crate::interceptor::ResponseAction::Replay)),
//! and the time they take counts against the attempt's timeout: a provider
//! that hangs ends the attempt as a timeout, it never holds the task past
//! its timeout or deadline.
//!
//! ```
//! use patient_http::{Secret, Secrets};
//!
//! let mut secrets = Secrets::new();
//! secrets.insert("api_key", "s3cr3t");
//! secrets.insert("rotating", Secret::computed(|| Ok(format!("t-{}", 42))));
//! secrets.insert(
//!     "vault",
//!     Secret::computed_async(|| async {
//!         // e.g. an HTTP call to the vault, awaited
//!         Ok::<_, String>("from-the-vault".to_owned())
//!     }),
//! );
//!
//! # tokio::runtime::Builder::new_current_thread().build()?.block_on(async {
//! assert_eq!(secrets.resolve("vault").await?, "from-the-vault");
//! assert_eq!(secrets.resolve("rotating").await?, "t-42");
//! assert!(secrets.resolve("missing").await.is_err());
//! # Ok::<(), patient_http::SecretError>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::{collections::HashMap, fmt, future::Future, pin::Pin, sync::Arc};

/// Why a secret could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No secret of that name is registered.
    #[error("secret {name:?} is not registered")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// The secret may not be sent to this host: its owner listed others
    /// ([`Secrets::insert_for_hosts`]).
    #[error("secret {name:?} may not be sent to {host:?}: it is allowed for other hosts only")]
    HostNotAllowed {
        /// The secret's name.
        name: String,
        /// The host the request was going to.
        host: String,
    },
    /// A computed secret failed.
    #[error("secret {name:?} could not be computed: {reason}")]
    Failed {
        /// The secret's name.
        name: String,
        /// What the provider said.
        reason: String,
    },
}

type Provider = dyn Fn() -> Result<String, String> + Send + Sync;

/// What an async secret provider returns: a boxed future of the value.
type SecretFuture = Pin<Box<dyn Future<Output = Result<String, String>> + Send>>;

type AsyncProvider = dyn Fn() -> SecretFuture + Send + Sync;

/// A secret value: fixed, or computed each time a request is sent (a token
/// that rotates, a value read from a vault), synchronously or by awaiting.
///
/// Its `Debug` output never shows the value.
#[derive(Clone)]
pub enum Secret {
    /// A fixed value.
    Static(String),
    /// Computed on each use by a synchronous function; an `Err` names what
    /// went wrong. It runs on a runtime worker and should be quick.
    Computed(Arc<Provider>),
    /// Computed on each use by awaiting a future; an `Err` names what went
    /// wrong.
    ComputedAsync(Arc<AsyncProvider>),
}

impl Secret {
    /// A secret computed on each use by a quick synchronous function.
    pub fn computed(f: impl Fn() -> Result<String, String> + Send + Sync + 'static) -> Secret {
        Secret::Computed(Arc::new(f))
    }

    /// A secret computed on each use by an async function (a vault lookup,
    /// a token exchange): the attempt awaits it without blocking a runtime
    /// worker, within the attempt's timeout.
    ///
    /// ```
    /// use patient_http::Secret;
    ///
    /// let token = Secret::computed_async(|| async {
    ///     // e.g. `vault.read("billing/api-key").await`
    ///     Ok::<_, String>("t0ken".to_owned())
    /// });
    /// ```
    pub fn computed_async<F, Fut>(f: F) -> Secret
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        Secret::ComputedAsync(Arc::new(move || -> SecretFuture { Box::pin(f()) }))
    }

    /// The secret's value now; an `Err` is what the provider said.
    pub async fn value(&self) -> Result<String, String> {
        match self {
            Secret::Static(v) => Ok(v.clone()),
            Secret::Computed(f) => f(),
            Secret::ComputedAsync(f) => f().await,
        }
    }

    /// Whether resolving it needs an `await` ([`Secret::ComputedAsync`]).
    pub fn is_async(&self) -> bool {
        matches!(self, Secret::ComputedAsync(_))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Static(_) => f.write_str("Secret::Static(<redacted>)"),
            Secret::Computed(_) => f.write_str("Secret::Computed(<fn>)"),
            Secret::ComputedAsync(_) => f.write_str("Secret::ComputedAsync(<fn>)"),
        }
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::Static(value.to_owned())
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret::Static(value)
    }
}

/// The secrets registered on a processor, by name.
#[derive(Clone, Default, Debug)]
pub struct Secrets {
    map: HashMap<String, Secret>,
    /// The hosts each restricted secret may be sent to.
    hosts: HashMap<String, Arc<[String]>>,
}

/// Whether `host` (a URL's host, without port) is one of `patterns`:
/// exact names (case-insensitive, a trailing dot ignored), or `*.suffix`
/// for every name under a domain but not the domain itself.
pub fn host_listed(patterns: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    patterns.iter().any(|pattern| {
        let pattern = pattern.trim().trim_end_matches('.').to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
            }
            None => host == pattern,
        }
    })
}

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) a secret, sent to any host a request names.
    pub fn insert(&mut self, name: impl Into<String>, secret: impl Into<Secret>) {
        let name = name.into();
        self.hosts.remove(&name);
        self.map.insert(name, secret.into());
    }

    /// Registers (or replaces) a secret that is sent only to `hosts` (exact
    /// names, or `*.suffix`; see [`host_listed`]): a request to any other
    /// host fails to resolve it with [`SecretError::HostNotAllowed`] before
    /// anything is sent.
    pub fn insert_for_hosts(
        &mut self,
        name: impl Into<String>,
        secret: impl Into<Secret>,
        hosts: impl IntoIterator<Item = impl Into<String>>,
    ) {
        let name = name.into();
        let hosts: Arc<[String]> = hosts.into_iter().map(Into::into).collect();
        self.hosts.insert(name.clone(), hosts);
        self.map.insert(name, secret.into());
    }

    /// Whether a secret of that name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The secret's value for a request to `host`: as [`resolve`](Self::resolve),
    /// and [`SecretError::HostNotAllowed`] when the secret is restricted to
    /// other hosts.
    pub async fn resolve_for_host(&self, name: &str, host: &str) -> Result<String, SecretError> {
        if let Some(hosts) = self.hosts.get(name) {
            if !host_listed(hosts, host) {
                return Err(SecretError::HostNotAllowed {
                    name: name.to_owned(),
                    host: host.to_owned(),
                });
            }
        }
        self.resolve(name).await
    }

    /// The secret's value now, awaiting it when it is computed
    /// asynchronously.
    pub async fn resolve(&self, name: &str) -> Result<String, SecretError> {
        match self.map.get(name) {
            None => Err(SecretError::NotFound {
                name: name.to_owned(),
            }),
            Some(secret) => secret.value().await.map_err(|reason| SecretError::Failed {
                name: name.to_owned(),
                reason,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_secret_for_hosts_resolves_for_those_hosts_only() {
        let mut secrets = Secrets::new();
        secrets.insert_for_hosts("key", "v", ["api.example.com", "*.corp.example"]);
        secrets.insert("open", "o");
        assert_eq!(
            secrets
                .resolve_for_host("key", "API.example.com")
                .await
                .unwrap(),
            "v"
        );
        assert_eq!(
            secrets
                .resolve_for_host("key", "a.corp.example")
                .await
                .unwrap(),
            "v"
        );
        for host in [
            "corp.example",
            "xcorp.example",
            "api.example.com.evil",
            "127.0.0.1",
        ] {
            assert!(matches!(
                secrets.resolve_for_host("key", host).await,
                Err(SecretError::HostNotAllowed { .. })
            ));
        }
        assert_eq!(
            secrets.resolve_for_host("open", "anywhere").await.unwrap(),
            "o"
        );
        // Registering it again without hosts lifts the restriction.
        secrets.insert("key", "w");
        assert_eq!(
            secrets.resolve_for_host("key", "anywhere").await.unwrap(),
            "w"
        );
    }
}
