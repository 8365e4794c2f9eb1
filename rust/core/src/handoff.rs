//! The channel from the core to the runner. Jobs cross it in batches (one wake-up of the
//! runner per batch, never one per job), together with abort requests, the end of a
//! `wait=False` drain, log records and a fatal error, in the order they happened.
//!
//! A runner takes events either by awaiting [`HandoffReceiver::next_events`], or, on Unix,
//! by watching the [`Doorbell`]'s file descriptor in its own event loop and calling
//! [`HandoffReceiver::take_events`] when it is readable. The second way wakes an asyncio
//! loop with one byte on a socket, from the core's thread, without a thread that must take
//! the GIL to resolve a future: it is the shorter path from a claim to a running job.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Mutex};

use crate::metrics::Metrics;
use crate::protocol::{HandoffEvent, LogLevel, LogRecord};

/// Rings a file descriptor when events are waiting. At most one byte is in flight: the
/// sender writes only when the bell was not already rung, and the reader answers it (drains
/// the socket, then clears the flag) before it takes the events, so no event is left behind
/// without a byte to announce it.
#[cfg(unix)]
pub struct Doorbell {
    reader: std::os::unix::net::UnixStream,
    writer: std::os::unix::net::UnixStream,
    rung: std::sync::atomic::AtomicBool,
}

#[cfg(unix)]
impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        let (reader, writer) = std::os::unix::net::UnixStream::pair()?;
        reader.set_nonblocking(true)?;
        writer.set_nonblocking(true)?;
        Ok(Doorbell {
            reader,
            writer,
            rung: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The descriptor to watch for reading.
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.reader.as_raw_fd()
    }

    fn ring(&self) {
        use std::io::Write;
        use std::sync::atomic::Ordering;
        if !self.rung.swap(true, Ordering::SeqCst) {
            // Full buffer: a byte is already waiting, which is all the reader needs.
            let _ = (&self.writer).write(&[1]);
        }
    }

    fn answer(&self) {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let mut buffer = [0u8; 64];
        while matches!((&self.reader).read(&mut buffer), Ok(read) if read > 0) {}
        self.rung.store(false, Ordering::SeqCst);
    }
}

#[cfg(not(unix))]
pub struct Doorbell;

#[cfg(not(unix))]
impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
    }

    pub fn fd(&self) -> i32 {
        -1
    }

    fn ring(&self) {}

    fn answer(&self) {}
}

#[derive(Clone)]
pub struct HandoffSender {
    // Stamped when sent, so the receiver can tell how long claimed jobs waited. `None` only
    // while dropping (see `Drop`).
    sender: Option<mpsc::UnboundedSender<(Instant, HandoffEvent)>>,
    doorbell: Option<Arc<Doorbell>>,
    metrics: Arc<Metrics>,
}

impl Drop for HandoffSender {
    /// The last sender gone closes the channel: ring after closing, so a runner that
    /// watches the doorbell wakes up to see the end.
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring();
        }
    }
}

impl HandoffSender {
    /// The worker's metrics, for the roles that hold a sender.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn send(&self, event: HandoffEvent) {
        // A closed channel means the runner is gone; the event has nobody to go to.
        if let Some(sender) = &self.sender {
            let _ = sender.send((Instant::now(), event));
        }
        if let Some(doorbell) = &self.doorbell {
            doorbell.ring();
        }
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
    doorbell: Option<Arc<Doorbell>>,
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

    /// The doorbell's descriptor, if this platform has one: readable when
    /// [`HandoffReceiver::take_events`] has something to return.
    pub fn doorbell_fd(&self) -> Option<i32> {
        self.doorbell.as_ref().map(|doorbell| doorbell.fd())
    }

    /// For a runner woken by the doorbell: every event queued now, or `None` once the core
    /// has stopped and everything was delivered. Answers the doorbell first, so an event
    /// sent while this runs rings it again.
    pub fn take_events(&self) -> Option<Vec<HandoffEvent>> {
        if let Some(doorbell) = &self.doorbell {
            doorbell.answer();
        }
        let Ok(mut receiver) = self.receiver.try_lock() else {
            // Someone awaits `next_events`: the events go to them.
            return Some(Vec::new());
        };
        let mut stamped = Vec::new();
        loop {
            match receiver.try_recv() {
                Ok(event) => stamped.push(event),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if stamped.is_empty() {
                        return None;
                    }
                    // Deliver these now and the end on the next call.
                    if let Some(doorbell) = &self.doorbell {
                        doorbell.ring();
                    }
                    break;
                }
            }
        }
        Some(self.unstamp(stamped))
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
    // Without a socket pair (no Unix, or no descriptors left) the runner awaits instead.
    let doorbell = Doorbell::new().ok().map(Arc::new);
    (
        HandoffSender {
            sender: Some(sender),
            doorbell: doorbell.clone(),
            metrics: metrics.clone(),
        },
        HandoffReceiver {
            receiver: Mutex::new(receiver),
            doorbell,
            metrics,
        },
    )
}

#[cfg(all(test, unix))]
// clippy exempts `cfg(test)` modules from these, not `cfg(all(test, unix))` ones.
#[allow(clippy::expect_used, clippy::panic, reason = "a test")]
mod tests {
    use super::*;
    use std::io::Read;

    /// Bytes waiting on the doorbell's socket (taking them, as the runner would).
    fn bytes_waiting(receiver: &HandoffReceiver) -> usize {
        let doorbell = receiver.doorbell.as_ref().expect("a doorbell on Unix");
        let mut buffer = [0u8; 16];
        match (&doorbell.reader).read(&mut buffer) {
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn the_doorbell_rings_once_per_wait_and_again_after_an_answer() {
        let (sender, receiver) = channel(Arc::new(Metrics::default()));
        assert!(receiver.doorbell_fd().is_some());
        assert_eq!(bytes_waiting(&receiver), 0);

        sender.send(HandoffEvent::Abort(vec![1]));
        sender.send(HandoffEvent::Abort(vec![2]));
        assert_eq!(receiver.take_events().map(|events| events.len()), Some(2));

        sender.send(HandoffEvent::Abort(vec![3]));
        sender.send(HandoffEvent::Drained);
        // One byte for both: the bell was not answered in between.
        assert_eq!(bytes_waiting(&receiver), 1);
        assert_eq!(receiver.take_events().map(|events| events.len()), Some(2));
        assert_eq!(bytes_waiting(&receiver), 0);

        // Answered: the next event rings again.
        sender.send(HandoffEvent::Abort(vec![4]));
        assert_eq!(bytes_waiting(&receiver), 1);
        assert_eq!(receiver.take_events().map(|events| events.len()), Some(1));
    }

    #[test]
    fn the_last_sender_gone_rings_and_ends_the_events() {
        let (sender, receiver) = channel(Arc::new(Metrics::default()));
        let second = sender.clone();
        sender.send(HandoffEvent::Drained);
        drop(sender);
        drop(second);
        // The queued event first, then the end, each announced by the bell.
        assert_eq!(receiver.take_events().map(|events| events.len()), Some(1));
        assert_eq!(bytes_waiting(&receiver), 1);
        assert!(receiver.take_events().is_none());
    }
}
