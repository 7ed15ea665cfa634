//! The connection pool: one host pool per (scheme, host, port, proxy), at
//! most `connection_pool_size` of them (least recently used evicted), idle
//! HTTP/1.1 connections with an idle timeout and a request cap, and one
//! shared HTTP/2 connection per origin.

use rustc_hash::FxHashMap;
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use tokio::{sync::oneshot, time::Instant};

/// The request body type of every connection.
pub(crate) type ReqBody = Full<Bytes>;

/// Identifies a host pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub(crate) https: bool,
    pub(crate) proxied: bool,
    pub(crate) port: u16,
    pub(crate) host: Box<str>,
}

/// An HTTP/1.1 connection, owned by one request at a time.
pub(crate) struct H1Conn {
    pub(crate) sender: http1::SendRequest<ReqBody>,
    /// Requests sent on this connection so far.
    pub(crate) requests: u32,
}

/// A handle to an HTTP/2 connection (shared; clones multiplex).
pub(crate) struct H2Conn {
    pub(crate) sender: http2::SendRequest<ReqBody>,
    pub(crate) id: u64,
}

impl Clone for H2Conn {
    fn clone(&self) -> Self {
        H2Conn {
            sender: self.sender.clone(),
            id: self.id,
        }
    }
}

/// A freshly established connection.
pub(crate) enum Conn {
    H1(H1Conn),
    H2(H2Conn),
}

/// What a request should do to get a connection.
pub(crate) enum Checkout {
    /// A pooled HTTP/1.1 connection (to be `ready().await`ed).
    H1(H1Conn),
    /// The shared HTTP/2 connection.
    H2(H2Conn),
    /// Another request is opening the origin's HTTP/2 connection: wait for it.
    Wait(oneshot::Receiver<H2Conn>),
    /// Open a new connection. `leader` is true when this request opens the
    /// origin's HTTP/2 connection that others wait for; it must then call
    /// [`Pool::h2_ready`] or drop its [`LeaderGuard`].
    Connect { leader: bool },
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

struct SharedH2 {
    conn: H2Conn,
    requests: u32,
    last_used: Instant,
}

#[derive(Default)]
struct HostPool {
    idle: Vec<Idle>,
    h2: Option<SharedH2>,
    /// `Some` while a leader opens the HTTP/2 connection.
    h2_waiters: Option<Vec<oneshot::Sender<H2Conn>>>,
    /// The origin spoke HTTP/2 last time.
    speaks_h2: bool,
    last_used: u64,
}

struct PoolInner {
    // Keys are the application's own upstreams, bounded by
    // `connection_pool_size`: a fast non-keyed hash is enough.
    hosts: FxHashMap<PoolKey, HostPool>,
    tick: u64,
}

/// Counts returned by [`HttpClient::pool_stats`](super::HttpClient::pool_stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Host pools kept (at most `connection_pool_size`).
    pub hosts: usize,
    /// Idle HTTP/1.1 connections plus pooled HTTP/2 connections.
    pub idle_connections: usize,
    /// Connections whose driver task is still running (pooled or in use).
    pub open_connections: usize,
}

/// The pool shared by all clones of a client.
pub(crate) struct Pool {
    inner: Mutex<PoolInner>,
    max_hosts: usize,
    max_idle_per_host: usize,
    idle_timeout: Duration,
    max_requests: Option<u32>,
    next_id: AtomicU64,
    sweeper_running: AtomicBool,
    /// Open connections (incremented at handshake, decremented when the
    /// driver task ends).
    pub(crate) open: Arc<AtomicUsize>,
}

