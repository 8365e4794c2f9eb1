//! Stalled-job recovery against a real PostgreSQL: both of its paths (the jobs of pruned
//! workers, the jobs left without a worker) meet errors that pass, and one that does not.
//! A passing error must never turn into a lost (`failed`) job.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed expectation fails the test"
)]

use std::time::Duration;

use fastworker_core::connect::ConnectionTarget;
use fastworker_core::db::Db;
use fastworker_core::registry::{prune_and_recover_stalled_jobs, recover_unowned_jobs, Unowned};
use tokio_postgres::Client;

mod support;
use support::{connect, TestDatabase};

async fn core_connection(db: &TestDatabase) -> Db {
    ConnectionTarget::parse(&db.dsn)
        .expect("test dsn")
        .connect()
        .await
        .expect("connect")
}

/// A worker row silent for an hour.
async fn stalled_worker(db: &TestDatabase) -> i64 {
    db.client
        .query_one(
            "INSERT INTO procrastinate_workers (last_heartbeat)
             VALUES (now() - interval '1 hour') RETURNING id",
            &[],
        )
        .await
        .expect("insert worker")
        .get(0)
}

/// A `doing` job held by `worker` (none: its worker row is gone), with a queueing lock.
async fn doing_job(db: &TestDatabase, worker: Option<i64>, queueing_lock: Option<&str>) -> i64 {
    db.client
        .query_one(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, status, worker_id,
                 queueing_lock)
             VALUES ('default', 't', '{}', 'doing', $1, $2) RETURNING id",
            &[&worker, &queueing_lock],
        )
        .await
        .expect("insert doing job")
        .get(0)
}

/// Another session defers a job with `queueing_lock` in a transaction it keeps open:
/// a retry of a job with the same lock waits for it (past the core's `lock_timeout`).
async fn open_transaction_taking(db: &TestDatabase, queueing_lock: &str) -> Client {
    let session = connect(&db.dsn).await;
    session
        .batch_execute(&format!(
            "BEGIN; INSERT INTO procrastinate_jobs (queue_name, task_name, args, queueing_lock)
             VALUES ('default', 't', '{{}}', '{queueing_lock}')"
        ))
        .await
        .expect("open transaction");
    session
}

async fn worker_of(db: &TestDatabase, job_id: i64) -> Option<i64> {
    db.client
        .query_one(
            "SELECT worker_id FROM procrastinate_jobs WHERE id = $1",
            &[&job_id],
        )
        .await
        .expect("job row")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pruned_workers_job_meeting_a_lock_timeout_is_left_for_the_next_round() {
    let db = TestDatabase::create("recovery_prune_passing").await;
    let worker = stalled_worker(&db).await;
    let locked = doing_job(&db, Some(worker), Some("q")).await;
    let free = doing_job(&db, Some(worker), None).await;
    let session = open_transaction_taking(&db, "q").await;
    let mut connection = core_connection(&db).await;

    let recovered = prune_and_recover_stalled_jobs(&mut connection, Duration::from_secs(30), &[])
        .await
        .expect("a passing error does not fail the recovery");
    assert_eq!(recovered.pruned_workers, vec![worker]);
    assert_eq!(recovered.retried, vec![free]);
    assert!(recovered.failed.is_empty(), "{recovered:?}");
    let [(left, reason)] = recovered.left.as_slice() else {
        panic!("one job left: {recovered:?}");
    };
    assert_eq!(*left, locked);
    assert!(reason.contains("lock timeout"), "{reason}");
    // Left `doing` without a worker: the unowned-jobs recovery's to put back.
    assert_eq!(db.status(locked).await, ("doing".to_string(), 0));
    assert_eq!(worker_of(&db, locked).await, None);
    assert_eq!(db.status(free).await, ("todo".to_string(), 1));

    // The other session gives its lock up: the next round puts the job back to run.
    session.batch_execute("ROLLBACK").await.expect("rollback");
    let mut unowned = Unowned::default();
    let recovered = recover_unowned_jobs(&mut connection, &mut unowned, Duration::ZERO)
        .await
        .expect("next round");
    assert_eq!(recovered.retried, vec![locked]);
    assert!(recovered.failed.is_empty() && recovered.left.is_empty());
    assert_eq!(db.status(locked).await, ("todo".to_string(), 1));
    drop(connection);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unowned_job_is_left_on_a_passing_error_and_failed_only_once_its_lock_is_taken() {
    let db = TestDatabase::create("recovery_unowned").await;
    let locked = doing_job(&db, None, Some("q")).await;
    let free = doing_job(&db, None, None).await;
    let session = open_transaction_taking(&db, "q").await;
    let mut connection = core_connection(&db).await;
    let mut unowned = Unowned::default();

    let recovered = recover_unowned_jobs(&mut connection, &mut unowned, Duration::ZERO)
        .await
        .expect("a passing error does not fail the recovery");
    assert_eq!(recovered.retried, vec![free]);
    assert!(recovered.failed.is_empty(), "{recovered:?}");
    assert_eq!(
        recovered
            .left
            .iter()
            .map(|(job_id, _)| *job_id)
            .collect::<Vec<_>>(),
        vec![locked]
    );
    assert_eq!(db.status(locked).await, ("doing".to_string(), 0));

    // Committed: the queueing lock is taken for good, as procrastinate's retry would find.
    session.batch_execute("COMMIT").await.expect("commit");
    let recovered = recover_unowned_jobs(&mut connection, &mut unowned, Duration::ZERO)
        .await
        .expect("next round");
    assert!(recovered.retried.is_empty() && recovered.left.is_empty());
    let [(failed, reason)] = recovered.failed.as_slice() else {
        panic!("one job failed: {recovered:?}");
    };
    assert_eq!(*failed, locked);
    assert!(
        reason.contains("procrastinate_jobs_queueing_lock_idx_v1"),
        "{reason}"
    );
    // procrastinate_finish_job_v1 counts the attempt.
    assert_eq!(db.status(locked).await, ("failed".to_string(), 1));
    drop(connection);
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_retry_leaves_the_job_for_the_next_round() {
    let db = TestDatabase::create("recovery_cancel").await;
    let worker = stalled_worker(&db).await;
    let job = doing_job(&db, Some(worker), Some("q")).await;
    let session = open_transaction_taking(&db, "q").await;
    let mut connection = core_connection(&db).await;
    // A DBA cancels the recovery's statement while it waits (57014, not a lock timeout).
    let canceller = connect(&db.dsn).await;
    // Every wait is cancelled (the batch retry's, then the one-by-one's).
    let cancel = tokio::spawn(async move {
        loop {
            canceller
                .execute(
                    "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND application_name = 'fastworker'
                       AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .expect("cancel");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let recovered = prune_and_recover_stalled_jobs(&mut connection, Duration::from_secs(30), &[])
        .await
        .expect("a cancel does not fail the recovery");
    cancel.abort();
    assert!(recovered.retried.is_empty() && recovered.failed.is_empty());
    let [(left, reason)] = recovered.left.as_slice() else {
        panic!("one job left: {recovered:?}");
    };
    assert_eq!(*left, job);
    assert!(
        reason.contains("canceling statement due to user request"),
        "{reason}"
    );
    assert_eq!(db.status(job).await, ("doing".to_string(), 0));
    session.batch_execute("ROLLBACK").await.expect("rollback");
    drop(connection);
    db.drop_database().await;
}
