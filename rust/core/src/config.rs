//! What the core needs to know: the procrastinate `WorkerOptions` that concern claiming,
//! listening and bookkeeping, and fastworker's own that take effect here. Running tasks
//! (middleware, retry, context) is the Python side's.
//!
//! The runner hands these over as one mapping of option names to values (the binding
//! deserializes it with serde): a new option is a field here and an entry of the Python
//! option table (`python/fastworker/options.py`), nothing in between. Durations travel as
//! seconds.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::errors::{CoreError, CoreResult};
use crate::params::ConnectionParams;

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Where to connect: libpq's keywords as libpq resolved them (its `Debug` hides the
    /// password).
    pub connection: ConnectionParams,
    /// fastworker's `pooler`: `connection` goes through a transaction pooler (PgBouncer
    /// `pool_mode = transaction`): no named prepared statements, settings per transaction
    /// (see [`crate::db`]). LISTEN then needs `listen_connection`, or `listen_notify` off.
    pub pooler: bool,
    /// fastworker's `listen_dsn`, resolved: where the LISTEN connection goes (straight to
    /// the server, where `connection` goes through a pooler). `None`: `connection`.
    pub listen_connection: Option<ConnectionParams>,
    /// `None` listens to and claims from every queue.
    pub queues: Option<Vec<String>>,
    /// Jobs in `doing` held by this worker never exceed this.
    pub concurrency: usize,
    /// `false`: claim until the queue is empty, then report [`crate::HandoffEvent::Drained`].
    pub wait: bool,
    #[serde(deserialize_with = "interval")]
    pub fetch_job_polling_interval: Duration,
    #[serde(deserialize_with = "interval")]
    pub abort_job_polling_interval: Duration,
    pub listen_notify: bool,
    #[serde(deserialize_with = "interval")]
    pub update_heartbeat_interval: Duration,
    #[serde(deserialize_with = "seconds")]
    pub stalled_worker_timeout: Duration,
    /// How long connectivity may be lost before the core gives up with a fatal error.
    #[serde(deserialize_with = "seconds")]
    pub reconnect_timeout: Duration,
    /// How long a statement may go unanswered before its connection is taken for dead (a
    /// half-open connection: the peer stopped answering without closing) and replaced.
    #[serde(deserialize_with = "seconds")]
    pub response_timeout: Duration,
    /// Not in procrastinate: at start (and every `stalled_worker_timeout`), put the `doing`
    /// jobs of the stalled workers it prunes back to `todo` (`procrastinate_retry_job_v2`),
    /// and those left without a worker as long. On by default (a fleet heals itself: a
    /// killed worker's running jobs run again, at least once); procrastinate leaves them
    /// `doing` for ever.
    pub recover_stalled_jobs: bool,
    /// Upper bound of a claimed batch, whatever the free slots (keeps statements short).
    pub max_batch_size: usize,
    /// Not in procrastinate: at most this many jobs of a queue in `doing` at once for this
    /// worker (procrastinate issue #1552). Queues not listed share `concurrency`.
    #[serde(deserialize_with = "none_as_empty")]
    pub queue_concurrency: HashMap<String, usize>,
    /// Not in procrastinate (issue #1262): claim no more than this many jobs in all, then
    /// stop claiming and report [`crate::HandoffEvent::Drained`], so the worker ends once
    /// they have run (process recycling).
    pub max_jobs: Option<u64>,
    /// The app's registered task names, for the metric labels: jobs of other task names
    /// are counted under [`crate::metrics::UNKNOWN_TASK_LABEL`]. `None`: not known.
    pub task_names: Option<Vec<String>>,
    /// The runner serves metrics: sample the queue depth and the jobs' waits (a statement
    /// each every few seconds, on the registry's connection).
    pub sample_metrics: bool,
    /// Bounds, in seconds, of the histograms of how long jobs ran and waited; `None`:
    /// [`crate::metrics::JOB_DURATION_BUCKETS`].
    pub metrics_duration_buckets: Option<Vec<f64>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            connection: ConnectionParams::default(),
            pooler: false,
            listen_connection: None,
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
            recover_stalled_jobs: true,
            max_batch_size: 500,
            queue_concurrency: HashMap::new(),
            max_jobs: None,
            task_names: None,
            sample_metrics: false,
            metrics_duration_buckets: None,
        }
    }
}

