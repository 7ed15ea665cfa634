//! Errors of stores, the registry and encryption.

use crate::activesupport::KeyDigest;

/// What went wrong storing, fetching, deleting, encrypting or decrypting a payload.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A reference names a store that is not registered.
    #[error("payload store {store:?} is not registered")]
    UnknownStore {
        /// The store's name.
        store: String,
    },
    /// The store has no payload under the key.
    #[error("stored payload not found: {store}/{key}")]
    NotFound {
        /// The store's name.
        store: String,
        /// The key.
        key: String,
    },
    /// No store is registered to take new payloads.
    #[error("no payload store is registered")]
    NoStore,
    /// The value is not a storage reference.
    #[error("not a storage reference: {0}")]
    NotAReference(String),
    /// The backend failed (I/O, network, database).
    #[error("payload store {store:?} failed: {message}")]
    Backend {
        /// The store's name or kind.
        store: String,
        /// What happened.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// Stored data is not valid JSON.
    #[error("stored payload {store}/{key} is not valid JSON: {message}")]
    Corrupt {
        /// The store's name.
        store: String,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Decryption failed: wrong key, tampered or truncated ciphertext.
    #[error("cannot decrypt payload: {0}")]
    Decrypt(String),
    /// An Active Support message whose key was derived from a configured
    /// secret, but with another digest than the configured one: the Ruby
    /// side's `KeyGenerator` has another `hash_digest_class`.
    #[error(
        "cannot decrypt payload: the Active Support message was encrypted with a key derived \
         with {written_with} (KeyGenerator's hash_digest_class: {}), but the configured key \
         digest is {configured}; set the key digest to {written_with}",
        written_with.ruby_class()
    )]
    KeyDigestMismatch {
        /// The digest this side derives keys with.
        configured: KeyDigest,
        /// The digest the message's key was derived with.
        written_with: KeyDigest,
    },
    /// Encryption failed.
    #[error("cannot encrypt payload: {0}")]
    Encrypt(String),
    /// A configuration value is invalid; the message names it.
    #[error("invalid payload store configuration: {0}")]
    Config(String),
}

impl StoreError {
    /// A backend error with its source.
    pub fn backend(
        store: impl Into<String>,
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Backend {
            store: store.into(),
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}
