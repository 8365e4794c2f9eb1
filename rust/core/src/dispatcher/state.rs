//! The dispatcher's decisions, without PostgreSQL: what it holds, what to send next, and
//! what each answer (or failure) changes. The async shell in [`super`] feeds inputs to the
//! named transitions here (`receive`, `on_wake`, `on_round_trip`, `on_orphan_check`, ...),
//! asks what to do next ([`State::plan`], whose wait carries the next deadline, and
//! [`State::next_follow_up`]), and takes the effects ([`State::take_events`],
//! [`State::take_effects`]). Its fields are its own: the shell never pokes them.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::completer::CompletionReport;
use crate::errors::{CoreError, Failed, Failure};
use crate::fetcher::{Claimed, QueueRoom, ScheduleLook};
use crate::metrics::{Histogram, Labels, MetricsSnapshot, PendingWait, TaskQueue};
use crate::protocol::{
    ClaimKey, Completion, HandoffEvent, JobRow, LogLevel, LogRecord, Outcome, Reported,
};
use crate::sql::UNREPRESENTABLE_SCHEDULED_AT;
use crate::timing::{Backoff, FIRST_BACKOFF, MAX_BACKOFF};

/// The first wait before a delayed completion (its row locked, its statement cancelled) is
/// sent again; it doubles with each failure, up to [`MAX_BACKOFF`].
const FIRST_DELAY_OF_A_COMPLETION: Duration = Duration::from_millis(100);

/// The settings the decisions depend on.
#[derive(Clone, Debug)]
pub struct Settings {
    pub concurrency: usize,
    pub max_batch_size: usize,
    pub wait: bool,
    pub queue_limits: HashMap<String, usize>,
    /// `max_jobs`: the most jobs to claim in all, then stop as a drain does.
    pub max_jobs: Option<u64>,
    /// How long the database may be unreachable or refuse every statement before the
    /// worker gives up claiming (a fatal error for the runner).
    pub budget: Duration,
    /// For error messages.
    pub target: String,
    /// The metric labels of task and queue names.
    pub labels: Labels,
    /// Note each claimed job for the measure of its wait (metrics are served).
    pub sample_waits: bool,
    /// Notifications tell of new jobs (`listen_notify`); without them every poll may also
    /// find jobs scheduled for later.
    pub listen_notify: bool,
}

/// Claims handed to the runner and not yet ended in the database, with per-queue counts
/// for the queues that have a concurrency limit.
pub struct InFlight {
    jobs: HashMap<ClaimKey, Held>,
    /// The attempts of the latest claim of each job held (a job recovered elsewhere and
    /// claimed again may be held twice, under two claims, until the old run ends).
    latest: HashMap<i64, i32>,
    held: HashMap<String, usize>,
    limits: HashMap<String, usize>,
    /// The metric labels of task and queue names, shared by all the jobs that have them
    /// (a queue with a limit keeps its own name as its label).
    labels: Labels,
}

struct Held {
    task_queue: TaskQueue,
    limited: bool,
    /// It holds a `lock`: its end lets the lock's next job run, maybe one scheduled later.
    locked: bool,
}

impl InFlight {
    pub fn new(limits: HashMap<String, usize>, capacity: usize, labels: Labels) -> Self {
        InFlight {
            // `capacity` is the concurrency, which may be huge ("unbounded", as procrastinate
            // allows): reserve for a sensible number of jobs, grow beyond that if needed.
            jobs: HashMap::with_capacity(capacity.min(1024)),
            latest: HashMap::with_capacity(capacity.min(1024)),
            held: HashMap::new(),
            limits,
            labels,
        }
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn contains(&self, key: &ClaimKey) -> bool {
        self.jobs.contains_key(key)
    }

    /// Whether the claim holds a `lock`.
    pub fn holds_lock(&self, key: &ClaimKey) -> bool {
        self.jobs.get(key).is_some_and(|held| held.locked)
    }

    /// Hold a claim. Returns the job's task and queue, and the claim of the same job that
    /// it replaces, if any: that one is lost (the job moved on without this worker).
    pub fn insert(&mut self, job: &JobRow) -> (TaskQueue, Option<ClaimKey>) {
        let replaced = self
            .latest
            .insert(job.id, job.attempts)
            .filter(|attempts| *attempts != job.attempts)
            .map(|attempts| (job.id, attempts));
        let limited = self.limits.contains_key(&job.queue_name);
        let task_queue = (
            self.labels.task(&job.task_name),
            self.labels.queue(&job.queue_name),
        );
        let held = Held {
            task_queue: task_queue.clone(),
            limited,
            locked: job.lock.is_some(),
        };
        if self.jobs.insert((job.id, job.attempts), held).is_none() && limited {
            *self.held.entry(job.queue_name.clone()).or_default() += 1;
        }
        (task_queue, replaced)
    }

    /// The job's task and queue, whether the queue is limited, and whether it held a lock.
    pub fn remove(&mut self, key: &ClaimKey) -> Option<(TaskQueue, bool, bool)> {
        let held = self.jobs.remove(key)?;
        if self.latest.get(&key.0) == Some(&key.1) {
            self.latest.remove(&key.0);
        }
        if held.limited {
            if let Some(count) = self.held.get_mut(&*held.task_queue.1) {
                *count = count.saturating_sub(1);
            }
        }
        Some((held.task_queue, held.limited, held.locked))
    }

    /// The claims it holds, as parallel arrays (job ids, attempts at claim).
    pub fn keys(&self) -> (Vec<i64>, Vec<i32>) {
        self.jobs.keys().copied().unzip()
    }

    pub fn keys_iter(&self) -> impl Iterator<Item = ClaimKey> + '_ {
        self.jobs.keys().copied()
    }

