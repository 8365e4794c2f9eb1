//! The dispatcher's decisions, without PostgreSQL: what it holds, what to send next, and
//! what each answer (or failure) changes. The async shell in [`super`] runs the round trips
//! and feeds their results to the named transitions here (`on_flushed`, `on_claimed`,
//! `on_connection_lost`, ...); every event for the runner goes through `outbox`.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::completer::CompletionReport;
use crate::errors::{CoreError, Failed, Failure};
use crate::fetcher::QueueRoom;
use crate::metrics::{Histogram, Labels, MetricsSnapshot, PendingWait, TaskQueue};
use crate::protocol::{
    ClaimKey, Completion, HandoffEvent, JobRow, LogLevel, LogRecord, Outcome, Reported,
};
use crate::sql::UNREPRESENTABLE_SCHEDULED_AT;

/// Backoff of statements that failed for a passing reason, and of reconnects.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);

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
    backoff: Duration,
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
}

/// What the shell must do besides sending the events of the outbox.
#[derive(Debug, Default, PartialEq)]
pub struct Needs {
    /// The connection is lost or dead: reconnect, then look for orphaned claims.
    pub reconnect: bool,
    /// This worker's row is gone: register again before claiming.
    pub register_again: bool,
}

pub struct State {
    settings: Settings,
    pub in_flight: InFlight,
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
    pub abandoned: Vec<i64>,
    pub claiming: bool,
    /// Jobs handed over so far (for `max_jobs`).
    handed_over: u64,
    /// When the earliest job scheduled for later becomes claimable (see
    /// [`State::wants_schedule_check`]): a claim is due then, whatever the polling interval.
    next_scheduled: Option<Instant>,
    /// Something may have changed what is scheduled since the last look (a notification,
    /// a write of this worker's, the start): look again after the next short claim.
    schedule_changed: bool,
    pub want_claim: bool,
    pub completions_open: bool,
    /// A claim came back short because a limited queue was full: claim again as soon as
    /// a job of a limited queue completes.
    claim_when_queue_frees: bool,
    trouble: Option<Trouble>,
    fatal_sent: bool,
    /// When the runner closed the completions (shutdown): the last outcomes get one more
    /// budget of attempts from then.
    closed_at: Option<Instant>,
    pub outbox: Vec<HandoffEvent>,
    /// Metrics changes, applied by the shell.
    pub claimed_metrics: Vec<TaskQueue>,
    /// Claimed jobs whose wait is to be measured (`sample_waits`).
    pub claimed_waits: Vec<PendingWait>,
    pub ended_metrics: Vec<(TaskQueue, &'static str, Option<f64>)>,
    pub batch_sizes: Vec<usize>,
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
                .min(self.settings.max_batch_size)
                .min(self.jobs_left())
        } else {
            0
        };
        if self.pending.is_empty() && claim_limit == 0 {
            return Plan::Wait { until: next_later };
        }
        let batch = self.take_batch();
        let room = self.in_flight.room_after(&batch);
        Plan::RoundTrip(RoundTripPlan {
            batch,
            claim_limit,
            room,
            abandoned: self.abandoned.clone(),
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
    pub fn running_claims(&self) -> Vec<ClaimKey> {
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
        let trouble = match self.trouble {
            None => Trouble {
                since: now,
                backoff: FIRST_BACKOFF,
                retry_at: now + FIRST_BACKOFF,
            },
            Some(trouble) => {
                let backoff = (trouble.backoff * 2).min(MAX_BACKOFF);
                Trouble {
                    since: trouble.since,
                    backoff,
                    retry_at: now + backoff,
                }
            }
        };
        self.trouble = Some(trouble);
        self.log(
            LogLevel::Warning,
            "dispatcher_statement_failed",
            format!(
                "Error {what} ({reason}); trying again in {:.2} s",
                trouble.backoff.as_secs_f64()
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
    pub fn on_flushed(
        &mut self,
        now: Instant,
        batch: Vec<Completion>,
        flushed: Result<CompletionReport, Failed>,
        needs: &mut Needs,
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
                    needs.reconnect = true;
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
                due: now + backoff_after(failures),
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
    pub fn on_claimed(
        &mut self,
        now: Instant,
        limit: usize,
        room: &QueueRoom,
        claimed: Result<Vec<JobRow>, Failed>,
        needs: &mut Needs,
    ) {
        let jobs = match claimed {
            Ok(jobs) => jobs,
            Err(failed) => {
                self.want_claim = true;
                match failed.failure {
                    Failure::Connection => {
                        self.connection_lost("claiming jobs", &failed.reason);
                        needs.reconnect = true;
                    }
                    Failure::Pruned => needs.register_again = true,
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

    /// Whether to look when the next job scheduled for later becomes claimable: after a
    /// short claim (nothing more is claimable now), if something may have changed since the
    /// last look. An idle worker whose polls find nothing does not look again.
    pub fn wants_schedule_check(&self) -> bool {
        self.claiming && !self.want_claim && self.schedule_changed
    }

    /// The answer of that look: in how long the earliest scheduled job is due (`None`:
    /// nothing scheduled for later).
    pub fn on_next_scheduled(&mut self, now: Instant, due_in: Option<Duration>) {
        self.schedule_changed = false;
        self.next_scheduled = due_in.map(|due_in| now + due_in);
    }

    /// A `job_inserted` notification (or, without LISTEN, a poll): claim, and look at the
    /// schedule again afterwards.
    pub fn on_wake(&mut self) {
        self.want_claim = true;
        self.schedule_changed = true;
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
    pub fn keep_abandoned(&mut self, still: &[i64]) {
        self.abandoned.retain(|job_id| still.contains(job_id));
    }
}

fn backoff_after(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.min(10));
    (Duration::from_millis(100) * factor).min(MAX_BACKOFF)
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

    fn lost() -> Failed {
        Failed {
            failure: Failure::Connection,
            reason: "connection closed".into(),
        }
    }

    fn transient() -> Failed {
        Failed {
            failure: Failure::Transient,
            reason: "ERROR 57014: canceling statement due to user request".into(),
        }
    }

    fn round_trip(state: &mut State, now: Instant) -> RoundTripPlan {
        match state.plan(now, false) {
            Plan::RoundTrip(plan) => plan,
            other => panic!("expected a round trip, got {other:?}"),
        }
    }

    /// Plan a round trip whose claim (all the plan allows) answers `claimed`.
    fn claim_round(state: &mut State, now: Instant, claimed: Result<Vec<JobRow>, Failed>) -> Needs {
        let plan = round_trip(state, now);
        let mut needs = Needs::default();
        state.on_claimed(now, plan.claim_limit, &plan.room, claimed, &mut needs);
        needs
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
        let mut state = holding(2, &[job(1, 0)]);
        assert!(matches!(state.plan(now, false), Plan::Wait { .. }));
        state.receive(report(vec![succeeded(1, 0)]));
        let plan = round_trip(&mut state, now);
        assert_eq!(
            plan.claim_limit, 2,
            "a lock successor or a due retry may be waiting"
        );
    }

    #[test]
    fn max_jobs_caps_the_claims_then_stops_claiming_as_a_drain() {
        let now = Instant::now();
        let mut state = State::new(Settings {
            max_jobs: Some(3),
            ..settings(2)
        });
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.claim_limit, 2);
        state.on_claimed(
            now,
            2,
            &plan.room,
            Ok(vec![job(1, 0), job(2, 0)]),
            &mut Needs::default(),
        );
        state.outbox.clear();
        state.receive(report(vec![succeeded(1, 0)]));
        let plan = round_trip(&mut state, now);
        assert_eq!(
            plan.claim_limit, 1,
            "one job left of max_jobs, though 1 slot is free"
        );
        state.on_flushed(
            now,
            plan.batch,
            Ok(CompletionReport::default()),
            &mut Needs::default(),
        );
        state.on_claimed(
            now,
            1,
            &plan.room,
            Ok(vec![job(3, 0)]),
            &mut Needs::default(),
        );
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

    #[test]
    fn a_job_scheduled_for_later_is_claimed_when_due_not_at_the_next_poll() {
        let start = Instant::now();
        let mut state = State::new(settings(2));
        claim_round(&mut state, start, Ok(Vec::new()));
        assert!(state.wants_schedule_check(), "the first short claim looks");
        state.on_next_scheduled(start, Some(Duration::from_secs(2)));
        assert!(!state.wants_schedule_check());
        match state.plan(start, false) {
            Plan::Wait { until } => assert_eq!(until, Some(start + Duration::from_secs(2))),
            other => panic!("expected a wait until the job is due, got {other:?}"),
        }
        let due = start + Duration::from_secs(2);
        let plan = round_trip(&mut state, due);
        assert_eq!(plan.claim_limit, 2);
        state.on_claimed(
            due,
            2,
            &plan.room,
            Ok(vec![job(1, 0)]),
            &mut Needs::default(),
        );
        assert!(
            state.wants_schedule_check(),
            "after it, the next one is looked for"
        );
    }

    #[test]
    fn an_idle_worker_does_not_look_at_the_schedule_on_every_poll() {
        let now = Instant::now();
        let mut state = State::new(settings(2));
        claim_round(&mut state, now, Ok(Vec::new()));
        state.on_next_scheduled(now, None);
        // A poll: claim, find nothing, nothing changed since the last look.
        state.want_claim = true;
        claim_round(&mut state, now, Ok(Vec::new()));
        assert!(!state.wants_schedule_check());
        // A notification may be of a job scheduled for later.
        state.on_wake();
        claim_round(&mut state, now, Ok(Vec::new()));
        assert!(state.wants_schedule_check());
    }

    #[test]
    fn the_end_of_a_locked_job_looks_for_its_successor_scheduled_later() {
        let now = Instant::now();
        let locked = JobRow {
            lock: Some("L".into()),
            ..job(1, 0)
        };
        let mut state = holding(2, &[locked, job(2, 0)]);
        state.on_next_scheduled(now, None);
        end_then_claim_nothing(&mut state, now, (2, 0));
        assert!(
            !state.wants_schedule_check(),
            "an unlocked job's end changes no schedule"
        );
        end_then_claim_nothing(&mut state, now, (1, 0));
        assert!(state.wants_schedule_check());
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
        let mut needs = Needs::default();
        state.on_flushed(now, plan.batch, Ok(written(&[key])), &mut needs);
        state.on_claimed(
            now,
            plan.claim_limit,
            &plan.room,
            Ok(Vec::new()),
            &mut needs,
        );
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
        let mut needs = Needs::default();
        state.on_flushed(now, plan.batch, Err(lost()), &mut needs);
        assert!(needs.reconnect);
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
        state.on_flushed(now, plan.batch, Ok(report), &mut Needs::default());
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
        state.on_flushed(now, plan.batch, Ok(report), &mut Needs::default());
        assert_eq!(state.abandoned, vec![3]);
        assert!(state.in_flight.is_empty());
        assert!(logs(&mut state).contains(&(LogLevel::Error, "finish_task_failed")));
    }

    #[test]
    fn a_claim_that_ends_and_reclaims_the_same_job_is_two_claims() {
        let now = Instant::now();
        let mut state = holding(1, &[job(5, 0)]);
        state.receive(report(vec![Completion {
            job_id: 5,
            attempts: 0,
            outcome: Outcome::Retry {
                retry_at: None,
                priority: None,
                queue: None,
                lock: None,
            },
        }]));
        state.want_claim = true;
        let plan = round_trip(&mut state, now);
        assert_eq!(plan.claim_limit, 1);
        let report = CompletionReport {
            written: vec![(5, 0)],
            ..CompletionReport::default()
        };
        let mut needs = Needs::default();
        state.on_flushed(now, plan.batch, Ok(report), &mut needs);
        state.on_claimed(now, 1, &plan.room, Ok(vec![job(5, 1)]), &mut needs);
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
        let needs = claim_round(&mut state, start, Err(transient()));
        assert_eq!(
            needs,
            Needs::default(),
            "no reconnect for a cancelled statement"
        );
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
        let mut needs = Needs::default();
        let pruned = Failed {
            failure: Failure::Pruned,
            reason: "violates foreign key constraint".into(),
        };
        state.on_claimed(now, plan.claim_limit, &plan.room, Err(pruned), &mut needs);
        assert!(needs.register_again);
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
        state.on_flushed(now, plan.batch, Ok(report), &mut Needs::default());
        // Its claim came back short.
        state.on_claimed(
            now,
            plan.claim_limit,
            &plan.room,
            Ok(vec![]),
            &mut Needs::default(),
        );
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
}
