//! The worker's row in `procrastinate_workers` (through procrastinate's own functions) and
//! the slow periodic duties: heartbeat, abort-request polling.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::connect::ConnectionTarget;
use crate::errors::{is_connectivity_error, CoreError, CoreResult};
use crate::handoff::{HandoffEvent, HandoffSender, LogLevel};

const CHECK_SCHEMA: &str = "SELECT to_regclass('procrastinate_jobs') IS NOT NULL";
const PRUNE_STALLED_WORKERS: &str =
    "SELECT worker_id FROM procrastinate_prune_stalled_workers_v1($1::float8)";
const REGISTER_WORKER: &str = "SELECT worker_id FROM procrastinate_register_worker_v1()";
const UNREGISTER_WORKER: &str = "SELECT procrastinate_unregister_worker_v1($1::bigint)";
const UPDATE_HEARTBEAT: &str = "SELECT procrastinate_update_heartbeat_v1($1::bigint)";
const JOBS_TO_ABORT: &str = "SELECT id FROM procrastinate_jobs
 WHERE status = 'doing' AND abort_requested AND worker_id = $1::bigint";

pub async fn check_schema(target: &ConnectionTarget, client: &Client) -> CoreResult<()> {
    let row = client
        .query_one(CHECK_SCHEMA, &[])
        .await
        .map_err(|error| CoreError::database("checking the procrastinate schema", error))?;
    let present: bool = row
        .try_get(0)
        .map_err(|error| CoreError::database("checking the procrastinate schema", error))?;
    if present {
        Ok(())
    } else {
        Err(CoreError::SchemaMissing {
            database: target.database(),
        })
    }
}

/// Delete workers whose heartbeat is older than `stalled_worker_timeout`, as procrastinate's
/// worker does at start. Their `doing` jobs keep running nowhere (worker_id becomes NULL).
pub async fn prune_stalled_workers(client: &Client, timeout: Duration) -> CoreResult<Vec<i64>> {
    let rows = client
        .query(PRUNE_STALLED_WORKERS, &[&timeout.as_secs_f64()])
        .await
        .map_err(|error| CoreError::database("pruning stalled workers", error))?;
    rows.iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()
        .map_err(|error| CoreError::database("pruning stalled workers", error))
}

pub async fn register_worker(client: &Client) -> CoreResult<i64> {
    let row = client
        .query_one(REGISTER_WORKER, &[])
        .await
        .map_err(|error| CoreError::database("registering the worker", error))?;
    row.try_get(0)
        .map_err(|error| CoreError::database("registering the worker", error))
}

pub struct Registry {
    pub target: ConnectionTarget,
    pub client: Client,
    pub worker_id: i64,
    pub handoff: HandoffSender,
    pub in_flight: Arc<AtomicUsize>,
    pub heartbeat_interval: Duration,
    pub abort_polling_interval: Duration,
    pub stop: watch::Receiver<bool>,
}

impl Registry {
    /// Heartbeat and abort polling until stopped; returns itself so the caller can unregister.
    pub async fn run(mut self) -> Self {
        let mut heartbeat =
            tokio::time::interval(self.heartbeat_interval.max(Duration::from_millis(10)));
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let mut abort_poll =
            tokio::time::interval(self.abort_polling_interval.max(Duration::from_millis(10)));
        abort_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        abort_poll.tick().await;
        loop {
            tokio::select! {
                _ = self.stop.changed() => return self,
                _ = heartbeat.tick() => {
                    let result = self.client.execute(UPDATE_HEARTBEAT, &[&self.worker_id]).await;
                    self.after(result.map(|_| ()), "heartbeat_failed", "updating the heartbeat").await;
                }
                _ = abort_poll.tick() => {
                    if self.in_flight.load(Ordering::Relaxed) == 0 {
                        continue;
                    }
                    match self.client.query(JOBS_TO_ABORT, &[&self.worker_id]).await {
                        Ok(rows) => {
                            let ids: Vec<i64> = rows.iter().filter_map(|row| row.try_get(0).ok()).collect();
                            if !ids.is_empty() {
                                self.handoff.send(HandoffEvent::Abort(ids));
                            }
                        }
                        Err(error) => self.after(Err(error), "poll_jobs_to_abort_error", "polling jobs to abort").await,
                    }
                }
            }
        }
    }

    async fn after(
        &mut self,
        result: Result<(), tokio_postgres::Error>,
        action: &'static str,
        what: &str,
    ) {
        let Err(error) = result else { return };
        self.handoff
            .log(LogLevel::Warning, action, format!("Error {what}: {error}"));
        if is_connectivity_error(&error) || self.client.is_closed() {
            // One attempt per tick: these duties are periodic, the next tick retries.
            if let Ok(client) = self.target.connect().await {
                self.client = client;
            }
        }
    }

    pub async fn unregister(&mut self) -> CoreResult<()> {
        if self.client.is_closed() {
            self.client = self
                .target
                .connect_with_backoff(Duration::from_secs(5))
                .await?;
        }
        self.client
            .execute(UNREGISTER_WORKER, &[&self.worker_id])
            .await
            .map_err(|error| CoreError::database("unregistering the worker", error))?;
        Ok(())
    }
}