    /// Room per limited queue once `pending` completions are written.
    pub fn room_after(&self, pending: &[Completion]) -> QueueRoom {
        if self.limits.is_empty() {
            return QueueRoom::default();
        }
        let mut held = self.held.clone();
        for completion in pending {
            if let Some(job) = self.jobs.get(&completion.key()) {
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

/// A completion whose write failed for a passing reason, to be sent again.
struct Later {
    due: Instant,
    completion: Completion,
}

/// The database has been unusable since `since`: the next attempt waits until `retry_at`.
#[derive(Clone, Copy, Debug)]
struct Trouble {
    since: Instant,
    backoff: Backoff,
    retry_at: Instant,
}

/// What to do next.
#[derive(Debug, PartialEq)]
pub enum Plan {
    /// Send these completions and claim up to `claim_limit` jobs within `room`.
    RoundTrip(RoundTripPlan),
    /// Nothing to send: wait for a completion, a wake-up, a poll, or `until`.
    Wait { until: Option<Instant> },
    /// Every completion is written and no more can come.
    Done,
}

#[derive(Debug, PartialEq)]
pub struct RoundTripPlan {
    pub batch: Vec<Completion>,
    pub claim_limit: usize,
    pub room: QueueRoom,
    pub abandoned: Vec<i64>,
    /// The claim also looks when the earliest job scheduled for later is due, if it comes
    /// back short: something may have changed the schedule since the last look.
    pub look_at_schedule: bool,
}

/// How a round trip sends its completions and its claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteMode {
    /// Nothing to send.
    Nothing,
    /// Only completions.
    Completions,
    /// Only a claim.
    Claim,
    /// Both in one statement: one message each way, one commit (one WAL flush), and the
    /// claim counts the locks and slots the completions free.
    Combined,
    /// Both, with retries among the completions: two statements pipelined in one
    /// transaction, so the claim sees a retried job that is due at once.
    Transaction,
}

impl RoundTripPlan {
    /// How to send this plan.
    pub fn write_mode(&self) -> WriteMode {
        let retries = || {
            self.batch
                .iter()
                .any(|completion| matches!(completion.outcome, Outcome::Retry { .. }))
        };
        match (self.batch.is_empty(), self.claim_limit == 0) {
            (true, true) => WriteMode::Nothing,
            (false, true) => WriteMode::Completions,
            (true, false) => WriteMode::Claim,
            (false, false) if retries() => WriteMode::Transaction,
            (false, false) => WriteMode::Combined,
        }
    }
}

/// What is left to do after the shared statement (or transaction) of completions and claim
/// failed.
#[derive(Debug, PartialEq)]
pub enum AfterSharedWrite {
    /// The connection was lost: committed or not, nobody can tell. The completions go
    /// again on a new connection (conditioned on their claims, so harmless if written),
    /// and the claims it may have made are looked for as orphans.
    Lost(Failed),
    /// A statement was refused, so nothing was written (rolled back): redo the steps on
    /// their own, where a bad completion cannot hold back the others.
    Separately,
}

/// The fallback of a round trip whose shared statement or transaction failed with `errors`.
pub fn after_shared_write(errors: impl IntoIterator<Item = Failed>) -> AfterSharedWrite {
    errors
        .into_iter()
        .find(|failed| failed.failure == Failure::Connection)
        .map_or(AfterSharedWrite::Separately, AfterSharedWrite::Lost)
}

/// What a round trip answered: `None` where that step was not sent.
#[derive(Debug, Default)]
pub struct Answer {
    pub flushed: Option<Result<CompletionReport, Failed>>,
    pub claimed: Option<Result<Vec<JobRow>, Failed>>,
    /// The claim's look at the schedule.
    pub schedule: ScheduleLook,
}

impl Answer {
    /// The answer of a round trip that sent a claim (and `flushed`, if it also wrote).
    pub fn of_claim(
        flushed: Option<Result<CompletionReport, Failed>>,
        claimed: Result<Claimed, Failed>,
    ) -> Answer {
        let (claimed, schedule) = match claimed {
            Ok(claimed) => (Ok(claimed.jobs), claimed.schedule),
            Err(failed) => (Err(failed), ScheduleLook::NotMade),
        };
        Answer {
            flushed,
            claimed: Some(claimed),
            schedule,
        }
    }
}

/// What the shell does after a round trip, before the next plan.
#[derive(Debug, PartialEq, Eq)]
pub enum FollowUp {
    /// The connection is lost or dead: replace it (then look for orphaned claims).
    Reconnect,
    /// This worker's row is gone: register again before claiming.
    RegisterAgain,
}

/// Follow-ups found by the transitions of one round trip.
#[derive(Debug, Default)]
struct Needs {
    reconnect: bool,
    register_again: bool,
}

/// The arguments of the query for orphaned claims: this worker's claims the dispatcher
/// knows (job ids and attempts), and the abandoned jobs (not orphans either).
#[derive(Debug, PartialEq)]
pub struct OrphanQuery {
    pub ids: Vec<i64>,
    pub attempts: Vec<i32>,
    pub abandoned: Vec<i64>,
}

/// The queries of a check between round trips; `None` where there is nothing to ask.
#[derive(Debug, PartialEq)]
pub struct OrphanCheck {
    pub orphans: OrphanQuery,
    /// The running claims (ids, attempts): which lost their worker row, which are no
    /// longer this worker's.
    pub running: Option<(Vec<i64>, Vec<i32>)>,
    /// The abandoned jobs: which are still `doing` for this worker.
    pub abandoned: Option<Vec<i64>>,
}

/// What the check between round trips found.
#[derive(Debug, Default)]
pub struct OrphanFindings {
    pub orphans: Vec<JobRow>,
    pub lost: Vec<ClaimKey>,
    pub still_abandoned: Option<Vec<i64>>,
}

/// What the shell applies: events for the runner, then metrics changes.
#[derive(Debug, Default)]
pub struct Effects {
    pub events: Vec<HandoffEvent>,
    pub claimed: Vec<TaskQueue>,
    /// Claimed jobs whose wait is to be measured (`sample_waits`).
    pub claimed_waits: Vec<PendingWait>,
    pub ended: Vec<Ended>,
    pub batch_sizes: Vec<usize>,
    /// Claims held now, and outcomes not written yet.
    pub held: usize,
    pub backlog: usize,
}

pub struct State {
    settings: Settings,
    in_flight: InFlight,
    /// Reported, not yet written, ready to send.
    pending: Vec<Completion>,
    /// Failed for a passing reason: sent again when due.
    later: Vec<Later>,
    /// How long each reported job ran (only for the metrics).
    durations: HashMap<ClaimKey, f64>,
    /// Completions that were sent when the connection broke: they may have been written.
    maybe_written: HashSet<ClaimKey>,
    /// How many times each delayed completion failed so far (for its backoff).
    delays: HashMap<ClaimKey, u32>,
    /// Claims already reported lost (see `on_claims_lost`).
    lost_reported: HashSet<ClaimKey>,
    /// Jobs whose terminal write the database refused (procrastinate's worker gets the
    /// error and moves on): still `doing` for this worker, but their slot is free again,
    /// and they are not orphans to hand over after a reconnect.
    abandoned: Vec<i64>,
    claiming: bool,
    /// Jobs handed over so far (for `max_jobs`).
    handed_over: u64,
    /// When the earliest job scheduled for later becomes claimable (see
    /// [`State::on_schedule_look`]): a claim is due then, whatever the polling interval.
    next_scheduled: Option<Instant>,
    /// Something may have changed what is scheduled since the last look (a notification,
    /// a write of this worker's, the start): the next claim looks again if it comes back
    /// short.
    schedule_changed: bool,
    want_claim: bool,
    completions_open: bool,
    /// A claim came back short because a limited queue was full: claim again as soon as
    /// a job of a limited queue completes.
    claim_when_queue_frees: bool,
    trouble: Option<Trouble>,
    fatal_sent: bool,
    /// When the runner closed the completions (shutdown): the last outcomes get one more
    /// budget of attempts from then.
    closed_at: Option<Instant>,
    /// Follow-ups of the current round trip (see [`State::next_follow_up`]).
    needs: Needs,
    outbox: Vec<HandoffEvent>,
    /// Metrics changes, applied by the shell.
    claimed_metrics: Vec<TaskQueue>,
    claimed_waits: Vec<PendingWait>,
    ended_metrics: Vec<Ended>,
    batch_sizes: Vec<usize>,
}

impl State {
    pub fn new(settings: Settings) -> State {
        let in_flight = InFlight::new(
            settings.queue_limits.clone(),
            settings.concurrency,
            settings.labels.clone(),
        );
        State {
            settings,
            in_flight,
            pending: Vec::new(),
            later: Vec::new(),
            durations: HashMap::new(),
            maybe_written: HashSet::new(),
            delays: HashMap::new(),
            lost_reported: HashSet::new(),
            abandoned: Vec::new(),
            claiming: true,
            handed_over: 0,
            next_scheduled: None,
            schedule_changed: true,
            want_claim: true,
            completions_open: true,
            claim_when_queue_frees: false,
            trouble: None,
            fatal_sent: false,
            closed_at: None,
            needs: Needs::default(),
            outbox: Vec::new(),
            claimed_metrics: Vec::new(),
            claimed_waits: Vec::new(),
            ended_metrics: Vec::new(),
            batch_sizes: Vec::new(),
        }
    }

    fn log(&mut self, level: LogLevel, action: &'static str, message: String, job_id: Option<i64>) {
        self.outbox.push(HandoffEvent::Log(LogRecord {
            level,
            action,
            message,
            job_id,
        }));
    }

    /// Whether it still claims (else it only writes outcomes).
    pub fn claiming(&self) -> bool {
        self.claiming
    }

    /// Whether the runner may still report outcomes.
    pub fn completions_open(&self) -> bool {
        self.completions_open
    }

    /// The events for the runner so far.
    pub fn take_events(&mut self) -> Vec<HandoffEvent> {
        std::mem::take(&mut self.outbox)
    }

    /// The events for the runner and the metrics changes so far.
    pub fn take_effects(&mut self) -> Effects {
        Effects {
            events: self.take_events(),
            claimed: std::mem::take(&mut self.claimed_metrics),
            claimed_waits: std::mem::take(&mut self.claimed_waits),
            ended: std::mem::take(&mut self.ended_metrics),
            batch_sizes: std::mem::take(&mut self.batch_sizes),
            held: self.in_flight.len(),
            backlog: self.backlog(),
        }
    }

    /// Outcomes from the runner.
    pub fn receive(&mut self, reported: Reported) {
        if reported.durations.len() == reported.completions.len() {
            for (completion, seconds) in reported.completions.iter().zip(&reported.durations) {
                self.durations.insert(completion.key(), *seconds);
            }
        }
        self.pending.extend(reported.completions);
    }

    /// The runner will report nothing more (it is shutting down).
    pub fn on_completions_closed(&mut self, now: Instant) {
        self.completions_open = false;
        self.closed_at.get_or_insert(now);
    }

    /// Stop claiming, for good (a stop request, the runner gone, a fatal error).
    pub fn stop_claiming(&mut self) {
        if self.claiming {
            self.claiming = false;
            self.outbox.push(HandoffEvent::FetchingStopped);
        }
    }

    /// Outcomes not written yet, whatever the reason.
    pub fn unwritten(&self) -> Vec<i64> {
        self.pending
            .iter()
            .map(|completion| completion.job_id)
            .chain(self.later.iter().map(|later| later.completion.job_id))
            .collect()
    }

    /// No more attempts (the budget is spent, or a hard stop): say which outcomes are lost.
    pub fn give_up(&mut self, why: &str) {
        let unwritten = self.unwritten();
        if !unwritten.is_empty() {
            self.log(
                LogLevel::Error,
                "finish_task_failed",
                format!(
                    "Could not record the end of jobs {unwritten:?} ({why}): they stay in \
                     doing, for stalled-job recovery"
                ),
                None,
            );
        }
        self.pending.clear();
        self.later.clear();
    }

    pub fn backlog(&self) -> usize {
        self.pending.len() + self.later.len()
    }

    /// Whether the shell should keep trying to reach the database: someone may still need
    /// it, and the last outcomes have not used up their budget after the runner closed.
    pub fn worth_reconnecting(&self, now: Instant) -> bool {
        if self.completions_open {
            return true;
        }
        let outcomes_left = !self.pending.is_empty() || !self.later.is_empty();
        let within_budget = self
            .closed_at
            .is_none_or(|closed| now.duration_since(closed) < self.settings.budget);
        outcomes_left && within_budget
    }

    /// Decide the next step.
    pub fn plan(&mut self, now: Instant, stop_requested: bool) -> Plan {
        if self.claiming && (!self.completions_open || stop_requested) {
            // Nobody could run (or complete) what would be claimed now.
            self.stop_claiming();
        }
        let mut due = Vec::new();
        self.later.retain(|later| {
            if later.due <= now {
                due.push(later.completion.clone());
                false
            } else {
                true
            }
        });
        self.pending.extend(due);
        if self.next_scheduled.is_some_and(|at| at <= now) {
            // A job scheduled for now: claim it, and look for the next one after.
            self.next_scheduled = None;
            self.want_claim = true;
            self.schedule_changed = true;
        }
        let next_later = self
            .later
            .iter()
            .map(|later| later.due)
            .chain(self.next_scheduled.filter(|_| self.claiming))
            .min();
        if !self.completions_open && self.pending.is_empty() && self.later.is_empty() {
            return Plan::Done;
        }
        if !self.worth_reconnecting(now) {
            self.give_up("the database refused them for longer than the reconnect budget");
            return Plan::Done;
        }
        if let Some(trouble) = self.trouble {
            if now < trouble.retry_at {
                return Plan::Wait {
                    until: Some(next_later.map_or(trouble.retry_at, |t| t.min(trouble.retry_at))),
                };
            }
        }
        if !self.pending.is_empty() {
            // Every completion frees a slot and maybe a lock, and a retry may be due at
            // once: claim in the same round trip, even after a short claim (no
            // notification tells of a lock successor or a retried job).
            self.want_claim = true;
        }
        let ending_held = self
            .pending
            .iter()
            .filter(|completion| self.in_flight.contains(&completion.key()))
            .count();
        let held_after_flush = self.in_flight.len().saturating_sub(ending_held);
        let claim_limit = if self.claiming && self.want_claim {
            self.settings
                .concurrency
                .saturating_sub(held_after_flush)
                .min(self.claim_cap())
                .min(self.jobs_left())
        } else {
            0
        };
        if self.pending.is_empty() && claim_limit == 0 {
            return Plan::Wait { until: next_later };
        }
        let batch = self.take_batch();
        let room = self.in_flight.room_after(&batch);
        let look_at_schedule = claim_limit > 0 && self.schedule_may_change(&batch);
        Plan::RoundTrip(RoundTripPlan {
            batch,
            claim_limit,
            room,
            abandoned: self.abandoned.clone(),
            look_at_schedule,
        })
    }

    fn connection_lost(&mut self, what: &str, reason: &str) {
        self.log(
            LogLevel::Warning,
            "dispatcher_connection_lost",
            format!(
                "Connection to {} lost while {what} ({reason}); reconnecting",
                self.settings.target
            ),
            None,
        );
    }

    /// The pending completions, but at most one per job: the statements pick each job's
    /// values by its id. (Two claims of one job can end close together: a run of a claim
    /// lost to a recovery elsewhere, and the run of the job's new claim.)
    fn take_batch(&mut self) -> Vec<Completion> {
        let mut seen = HashSet::with_capacity(self.pending.len());
        let (batch, again): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|completion| seen.insert(completion.job_id));
        self.pending = again;
        batch
    }

    /// The claims whose runs have not reported their end yet.
    fn running_claims(&self) -> Vec<ClaimKey> {
        let reported: HashSet<ClaimKey> = self
            .pending
            .iter()
            .chain(self.later.iter().map(|later| &later.completion))
            .map(Completion::key)
            .chain(self.maybe_written.iter().copied())
            .collect();
        self.in_flight
            .keys_iter()
            .filter(|key| !reported.contains(key))
            .collect()
    }

    /// These claims are no longer current (the job moved on without this worker): their
    /// runs are cancelled. Their slots are freed when their ends are reported.
    pub fn on_claims_lost(&mut self, lost: Vec<ClaimKey>) {
        let lost: Vec<ClaimKey> = lost
            .into_iter()
            .filter(|key| self.lost_reported.insert(*key))
            .collect();
        if lost.is_empty() {
            return;
        }
        self.log(
            LogLevel::Warning,
            "claims_lost",
            format!(
                "The claims of jobs {:?} are no longer this worker's (recovered by another \
                 worker after this one was pruned, or ended meanwhile): cancelling their runs",
                lost.iter().map(|key| key.0).collect::<Vec<_>>()
            ),
            None,
        );
        self.outbox.push(HandoffEvent::ClaimsLost(lost));
    }

    /// The database answered: it is usable again.
    fn recovered(&mut self) {
        self.trouble = None;
    }

    /// A statement failed for a passing reason (or the connection could not be set up):
    /// back off, and give up claiming once the budget is spent.
    pub fn on_trouble(&mut self, now: Instant, what: &str, reason: &str) {
        let mut trouble = self.trouble.unwrap_or(Trouble {
            since: now,
            backoff: Backoff::new(FIRST_BACKOFF, MAX_BACKOFF),
            retry_at: now,
        });
        let delay = trouble.backoff.next_delay();
        trouble.retry_at = now + delay;
        self.trouble = Some(trouble);
        self.log(
            LogLevel::Warning,
            "dispatcher_statement_failed",
            format!(
                "Error {what} ({reason}); trying again in {:.2} s",
                delay.as_secs_f64()
            ),
            None,
        );
        if now.duration_since(trouble.since) > self.settings.budget {
            self.fatal(CoreError::Unusable {
                target: self.settings.target.clone(),
                budget: self.settings.budget,
                reason: reason.to_string(),
            });
        }
    }

    /// The worker cannot go on claiming: tell the runner (once), stop claiming, and keep
    /// writing whatever outcomes come.
    pub fn fatal(&mut self, error: CoreError) {
        if !self.fatal_sent {
            self.fatal_sent = true;
            self.outbox.push(HandoffEvent::Fatal(error));
        }
        self.stop_claiming();
    }

    pub fn fatal_sent(&self) -> bool {
        self.fatal_sent
    }

    /// The completions of `batch` were sent and the answer is `flushed`.
    fn on_flushed(
        &mut self,
        now: Instant,
        batch: Vec<Completion>,
        flushed: Result<CompletionReport, Failed>,
    ) {
        let report = match flushed {
            Ok(report) => report,
            Err(failed) => {
                // Nothing is known to be written: all of it goes again. After a lost
                // connection it may have been written; the writes are conditioned on their
                // claims, so sending them again is harmless.
                if failed.failure == Failure::Connection {
                    self.maybe_written.extend(batch.iter().map(Completion::key));
                    self.connection_lost("completing jobs", &failed.reason);
                    self.needs.reconnect = true;
                } else {
                    self.on_trouble(now, "completing jobs", &failed.reason);
                }
                let mut again = batch;
                again.append(&mut self.pending);
                self.pending = again;
                return;
            }
        };
        self.recovered();
        self.batch_sizes.push(batch.len());
        // Each claim's outcome, looked up once per batch (not once per ended claim).
        let outcomes: HashMap<ClaimKey, &Outcome> = batch
            .iter()
            .map(|completion| (completion.key(), &completion.outcome))
            .collect();
        for key in &report.written {
            self.maybe_written.remove(key);
            self.ended(key, outcomes.get(key).copied());
        }
        for key in &report.not_current {
            let lost = self.lost_reported.contains(key);
            self.ended(key, outcomes.get(key).copied());
            if lost {
                self.log(
                    LogLevel::Info,
                    "finish_task_lost_claim",
                    format!(
                        "The end of job {}'s run under a claim that was no longer this \
                         worker's is not written",
                        key.0
                    ),
                    Some(key.0),
                );
            } else if self.maybe_written.remove(key) {
                self.log(
                    LogLevel::Debug,
                    "finish_task_already_written",
                    format!(
                        "The end of job {} was already written before the connection was lost",
                        key.0
                    ),
                    Some(key.0),
                );
            } else {
                self.log(
                    LogLevel::Error,
                    "finish_task_failed",
                    format!(
                        "Job was not found or not in \"doing\" status (job id: {})",
                        key.0
                    ),
                    Some(key.0),
                );
            }
        }
        for (key, reason) in report.refused {
            self.maybe_written.remove(&key);
            self.ended(&key, outcomes.get(&key).copied());
            self.log(LogLevel::Error, "finish_task_failed", reason, Some(key.0));
            self.abandoned.push(key.0);
        }
        for completion in report.retry_later {
            let failures = self.delays.entry(completion.key()).or_default();
            *failures += 1;
            let failures = *failures;
            if failures == 1 {
                self.log(
                    LogLevel::Warning,
                    "finish_task_delayed",
                    format!(
                        "Could not write the end of job {} for now (its row is locked by \
                         another session, or the statement was cancelled); trying again",
                        completion.job_id
                    ),
                    Some(completion.job_id),
                );
            }
            self.later.push(Later {
                due: now + Backoff::step_after(FIRST_DELAY_OF_A_COMPLETION, MAX_BACKOFF, failures),
                completion,
            });
        }
    }

    /// A claim ended in the database: free its slot, count it.
    fn ended(&mut self, key: &ClaimKey, outcome: Option<&Outcome>) {
        self.delays.remove(key);
        self.lost_reported.remove(key);
        let Some((task_queue, limited, locked)) = self.in_flight.remove(key) else {
            return;
        };
        let retried = matches!(outcome, Some(Outcome::Retry { .. }));
        if locked || retried {
            // Its lock's next job, or its own retry, may be scheduled for later.
            self.schedule_changed = true;
        }
        if limited && self.claim_when_queue_frees {
            self.claim_when_queue_frees = false;
            self.want_claim = true;
        }
        let duration = self.durations.remove(key);
        let label = outcome.map_or("failed", outcome_label);
        self.ended_metrics.push((task_queue, label, duration));
    }

    /// The claim of a round trip answered `claimed` (asked: `limit` jobs within `room`).
    fn on_claimed(
        &mut self,
        now: Instant,
        limit: usize,
        room: &QueueRoom,
        claimed: Result<Vec<JobRow>, Failed>,
    ) {
        let jobs = match claimed {
            Ok(jobs) => jobs,
            Err(failed) => {
                self.want_claim = true;
                match failed.failure {
                    Failure::Connection => {
                        self.connection_lost("claiming jobs", &failed.reason);
                        self.needs.reconnect = true;
                    }
                    Failure::Pruned => self.needs.register_again = true,
                    Failure::Refused | Failure::Transient => {
                        self.on_trouble(now, "claiming jobs", &failed.reason)
                    }
                }
                return;
            }
        };
        self.recovered();
        let full = jobs.len() == limit;
        // With queue limits a claim can come back short while other queues still have
        // jobs: go on while claims make progress.
        let limited_progress = !room.is_empty() && !jobs.is_empty();
        self.want_claim = full || limited_progress;
        self.claim_when_queue_frees = !full && !room.full.is_empty();
        // `wait=False` stops once nothing is claimable and nothing runs: a running job may
        // still free a lock, retry at once or defer follow-up jobs, and every completion
        // claims again in its round trip (procrastinate stops at the first empty fetch).
        let drained = !self.settings.wait
            && !full
            && !limited_progress
            && room.full.is_empty()
            && jobs.is_empty()
            && self.in_flight.is_empty();
        if !self.abandoned.is_empty() {
            // Claimed again: its refused write had in fact gone through before a
            // connection loss (it was back in `todo`). It holds a slot again.
            self.abandoned
                .retain(|job_id| !jobs.iter().any(|job| job.id == *job_id));
        }
        self.hand_over(jobs);
        if self.claiming && self.jobs_left() == 0 {
            self.log(
                LogLevel::Info,
                "max_jobs_reached",
                format!(
                    "Claimed max_jobs={} jobs: claiming no more; the worker stops once they end",
                    self.handed_over
                ),
                None,
            );
            self.outbox.push(HandoffEvent::Drained);
            self.stop_claiming();
        } else if drained && self.claiming {
            self.outbox.push(HandoffEvent::Drained);
            self.stop_claiming();
        }
    }

    /// The round trip of `plan` answered (`Err`: no answer in time, the connection is
    /// taken for dead, half-open).
    pub fn on_round_trip(
        &mut self,
        now: Instant,
        plan: RoundTripPlan,
        answer: Result<Answer, Failed>,
    ) {
        match answer {
            Ok(Answer {
                flushed,
                claimed,
                schedule,
            }) => {
                if let Some(flushed) = flushed {
                    self.on_flushed(now, plan.batch, flushed);
                }
                if let Some(claimed) = claimed {
                    self.on_claimed(now, plan.claim_limit, &plan.room, claimed);
                }
                // After the ends: the look saw what they change (a lock's successor
                // scheduled later, a retry), in the same statement or transaction.
                self.on_schedule_look(now, schedule);
            }
            Err(no_answer) => {
                self.on_flushed(now, plan.batch, Err(no_answer));
                self.needs.reconnect = true;
            }
        }
    }

    /// The next thing to do after a round trip, until `None`. A lost connection comes
    /// first, and drops the rest: they are for a live connection.
    pub fn next_follow_up(&mut self) -> Option<FollowUp> {
        if self.needs.reconnect {
            self.needs = Needs::default();
            return Some(FollowUp::Reconnect);
        }
        if std::mem::take(&mut self.needs.register_again) {
            return Some(FollowUp::RegisterAgain);
        }
        None
    }

    /// Registering again failed: back off as for any refused statement; a lost connection
    /// is replaced.
    pub fn on_register_again_failed(&mut self, now: Instant, reason: &str, connection_lost: bool) {
        self.on_trouble(now, "registering the worker again", reason);
        self.needs.reconnect |= connection_lost;
    }

    /// A statement prepared on the job connection was lost on the server, or another
    /// client's of the same name was found there: a transaction pooler is in between, and
    /// the worker was not told. Claims would fail (or worse, meet another client's
    /// statement) for ever: stop claiming with `error`, which says what to do, and replace
    /// the connection (the shell goes on in pooler mode for the outcomes still to come).
    pub fn on_transaction_pooler(&mut self, error: CoreError) {
        self.fatal(error);
        self.needs.reconnect = true;
    }

    /// The arguments of the query for orphaned claims.
    pub fn orphan_query(&self) -> OrphanQuery {
        let (ids, attempts) = self.in_flight.keys();
        OrphanQuery {
            ids,
            attempts,
            abandoned: self.abandoned.clone(),
        }
    }

    /// The queries of a check between round trips (nothing in flight on the connection,
    /// so every claim it made is known): orphaned claims always; the running claims'
    /// worker and currency if any run; the abandoned jobs' status if any.
    pub fn orphan_check(&self) -> OrphanCheck {
        let running = self.running_claims();
        OrphanCheck {
            orphans: self.orphan_query(),
            running: (!running.is_empty()).then(|| running.into_iter().unzip()),
            abandoned: (!self.abandoned.is_empty()).then(|| self.abandoned.clone()),
        }
    }

    /// What the check between round trips found: orphans are handed over, lost claims'
    /// runs cancelled, abandoned jobs no longer `doing` here forgotten.
    pub fn on_orphan_check(&mut self, found: OrphanFindings) {
        if let Some(still) = found.still_abandoned {
            self.keep_abandoned(&still);
        }
        self.on_claims_lost(found.lost);
        if !found.orphans.is_empty() {
            self.on_reconnected(found.orphans);
        }
    }

    /// A poll of `fetch_job_polling_interval`: claim. Without notifications, every poll
    /// may also find jobs scheduled for later.
    pub fn on_poll(&mut self) {
        if self.settings.listen_notify {
            self.want_claim = true;
        } else {
            self.on_wake();
        }
    }

    /// Whether a claim sent with `batch` should look at the schedule: something may have
    /// changed it since the last look, or the batch ends a job that held a lock (its next
    /// job may be scheduled later) or retries one. An idle worker whose polls find nothing
    /// does not look again.
    fn schedule_may_change(&self, batch: &[Completion]) -> bool {
        self.schedule_changed
            || batch.iter().any(|completion| {
                matches!(completion.outcome, Outcome::Retry { .. })
                    || self.in_flight.holds_lock(&completion.key())
            })
    }

    /// What the claim's look at the schedule found, if it made one: when the earliest job
    /// scheduled for later becomes claimable (a claim is due then).
    fn on_schedule_look(&mut self, now: Instant, look: ScheduleLook) {
        let next = match look {
            ScheduleLook::NotMade => return,
            ScheduleLook::NothingLater => None,
            ScheduleLook::DueIn(due_in) => Some(now + due_in),
        };
        self.schedule_changed = false;
        self.next_scheduled = next;
    }

    /// A `job_inserted` notification (or, without LISTEN, a poll): claim, and look at the
    /// schedule again if the claim comes back short.
    pub fn on_wake(&mut self) {
        self.want_claim = true;
        self.schedule_changed = true;
    }

    /// The most jobs one statement claims: `max_batch_size`, and at most half the slots.
    /// A claim's jobs arrive together when its statement ends, and their ends go back
    /// together, so a claim of every slot makes the slots move in one wave: the database
    /// idles while the runner runs them, and the runner while the database ends and claims
    /// them. With half, one half runs while the other's round trip is in flight.
    fn claim_cap(&self) -> usize {
        self.settings
            .max_batch_size
            .min(self.settings.concurrency.div_ceil(2))
    }

    /// How many more jobs `max_jobs` lets this worker claim.
    fn jobs_left(&self) -> usize {
        match self.settings.max_jobs {
            None => usize::MAX,
            Some(max_jobs) => {
                usize::try_from(max_jobs.saturating_sub(self.handed_over)).unwrap_or(usize::MAX)
            }
        }
    }

    /// Jobs claimed (or found orphaned) go to the runner.
    pub fn hand_over(&mut self, jobs: Vec<JobRow>) {
        if jobs.is_empty() {
            return;
        }
        self.handed_over += jobs.len() as u64;
        let mut lost = Vec::new();
        for job in &jobs {
            let (task_queue, replaced) = self.in_flight.insert(job);
            if self.settings.sample_waits {
                self.claimed_waits.push(PendingWait {
                    job_id: job.id,
                    queue: task_queue.1.clone(),
                    scheduled_at_us: job
                        .scheduled_at_us
                        .filter(|at| *at != UNREPRESENTABLE_SCHEDULED_AT),
                });
            }
            self.claimed_metrics.push(task_queue);
            lost.extend(replaced);
        }
        self.on_claims_lost(lost);
        self.outbox.push(HandoffEvent::Jobs(jobs));
    }

    /// A new connection is set up; `orphans` are claims of this worker it did not know.
    pub fn on_reconnected(&mut self, orphans: Vec<JobRow>) {
        self.want_claim = true;
        if !orphans.is_empty() {
            self.log(
                LogLevel::Warning,
                "orphaned_claims_found",
                format!(
                    "Found {} jobs claimed for this worker by a statement whose answer was \
                     lost: {:?}; running them",
                    orphans.len(),
                    orphans.iter().map(|job| job.id).collect::<Vec<_>>()
                ),
                None,
            );
        }
        self.hand_over(orphans);
    }

    /// Of the abandoned jobs, only `still` are `doing` for this worker any more.
    fn keep_abandoned(&mut self, still: &[i64]) {
        self.abandoned.retain(|job_id| still.contains(job_id));
    }
}

pub fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Retry { .. } => "retried",
        Outcome::Finish { status, .. } => status.as_str(),
    }
}