impl Pool {
    pub(crate) fn new(
        max_hosts: usize,
        max_idle_per_host: usize,
        idle_timeout: Duration,
        max_requests: Option<u32>,
    ) -> Self {
        Pool {
            inner: Mutex::new(PoolInner {
                hosts: FxHashMap::default(),
                tick: 0,
            }),
            max_hosts,
            max_idle_per_host,
            idle_timeout,
            max_requests,
            next_id: AtomicU64::new(1),
            sweeper_running: AtomicBool::new(false),
            open: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        // The pool holds no invariant a panic could break half-way.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Finds or opens the way to a connection for `key`. `h2_possible` says
    /// whether this origin could speak HTTP/2 (TLS with ALPN, or h2c).
    pub(crate) fn checkout(&self, key: &PoolKey, h2_possible: bool, h2_known: bool) -> Checkout {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.tick += 1;
        let tick = inner.tick;
        if !inner.hosts.contains_key(key) {
            if inner.hosts.len() >= self.max_hosts {
                evict_lru(&mut inner.hosts);
            }
            inner.hosts.insert(key.clone(), HostPool::default());
        }
        let Some(host) = inner.hosts.get_mut(key) else {
            return Checkout::Connect { leader: false };
        };
        host.last_used = tick;

        if let Some(shared) = &mut host.h2 {
            if shared.conn.sender.is_closed()
                || now.saturating_duration_since(shared.last_used) >= self.idle_timeout
            {
                host.h2 = None;
            } else {
                shared.requests += 1;
                shared.last_used = now;
                let conn = shared.conn.clone();
                if self.max_requests.is_some_and(|max| shared.requests >= max) {
                    host.h2 = None;
                }
                return Checkout::H2(conn);
            }
        }

        while let Some(idle) = host.idle.pop() {
            if idle.conn.sender.is_closed()
                || now.saturating_duration_since(idle.since) >= self.idle_timeout
            {
                continue; // dropped: the connection closes
            }
            return Checkout::H1(idle.conn);
        }

        if h2_possible && (h2_known || host.speaks_h2) {
            if let Some(waiters) = &mut host.h2_waiters {
                let (tx, rx) = oneshot::channel();
                waiters.push(tx);
                return Checkout::Wait(rx);
            }
            host.h2_waiters = Some(Vec::new());
            return Checkout::Connect { leader: true };
        }
        Checkout::Connect { leader: false }
    }

    /// Returns an HTTP/1.1 connection after a fully read response.
    pub(crate) fn checkin(&self, key: &PoolKey, conn: H1Conn) {
        if self.max_requests.is_some_and(|max| conn.requests >= max) || conn.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut inner = self.lock();
        if let Some(host) = inner.hosts.get_mut(key) {
            if host.idle.len() < self.max_idle_per_host {
                host.idle.push(Idle { conn, since: now });
            }
        }
        // else: the host pool was evicted meanwhile; the connection closes.
    }

    /// Shares a new HTTP/2 connection (unless a live one is already shared)
    /// and hands it to the requests waiting for it. Counts one request.
    pub(crate) fn h2_ready(&self, key: &PoolKey, conn: &H2Conn) {
        let now = Instant::now();
        let waiters = {
            let mut inner = self.lock();
            let Some(host) = inner.hosts.get_mut(key) else {
                return;
            };
            host.speaks_h2 = true;
            let waiters = host.h2_waiters.take().unwrap_or_default();
            let shared_alive = host.h2.as_ref().is_some_and(|s| !s.conn.sender.is_closed());
            let requests = 1 + waiters.len() as u32;
            if !shared_alive && self.max_requests.is_none_or(|max| requests < max) {
                host.h2 = Some(SharedH2 {
                    conn: conn.clone(),
                    requests,
                    last_used: now,
                });
            }
            waiters
        };
        for waiter in waiters {
            let _ = waiter.send(conn.clone());
        }
    }

    /// The leader's HTTP/2 connect failed or turned out HTTP/1.1: release the
    /// waiters (they open connections of their own).
    pub(crate) fn h2_abandon(&self, key: &PoolKey, speaks_h2: bool) {
        let mut inner = self.lock();
        if let Some(host) = inner.hosts.get_mut(key) {
            host.h2_waiters = None;
            if !speaks_h2 {
                host.speaks_h2 = false;
            }
        }
    }

    /// Marks that the origin answered with HTTP/1.1 (ALPN) so later requests
    /// do not wait for an HTTP/2 connection.
    pub(crate) fn note_h1(&self, key: &PoolKey) {
        let mut inner = self.lock();
        if let Some(host) = inner.hosts.get_mut(key) {
            host.speaks_h2 = false;
        }
    }

    /// Stops sharing a failed HTTP/2 connection.
    pub(crate) fn retire_h2(&self, key: &PoolKey, id: u64) {
        let mut inner = self.lock();
        if let Some(host) = inner.hosts.get_mut(key) {
            if host.h2.as_ref().is_some_and(|s| s.conn.id == id) {
                host.h2 = None;
            }
        }
    }

    /// Closes idle connections past the idle timeout.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut inner = self.lock();
            for host in inner.hosts.values_mut() {
                let before = host.idle.len();
                let mut i = 0;
                while i < host.idle.len() {
                    let idle = &host.idle[i];
                    if idle.conn.sender.is_closed()
                        || now.saturating_duration_since(idle.since) >= self.idle_timeout
                    {
                        expired.push(host.idle.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
                if host.idle.len() != before {
                    // Keep the most recently returned connection last.
                    host.idle.sort_unstable_by_key(|idle| idle.since);
                }
                if host.h2.as_ref().is_some_and(|s| {
                    s.conn.sender.is_closed()
                        || now.saturating_duration_since(s.last_used) >= self.idle_timeout
                }) {
                    host.h2 = None;
                }
            }
        }
        drop(expired);
    }

    pub(crate) fn stats(&self) -> PoolStats {
        let inner = self.lock();
        PoolStats {
            hosts: inner.hosts.len(),
            idle_connections: inner
                .hosts
                .values()
                .map(|h| h.idle.len() + usize::from(h.h2.is_some()))
                .sum(),
            open_connections: self.open.load(Ordering::Relaxed),
        }
    }

    /// Starts the periodic idle sweep on the current runtime, once; it stops
    /// when the pool is dropped or the runtime shuts down (and restarts on the
    /// next request then).
    pub(crate) fn ensure_sweeper(self: &Arc<Self>) {
        if self.sweeper_running.load(Ordering::Relaxed)
            || self.sweeper_running.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.sweeper_running.store(false, Ordering::Release);
            return;
        };
        let period =
            (self.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(30));
        let weak = Arc::downgrade(self);
        handle.spawn(sweep_loop(weak, period));
    }
}

struct SweeperFlag(Weak<Pool>);

impl Drop for SweeperFlag {
    fn drop(&mut self) {
        if let Some(pool) = self.0.upgrade() {
            pool.sweeper_running.store(false, Ordering::Release);
        }
    }
}

async fn sweep_loop(pool: Weak<Pool>, period: Duration) {
    let _flag = SweeperFlag(pool.clone());
    let mut interval = tokio::time::interval_at(Instant::now() + period, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

fn evict_lru(hosts: &mut FxHashMap<PoolKey, HostPool>) {
    let oldest = hosts
        .iter()
        .min_by_key(|(_, host)| host.last_used)
        .map(|(key, _)| key.clone());
    if let Some(key) = oldest {
        hosts.remove(&key);
    }
}

/// Releases the HTTP/2 waiters if the leader's connect is dropped or fails.
pub(crate) struct LeaderGuard<'a> {
    pub(crate) pool: &'a Pool,
    pub(crate) key: &'a PoolKey,
    pub(crate) armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.h2_abandon(self.key, true);
        }
    }
}
