//! [`WorkerCore`]: starts the roles, takes completions from the runner, stops them in order.
//!
//! Start: connect (a clear error if the database is unreachable or the schema missing),
//! prune stalled workers, register (steps run again after a connection lost meanwhile),
//! then spawn the dispatcher, the listener and the
//! registry duties. Stop, in two steps like procrastinate's worker: [`WorkerCore::stop_fetching`]
//! (no new claims, running jobs go on) and [`WorkerCore::shutdown`] (every completion
//! written, background duties stopped, worker unregistered).

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::config::WorkerConfig;
use crate::connect::ConnectionTarget;
use crate::dispatcher::Dispatcher;
use crate::errors::{CoreError, CoreResult};
use crate::handoff::{self, HandoffReceiver};
use crate::listener::{self, Listener};
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::protocol::{Completion, HandoffEvent, LogLevel, Reported};
use crate::registry::{self, Identity, Recovery, Registry};
use crate::timing::{Backoff, FIRST_BACKOFF};

/// How long a stop tries to delete the worker's row: a few seconds, only one after a hard
/// stop.
const UNREGISTER_TRYING: Duration = Duration::from_secs(5);
const UNREGISTER_AFTER_HARD_STOP: Duration = Duration::from_secs(1);

/// The longest wait between two tries of the start-up steps.
const MAX_START_BACKOFF: Duration = Duration::from_secs(1);

/// What the start-up steps leave: the maintenance connection (the registry's from then on),
/// this worker's id, and what the start-up prune did.
struct StartUp {
    maintenance: crate::db::Db,
    worker_id: i64,
    pruned_workers: Vec<i64>,
    recovered_jobs: Vec<i64>,
}

/// Connect, check the schema, prune stalled workers (and, with `recover_stalled_jobs`, put
/// their jobs back to run), register. Only a database unreachable at the very first
/// connect, or without procrastinate's schema, fails the start at once, with a clear
/// error. Anything that passes is tried again, with backoff, for up to `reconnect_timeout`,
/// as at any other time: a connection lost during the steps (a restart, a cut), or a
/// statement refused for a passing reason (a migration holding a lock on the jobs table,
/// a `pg_cancel_backend`, a deadlock).
async fn start_up(
    target: &ConnectionTarget,
    config: &WorkerConfig,
    handoff: &handoff::HandoffSender,
) -> CoreResult<StartUp> {
    let mut maintenance: Option<crate::db::Db> = None;
    let mut connected_once = false;
    let mut trouble_since: Option<Instant> = None;
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_START_BACKOFF);
    let mut warned = false;
    loop {
        let attempt = match maintenance.take() {
            Some(client) if !client.is_closed() => Ok(client),
            _ => target.connect().await,
        };
        let error = match attempt {
            Ok(mut client) => {
                connected_once = true;
                match start_up_steps(&mut client, target, config, handoff).await {
                    Ok((worker_id, pruned_workers, recovered_jobs)) => {
                        if let Some(since) = trouble_since {
                            handoff.log(
                                LogLevel::Info,
                                "start_retried",
                                format!(
                                    "Started after {:.1} s of trying again",
                                    since.elapsed().as_secs_f64()
                                ),
                            );
                        }
                        return Ok(StartUp {
                            maintenance: client,
                            worker_id,
                            pruned_workers,
                            recovered_jobs,
                        });
                    }
                    Err(error) => {
                        maintenance = Some(client);
                        error
                    }
                }
            }
            Err(error) => error,
        };
        let lost = error.is_connectivity()
            || (connected_once && matches!(error, CoreError::Unreachable { .. }));
        if !lost && !error.is_passing() {
            return Err(error);
        }
        let since = *trouble_since.get_or_insert_with(Instant::now);
        let left = config.reconnect_timeout.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(start_given_up(target, config, lost, &error));
        }
        let (action, what) = if lost {
            ("start_connection_lost", "Connection lost while starting")
        } else {
            (
                "start_statement_refused",
                "A start-up statement was refused",
            )
        };
        // The first trouble as a warning; the next tries are details.
        handoff.log(
            if warned {
                LogLevel::Debug
            } else {
                LogLevel::Warning
            },
            action,
            format!(
                "{what} ({error}): trying again for up to {:.0} s",
                left.as_secs_f64()
            ),
        );
        warned = true;
        tokio::time::sleep(backoff.next_delay().min(left)).await;
        if lost {
            maintenance = None;
        }
    }
}

/// The start's error once `reconnect_timeout` is spent: the connection lost, or the
/// database unusable (it kept refusing the start-up statements).
fn start_given_up(
    target: &ConnectionTarget,
    config: &WorkerConfig,
    lost: bool,
    error: &CoreError,
) -> CoreError {
    CoreError::gave_up(
        target.description(),
        config.reconnect_timeout,
        error.to_string(),
        !lost,
    )
}

