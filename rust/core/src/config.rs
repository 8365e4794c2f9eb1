//! What the core needs to know: the procrastinate `WorkerOptions` that concern claiming,
//! listening and bookkeeping. Running tasks (middleware, retry, context) is the Python side's.

use std::collections::HashMap;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// libpq-style connection string (`key=value ...` or `postgresql://` URL).
    pub conninfo: String,
    /// `None` listens to and claims from every queue.
    pub queues: Option<Vec<String>>,
    /// Jobs in `doing` held by this worker never exceed this.
    pub concurrency: usize,
    /// `false`: claim until the queue is empty, then report [`crate::HandoffEvent::Drained`].
    pub wait: bool,
    pub fetch_job_polling_interval: Duration,
    pub abort_job_polling_interval: Duration,
    pub listen_notify: bool,
    pub update_heartbeat_interval: Duration,
    pub stalled_worker_timeout: Duration,
    /// How long connectivity may be lost before the core gives up with a fatal error.
    pub reconnect_timeout: Duration,
    /// How long a statement may go unanswered before its connection is taken for dead (a
    /// half-open connection: the peer stopped answering without closing) and replaced.
    pub response_timeout: Duration,
    /// Not in procrastinate: at start (and every `stalled_worker_timeout`), put the `doing`
    /// jobs of the stalled workers it prunes back to `todo` (`procrastinate_retry_job_v2`).
    /// Off by default, like procrastinate, whose pruned workers' jobs stay `doing`.
    pub recover_stalled_jobs: bool,
    /// Upper bound of a claimed batch, whatever the free slots (keeps statements short).
    pub max_batch_size: usize,
    /// Not in procrastinate: at most this many jobs of a queue in `doing` at once for this
    /// worker (procrastinate issue #1552). Queues not listed share `concurrency`.
    pub queue_concurrency: HashMap<String, usize>,
}

impl WorkerConfig {
    pub fn new(conninfo: impl Into<String>) -> Self {
        WorkerConfig {
            conninfo: conninfo.into(),
            queues: None,
            concurrency: 1,
            wait: true,
            fetch_job_polling_interval: Duration::from_secs(5),
            abort_job_polling_interval: Duration::from_secs(5),
            listen_notify: true,
            update_heartbeat_interval: Duration::from_secs(10),
            stalled_worker_timeout: Duration::from_secs(30),
            reconnect_timeout: Duration::from_secs(60),
            response_timeout: Duration::from_secs(30),
            recover_stalled_jobs: false,
            max_batch_size: 500,
            queue_concurrency: HashMap::new(),
        }
    }
}
