//! The dispatcher owns the job connection and runs the claim/complete cycle.
//!
//! Each round trip sends the pending completions and then, pipelined on the same
//! connection, a claim for the slots they free. The completion statement commits before the
//! claim runs, so freed locks and slots are visible to it. Completions batch themselves:
//! whatever arrived while the previous round trip was in flight goes out in the next one.
//!
//! Claims follow procrastinate's worker: claim while claims come back full; after a short
//! claim, wait for a `job_inserted` wake-up, the polling interval, or a stop.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::Client;

use crate::completer::{Completer, Completion};
use crate::config::WorkerConfig;
use crate::connect::ConnectionTarget;
use crate::errors::{is_connectivity_error, CoreError, CoreResult};
use crate::fetcher::{Fetcher, JobRow};
use crate::handoff::{HandoffEvent, HandoffSender, LogLevel};

/// Jobs this worker holds in `doing` that the dispatcher does not know about: claims whose
/// reply was lost with the connection. They are handed over like any claimed job.
const ORPHANED_CLAIMS: &str = "
SELECT id, status::text, task_name, priority, lock, queueing_lock, args::text,
       (extract(epoch FROM scheduled_at) * 1000000)::bigint, queue_name, attempts, worker_id
  FROM procrastinate_jobs
 WHERE worker_id = $1::bigint AND status = 'doing' AND NOT (id = ANY($2::bigint[]))
 ORDER BY priority DESC, id ASC";

pub struct Dispatcher {
    pub target: ConnectionTarget,
    pub config: Arc<WorkerConfig>,
    pub worker_id: i64,
    pub completions: mpsc::UnboundedReceiver<Completion>,
    pub wake: Arc<Notify>,
    pub stop_fetching: watch::Receiver<bool>,
    pub handoff: HandoffSender,
    /// Jobs claimed and not yet completed in the database (read by the abort poller).
    pub in_flight_count: Arc<AtomicUsize>,
}

struct Connection {
    client: Client,
    fetcher: Fetcher,
    completer: Completer,
}

impl Dispatcher {
    async fn prepare(&self, client: Client) -> CoreResult<Connection> {
        let fetcher = Fetcher::prepare(
            &client,
            self.config.queues.clone(),
            self.worker_id,
            self.config.concurrency,
        )
        .await?;
        let completer = Completer::prepare(&client).await?;
        Ok(Connection {
            client,
            fetcher,
            completer,
        })
    }

