//! The channel from the core to the runner. Jobs cross it in batches (one wake-up of the
//! runner per batch, never one per job), together with abort requests, the end of a
//! `wait=False` drain, log records and a fatal error, in the order they happened.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Mutex};

use crate::errors::CoreError;
use crate::fetcher::JobRow;
use crate::metrics::Metrics;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

/// A log record for the runner's logging system; `action` is procrastinate's `action` extra.
#[derive(Clone, Debug, PartialEq)]
pub struct LogRecord {
    pub level: LogLevel,
    pub action: &'static str,
    pub message: String,
    pub job_id: Option<i64>,
}

#[derive(Debug)]
pub enum HandoffEvent {
    /// Claimed jobs, in start order. Each must be completed exactly once.
    Jobs(Vec<JobRow>),
    /// The database asked to abort these jobs (held by this worker).
    Abort(Vec<i64>),
    /// `wait=False` and the queue is empty: the core has stopped claiming.
    Drained,
    /// The dispatcher will claim nothing more; every claimed job was handed over before this.
    FetchingStopped,
    Log(LogRecord),
    /// The core cannot go on; the runner should stop and raise it.
    Fatal(CoreError),
}

#[derive(Clone)]
pub struct HandoffSender {
    // Stamped when sent, so the receiver can tell how long claimed jobs waited.
    sender: mpsc::UnboundedSender<(Instant, HandoffEvent)>,
    metrics: Arc<Metrics>,
}

impl HandoffSender {
    /// The worker's metrics, for the roles that hold a sender.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn send(&self, event: HandoffEvent) {
        // A closed channel means the runner is gone; the event has nobody to go to.
        let _ = self.sender.send((Instant::now(), event));
    }

    pub fn log(&self, level: LogLevel, action: &'static str, message: impl Into<String>) {
        self.send(HandoffEvent::Log(LogRecord {
            level,
            action,
            message: message.into(),
            job_id: None,
        }));
    }

    pub fn log_job(
        &self,
        level: LogLevel,
        action: &'static str,
        job_id: i64,
        message: impl Into<String>,
    ) {
        self.send(HandoffEvent::Log(LogRecord {
            level,
            action,
            message: message.into(),
            job_id: Some(job_id),
        }));
    }
}

pub struct HandoffReceiver {
    receiver: Mutex<mpsc::UnboundedReceiver<(Instant, HandoffEvent)>>,
    metrics: Arc<Metrics>,
}

impl HandoffReceiver {
    /// Wait for at least one event and return every event already queued, or `None` once
    /// the core has stopped and everything was delivered. Cancel-safe: an event is only
    /// taken out of the channel by a call that returns it.
    pub async fn next_events(&self, max: usize) -> Option<Vec<HandoffEvent>> {
        let mut receiver = self.receiver.lock().await;
        let mut stamped = Vec::new();
        if receiver.recv_many(&mut stamped, max.max(1)).await == 0 {
            return None;
        }
        Some(self.unstamp(stamped))
    }

    /// Whatever is queued now, without waiting.
    pub fn try_events(&self) -> Vec<HandoffEvent> {
        let mut stamped = Vec::new();
        if let Ok(mut receiver) = self.receiver.try_lock() {
            while let Ok(event) = receiver.try_recv() {
                stamped.push(event);
            }
        }
        self.unstamp(stamped)
    }

    /// The runner starts every job of a batch as soon as it takes the batch: the time a
    /// batch waited here is its jobs' claim-to-start latency.
    fn unstamp(&self, stamped: Vec<(Instant, HandoffEvent)>) -> Vec<HandoffEvent> {
        let now = Instant::now();
        stamped
            .into_iter()
            .map(|(sent, event)| {
                if let HandoffEvent::Jobs(jobs) = &event {
                    self.metrics
                        .observe_claim_to_start(now.duration_since(sent), jobs.len() as u64);
                }
                event
            })
            .collect()
    }
}

pub fn channel(metrics: Arc<Metrics>) -> (HandoffSender, HandoffReceiver) {
    let (sender, receiver) = mpsc::unbounded_channel();
    (
        HandoffSender {
            sender,
            metrics: metrics.clone(),
        },
        HandoffReceiver {
            receiver: Mutex::new(receiver),
            metrics,
        },
    )
}
