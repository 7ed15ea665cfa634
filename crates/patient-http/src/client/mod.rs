//! The HTTP transport: pooled keep-alive HTTP/1.1 and HTTP/2 connections over
//! TCP or rustls, through an optional proxy, with connect and request
//! timeouts and a response size limit.
//!
//! [`HttpClient::send`] performs one request (one redirect hop) and reads the
//! whole response; [`HttpClient::send_streaming`] returns at the response
//! head and yields the body frame by frame (trailers included), with a
//! request body that may itself be a stream. Both go through the same
//! exchange path. Redirects, secrets, retries of failed responses and error
//! wrapping live above this module.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use patient_http::client::{ClientConfig, HttpClient, OutgoingRequest};
//!
//! let client = HttpClient::new(ClientConfig::default())?;
//! let request = OutgoingRequest::new(http::Method::GET, "https://example.com/".parse()?);
//! let response = client.send(request).await?;
//! println!("{} {} bytes", response.status, response.body.len());
//! # Ok(())
//! # }
//! ```
//!
//! The files, each depending only on files listed before it: `error`,
//! `origin` (where a request goes), `request`, `decode` (content codings),
//! `conn` and `pool` (connections and their reuse), `response`, `no_proxy`,
//! `proxy` and `config` (settings), `stream`, `tcp`, `tls` and `tunnel`
//! (byte streams), `connect` (HTTP handshakes), `exchange` (the request
//! path) and `http_client` (the handle).

mod config;
mod conn;
mod connect;
mod decode;
mod error;
mod exchange;
mod http_client;
mod no_proxy;
mod origin;
mod pool;
mod proxy;
mod request;
mod response;
mod stream;
mod tcp;
mod tls;
mod tunnel;

/// Request compression, shared with the engine (which compresses before
/// signing preprocessors run).
pub(crate) use self::decode::gzip;
pub use self::{
    config::{AddressFilter, ClientConfig, ClientConfigBuilder, HttpVersionPref},
    error::{
        ClientConfigError, ErrorType, TransportError, MAX_RESPONSE_HEAD, RESPONSE_HEAD_TOO_LARGE,
    },
    http_client::HttpClient,
    pool::PoolStats,
    proxy::ProxyConfig,
    request::{BoxError, OutgoingRequest, RequestBody, StreamingRequest},
    response::{RawResponse, ResponseBody, StreamingResponse},
};

#[cfg(test)]
mod layout {
    //! The files of this module depend on each other without cycles, and
    //! none on this file (which only re-exports).

    use std::collections::{BTreeMap, BTreeSet};

    /// The sibling modules a file names after `super::`.
    fn dependencies(source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
        let code: String = source
            .lines()
            .map(|line| line.split("//").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n");
        let mut found = BTreeSet::new();
        for (at, _) in code.match_indices("super::") {
            let rest = &code[at + "super::".len()..];
            let names: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                // Top-level items of `super::{a::{..}, b, ..}`.
                let mut depth = 0;
                let mut names = Vec::new();
                let mut start = 0;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            names.push(&group[start..i]);
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            names.push(&group[start..i]);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                names
            } else {
                vec![rest]
            };
            for name in names {
                let name = name.trim();
                let end = name
                    .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .unwrap_or(name.len());
                let name = &name[..end];
                if name.is_empty() || name == "self" || name == "super" {
                    continue;
                }
                assert!(
                    modules.contains(name),
                    "`super::{name}` names an item of the parent module, not a sibling"
                );
                found.insert(name.to_owned());
            }
        }
        found
    }

    #[test]
    fn modules_form_no_cycle() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/client");
        let mut sources = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            if path.extension().is_some_and(|e| e == "rs") && name != "mod" {
                sources.insert(name, std::fs::read_to_string(&path).unwrap());
            }
        }
        let modules: BTreeSet<String> = sources.keys().cloned().collect();
        let graph: BTreeMap<String, BTreeSet<String>> = sources
            .iter()
            .map(|(name, source)| {
                let mut deps = dependencies(source, &modules);
                deps.remove(name);
                (name.clone(), deps)
            })
            .collect();

        // Depth-first search; a module met again on the current path is a
        // cycle.
        fn visit(
            module: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) {
            if done.contains(module) {
                return;
            }
            if let Some(start) = path.iter().position(|m| m == module) {
                panic!("module cycle: {} -> {module}", path[start..].join(" -> "));
            }
            path.push(module.to_owned());
            for dep in &graph[module] {
                visit(dep, graph, path, done);
            }
            path.pop();
            done.insert(module.to_owned());
        }
        let mut done = BTreeSet::new();
        for module in graph.keys() {
            visit(module, &graph, &mut Vec::new(), &mut done);
        }
        assert!(graph["exchange"].contains("pool"), "{graph:?}");
    }
}
