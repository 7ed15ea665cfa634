//! What the API handlers share: the settings, the queue, the workers, the
//! delivery loop, the engine and the gateway of one running daemon.

use std::{collections::BTreeMap, sync::Arc};

use patient_http::AwaitableClient;
use patient_wire::WireLimits;

use crate::{
    db::Db, delivery::Deliverer, egress::Allow, gateway::Gateway, metrics::DaemonMetrics,
    payloads::Payloads, runner::Runner, settings::Settings,
};

/// What the API handlers share.
pub struct App {
    /// The settings the daemon runs with.
    pub settings: Settings,
    /// The queue.
    pub db: Db,
    /// The workers.
    pub runner: Arc<Runner>,
    /// The delivery loop.
    pub deliverer: Arc<Deliverer>,
    /// The engine.
    pub client: AwaitableClient,
    /// The daemon's metrics.
    pub metrics: DaemonMetrics,
    /// The egress guard's exemptions.
    pub allow: Allow,
    /// The bounds of submitted requests.
    pub limits: WireLimits,
    /// The configured secrets by name, with the hosts a submitted task may
    /// send each to (`None`: no submitted task may use it).
    pub secrets: BTreeMap<String, Option<Vec<String>>>,
    /// Payload stores and encryption of stored and delivered payloads.
    pub payloads: Payloads,
    /// The proxy routes.
    pub gateway: Gateway,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}
