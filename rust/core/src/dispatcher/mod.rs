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

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};

use crate::completer::{Completer, CompletionBatch, CompletionReport};
use crate::config::WorkerConfig;
use crate::connect::ConnectionTarget;
use crate::db::{Db, Within};
use crate::errors::{CoreError, CoreResult, Failed, Failure};
use crate::fetcher::{ClaimRequest, Claimant, Claimed, Fetcher};
use crate::handoff::HandoffSender;
use crate::metrics::Labels;
use crate::protocol::{ClaimKey, Completion, JobRow, LogLevel, Reported};
use crate::registry::{query_claims, query_ids, Identity};
use crate::sql;
use crate::timing::{ticker, Backoff, FIRST_BACKOFF};

use state::{
    after_shared_write, AfterSharedWrite, Answer, FollowUp, OrphanFindings, OrphanQuery, WriteMode,
};
pub use state::{InFlight, Plan, RoundTripPlan, Settings, State};

/// How long a reconnected dispatcher lets the server process of its lost connection end
/// on its own before it ends it (a half-open connection's process lives on, maybe in a
/// transaction that holds row locks).
const OLD_BACKEND_GRACE: Duration = Duration::from_millis(500);
const OLD_BACKEND_WAIT: Duration = Duration::from_secs(2);

/// The longest wait between two reconnects: a database back from a restart is found soon.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(2);

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

/// The job connection, if there is one now, and the server process of the last one lost
/// (to be made sure gone by the next set-up).
struct Link {
    connection: Option<Connection>,
    old_backend: Option<Backend>,
}

impl Link {
    fn current(&self) -> Option<&Connection> {
        self.connection.as_ref()
    }

    /// The connection is lost or dead: it is replaced before the next plan. Behind a
    /// pooler the server process is the pooler's, shared with other clients: never this
    /// worker's to end.
    fn drop_connection(&mut self, behind_a_pooler: bool) {
        if let Some(lost) = self.connection.take() {
            self.old_backend = lost.backend.filter(|_| !behind_a_pooler);
        }
    }
}

/// The periodic inputs of an idle dispatcher.
struct Tickers {
    poll: tokio::time::Interval,
    orphan_check: tokio::time::Interval,
    liveness: tokio::time::Interval,
}

