//! The dispatcher owns the job connection and runs the claim/complete cycle.
//!
//! Each round trip sends the pending completions and then, pipelined on the same
//! connection, a claim for the slots they free. The completion statement commits before the
//! claim runs, so freed locks and slots are visible to it. Completions batch themselves:
//! whatever arrived while the previous round trip was in flight goes out in the next one.
//!
//! Claims follow procrastinate's worker: claim while claims come back full; after a short
//! claim, wait for a `job_inserted` wake-up, the polling interval, or a stop.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch, Notify};
use tokio_postgres::Client;

use crate::completer::{Completer, Completion, CompletionReport};
use crate::config::WorkerConfig;
use crate::connect::ConnectionTarget;
use crate::errors::{is_connectivity_error, CoreError, CoreResult};
use crate::fetcher::{Fetcher, JobRow, QueueRoom};
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
    /// Outcomes from the runner, in the chunks it reported them.
    pub completions: mpsc::UnboundedReceiver<Vec<Completion>>,
    pub wake: Arc<Notify>,
    pub stop_fetching: watch::Receiver<bool>,
    pub handoff: HandoffSender,
    /// Jobs claimed and not yet completed in the database (read by the abort poller).
    pub in_flight_count: Arc<AtomicUsize>,
}

/// Jobs claimed and not yet completed in the database, with per-queue counts for the
/// queues that have a concurrency limit.
struct InFlight {
    queue_of: HashMap<i64, Option<String>>,
    held: HashMap<String, usize>,
    limits: HashMap<String, usize>,
}

impl InFlight {
    fn new(limits: HashMap<String, usize>, capacity: usize) -> Self {
        InFlight {
            queue_of: HashMap::with_capacity(capacity),
            held: HashMap::new(),
            limits,
        }
    }

    fn len(&self) -> usize {
        self.queue_of.len()
    }

    fn insert(&mut self, job: &JobRow) {
        let limited = self.limits.contains_key(&job.queue_name);
        let queue = limited.then(|| job.queue_name.clone());
        if let Some(queue) = &queue {
            *self.held.entry(queue.clone()).or_default() += 1;
        }
        if let Some(Some(previous)) = self.queue_of.insert(job.id, queue) {
            // Already known (an orphan handed again): count it once.
            if let Some(count) = self.held.get_mut(&previous) {
                *count = count.saturating_sub(1);
            }
        }
    }

    /// Whether the job was in a limited queue.
    fn remove(&mut self, job_id: i64) -> bool {
        match self.queue_of.remove(&job_id) {
            Some(Some(queue)) => {
                if let Some(count) = self.held.get_mut(&queue) {
                    *count = count.saturating_sub(1);
                }
                true
            }
            _ => false,
        }
    }

    fn ids(&self) -> Vec<i64> {
        self.queue_of.keys().copied().collect()
    }

    /// Room per limited queue once `pending` completions are written.
    fn room_after(&self, pending: &[Completion]) -> QueueRoom {
        if self.limits.is_empty() {
            return QueueRoom::default();
        }
        let mut held = self.held.clone();
        for completion in pending {
            if let Some(Some(queue)) = self.queue_of.get(&completion.job_id) {
                if let Some(count) = held.get_mut(queue) {
                    *count = count.saturating_sub(1);
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

/// Send the pending completions and the claim in one pipelined round trip. When both are
/// needed they share one transaction: one commit (one WAL flush) instead of two, and the
/// claim sees the locks and slots the completions free.
async fn round_trip(
    connection: &Connection,
    batch: &[Completion],
    claim_limit: usize,
    room: &QueueRoom,
) -> RoundTrip {
    let client = &connection.client;
    let completer = &connection.completer;
    let fetcher = &connection.fetcher;
    match (batch.is_empty(), claim_limit == 0) {
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
            claimed: Some(fetcher.claim(client, claim_limit, room).await),
        },
        (false, false) => {
            // Polled in order by join!, so sent in this order, in one round trip.
            let (begin, flushed, claimed, commit) = tokio::join!(
                client.batch_execute("BEGIN"),
                completer.write_batch(client, batch),
                fetcher.claim(client, claim_limit, room),
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
            RoundTrip {
                flushed: Some(completer.write(client, batch).await),
                claimed: Some(fetcher.claim(client, claim_limit, room).await),
            }
        }
    }
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
        let mut in_flight = InFlight::new(self.config.queue_concurrency.clone(), concurrency);
        // A claim came back short because a limited queue was full: claim again as soon as
        // a job of a limited queue completes.
        let mut claim_when_queue_frees = false;
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
            while let Ok(mut chunk) = self.completions.try_recv() {
                pending.append(&mut chunk);
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
                        Some(mut chunk) => pending.append(&mut chunk),
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
            let RoundTrip { flushed, claimed } =
                round_trip(&connection, &batch, claim_limit, &room).await;

            let mut broken = false;
            match flushed {
                None => {}
                Some(Ok(report)) => {
                    for job_id in &report.written {
                        if in_flight.remove(*job_id) && claim_when_queue_frees {
                            claim_when_queue_frees = false;
                            want_claim = true;
                        }
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
                    let full = jobs.len() == claim_limit;
                    // With queue limits a claim can come back short while other queues
                    // still have jobs: go on while claims make progress.
                    let limited_progress = !room.is_empty() && !jobs.is_empty();
                    want_claim = full || limited_progress;
                    claim_when_queue_frees = !full && !room.full.is_empty();
                    let drained =
                        !self.config.wait && !full && !limited_progress && room.full.is_empty();
                    if !jobs.is_empty() {
                        for job in &jobs {
                            in_flight.insert(job);
                        }
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
                want_claim = true;
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
    ) -> CoreResult<Vec<JobRow>> {
        let known: Vec<i64> = in_flight.ids();
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
