//! Counters kept where the events happen (claims, outcomes, hand-off, connections), read
//! by the runner only when scraped: no per-job cost on the Python side.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds; the usual Prometheus latency buckets, down to 1 ms (claim to start).
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Seconds, from 5 ms to 4 hours: the default buckets of how long jobs ran and waited
/// (`metrics_duration_buckets` sets others).
pub const JOB_DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 14400.0,
];
/// At most this many distinct task names, and as many queue names, become metric labels
/// (beyond them: [`OTHER_LABEL`]). Registered task names, the worker's own queues and the
/// queues with a concurrency limit always keep their own label.
pub const MAX_LABEL_VALUES: usize = 100;
/// The task label of jobs whose task is not registered in the app.
pub const UNKNOWN_TASK_LABEL: &str = "unknown";
/// The label of the task or queue names beyond [`MAX_LABEL_VALUES`].
pub const OTHER_LABEL: &str = "other";
/// Jobs per claim or per completion statement.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub bounds: Arc<[f64]>,
    /// Non-cumulative counts per bucket; the last one is +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram::shared(bounds.into())
    }

    /// With bounds shared by many histograms.
    pub fn shared(bounds: Arc<[f64]>) -> Self {
        Histogram {
            bounds: bounds.clone(),
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe_n(&mut self, value: f64, times: u64) {
        let index = self
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.bounds.len());
        self.counts[index] += times;
        self.sum += value * times as f64;
        self.count += times;
    }

    pub fn observe(&mut self, value: f64) {
        self.observe_n(value, 1);
    }
}

/// (task label, queue label): see [`Labels`].
pub type TaskQueue = (Arc<str>, Arc<str>);

/// The label values of task and queue names: the set is capped, so that names written by
/// whoever can defer jobs (unregistered tasks, any queue) cannot grow the worker's memory
/// and each scrape without bound.
#[derive(Clone, Debug)]
pub struct Labels {
    /// The app's registered tasks; `None`: not known (every name counts against the cap).
    registered: Option<HashSet<String>>,
    tasks: HashSet<Arc<str>>,
    queues: HashSet<Arc<str>>,
    /// Names counted against the cap, in each set.
    counted_tasks: usize,
    counted_queues: usize,
    unknown: Arc<str>,
    other: Arc<str>,
}

impl Default for Labels {
    fn default() -> Self {
        Labels::new(None, std::iter::empty())
    }
}

impl Labels {
    /// `registered`: the app's task names (others count as [`UNKNOWN_TASK_LABEL`]);
    /// `queues`: queue names that always keep their own label.
    pub fn new<'a>(
        registered: Option<&[String]>,
        queues: impl IntoIterator<Item = &'a String>,
    ) -> Self {
        let queues: HashSet<Arc<str>> = queues
            .into_iter()
            .map(|name| name.as_str().into())
            .collect();
        Labels {
            registered: registered.map(|names| names.iter().cloned().collect()),
            tasks: HashSet::new(),
            counted_queues: queues.len(),
            queues,
            counted_tasks: 0,
            unknown: UNKNOWN_TASK_LABEL.into(),
            other: OTHER_LABEL.into(),
        }
    }

    pub fn task(&mut self, name: &str) -> Arc<str> {
        let Some(registered) = &self.registered else {
            return intern(&mut self.tasks, &mut self.counted_tasks, name, &self.other);
        };
        if !registered.contains(name) {
            return self.unknown.clone();
        }
        // Registered: bounded by the app itself.
        let mut uncapped = 0;
        intern(&mut self.tasks, &mut uncapped, name, &self.other)
    }

    pub fn queue(&mut self, name: &str) -> Arc<str> {
        intern(
            &mut self.queues,
            &mut self.counted_queues,
            name,
            &self.other,
        )
    }
}

/// `name`'s shared label: itself while fewer than [`MAX_LABEL_VALUES`] names were counted
/// in `counted`, else `other`.
fn intern(
    set: &mut HashSet<Arc<str>>,
    counted: &mut usize,
    name: &str,
    other: &Arc<str>,
) -> Arc<str> {
    if let Some(shared) = set.get(name) {
        return shared.clone();
    }
    if *counted >= MAX_LABEL_VALUES {
        return other.clone();
    }
    *counted += 1;
    let shared: Arc<str> = name.into();
    set.insert(shared.clone());
    shared
}

