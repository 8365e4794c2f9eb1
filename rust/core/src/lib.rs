//! fastworker's core: claims procrastinate jobs in batches, hands them over a channel to
//! whoever runs them (the Python layer), and writes their outcomes back in batches.
//!
//! Roles, one file each:
//! - [`listener`]: the LISTEN connection; turns notifications into wake-ups and abort requests.
//! - [`fetcher`]: the claim statement (procrastinate's fetch rules, for a whole batch).
//! - [`completer`]: the batched terminal write (finish / retry / delete).
//! - [`dispatcher`]: the loop that owns the job connection and decides when to claim and flush.
//! - [`protocol`]: what crosses to the runner (the job row, outcomes, events), declared once.
//! - [`handoff`]: the channel of job batches and abort requests to the runner.
//! - [`metrics`]: counters and histograms kept where the events happen, read on scrape.
//! - [`registry`]: worker registration, heartbeat, stalled-worker pruning, abort polling
//!   (a directory: identity, duties, sampling, recovery).
//! - [`sql`]: every statement the core sends, with its parameters.
//! - [`params`]: the connection parameters, libpq's keywords as libpq resolved them.
//! - [`passfile`]: libpq's password file, each host's own entry.
//! - [`connect`]: connecting (host lists, backoff), session settings, redacted descriptions.
//! - [`db`]: a connection, and how statements go to it (directly, or through a pooler).
//! - [`tls`]: libpq's TLS keywords over rustls.
//! - [`errors`]: the one error enum.
//! - [`worker`]: [`worker::WorkerCore`], which starts and stops all of the above.

pub mod completer;
pub mod config;
pub mod connect;
pub mod db;
pub mod dispatcher;
pub mod errors;
pub mod fetcher;
pub mod handoff;
pub mod listener;
pub mod metrics;
pub mod params;
pub mod passfile;
pub mod protocol;
pub mod registry;
pub mod sql;
pub mod tls;
pub mod worker;

pub use config::WorkerConfig;
pub use errors::{CoreError, CoreResult};
pub use metrics::{Metrics, MetricsSnapshot};
pub use params::ConnectionParams;
pub use protocol::{
    Completion, FinishStatus, HandoffEvent, JobRow, LogLevel, LogRecord, Outcome, Reported,
};
pub use worker::WorkerCore;
