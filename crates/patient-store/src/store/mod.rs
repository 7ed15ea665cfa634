//! The [`PayloadStore`] trait and its implementations.

use async_trait::async_trait;

use crate::StoreError;

pub mod file;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "s3")]
pub mod s3;
#[cfg(feature = "sql")]
pub mod sql;

pub use file::FileStore;
#[cfg(feature = "redis")]
pub use redis::RedisStore;
#[cfg(feature = "s3")]
pub use s3::{S3Config, S3Store};
#[cfg(feature = "sql")]
pub use sql::SqlStore;

/// A place that keeps serialized payloads (JSON text) by key.
///
/// Keys are UUIDs unless [`generate_key`](PayloadStore::generate_key) says
/// otherwise. Implementations must be safe to call from many tasks at once.
#[async_trait]
pub trait PayloadStore: Send + Sync + 'static {
    /// A new key for a payload.
    fn generate_key(&self) -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// Keeps `json` under `key`, replacing anything there. When this returns
    /// `Ok`, the whole payload is stored: a crash never leaves half of it.
    async fn store(&self, key: &str, json: &str) -> Result<(), StoreError>;

    /// The payload under `key`, or `None` when there is none.
    async fn fetch(&self, key: &str) -> Result<Option<String>, StoreError>;

    /// Removes the payload under `key`; removing a missing key is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;
}