/// What can end a wait with nothing to send.
enum Input {
    /// Outcomes from the runner (`None`: it closed the channel, shutting down).
    Reported(Option<Reported>),
    /// A `job_inserted` notification.
    Wake,
    Poll,
    StopRequested,
    LivenessCheck,
    OrphanCheck,
    /// The plan's deadline: a delayed completion, a job scheduled for later, a backoff.
    Deadline,
    HardStop {
        sender_gone: bool,
    },
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

/// Send the pending completions and the claim of `plan` in the way the plan's
/// [`WriteMode`] says: when both are needed they share one transaction, one commit (one WAL
/// flush) instead of two, and the claim counts the locks and slots the completions free.
async fn round_trip(connection: &Connection, plan: &RoundTripPlan, claimant: &Claimant) -> Answer {
    let claim = ClaimRequest {
        claimant,
        limit: plan.claim_limit,
        room: &plan.room,
        abandoned: &plan.abandoned,
        look_at_schedule: plan.look_at_schedule,
    };
    let batch = plan.batch.as_slice();
    match plan.write_mode() {
        WriteMode::Nothing => Answer::default(),
        WriteMode::Completions => Answer {
            flushed: Some(
                connection
                    .completer
                    .write(&connection.client, batch, &claimant.worker_ids)
                    .await,
            ),
            ..Answer::default()
        },
        WriteMode::Claim => Answer::of_claim(None, claim_alone(connection, &claim).await),
        WriteMode::Combined => match combined(connection, batch, &claim).await {
            Ok(answer) => answer,
            Err(errors) => fall_back(connection, batch, &claim, errors, false).await,
        },
        WriteMode::Transaction => match in_one_transaction(connection, batch, &claim).await {
            Ok(answer) => answer,
            Err(errors) => fall_back(connection, batch, &claim, errors, true).await,
        },
    }
}

/// The claim on its own, in its own transaction.
async fn claim_alone(connection: &Connection, claim: &ClaimRequest<'_>) -> Result<Claimed, Failed> {
    connection
        .fetcher
        .claim(&connection.client, Within::OwnTransaction, claim)
        .await
        .map_err(|error| Failed::new(&error))
}

/// Completions without retries and the claim in one statement: one message each way, one
/// commit. `Err`: the statement failed (it is its own transaction).
async fn combined(
    connection: &Connection,
    batch: &[Completion],
    claim: &ClaimRequest<'_>,
) -> Result<Answer, Vec<Failed>> {
    let written = CompletionBatch::build(batch);
    let claimed = connection
        .fetcher
        .complete_and_claim(&connection.client, &written, claim)
        .await
        .map_err(|error| vec![Failed::new(&error)])?;
    let flushed = CompletionReport::of_batch(batch, &claimed.ended);
    Ok(Answer::of_claim(Some(Ok(flushed)), Ok(claimed)))
}

/// Completions with retries, then the claim, in one transaction, so the claim sees a
/// retried job that is due at once. Polled in order by join!, so sent in this order, in
/// one round trip. `Err`: the statements' failures (PostgreSQL rolled the transaction
/// back: COMMIT answers ROLLBACK).
async fn in_one_transaction(
    connection: &Connection,
    batch: &[Completion],
    claim: &ClaimRequest<'_>,
) -> Result<Answer, Vec<Failed>> {
    let client = &connection.client;
    let begin_statement = client.begin_statement();
    let (begin, flushed, claimed, commit) = tokio::join!(
        client.batch_execute(&begin_statement),
        connection.completer.write_batch(
            client,
            batch,
            &claim.claimant.worker_ids,
            Within::OpenTransaction
        ),
        connection
            .fetcher
            .claim(client, Within::OpenTransaction, claim),
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
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Answer::of_claim(
        Some(flushed.map_err(|error| Failed::new(&error))),
        claimed.map_err(|error| Failed::new(&error)),
    ))
}

/// After the shared statement or transaction (`in_transaction`) failed: what
/// [`after_shared_write`] decides.
async fn fall_back(
    connection: &Connection,
    batch: &[Completion],
    claim: &ClaimRequest<'_>,
    errors: Vec<Failed>,
    in_transaction: bool,
) -> Answer {
    match after_shared_write(errors) {
        AfterSharedWrite::Lost(lost) => Answer {
            flushed: Some(Err(lost)),
            ..Answer::default()
        },
        AfterSharedWrite::Separately => {
            if in_transaction {
                let _ = connection.client.batch_execute("ROLLBACK").await;
            }
            separately(connection, batch, claim).await
        }
    }
}

/// The completions (batched, else one by one), then the claim, each on its own.
async fn separately(
    connection: &Connection,
    batch: &[Completion],
    claim: &ClaimRequest<'_>,
) -> Answer {
    let flushed = connection
        .completer
        .write(&connection.client, batch, &claim.claimant.worker_ids)
        .await;
    if matches!(&flushed, Err(failed) if failed.failure == Failure::Connection) {
        return Answer {
            flushed: Some(flushed),
            ..Answer::default()
        };
    }
    // Writes refused just now free their slots for this very claim (with `wait=False` a
    // short claim ends the run).
    let mut abandoned = claim.abandoned.to_vec();
    if let Ok(report) = &flushed {
        abandoned.extend(report.refused.iter().map(|(key, _)| key.0));
    }
    let claim = ClaimRequest {
        abandoned: &abandoned,
        ..*claim
    };
    Answer::of_claim(Some(flushed), claim_alone(connection, &claim).await)
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
            listen_notify: self.config.listen_notify,
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
        let mut link = Link {
            connection: self.first_set_up(client).await?,
            old_backend: None,
        };
        self.handoff
            .metrics()
            .set_connected("dispatcher", link.connection.is_some());
        let mut tickers = self.tickers();
        loop {
            if link.connection.is_none() {
                link.connection = self.reconnect(&mut state, link.old_backend.take()).await;
                self.send_events(&mut state);
                if link.connection.is_none() {
                    return Ok(());
                }
            }
            while let Ok(reported) = self.completions.try_recv() {
                state.receive(reported);
            }
            let plan = state.plan(Instant::now(), *self.stop_fetching.borrow());
            self.send_events(&mut state);
            match plan {
                Plan::Done => return Ok(()),
                Plan::Wait { until } => {
                    let input = self.next_input(&state, &mut tickers, until).await;
                    if self.on_input(input, &mut state, &mut link).await.is_break() {
                        return Ok(());
                    }
                }
                Plan::RoundTrip(plan) => self.exchange(plan, &mut state, &mut link).await,
            }
        }
    }

