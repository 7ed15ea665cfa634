//! Starting and stopping the daemon: open the store, recover what a crash
//! left running, start the workers and the delivery loop, serve the API on
//! the listener, and on shutdown stop claiming, let attempts and deliveries
//! in flight finish up to `shutdown_timeout` (their leases still renewed),
//! then release the rest to the queue
//! (except a request that may have reached its upstream and may not be
//! sent again: that one ends `Interrupted`, as after a crash).

use std::{collections::BTreeMap, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use patient_http::{
    client::{ClientConfig, HttpClient},
    metrics::Metrics,
    resilience::ResilienceConfig,
    retry::RetryPolicy,
    AwaitableClient, Config, Secrets,
};
use patient_wire::{DeadlineMode, WireLimits};
use tokio::net::TcpListener;

use crate::{
    access::{AccessLayer, AccessRules},
    db::Db,
    delivery::Deliverer,
    egress::Allow,
    gateway::{hooks::NoHooks, Gateway},
    listener::{Limits, Listener},
    lock::DirLock,
    metrics::DaemonMetrics,
    payloads::Payloads,
    runner::{Runner, Stopped},
    settings::Settings,
    webhook_secret,
};
pub use crate::{app::App, error::ServeError};

/// How often finished tasks past their retention are purged, and how many
/// at a time.
const PURGE_EVERY: Duration = Duration::from_secs(60);
const PURGE_BATCH: usize = 500;

/// The retry policy of submitted tasks, from the settings.
fn retry_policy(settings: &Settings) -> Result<RetryPolicy, ServeError> {
    let r = &settings.retry;
    RetryPolicy::builder()
        .max_attempts(r.max_attempts)
        .base_delay(Duration::from_secs_f64(r.base_delay))
        .factor(r.factor)
        .max_delay(Duration::from_secs_f64(r.max_delay))
        .max_retry_after(Duration::from_secs_f64(r.max_retry_after))
        .build()
        .map_err(|e| ServeError::Settings(format!("setting `retry`: {e}")))
}

/// Reads each configured secret from its environment variable or file: the
/// values by name, for the engine and for the daemon's own use at start
/// (encryption keys, store credentials). Never logged.
fn read_secrets(settings: &Settings) -> Result<BTreeMap<String, String>, ServeError> {
    let mut secrets = BTreeMap::new();
    for (name, source) in &settings.secrets {
        let value = match (&source.env, &source.file) {
            (Some(var), _) => std::env::var(var).map_err(|_| {
                ServeError::Settings(format!(
                    "setting `secrets.{name}`: the environment variable {var} is not set"
                ))
            })?,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ServeError::Settings(format!(
                        "setting `secrets.{name}`: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                text.strip_suffix('\n').unwrap_or(&text).to_owned()
            }
            (None, None) => {
                return Err(ServeError::Settings(format!(
                    "setting `secrets.{name}`: give env or file"
                )))
            }
        };
        secrets.insert(name.clone(), value);
    }
    Ok(secrets)
}

/// Reads the settings again, for a reload on SIGHUP.
pub type Reload = Arc<dyn Fn() -> Result<Settings, String> + Send + Sync>;

/// Serves until SIGTERM or SIGINT, then stops as the module docs say.
pub async fn run(settings: Settings, listener: TcpListener) -> Result<(), ServeError> {
    serve(settings, listener, shutdown_signal(), None).await
}

/// Serves as [`run`] does, and on SIGHUP reads the settings with `reload`
/// and replaces the proxy routes (the other settings need a restart). A
/// reload that fails leaves the routes as they were.
pub async fn run_reloading(
    settings: Settings,
    listener: TcpListener,
    reload: Reload,
) -> Result<(), ServeError> {
    serve(settings, listener, shutdown_signal(), Some(reload)).await
}

/// Serves until `shutdown` completes, then stops as the module docs say.
pub async fn run_until(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve(settings, listener, shutdown, None).await
}

async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<Reload>,
) -> Result<(), ServeError> {
    let addr: SocketAddr = listener.local_addr()?;
    if settings.api_token.is_none() && !addr.ip().is_loopback() {
        return Err(ServeError::Settings(format!(
            "refusing to listen on {addr} without an api_token (set PATIENT_API_TOKEN, or listen on a loopback address)"
        )));
    }
    let url = settings.database_url();
    // One daemon per SQLite queue: the directory of its file stays locked
    // until this returns (see `lock`). PostgreSQL is shared by design.
    let _lock = match crate::db::sqlite::database_dir(&url) {
        Some(dir) => Some(DirLock::acquire(&dir)?),
        None => None,
    };
    let db = Db::open(&url)
        .await
        .map_err(|e| ServeError::Store(e.to_string()))?;
    let secret = match &settings.webhook_secret {
        Some(secret) => secret.clone(),
        None => {
            let fresh = webhook_secret::generate().map_err(ServeError::Settings)?;
            db.meta_or_insert("webhook_secret", fresh)
                .await
                .map_err(|e| ServeError::Store(e.to_string()))?
        }
    };
    let key = webhook_secret::decode(&secret)
        .map_err(|e| ServeError::Settings(format!("setting `webhook_secret`: {e}")))?;
    let secret_values = read_secrets(&settings)?;
    // Submitted tasks get only the secrets their owner allowed them, and
    // only for the hosts listed: the engine refuses the rest on every hop.
    let mut secrets = Secrets::new();
    for (name, value) in &secret_values {
        if let Some(hosts) = settings.secrets.get(name).and_then(|s| s.hosts.clone()) {
            secrets.insert_for_hosts(name.clone(), value.clone(), hosts);
        }
    }
    let secret_names = settings
        .secrets
        .iter()
        .map(|(name, source)| (name.clone(), source.hosts.clone()))
        .collect();
    let allow = Allow::new(&settings.egress.allow);

    let engine_metrics = Metrics::with_prefix("patient");
    let retry = retry_policy(&settings)?;
    let resilience = ResilienceConfig::builder()
        // An attempt may use what is left of the deadline (its timeout
        // still bounds it): split across five stored attempts, a deadline
        // would cut a slow answer short on every one of them.
        .defaults(|p| {
            p.retry(Some(retry))
                .deadline_mode(DeadlineMode::PassThrough)
        })
        .build()
        .map_err(|e| ServeError::Settings(format!("setting `retry`: {e}")))?;
    let filter = allow.clone().filter();
    let config = Config::builder()
        .max_connections(usize::try_from(settings.max_in_flight).unwrap_or(usize::MAX))
        .client_with(|c| c.address_filter(Some(filter.clone())))
        .payload_store_threshold(
            usize::try_from(settings.payload_store.threshold).unwrap_or(usize::MAX),
        )
        .build()
        .map_err(|e| ServeError::Settings(e.to_string()))?;
    let payloads = Payloads::from_settings(&settings, &secret_values, &config).await?;
    let gateway = Gateway::builder(&settings.routes)
        .secrets(secret_values)
        .hooks(Arc::new(NoHooks))
        .api_token(settings.api_token.as_deref())
        .build()
        .map_err(|e| ServeError::Settings(e.to_string()))?;
    let client = AwaitableClient::builder()
        .config(config)
        .resilience(resilience)
        .secrets(secrets)
        .metrics(engine_metrics)
        .build_awaitable()
        .map_err(|e| ServeError::Settings(e.to_string()))?;
    let webhook_client = HttpClient::new(
        ClientConfig::builder()
            .address_filter(Some(filter))
            .build()
            .map_err(|e| ServeError::Settings(e.to_string()))?,
    )
    .map_err(|e| ServeError::Settings(e.to_string()))?;
    let redis = match &settings.redis_url {
        Some(url) => Some(
            redis::Client::open(url.as_str())
                .map_err(|e| ServeError::Settings(format!("setting `redis_url`: {e}")))?,
        ),
        None => None,
    };

    let metrics = DaemonMetrics::new();
    let owner = format!("node_{}", uuid::Uuid::new_v4().simple());
    let limits = WireLimits::default();
    let runner = Runner::new(
        db.clone(),
        client.clone(),
        owner.clone(),
        settings.lease(),
        usize::try_from(settings.max_in_flight).unwrap_or(usize::MAX),
        limits.clone(),
        metrics.clone(),
        payloads.clone(),
    );
    let (requeued, interrupted) = runner
        .recover()
        .await
        .map_err(|e| ServeError::Store(e.to_string()))?;
    if requeued + interrupted > 0 {
        tracing::info!(
            requeued,
            interrupted,
            "recovered the tasks a stop left running"
        );
    }
    let deliveries = db
        .recover_deliveries()
        .await
        .map_err(|e| ServeError::Store(e.to_string()))?;
    if deliveries > 0 {
        tracing::info!(deliveries, "took back the deliveries a stop left claimed");
    }
    let deliverer = Deliverer::new(
        db.clone(),
        owner,
        settings.lease(),
        webhook_client,
        key,
        settings.delivery.clone(),
        redis,
        metrics.clone(),
        payloads.clone(),
    );
    runner.on_outcome(deliverer.waker());

    let shutdown_timeout = settings.shutdown_timeout();
    let retention = settings.retention();
    let app = Arc::new(App {
        settings,
        db: db.clone(),
        runner: Arc::clone(&runner),
        deliverer: Arc::clone(&deliverer),
        client,
        metrics,
        allow,
        limits,
        secrets: secret_names,
        payloads: payloads.clone(),
        gateway: gateway.clone(),
    });

    let workers = tokio::spawn(Arc::clone(&runner).run());
    let delivering = tokio::spawn(Arc::clone(&deliverer).run());
    let purging = tokio::spawn(purge_loop(db.clone(), retention, payloads));

    let limits = Limits {
        header_timeout: app.settings.header_timeout(),
        body_timeout: app.settings.body_timeout(),
        send_timeout: app.settings.send_timeout(),
        max_connections: usize::try_from(app.settings.max_connections()).unwrap_or(usize::MAX),
    };
    let access = AccessLayer::new(AccessRules::new(
        addr,
        app.settings.allowed_hosts.as_deref(),
    ));
    eprintln!("patient: listening on http://{addr}");
    let reloading = reload.map(|reload| tokio::spawn(reload_on_sighup(gateway.clone(), reload)));
    let router = crate::api::router(app).layer(gateway.layer()).layer(access);

    // Stopping: no new claims from the moment the signal comes, then the
    // listener, the attempts in flight and the API requests in progress
    // share one `shutdown_timeout`.
    let stop_deadline = Arc::new(std::sync::OnceLock::<tokio::time::Instant>::new());
    let signalled = {
        let runner = Arc::clone(&runner);
        let deliverer = Arc::clone(&deliverer);
        let stop_deadline = Arc::clone(&stop_deadline);
        async move {
            shutdown.await;
            tracing::info!(
                "stopping: no new claims; waiting for attempts, deliveries and requests in flight"
            );
            let _ = stop_deadline.set(tokio::time::Instant::now() + shutdown_timeout);
            runner.stop_claiming();
            deliverer.stop_claiming();
        }
    };
    let remaining = {
        let stop_deadline = Arc::clone(&stop_deadline);
        move || {
            stop_deadline.get().map_or(shutdown_timeout, |d| {
                d.saturating_duration_since(tokio::time::Instant::now())
            })
        }
    };
    let closing = gateway.clone();
    let serving =
        Listener::new(listener, limits).serve(router, signalled, remaining.clone(), move || {
            closing.close_streams()
        });
    serving.await;
    if let Some(task) = reloading {
        task.abort();
    }

    purging.abort();
    // Neither claims anything more (since the signal); both drain within
    // what is left of the same timeout, and each releases its leases only
    // once what it runs has ended.
    let left = remaining();
    let (stopped, undelivered) = tokio::join!(runner.stop(left), deliverer.stop(left));
    // The workers' task renewed this node's leases until now.
    workers.abort();
    delivering.abort();
    match stopped {
        Ok(Stopped {
            released,
            interrupted,
        }) if released > 0 || interrupted > 0 => tracing::info!(
            released,
            interrupted,
            "released unfinished tasks to the queue; interrupted those that may not be sent again"
        ),
        Ok(_) => {}
        Err(error) => tracing::error!(%error, "cannot release tasks; they resume after the lease"),
    }
    match undelivered {
        Ok(0) => {}
        Ok(released) => tracing::info!(released, "released deliveries cut off by the stop"),
        Err(error) => {
            tracing::error!(%error, "cannot release deliveries; they are sent after the lease")
        }
    }
    Ok(())
}

async fn purge_loop(db: Db, retention: Duration, payloads: Payloads) {
    loop {
        tokio::time::sleep(PURGE_EVERY).await;
        purge(&db, retention, &payloads).await;
    }
}

/// Purges the tasks finished more than `retention` ago, and their stored
/// payloads.
pub async fn purge(db: &Db, retention: Duration, payloads: &Payloads) {
    let before =
        crate::model::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2);
    loop {
        match db.purge(before, PURGE_BATCH).await {
            Ok(purged) => {
                for (request, outcome) in &purged {
                    payloads.delete(request).await;
                    if let Some(outcome) = outcome {
                        payloads.delete_outcome(outcome).await;
                    }
                }
                if purged.len() < PURGE_BATCH {
                    break;
                }
                tokio::task::yield_now().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot purge old tasks");
                break;
            }
        }
    }
}

/// Replaces the gateway's routes on each SIGHUP.
async fn reload_on_sighup(gateway: Gateway, reload: Reload) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; routes reload on restart only");
            return;
        };
        while hup.recv().await.is_some() {
            match reload()
                .and_then(|settings| gateway.reload(&settings.routes).map_err(|e| e.to_string()))
            {
                Ok(()) => tracing::info!(routes = ?gateway.route_names(), "routes reloaded"),
                Err(error) => {
                    tracing::error!(%error, "cannot reload the routes; the old ones stay")
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (gateway, reload);
    }
}

/// Completes on SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
