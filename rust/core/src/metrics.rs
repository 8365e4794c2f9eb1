//! Counters kept where the events happen (claims, outcomes, hand-off, connections), read
//! by the runner only when scraped: no per-job cost on the Python side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Seconds; the usual Prometheus latency buckets, down to 1 ms.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// Jobs per claim or per completion statement.
pub const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0];

#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last one is +Inf.
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
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

/// (task name, queue name)
pub type TaskQueue = (Arc<str>, Arc<str>);

#[derive(Clone, Debug)]
pub struct MetricsSnapshot {
    pub claimed: HashMap<TaskQueue, u64>,
    /// status: succeeded, failed, aborted, retried
    pub outcomes: HashMap<(Arc<str>, Arc<str>, &'static str), u64>,
    pub job_duration: HashMap<TaskQueue, Histogram>,
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
}

impl Default for MetricsSnapshot {
    fn default() -> Self {
        MetricsSnapshot {
            claimed: HashMap::new(),
            outcomes: HashMap::new(),
            job_duration: HashMap::new(),
            claim_batch_size: Histogram::new(BATCH_BUCKETS),
            completion_batch_size: Histogram::new(BATCH_BUCKETS),
            claim_to_start: Histogram::new(DURATION_BUCKETS),
            completer_backlog: 0,
            in_flight: 0,
            connected: HashMap::new(),
            reconnects: HashMap::new(),
        }
    }
}

#[derive(Default, Debug)]
pub struct Metrics {
    state: Mutex<MetricsSnapshot>,
}

impl Metrics {
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
