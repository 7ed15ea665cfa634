//! Test infrastructure for patient: a configurable upstream HTTP server, a
//! forward proxy and throw-away TLS certificates.
//!
//! * [`Upstream`] — a real HTTP/1.1 + HTTP/2 server on a loopback port with
//!   routes for delays, large and chunked bodies, server-sent events, any
//!   status, redirect chains and loops, request echo, compression, charsets
//!   and connection ids, bodies written by the test itself ([`BodyFeed`])
//!   or mirrored from the request, an OpenAI-compatible chat endpoint
//!   (`/v1/chat/completions`, streamed or not, and `/v1/models`) whose
//!   requests a test can read back ([`RecordedRequest`]), plus a raw-TCP
//!   listener of [`Fault`]s.
//! * [`ForwardProxy`] — an HTTP forward proxy (`CONNECT` tunnels and
//!   absolute-form requests) with optional Basic authentication.
//! * [`TestCert`] — a CA and a server certificate signed by it.
//! * [`spans::SpanRecorder`] — a `tracing` layer that records spans, their
//!   fields and parents, for tests of what an operator sees.
//!
//! Everything listens on `127.0.0.1:0` and stops when dropped. The
//! `patient-upstream` binary runs an [`Upstream`] in its own process for
//! load tests.
//!
//! ```
//! use patient_testkit::{Fault, Upstream};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let upstream = Upstream::start().await?;
//! let url = upstream.url("/delay?ms=10");
//! assert!(url.starts_with("http://127.0.0.1:"));
//! let broken = upstream.fault_url(Fault::ShortBody);
//! assert!(broken.ends_with("/short-body"));
//! assert_eq!(upstream.requests(), 0);
//! # Ok(())
//! # }
//! ```

mod body;
mod fault;
mod listener;
mod proxy;
pub mod services;
pub mod spans;
mod tls;
mod upstream;

pub use crate::{
    fault::Fault,
    proxy::ForwardProxy,
    tls::TestCert,
    upstream::{
        BodyFeed, RecordedRequest, Upstream, UpstreamOptions, CHARSET_TEXT, COMPRESSED_TEXT,
    },
};