/// The number of jobs of a queue in a status, as last sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueDepth {
    pub queue: String,
    pub status: String,
    pub jobs: u64,
    /// Of these, the jobs due now (`todo` only: no `scheduled_at`, or one past); the
    /// others are scheduled for later (a `schedule_in`, a retry that waits).
    pub due: u64,
    /// How long the oldest due job has been due, in seconds, when sampled (database
    /// time); `None`: none is due, or its insertion time is unknown (its events deleted).
    pub oldest_due_age: Option<f64>,
}

#[derive(Clone, Debug)]
pub struct MetricsSnapshot {
    pub claimed: HashMap<TaskQueue, u64>,
    /// status: succeeded, failed, aborted, retried
    pub outcomes: HashMap<(Arc<str>, Arc<str>, &'static str), u64>,
    pub job_duration: HashMap<TaskQueue, Histogram>,
    /// By queue label: from the later of a job's insertion and its `scheduled_at` to its
    /// claim (database time).
    pub job_wait: HashMap<Arc<str>, Histogram>,
    /// The bounds of `job_duration` and `job_wait`.
    pub duration_bounds: Arc<[f64]>,
    pub claim_batch_size: Histogram,
    pub completion_batch_size: Histogram,
    pub claim_to_start: Histogram,
    /// Outcomes reported by the runner and not yet written.
    pub completer_backlog: u64,
    /// Jobs claimed by this worker and not yet completed in the database.
    pub in_flight: u64,
    /// role (dispatcher, listener, registry) -> connected
    pub connected: HashMap<&'static str, bool>,
    pub reconnects: HashMap<&'static str, u64>,
    /// When this worker's heartbeat was last written.
    pub last_heartbeat: Option<Instant>,
    /// Times this worker's heartbeat was found older than `stalled_worker_timeout` (other
    /// workers may then have taken it for stalled).
    pub heartbeats_late: u64,
    /// Stalled workers this worker pruned, and their jobs (or jobs left without a worker)
    /// it put back to run or, failing that, marked failed.
    pub stalled_workers_pruned: u64,
    pub stalled_jobs_recovered: u64,
    pub stalled_jobs_failed: u64,
    /// Jobs by queue and status (`todo`, `doing`), as last sampled (when sampling is on).
    pub queue_depth: Vec<QueueDepth>,
    pub queue_depth_sampled: Option<Instant>,
}

impl Default for MetricsSnapshot {
    fn default() -> Self {
        MetricsSnapshot {
            claimed: HashMap::new(),
            outcomes: HashMap::new(),
            job_duration: HashMap::new(),
            job_wait: HashMap::new(),
            duration_bounds: JOB_DURATION_BUCKETS.into(),
            claim_batch_size: Histogram::new(BATCH_BUCKETS),
            completion_batch_size: Histogram::new(BATCH_BUCKETS),
            claim_to_start: Histogram::new(DURATION_BUCKETS),
            completer_backlog: 0,
            in_flight: 0,
            connected: HashMap::new(),
            reconnects: HashMap::new(),
            last_heartbeat: None,
            heartbeats_late: 0,
            stalled_workers_pruned: 0,
            stalled_jobs_recovered: 0,
            stalled_jobs_failed: 0,
            queue_depth: Vec::new(),
            queue_depth_sampled: None,
        }
    }
}

/// A queue's `todo` jobs told apart, as last sampled (see [`MetricsSnapshot::due_by_queue`]).
#[derive(Clone, Debug, PartialEq)]
pub struct QueueDue {
    pub queue: String,
    /// Jobs due now: no `scheduled_at`, or one past.
    pub due: u64,
    /// Jobs scheduled for later (a `schedule_in`, a retry that waits).
    pub not_due: u64,
    /// How long the oldest due job has been due, in seconds, now; `None`: none is due (or
    /// its insertion time is unknown).
    pub oldest_due_age: Option<f64>,
}

impl MetricsSnapshot {
    /// Each sampled queue's `todo` jobs, due now or not yet, and how long the oldest due
    /// one has been due as of now: its age when sampled, plus the time since the sample.
    pub fn due_by_queue(&self) -> Vec<QueueDue> {
        let since_sample = self
            .queue_depth_sampled
            .map_or(0.0, |at| at.elapsed().as_secs_f64());
        let mut queues: std::collections::BTreeMap<&str, QueueDue> =
            std::collections::BTreeMap::new();
        for depth in &self.queue_depth {
            let entry = queues.entry(&depth.queue).or_insert_with(|| QueueDue {
                queue: depth.queue.clone(),
                due: 0,
                not_due: 0,
                oldest_due_age: None,
            });
            if depth.status == "todo" {
                entry.due += depth.due;
                entry.not_due += depth.jobs.saturating_sub(depth.due);
                entry.oldest_due_age = depth.oldest_due_age.map(|age| age + since_sample);
            }
        }
        queues.into_values().collect()
    }
}

/// A claimed job whose wait is still to be measured (see [`Metrics::waits_claimed`]).
#[derive(Clone, Debug, PartialEq)]
pub struct PendingWait {
    pub job_id: i64,
    pub queue: Arc<str>,
    /// Its `scheduled_at` when claimed, microseconds since the epoch.
    pub scheduled_at_us: Option<i64>,
}

/// At most this many claimed jobs wait to have their wait measured; beyond, between two
/// samples, the others are not measured.
pub const MAX_PENDING_WAITS: usize = 10_000;

#[derive(Default, Debug)]
pub struct Metrics {
    state: Mutex<MetricsSnapshot>,
    pending_waits: Mutex<Vec<PendingWait>>,
}

impl Metrics {
    /// With these bounds (seconds) for how long jobs ran and waited; none: the default.
    pub fn with_duration_bounds(bounds: Option<&[f64]>) -> Self {
        let metrics = Metrics::default();
        if let Some(bounds) = bounds {
            metrics.update(|state| state.duration_bounds = bounds.into());
        }
        metrics
    }

