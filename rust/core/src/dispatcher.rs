//! The dispatcher owns the job connection and runs the claim/complete cycle.
//!
//! Each round trip sends the pending completions and a claim for the slots they free, in
//! one transaction, so freed locks and slots count for that claim. Completions batch
//! themselves: whatever arrived while the previous round trip was in flight goes out in the
//! next one.
//!
//! Claims follow procrastinate's worker: claim while claims come back full; after a short
//! claim, wait for a `job_inserted` wake-up, the polling interval, or a stop.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::Client;

use crate::completer::{
    Completer, Completion, CompletionBatch, CompletionReport, Outcome, Reported,
};
use crate::config::WorkerConfig;
use crate::connect::ConnectionTarget;
use crate::errors::{is_connectivity_error, CoreError, CoreResult};
use crate::fetcher::{Fetcher, JobRow, QueueRoom};
use crate::handoff::{HandoffEvent, HandoffSender, LogLevel};
use crate::metrics::{Histogram, MetricsSnapshot, TaskQueue, DURATION_BUCKETS};

/// Jobs this worker holds in `doing` that the dispatcher does not know about: claims whose
/// reply was lost with the connection. They are handed over like any claimed job. (`$2`:
/// the jobs it knows, running or abandoned after a refused terminal write.)
const ORPHANED_CLAIMS: &str = "
SELECT id, status::text, task_name, priority, lock, queueing_lock, args::text,
       (extract(epoch FROM scheduled_at) * 1000000)::bigint, queue_name, attempts, worker_id
  FROM procrastinate_jobs
 WHERE worker_id = $1::bigint AND status = 'doing' AND NOT (id = ANY($2::bigint[]))
 ORDER BY priority DESC, id ASC";

const BACKEND_PID: &str = "SELECT pg_backend_pid()";
const BACKEND_ALIVE: &str = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1::int)";

/// How long a reconnected dispatcher waits for its old backend to be gone (see
/// `wait_for_old_backend`); past that (a pooler may reuse the pid), it goes on.
const OLD_BACKEND_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Dispatcher {
    pub target: ConnectionTarget,
    pub config: Arc<WorkerConfig>,
    pub worker_id: i64,
    /// Outcomes from the runner, in the chunks it reported them.
    pub completions: mpsc::UnboundedReceiver<Reported>,
    pub wake: Arc<Notify>,
    pub stop_fetching: watch::Receiver<bool>,
    pub handoff: HandoffSender,
    /// Jobs claimed and not yet completed in the database (read by the abort poller).
    pub in_flight_count: Arc<AtomicUsize>,
}

/// Jobs claimed and not yet completed in the database, with per-queue counts for the
/// queues that have a concurrency limit.
struct InFlight {
    jobs: HashMap<i64, Held>,
    held: HashMap<String, usize>,
    limits: HashMap<String, usize>,
    /// Task and queue names, shared by all the jobs that have them.
    names: HashSet<std::sync::Arc<str>>,
}

struct Held {
    task_queue: TaskQueue,
    limited: bool,
}

impl InFlight {
    fn new(limits: HashMap<String, usize>, capacity: usize) -> Self {
        InFlight {
            // `capacity` is the concurrency, which may be huge ("unbounded", as procrastinate
            // allows): reserve for a sensible number of jobs, grow beyond that if needed.
            jobs: HashMap::with_capacity(capacity.min(1024)),
            held: HashMap::new(),
            limits,
            names: HashSet::new(),
        }
    }

    fn len(&self) -> usize {
        self.jobs.len()
    }

