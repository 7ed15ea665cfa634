//! The `CONNECT` tunnel through an HTTP proxy to an `https` target.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    error::{ErrorType, Phase, TransportError},
    proxy::ProxyEndpoint,
    stream::Stream,
};

/// Opens a `CONNECT` tunnel to `target` (`host:port`) through an established
/// connection to the proxy.
pub(crate) async fn tunnel(
    mut stream: Stream,
    proxy: &ProxyEndpoint,
    target: &str,
) -> Result<Stream, TransportError> {
    let mut request = Vec::with_capacity(128);
    request.extend_from_slice(b"CONNECT ");
    request.extend_from_slice(target.as_bytes());
    request.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    request.extend_from_slice(target.as_bytes());
    request.extend_from_slice(b"\r\n");
    if let Some(auth) = &proxy.auth {
        request.extend_from_slice(b"Proxy-Authorization: ");
        request.extend_from_slice(auth.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"\r\n");
    let io_err = |e| TransportError::from_io(e, &proxy.authority, Phase::Connect);
    stream.write_all(&request).await.map_err(io_err)?;
    stream.flush().await.map_err(io_err)?;

    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        let n = stream.read(&mut chunk).await.map_err(io_err)?;
        if n == 0 {
            return Err(proxy_error(
                proxy,
                target,
                "the proxy closed the connection during CONNECT",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if buf.len() > 16 * 1024 {
            return Err(proxy_error(
                proxy,
                target,
                "the CONNECT response head is too large",
            ));
        }
    }
    let status = std::str::from_utf8(&buf)
        .ok()
        .and_then(|head| head.split("\r\n").next())
        .and_then(|line| {
            let mut parts = line.split(' ');
            let version = parts.next()?;
            let code = parts.next()?.parse::<u16>().ok()?;
            version.starts_with("HTTP/1.").then_some(code)
        });
    match status {
        Some(code) if (200..300).contains(&code) => Ok(stream),
        Some(407) => Err(TransportError::new(
            ErrorType::Connection,
            "ProxyAuthenticationRequired",
            format!(
                "proxy {} requires authentication (407) for CONNECT to {target}",
                proxy.authority
            ),
        )),
        Some(code) => Err(proxy_error(
            proxy,
            target,
            &format!("the proxy answered CONNECT with status {code}"),
        )),
        None => Err(proxy_error(
            proxy,
            target,
            "the proxy sent a malformed CONNECT response",
        )),
    }
}

fn proxy_error(proxy: &ProxyEndpoint, target: &str, what: &str) -> TransportError {
    TransportError::new(
        ErrorType::Connection,
        "ProxyError",
        format!("{what} (proxy {}, target {target})", proxy.authority),
    )
}
