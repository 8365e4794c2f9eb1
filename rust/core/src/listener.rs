//! The LISTEN connection. A `job_inserted` notification wakes the dispatcher; an
//! `abort_job_requested` one is handed to the runner. Anything else on procrastinate's
//! channels is logged and ignored. A lost connection is re-established with backoff, and
//! the dispatcher is woken after each (re)connect, since notifications sent while the
//! connection was down are gone.
//!
//! Any role may NOTIFY on these channels, as fast as it likes: what a notification costs
//! is bounded. Notifications are taken in batches, each batch wakes the dispatcher at most
//! once and hands its abort requests over in one event, and malformed ones are logged at
//! most once per [`MALFORMED_LOG_PERIOD`] (the first in full, then a count).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, watch, Notify};

use crate::connect::{quote_identifier, ConnectionTarget};
use crate::errors::{CoreError, CoreResult};
use crate::handoff::HandoffSender;
use crate::protocol::{HandoffEvent, LogLevel};
use crate::registry::unless_stopped;
use crate::timing::{ticker, Backoff, FIRST_BACKOFF};

pub const ANY_QUEUE_CHANNEL: &str = "procrastinate_any_queue_v1";
pub const QUEUE_CHANNEL_PREFIX: &str = "procrastinate_queue_v1#";
/// Malformed notifications after a logged one are counted, and the count logged, once per
/// this period.
pub const MALFORMED_LOG_PERIOD: Duration = Duration::from_secs(10);
/// At most this many notifications are taken from the connection at once.
const NOTIFICATION_BATCH: usize = 1024;

/// The longest wait between two attempts to listen again after the connection was lost:
/// short, so that notifications resume soon after the database is back.
const MAX_RESUBSCRIBE_BACKOFF: Duration = Duration::from_secs(2);

/// The channels procrastinate's worker listens on for these queues.
pub fn channels(queues: Option<&[String]>) -> Vec<String> {
    match queues {
        None => vec![ANY_QUEUE_CHANNEL.to_string()],
        Some(queues) => queues
            .iter()
            .map(|queue| format!("{QUEUE_CHANNEL_PREFIX}{queue}"))
            .collect(),
    }
}

/// `LISTEN "channel";` for each channel, quoted as identifiers.
pub fn listen_statements(channels: &[String]) -> String {
    channels
        .iter()
        .map(|channel| format!("LISTEN {};", quote_identifier(channel)))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Debug, PartialEq, Eq)]
pub enum Notification {
    JobInserted { job_id: Option<i64> },
    AbortJobRequested { job_id: i64 },
}

#[derive(Deserialize)]
struct Payload {
    #[serde(rename = "type")]
    kind: String,
    job_id: Option<i64>,
}

/// Parse a payload of procrastinate's triggers. `Err` carries why it was refused.
pub fn parse_notification(payload: &str) -> Result<Notification, String> {
    let payload: Payload = serde_json::from_str(payload)
        .map_err(|error| format!("not a procrastinate notification ({error})"))?;
    match payload.kind.as_str() {
        "job_inserted" => Ok(Notification::JobInserted {
            job_id: payload.job_id,
        }),
        "abort_job_requested" => match payload.job_id {
            Some(job_id) => Ok(Notification::AbortJobRequested { job_id }),
            None => Err("abort_job_requested without a job_id".to_string()),
        },
        other => Err(format!("unknown notification type {other:?}")),
    }
}

pub struct Listener {
    pub target: ConnectionTarget,
    pub channels: Vec<String>,
    pub wake: Arc<Notify>,
    pub handoff: HandoffSender,
    pub stop: watch::Receiver<bool>,
    pub reconnect_timeout: std::time::Duration,
    pub response_timeout: std::time::Duration,
    /// How often an idle connection is asked whether it still answers.
    pub ping_interval: std::time::Duration,
}

