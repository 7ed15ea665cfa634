//! Outcome delivery: claim due deliveries from the outbox, send each on its
//! channel (a signed webhook, a Redis list or stream, a Sidekiq job), and
//! record the result: delivered, retried later with the stored backoff, or
//! failed once the tries are spent (kept for `redeliver`).
//!
//! Delivery is at least once: a crash between sending and recording sends
//! again after a restart, with the same `webhook-id` (or `jid`), so the
//! receiver can drop the duplicate.
//!
//! A try's result is recorded against the message it sent (the task's
//! delivery with that `webhook-id`): once a retry has given the task a new
//! outcome, the answer to the old outcome's message, still in flight, is
//! nobody's and changes nothing.
//!
//! Each try runs in a `tracing` span `delivery` (level INFO) with the
//! fields `task.id`, `message.id` (the `webhook-id`, from which a Sidekiq
//! `jid` is made), `channel`, `delivery.attempt` (this try's number) and,
//! when it ends, `result`: `delivered`, `retry` or `failed`.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use patient_http::client::{HttpClient, OutgoingRequest};
use serde_json::{json, Value};
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

use crate::{
    db::{Db, DbError, DeliveryResult, DueDelivery},
    metrics::DaemonMetrics,
    model::{now_ms, rfc3339, Deliver},
    payloads::{Delivered, Payloads},
    settings::DeliverySettings,
    webhook_secret,
};

/// Deliveries claimed per round trip.
const CLAIM_BATCH: usize = 256;

/// Deliveries in flight at once; a slow receiver holds one slot, not the
/// loop.
const IN_FLIGHT: usize = 512;

/// The longest sleep of an idle delivery loop between looks at the outbox.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// How long a stop waits for the deliveries it cut off to end.
const ABORT_GRACE: Duration = Duration::from_secs(1);

/// How long a Redis command may take before the try counts as failed.
const REDIS_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends outcomes.
pub struct Deliverer {
    db: Db,
    owner: String,
    lease: Duration,
    http: HttpClient,
    key: Vec<u8>,
    delivery: DeliverySettings,
    redis: Option<redis::Client>,
    redis_conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    wake: Arc<Notify>,
    metrics: DaemonMetrics,
    payloads: Payloads,
    /// A place per delivery in flight.
    slots: Arc<Semaphore>,
    /// The deliveries in flight, to cut off at the end of a stop.
    running: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next_run: AtomicU64,
    stopping: AtomicBool,
    stopped: Notify,
}

impl std::fmt::Debug for Deliverer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliverer")
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// The Sidekiq job id of a delivery: 24 hexadecimal digits taken from its
/// message id, so every redelivery carries the same `jid`.
pub fn jid(message_id: &str) -> String {
    let hex: String = message_id.chars().filter(char::is_ascii_hexdigit).collect();
    let mut jid: String = hex.chars().rev().take(24).collect();
    while jid.len() < 24 {
        jid.push('0');
    }
    jid
}

/// The Sidekiq job for the PatientHttp callback worker.
pub fn sidekiq_job(event: &Value, queue: &str, worker: &str, message_id: &str, now: f64) -> Value {
    let (payload, kind) = if event["response"].is_null() {
        (event["error"].clone(), "error")
    } else {
        (event["response"].clone(), "response")
    };
    json!({
        "class": worker,
        "queue": queue,
        "args": [payload, kind, event["callback"]],
        "jid": jid(message_id),
        "retry": true,
        "created_at": now,
        "enqueued_at": now,
    })
}

/// The webhook body of an event.
pub fn webhook_body(event: &Value, now_ms: i64) -> Value {
    json!({
        "type": event["type"],
        "timestamp": rfc3339(now_ms),
        "data": event,
    })
}