impl WorkerConfig {
    pub fn new(connection: ConnectionParams) -> Self {
        WorkerConfig {
            connection,
            ..WorkerConfig::default()
        }
    }

    /// The Rust API's string form: libpq's `key=value` syntax, every other option at its
    /// default.
    pub fn from_conninfo(conninfo: &str) -> CoreResult<Self> {
        Ok(Self::new(ConnectionParams::from_key_values(conninfo)?))
    }

    /// The settings no statement could work with.
    pub fn validate(&self) -> CoreResult<()> {
        let problem = if self.concurrency == 0 {
            Some("concurrency must be at least 1".to_string())
        } else if self.max_batch_size == 0 {
            Some("max_batch_size must be at least 1".to_string())
        } else if self.response_timeout.is_zero() {
            Some("response_timeout must be positive".to_string())
        } else if self.pooler && self.listen_notify && self.listen_connection.is_none() {
            Some(
                "behind a transaction pooler (pooler=True), LISTEN/NOTIFY does not reach the \
                 worker: give listen_dsn, a connection string straight to the PostgreSQL \
                 server, or set listen_notify=False (new jobs are then found by polling, \
                 every fetch_job_polling_interval)"
                    .to_string(),
            )
        } else if let Some(problem) = self.bucket_problem() {
            Some(problem)
        } else if let Some(problem) = self.queue_name_problem() {
            Some(problem)
        } else {
            self.queue_concurrency
                .iter()
                .find(|(_, limit)| **limit == 0)
                .map(|(queue, _)| format!("queue_concurrency[{queue:?}] must be at least 1"))
        };
        match problem {
            Some(problem) => Err(CoreError::Config(problem)),
            None => Ok(()),
        }
    }
}

impl WorkerConfig {
    /// A queue name PostgreSQL cannot hold: with a NUL in it, every claim would fail (text
    /// cannot contain NUL), for ever.
    fn queue_name_problem(&self) -> Option<String> {
        let queues = self.queues.iter().flatten().map(|queue| ("queues", queue));
        let limited = self
            .queue_concurrency
            .keys()
            .map(|queue| ("queue_concurrency", queue));
        queues
            .chain(limited)
            .find(|(_, queue)| queue.contains('\0'))
            .map(|(option, queue)| {
                format!(
                    "{option}: the queue name {queue:?} contains a NUL character, which \
                     PostgreSQL text cannot hold (no job can be in that queue)"
                )
            })
    }

    fn bucket_problem(&self) -> Option<String> {
        let bounds = self.metrics_duration_buckets.as_ref()?;
        let increasing = bounds.windows(2).all(|pair| pair[0] < pair[1]);
        let valid = bounds.iter().all(|bound| bound.is_finite() && *bound > 0.0);
        (bounds.is_empty() || !increasing || !valid).then(|| {
            format!(
                "metrics_duration_buckets must be positive numbers of seconds in increasing \
                 order, got {bounds:?}"
            )
        })
    }
}

/// A duration given in seconds.
fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let value = f64::deserialize(deserializer)?;
    Duration::try_from_secs_f64(value).map_err(|_| {
        serde::de::Error::custom(format!(
            "must be a non-negative number of seconds, got {value}"
        ))
    })
}

/// A polling or heartbeat interval in seconds. procrastinate sleeps for it, so
/// `float("inf")` (or any huge value) means "never": such values become a century, which
/// timers can still add.
fn interval<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    const NEVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    let value = f64::deserialize(deserializer)?;
    if value >= NEVER.as_secs_f64() {
        return Ok(NEVER); // infinity too
    }
    Duration::try_from_secs_f64(value).map_err(|_| {
        serde::de::Error::custom(format!(
            "must be a non-negative number of seconds, got {value}"
        ))
    })
}

