//! [`FileStore`]: one file per payload in a directory (for development).

use std::{
    io::ErrorKind,
    path::{Path, PathBuf},
};

use async_trait::async_trait;
use tokio::{fs, io::AsyncWriteExt};

use super::PayloadStore;
use crate::StoreError;

/// The kind named in this store's errors.
const KIND: &str = "file";

/// Keeps each payload in its own file, `<directory>/<key>.json` — the layout
/// of the Ruby gem's file store, so both can share a directory.
///
/// Writes are atomic: the payload goes to a temporary file in the same
/// directory, is flushed to disk, and is renamed over the final name, so a
/// reader or a crash never sees half a payload. Meant for development and
/// tests: hosts do not share the directory.
///
/// Keys must be non-empty and must not contain path separators, `..` or NUL;
/// an invalid key is a [`StoreError::Backend`] error naming the key.
///
/// ```no_run
/// # async fn example() -> Result<(), patient_store::StoreError> {
/// use patient_store::{store::FileStore, PayloadStore};
///
/// let store = FileStore::new("/tmp/patient-payloads")?;
/// let key = store.generate_key();
/// store.store(&key, r#"{"status":200}"#).await?;
/// assert_eq!(store.fetch(&key).await?.as_deref(), Some(r#"{"status":200}"#));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// A store in `dir`, which is created (with its parents) if missing.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| {
            StoreError::backend(
                KIND,
                format!("cannot create directory {}", dir.display()),
                e,
            )
        })?;
        Ok(Self { dir })
    }

    /// The directory holding the payload files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.dir.join(format!("{key}.json")))
    }
}

fn validate_key(key: &str) -> Result<(), StoreError> {
    let problem = if key.is_empty() {
        Some("it is empty")
    } else if key.contains(['/', '\\']) {
        Some("it contains a path separator")
    } else if key.contains("..") {
        Some("it contains `..`")
    } else if key.contains('\0') {
        Some("it contains NUL")
    } else {
        None
    };
    match problem {
        Some(problem) => Err(StoreError::Backend {
            store: KIND.into(),
            message: format!("invalid key {key:?}: {problem}"),
            source: None,
        }),
        None => Ok(()),
    }
}

fn io_error(action: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::backend(KIND, format!("cannot {action} {}", path.display()), e)
}

#[async_trait]
impl PayloadStore for FileStore {
    async fn store(&self, key: &str, json: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        // A unique name per write, so concurrent writers of one key never
        // share a temporary file; the leading dot and `.tmp` keep it apart
        // from payload files.
        let tmp = self
            .dir
            .join(format!(".{key}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = async {
            let mut file = fs::File::create(&tmp)
                .await
                .map_err(|e| io_error("create", &tmp, e))?;
            file.write_all(json.as_bytes())
                .await
                .map_err(|e| io_error("write", &tmp, e))?;
            file.sync_all()
                .await
                .map_err(|e| io_error("sync", &tmp, e))?;
            drop(file);
            fs::rename(&tmp, &path)
                .await
                .map_err(|e| io_error("rename into", &path, e))
        }
        .await;
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp).await;
            return Err(e);
        }
        sync_dir(&self.dir).await;
        Ok(())
    }

    async fn fetch(&self, key: &str) -> Result<Option<String>, StoreError> {
        let path = self.path(key)?;
        match fs::read_to_string(&path).await {
            Ok(json) => Ok(Some(json)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", &path, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &path, e)),
        }
    }
}

/// Makes a rename in `dir` durable. Best effort: some platforms cannot open
/// a directory for syncing, and the payload itself is already on disk.
async fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir).await {
        let _ = d.sync_all().await;
    }
    #[cfg(not(unix))]
    let _ = dir;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_keys_are_rejected_with_the_key_named() {
        for key in ["", "a/b", "a\\b", "..", "../x", "x..y", "a\0b"] {
            let err = validate_key(key).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{key:?}")),
                "{key:?}: {err}"
            );
        }
        validate_key("0b6c7f1e-6a43-4d1f-9d8e-2f6a1c1d2e3f").unwrap();
        validate_key("payload.v1").unwrap();
    }
}
