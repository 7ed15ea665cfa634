//! `patient serve`: patient's engine as a durable HTTP request queue for
//! applications in any language.
//!
//! Applications submit requests over HTTP and get each outcome back exactly
//! once by signed webhook, in Redis (a list, a stream, or a Sidekiq job the
//! PatientHttp Ruby integration already runs), or by polling. The contract
//! (command line, settings, routes, JSON, error codes, delivery formats) is
//! fixed in the daemon's API document; [`settings`] reads the settings.

pub mod access;
pub mod api;
pub mod app;
pub mod dashboard;
pub mod db;
pub mod delivery;
pub mod egress;
pub mod error;
pub mod gateway;
pub mod listener;
pub mod lock;
pub mod metrics;
pub mod model;
pub mod payloads;
pub mod runner;
pub mod server;
pub mod settings;
pub mod token;
pub mod webhook_secret;

pub use error::ServeError;
pub use server::{run, run_until};
pub use settings::{Flags, Settings, SettingsError};

/// The OpenAPI 3 document of the API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");
