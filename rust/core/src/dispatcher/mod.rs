//! The dispatcher owns the job connection and runs the claim/complete cycle.
//!
//! Each round trip sends the pending completions and a claim for the slots they free, in
//! one transaction, so freed locks and slots count for that claim. Completions batch
//! themselves: whatever arrived while the previous round trip was in flight goes out in the
//! next one.
//!
//! Claims follow procrastinate's worker: claim while claims come back full; after a short
//! claim, wait for a `job_inserted` wake-up, the polling interval, or a stop.
//!
//! Faults: no answer within `response_timeout` counts as a lost connection (a half-open
//! one). A lost connection is replaced, the server process of the old one is made sure to
//! be gone, the completions that were in flight are sent again (conditioned on their
//! claims, so harmless if they had been written), and the claims this worker holds but
//! never heard of are handed over (also looked for at every heartbeat interval: a
//! statement of a lost connection may commit later). A statement refused for a passing
//! reason is sent again with backoff. Only when the database stays unusable for the whole
//! reconnect budget does the dispatcher stop claiming (a fatal error for the runner), and
//! even then it keeps writing the outcomes it gets until the runner shuts down.

mod state;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};

use crate::completer::{Completer, CompletionBatch, CompletionReport};
use crate::config::WorkerConfig;
use crate::connect::ConnectionTarget;
use crate::db::{Db, Within};
use crate::errors::{CoreError, CoreResult, Failed, Failure};
use crate::fetcher::{Claimant, Fetcher, QueueRoom};
use crate::handoff::HandoffSender;
use crate::metrics::Labels;
use crate::protocol::{Completion, JobRow, LogLevel, Reported};
use crate::registry::{query_claims, query_ids, Identity};
use crate::sql;

pub use state::{InFlight, Needs, Plan, RoundTripPlan, Settings, State};

/// How long a reconnected dispatcher lets the server process of its lost connection end
/// on its own before it ends it (a half-open connection's process lives on, maybe in a
/// transaction that holds row locks).
const OLD_BACKEND_GRACE: Duration = Duration::from_millis(500);
const OLD_BACKEND_WAIT: Duration = Duration::from_secs(2);

/// After a hard stop, how long a round trip or a reconnect may still take: the last
/// outcomes are written if the database answers promptly, else given up on (their jobs
/// stay `doing`, as a killed worker's, for the stalled-job recovery).
const HARD_STOP_WAIT: Duration = Duration::from_secs(1);

pub struct Dispatcher {
    pub target: ConnectionTarget,
    pub config: Arc<WorkerConfig>,
    pub identity: Arc<Identity>,
    /// Outcomes from the runner, in the chunks it reported them.
    pub completions: mpsc::UnboundedReceiver<Reported>,
    pub wake: Arc<Notify>,
    pub stop_fetching: watch::Receiver<bool>,
    /// Set by a hard stop: give up waiting for an unusable database at once.
    pub hard_stop: watch::Receiver<bool>,
    /// Whether `hard_stop` can still change (its sender lives).
    pub hard_stop_open: bool,
    pub handoff: HandoffSender,
    /// Jobs claimed and not yet completed in the database (read by the abort poller).
    pub in_flight_count: Arc<AtomicUsize>,
}

/// What one round trip did: `None` where that step was not needed.
struct RoundTrip {
    flushed: Option<Result<CompletionReport, Failed>>,
    claimed: Option<Result<Vec<JobRow>, Failed>>,
}

/// The claim part of a round trip.
struct ClaimRequest<'a> {
    claimant: &'a Claimant,
    limit: usize,
    room: &'a QueueRoom,
    /// Jobs whose terminal write was refused: `doing`, but holding no slot.
    abandoned: &'a [i64],
}

/// A server process, told apart from a later one with the same pid.
#[derive(Clone, Copy, Debug)]
struct Backend {
    pid: i32,
    started: SystemTime,
}