pub fn record_claims(metrics: &mut MetricsSnapshot, claimed: Vec<TaskQueue>) {
    metrics.claim_batch_size.observe(claimed.len() as f64);
    for task_queue in claimed {
        *metrics.claimed.entry(task_queue).or_default() += 1;
    }
}

pub type Ended = (TaskQueue, &'static str, Option<f64>);

pub fn record_outcomes(metrics: &mut MetricsSnapshot, ended: Vec<Ended>, batch_sizes: &[usize]) {
    for size in batch_sizes {
        metrics.completion_batch_size.observe(*size as f64);
    }
    for ((task, queue), status, duration) in ended {
        if let Some(seconds) = duration {
            metrics
                .job_duration
                .entry((task.clone(), queue.clone()))
                .or_insert_with(|| Histogram::shared(metrics.duration_bounds.clone()))
                .observe(seconds);
        }
        *metrics.outcomes.entry((task, queue, status)).or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::FinishStatus;

    fn settings(concurrency: usize) -> Settings {
        Settings {
            concurrency,
            max_batch_size: 500,
            wait: true,
            queue_limits: HashMap::new(),
            max_jobs: None,
            budget: Duration::from_secs(60),
            target: "db:5432/x".into(),
            labels: Labels::default(),
            sample_waits: false,
            listen_notify: true,
        }
    }

    fn job(id: i64, attempts: i32) -> JobRow {
        JobRow {
            id,
            status: "doing".into(),
            task_name: "t".into(),
            priority: 0,
            lock: None,
            queueing_lock: None,
            args: "{}".into(),
            scheduled_at_us: None,
            queue_name: "default".into(),
            attempts,
            worker_id: Some(1),
        }
    }

    fn succeeded(id: i64, attempts: i32) -> Completion {
        Completion {
            job_id: id,
            attempts,
            outcome: Outcome::Finish {
                status: FinishStatus::Succeeded,
                delete: false,
            },
        }
    }

    fn retried(id: i64, attempts: i32) -> Completion {
        Completion {
            job_id: id,
            attempts,
            outcome: Outcome::Retry {
                retry_at: None,
                priority: None,
                queue: None,
                lock: None,
            },
        }
    }

    fn report(completions: Vec<Completion>) -> Reported {
        Reported {
            completions,
            durations: Vec::new(),
        }
    }

    fn written(keys: &[ClaimKey]) -> CompletionReport {
        CompletionReport {
            written: keys.to_vec(),
            ..CompletionReport::default()
        }
    }

    fn failed(failure: Failure, reason: &str) -> Failed {
        Failed {
            failure,
            reason: reason.into(),
        }
    }

    fn lost() -> Failed {
        failed(Failure::Connection, "connection closed")
    }

    fn transient() -> Failed {
        failed(
            Failure::Transient,
            "ERROR 57014: canceling statement due to user request",
        )
    }

    fn round_trip(state: &mut State, now: Instant) -> RoundTripPlan {
        match state.plan(now, false) {
            Plan::RoundTrip(plan) => plan,
            other => panic!("expected a round trip, got {other:?}"),
        }
    }

    /// Plan a round trip whose claim (all the plan allows) answers `claimed`.
    /// Returns the first follow-up it asks for.
    fn claim_round(
        state: &mut State,
        now: Instant,
        claimed: Result<Vec<JobRow>, Failed>,
    ) -> Option<FollowUp> {
        let plan = round_trip(state, now);
        state.on_claimed(now, plan.claim_limit, &plan.room, claimed);
        state.next_follow_up()
    }

    fn logs(state: &mut State) -> Vec<(LogLevel, &'static str)> {
        state
            .outbox
            .drain(..)
            .filter_map(|event| match event {
                HandoffEvent::Log(record) => Some((record.level, record.action)),
                _ => None,
            })
            .collect()
    }

    /// Holds `jobs` as claimed, nothing pending.
    fn holding(concurrency: usize, jobs: &[JobRow]) -> State {
        let mut state = State::new(settings(concurrency));
        state.hand_over(jobs.to_vec());
        state.want_claim = false;
        state.outbox.clear();
        state
    }

    #[test]
    fn a_completion_claims_in_the_same_round_trip_even_after_a_short_claim() {
        let now = Instant::now();
        let mut state = holding(4, &[job(1, 0)]);
        assert!(matches!(state.plan(now, false), Plan::Wait { .. }));
        state.receive(report(vec![succeeded(1, 0)]));
        let plan = round_trip(&mut state, now);
        assert_eq!(
            plan.claim_limit, 2,
            "a lock successor or a due retry may be waiting"
        );
    }

    #[test]
    fn a_claim_takes_at_most_half_the_slots_and_the_other_half_follows_at_once() {
        let now = Instant::now();
        for (concurrency, max_batch_size, cap) in [
            (1, 500, 1),
            (2, 500, 1),
            (3, 500, 2),
            (100, 500, 50),
            (100, 20, 20),
        ] {
            let mut state = State::new(Settings {
                max_batch_size,
                ..settings(concurrency)
            });
            let plan = round_trip(&mut state, now);
            assert_eq!(plan.claim_limit, cap, "concurrency {concurrency}");
        }
        let mut state = State::new(settings(100));
        let plan = round_trip(&mut state, now);
        let first: Vec<_> = (1..=50).map(|id| job(id, 0)).collect();
        state.on_claimed(now, plan.claim_limit, &plan.room, Ok(first));
        let plan = round_trip(&mut state, now);
        assert_eq!(
            plan.claim_limit, 50,
            "a full claim is followed by one for the other half, without waiting"
        );
    }

    #[test]
    fn max_jobs_caps_the_claims_then_stops_claiming_as_a_drain() {
        let now = Instant::now();
        let mut state = State::new(Settings {
            max_jobs: Some(3),
            ..settings(4)
        });
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.claim_limit, 2);
        state.on_claimed(now, 2, &plan.room, Ok(vec![job(1, 0), job(2, 0)]));
        state.outbox.clear();
        state.receive(report(vec![succeeded(1, 0)]));
        let plan = round_trip(&mut state, now);
        assert_eq!(
            plan.claim_limit, 1,
            "one job left of max_jobs, though 3 slots are free"
        );
        state.on_flushed(now, plan.batch, Ok(CompletionReport::default()));
        state.on_claimed(now, 1, &plan.room, Ok(vec![job(3, 0)]));
        assert!(!state.claiming);
        let events: Vec<_> = state.outbox.drain(..).collect();
        assert!(events
            .iter()
            .any(|event| matches!(event, HandoffEvent::Drained)));
        assert!(events.iter().any(|event| matches!(event, HandoffEvent::Log(record) if record.action == "max_jobs_reached")));
        // The running jobs' outcomes are still written; nothing more is claimed.
        state.receive(report(vec![succeeded(2, 0), succeeded(3, 0)]));
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.claim_limit, 0);
        assert_eq!(plan.batch.len(), 2);
    }

    /// The round trip of `plan` answers: its completions written, its claim `jobs`, and
    /// the claim's look at the schedule.
    fn answer(
        state: &mut State,
        now: Instant,
        plan: RoundTripPlan,
        jobs: Vec<JobRow>,
        look: ScheduleLook,
    ) {
        let ended: Vec<ClaimKey> = plan.batch.iter().map(Completion::key).collect();
        let answer = Answer {
            flushed: (!ended.is_empty()).then(|| Ok(written(&ended))),
            claimed: Some(Ok(jobs)),
            schedule: look,
        };
        state.on_round_trip(now, plan, Ok(answer));
    }

    /// Plan a round trip and answer it: nothing claimed, the claim's look `look`. Whether
    /// the plan asked for the look.
    fn claim_nothing(state: &mut State, now: Instant, look: ScheduleLook) -> bool {
        let plan = round_trip(state, now);
        let asked = plan.look_at_schedule;
        answer(state, now, plan, Vec::new(), look);
        asked
    }

    #[test]
    fn a_job_scheduled_for_later_is_claimed_when_due_not_at_the_next_poll() {
        let start = Instant::now();
        let mut state = State::new(settings(4));
        let in_two_seconds = ScheduleLook::DueIn(Duration::from_secs(2));
        assert!(
            claim_nothing(&mut state, start, in_two_seconds),
            "the first claim looks if it comes back short"
        );
        match state.plan(start, false) {
            Plan::Wait { until } => assert_eq!(until, Some(start + Duration::from_secs(2))),
            other => panic!("expected a wait until the job is due, got {other:?}"),
        }
        let due = start + Duration::from_secs(2);
        let plan = round_trip(&mut state, due);
        assert_eq!(plan.claim_limit, 2);
        assert!(
            plan.look_at_schedule,
            "the claim of the due job looks for the next one"
        );
    }

    #[test]
    fn a_claim_that_fails_or_goes_unanswered_leaves_the_look_to_the_next_claim() {
        let now = Instant::now();
        // No answer: the connection is taken for dead; the claim on the new one looks.
        let mut state = State::new(settings(2));
        let plan = round_trip(&mut state, now);
        assert!(plan.look_at_schedule);
        let no_answer = Failed::no_answer(Duration::from_secs(10));
        state.on_round_trip(now, plan, Err(no_answer));
        assert_eq!(state.next_follow_up(), Some(FollowUp::Reconnect));
        state.on_reconnected(Vec::new());
        assert!(round_trip(&mut state, now).look_at_schedule);
        // Refused for a passing reason (a cancelled statement): the retry looks.
        let mut state = State::new(settings(2));
        let plan = round_trip(&mut state, now);
        let refused = Answer {
            claimed: Some(Err(transient())),
            ..Answer::default()
        };
        state.on_round_trip(now, plan, Ok(refused));
        let later = now + MAX_BACKOFF;
        assert!(round_trip(&mut state, later).look_at_schedule);
    }

    #[test]
    fn an_idle_worker_does_not_look_at_the_schedule_on_every_poll() {
        let now = Instant::now();
        let mut state = State::new(settings(2));
        claim_nothing(&mut state, now, ScheduleLook::NothingLater);
        // A poll: claim, nothing changed since the last look.
        state.on_poll();
        assert!(!claim_nothing(&mut state, now, ScheduleLook::NotMade));
        // A notification may be of a job scheduled for later.
        state.on_wake();
        assert!(round_trip(&mut state, now).look_at_schedule);
    }

    #[test]
    fn the_end_of_a_locked_or_retried_job_looks_at_the_schedule_in_its_claim() {
        let now = Instant::now();
        let locked = JobRow {
            lock: Some("L".into()),
            ..job(1, 0)
        };
        let mut state = holding(4, &[locked, job(2, 0), job(3, 0)]);
        state.schedule_changed = false;
        state.receive(report(vec![succeeded(2, 0)]));
        let plan = round_trip(&mut state, now);
        assert!(
            !plan.look_at_schedule,
            "an unlocked job's end changes no schedule"
        );
        answer(&mut state, now, plan, Vec::new(), ScheduleLook::NotMade);
        // Its lock's next job may be scheduled later.
        state.receive(report(vec![succeeded(1, 0)]));
        assert!(claim_nothing(&mut state, now, ScheduleLook::NothingLater));
        // A retry may be scheduled later.
        state.receive(report(vec![retried(3, 0)]));
        assert!(round_trip(&mut state, now).look_at_schedule);
    }

    #[test]
    fn a_claim_that_comes_back_full_makes_no_look_and_the_next_claim_asks_again() {
        let now = Instant::now();
        // Two slots, so a claim takes at most one job.
        let mut state = State::new(settings(2));
        let plan = round_trip(&mut state, now);
        assert!(plan.look_at_schedule);
        answer(
            &mut state,
            now,
            plan,
            vec![job(1, 0)],
            ScheduleLook::NotMade,
        );
        assert!(
            claim_nothing(&mut state, now, ScheduleLook::NothingLater),
            "still to be made"
        );
        state.on_poll();
        assert!(!round_trip(&mut state, now).look_at_schedule, "made");
    }

    #[test]
    fn without_wait_an_empty_claim_drains_only_once_nothing_runs() {
        let now = Instant::now();
        let mut state = State::new(Settings {
            wait: false,
            ..settings(2)
        });
        claim_round(&mut state, now, Ok(vec![job(1, 0)]));
        let drained = |state: &mut State| {
            state
                .outbox
                .drain(..)
                .any(|event| matches!(event, HandoffEvent::Drained))
        };
        assert!(!drained(&mut state));
        // A short claim while job 1 runs: it may still free a lock or retry at once.
        state.want_claim = true;
        claim_round(&mut state, now, Ok(Vec::new()));
        assert!(!drained(&mut state), "job 1 still runs");
        assert!(state.claiming);
        // Its end is written and the claim of the same round trip finds nothing: done.
        end_then_claim_nothing(&mut state, now, (1, 0));
        assert!(drained(&mut state));
        assert!(!state.claiming);
    }

    /// The claim `key` succeeds, is written, and the same round trip claims nothing.
    fn end_then_claim_nothing(state: &mut State, now: Instant, key: ClaimKey) {
        state.receive(report(vec![succeeded(key.0, key.1)]));
        let plan = round_trip(state, now);
        state.on_flushed(now, plan.batch, Ok(written(&[key])));
        state.on_claimed(now, plan.claim_limit, &plan.room, Ok(Vec::new()));
    }

    #[test]
    fn claims_only_the_slots_that_the_pending_completions_free() {
        let now = Instant::now();
        let mut state = holding(3, &[job(1, 0), job(2, 0)]);
        state.want_claim = true;
        state.receive(report(vec![succeeded(1, 0)]));
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.claim_limit, 2);
        assert_eq!(plan.batch, vec![succeeded(1, 0)]);
    }

    #[test]
    fn a_finish_sent_again_after_a_lost_reply_is_not_abandoned() {
        let now = Instant::now();
        let mut state = holding(2, &[job(7, 0)]);
        state.receive(report(vec![succeeded(7, 0)]));
        let plan = round_trip(&mut state, now);
        state.on_flushed(now, plan.batch, Err(lost()));
        assert_eq!(state.next_follow_up(), Some(FollowUp::Reconnect));
        assert!(
            state.in_flight.contains(&(7, 0)),
            "still held until written"
        );

        // Sent again: the first one had gone through, so this one matches no claim.
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.batch, vec![succeeded(7, 0)]);
        let report = CompletionReport {
            not_current: vec![(7, 0)],
            ..CompletionReport::default()
        };
        state.on_flushed(now, plan.batch, Ok(report));
        assert!(state.abandoned.is_empty());
        assert!(!state.in_flight.contains(&(7, 0)));
        let logs = logs(&mut state);
        assert!(logs.contains(&(LogLevel::Debug, "finish_task_already_written")));
        assert!(!logs.iter().any(|(level, _)| *level == LogLevel::Error));
    }

    #[test]
    fn a_refused_write_frees_the_slot_and_the_job_is_abandoned() {
        let now = Instant::now();
        let mut state = holding(1, &[job(3, 2)]);
        state.receive(report(vec![succeeded(3, 2)]));
        let plan = round_trip(&mut state, now);
        let report = CompletionReport {
            refused: vec![((3, 2), "duplicate key value".into())],
            ..CompletionReport::default()
        };
        state.on_flushed(now, plan.batch, Ok(report));
        assert_eq!(state.abandoned, vec![3]);
        assert!(state.in_flight.is_empty());
        assert!(logs(&mut state).contains(&(LogLevel::Error, "finish_task_failed")));
    }

    #[test]
    fn a_claim_that_ends_and_reclaims_the_same_job_is_two_claims() {
        let now = Instant::now();
        let mut state = holding(1, &[job(5, 0)]);
        state.receive(report(vec![retried(5, 0)]));
        state.want_claim = true;
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.claim_limit, 1);
        let report = CompletionReport {
            written: vec![(5, 0)],
            ..CompletionReport::default()
        };
        state.on_flushed(now, plan.batch, Ok(report));
        state.on_claimed(now, 1, &plan.room, Ok(vec![job(5, 1)]));
        assert!(state.in_flight.contains(&(5, 1)));
        assert!(!state.in_flight.contains(&(5, 0)));
        assert_eq!(state.in_flight.len(), 1);
    }

    #[test]
    fn passing_failures_back_off_then_a_spent_budget_stops_claiming_not_writing() {
        let start = Instant::now();
        let mut state = State::new(Settings {
            budget: Duration::from_secs(1),
            ..settings(2)
        });
        let follow_up = claim_round(&mut state, start, Err(transient()));
        assert_eq!(follow_up, None, "no reconnect for a cancelled statement");
        // Backing off: no round trip before the retry time.
        assert!(matches!(
            state.plan(start, false),
            Plan::Wait { until: Some(_) }
        ));
        let later = start + Duration::from_secs(2);
        claim_round(&mut state, later, Err(transient()));
        assert!(!state.claiming);
        let fatal = state
            .outbox
            .iter()
            .any(|event| matches!(event, HandoffEvent::Fatal(CoreError::Unusable { .. })));
        assert!(fatal, "the runner is told once the budget is spent");
        // Outcomes reported afterwards are still written.
        state.hand_over(vec![job(9, 0)]);
        state.receive(report(vec![succeeded(9, 0)]));
        let plan = round_trip(&mut state, later + Duration::from_secs(10));
        assert_eq!(plan.batch, vec![succeeded(9, 0)]);
        assert_eq!(plan.claim_limit, 0);
    }

    #[test]
    fn a_claim_refused_for_a_pruned_worker_asks_to_register_again() {
        let now = Instant::now();
        let mut state = State::new(settings(1));
        let plan = round_trip(&mut state, now);
        state.on_claimed(now, plan.claim_limit, &plan.room, Err(pruned()));
        assert_eq!(state.next_follow_up(), Some(FollowUp::RegisterAgain));
        assert!(state.want_claim);
        assert!(state.claiming);
    }

    #[test]
    fn a_delayed_completion_waits_for_its_time_while_claims_go_on() {
        let now = Instant::now();
        let mut state = holding(2, &[job(4, 0)]);
        state.receive(report(vec![succeeded(4, 0)]));
        let plan = round_trip(&mut state, now);
        let report = CompletionReport {
            retry_later: vec![succeeded(4, 0)],
            ..CompletionReport::default()
        };
        state.on_flushed(now, plan.batch, Ok(report));
        // Its claim came back short.
        state.on_claimed(now, plan.claim_limit, &plan.room, Ok(vec![]));
        assert!(state.in_flight.contains(&(4, 0)), "not written yet");
        let until = match state.plan(now, false) {
            Plan::Wait { until: Some(until) } => until,
            other => panic!("expected a wait, got {other:?}"),
        };
        assert!(until > now);
        state.want_claim = true;
        let plan = round_trip(&mut state, now);
        assert!(plan.batch.is_empty(), "the delayed write is not due");
        assert_eq!(plan.claim_limit, 1, "its job still holds a slot");
        let plan = round_trip(&mut state, until);
        assert_eq!(plan.batch, vec![succeeded(4, 0)]);
    }

    #[test]
    fn orphans_are_handed_over_and_hold_slots() {
        let mut state = State::new(settings(3));
        state.on_reconnected(vec![job(11, 1), job(12, 0)]);
        assert!(state.in_flight.contains(&(11, 1)));
        let handed: Vec<i64> = state
            .outbox
            .iter()
            .filter_map(|event| match event {
                HandoffEvent::Jobs(jobs) => Some(jobs.iter().map(|job| job.id).collect::<Vec<_>>()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(handed, vec![11, 12]);
        let plan = round_trip(&mut state, Instant::now());
        assert_eq!(plan.claim_limit, 1);
    }

    #[test]
    fn after_the_runner_closes_the_last_outcomes_get_one_budget_then_are_given_up() {
        let start = Instant::now();
        let mut state = holding(1, &[job(2, 0)]);
        state.receive(report(vec![succeeded(2, 0)]));
        state.on_completions_closed(start);
        assert!(state.worth_reconnecting(start));
        let spent = start + Duration::from_secs(61);
        assert!(!state.worth_reconnecting(spent));
        assert_eq!(state.plan(spent, false), Plan::Done);
        assert!(logs(&mut state).contains(&(LogLevel::Error, "finish_task_failed")));
    }

    fn pruned() -> Failed {
        failed(Failure::Pruned, "violates foreign key constraint")
    }

    fn refused() -> Failed {
        failed(Failure::Refused, "ERROR 23505: duplicate key value")
    }

    #[test]
    fn the_write_mode_follows_what_the_plan_sends() {
        let plan = |batch: Vec<Completion>, claim_limit| RoundTripPlan {
            batch,
            claim_limit,
            room: QueueRoom::default(),
            abandoned: Vec::new(),
            look_at_schedule: true,
        };
        let one = || vec![succeeded(1, 0)];
        let with_a_retry = || vec![succeeded(1, 0), retried(2, 0)];
        assert_eq!(plan(Vec::new(), 0).write_mode(), WriteMode::Nothing);
        assert_eq!(plan(one(), 0).write_mode(), WriteMode::Completions);
        assert_eq!(plan(with_a_retry(), 0).write_mode(), WriteMode::Completions);
        assert_eq!(plan(Vec::new(), 3).write_mode(), WriteMode::Claim);
        assert_eq!(plan(one(), 3).write_mode(), WriteMode::Combined);
        assert_eq!(plan(with_a_retry(), 3).write_mode(), WriteMode::Transaction);
    }

    #[test]
    fn a_shared_write_falls_back_to_separate_steps_unless_the_connection_is_lost() {
        assert_eq!(
            after_shared_write([refused()]),
            AfterSharedWrite::Separately
        );
        assert_eq!(
            after_shared_write([refused(), transient()]),
            AfterSharedWrite::Separately,
            "a statement refused in the transaction aborts the rest: all rolled back"
        );
        assert_eq!(
            after_shared_write([refused(), lost()]),
            AfterSharedWrite::Lost(lost()),
            "committed or not, nobody can tell: nothing is redone on this connection"
        );
    }

    /// A round trip whose claim finds this worker's row gone.
    fn pruned_round_trip(state: &mut State, now: Instant) {
        let plan = round_trip(state, now);
        let answer = Answer {
            claimed: Some(Err(pruned())),
            ..Answer::default()
        };
        state.on_round_trip(now, plan, Ok(answer));
    }

    /// A round trip whose claim finds this worker's row gone, then registering again
    /// fails, losing the connection or not.
    fn register_again_fails(now: Instant, connection_lost: bool) -> State {
        let mut state = State::new(settings(2));
        pruned_round_trip(&mut state, now);
        assert_eq!(state.next_follow_up(), Some(FollowUp::RegisterAgain));
        let reason = if connection_lost {
            "connection closed"
        } else {
            "lock timeout"
        };
        state.on_register_again_failed(now, reason, connection_lost);
        state
    }

    #[test]
    fn a_lost_connection_drops_the_other_follow_ups_of_its_round_trip() {
        // Registering again lost the connection: nothing else is done on it.
        let mut state = register_again_fails(Instant::now(), true);
        assert_eq!(state.next_follow_up(), Some(FollowUp::Reconnect));
        assert_eq!(state.next_follow_up(), None);
    }

    #[test]
    fn a_register_again_refused_backs_off() {
        let now = Instant::now();
        let mut state = register_again_fails(now, false);
        assert!(logs(&mut state).contains(&(LogLevel::Warning, "dispatcher_statement_failed")));
        // The claim is wanted again, once the backoff has passed.
        assert_eq!(state.next_follow_up(), None);
        assert!(matches!(
            state.plan(now, false),
            Plan::Wait { until: Some(_) }
        ));
    }

    #[test]
    fn no_answer_in_time_takes_the_connection_for_dead() {
        let now = Instant::now();
        let mut state = holding(2, &[job(1, 0)]);
        state.receive(report(vec![succeeded(1, 0)]));
        let plan = round_trip(&mut state, now);
        let no_answer = Failed::no_answer(Duration::from_secs(10));
        state.on_round_trip(now, plan, Err(no_answer));
        assert_eq!(state.next_follow_up(), Some(FollowUp::Reconnect));
        assert_eq!(state.next_follow_up(), None);
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.batch, vec![succeeded(1, 0)], "sent again");
    }

    #[test]
    fn a_transaction_pooler_stops_claiming_and_reconnects_before_registering_again() {
        let now = Instant::now();
        let mut state = State::new(settings(2));
        // The claim found the worker's row gone, on a connection that must be replaced.
        pruned_round_trip(&mut state, now);
        state.on_transaction_pooler(CoreError::PoolerNotDeclared {
            target: "db".into(),
            sign: "prepared statement does not exist",
        });
        assert!(!state.claiming());
        let events = state.take_events();
        assert!(events.iter().any(|event| matches!(
            event,
            HandoffEvent::Fatal(error @ CoreError::PoolerNotDeclared { .. })
                if error.to_string().contains("--pooler")
        )));
        assert_eq!(state.next_follow_up(), Some(FollowUp::Reconnect));
        assert_eq!(
            state.next_follow_up(),
            None,
            "registering again waits for a claim"
        );
    }

    #[test]
    fn the_orphan_check_asks_only_what_there_is_to_ask() {
        let mut state = holding(3, &[job(1, 0), job(2, 4)]);
        let idle = State::new(settings(3)).orphan_check();
        assert_eq!(idle.running, None);
        assert_eq!(idle.abandoned, None);
        assert!(idle.orphans.ids.is_empty());
        // Job 1 reported its end (not running any more); job 3's write was refused.
        state.receive(report(vec![succeeded(1, 0)]));
        state.abandoned.push(3);
        let check = state.orphan_check();
        assert_eq!(check.running, Some((vec![2], vec![4])));
        assert_eq!(check.abandoned, Some(vec![3]));
        let mut known: Vec<_> = check
            .orphans
            .ids
            .iter()
            .zip(&check.orphans.attempts)
            .collect();
        known.sort();
        assert_eq!(known, [(&1, &0), (&2, &4)]);
        assert_eq!(check.orphans.abandoned, vec![3]);
        // Found: an orphan, job 2's claim lost, job 3 no longer `doing` here.
        state.on_orphan_check(OrphanFindings {
            orphans: vec![job(9, 0)],
            lost: vec![(2, 4)],
            still_abandoned: Some(Vec::new()),
        });
        assert!(state.in_flight.contains(&(9, 0)));
        assert_eq!(state.orphan_check().abandoned, None);
        let events = state.take_events();
        assert!(events
            .iter()
            .any(|event| matches!(event, HandoffEvent::ClaimsLost(keys) if keys == &[(2, 4)])));
    }

    #[test]
    fn a_poll_without_notifications_also_looks_at_the_schedule() {
        let now = Instant::now();
        for listen_notify in [true, false] {
            let mut state = State::new(Settings {
                listen_notify,
                ..settings(2)
            });
            claim_nothing(&mut state, now, ScheduleLook::NothingLater);
            state.on_poll();
            assert_eq!(round_trip(&mut state, now).look_at_schedule, !listen_notify);
        }
    }

    #[test]
    fn effects_carry_the_events_then_the_metrics_changes_once() {
        let now = Instant::now();
        let mut state = State::new(settings(2));
        claim_round(&mut state, now, Ok(vec![job(1, 0)]));
        let effects = state.take_effects();
        assert!(matches!(effects.events.as_slice(), [HandoffEvent::Jobs(jobs)] if jobs.len() == 1));
        assert_eq!(effects.claimed.len(), 1);
        assert_eq!((effects.held, effects.backlog), (1, 0));
        let again = state.take_effects();
        assert!(again.events.is_empty() && again.claimed.is_empty());
        assert_eq!(again.held, 1);
    }
}
