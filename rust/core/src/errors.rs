//! The one error type of the core. The binding maps it to Python exceptions in a single
//! `From` impl, so every failure reaches Python the same way.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The connection settings could not be understood.
    #[error("invalid connection settings: {0}")]
    Config(String),

    /// The database could not be reached (at start, or for longer than the reconnect budget).
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    Unreachable { target: String, reason: String },

    /// The database answered, but the procrastinate schema is not there.
    #[error("the procrastinate schema is missing in database {database:?} (run `procrastinate schema --apply`)")]
    SchemaMissing { database: String },

    /// Connectivity was lost and not regained within the reconnect budget.
    #[error("lost the connection to PostgreSQL at {target} and could not reconnect within {budget:?}: {reason}")]
    ConnectionLost {
        target: String,
        budget: Duration,
        reason: String,
    },

    /// The database refused the core's statements for longer than the reconnect budget.
    #[error("PostgreSQL at {target} refused the worker's statements for longer than {budget:?}: {reason}")]
    Unusable {
        target: String,
        budget: Duration,
        reason: String,
    },

    /// A statement failed for a reason other than connectivity.
    #[error("{context}: {}", describe_postgres_error(.source))]
    Database {
        context: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },

    /// A transaction pooler (PgBouncer `pool_mode = transaction`) is between the worker and
    /// PostgreSQL, and the worker was not told (`pooler`): `sign` is what gave it away.
    #[error(
        "the server at {target} {sign}: a transaction pooler (PgBouncer pool_mode = \
         transaction) is between the worker and PostgreSQL; run the worker with pooler=True \
         (--pooler), and LISTEN straight to the server (listen_dsn, --listen-dsn) or not at \
         all (listen_notify=False)"
    )]
    PoolerNotDeclared { target: String, sign: &'static str },

    /// The worker was used after `shutdown`.
    #[error("the worker core is shut down")]
    ShutDown,

    /// A bug: one of the core's tasks panicked. Reported instead of leaving the runner waiting.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CoreError {
    pub fn database(context: &'static str, source: tokio_postgres::Error) -> Self {
        CoreError::Database { context, source }
    }

    /// The reconnect budget is spent: [`CoreError::Unusable`] if the server answered and
    /// kept refusing (`refused`), else [`CoreError::ConnectionLost`].
    pub fn gave_up(target: &str, budget: Duration, reason: String, refused: bool) -> Self {
        let target = target.to_string();
        if refused {
            CoreError::Unusable {
                target,
                budget,
                reason,
            }
        } else {
            CoreError::ConnectionLost {
                target,
                budget,
                reason,
            }
        }
    }

    /// A statement that failed because the connection went away: worth a reconnect.
    pub fn is_connectivity(&self) -> bool {
        match self {
            CoreError::Database { source, .. } => is_connectivity_error(source),
            _ => false,
        }
    }

    /// A statement refused for a passing reason ([`is_passing_error`]): worth trying again,
    /// on the same connection.
    pub fn is_passing(&self) -> bool {
        match self {
            CoreError::Database { source, .. } => is_passing_error(source),
            _ => false,
        }
    }
}

/// tokio-postgres shows a server error as just "db error"; say what the server said.
pub fn describe_postgres_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db_error) => format!(
            "{} {}: {}",
            db_error.severity(),
            db_error.code().code(),
            db_error.message()
        ),
        None => error.to_string(),
    }
}

/// What a failed statement means for the one who sent it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The connection is gone (or unusable): reconnect. A write sent on it may or may not
    /// have committed.
    Connection,
    /// This worker's row in `procrastinate_workers` is gone (a foreign key on
    /// `procrastinate_jobs.worker_id`): it was pruned as stalled; register again.
    Pruned,
    /// The statement was refused because of the job it names (procrastinate's functions
    /// raise, a constraint, bad data): the job's write will not go through on a retry.
    Refused,
    /// Anything else (a cancelled statement, a lock or statement timeout, a deadlock, a
    /// serialization failure, resources, a read-only server...): nothing was written;
    /// the same statement may go through later. Retried with backoff.
    Transient,
}

/// A statement that failed, sorted ([`Failure`]), with the server's words for it.
#[derive(Clone, Debug)]
pub struct Failed {
    pub failure: Failure,
    pub reason: String,
}

impl Failed {
    pub fn new(error: &tokio_postgres::Error) -> Failed {
        Failed {
            failure: classify(error),
            reason: describe_postgres_error(error),
        }
    }

    /// The server gave no answer in time: the connection is taken for dead.
    pub fn no_answer(limit: Duration) -> Failed {
        Failed {
            failure: Failure::Connection,
            reason: format!("no answer from the server within {limit:?}"),
        }
    }
}

/// Sort a failed statement into what to do about it ([`Failure`]).
pub fn classify(error: &tokio_postgres::Error) -> Failure {
    if is_connectivity_error(error) {
        return Failure::Connection;
    }
    let Some(db_error) = error.as_db_error() else {
        return Failure::Connection;
    };
    let code = db_error.code().code();
    let names_workers = db_error
        .constraint()
        .is_some_and(|name| name.contains("worker_id"))
        || db_error
            .detail()
            .is_some_and(|detail| detail.contains("procrastinate_workers"));
    if code == "23503" && names_workers {
        return Failure::Pruned;
    }
    // Class 22 (data exception), 23 (integrity constraint), P0 (raised by plpgsql, as
    // procrastinate's functions do when a job is not in the expected state).
    if code.starts_with("22") || code.starts_with("23") || code.starts_with("P0") {
        return Failure::Refused;
    }
    Failure::Transient
}

/// Connectivity errors are retried with backoff; anything else is a real failure.
pub fn is_connectivity_error(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    if let Some(db_error) = error.as_db_error() {
        // admin_shutdown, crash_shutdown, cannot_connect_now, the connection_exception
        // class, and idle_in_transaction_session_timeout (the server ended the session).
        let code = db_error.code().code();
        return code.starts_with("08")
            || code == "57P01"
            || code == "57P02"
            || code == "57P03"
            || code == "25P03";
    }
    // No server error attached: an I/O error, a closed socket or a protocol desync.
    true
}

/// A statement refused for a reason that passes: cancelled (`pg_cancel_backend`, a
/// `statement_timeout`: 57014), a lock waited for longer than `lock_timeout` (55P03, as
/// when a migration holds a table), a deadlock or a serialization failure (class 40), the
/// server short of a resource (class 53: memory, disk, connections). Nothing was done, and
/// the same statement may go through a moment later: unlike a refusal because of what the
/// statement says (a missing table, a permission), which would fail again.
pub fn is_passing_error(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db_error| {
        let code = db_error.code().code();
        code == "57014" || code == "55P03" || code.starts_with("40") || code.starts_with("53")
    })
}

pub type CoreResult<T> = Result<T, CoreError>;