/// The start-up steps on one connection: the worker id, the pruned workers, the recovered
/// jobs. A prune that fails for another reason than a lost connection (another session's
/// locks) is not worth failing the start for: it is logged, and done next time.
async fn start_up_steps(
    maintenance: &mut crate::db::Db,
    target: &ConnectionTarget,
    config: &WorkerConfig,
    handoff: &handoff::HandoffSender,
) -> CoreResult<(i64, Vec<i64>, Vec<i64>)> {
    registry::check_schema(target, maintenance).await?;
    // At start, as procrastinate's worker does.
    let pruning = if config.recover_stalled_jobs {
        registry::prune_and_recover_stalled_jobs(maintenance, config.stalled_worker_timeout, &[])
            .await
            .map(|recovered| {
                registry::log_recovery(handoff, &recovered);
                (recovered.pruned_workers, recovered.retried)
            })
    } else {
        registry::prune_stalled_workers(maintenance, config.stalled_worker_timeout)
            .await
            .map(|pruned| {
                handoff.metrics().stalled_recovered(pruned.len(), 0, 0);
                (pruned, Vec::new())
            })
    };
    let (pruned_workers, recovered_jobs) = match pruning {
        Ok(done) => done,
        Err(error) if error.is_connectivity() => return Err(error),
        Err(error) => {
            handoff.log(
                LogLevel::Warning,
                "prune_stalled_workers_error",
                format!("Stalled workers not pruned at start: {error}"),
            );
            (Vec::new(), Vec::new())
        }
    };
    let worker_id = registry::register_worker(maintenance).await?;
    Ok((worker_id, pruned_workers, recovered_jobs))
}

struct Running {
    dispatcher: JoinHandle<()>,
    listener: Option<JoinHandle<()>>,
    registry: JoinHandle<Registry>,
    recovery: Option<JoinHandle<()>>,
    stop_background: watch::Sender<bool>,
}

/// Spawn one of the core's roles. Its error, or its panic (a bug), reaches the runner as a
/// fatal error, followed by `then`: never a silent stop that leaves the runner waiting.
fn supervise<F>(
    role: &'static str,
    work: F,
    fatal: handoff::HandoffSender,
    then: Option<HandoffEvent>,
) -> JoinHandle<()>
where
    F: std::future::Future<Output = CoreResult<()>> + Send + 'static,
{
    let work = tokio::spawn(work);
    tokio::spawn(async move {
        let error = match work.await {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error,
            Err(failure) => CoreError::Internal(format!("the {role} stopped: {failure}")),
        };
        fatal.send(HandoffEvent::Fatal(error));
        if let Some(event) = then {
            fatal.send(event);
        }
    })
}

pub struct WorkerCore {
    identity: Arc<Identity>,
    hard_stop: watch::Sender<bool>,
    pruned_workers: Vec<i64>,
    recovered_jobs: Vec<i64>,
    completions: Mutex<Option<mpsc::UnboundedSender<Reported>>>,
    metrics: Arc<Metrics>,
    stop_fetching: watch::Sender<bool>,
    events: HandoffReceiver,
    running: tokio::sync::Mutex<Option<Running>>,
}

/// What the roles are spawned with (see [`WorkerCore::start`]).
struct Roles<'a> {
    config: &'a Arc<WorkerConfig>,
    target: &'a ConnectionTarget,
    identity: &'a Arc<Identity>,
    handoff: &'a handoff::HandoffSender,
    /// Stops the background roles (listener, recovery, registry) once the dispatcher is done.
    stop_background: &'a watch::Receiver<bool>,
    /// The listener's notifications (and the recovery's requeued jobs) wake the dispatcher.
    wake: &'a Arc<Notify>,
}