impl Listener {
    pub async fn run(mut self) -> CoreResult<()> {
        let mut first = true;
        let mut malformed = MalformedLog::new(MALFORMED_LOG_PERIOD);
        let mut batch = Vec::with_capacity(NOTIFICATION_BATCH);
        // A stop ends a connect or a ping in progress at once.
        let mut stop = self.stop.clone();
        loop {
            let (sender, mut notifications) = mpsc::unbounded_channel();
            let subscribed = if first {
                let Some(subscribed) =
                    unless_stopped(&mut stop, self.subscribe(sender.clone())).await
                else {
                    return Ok(());
                };
                match subscribed {
                    Ok(client) => {
                        // The connection's task holds the only sender: its end (the
                        // connection died) closes the channel, and is seen at once.
                        drop(sender);
                        Some(client)
                    }
                    // A refusal (LISTEN not allowed...) is a clear error at start; a
                    // connection lost on the way, or a statement refused for a passing
                    // reason (a cancel), is one more reconnect.
                    Err(error) if is_lost(&error) || error.is_passing() => {
                        self.handoff.log(
                            LogLevel::Warning,
                            "listener_set_up_failed",
                            format!(
                                "Could not listen for notifications ({error}): trying again \
                                 for up to {:.0} s",
                                self.reconnect_timeout.as_secs_f64()
                            ),
                        );
                        self.reconnect(sender).await?
                    }
                    Err(error) => return Err(error),
                }
            } else {
                self.reconnect(sender).await?
            };
            let Some(client) = subscribed else {
                // Stopped while reconnecting.
                self.log_unlogged(malformed.period_ended());
                return Ok(());
            };
            if !first {
                self.handoff.log(
                    LogLevel::Info,
                    "listener_reconnected",
                    format!(
                        "Listening for notifications again on {}",
                        self.target.description()
                    ),
                );
            }
            first = false;
            self.handoff.metrics().set_connected("listener", true);
            // Anything inserted before this point, or while disconnected, was not notified.
            self.wake.notify_one();
            // A connection that stops answering without closing (half-open) would never
            // deliver a notification again: ask it something now and then.
            let mut ping = ticker(self.ping_interval);
            loop {
                // The count of unlogged malformed notifications is due at the period's end.
                let summary_due = malformed.period_end();
                let summary_at = tokio::time::Instant::from_std(
                    summary_due.unwrap_or_else(std::time::Instant::now),
                );
                tokio::select! {
                    received = notifications.recv_many(&mut batch, NOTIFICATION_BATCH) => {
                        if received == 0 {
                            break;
                        }
                        self.handle(&batch, &mut malformed);
                        batch.clear();
                    }
                    _ = ping.tick() => {
                        let ping = tokio::time::timeout(self.response_timeout, client.simple_query(""));
                        let Some(answered) = unless_stopped(&mut stop, ping).await else {
                            return Ok(());
                        };
                        if !matches!(answered, Ok(Ok(_))) {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(summary_at), if summary_due.is_some() => {
                        self.log_unlogged(malformed.period_ended());
                    }
                    _ = self.stop.changed() => {
                        self.log_unlogged(malformed.period_ended());
                        return Ok(());
                    }
                }
            }
            self.handoff.metrics().set_connected("listener", false);
            self.handoff.log(
                LogLevel::Warning,
                "listener_connection_lost",
                format!(
                    "Lost the notification connection to {}; reconnecting",
                    self.target.description()
                ),
            );
        }
    }

    /// A connection, subscribed to the channels.
    async fn subscribe(
        &self,
        sender: mpsc::UnboundedSender<tokio_postgres::Notification>,
    ) -> CoreResult<tokio_postgres::Client> {
        let client = self.target.connect_listening(sender).await?;
        let listening = tokio::time::timeout(
            self.response_timeout,
            client.batch_execute(&listen_statements(&self.channels)),
        )
        .await;
        match listening {
            Ok(Ok(())) => Ok(client),
            Ok(Err(error)) => Err(CoreError::database("subscribing to notifications", error)),
            Err(_) => Err(CoreError::Unreachable {
                target: self.target.description().to_string(),
                reason: "no answer to LISTEN".into(),
            }),
        }
    }

    /// `None`: stopped while the database was away.
    async fn reconnect(
        &self,
        sender: mpsc::UnboundedSender<tokio_postgres::Notification>,
    ) -> CoreResult<Option<tokio_postgres::Client>> {
        let started = std::time::Instant::now();
        let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_RESUBSCRIBE_BACKOFF);
        let mut stop = self.stop.clone();
        loop {
            let Some(subscribed) = unless_stopped(&mut stop, self.subscribe(sender.clone())).await
            else {
                // Stopping while the database is away: nothing left to listen for.
                return Ok(None);
            };
            let error = match subscribed {
                Ok(client) => return Ok(Some(client)),
                Err(error) => error,
            };
            let delay = backoff.next_delay();
            if started.elapsed() + delay > self.reconnect_timeout {
                return Err(CoreError::gave_up(
                    self.target.description(),
                    self.reconnect_timeout,
                    error.to_string(),
                    error.is_passing(),
                ));
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return Ok(None),
            }
        }
    }

    /// One batch of notifications: one wake-up of the dispatcher at most, one event for
    /// its abort requests, and malformed ones logged as `malformed` allows.
    fn handle(&self, batch: &[tokio_postgres::Notification], malformed: &mut MalformedLog) {
        let mut wake = false;
        let mut aborts = Vec::new();
        for notification in batch {
            match parse_notification(notification.payload()) {
                Ok(Notification::JobInserted { .. }) => wake = true,
                Ok(Notification::AbortJobRequested { job_id }) => aborts.push(job_id),
                Err(reason) => {
                    if malformed.record() {
                        let shown: String = notification.payload().chars().take(200).collect();
                        self.handoff.log(
                            LogLevel::Warning,
                            "malformed_notification",
                            format!(
                                "Ignoring notification on {:?}: {reason}: {shown:?} (more \
                                 malformed ones are counted, and the count logged every {} s)",
                                notification.channel(),
                                MALFORMED_LOG_PERIOD.as_secs()
                            ),
                        );
                    }
                }
            }
        }
        if wake {
            self.wake.notify_one();
        }
        if !aborts.is_empty() {
            aborts.sort_unstable();
            aborts.dedup();
            self.handoff.send(HandoffEvent::Abort(aborts));
        }
    }

    /// Logs how many malformed notifications went unlogged, if any did.
    fn log_unlogged(&self, unlogged: Option<(u64, Duration)>) {
        if let Some((count, over)) = unlogged {
            self.handoff.log(
                LogLevel::Warning,
                "malformed_notifications_counted",
                format!(
                    "... and {count} more malformed notifications ignored in the last {:.1} s",
                    over.as_secs_f64()
                ),
            );
        }
    }
}

/// Rate-limits the log of malformed notifications: the first is logged in full and starts
/// a period; the ones after it in that period are only counted, and the count is logged at
/// its end, which starts the next period if there were any (a quiet period ends it, so the
/// next malformed notification is logged in full again).
#[derive(Debug)]
pub struct MalformedLog {
    period: Duration,
    /// When the current period started, while one runs.
    started: Option<std::time::Instant>,
    /// Malformed notifications in the current period not logged.
    unlogged: u64,
}

impl MalformedLog {
    pub fn new(period: Duration) -> MalformedLog {
        MalformedLog {
            period,
            started: None,
            unlogged: 0,
        }
    }

