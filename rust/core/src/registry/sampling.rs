//! The metrics the registry samples when they are served: the queue depth, and the waits
//! of the jobs claimed since the last sample.

use std::time::{Duration, Instant};

use super::{bounded, not_connected, Registry};
use crate::errors::Failed;
use crate::metrics::{QueueDepth, MAX_LABEL_VALUES, OTHER_LABEL};
use crate::sql;

/// The queues with the most jobs keep their label, at most [`MAX_LABEL_VALUES`] of them;
/// the others are summed under [`OTHER_LABEL`], by status (their due jobs summed too, and
/// the oldest due job the oldest of theirs).
pub fn cap_queue_depth(mut depth: Vec<QueueDepth>) -> Vec<QueueDepth> {
    let mut totals: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    for entry in &depth {
        *totals.entry(entry.queue.clone()).or_default() += entry.jobs;
    }
    if totals.len() <= MAX_LABEL_VALUES {
        return depth;
    }
    let mut queues: Vec<(String, u64)> = totals.into_iter().collect();
    queues.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let kept: std::collections::HashSet<String> = queues
        .into_iter()
        .take(MAX_LABEL_VALUES - 1)
        .map(|(queue, _)| queue)
        .collect();
    let mut other: std::collections::BTreeMap<String, QueueDepth> =
        std::collections::BTreeMap::new();
    depth.retain(|entry| {
        if kept.contains(&entry.queue) {
            return true;
        }
        let summed = other
            .entry(entry.status.clone())
            .or_insert_with(|| QueueDepth {
                queue: OTHER_LABEL.to_string(),
                status: entry.status.clone(),
                jobs: 0,
                due: 0,
                oldest_due_age: None,
            });
        summed.jobs += entry.jobs;
        summed.due += entry.due;
        summed.oldest_due_age = match (summed.oldest_due_age, entry.oldest_due_age) {
            (Some(age), Some(other_age)) => Some(age.max(other_age)),
            (age, other_age) => age.or(other_age),
        };
        false
    });
    depth.extend(other.into_values());
    depth
}

/// How often the registry samples the queue depth and the waits, when metrics are served.
pub const METRICS_SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

impl Registry {
    /// One sample: the jobs by queue and status, and the waits of the jobs claimed since
    /// the last one (from their events: inserted, claimed; database time).
    pub(super) async fn sample_metrics(&mut self) -> Result<(), Failed> {
        self.ensure_connected().await?;
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| not_connected("not connected".into()))?;
        let limit = self.statement_limit();
        let rows = bounded(limit, client.query(sql::QUEUE_DEPTH, &[])).await?;
        let mut depth = Vec::with_capacity(rows.len());
        for row in &rows {
            let jobs: i64 = row.try_get(2).map_err(|error| Failed::new(&error))?;
            let due: i64 = row.try_get(3).map_err(|error| Failed::new(&error))?;
            let oldest_due_age: Option<f64> =
                row.try_get(4).map_err(|error| Failed::new(&error))?;
            depth.push(QueueDepth {
                queue: row.try_get(0).map_err(|error| Failed::new(&error))?,
                status: row.try_get(1).map_err(|error| Failed::new(&error))?,
                jobs: u64::try_from(jobs).unwrap_or(0),
                due: u64::try_from(due).unwrap_or(0),
                // A clock step on the server could make it negative: a job just due.
                oldest_due_age: oldest_due_age.map(|age| age.max(0.0)),
            });
        }
        let depth = cap_queue_depth(depth);
        self.handoff.metrics().update(|state| {
            state.queue_depth = depth;
            state.queue_depth_sampled = Some(Instant::now());
        });
        let pending = self.handoff.metrics().take_pending_waits();
        if pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = pending.iter().map(|wait| wait.job_id).collect();
        let rows = bounded(limit, client.query(sql::JOB_EVENT_TIMES, &[&ids])).await?;
        let mut times = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            let job_id: i64 = row.try_get(0).map_err(|error| Failed::new(&error))?;
            let deferred: Option<f64> = row.try_get(1).map_err(|error| Failed::new(&error))?;
            let started: Option<f64> = row.try_get(2).map_err(|error| Failed::new(&error))?;
            times.insert(job_id, (deferred, started));
        }
        for wait in pending {
            let Some(&(deferred, Some(started))) = times.get(&wait.job_id) else {
                continue; // deleted since (delete_jobs), or its events were
            };
            let scheduled = wait.scheduled_at_us.map(|at| at as f64 / 1_000_000.0);
            let since = match (deferred, scheduled) {
                (Some(deferred), Some(scheduled)) => deferred.max(scheduled),
                (Some(at), None) | (None, Some(at)) => at,
                (None, None) => continue,
            };
            self.handoff
                .metrics()
                .observe_wait(wait.queue, started - since);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_depth_keeps_the_deepest_queues_and_sums_the_others() {
        let depth: Vec<QueueDepth> = (0..150u64)
            .flat_map(|index| {
                ["todo", "doing"].map(|status| {
                    let todo = status == "todo";
                    QueueDepth {
                        queue: format!("q{index}"),
                        status: status.to_string(),
                        jobs: index,
                        due: if todo { index / 2 } else { 0 },
                        oldest_due_age: todo.then_some(index as f64),
                    }
                })
            })
            .collect();
        let capped = cap_queue_depth(depth);
        let queues: std::collections::HashSet<&str> =
            capped.iter().map(|entry| entry.queue.as_str()).collect();
        assert_eq!(queues.len(), MAX_LABEL_VALUES);
        assert!(queues.contains("q149") && !queues.contains("q0"));
        // Nothing is lost: the sums are kept.
        let total = |status: &str| -> u64 {
            capped
                .iter()
                .filter(|entry| entry.status == status)
                .map(|entry| entry.jobs)
                .sum()
        };
        assert_eq!(total("todo"), (0..150).sum::<u64>());
        assert_eq!(total("doing"), (0..150).sum::<u64>());
        let due: u64 = capped.iter().map(|entry| entry.due).sum();
        assert_eq!(due, (0..150u64).map(|index| index / 2).sum::<u64>());
        // The queues summed under `other` (q0 to q50): their oldest due job is the oldest.
        let other = |status: &str| {
            capped
                .iter()
                .find(|entry| entry.queue == OTHER_LABEL && entry.status == status)
                .map(|entry| entry.oldest_due_age)
        };
        assert_eq!(other("todo"), Some(Some(50.0)));
        assert_eq!(other("doing"), Some(None));
    }
}