impl Roles<'_> {
    fn dispatcher(
        &self,
        job_connection: crate::db::Db,
        completions: mpsc::UnboundedReceiver<Reported>,
        stop_fetching: watch::Receiver<bool>,
        hard_stop: watch::Receiver<bool>,
        in_flight: Arc<AtomicUsize>,
    ) -> JoinHandle<()> {
        let dispatcher = Dispatcher {
            target: self.target.clone(),
            config: self.config.clone(),
            identity: self.identity.clone(),
            completions,
            wake: self.wake.clone(),
            stop_fetching,
            hard_stop,
            hard_stop_open: true,
            handoff: self.handoff.clone(),
            in_flight_count: in_flight,
        };
        // Nothing more will be claimed after it fails: let the runner's shutdown go on.
        supervise(
            "dispatcher",
            dispatcher.run(job_connection),
            self.handoff.clone(),
            Some(HandoffEvent::FetchingStopped),
        )
    }

    fn listener(&self, listen_target: ConnectionTarget) -> Option<JoinHandle<()>> {
        let config = self.config;
        if !config.listen_notify {
            return None;
        }
        let listener = Listener {
            target: listen_target,
            channels: listener::channels(config.queues.as_deref()),
            wake: self.wake.clone(),
            handoff: self.handoff.clone(),
            stop: self.stop_background.clone(),
            reconnect_timeout: config.reconnect_timeout,
            response_timeout: config.response_timeout,
            ping_interval: config.response_timeout,
        };
        Some(supervise(
            "listener",
            listener.run(),
            self.handoff.clone(),
            None,
        ))
    }

    fn recovery(&self) -> Option<JoinHandle<()>> {
        self.config.recover_stalled_jobs.then(|| {
            tokio::spawn(
                Recovery {
                    target: self.target.clone(),
                    identity: self.identity.clone(),
                    handoff: self.handoff.clone(),
                    stalled_worker_timeout: self.config.stalled_worker_timeout,
                    response_timeout: self.config.response_timeout,
                    stop: self.stop_background.clone(),
                    wake: self.wake.clone(),
                }
                .run(),
            )
        })
    }

    fn registry(
        &self,
        maintenance: crate::db::Db,
        in_flight: Arc<AtomicUsize>,
    ) -> JoinHandle<Registry> {
        let config = self.config;
        let registry = Registry {
            target: self.target.clone(),
            client: Some(maintenance),
            outage: None,
            identity: self.identity.clone(),
            handoff: self.handoff.clone(),
            in_flight,
            heartbeat_interval: config.update_heartbeat_interval,
            stalled_worker_timeout: config.stalled_worker_timeout,
            abort_polling_interval: config.abort_job_polling_interval,
            response_timeout: config.response_timeout,
            stop: self.stop_background.clone(),
            sample_metrics: config.sample_metrics,
            heartbeat_watch: registry::HeartbeatWatch::new(),
        };
        tokio::spawn(registry.run())
    }
}

/// The job and maintenance connections' target, and the listener's: LISTEN needs a
/// session, so straight to the server (validate() refused a pooler without it).
fn targets(config: &WorkerConfig) -> CoreResult<(ConnectionTarget, ConnectionTarget)> {
    let target = ConnectionTarget::new(&config.connection)?
        .with_response_timeout(config.response_timeout)
        .through_pooler(config.pooler);
    let listen_target = match &config.listen_connection {
        Some(connection) => {
            ConnectionTarget::new(connection)?.with_response_timeout(config.response_timeout)
        }
        None => target.clone(),
    };
    Ok((target, listen_target))
}

impl WorkerCore {
    /// Connect, prune, register and start. Must run inside a tokio runtime.
    pub async fn start(config: WorkerConfig) -> CoreResult<WorkerCore> {
        if config.concurrency == 0 {
            return Err(CoreError::Config("concurrency must be at least 1".into()));
        }
        let config = Arc::new(config);
        config.validate()?;
        let (target, listen_target) = targets(&config)?;
        let metrics = Arc::new(Metrics::with_duration_bounds(
            config.metrics_duration_buckets.as_deref(),
        ));
        let (handoff, events) = handoff::channel(metrics.clone());
        let started = start_up(&target, &config, &handoff).await?;
        // Registering wrote the first heartbeat.
        metrics.heartbeat_written();
        let identity = Arc::new(Identity::new(started.worker_id));
        let job_connection = target
            .connect_with_backoff(config.reconnect_timeout)
            .await?;

        let (completions_sender, completions) = mpsc::unbounded_channel();
        let (stop_fetching, stop_fetching_receiver) = watch::channel(false);
        let (stop_background, stop_background_receiver) = watch::channel(false);
        let (hard_stop, hard_stop_receiver) = watch::channel(false);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let roles = Roles {
            config: &config,
            target: &target,
            identity: &identity,
            handoff: &handoff,
            stop_background: &stop_background_receiver,
            wake: &Arc::new(Notify::new()),
        };
        let running = Running {
            dispatcher: roles.dispatcher(
                job_connection,
                completions,
                stop_fetching_receiver,
                hard_stop_receiver,
                in_flight.clone(),
            ),
            listener: roles.listener(listen_target),
            recovery: roles.recovery(),
            registry: roles.registry(started.maintenance, in_flight),
            stop_background,
        };
        drop(handoff);

        Ok(WorkerCore {
            identity,
            hard_stop,
            pruned_workers: started.pruned_workers,
            recovered_jobs: started.recovered_jobs,
            completions: Mutex::new(Some(completions_sender)),
            metrics,
            stop_fetching,
            events,
            running: tokio::sync::Mutex::new(Some(running)),
        })
    }

    /// This worker's id now (a new one if it was pruned and registered again).
    pub fn worker_id(&self) -> i64 {
        self.identity.current()
    }