struct Connection {
    client: Db,
    fetcher: Fetcher,
    completer: Completer,
    backend: Option<Backend>,
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
    let workers = &claim.claimant.worker_ids;
    let claim_now = || async {
        fetcher
            .claim(
                client,
                Within::OwnTransaction,
                claim.claimant,
                claim.limit,
                claim.room,
                claim.abandoned,
            )
            .await
            .map_err(|error| Failed::new(&error))
    };
    match (batch.is_empty(), claim.limit == 0) {
        (true, true) => RoundTrip {
            flushed: None,
            claimed: None,
        },
        (false, true) => RoundTrip {
            flushed: Some(completer.write(client, batch, workers).await),
            claimed: None,
        },
        (true, false) => RoundTrip {
            flushed: None,
            claimed: Some(claim_now().await),
        },
        (false, false) => {
            let written = CompletionBatch::build(batch);
            if !written.has_retries() {
                // One statement: one message, one commit.
                return match fetcher
                    .complete_and_claim(
                        client,
                        claim.claimant,
                        &written,
                        claim.limit,
                        claim.room,
                        claim.abandoned,
                    )
                    .await
                {
                    Ok((jobs, done)) => RoundTrip {
                        flushed: Some(Ok(CompletionReport::of_batch(batch, &done))),
                        claimed: Some(Ok(jobs)),
                    },
                    Err(error) => {
                        let failed = Failed::new(&error);
                        if failed.failure == Failure::Connection {
                            // Committed or not, nobody can tell: as with the transaction below.
                            RoundTrip {
                                flushed: Some(Err(failed)),
                                claimed: None,
                            }
                        } else {
                            // Nothing was written (the statement is its own transaction):
                            // redo the steps on their own, where a bad completion cannot
                            // hold back the others.
                            separately(connection, batch, claim).await
                        }
                    }
                };
            }
            // Retries: completions, then the claim, in one transaction, so the claim sees
            // a retried job that is due at once. Polled in order by join!, so sent in this
            // order, in one round trip.
            let begin_statement = client.begin_statement();
            let (begin, flushed, claimed, commit) = tokio::join!(
                client.batch_execute(&begin_statement),
                completer.write_batch(client, batch, workers, Within::OpenTransaction),
                fetcher.claim(
                    client,
                    Within::OpenTransaction,
                    claim.claimant,
                    claim.limit,
                    claim.room,
                    claim.abandoned
                ),
                client.batch_execute("COMMIT"),
            );
            let errors: Vec<Failed> = [
                begin.as_ref().err(),
                flushed.as_ref().err(),
                claimed.as_ref().err(),
                commit.as_ref().err(),
            ]
            .into_iter()
            .flatten()
            .map(Failed::new)
            .collect();
            if errors.is_empty() {
                return RoundTrip {
                    flushed: Some(flushed.map_err(|error| Failed::new(&error))),
                    claimed: Some(claimed.map_err(|error| Failed::new(&error))),
                };
            }
            if let Some(lost) = errors
                .into_iter()
                .find(|failed| failed.failure == Failure::Connection)
            {
                // Committed or not, nobody can tell: report the connection as lost; the
                // dispatcher sends the batch again and looks for orphaned claims.
                return RoundTrip {
                    flushed: Some(Err(lost)),
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
    let flushed = connection
        .completer
        .write(client, batch, &claim.claimant.worker_ids)
        .await;
    if matches!(&flushed, Err(failed) if failed.failure == Failure::Connection) {
        return RoundTrip {
            flushed: Some(flushed),
            claimed: None,
        };
    }
    // Writes refused just now free their slots for this very claim (with `wait=False` a
    // short claim ends the run).
    let mut abandoned = claim.abandoned.to_vec();
    if let Ok(report) = &flushed {
        abandoned.extend(report.refused.iter().map(|(key, _)| key.0));
    }
    let claimed = connection
        .fetcher
        .claim(
            client,
            Within::OwnTransaction,
            claim.claimant,
            claim.limit,
            claim.room,
            &abandoned,
        )
        .await
        .map_err(|error| Failed::new(&error));
    RoundTrip {
        flushed: Some(flushed),
        claimed: Some(claimed),
    }
}

impl Dispatcher {
    fn settings(&self) -> Settings {
        Settings {
            concurrency: self.config.concurrency,
            max_batch_size: self.config.max_batch_size,
            wait: self.config.wait,
            queue_limits: self.config.queue_concurrency.clone(),
            max_jobs: self.config.max_jobs,
            budget: self.config.reconnect_timeout,
            target: self.target.description().to_string(),
            labels: Labels::new(
                self.config.task_names.as_deref(),
                self.config
                    .queues
                    .iter()
                    .flatten()
                    .chain(self.config.queue_concurrency.keys()),
            ),
            sample_waits: self.config.sample_metrics,
        }
    }

    async fn prepare(&self, mut client: Db) -> CoreResult<Connection> {
        let fetcher = Fetcher::prepare(
            &mut client,
            self.config.queues.clone(),
            self.config.concurrency,
            !self.config.queue_concurrency.is_empty(),
        )
        .await
        .map_err(|error| self.pooler_error_or(&client, error))?;
        let completer = Completer::prepare(&client)
            .await
            .map_err(|error| self.pooler_error_or(&client, error))?;
        let backend = if client.is_pooled() {
            // Behind a transaction pooler, the server process is the pooler's, shared
            // with other clients: never one of this worker's to end. (A client lost in a
            // transaction makes the pooler close that server connection.)
            None
        } else {
            client
                .query_one(sql::BACKEND_IDENTITY, &[])
                .await
                .and_then(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
                .map(|(pid, started)| Backend { pid, started })
                // The backend may not be visible (no rights on pg_stat_activity): nothing
                // to wait for then.
                .ok()
        };
        Ok(Connection {
            client,
            fetcher,
            completer,
            backend,
        })
    }

    fn hard_stopped(&self) -> bool {
        *self.hard_stop.borrow()
    }

    /// Runs until the completion sender is dropped and every completion is written (or
    /// given up on, after the reconnect budget or a hard stop).
    pub async fn run(mut self, client: Db) -> CoreResult<()> {
        let mut state = State::new(self.settings());
        // The first set-up is tried again as any later one (see `reconnect`): lost on the
        // way, or refused for a passing reason (a migration holding a lock on the jobs
        // table makes the claim's prepare wait for `lock_timeout`, then fail).
        let mut connection = match self.prepare(client).await {
            Ok(connection) => Some(connection),
            Err(error) if error.is_connectivity() => None,
            Err(error) if error.is_passing() => {
                self.handoff.log(
                    LogLevel::Warning,
                    "dispatcher_set_up_refused",
                    format!(
                        "Could not set up the job connection ({error}): trying again for up \
                         to {:.0} s",
                        self.config.reconnect_timeout.as_secs_f64()
                    ),
                );
                None
            }
            Err(error) => return Err(error),
        };
        self.handoff
            .metrics()
            .set_connected("dispatcher", connection.is_some());
        let mut old_backend = None;
        // procrastinate takes 0 (poll back to back); tokio's interval needs a period.
        let mut poll = interval(self.config.fetch_job_polling_interval);
        poll.tick().await;
        // Claims of this worker that it never heard of (a statement of a lost connection
        // that committed late) are looked for at the heartbeat's pace.
        let mut orphan_check = interval(
            self.config
                .update_heartbeat_interval
                .max(Duration::from_secs(1)),
        );
        orphan_check.tick().await;
        // An idle connection whose server process ended is seen (and replaced) at once,
        // not at the next claim, which may be a polling interval away.
        let mut liveness = interval(crate::registry::liveness_interval(
            self.config.response_timeout,
        ));
        liveness.tick().await;

        loop {
            if connection.is_none() {
                connection = self.reconnect(&mut state, old_backend.take()).await;
                self.send_outbox(&mut state);
                if connection.is_none() {
                    return Ok(());
                }
            }
            let Some(current) = connection.as_ref() else {
                continue;
            };
            while let Ok(reported) = self.completions.try_recv() {
                state.receive(reported);
            }
            let plan = state.plan(Instant::now(), *self.stop_fetching.borrow());
            self.send_outbox(&mut state);
            let plan = match plan {
                Plan::Done => return Ok(()),
                Plan::Wait { until } => {
                    let sleep = until.map(|until| tokio::time::sleep_until(until.into()));
                    tokio::select! {
                        completion = self.completions.recv(), if state.completions_open => match completion {
                            Some(reported) => state.receive(reported),
                            None => state.on_completions_closed(Instant::now()),
                        },
                        _ = self.wake.notified(), if state.claiming => state.on_wake(),
                        _ = poll.tick(), if state.claiming => {
                            if self.config.listen_notify {
                                state.want_claim = true;
                            } else {
                                // No notification tells of new jobs: every poll may find
                                // some scheduled for later.
                                state.on_wake();
                            }
                        }
                        _ = self.stop_fetching.changed(), if state.claiming => {},
                        _ = liveness.tick() => {
                            if current.client.is_closed() {
                                old_backend = current.backend;
                                connection = None;
                            }
                        }
                        _ = orphan_check.tick() => {
                            if let Err(failed) = self.check_orphans(current, &mut state).await {
                                if failed.failure == Failure::Connection {
                                    old_backend = current.backend;
                                    connection = None;
                                }
                            }
                            self.send_outbox(&mut state);
                        }
                        _ = async { if let Some(sleep) = sleep { sleep.await } }, if until.is_some() => {},
                        changed = self.hard_stop.changed(), if self.hard_stop_open => {
                            self.hard_stop_open = changed.is_ok();
                            if self.hard_stopped() && !state.completions_open {
                                state.give_up("hard stop");
                                self.send_outbox(&mut state);
                                return Ok(());
                            }
                        }
                    }
                    continue;
                }
                Plan::RoundTrip(plan) => plan,
            };

            let claimant = self.identity.claimant();
            let request = ClaimRequest {
                claimant: &claimant,
                limit: plan.claim_limit,
                room: &plan.room,
                abandoned: &plan.abandoned,
            };
            let answer = self
                .bounded(round_trip(current, &plan.batch, &request))
                .await;
            let now = Instant::now();
            let mut needs = Needs::default();
            match answer {
                Some(RoundTrip { flushed, claimed }) => {
                    if let Some(flushed) = flushed {
                        state.on_flushed(now, plan.batch, flushed, &mut needs);
                    }
                    if let Some(claimed) = claimed {
                        state.on_claimed(now, plan.claim_limit, &plan.room, claimed, &mut needs);
                    }
                }
                None => {
                    // No answer in time: the connection is taken for dead (half-open).
                    state.on_flushed(
                        now,
                        plan.batch,
                        Err(Failed::no_answer(self.config.response_timeout)),
                        &mut needs,
                    );
                    needs.reconnect = true;
                }
            }
            let pooler_sign = current.client.transaction_pooler_sign();
            let behind_a_pooler = pooler_sign.is_some();
            if let Some(sign) = pooler_sign {
                let error = self.pooler_not_declared(sign);
                self.on_transaction_pooler(&mut state, error);
                needs.reconnect = true;
            }
            if needs.register_again && !needs.reconnect {
                let gone = claimant.worker_id;
                if let Err(error) = self
                    .identity
                    .register_again(
                        &current.client,
                        gone,
                        &self.handoff,
                        "a claim found its row gone",
                    )
                    .await
                {
                    state.on_trouble(now, "registering the worker again", &error.to_string());
                    needs.reconnect = error.is_connectivity();
                }
            }
            if !needs.reconnect && state.wants_schedule_check() {
                let look = self.next_scheduled(current);
                match tokio::time::timeout(self.config.response_timeout, look)
                    .await
                    .ok()
                {
                    Some(Ok(due_in)) => state.on_next_scheduled(Instant::now(), due_in),
                    Some(Err(error)) => {
                        let failed = Failed::new(&error);
                        needs.reconnect = failed.failure == Failure::Connection;
                        // The poll still finds such jobs; this look is tried again then.
                        self.handoff.log(
                            LogLevel::Debug,
                            "next_scheduled_failed",
                            format!("Could not look for jobs scheduled later: {}", failed.reason),
                        );
                    }
                    None => needs.reconnect = true,
                }
            }
            self.publish(&mut state);
            if needs.reconnect || current.client.is_closed() {
                // Behind a pooler, the server process is the pooler's, shared with other
                // clients: never this worker's to end.
                old_backend = current.backend.filter(|_| !behind_a_pooler);
                connection = None;
            }
        }
    }

    /// The error that names `pooler`, given what showed the pooler (see
    /// [`Db::transaction_pooler_sign`]).
    fn pooler_not_declared(&self, sign: &'static str) -> CoreError {
        CoreError::PoolerNotDeclared {
            target: self.target.description().to_string(),
            sign,
        }
    }

    /// A set-up's `error`, or, if the connection showed a transaction pooler on the way
    /// (a statement name already taken on the server), the error that names `pooler`.
    fn pooler_error_or(&self, client: &Db, error: CoreError) -> CoreError {
        match client.transaction_pooler_sign() {
            Some(sign) => self.pooler_not_declared(sign),
            None => error,
        }
    }

    /// The server did not know a statement prepared on the job connection, or knew
    /// another client's of the same name: a transaction pooler (PgBouncer `pool_mode =
    /// transaction`) is in between, running each transaction on whichever server
    /// connection is free, and the worker was not told (`pooler`). Claims would fail (or
    /// worse, meet another client's statement of the same name) for ever: stop claiming
    /// with `error`, which says what to do. The outcomes still to come are written through
    /// a new connection in pooler mode, which works there.
    fn on_transaction_pooler(&mut self, state: &mut State, error: CoreError) {
        state.fatal(error);
        self.send_outbox(state);
        self.target = self.target.clone().through_pooler(true);
    }

    /// A round trip, bounded by `response_timeout` (a hard stop shortens the wait):
    /// `None` if no answer came in time.
    async fn bounded<T>(&mut self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::pin!(work);
        let deadline = tokio::time::sleep(self.config.response_timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                answer = &mut work => return Some(answer),
                _ = &mut deadline => return None,
                changed = self.hard_stop.changed(), if self.hard_stop_open => {
                    if changed.is_err() {
                        self.hard_stop_open = false;
                        continue;
                    }
                    if self.hard_stopped() {
                        let soon = tokio::time::Instant::now() + HARD_STOP_WAIT;
                        if soon < deadline.deadline() {
                            deadline.as_mut().reset(soon);
                        }
                        // No more changes to wait for; the deadline decides.
                        return tokio::select! {
                            answer = &mut work => Some(answer),
                            _ = &mut deadline => None,
                        };
                    }
                }
            }
        }
    }

    fn send_outbox(&self, state: &mut State) {
        for event in state.outbox.drain(..) {
            self.handoff.send(event);
        }
    }

    /// Events and metrics after a round trip.
    fn publish(&self, state: &mut State) {
        self.send_outbox(state);
        let claimed = std::mem::take(&mut state.claimed_metrics);
        let waits = std::mem::take(&mut state.claimed_waits);
        if !waits.is_empty() {
            self.handoff.metrics().waits_claimed(waits);
        }
        let ended = std::mem::take(&mut state.ended_metrics);
        let batch_sizes = std::mem::take(&mut state.batch_sizes);
        let held = state.in_flight.len();
        let backlog = state.backlog() as u64;
        self.in_flight_count.store(held, Ordering::Relaxed);
        self.handoff.metrics().update(|metrics| {
            if !claimed.is_empty() {
                state::record_claims(metrics, claimed);
            }
            state::record_outcomes(metrics, ended, &batch_sizes);
            metrics.in_flight = held as u64;
            metrics.completer_backlog = backlog;
        });
    }

    /// A new job connection, set up, with the claims the lost one made that never reached
    /// the dispatcher. Tries with backoff as long as anyone may need the database; past
    /// the reconnect budget the runner gets a fatal error (claiming stops) and the tries go
    /// on for the outcomes still to come, until the runner shuts down and the last of them
    /// had their budget. `None`: given up (the budget, or a hard stop).
    async fn reconnect(&mut self, state: &mut State, old: Option<Backend>) -> Option<Connection> {
        self.handoff.metrics().set_connected("dispatcher", false);
        let started = Instant::now();
        let mut delay = state::FIRST_BACKOFF;
        let mut last_error = String::new();
        loop {
            while let Ok(reported) = self.completions.try_recv() {
                state.receive(reported);
            }
            if self.completions.is_closed() && self.completions.is_empty() {
                state.on_completions_closed(Instant::now());
            }
            if *self.stop_fetching.borrow() || self.hard_stopped() {
                // The runner waits for this before it stops: never behind a reconnect.
                state.stop_claiming();
                self.send_outbox(state);
            }
            if self.hard_stopped() && !state.completions_open {
                state.give_up("hard stop while the database was unreachable");
                return None;
            }
            if !state.worth_reconnecting(Instant::now()) {
                state.give_up(&format!("the database stayed unreachable: {last_error}"));
                return None;
            }
            let Some(attempt) = self.connect_unless_stopped(state, old).await else {
                continue;
            };
            // Whether the database answered, and refused the set-up (rather than being out
            // of reach).
            let refused = match attempt {
                Ok((connection, orphans)) => {
                    self.handoff.metrics().set_connected("dispatcher", true);
                    self.handoff.log(
                        LogLevel::Info,
                        "dispatcher_reconnected",
                        format!("Reconnected to {}", self.target.description()),
                    );
                    state.on_reconnected(orphans);
                    self.publish(state);
                    return Some(connection);
                }
                // A set-up that met another client's statement: the job connection goes
                // through a transaction pooler. Stop claiming, and go on in pooler mode
                // for the outcomes still to come (rather than failing the same way until
                // the reconnect budget is spent).
                Err(error @ CoreError::PoolerNotDeclared { .. }) => {
                    last_error = error.to_string();
                    self.on_transaction_pooler(state, error);
                    false
                }
                // Unreachable, lost again while setting up, or refused (too many
                // connections...): all passing troubles, as far as the dispatcher can tell.
                Err(error) => {
                    last_error = error.to_string();
                    self.handoff.log(
                        LogLevel::Debug,
                        "dispatcher_reconnect_failed",
                        format!(
                            "Could not set up the job connection ({last_error}); trying again \
                             in {:.2} s",
                            delay.as_secs_f64()
                        ),
                    );
                    error.is_passing()
                }
            };
            if started.elapsed() > self.config.reconnect_timeout && !state.fatal_sent() {
                state.fatal(CoreError::gave_up(
                    self.target.description(),
                    self.config.reconnect_timeout,
                    last_error.clone(),
                    refused,
                ));
                self.send_outbox(state);
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = became_true(self.stop_fetching.clone()), if state.claiming => {}
                changed = self.hard_stop.changed(), if self.hard_stop_open => {
                    self.hard_stop_open = changed.is_ok();
                }
                completion = self.completions.recv(), if state.completions_open => match completion {
                    Some(reported) => state.receive(reported),
                    None => state.on_completions_closed(Instant::now()),
                },
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }

    /// [`Dispatcher::connect_and_set_up`], unless a hard stop, or while claiming a stop
    /// request, comes first (`None`: the caller's loop deals with it, and tries again).
    /// After a hard stop, an attempt gets [`HARD_STOP_WAIT`]: a database that answers at
    /// once still gets the last outcomes, one that does not is given up on.
    async fn connect_unless_stopped(
        &self,
        state: &State,
        old: Option<Backend>,
    ) -> Option<CoreResult<(Connection, Vec<JobRow>)>> {
        let attempt = self.connect_and_set_up(state, old);
        if self.hard_stopped() {
            return tokio::time::timeout(HARD_STOP_WAIT, attempt).await.ok();
        }
        tokio::select! {
            attempt = attempt => Some(attempt),
            _ = became_true(self.hard_stop.clone()) => None,
            _ = became_true(self.stop_fetching.clone()), if state.claiming => None,
        }
    }

    async fn connect_and_set_up(
        &self,
        state: &State,
        old: Option<Backend>,
    ) -> CoreResult<(Connection, Vec<JobRow>)> {
        let client = self.target.connect().await?;
        let set_up = async {
            let connection = self.prepare(client).await?;
            if let Some(old) = old {
                self.retire_old_backend(&connection.client, old).await;
            }
            let orphans = self
                .orphaned_claims(&connection.client, state)
                .await
                .map_err(|error| {
                    CoreError::database("looking for claims lost in transit", error)
                })?;
            Ok::<_, CoreError>((connection, orphans))
        };
        match tokio::time::timeout(self.config.response_timeout, set_up).await {
            Ok(result) => result,
            Err(_) => Err(CoreError::Unreachable {
                target: self.target.description().to_string(),
                reason: "no answer while setting up the job connection".into(),
            }),
        }
    }

    /// The server process of a lost connection may live on: a killed one until its
    /// rollback is done, a half-open one until TCP gives up, maybe holding the row locks
    /// of a transaction nobody will finish. Claims would skip (SKIP LOCKED) or wait for
    /// those rows. Let it end on its own for a moment, then end it (it is this worker's
    /// own process, told apart from any later one by its start time).
    async fn retire_old_backend(&self, client: &Db, old: Backend) {
        let alive = || async {
            client
                .query_one(sql::BACKEND_ALIVE, &[&old.pid, &old.started])
                .await
                .and_then(|row| row.try_get::<_, bool>(0))
                .unwrap_or(false)
        };
        let started = Instant::now();
        let mut terminated = false;
        while alive().await {
            if started.elapsed() > OLD_BACKEND_WAIT {
                return;
            }
            if !terminated && started.elapsed() > OLD_BACKEND_GRACE {
                terminated = true;
                let _ = client
                    .query(sql::TERMINATE_BACKEND, &[&old.pid, &old.started])
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// In how long the earliest job scheduled for later, in this worker's queues, is due.
    async fn next_scheduled(
        &self,
        connection: &Connection,
    ) -> Result<Option<Duration>, tokio_postgres::Error> {
        let row = connection
            .client
            .query_one(sql::NEXT_SCHEDULED, &[&self.config.queues])
            .await?;
        let seconds: Option<f64> = row.try_get(0)?;
        // Past due by now (it was in the future when the statement ran): at once.
        Ok(seconds.map(|seconds| Duration::try_from_secs_f64(seconds).unwrap_or_default()))
    }

    async fn orphaned_claims(
        &self,
        client: &Db,
        state: &State,
    ) -> Result<Vec<JobRow>, tokio_postgres::Error> {
        let (ids, attempts) = state.in_flight.keys();
        let workers = self.identity.all();
        let rows = client
            .query(
                sql::ORPHANED_CLAIMS,
                &[&workers, &ids, &attempts, &state.abandoned],
            )
            .await?;
        let orphans = rows
            .iter()
            .map(JobRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::fetcher::in_start_order(orphans))
    }

    /// Between round trips (nothing in flight on this connection, so every claim it made
    /// is known): hand over claims of this worker nobody knew of, give back to this worker
    /// the running claims that lost their worker row, cancel the runs of claims that are
    /// no longer this worker's, and forget abandoned jobs that are no longer `doing` for it.
    async fn check_orphans(
        &self,
        connection: &Connection,
        state: &mut State,
    ) -> Result<(), Failed> {
        let client = &connection.client;
        let running: Vec<(i64, i32)> = state.running_claims();
        let check = async {
            let orphans = self.orphaned_claims(client, state).await?;
            let lost = if running.is_empty() {
                Vec::new()
            } else {
                let (ids, attempts): (Vec<i64>, Vec<i32>) = running.iter().copied().unzip();
                let jobs = query_ids(
                    client,
                    sql::REATTACH_CLAIMS,
                    &[&ids, &attempts, &self.identity.current()],
                )
                .await?;
                if !jobs.is_empty() {
                    self.handoff.log(
                        LogLevel::Warning,
                        "claims_reattached",
                        format!(
                            "Jobs {jobs:?} run here had lost their worker (this worker's row \
                             was deleted); they are worker {}'s again",
                            self.identity.current()
                        ),
                    );
                }
                query_claims(
                    client,
                    sql::LOST_CLAIMS,
                    &[&ids, &attempts, &self.identity.all()],
                )
                .await?
            };
            let still = if state.abandoned.is_empty() {
                None
            } else {
                Some(
                    query_ids(
                        client,
                        sql::STILL_ABANDONED,
                        &[&self.identity.all(), &state.abandoned],
                    )
                    .await?,
                )
            };
            Ok::<_, tokio_postgres::Error>((orphans, lost, still))
        };
        let answer = tokio::time::timeout(self.config.response_timeout, check).await;
        let (orphans, lost, still) = match answer {
            Ok(Ok(found)) => found,
            Ok(Err(error)) => {
                let failed = Failed::new(&error);
                self.handoff.log(
                    LogLevel::Warning,
                    "orphan_check_failed",
                    format!("Error looking for orphaned claims: {}", failed.reason),
                );
                return Err(failed);
            }
            Err(_) => return Err(Failed::no_answer(self.config.response_timeout)),
        };
        if let Some(still) = still {
            state.keep_abandoned(&still);
        }
        state.on_claims_lost(lost);
        if !orphans.is_empty() {
            state.on_reconnected(orphans);
        }
        self.publish(state);
        Ok(())
    }
}

/// Once the flag is (or turns) true; never if its sender is gone first.
async fn became_true(mut flag: watch::Receiver<bool>) {
    if flag.wait_for(|set| *set).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn interval(period: Duration) -> tokio::time::Interval {
    let mut interval = tokio::time::interval(period.max(Duration::from_millis(1)));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval
}
