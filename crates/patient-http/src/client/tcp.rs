//! TCP connects, direct or to a proxy, through hyper-util's
//! [`HttpConnector`]: Happy Eyeballs (RFC 8305: when a host has addresses of
//! both families and the first family has not connected within 300 ms, the
//! other is tried in parallel), TCP keepalive and `TCP_NODELAY`.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::client::legacy::connect::{dns::Name, HttpConnector};
use tokio::net::TcpStream;
use tower_service::Service;

use super::error::{DnsError, ErrorType, TransportError};

/// How long the first address family gets before the other one is tried.
const HAPPY_EYEBALLS_DELAY: Duration = Duration::from_millis(300);

/// Opens TCP connections.
pub(crate) struct TcpConnector {
    http: HttpConnector<Resolver>,
}

impl TcpConnector {
    /// A connector with the system resolver; `keepalive` is the idle time
    /// before TCP keepalive probes (`None`: off).
    pub(crate) fn new(keepalive: Option<Duration>) -> TcpConnector {
        TcpConnector::with_resolver(Resolver::System, keepalive)
    }

    fn with_resolver(resolver: Resolver, keepalive: Option<Duration>) -> TcpConnector {
        let mut http = HttpConnector::new_with_resolver(resolver);
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(keepalive);
        http.set_happy_eyeballs_timeout(Some(HAPPY_EYEBALLS_DELAY));
        TcpConnector { http }
    }

    /// Resolves `authority` (`host:port`, IPv6 in brackets) and connects to
    /// one of its addresses.
    pub(crate) async fn connect(&self, authority: &str) -> Result<TcpStream, TransportError> {
        let uri = Uri::try_from(format!("http://{authority}")).map_err(|e| {
            TransportError::new(
                ErrorType::Unknown,
                "InvalidUrl",
                format!("cannot connect to {authority}: {e}"),
            )
        })?;
        let mut http = self.http.clone();
        std::future::poll_fn(|cx| http.poll_ready(cx))
            .await
            .map_err(|e| TransportError::from_connect(Box::new(e), authority))?;
        match http.call(uri).await {
            Ok(io) => Ok(io.into_inner()),
            Err(e) => Err(TransportError::from_connect(Box::new(e), authority)),
        }
    }
}

/// Host name resolution for [`HttpConnector`] (IP literals never get here).
#[derive(Clone)]
enum Resolver {
    /// The system resolver (`getaddrinfo` on a blocking thread).
    System,
    /// Fixed addresses for every name, in order.
    #[cfg(test)]
    Fixed(std::sync::Arc<[SocketAddr]>),
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, DnsError>> + Send>>;

impl Service<Name> for Resolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = DnsError;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DnsError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Resolving {
        match self {
            Resolver::System => Box::pin(async move {
                let host = name.as_str();
                match tokio::net::lookup_host((host, 0)).await {
                    Ok(addrs) => {
                        let addrs: Vec<SocketAddr> = addrs.collect();
                        if addrs.is_empty() {
                            Err(DnsError::new(host, None))
                        } else {
                            Ok(addrs.into_iter())
                        }
                    }
                    Err(e) => Err(DnsError::new(host, Some(e))),
                }
            }),
            #[cfg(test)]
            Resolver::Fixed(addrs) => {
                let result = if addrs.is_empty() {
                    Err(DnsError::new(name.as_str(), None))
                } else {
                    Ok(addrs.iter().copied().collect::<Vec<_>>().into_iter())
                };
                Box::pin(std::future::ready(result))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::{TcpListener, TcpSocket};

    use super::*;

    /// `dual.test` resolves to `::1` first, where connects hang (a listener
    /// that never accepts, its backlog full), then to `127.0.0.1`, which
    /// answers: the connect falls back to IPv4 after the Happy Eyeballs
    /// delay instead of waiting for the IPv6 connect to time out.
    #[tokio::test]
    async fn happy_eyeballs_falls_back_to_the_other_family() {
        let Ok(v6) = TcpSocket::new_v6() else {
            return; // no IPv6 on this machine
        };
        if v6
            .bind(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0)))
            .is_err()
        {
            return;
        }
        let v6 = v6.listen(0).unwrap();
        let port = v6.local_addr().unwrap().port();
        let Ok(v4) = TcpListener::bind(("127.0.0.1", port)).await else {
            return; // that port is taken on IPv4
        };
        // Fills the backlog of 0: later connects to ::1 get no answer.
        let _queued = TcpStream::connect(("::1", port)).await.unwrap();

        let resolver = Resolver::Fixed(Arc::from(vec![
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
            SocketAddr::from(([127, 0, 0, 1], port)),
        ]));
        let connector = TcpConnector::with_resolver(resolver, Some(Duration::from_secs(15)));
        let started = std::time::Instant::now();
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            connector.connect(&format!("dual.test:{port}")),
        )
        .await
        .expect("the IPv4 fallback connects without waiting for the IPv6 attempt")
        .unwrap();
        assert!(started.elapsed() >= HAPPY_EYEBALLS_DELAY);
        assert!(stream.peer_addr().unwrap().is_ipv4());
        assert!(stream.nodelay().unwrap());
        v4.accept().await.unwrap();
        drop(v6);
    }

    #[tokio::test]
    async fn resolution_and_connect_failures_are_classified() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let connector = TcpConnector::new(None);
        let err = connector
            .connect(&format!("127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert_eq!(err.class_name(), "ConnectionRefused");
        assert!(err.is_connect());
        assert!(!err.request_sent());

        let nowhere = TcpConnector::with_resolver(Resolver::Fixed(Arc::from(vec![])), None);
        let err = nowhere.connect("nowhere.test:80").await.unwrap_err();
        assert_eq!(err.class_name(), "DnsError", "{err:?}");
        assert!(err.is_connect());
        assert!(err.message().contains("nowhere.test"), "{err}");
    }
}
