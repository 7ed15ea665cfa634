//! The connection pool: one host pool per origin (scheme, host, port,
//! proxy), at most `connection_pool_size` of them (least recently used
//! evicted), idle HTTP/1.1 connections with an idle timeout and a request
//! cap, and shared HTTP/2 connections, as many as the server's
//! concurrent-stream limit makes necessary.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::Duration,
};

use rustc_hash::FxHashMap;
use tokio::{
    sync::{oneshot, Semaphore},
    time::Instant,
};

use super::{
    conn::{H1Conn, H2Conn, H2Stream, DEFAULT_MAX_STREAMS},
    origin::Origin,
};

/// What a request should do to get a connection.
pub(crate) enum Checkout {
    /// A pooled HTTP/1.1 connection (to be `ready().await`ed).
    H1(H1Conn),
    /// A stream on a shared HTTP/2 connection with room for it.
    H2(H2Stream),
    /// Another request is opening an HTTP/2 connection to the origin: wait
    /// for it.
    Wait(oneshot::Receiver<Handoff>),
    /// Open a new connection. `leader` is true when this request opens the
    /// HTTP/2 connection that others wait for; it must then call
    /// [`Pool::h2_ready`] or drop its [`LeaderGuard`].
    Connect { leader: bool },
}

/// What a request waiting for a new HTTP/2 connection gets. A dropped
/// sender means the connect failed: the waiter connects on its own.
pub(crate) enum Handoff {
    /// A stream on the new connection.
    Stream(H2Stream),
    /// The new connection is already at the server's stream limit: check out
    /// again (and open yet another one).
    Full,
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

impl SharedH2 {
    /// Closed, or unused for the idle timeout.
    fn is_expired(&self, now: Instant, idle_timeout: Duration) -> bool {
        self.conn.sender.is_closed()
            || (self.conn.streams.is_idle()
                && now.saturating_duration_since(self.last_used) >= idle_timeout)
    }
}

#[derive(Default)]
struct HostPool {
    idle: Vec<Idle>,
    /// Shared HTTP/2 connections; another is opened only when every one is
    /// at the server's concurrent-stream limit.
    h2: Vec<SharedH2>,
    /// `Some` while a leader opens an HTTP/2 connection.
    h2_waiters: Option<Vec<oneshot::Sender<Handoff>>>,
    /// The origin spoke HTTP/2 last time.
    speaks_h2: bool,
    /// The concurrent-stream limit its HTTP/2 connections last announced.
    h2_max_streams: Option<usize>,
    last_used: u64,
}

struct PoolInner {
    // Keys are the application's own upstreams, bounded by
    // `connection_pool_size`: a fast non-keyed hash is enough.
    hosts: FxHashMap<Origin, HostPool>,
    tick: u64,
}

/// Counts returned by [`HttpClient::pool_stats`](super::HttpClient::pool_stats).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Host pools kept (at most `connection_pool_size`).
    pub hosts: usize,
    /// Idle HTTP/1.1 connections plus pooled HTTP/2 connections (busy or
    /// not).
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
    /// `max_connections_per_host`, and the slots of each origin: held by the
    /// connections in use only, so a semaphore no request holds is freed
    /// and its entry pruned.
    max_per_host: Option<usize>,
    slots: Mutex<FxHashMap<Origin, Weak<Semaphore>>>,
    sweeper_running: AtomicBool,
    /// Open connections (incremented at handshake, decremented when the
    /// driver task ends).
    open: Arc<AtomicUsize>,
}

