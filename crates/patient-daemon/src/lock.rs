//! One daemon per SQLite queue: an exclusive lock on the directory of the
//! database, held for the life of the process.
//!
//! A second daemon on the same SQLite file would take the first one's
//! running tasks for a crash's leftovers at its start. The lock is the
//! operating system's (`flock` on Unix) on the file `patient.lock` in that
//! directory, so a daemon killed with `kill -9` holds nothing once it is
//! gone, whatever file it leaves behind; the file names the holder's pid
//! for the refusal's message. The file is never deleted: a daemon that
//! deleted it on its way out could let two later ones lock two different
//! files of the same name.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

/// The name of the lock file in the directory it guards.
pub const LOCK_FILE: &str = "patient.lock";

/// The lock on a directory; released when dropped (or when the process
/// ends, however it ends).
#[derive(Debug)]
pub struct DirLock {
    /// Kept open: closing it releases the lock.
    _file: File,
    path: PathBuf,
}

/// Why a directory could not be locked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LockError {
    /// Another process holds it.
    #[error("{} is held by another patient daemon ({}); stop that one first, or give this one another data_dir", dir.display(), holder(*pid))]
    Held {
        /// The directory.
        dir: PathBuf,
        /// The holder's pid, as it wrote it in the lock file (unknown when
        /// it has not written it yet).
        pid: Option<u32>,
    },
    /// The lock file could not be created, opened, locked or written.
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// Whether another process holds the lock (rather than the file
    /// failing).
    pub fn is_held(&self) -> bool {
        matches!(self, LockError::Held { .. })
    }
}

fn holder(pid: Option<u32>) -> String {
    match pid {
        Some(pid) => format!("pid {pid}"),
        None => "pid unknown".to_owned(),
    }
}

impl DirLock {
    /// Locks `dir` (creating it when missing) for this process and writes
    /// this process's pid in its lock file; [`LockError::Held`], naming the
    /// directory as the filesystem resolves it (symbolic links followed)
    /// and the holder's pid, when another process holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE);
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // Named as the filesystem knows it, however it was spelled.
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        // Not truncated on open: until the lock is ours, the pid in it is
        // the holder's.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let pid = file
                    .read_to_string(&mut text)
                    .ok()
                    .and_then(|_| text.trim().parse().ok());
                return Err(LockError::Held { dir, pid });
            }
            Err(TryLockError::Error(source)) => return Err(io(source)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(DirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_is_refused_with_the_holders_pid_until_it_is_released() {
        let dir =
            std::env::temp_dir().join(format!("patient-lock-{}", uuid::Uuid::new_v4().simple()));
        let first = DirLock::acquire(&dir).unwrap();
        let pid = std::process::id();
        // A second handle conflicts even within one process.
        match DirLock::acquire(&dir) {
            Err(e @ LockError::Held { .. }) => {
                assert!(e.is_held());
                let message = e.to_string();
                let named = std::fs::canonicalize(&dir).unwrap();
                assert!(message.contains(&named.display().to_string()), "{message}");
                assert!(message.contains(&format!("pid {pid}")), "{message}");
            }
            other => panic!("not refused: {other:?}"),
        }
        drop(first);
        let again = DirLock::acquire(&dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(again.path()).unwrap().trim(),
            pid.to_string()
        );
        drop(again);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
