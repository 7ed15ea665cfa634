//! [`Origin`]: where a request goes, and the key of its host pool.

use std::sync::Arc;

/// Scheme, host and port of a request, and whether it goes through a proxy
/// (a client has at most one proxy per scheme, so that flag is enough to
/// tell the pools apart). Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Origin {
    pub(crate) https: bool,
    pub(crate) proxied: bool,
    pub(crate) port: u16,
    /// The host without IPv6 brackets.
    pub(crate) host: Arc<str>,
}

impl Origin {
    /// `host:port` (IPv6 in brackets), for messages, connecting and
    /// `CONNECT`.
    pub(crate) fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}