    /// One more malformed notification: `true` if it is to be logged in full.
    pub fn record(&mut self) -> bool {
        if self.started.is_some() {
            self.unlogged += 1;
            false
        } else {
            self.started = Some(std::time::Instant::now());
            true
        }
    }

    /// When the current period ends (`None`: no period runs).
    pub fn period_end(&self) -> Option<std::time::Instant> {
        self.started.map(|started| started + self.period)
    }

    /// Ends the current period: how many went unlogged in it, and over how long, if any.
    pub fn period_ended(&mut self) -> Option<(u64, Duration)> {
        let started = self.started?;
        let unlogged = std::mem::take(&mut self.unlogged);
        if unlogged == 0 {
            self.started = None;
            return None;
        }
        let now = std::time::Instant::now();
        self.started = Some(now);
        Some((unlogged, now.duration_since(started)))
    }
}

fn is_lost(error: &CoreError) -> bool {
    error.is_connectivity() || matches!(error, CoreError::Unreachable { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_procrastinate_payloads() {
        assert_eq!(
            parse_notification(r#"{"type": "job_inserted", "job_id": 12}"#),
            Ok(Notification::JobInserted { job_id: Some(12) })
        );
        assert_eq!(
            parse_notification(r#"{"type": "abort_job_requested", "job_id": 7}"#),
            Ok(Notification::AbortJobRequested { job_id: 7 })
        );
    }

    #[test]
    fn refuses_malformed_payloads() {
        assert!(parse_notification("").is_err());
        assert!(parse_notification("{not json").is_err());
        assert!(parse_notification(r#"{"type": "something_else"}"#).is_err());
        assert!(parse_notification(r#"{"type": "abort_job_requested"}"#).is_err());
        assert!(parse_notification(r#"{"type": "abort_job_requested", "job_id": "x"}"#).is_err());
        assert!(parse_notification("[1, 2]").is_err());
    }

    #[test]
    fn malformed_notifications_are_logged_once_per_period() {
        let mut log = MalformedLog::new(Duration::from_secs(3600));
        assert_eq!(log.period_end(), None);
        assert!(log.record()); // the first, in full
        assert!(log.period_end().is_some());
        for _ in 0..99_999 {
            assert!(!log.record());
        }
        let (count, _) = log.period_ended().unwrap_or_default();
        assert_eq!(count, 99_999);
        // A period with some starts another: they are still counted...
        assert!(!log.record());
        assert_eq!(log.period_ended().map(|(count, _)| count), Some(1));
        // ...and a quiet one ends it: the next is logged in full again.
        assert_eq!(log.period_ended(), None);
        assert_eq!(log.period_end(), None);
        assert!(log.record());
    }

    #[test]
    fn channels_follow_procrastinate() {
        assert_eq!(channels(None), vec!["procrastinate_any_queue_v1"]);
        let queues = vec!["a".to_string(), "we\"ird q".to_string()];
        let names = channels(Some(&queues));
        assert_eq!(
            names,
            vec![
                "procrastinate_queue_v1#a",
                "procrastinate_queue_v1#we\"ird q"
            ]
        );
        assert_eq!(
            listen_statements(&names),
            "LISTEN \"procrastinate_queue_v1#a\"; LISTEN \"procrastinate_queue_v1#we\"\"ird q\";"
        );
    }
}