impl Pool {
    pub(crate) fn new(
        max_hosts: usize,
        max_idle_per_host: usize,
        idle_timeout: Duration,
        max_requests: Option<u32>,
        max_per_host: Option<usize>,
        open: Arc<AtomicUsize>,
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
            max_per_host,
            slots: Mutex::new(FxHashMap::default()),
            sweeper_running: AtomicBool::new(false),
            open,
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        // The pool holds no invariant a panic could break half-way.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Finds or opens the way to a connection for `key`. `h2_possible` says
    /// whether this origin could speak HTTP/2 (TLS with ALPN, or h2c).
    pub(crate) fn checkout(&self, key: &Origin, h2_possible: bool, h2_known: bool) -> Checkout {
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

        let mut all_full = false;
        let mut i = 0;
        while i < host.h2.len() {
            let shared = &mut host.h2[i];
            if shared.is_expired(now, self.idle_timeout) {
                host.h2.swap_remove(i);
                continue;
            }
            host.h2_max_streams = Some(shared.conn.streams.max());
            if !shared.conn.streams.has_room() {
                all_full = true;
                i += 1;
                continue;
            }
            shared.requests += 1;
            shared.last_used = now;
            let stream = shared.conn.stream();
            if self.max_requests.is_some_and(|max| shared.requests >= max) {
                host.h2.swap_remove(i);
            }
            return Checkout::H2(stream);
        }

        while let Some(idle) = host.idle.pop() {
            if idle.conn.sender.is_closed()
                || now.saturating_duration_since(idle.since) >= self.idle_timeout
            {
                continue; // dropped: the connection closes
            }
            return Checkout::H1(idle.conn);
        }

        if h2_possible && (h2_known || host.speaks_h2 || all_full) {
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

    /// How many streams a new HTTP/2 connection to `key` should count on
    /// before its server says: what the origin's connections announced, or
    /// the default.
    pub(crate) fn h2_streams_hint(&self, key: &Origin) -> usize {
        let inner = self.lock();
        inner
            .hosts
            .get(key)
            .and_then(|host| host.h2_max_streams)
            .unwrap_or(DEFAULT_MAX_STREAMS)
    }

    /// The connection slots of `key` when connections per origin are
    /// limited.
    pub(crate) fn connection_slots(&self, key: &Origin) -> Option<Arc<Semaphore>> {
        let max = self.max_per_host?;
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = slots.get(key).and_then(Weak::upgrade) {
            return Some(slots);
        }
        if slots.len() >= self.max_hosts.saturating_mul(2) {
            slots.retain(|_, s| s.strong_count() > 0);
        }
        let fresh = Arc::new(Semaphore::new(max));
        slots.insert(key.clone(), Arc::downgrade(&fresh));
        Some(fresh)
    }

    /// Returns an HTTP/1.1 connection after a fully read response.
    pub(crate) fn checkin(&self, key: &Origin, mut conn: H1Conn) {
        // Idle, it no longer takes one of the origin's slots.
        conn.slot = None;
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

    /// Shares a new HTTP/2 connection, hands streams on it to the requests
    /// waiting for one (those beyond the server's limit are told to look
    /// again), and returns the caller's own stream.
    pub(crate) fn h2_ready(&self, key: &Origin, conn: &H2Conn) -> H2Stream {
        let now = Instant::now();
        let own = conn.stream();
        let mut handoffs = Vec::new();
        {
            let mut inner = self.lock();
            let Some(host) = inner.hosts.get_mut(key) else {
                return own;
            };
            host.speaks_h2 = true;
            let waiters = host.h2_waiters.take().unwrap_or_default();
            let mut requests = 1;
            for waiter in waiters {
                if conn.streams.has_room() && self.max_requests.is_none_or(|max| requests < max) {
                    requests += 1;
                    handoffs.push((waiter, Handoff::Stream(conn.stream())));
                } else {
                    handoffs.push((waiter, Handoff::Full));
                }
            }
            if self.max_requests.is_none_or(|max| requests < max) {
                host.h2.push(SharedH2 {
                    conn: conn.clone(),
                    requests,
                    last_used: now,
                });
            }
        }
        for (waiter, handoff) in handoffs {
            let _ = waiter.send(handoff);
        }
        own
    }

    /// The leader's HTTP/2 connect failed or turned out HTTP/1.1: release the
    /// waiters (they open connections of their own).
    pub(crate) fn h2_abandon(&self, key: &Origin, speaks_h2: bool) {
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
    pub(crate) fn note_h1(&self, key: &Origin) {
        let mut inner = self.lock();
        if let Some(host) = inner.hosts.get_mut(key) {
            host.speaks_h2 = false;
        }
    }

    /// Stops sharing a failed HTTP/2 connection.
    pub(crate) fn retire_h2(&self, key: &Origin, id: u64) {
        let mut inner = self.lock();
        if let Some(host) = inner.hosts.get_mut(key) {
            host.h2.retain(|s| s.conn.id() != id);
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
                host.h2.retain(|s| !s.is_expired(now, self.idle_timeout));
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
                .map(|h| h.idle.len() + h.h2.len())
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

fn evict_lru(hosts: &mut FxHashMap<Origin, HostPool>) {
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
    pub(crate) key: &'a Origin,
    pub(crate) armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.pool.h2_abandon(self.key, true);
        }
    }
}
