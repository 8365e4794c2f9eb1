//! The worker's row in `procrastinate_workers` and the slow periodic duties around it:
//! - [`identity`]: this process's worker id, registered again if the row disappears;
//! - [`duties`]: [`Registry`], heartbeat and abort-request polling, on a connection of
//!   their own;
//! - [`sampling`]: the metrics the registry samples (queue depth, claimed jobs' waits);
//! - [`recovery`]: [`Recovery`] (`recover_stalled_jobs`), pruning stalled workers and
//!   putting their jobs back to run, on another connection, so a recovery that waits for
//!   row locks can never delay this worker's own heartbeat (and get it pruned while it
//!   runs).
//!
//! This module keeps the start-up schema check and what the parts share: the id queries,
//! bounded statements, and stopping.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Transaction;

use crate::connect::ConnectionTarget;
use crate::db::{query_in, Db};
use crate::errors::{CoreError, CoreResult, Failed, Failure};
use crate::sql;

mod duties;
mod identity;
mod recovery;
mod sampling;

pub use duties::{HeartbeatWatch, Outage, Registry};
pub use identity::{register_worker, Identity};
pub use recovery::{
    log_recovery, prune_and_recover_stalled_jobs, prune_stalled_workers, recover_unowned_jobs,
    Recovered, Recovery, Unowned,
};
pub use sampling::{cap_queue_depth, METRICS_SAMPLE_INTERVAL};

pub async fn check_schema(target: &ConnectionTarget, client: &Db) -> CoreResult<()> {
    let row = client
        .query_one(sql::CHECK_SCHEMA, &[])
        .await
        .map_err(|error| CoreError::database("checking the procrastinate schema", error))?;
    let present: bool = row
        .try_get(0)
        .map_err(|error| CoreError::database("checking the procrastinate schema", error))?;
    if present {
        Ok(())
    } else {
        Err(CoreError::SchemaMissing {
            database: target.database(),
        })
    }
}

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

/// The first column of every row, as ids.
pub(crate) async fn query_ids(
    client: &Db,
    statement: &'static str,
    params: Params<'_>,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    ids(client.query(statement, params).await?)
}

/// [`query_ids`] in an open transaction.
pub(super) async fn query_ids_in(
    transaction: &Transaction<'_>,
    statement: &'static str,
    params: Params<'_>,
) -> Result<Vec<i64>, tokio_postgres::Error> {
    ids(query_in(transaction, statement, params).await?)
}

fn ids(rows: Vec<tokio_postgres::Row>) -> Result<Vec<i64>, tokio_postgres::Error> {
    rows.iter().map(|row| row.try_get(0)).collect()
}

/// Every row as a claim: (job id, attempts), the first two columns.
pub(crate) async fn query_claims(
    client: &Db,
    statement: &'static str,
    params: Params<'_>,
) -> Result<Vec<(i64, i32)>, tokio_postgres::Error> {
    client
        .query(statement, params)
        .await?
        .iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
        .collect()
}

/// A statement of the registry roles, bounded: a server that stops answering (a half-open
/// connection) counts as a lost connection after `limit`.
pub(super) async fn bounded<T>(
    limit: Duration,
    work: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Failed> {
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failed::new(&error)),
        Err(_) => Err(Failed::no_answer(limit)),
    }
}

pub(super) fn not_connected(reason: String) -> Failed {
    Failed {
        failure: Failure::Connection,
        reason,
    }
}

/// How often an idle role looks whether its connection is still open (a local check, no
/// round trip): a connection whose server process ended (`pg_terminate_backend`, a
/// restart) shows as down, and is replaced, within this, not at the role's next statement.
pub fn liveness_interval(response_timeout: Duration) -> Duration {
    response_timeout.min(Duration::from_secs(1))
}

/// `work`, unless `stop` changes first (or its sender is gone): `None` then. What a role
/// waits for (a connect, a statement) never holds back a stop.
pub(crate) async fn unless_stopped<T>(
    stop: &mut watch::Receiver<bool>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = stop.changed() => None,
        value = work => Some(value),
    }
}