    /// The first set-up is tried again as any later one (see `reconnect`): lost on the
    /// way, or refused for a passing reason (a migration holding a lock on the jobs table
    /// makes the claim's prepare wait for `lock_timeout`, then fail).
    async fn first_set_up(&self, client: Db) -> CoreResult<Option<Connection>> {
        match self.prepare(client).await {
            Ok(connection) => Ok(Some(connection)),
            Err(error) if error.is_connectivity() => Ok(None),
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
                Ok(None)
            }
            Err(error) => Err(error),
        }
    }

    fn tickers(&self) -> Tickers {
        Tickers {
            poll: ticker(self.config.fetch_job_polling_interval),
            // Claims of this worker that it never heard of (a statement of a lost
            // connection that committed late) are looked for at the heartbeat's pace.
            orphan_check: ticker(
                self.config
                    .update_heartbeat_interval
                    .max(Duration::from_secs(1)),
            ),
            // An idle connection whose server process ended is seen (and replaced) at
            // once, not at the next claim, which may be a polling interval away.
            liveness: ticker(crate::registry::liveness_interval(
                self.config.response_timeout,
            )),
        }
    }

    /// While there is nothing to send: the first of the inputs that can change that.
    async fn next_input(
        &mut self,
        state: &State,
        tickers: &mut Tickers,
        until: Option<Instant>,
    ) -> Input {
        let deadline = async {
            match until {
                Some(until) => tokio::time::sleep_until(until.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            completion = self.completions.recv(), if state.completions_open() => {
                Input::Reported(completion)
            }
            _ = self.wake.notified(), if state.claiming() => Input::Wake,
            _ = tickers.poll.tick(), if state.claiming() => Input::Poll,
            _ = self.stop_fetching.changed(), if state.claiming() => Input::StopRequested,
            _ = tickers.liveness.tick() => Input::LivenessCheck,
            _ = tickers.orphan_check.tick() => Input::OrphanCheck,
            _ = deadline => Input::Deadline,
            changed = self.hard_stop.changed(), if self.hard_stop_open => {
                Input::HardStop { sender_gone: changed.is_err() }
            }
        }
    }

    /// Feed `input` to the state (`Break`: a hard stop with nothing more to come ends
    /// the dispatcher).
    async fn on_input(
        &mut self,
        input: Input,
        state: &mut State,
        link: &mut Link,
    ) -> ControlFlow<()> {
        match input {
            Input::Reported(Some(reported)) => state.receive(reported),
            Input::Reported(None) => state.on_completions_closed(Instant::now()),
            Input::Wake => state.on_wake(),
            Input::Poll => state.on_poll(),
            // The next plan sees it.
            Input::StopRequested | Input::Deadline => {}
            Input::LivenessCheck => {
                if link
                    .current()
                    .is_some_and(|current| current.client.is_closed())
                {
                    link.drop_connection(false);
                }
            }
            Input::OrphanCheck => {
                if let Some(current) = link.current() {
                    let checked = self.check_orphans(current, state).await;
                    if matches!(checked, Err(failed) if failed.failure == Failure::Connection) {
                        link.drop_connection(false);
                    }
                }
                self.send_events(state);
            }
            Input::HardStop { sender_gone } => {
                self.hard_stop_open = !sender_gone;
                if self.hard_stopped() && !state.completions_open() {
                    state.give_up("hard stop");
                    self.send_events(state);
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// One round trip of `plan`, its answer fed to the state, then its follow-ups.
    async fn exchange(&mut self, plan: RoundTripPlan, state: &mut State, link: &mut Link) {
        let Some(current) = link.current() else {
            return;
        };
        let claimant = self.identity.claimant();
        let answer = self
            .within_response_timeout(round_trip(current, &plan, &claimant))
            .await
            .ok_or_else(|| Failed::no_answer(self.config.response_timeout));
        let now = Instant::now();
        state.on_round_trip(now, plan, answer);
        let pooler_sign = current.client.transaction_pooler_sign();
        let behind_a_pooler = pooler_sign.is_some();
        if let Some(sign) = pooler_sign {
            state.on_transaction_pooler(self.pooler_not_declared(sign));
            self.carry_on_in_pooler_mode(state);
        }
        let mut lost = false;
        while let Some(follow_up) = state.next_follow_up() {
            match follow_up {
                FollowUp::Reconnect => lost = true,
                FollowUp::RegisterAgain => {
                    self.register_again(current, claimant.worker_id, now, state)
                        .await
                }
            }
        }
        self.publish(state);
        if lost || current.client.is_closed() {
            link.drop_connection(behind_a_pooler);
        }
    }

    /// This worker's row is gone (pruned as stalled, or deleted): register again.
    async fn register_again(
        &self,
        current: &Connection,
        gone: i64,
        now: Instant,
        state: &mut State,
    ) {
        let registered = self
            .identity
            .register_again(
                &current.client,
                gone,
                &self.handoff,
                "a claim found its row gone",
            )
            .await;
        if let Err(error) = registered {
            state.on_register_again_failed(now, &error.to_string(), error.is_connectivity());
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

    /// The job connection goes through a transaction pooler (PgBouncer `pool_mode =
    /// transaction`) the worker was not told of (`pooler`): the state has stopped claiming
    /// with the error that says so. The outcomes still to come are written through a new
    /// connection in pooler mode, which works there.
    fn carry_on_in_pooler_mode(&mut self, state: &mut State) {
        self.send_events(state);
        self.target = self.target.clone().through_pooler(true);
    }

    /// A round trip, bounded by `response_timeout` (a hard stop shortens the wait):
    /// `None` if no answer came in time.
    async fn within_response_timeout<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
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

    fn send_events(&self, state: &mut State) {
        for event in state.take_events() {
            self.handoff.send(event);
        }
    }

    /// Events and metrics after a round trip.
    fn publish(&self, state: &mut State) {
        let effects = state.take_effects();
        for event in effects.events {
            self.handoff.send(event);
        }
        if !effects.claimed_waits.is_empty() {
            self.handoff.metrics().waits_claimed(effects.claimed_waits);
        }
        self.in_flight_count.store(effects.held, Ordering::Relaxed);
        self.handoff.metrics().update(|metrics| {
            if !effects.claimed.is_empty() {
                state::record_claims(metrics, effects.claimed);
            }
            state::record_outcomes(metrics, effects.ended, &effects.batch_sizes);
            metrics.in_flight = effects.held as u64;
            metrics.completer_backlog = effects.backlog as u64;
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
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_RECONNECT_BACKOFF);
        let mut last_error = String::new();
        loop {
            self.take_inputs_while_disconnected(state);
            if self.hard_stopped() && !state.completions_open() {
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
            let delay = backoff.next_delay();
            // Whether the database answered, and refused the set-up (rather than being out
            // of reach).
            let refused = match attempt {
                Ok((connection, orphans)) => {
                    self.on_reconnected(state, orphans);
                    return Some(connection);
                }
                // A set-up that met another client's statement: the job connection goes
                // through a transaction pooler. Stop claiming, and go on in pooler mode
                // for the outcomes still to come (rather than failing the same way until
                // the reconnect budget is spent).
                Err(error @ CoreError::PoolerNotDeclared { .. }) => {
                    last_error = error.to_string();
                    state.fatal(error);
                    self.carry_on_in_pooler_mode(state);
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
                self.send_events(state);
            }
            self.wait_to_reconnect(state, delay).await;
        }
    }

    /// What came in since the last look, while there is no connection: outcomes, the
    /// runner closing, a stop.
    fn take_inputs_while_disconnected(&mut self, state: &mut State) {
        while let Ok(reported) = self.completions.try_recv() {
            state.receive(reported);
        }
        if self.completions.is_closed() && self.completions.is_empty() {
            state.on_completions_closed(Instant::now());
        }
        if *self.stop_fetching.borrow() || self.hard_stopped() {
            // The runner waits for this before it stops: never behind a reconnect.
            state.stop_claiming();
            self.send_events(state);
        }
    }

    fn on_reconnected(&self, state: &mut State, orphans: Vec<JobRow>) {
        self.handoff.metrics().set_connected("dispatcher", true);
        self.handoff.log(
            LogLevel::Info,
            "dispatcher_reconnected",
            format!("Reconnected to {}", self.target.description()),
        );
        state.on_reconnected(orphans);
        self.publish(state);
    }

    /// The backoff's `delay`, cut short by a stop request (while claiming), a hard stop or
    /// outcomes from the runner.
    async fn wait_to_reconnect(&mut self, state: &mut State, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = became_true(self.stop_fetching.clone()), if state.claiming() => {}
            changed = self.hard_stop.changed(), if self.hard_stop_open => {
                self.hard_stop_open = changed.is_ok();
            }
            completion = self.completions.recv(), if state.completions_open() => match completion {
                Some(reported) => state.receive(reported),
                None => state.on_completions_closed(Instant::now()),
            },
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
            _ = became_true(self.stop_fetching.clone()), if state.claiming() => None,
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
                .orphaned_claims(&connection.client, &state.orphan_query())
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
            // A plain sleep, not a ticker: the check above is a round trip of its own, and
            // the loop is bounded by OLD_BACKEND_WAIT rather than run for the worker's life.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn orphaned_claims(
        &self,
        client: &Db,
        known: &OrphanQuery,
    ) -> Result<Vec<JobRow>, tokio_postgres::Error> {
        let workers = self.identity.all();
        let rows = client
            .query(
                sql::ORPHANED_CLAIMS,
                &[&workers, &known.ids, &known.attempts, &known.abandoned],
            )
            .await?;
        let orphans = rows
            .iter()
            .map(JobRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(crate::fetcher::in_start_order(orphans))
    }

    /// Between round trips (nothing in flight on this connection, so every claim it made
    /// is known), the queries [`State::orphan_check`] asks for: hand over claims of this
    /// worker nobody knew of, give back to this worker the running claims that lost their
    /// worker row, cancel the runs of claims that are no longer this worker's, and forget
    /// abandoned jobs that are no longer `doing` for it.
    async fn check_orphans(
        &self,
        connection: &Connection,
        state: &mut State,
    ) -> Result<(), Failed> {
        let client = &connection.client;
        let check = state.orphan_check();
        let queries = async {
            let orphans = self.orphaned_claims(client, &check.orphans).await?;
            let lost = match &check.running {
                Some((ids, attempts)) => self.lost_claims(client, ids, attempts).await?,
                None => Vec::new(),
            };
            let still_abandoned = match &check.abandoned {
                Some(abandoned) => Some(
                    query_ids(
                        client,
                        sql::STILL_ABANDONED,
                        &[&self.identity.all(), abandoned],
                    )
                    .await?,
                ),
                None => None,
            };
            Ok::<_, tokio_postgres::Error>(OrphanFindings {
                orphans,
                lost,
                still_abandoned,
            })
        };
        let answer = tokio::time::timeout(self.config.response_timeout, queries).await;
        let found = match answer {
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
        state.on_orphan_check(found);
        self.publish(state);
        Ok(())
    }

    /// Of the running claims (`ids`, `attempts`), give back to this worker those whose
    /// worker row is gone; the claims that are no longer this worker's.
    async fn lost_claims(
        &self,
        client: &Db,
        ids: &Vec<i64>,
        attempts: &Vec<i32>,
    ) -> Result<Vec<ClaimKey>, tokio_postgres::Error> {
        let reattached = query_ids(
            client,
            sql::REATTACH_CLAIMS,
            &[ids, attempts, &self.identity.current()],
        )
        .await?;
        if !reattached.is_empty() {
            self.handoff.log(
                LogLevel::Warning,
                "claims_reattached",
                format!(
                    "Jobs {reattached:?} run here had lost their worker (this worker's row \
                     was deleted); they are worker {}'s again",
                    self.identity.current()
                ),
            );
        }
        query_claims(
            client,
            sql::LOST_CLAIMS,
            &[ids, attempts, &self.identity.all()],
        )
        .await
    }
}

/// Once the flag is (or turns) true; never if its sender is gone first.
async fn became_true(mut flag: watch::Receiver<bool>) {
    if flag.wait_for(|set| *set).await.is_err() {
        std::future::pending::<()>().await;
    }
}