    fn name(&mut self, name: &str) -> std::sync::Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return shared.clone();
        }
        let shared: std::sync::Arc<str> = name.into();
        self.names.insert(shared.clone());
        shared
    }

    fn insert(&mut self, job: &JobRow) -> TaskQueue {
        let limited = self.limits.contains_key(&job.queue_name);
        if limited {
            *self.held.entry(job.queue_name.clone()).or_default() += 1;
        }
        let task_queue = (self.name(&job.task_name), self.name(&job.queue_name));
        let held = Held {
            task_queue: task_queue.clone(),
            limited,
        };
        if let Some(previous) = self.jobs.insert(job.id, held) {
            // Already known (an orphan handed again): count it once.
            if previous.limited {
                if let Some(count) = self.held.get_mut(&*previous.task_queue.1) {
                    *count = count.saturating_sub(1);
                }
            }
        }
        task_queue
    }

    /// The job's task and queue, and whether the queue is limited.
    fn remove(&mut self, job_id: i64) -> Option<(TaskQueue, bool)> {
        let held = self.jobs.remove(&job_id)?;
        if held.limited {
            if let Some(count) = self.held.get_mut(&*held.task_queue.1) {
                *count = count.saturating_sub(1);
            }
        }
        Some((held.task_queue, held.limited))
    }

    fn ids(&self) -> Vec<i64> {
        self.jobs.keys().copied().collect()
    }

    /// Room per limited queue once `pending` completions are written.
    fn room_after(&self, pending: &[Completion]) -> QueueRoom {
        if self.limits.is_empty() {
            return QueueRoom::default();
        }
        let mut held = self.held.clone();
        for completion in pending {
            if let Some(job) = self.jobs.get(&completion.job_id) {
                if job.limited {
                    if let Some(count) = held.get_mut(&*job.task_queue.1) {
                        *count = count.saturating_sub(1);
                    }
                }
            }
        }
        QueueRoom::compute(&self.limits, &held)
    }
}

type FlushResult = Option<Result<CompletionReport, tokio_postgres::Error>>;
type ClaimResult = Option<Result<Vec<JobRow>, tokio_postgres::Error>>;

/// What one round trip did: `None` where that step was not needed.
struct RoundTrip {
    flushed: FlushResult,
    claimed: ClaimResult,
}

/// The claim part of a round trip: up to `limit` jobs, within the queues' `room`;
/// `abandoned` jobs (refused terminal writes) hold no slot.
struct ClaimRequest<'a> {
    limit: usize,
    room: &'a QueueRoom,
    abandoned: &'a [i64],
}

/// Send the pending completions and the claim in one round trip. When both are needed they
/// share one transaction: one commit (one WAL flush) instead of two, and the claim counts
/// the locks and slots the completions free. Without retries it is a single statement
/// (one message each way); with retries, two statements pipelined in a transaction.
async fn round_trip(
    connection: &Connection,
    batch: &[Completion],
    claim: &ClaimRequest<'_>,
) -> RoundTrip {
    let client = &connection.client;
    let completer = &connection.completer;
    let fetcher = &connection.fetcher;
    let ClaimRequest {
        limit,
        room,
        abandoned,
    } = *claim;
    match (batch.is_empty(), limit == 0) {
        (true, true) => RoundTrip {
            flushed: None,
            claimed: None,
        },
        (false, true) => RoundTrip {
            flushed: Some(completer.write(client, batch).await),
            claimed: None,
        },
        (true, false) => RoundTrip {
            flushed: None,
            claimed: Some(fetcher.claim(client, limit, room, abandoned).await),
        },
        (false, false) => {
            let written = CompletionBatch::build(batch);
            if !written.has_retries() {
                // One statement: one message, one commit.
                return match fetcher
                    .complete_and_claim(client, &written, limit, room, abandoned)
                    .await
                {
                    Ok((jobs, done)) => RoundTrip {
                        flushed: Some(Ok(CompletionReport::of_batch(batch, &done))),
                        claimed: Some(Ok(jobs)),
                    },
                    // Committed or not, nobody can tell: as with the transaction below.
                    Err(error) if is_connectivity_error(&error) => RoundTrip {
                        flushed: Some(Err(error)),
                        claimed: None,
                    },
                    // Nothing was written (the statement is its own transaction): redo the
                    // steps on their own, where a bad completion cannot hold back the others.
                    Err(_) => separately(connection, batch, claim).await,
                };
            }
            // Retries: completions, then the claim, in one transaction, so the claim sees
            // a retried job that is due at once. Polled in order by join!, so sent in this
            // order, in one round trip.
            let (begin, flushed, claimed, commit) = tokio::join!(
                client.batch_execute("BEGIN"),
                completer.write_batch(client, batch),
                fetcher.claim(client, limit, room, abandoned),
                client.batch_execute("COMMIT"),
            );
            let results = [
                begin.as_ref().err(),
                flushed.as_ref().err(),
                claimed.as_ref().err(),
                commit.as_ref().err(),
            ];
            if results.iter().all(Option::is_none) {
                return RoundTrip {
                    flushed: Some(flushed),
                    claimed: Some(claimed),
                };
            }
            if results
                .iter()
                .flatten()
                .any(|error| is_connectivity_error(error))
            {
                // Committed or not, nobody can tell: report the connection as lost; the
                // dispatcher treats the batch as maybe written and recovers orphaned claims.
                let error = [begin.err(), flushed.err(), claimed.err(), commit.err()]
                    .into_iter()
                    .flatten()
                    .find(is_connectivity_error);
                return RoundTrip {
                    flushed: error.map(Err),
                    claimed: None,
                };
            }
            // A statement failed, so PostgreSQL rolled the transaction back (COMMIT answers
            // ROLLBACK). Redo the steps on their own, where a bad completion cannot hold
            // back the others.
            let _ = client.batch_execute("ROLLBACK").await;
            separately(connection, batch, claim).await
        }
    }
}

