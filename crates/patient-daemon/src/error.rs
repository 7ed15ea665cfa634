//! Why the daemon could not start, or stopped with an error.

use std::io;

use crate::lock::LockError;

/// Why the daemon could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting that cannot work as given.
    #[error("{0}")]
    Settings(String),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Store(String),
    /// Another daemon holds the SQLite queue's directory (or it could not
    /// be locked).
    #[error("cannot start: {0}")]
    Locked(#[from] LockError),
    /// Serving failed.
    #[error("serving failed: {0}")]
    Io(#[from] io::Error),
}