    /// Claimed jobs whose wait the registry measures at its next sample (their insertion
    /// time is in `procrastinate_events`, not in the claimed row).
    pub fn waits_claimed(&self, claimed: Vec<PendingWait>) {
        if let Ok(mut pending) = self.pending_waits.lock() {
            let room = MAX_PENDING_WAITS.saturating_sub(pending.len());
            pending.extend(claimed.into_iter().take(room));
        }
    }

    pub fn take_pending_waits(&self) -> Vec<PendingWait> {
        self.pending_waits
            .lock()
            .map(|mut pending| std::mem::take(&mut *pending))
            .unwrap_or_default()
    }

    /// Stalled workers pruned, and their jobs put back to run or failed.
    pub fn stalled_recovered(&self, pruned: usize, recovered: usize, failed: usize) {
        self.update(|state| {
            state.stalled_workers_pruned += pruned as u64;
            state.stalled_jobs_recovered += recovered as u64;
            state.stalled_jobs_failed += failed as u64;
        });
    }

    pub fn heartbeat_written(&self) {
        self.update(|state| state.last_heartbeat = Some(Instant::now()));
    }

    /// The heartbeat was found older than `stalled_worker_timeout` (once per such time).
    pub fn heartbeat_late(&self) {
        self.update(|state| state.heartbeats_late += 1);
    }

    /// How long a job waited to be claimed, in its queue's histogram.
    pub fn observe_wait(&self, queue: Arc<str>, waited: f64) {
        self.update(|state| {
            let bounds = state.duration_bounds.clone();
            state
                .job_wait
                .entry(queue)
                .or_insert_with(|| Histogram::shared(bounds))
                .observe(waited.max(0.0));
        });
    }

