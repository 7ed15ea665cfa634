//! Named secrets, resolved only when a request is sent.

use std::{collections::HashMap, fmt, sync::Arc};

/// Why a secret could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// No secret of that name is registered.
    #[error("secret {name:?} is not registered")]
    NotFound {
        /// The name asked for.
        name: String,
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

/// A secret value: fixed, or computed each time a request is sent (a token
/// that rotates, a value read from a vault).
///
/// Its `Debug` output never shows the value.
#[derive(Clone)]
pub enum Secret {
    /// A fixed value.
    Static(String),
    /// Computed on each use; an `Err` names what went wrong.
    Computed(Arc<Provider>),
}

impl Secret {
    /// A secret computed on each use.
    pub fn computed(f: impl Fn() -> Result<String, String> + Send + Sync + 'static) -> Secret {
        Secret::Computed(Arc::new(f))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Secret::Static(_) => f.write_str("Secret::Static(<redacted>)"),
            Secret::Computed(_) => f.write_str("Secret::Computed(<fn>)"),
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
}

impl Secrets {
    /// No secrets.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) a secret.
    pub fn insert(&mut self, name: impl Into<String>, secret: impl Into<Secret>) {
        self.map.insert(name.into(), secret.into());
    }

    /// Whether a secret of that name is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The secret's value now.
    pub fn resolve(&self, name: &str) -> Result<String, SecretError> {
        match self.map.get(name) {
            None => Err(SecretError::NotFound {
                name: name.to_owned(),
            }),
            Some(Secret::Static(v)) => Ok(v.clone()),
            Some(Secret::Computed(f)) => f().map_err(|reason| SecretError::Failed {
                name: name.to_owned(),
                reason,
            }),
        }
    }
}