impl Deliverer {
    /// A deliverer for this node; outcomes are loaded and encoded for their
    /// channel through `payloads`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        db: Db,
        owner: String,
        lease: Duration,
        http: HttpClient,
        key: Vec<u8>,
        delivery: DeliverySettings,
        redis: Option<redis::Client>,
        metrics: DaemonMetrics,
        payloads: Payloads,
    ) -> Arc<Deliverer> {
        Arc::new(Deliverer {
            db,
            owner,
            lease,
            http,
            key,
            delivery,
            redis,
            redis_conn: tokio::sync::Mutex::new(None),
            wake: Arc::new(Notify::new()),
            metrics,
            payloads,
            slots: Arc::new(Semaphore::new(IN_FLIGHT)),
            running: Mutex::new(HashMap::new()),
            next_run: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            stopped: Notify::new(),
        })
    }

    /// Wakes the loop (after an outcome or a redeliver).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// What wakes the loop, for the runner to wake it after each outcome
    /// it stores with a delivery.
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Claims and delivers until [`stop_claiming`](Self::stop_claiming).
    pub async fn run(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Acquire) {
            let free = self.slots.available_permits().min(CLAIM_BATCH);
            if free == 0 {
                // Every slot busy: wait for one to come free.
                tokio::select! {
                    permit = Arc::clone(&self.slots).acquire_owned() => drop(permit),
                    () = self.stopped.notified() => {}
                }
                continue;
            }
            let due = match self
                .db
                .claim_deliveries(&self.owner, now_ms(), self.lease, free)
                .await
            {
                Ok(due) => due,
                Err(error) => {
                    tracing::error!(%error, "cannot claim deliveries");
                    Vec::new()
                }
            };
            let full = due.len() == free;
            for d in due {
                self.spawn(d);
            }
            if full {
                continue;
            }
            let sleep = match self.db.next_delivery(now_ms()).await {
                Ok(Some(at)) => Duration::from_millis(u64::try_from(at - now_ms()).unwrap_or(0)),
                _ => IDLE_POLL,
            }
            .min(IDLE_POLL);
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                () = self.stopped.notified() => {}
            }
        }
    }

    /// Sends a claimed delivery in a task of its own, holding a slot.
    fn spawn(self: &Arc<Self>, due: DueDelivery) {
        let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() else {
            // Cannot happen: no more are claimed than slots are free. Its
            // lease runs out and it is claimed again.
            return;
        };
        let key = self.next_run.fetch_add(1, Ordering::Relaxed);
        let this = Arc::clone(self);
        let span = tracing::info_span!(
            "delivery",
            "task.id" = %due.task.id,
            "message.id" = %due.delivery.message_id,
            channel = due.task.deliver.channel(),
            "delivery.attempt" = due.delivery.attempts.saturating_add(1),
            result = tracing::field::Empty,
        );
        let mut running = lock(&self.running);
        let handle = tokio::spawn(
            async move {
                let _permit = permit;
                this.deliver(due).await;
                lock(&this.running).remove(&key);
                this.wake.notify_one();
            }
            .instrument(span),
        );
        running.insert(key, handle.abort_handle());
    }

    /// Stops claiming deliveries at once (those in flight go on): the first
    /// step of a stop, as soon as the signal arrives.
    pub fn stop_claiming(&self) {
        self.stopping.store(true, Ordering::Release);
        self.stopped.notify_waiters();
        self.wake.notify_one();
    }

    /// Stops claiming, waits up to `timeout` for the deliveries in flight
    /// to be answered and recorded, cuts off the rest (not delivered: sent
    /// again, with the same id, by the next start or another node), and
    /// only then releases this node's delivery leases. How many were
    /// released.
    pub async fn stop(&self, timeout: Duration) -> Result<u64, DbError> {
        self.stop_claiming();
        let all = u32::try_from(IN_FLIGHT).unwrap_or(u32::MAX);
        if tokio::time::timeout(timeout, self.slots.acquire_many(all))
            .await
            .is_err()
        {
            let handles: Vec<_> = lock(&self.running).drain().map(|(_, h)| h).collect();
            for handle in handles {
                handle.abort();
            }
            let _ = tokio::time::timeout(ABORT_GRACE, self.slots.acquire_many(all)).await;
        }
        self.db.release_deliveries(&self.owner).await
    }

    async fn deliver(&self, due: DueDelivery) {
        let Some(stored) = due.task.outcome.as_ref() else {
            return;
        };
        let channel = due.task.deliver.channel();
        // The payload as this channel carries it: inline for a webhook; a
        // fresh reference when large for Redis and Sidekiq, owned by the
        // receiver (the gem's CallbackWorker deletes it once consumed).
        let how = match &due.task.deliver {
            Deliver::Webhook { .. } => Delivered::Inline,
            _ => Delivered::Stored,
        };
        let loaded = self
            .payloads
            .outcome_for_delivery(stored, how)
            .await
            .map_err(|e| format!("payload store: {e}"));
        let sent = match loaded {
            Ok(event) => {
                let sent = self.send(&due, &event).await;
                if sent.is_err() && how == Delivered::Stored {
                    // Not delivered: the receiver's copy is nobody's.
                    self.payloads.delete_outcome(&event).await;
                }
                sent
            }
            Err(error) => Err(error),
        };
        self.record(&due, channel, sent).await;
    }

    /// Sends `event` on the task's channel.
    async fn send(&self, due: &DueDelivery, event: &Value) -> Result<(), String> {
        match &due.task.deliver {
            Deliver::None => Ok(()),
            Deliver::Webhook { url } => self.webhook(url, &due.delivery.message_id, event).await,
            Deliver::RedisList { key } => {
                let body = event.to_string();
                self.redis(|c| {
                    let key = key.clone();
                    Box::pin(async move {
                        redis::cmd("LPUSH")
                            .arg(key)
                            .arg(body)
                            .query_async::<()>(c)
                            .await
                    })
                })
                .await
            }
            Deliver::RedisStream { key } => {
                let body = event.to_string();
                self.redis(|c| {
                    let key = key.clone();
                    Box::pin(async move {
                        redis::cmd("XADD")
                            .arg(key)
                            .arg("*")
                            .arg("event")
                            .arg(body)
                            .query_async::<()>(c)
                            .await
                    })
                })
                .await
            }
            Deliver::Sidekiq { queue, worker } => {
                let now = now_ms() as f64 / 1000.0;
                let job =
                    sidekiq_job(event, queue, worker, &due.delivery.message_id, now).to_string();
                self.redis(|c| {
                    let queue = queue.clone();
                    Box::pin(async move {
                        redis::pipe()
                            .atomic()
                            .cmd("SADD")
                            .arg("queues")
                            .arg(&queue)
                            .ignore()
                            .cmd("LPUSH")
                            .arg(format!("queue:{queue}"))
                            .arg(job)
                            .ignore()
                            .query_async::<()>(c)
                            .await
                    })
                })
                .await
            }
        }
    }

    /// Records a delivery try: delivered, retried later, or failed for good.
    async fn record(&self, due: &DueDelivery, channel: &'static str, sent: Result<(), String>) {
        let tries = due.delivery.attempts + 1;
        let span = tracing::Span::current();
        let result = match sent {
            Ok(()) => {
                self.metrics.delivery(channel, "delivered");
                span.record("result", "delivered");
                DeliveryResult::Delivered
            }
            Err(error) if tries >= self.delivery.max_attempts => {
                self.metrics.delivery(channel, "failed");
                span.record("result", "failed");
                tracing::warn!(task = %due.task.id, %error, tries, "delivery failed for good; kept for redeliver");
                DeliveryResult::Failed { error }
            }
            Err(error) => {
                self.metrics.delivery(channel, "retry");
                span.record("result", "retry");
                let delay = backoff(&self.delivery, tries);
                tracing::info!(task = %due.task.id, %error, tries, ?delay, "delivery failed; will retry");
                DeliveryResult::Retry {
                    error,
                    next_at: now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
                }
            }
        };
        let recorded = self
            .db
            .delivered(&due.task.id, &due.delivery.message_id, &self.owner, result)
            .await;
        if let Err(error) = recorded {
            tracing::error!(task = %due.task.id, %error, "cannot record a delivery; it will be sent again");
        }
    }

    async fn webhook(&self, url: &str, message_id: &str, event: &Value) -> Result<(), String> {
        let url = url::Url::parse(url).map_err(|e| format!("invalid webhook URL: {e}"))?;
        let now = now_ms();
        let body = webhook_body(event, now).to_string();
        let timestamp = now.div_euclid(1000);
        let signature = webhook_secret::sign(&self.key, message_id, timestamp, body.as_bytes());
        let mut headers = HeaderMap::new();
        let value = |s: &str| HeaderValue::from_str(s).map_err(|e| e.to_string());
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert("webhook-id", value(message_id)?);
        headers.insert("webhook-timestamp", value(&timestamp.to_string())?);
        headers.insert("webhook-signature", value(&signature)?);
        let mut request = OutgoingRequest::new(Method::POST, url);
        request.headers = headers;
        request.body = Bytes::from(body);
        request.timeout = Some(Duration::from_secs_f64(self.delivery.timeout));
        match self.http.send(request).await {
            Ok(response) if (200..300).contains(&response.status) => Ok(()),
            Ok(response) => Err(format!("the webhook answered {}", response.status)),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn redis<F>(&self, command: F) -> Result<(), String>
    where
        F: for<'c> FnOnce(
            &'c mut redis::aio::ConnectionManager,
        ) -> futures_util::future::BoxFuture<'c, redis::RedisResult<()>>,
    {
        let Some(client) = &self.redis else {
            return Err("redis_url is not set: Redis and Sidekiq delivery need it".into());
        };
        let mut guard = self.redis_conn.lock().await;
        if guard.is_none() {
            let manager = tokio::time::timeout(REDIS_TIMEOUT, client.get_connection_manager())
                .await
                .map_err(|_| "connecting to Redis timed out".to_owned())?
                .map_err(|e| format!("cannot connect to Redis: {e}"))?;
            *guard = Some(manager);
        }
        let Some(conn) = guard.as_mut() else {
            return Err("no Redis connection".into());
        };
        let mut conn = conn.clone();
        drop(guard);
        match tokio::time::timeout(REDIS_TIMEOUT, command(&mut conn)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("Redis: {e}")),
            Err(_) => Err("Redis did not answer in time".into()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The wait before delivery try `tries + 1`: the base doubled per try,
/// capped.
fn backoff(settings: &DeliverySettings, tries: u32) -> Duration {
    let exponent = i32::try_from(tries.saturating_sub(1)).unwrap_or(i32::MAX);
    let seconds = (settings.base_delay * 2f64.powi(exponent)).min(settings.max_delay);
    Duration::from_secs_f64(seconds.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_five_seconds_up_to_an_hour() {
        let s = DeliverySettings::default();
        let waits: Vec<u64> = (1..=12).map(|t| backoff(&s, t).as_secs()).collect();
        assert_eq!(
            waits,
            [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
        );
    }

    #[test]
    fn jids_are_stable_24_hex_digits() {
        let id = "msg_0123456789abcdef0123456789abcdef";
        assert_eq!(jid(id), jid(id));
        assert_eq!(jid(id).len(), 24);
        assert!(jid(id).chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn a_sidekiq_job_carries_the_payload_object_its_kind_and_the_callback() {
        let event = json!({"task_id": "tsk_1", "type": "task.failed", "callback": "Cb",
            "callback_args": {}, "response": null, "error": {"error_class": "X"}});
        let job = sidekiq_job(&event, "default", "W", "msg_ab", 1.5);
        assert_eq!(job["args"], json!([{"error_class": "X"}, "error", "Cb"]));
        assert_eq!(job["class"], "W");
        assert_eq!(job["retry"], true);
        assert_eq!(job["enqueued_at"], 1.5);
    }
}
