//! Connections that misbehave at the TCP and HTTP/1.1 framing level.
//!
//! The fault listener speaks raw TCP: it reads one request head, picks the
//! [`Fault`] named by the request path and then breaks the exchange in that
//! way. Anything else gets a plain `404`.

use std::{io, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A way for the upstream to break an HTTP/1.1 exchange.
///
/// Use [`Upstream::fault_url`](crate::Upstream::fault_url), or join
/// [`path`](Self::path) to the `fault=` address printed by the
/// `patient-upstream` binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Sends a head with `Content-Length: 100000`, half of the body, then
    /// resets the connection (`SO_LINGER` 0, so the peer sees RST).
    ResetMidBody,
    /// Closes the connection right after reading the request, before any
    /// response byte.
    CloseBeforeHeaders,
    /// Writes a valid response head one byte every 50 ms; the head takes
    /// about 4 s, so a client timeout of 1 s fires first.
    TrickleHeaders,
    /// Answers `Transfer-Encoding: chunked` with an invalid chunk-size line.
    MalformedChunked,
    /// Sends a response head larger than 1 MiB.
    OversizedHeaders,
    /// Announces `Content-Length: 1000`, sends 10 bytes, then closes.
    ShortBody,
}

impl Fault {
    /// Every fault, in declaration order.
    pub const ALL: [Fault; 6] = [
        Fault::ResetMidBody,
        Fault::CloseBeforeHeaders,
        Fault::TrickleHeaders,
        Fault::MalformedChunked,
        Fault::OversizedHeaders,
        Fault::ShortBody,
    ];

    /// The request path that triggers this fault, e.g. `/reset-mid-body`.
    pub fn path(self) -> &'static str {
        match self {
            Fault::ResetMidBody => "/reset-mid-body",
            Fault::CloseBeforeHeaders => "/close-before-headers",
            Fault::TrickleHeaders => "/trickle-headers",
            Fault::MalformedChunked => "/malformed-chunked",
            Fault::OversizedHeaders => "/oversized-headers",
            Fault::ShortBody => "/short-body",
        }
    }

    /// The fault whose [`path`](Self::path) is `path`, if any.
    pub fn from_path(path: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.path() == path)
    }
}

/// Largest request head the fault listener reads before giving up.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Interval between bytes for [`Fault::TrickleHeaders`].
const TRICKLE_INTERVAL: Duration = Duration::from_millis(50);

/// Serves one connection on the fault listener.
pub(crate) async fn serve(mut stream: TcpStream) {
    let _ = serve_inner(&mut stream).await;
}

async fn serve_inner(stream: &mut TcpStream) -> io::Result<()> {
    let Some(head) = read_request_head(stream).await? else {
        return Ok(());
    };
    let Some(fault) = request_path(&head).and_then(Fault::from_path) else {
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 13\r\nConnection: close\r\n\r\nunknown fault")
            .await?;
        return stream.shutdown().await;
    };
    match fault {
        Fault::ResetMidBody => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n")
                .await?;
            stream.write_all(&[b'x'; 50_000]).await?;
            stream.flush().await?;
            // Give the bytes a moment to reach the peer before the RST.
            tokio::time::sleep(Duration::from_millis(20)).await;
            stream.set_zero_linger()?;
            Ok(())
        }
        Fault::CloseBeforeHeaders => Ok(()),
        Fault::TrickleHeaders => {
            let head: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Trickle: one byte every fifty milliseconds\r\nContent-Length: 2\r\n\r\nok";
            for byte in head {
                stream.write_all(std::slice::from_ref(byte)).await?;
                stream.flush().await?;
                tokio::time::sleep(TRICKLE_INTERVAL).await;
            }
            stream.shutdown().await
        }
        Fault::MalformedChunked => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nzz;not-hex\r\nworld\r\n0\r\n\r\n")
                .await?;
            stream.shutdown().await
        }
        Fault::OversizedHeaders => {
            let mut head = Vec::with_capacity(1_200_000);
            head.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
            let filler = "a".repeat(1000);
            for i in 0..1100 {
                head.extend_from_slice(format!("X-Filler-{i:04}: {filler}\r\n").as_bytes());
            }
            head.extend_from_slice(b"Content-Length: 2\r\nConnection: close\r\n\r\nok");
            stream.write_all(&head).await?;
            stream.shutdown().await
        }
        Fault::ShortBody => {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n0123456789")
                .await?;
            stream.shutdown().await
        }
    }
}

/// Reads until the end of the request head; `None` if the peer closed or
/// the head is too large.
async fn read_request_head(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

/// The path of the request target (origin or absolute form), without query.
fn request_path(head: &[u8]) -> Option<&str> {
    let line = head.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let target = line.split(' ').nth(1)?;
    let target = match target.find("://") {
        Some(i) => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        None => target,
    };
    Some(target.split(['?', '#']).next().unwrap_or(target))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_round_trip() {
        for fault in Fault::ALL {
            assert_eq!(Fault::from_path(fault.path()), Some(fault));
        }
        assert_eq!(Fault::from_path("/nope"), None);
    }

    #[test]
    fn request_path_handles_both_forms() {
        assert_eq!(
            request_path(b"GET /short-body?x=1 HTTP/1.1\r\nHost: a"),
            Some("/short-body")
        );
        assert_eq!(
            request_path(b"GET http://127.0.0.1:1/short-body HTTP/1.1"),
            Some("/short-body")
        );
        assert_eq!(request_path(b"GET http://127.0.0.1:1 HTTP/1.1"), Some("/"));
    }
}