    /// Runs until the completion sender is dropped and every completion is written.
    pub async fn run(mut self, client: Client) -> CoreResult<()> {
        let mut connection = self.prepare(client).await?;
        let concurrency = self.config.concurrency;
        let mut in_flight: HashSet<i64> = HashSet::with_capacity(concurrency);
        let mut pending: Vec<Completion> = Vec::new();
        // Completions that were sent when the connection broke: they may have been written.
        let mut maybe_written: HashSet<i64> = HashSet::new();
        let mut claiming = true;
        let mut want_claim = true;
        let mut completions_open = true;
        let mut poll = tokio::time::interval(self.config.fetch_job_polling_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;

        loop {
            while let Ok(completion) = self.completions.try_recv() {
                pending.push(completion);
            }
            if claiming && (!completions_open || *self.stop_fetching.borrow()) {
                // Nobody could run (or complete) what would be claimed now.
                claiming = false;
                self.handoff.send(HandoffEvent::FetchingStopped);
            }
            let held_after_flush = in_flight.len().saturating_sub(pending.len());
            let claim_limit = if claiming && want_claim {
                concurrency
                    .saturating_sub(held_after_flush)
                    .min(self.config.max_batch_size)
            } else {
                0
            };

            if pending.is_empty() && claim_limit == 0 {
                if !completions_open {
                    return Ok(());
                }
                tokio::select! {
                    completion = self.completions.recv(), if completions_open => match completion {
                        Some(completion) => pending.push(completion),
                        None => completions_open = false,
                    },
                    _ = self.wake.notified(), if claiming => want_claim = true,
                    _ = poll.tick(), if claiming => want_claim = true,
                    _ = self.stop_fetching.changed(), if claiming => {},
                }
                continue;
            }

            let batch = std::mem::take(&mut pending);
            let (flushed, claimed) = {
                let client = &connection.client;
                let completer = &connection.completer;
                let fetcher = &connection.fetcher;
                let flush = async {
                    if batch.is_empty() {
                        None
                    } else {
                        Some(completer.write(client, &batch).await)
                    }
                };
                let claim = async {
                    if claim_limit == 0 {
                        None
                    } else {
                        Some(fetcher.claim(client, claim_limit).await)
                    }
                };
                // Polled in order: the completion request is sent first, then the claim.
                tokio::join!(flush, claim)
            };

            let mut broken = false;
            match flushed {
                None => {}
                Some(Ok(report)) => {
                    for job_id in &report.written {
                        in_flight.remove(job_id);
                    }
                    for (job_id, reason) in report.rejected {
                        let level = if maybe_written.contains(&job_id) {
                            LogLevel::Debug
                        } else {
                            LogLevel::Error
                        };
                        self.handoff
                            .log_job(level, "finish_task_failed", job_id, reason);
                    }
                    for job_id in &report.written {
                        maybe_written.remove(job_id);
                    }
                }
                Some(Err(error)) => {
                    broken = true;
                    maybe_written.extend(batch.iter().map(|completion| completion.job_id));
                    let mut retry = batch;
                    retry.append(&mut pending);
                    pending = retry;
                    self.log_lost("completing jobs", &error);
                }
            }
            match claimed {
                None => {}
                Some(Ok(jobs)) => {
                    want_claim = jobs.len() == claim_limit;
                    let drained = !self.config.wait && jobs.len() < claim_limit;
                    if !jobs.is_empty() {
                        in_flight.extend(jobs.iter().map(|job| job.id));
                        self.handoff.send(HandoffEvent::Jobs(jobs));
                    }
                    if drained {
                        claiming = false;
                        self.handoff.send(HandoffEvent::Drained);
                        self.handoff.send(HandoffEvent::FetchingStopped);
                    }
                }
                Some(Err(error)) if is_connectivity_error(&error) => {
                    broken = true;
                    want_claim = true;
                    self.log_lost("claiming jobs", &error);
                }
                Some(Err(error)) => return Err(CoreError::database("claiming jobs", error)),
            }
            self.in_flight_count
                .store(in_flight.len(), Ordering::Relaxed);

            if broken || connection.client.is_closed() {
                let client = self
                    .target
                    .connect_with_backoff(self.config.reconnect_timeout)
                    .await?;
                connection = self.prepare(client).await?;
                self.handoff.log(
                    LogLevel::Info,
                    "dispatcher_reconnected",
                    format!("Reconnected to {}", self.target.description()),
                );
                let orphans = self.orphaned_claims(&connection.client, &in_flight).await?;
                if !orphans.is_empty() {
                    in_flight.extend(orphans.iter().map(|job| job.id));
                    self.in_flight_count
                        .store(in_flight.len(), Ordering::Relaxed);
                    self.handoff.send(HandoffEvent::Jobs(orphans));
                }
            }
        }
    }

    fn log_lost(&self, what: &str, error: &tokio_postgres::Error) {
        self.handoff.log(
            LogLevel::Warning,
            "dispatcher_connection_lost",
            format!(
                "Connection to {} lost while {what} ({error}); reconnecting",
                self.target.description()
            ),
        );
    }

    async fn orphaned_claims(
        &self,
        client: &Client,
        in_flight: &HashSet<i64>,
    ) -> CoreResult<Vec<JobRow>> {
        let known: Vec<i64> = in_flight.iter().copied().collect();
        let rows = client
            .query(ORPHANED_CLAIMS, &[&self.worker_id, &known])
            .await
            .map_err(|error| CoreError::database("looking for claims lost in transit", error))?;
        rows.iter()
            .map(JobRow::from_row)
            .collect::<Result<_, _>>()
            .map_err(|error| CoreError::database("looking for claims lost in transit", error))
    }
}