    /// Update under the lock (a few map operations per batch, never per Python job).
    pub fn update(&self, change: impl FnOnce(&mut MetricsSnapshot)) {
        if let Ok(mut state) = self.state.lock() {
            change(&mut state);
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        self.state
            .lock()
            .map(|state| state.clone())
            .unwrap_or_default()
    }

    pub fn set_connected(&self, role: &'static str, connected: bool) {
        self.update(|state| {
            let previous = state.connected.insert(role, connected);
            if connected && previous == Some(false) {
                *state.reconnects.entry(role).or_default() += 1;
            }
        });
    }

    pub fn observe_claim_to_start(&self, waited: Duration, jobs: u64) {
        self.update(|state| state.claim_to_start.observe_n(waited.as_secs_f64(), jobs));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let mut histogram = Histogram::new(&[1.0, 2.0]);
        histogram.observe(0.5);
        histogram.observe(1.0);
        histogram.observe_n(1.5, 3);
        histogram.observe(9.0);
        assert_eq!(histogram.counts, vec![2, 3, 1]);
        assert_eq!(histogram.count, 6);
        assert!((histogram.sum - 15.0).abs() < 1e-9);
    }

    #[test]
    fn unregistered_tasks_share_one_label_and_the_label_set_is_capped() {
        let registered = vec!["send_email".to_string(), "resize".to_string()];
        let limited = ["emails".to_string()];
        let mut labels = Labels::new(Some(&registered), limited.iter());
        assert_eq!(&*labels.task("send_email"), "send_email");
        for index in 0..10_000 {
            assert_eq!(&*labels.task(&format!("junk-{index}")), UNKNOWN_TASK_LABEL);
        }
        assert_eq!(&*labels.task("resize"), "resize");
        let queues: HashSet<String> = (0..10_000)
            .map(|index| labels.queue(&format!("q-{index}")).to_string())
            .collect();
        // The limited queue counts against the cap and keeps its label.
        assert_eq!(queues.len(), MAX_LABEL_VALUES);
        assert!(queues.contains(OTHER_LABEL));
        assert_eq!(&*labels.queue("emails"), "emails");
        assert_eq!(&*labels.queue("q-0"), "q-0");
        assert_eq!(&*labels.queue("q-5000"), OTHER_LABEL);
        // Without the registered names: the first names, then `other`.
        let mut unknown = Labels::default();
        let tasks: HashSet<String> = (0..500)
            .map(|index| unknown.task(&format!("t-{index}")).to_string())
            .collect();
        assert_eq!(tasks.len(), MAX_LABEL_VALUES + 1);
    }

    #[test]
    fn waits_use_the_configured_bounds() {
        let metrics = Metrics::with_duration_bounds(Some(&[1.0, 3600.0]));
        metrics.observe_wait("q".into(), 7200.0);
        metrics.observe_wait("q".into(), -1.0); // clock noise: counted as no wait
        let snapshot = metrics.snapshot();
        let histogram = &snapshot.job_wait[&Arc::<str>::from("q")];
        assert_eq!(&*histogram.bounds, &[1.0, 3600.0]);
        assert_eq!(histogram.counts, vec![1, 0, 1]);
    }

    #[test]
    fn todo_jobs_are_told_apart_by_queue_and_the_oldest_due_ages_with_the_sample() {
        let depth = |queue: &str, status: &str, jobs, due, oldest_due_age| QueueDepth {
            queue: queue.into(),
            status: status.into(),
            jobs,
            due,
            oldest_due_age,
        };
        let sampled = Instant::now() - Duration::from_secs(3);
        let snapshot = MetricsSnapshot {
            queue_depth: vec![
                depth("later", "todo", 4, 0, None),
                depth("mixed", "todo", 5, 2, Some(100.0)),
                depth("mixed", "doing", 1, 0, None),
                depth("running", "doing", 2, 0, None),
            ],
            queue_depth_sampled: Some(sampled),
            ..MetricsSnapshot::default()
        };
        let due = snapshot.due_by_queue();
        let queues: Vec<(&str, u64, u64)> = due
            .iter()
            .map(|entry| (entry.queue.as_str(), entry.due, entry.not_due))
            .collect();
        assert_eq!(
            queues,
            vec![("later", 0, 4), ("mixed", 2, 3), ("running", 0, 0)]
        );
        assert_eq!(due[0].oldest_due_age, None);
        assert_eq!(due[2].oldest_due_age, None);
        // 100 s when sampled, 3 s ago at least.
        assert!(due[1].oldest_due_age.is_some_and(|age| age >= 103.0));
    }

    #[test]
    fn reconnects_count_transitions_back_up() {
        let metrics = Metrics::default();
        metrics.set_connected("listener", true);
        metrics.set_connected("listener", false);
        metrics.set_connected("listener", true);
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.reconnects.get("listener"), Some(&1));
        assert_eq!(snapshot.connected.get("listener"), Some(&true));
    }
}