/// The completions (batched, else one by one), then the claim, each on its own.
async fn separately(
    connection: &Connection,
    batch: &[Completion],
    claim: &ClaimRequest<'_>,
) -> RoundTrip {
    let client = &connection.client;
    let flushed = connection.completer.write(client, batch).await;
    // Writes refused just now free their slots for this very claim (with `wait=False` a
    // short claim ends the run).
    let mut refused = claim.abandoned.to_vec();
    if let Ok(report) = &flushed {
        refused.extend(report.rejected.iter().map(|(job_id, _)| *job_id));
    }
    RoundTrip {
        flushed: Some(flushed),
        claimed: Some(
            connection
                .fetcher
                .claim(client, claim.limit, claim.room, &refused)
                .await,
        ),
    }
}

struct Connection {
    client: Client,
    fetcher: Fetcher,
    completer: Completer,
    /// The server process of this connection, to tell when it is gone after a loss.
    backend_pid: i32,
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
        let backend_pid = client
            .query_one(BACKEND_PID, &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|error| CoreError::database("setting up the job session", error))?;
        Ok(Connection {
            client,
            fetcher,
            completer,
            backend_pid,
        })
    }

    /// A killed backend can close its socket before its transaction is rolled back, so a
    /// claim on the new connection could still skip (SKIP LOCKED) the rows the lost one
    /// was claiming: a short claim, and with no notification to come those jobs would wait
    /// for the next poll. Its entry leaves pg_stat_activity after the rollback: wait for
    /// that, briefly, before the orphan check and the first claim.
    async fn wait_for_old_backend(&self, client: &Client, old_pid: i32) {
        let started = std::time::Instant::now();
        while started.elapsed() < OLD_BACKEND_WAIT {
            match client.query_one(BACKEND_ALIVE, &[&old_pid]).await {
                Ok(row) if row.try_get::<_, bool>(0).unwrap_or(false) => {}
                // Gone, or the check failed (the claim that follows will tell).
                _ => return,
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Runs until the completion sender is dropped and every completion is written.
    pub async fn run(mut self, client: Client) -> CoreResult<()> {
        let mut connection = self.prepare(client).await?;
        let concurrency = self.config.concurrency;
        let mut in_flight = InFlight::new(self.config.queue_concurrency.clone(), concurrency);
        // A claim came back short because a limited queue was full: claim again as soon as
        // a job of a limited queue completes.
        let mut claim_when_queue_frees = false;
        let mut pending: Vec<Completion> = Vec::new();
        // How long each reported job ran, by job id (only for the metrics).
        let mut durations: HashMap<i64, f64> = HashMap::new();
        self.handoff.metrics().set_connected("dispatcher", true);
        // Completions that were sent when the connection broke: they may have been written.
        let mut maybe_written: HashSet<i64> = HashSet::new();
        // Jobs whose terminal write the database refused (procrastinate's worker gets the
        // error and moves on): still `doing` for this worker, but their slot is free again,
        // and they are not orphans to hand over after a reconnect.
        let mut abandoned: Vec<i64> = Vec::new();
        let mut claiming = true;
        let mut want_claim = true;
        let mut completions_open = true;
        // procrastinate takes 0 (poll back to back); tokio's interval needs a period.
        let mut poll = tokio::time::interval(
            self.config
                .fetch_job_polling_interval
                .max(std::time::Duration::from_millis(1)),
        );
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;

        loop {
            while let Ok(reported) = self.completions.try_recv() {
                receive(&mut pending, &mut durations, reported);
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
                        Some(reported) => receive(&mut pending, &mut durations, reported),
                        None => completions_open = false,
                    },
                    _ = self.wake.notified(), if claiming => want_claim = true,
                    _ = poll.tick(), if claiming => want_claim = true,
                    _ = self.stop_fetching.changed(), if claiming => {},
                }
                continue;
            }

            let room = in_flight.room_after(&pending);
            let batch = std::mem::take(&mut pending);
            let RoundTrip { flushed, claimed } = round_trip(
                &connection,
                &batch,
                &ClaimRequest {
                    limit: claim_limit,
                    room: &room,
                    abandoned: &abandoned,
                },
            )
            .await;

            let mut broken = false;
            match flushed {
                None => {}
                Some(Ok(report)) => {
                    let mut ended = Vec::with_capacity(report.written.len());
                    for completion in &batch {
                        let Some((task_queue, limited)) = in_flight.remove(completion.job_id)
                        else {
                            continue;
                        };
                        if limited && claim_when_queue_frees {
                            claim_when_queue_frees = false;
                            want_claim = true;
                        }
                        let duration = durations.remove(&completion.job_id);
                        ended.push((task_queue, outcome_label(&completion.outcome), duration));
                    }
                    self.handoff
                        .metrics()
                        .update(|metrics| record_outcomes(metrics, ended, batch.len()));
                    for (job_id, reason) in report.rejected {
                        let level = if maybe_written.contains(&job_id) {
                            LogLevel::Debug
                        } else {
                            LogLevel::Error
                        };
                        self.handoff
                            .log_job(level, "finish_task_failed", job_id, reason);
                        abandoned.push(job_id);
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
                    let full = jobs.len() == claim_limit;
                    // With queue limits a claim can come back short while other queues
                    // still have jobs: go on while claims make progress.
                    let limited_progress = !room.is_empty() && !jobs.is_empty();
                    want_claim = full || limited_progress;
                    claim_when_queue_frees = !full && !room.full.is_empty();
                    let drained =
                        !self.config.wait && !full && !limited_progress && room.full.is_empty();
                    if !abandoned.is_empty() {
                        // Claimed again: its refused write had in fact gone through before a
                        // connection loss (it was back in `todo`). It holds a slot again.
                        abandoned.retain(|job_id| !jobs.iter().any(|job| job.id == *job_id));
                    }
                    if !jobs.is_empty() {
                        let claimed: Vec<TaskQueue> =
                            jobs.iter().map(|job| in_flight.insert(job)).collect();
                        self.handoff
                            .metrics()
                            .update(|metrics| record_claims(metrics, claimed));
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
            let (held, backlog) = (in_flight.len() as u64, pending.len() as u64);
            self.handoff.metrics().update(|metrics| {
                metrics.in_flight = held;
                metrics.completer_backlog = backlog;
            });

            if broken || connection.client.is_closed() {
                want_claim = true;
                self.handoff.metrics().set_connected("dispatcher", false);
                let orphans;
                (connection, orphans) = self
                    .reconnect(connection.backend_pid, &in_flight, &abandoned)
                    .await?;
                self.handoff.metrics().set_connected("dispatcher", true);
                self.handoff.log(
                    LogLevel::Info,
                    "dispatcher_reconnected",
                    format!("Reconnected to {}", self.target.description()),
                );
                if !orphans.is_empty() {
                    for job in &orphans {
                        in_flight.insert(job);
                    }
                    self.in_flight_count
                        .store(in_flight.len(), Ordering::Relaxed);
                    self.handoff.send(HandoffEvent::Jobs(orphans));
                }
            }
        }
    }

    /// A new job connection, set up, with the claims the lost one made that never reached
    /// the dispatcher. The connection can be lost again while it is being set up: that
    /// means another attempt, within the same reconnect budget, never a fatal error.
    async fn reconnect(
        &self,
        old_pid: i32,
        in_flight: &InFlight,
        abandoned: &[i64],
    ) -> CoreResult<(Connection, Vec<JobRow>)> {
        let started = std::time::Instant::now();
        let budget = self.config.reconnect_timeout;
        loop {
            let client = self
                .target
                .connect_with_backoff(budget.saturating_sub(started.elapsed()))
                .await?;
            let set_up = async {
                let connection = self.prepare(client).await?;
                self.wait_for_old_backend(&connection.client, old_pid).await;
                let orphans = self
                    .orphaned_claims(&connection.client, in_flight, abandoned)
                    .await?;
                Ok::<_, CoreError>((connection, orphans))
            };
            match set_up.await {
                Ok(ready) => return Ok(ready),
                Err(error) if error.is_connectivity() && started.elapsed() < budget => {
                    self.handoff.log(
                        LogLevel::Warning,
                        "dispatcher_connection_lost",
                        format!(
                            "Connection to {} lost again while setting it up ({error}); \
                             reconnecting",
                            self.target.description()
                        ),
                    );
                }
                Err(error) => return Err(error),
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
        in_flight: &InFlight,
        abandoned: &[i64],
    ) -> CoreResult<Vec<JobRow>> {
        let mut known: Vec<i64> = in_flight.ids();
        known.extend_from_slice(abandoned);
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

fn receive(pending: &mut Vec<Completion>, durations: &mut HashMap<i64, f64>, reported: Reported) {
    if reported.durations.len() == reported.completions.len() {
        for (completion, seconds) in reported.completions.iter().zip(&reported.durations) {
            durations.insert(completion.job_id, *seconds);
        }
    }
    pending.extend(reported.completions);
}

fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Retry { .. } => "retried",
        Outcome::Finish { status, .. } => match status.as_str() {
            "succeeded" => "succeeded",
            "aborted" => "aborted",
            _ => "failed",
        },
    }
}

fn record_claims(metrics: &mut MetricsSnapshot, claimed: Vec<TaskQueue>) {
    metrics.claim_batch_size.observe(claimed.len() as f64);
    for task_queue in claimed {
        *metrics.claimed.entry(task_queue).or_default() += 1;
    }
}

type Ended = (TaskQueue, &'static str, Option<f64>);

fn record_outcomes(metrics: &mut MetricsSnapshot, ended: Vec<Ended>, batch_size: usize) {
    metrics.completion_batch_size.observe(batch_size as f64);
    for ((task, queue), status, duration) in ended {
        if let Some(seconds) = duration {
            metrics
                .job_duration
                .entry((task.clone(), queue.clone()))
                .or_insert_with(|| Histogram::new(DURATION_BUCKETS))
                .observe(seconds);
        }
        *metrics.outcomes.entry((task, queue, status)).or_default() += 1;
    }
}