fn none_as_empty<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<HashMap<String, usize>, D::Error> {
    Ok(Option::<HashMap<String, usize>>::deserialize(deserializer)?.unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<WorkerConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn options_arrive_by_name_with_seconds_as_durations() {
        let config = parse(
            r#"{"connection": {"dbname": "x", "password": "s3cret"}, "concurrency": 4, "update_heartbeat_interval": 0.5,
                "queue_concurrency": {"emails": 2}, "max_jobs": 10}"#,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(config.concurrency, 4);
        assert_eq!(config.update_heartbeat_interval, Duration::from_millis(500));
        assert_eq!(config.queue_concurrency.get("emails"), Some(&2));
        assert_eq!(config.max_jobs, Some(10));
        // What was not given keeps its default.
        assert_eq!(config.max_batch_size, 500);
        assert!(config.validate().is_ok());
        assert_eq!(config.connection.dbname.as_deref(), Some("x"));
        assert!(
            !format!("{config:?}").contains("s3cret"),
            "the password never shows in Debug output"
        );
    }

    #[test]
    fn an_unknown_option_or_a_bad_value_is_refused_by_name() {
        let unknown = parse(r#"{"concurency": 4}"#).err().map(|e| e.to_string());
        assert!(unknown.is_some_and(|message| message.contains("concurency")));
        let negative = parse(r#"{"reconnect_timeout": -1.0}"#)
            .err()
            .map(|e| e.to_string());
        assert!(negative.is_some_and(|message| message.contains("non-negative")));
        let zero = parse(r#"{"queue_concurrency": {"a": 0}}"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(zero.validate().is_err());
        for buckets in ["[]", "[1.0, 1.0]", "[2.0, 1.0]", "[0.0, 1.0]", "[-1.0]"] {
            let config = parse(&format!(r#"{{"metrics_duration_buckets": {buckets}}}"#))
                .unwrap_or_else(|e| panic!("{e}"));
            let refused = config.validate().err().map(|e| e.to_string());
            assert!(
                refused.is_some_and(|message| message.contains("metrics_duration_buckets")),
                "{buckets}"
            );
        }
        let hours = parse(r#"{"metrics_duration_buckets": [1.0, 60.0, 3600.0, 86400.0]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(hours.validate().is_ok());
    }

    #[test]
    fn a_queue_name_with_a_nul_is_refused_naming_it() {
        for (json, option) in [
            (r#"{"queues": ["fine", "a\u0000b"]}"#, "queues"),
            (
                r#"{"queue_concurrency": {"a\u0000b": 2}}"#,
                "queue_concurrency",
            ),
        ] {
            let config = parse(json).unwrap_or_else(|e| panic!("{e}"));
            let refused = config.validate().err().map(|e| e.to_string());
            assert!(
                refused.as_deref().is_some_and(|message| message
                    .contains(&format!("{option}: the queue name \"a\\0b\""))
                    && message.contains("NUL")),
                "{refused:?}"
            );
        }
        let fine = parse(r#"{"queues": ["it's", "we\"ird q", "ünïcødé"]}"#)
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(fine.validate().is_ok());
    }

    #[test]
    fn debug_never_shows_the_password() {
        let config = parse(
            r#"{"connection": {"host": "db", "user": "app", "password": "hunter2"},
                "concurrency": 2}"#,
        )
        .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(config.connection.password.as_deref(), Some("hunter2"));
        for shown in [format!("{config:?}"), format!("{config:#?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
            // The rest is still shown.
            assert!(shown.contains("concurrency: 2"), "{shown}");
        }
        let built = WorkerConfig::from_conninfo("host=db password=hunter2")
            .unwrap_or_else(|error| panic!("{error}"));
        assert!(!format!("{built:?}").contains("hunter2"));
    }

    #[test]
    fn behind_a_pooler_listen_needs_its_own_connection_or_none() {
        let listening = parse(r#"{"pooler": true}"#).unwrap_or_else(|e| panic!("{e}"));
        let refused = listening.validate().err().map(|e| e.to_string());
        assert!(refused.is_some_and(|message| message.contains("listen_dsn")));
        for ok in [
            r#"{"pooler": true, "listen_connection": {"host": "db"}}"#,
            r#"{"pooler": true, "listen_notify": false}"#,
            r#"{"pooler": false}"#,
        ] {
            let config = parse(ok).unwrap_or_else(|e| panic!("{e}"));
            assert!(config.validate().is_ok(), "{ok}");
        }
    }

    #[test]
    fn a_huge_interval_means_never() {
        // JSON has no infinity; the largest double stands in for it.
        let config = parse(r#"{"fetch_job_polling_interval": 1.7976931348623157e308}"#)
            .unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(
            config.fetch_job_polling_interval,
            Duration::from_secs(100 * 365 * 24 * 3600)
        );
    }
}
