//! TCP connects, direct or to a proxy, through hyper-util's
//! [`HttpConnector`]: Happy Eyeballs (RFC 8305: when a host has addresses of
//! both families and the first family has not connected within 300 ms, the
//! other is tried in parallel), TCP keepalive and `TCP_NODELAY`.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::Uri;
use hyper_util::client::legacy::connect::{dns::Name, HttpConnector};
use tokio::net::TcpStream;
use tower_service::Service;

use super::{
    config::AddressFilter,
    error::{DnsError, ErrorType, TransportError},
};

/// How long the first address family gets before the other one is tried.
const HAPPY_EYEBALLS_DELAY: Duration = Duration::from_millis(300);

/// Opens TCP connections.
pub(crate) struct TcpConnector {
    http: HttpConnector<Resolver>,
    /// Without the filter: for connections to a configured proxy.
    unchecked: HttpConnector<Resolver>,
    filter: Option<AddressFilter>,
}

impl TcpConnector {
    /// A connector with the system resolver; `keepalive` is the idle time
    /// before TCP keepalive probes (`None`: off).
    pub(crate) fn new(keepalive: Option<Duration>, filter: Option<AddressFilter>) -> TcpConnector {
        TcpConnector::with_resolver(Resolver::System(filter.clone()), keepalive, filter)
    }

    fn with_resolver(
        resolver: Resolver,
        keepalive: Option<Duration>,
        filter: Option<AddressFilter>,
    ) -> TcpConnector {
        let build = |resolver| {
            let mut http = HttpConnector::new_with_resolver(resolver);
            http.enforce_http(false);
            http.set_nodelay(true);
            http.set_keepalive(keepalive);
            http.set_happy_eyeballs_timeout(Some(HAPPY_EYEBALLS_DELAY));
            http
        };
        let unchecked = build(resolver.without_filter());
        TcpConnector {
            http: build(resolver),
            unchecked,
            filter,
        }
    }

    /// Refuses `authority` when its host is an IP literal the filter refuses.
    pub(crate) fn check_literal(&self, authority: &str) -> Result<(), TransportError> {
        let Some(filter) = &self.filter else {
            return Ok(());
        };
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) => filter
                .check(host, ip)
                .map_err(|reason| egress_denied(ip, &reason)),
            Err(_) => Ok(()),
        }
    }

    /// Connects without the address filter (to a configured proxy).
    pub(crate) async fn connect_unchecked(
        &self,
        authority: &str,
    ) -> Result<TcpStream, TransportError> {
        Self::connect_with(&self.unchecked, authority).await
    }

    /// Resolves `authority` (`host:port`, IPv6 in brackets) and connects to
    /// one of its addresses.
    pub(crate) async fn connect(&self, authority: &str) -> Result<TcpStream, TransportError> {
        // IP literals skip the resolver, where names are checked.
        self.check_literal(authority)?;
        Self::connect_with(&self.http, authority).await
    }

    async fn connect_with(
        http: &HttpConnector<Resolver>,
        authority: &str,
    ) -> Result<TcpStream, TransportError> {
        let uri = Uri::try_from(format!("http://{authority}")).map_err(|e| {
            TransportError::new(
                ErrorType::Unknown,
                "InvalidUrl",
                format!("cannot connect to {authority}: {e}"),
            )
        })?;
        let mut http = http.clone();
        std::future::poll_fn(|cx| http.poll_ready(cx))
            .await
            .map_err(|e| TransportError::from_connect(Box::new(e), authority))?;
        match http.call(uri).await {
            Ok(io) => Ok(io.into_inner()),
            Err(e) => Err(TransportError::from_connect(Box::new(e), authority)),
        }
    }
}

/// The error of a connection the address filter refused.
fn egress_denied(ip: IpAddr, reason: &str) -> TransportError {
    TransportError::new(
        ErrorType::Unknown,
        "EgressDenied",
        format!("refused to connect to {ip}: {reason}"),
    )
}

/// Host name resolution for [`HttpConnector`] (IP literals never get here).
#[derive(Clone)]
enum Resolver {
    /// The system resolver (`getaddrinfo` on a blocking thread), keeping
    /// only the addresses the filter allows.
    System(Option<AddressFilter>),
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
            Resolver::System(filter) => {
                let filter = filter.clone();
                Box::pin(async move {
                    let host = name.as_str();
                    match tokio::net::lookup_host((host, 0)).await {
                        Ok(addrs) => {
                            let addrs: Vec<SocketAddr> = addrs.collect();
                            if addrs.is_empty() {
                                return Err(DnsError::new(host, None));
                            }
                            filtered(host, addrs, filter.as_ref())
                        }
                        Err(e) => Err(DnsError::new(host, Some(e))),
                    }
                })
            }
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

impl Resolver {
    /// The same resolver without its address filter.
    fn without_filter(&self) -> Resolver {
        match self {
            Resolver::System(_) => Resolver::System(None),
            #[cfg(test)]
            Resolver::Fixed(addrs) => Resolver::Fixed(std::sync::Arc::clone(addrs)),
        }
    }
}

/// The addresses the filter allows; when it refuses them all, the error
/// names the first and why.
fn filtered(
    host: &str,
    addrs: Vec<SocketAddr>,
    filter: Option<&AddressFilter>,
) -> Result<std::vec::IntoIter<SocketAddr>, DnsError> {
    let Some(filter) = filter else {
        return Ok(addrs.into_iter());
    };
    let mut refused = None;
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|addr| match filter.check(host, addr.ip()) {
            Ok(()) => true,
            Err(reason) => {
                refused.get_or_insert((addr.ip(), reason));
                false
            }
        })
        .collect();
    match (allowed.is_empty(), refused) {
        (true, Some((ip, reason))) => Err(DnsError::denied(host, ip, reason)),
        _ => Ok(allowed.into_iter()),
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
        let connector = TcpConnector::with_resolver(resolver, Some(Duration::from_secs(15)), None);
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
        let connector = TcpConnector::new(None, None);
        let err = connector
            .connect(&format!("127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert_eq!(err.class_name(), "ConnectionRefused");
        assert!(err.is_connect());
        assert!(!err.request_sent());

        let nowhere = TcpConnector::with_resolver(Resolver::Fixed(Arc::from(vec![])), None, None);
        let err = nowhere.connect("nowhere.test:80").await.unwrap_err();
        assert_eq!(err.class_name(), "DnsError", "{err:?}");
        assert!(err.is_connect());
        assert!(err.message().contains("nowhere.test"), "{err}");
    }
}
