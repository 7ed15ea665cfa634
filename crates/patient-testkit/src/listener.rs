//! Binding listeners with a backlog large enough for load tests.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinSet,
};

/// Listen backlog used for every listener of this crate.
///
/// `TcpListener::bind` uses 128, which drops connections when a load test
/// opens thousands at once; the kernel caps this at `somaxconn`.
pub(crate) const BACKLOG: u32 = 4096;

/// Binds `addr` through `TcpSocket` with [`BACKLOG`] and `SO_REUSEADDR`.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The loopback address with an ephemeral port.
pub(crate) fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Accepts connections forever, running `serve` for each one.
///
/// Connection tasks live in a [`JoinSet`] owned by this future, so aborting
/// the task that runs it also aborts every connection it accepted.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, mut serve: F)
where
    F: FnMut(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(serve(stream, peer));
                }
                // Typically EMFILE under load: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