    pub fn pruned_workers(&self) -> &[i64] {
        &self.pruned_workers
    }

    /// With `recover_stalled_jobs`: the jobs of pruned workers put back to `todo` at start.
    pub fn recovered_jobs(&self) -> &[i64] {
        &self.recovered_jobs
    }

    /// Record how a claimed job ended. Never blocks; the dispatcher writes it in its next batch.
    pub fn complete(&self, completion: Completion) -> CoreResult<()> {
        self.complete_many(vec![completion])
    }

    /// Record several outcomes at once: they reach the dispatcher together, so they go out
    /// in the same batch.
    pub fn complete_many(&self, completions: Vec<Completion>) -> CoreResult<()> {
        self.report(Reported {
            completions,
            durations: Vec::new(),
        })
    }

    /// Like [`WorkerCore::complete_many`], with how long each job ran (for the metrics).
    pub fn report(&self, reported: Reported) -> CoreResult<()> {
        if reported.completions.is_empty() {
            return Ok(());
        }
        let guard = self.completions.lock().map_err(|_| CoreError::ShutDown)?;
        match guard.as_ref() {
            Some(sender) => sender.send(reported).map_err(|_| CoreError::ShutDown),
            None => Err(CoreError::ShutDown),
        }
    }

    /// Counters and histograms as of now.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// A hard stop (a second signal): stop claiming, and once the runner has shut down,
    /// give up at once on outcomes that an unreachable database keeps from being written,
    /// instead of trying for the rest of the reconnect budget.
    pub fn hard_stop(&self) {
        self.stop_fetching();
        let _ = self.hard_stop.send(true);
    }

    /// Stop claiming jobs, at once. Completions are still written.
    pub fn stop_fetching(&self) {
        let _ = self.stop_fetching.send(true);
    }

    /// Wait for the next events; `None` once the core is shut down and all was delivered.
    pub async fn next_events(&self, max: usize) -> Option<Vec<HandoffEvent>> {
        self.events.next_events(max).await
    }

    /// A descriptor that turns readable when [`WorkerCore::take_events`] has events (Unix).
    pub fn events_fd(&self) -> Option<i32> {
        self.events.doorbell_fd()
    }

    /// Every event queued now, or `None` once the core is shut down and all was delivered.
    /// For a runner that watches [`WorkerCore::events_fd`].
    pub fn take_events(&self) -> Option<Vec<HandoffEvent>> {
        self.events.take_events()
    }

    /// Write every reported completion, stop everything, unregister the worker.
    /// Jobs claimed but never completed stay `doing` (as a killed worker's would).
    pub async fn shutdown(&self) -> CoreResult<()> {
        self.stop_fetching();
        if let Ok(mut completions) = self.completions.lock() {
            completions.take();
        }
        let Some(running) = self.running.lock().await.take() else {
            return Ok(());
        };
        // The dispatcher exits once every completion is written (or on a fatal error,
        // which it has already handed over).
        let _ = running.dispatcher.await;
        let _ = running.stop_background.send(true);
        if let Some(listener) = running.listener {
            let _ = listener.await;
        }
        if let Some(recovery) = running.recovery {
            let _ = recovery.await;
        }
        let mut registry = running
            .registry
            .await
            .map_err(|failure| CoreError::Internal(format!("the registry stopped: {failure}")))?;
        let hard_stopped = *self.hard_stop.borrow();
        if hard_stopped && registry.client.as_ref().is_none_or(|c| c.is_closed()) {
            // A hard stop with the database out of reach: the row will be pruned as stalled.
            return Ok(());
        }
        // Best effort, as a killed worker's row is pruned anyway: a row left behind holds
        // no job (every outcome was written, or reported lost, before this point). A hard
        // stop tries only briefly.
        let trying = if hard_stopped {
            UNREGISTER_AFTER_HARD_STOP
        } else {
            UNREGISTER_TRYING
        };
        if let Err(error) = registry.unregister(trying).await {
            registry.handoff.log(
                LogLevel::Warning,
                "unregister_failed",
                format!(
                    "Could not unregister worker {} ({error}); its row will be pruned as \
                     stalled",
                    self.identity.current()
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_role_is_a_fatal_error_not_a_hang() {
        let (sender, events) = handoff::channel(Arc::new(Metrics::default()));
        let role = supervise(
            "dispatcher",
            async { panic!("boom") },
            sender,
            Some(HandoffEvent::FetchingStopped),
        );
        role.await.unwrap();
        let events = events.next_events(10).await.unwrap();
        assert!(matches!(
            events.as_slice(),
            [HandoffEvent::Fatal(CoreError::Internal(message)), HandoffEvent::FetchingStopped]
                if message.contains("dispatcher") && message.contains("boom")
        ));
    }
}
