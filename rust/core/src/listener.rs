//! The LISTEN connection. A `job_inserted` notification wakes the dispatcher; an
//! `abort_job_requested` one is handed to the runner. Anything else on procrastinate's
//! channels is logged and ignored. A lost connection is re-established with backoff, and
//! the dispatcher is woken after each (re)connect, since notifications sent while the
//! connection was down are gone.

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::{mpsc, watch, Notify};

use crate::connect::{quote_identifier, ConnectionTarget};
use crate::errors::{CoreError, CoreResult};
use crate::handoff::HandoffSender;
use crate::protocol::{HandoffEvent, LogLevel};
use crate::registry::unless_stopped;

pub const ANY_QUEUE_CHANNEL: &str = "procrastinate_any_queue_v1";
pub const QUEUE_CHANNEL_PREFIX: &str = "procrastinate_queue_v1#";

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
                    Ok(client) => Some(client),
                    // A refusal (LISTEN not allowed...) is a clear error at start; a
                    // connection lost on the way is one more reconnect.
                    Err(error) if is_lost(&error) => self.reconnect(sender).await?,
                    Err(error) => return Err(error),
                }
            } else {
                self.reconnect(sender).await?
            };
            let Some(client) = subscribed else {
                return Ok(()); // stopped while reconnecting
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
            let mut ping = tokio::time::interval(self.ping_interval);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.tick().await;
            loop {
                tokio::select! {
                    notification = notifications.recv() => match notification {
                        Some(notification) => self.handle(notification.channel(), notification.payload()),
                        None => break,
                    },
                    _ = ping.tick() => {
                        let ping = tokio::time::timeout(self.response_timeout, client.simple_query(""));
                        let Some(answered) = unless_stopped(&mut stop, ping).await else {
                            return Ok(());
                        };
                        if !matches!(answered, Ok(Ok(_))) {
                            break;
                        }
                    }
                    _ = self.stop.changed() => return Ok(()),
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
        let mut delay = std::time::Duration::from_millis(50);
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
            if started.elapsed() + delay > self.reconnect_timeout {
                return Err(CoreError::ConnectionLost {
                    target: self.target.description().to_string(),
                    budget: self.reconnect_timeout,
                    reason: error.to_string(),
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return Ok(None),
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(2));
        }
    }

    fn handle(&self, channel: &str, payload: &str) {
        match parse_notification(payload) {
            Ok(Notification::JobInserted { .. }) => self.wake.notify_one(),
            Ok(Notification::AbortJobRequested { job_id }) => {
                self.handoff.send(HandoffEvent::Abort(vec![job_id]))
            }
            Err(reason) => {
                let shown: String = payload.chars().take(200).collect();
                self.handoff.log(
                    LogLevel::Warning,
                    "malformed_notification",
                    format!("Ignoring notification on {channel:?}: {reason}: {shown:?}"),
                );
            }
        }
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
