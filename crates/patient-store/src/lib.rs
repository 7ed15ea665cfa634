//! Payload stores and encryption for patient's wire payloads (spec §2).
//!
//! * [`PayloadStore`]: one small trait for a place that keeps serialized
//!   payloads by key — [`store::FileStore`], [`store::RedisStore`],
//!   [`store::S3Store`], [`store::SqlStore`] (SQLite and PostgreSQL), or your own.
//! * [`PayloadStores`]: stores registered by name; a payload whose JSON is
//!   larger than the threshold goes to the last registered store and is
//!   replaced by `{"$ref": {"store": name, "key": key}}`; every registered
//!   store stays readable.
//! * [`Encryptor`]: AES-256-GCM with keys derived from configured secrets,
//!   rotation, custom functions, and the `{"__encrypted__": true, "value": …}`
//!   envelope of the wire format; [`Encryptor::active_support`] for the
//!   PatientHttp gem's format ([`activesupport`]).
//! * [`PayloadCodec`]: both in one call, for a job-queue integration.
//! * [`journal::SqliteJournal`] (feature `sql`): the processor's task journal
//!   in a SQLite file, for crash recovery in library mode.

pub mod activesupport;
pub mod codec;
pub mod encryption;
pub mod error;
#[cfg(feature = "sql")]
pub mod journal;
pub mod registry;
pub mod store;

pub use codec::PayloadCodec;
pub use encryption::Encryptor;
pub use error::StoreError;
pub use registry::PayloadStores;
pub use store::PayloadStore;
