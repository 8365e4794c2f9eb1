//! Pooler mode (`pooler`, see `db.rs`), against the server itself: what a transaction
//! pooler needs of the core can be seen on any session. (The Python suite runs whole
//! workers through a real PgBouncer: tests/test_pooler.py.)

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed expectation fails the test"
)]

use std::time::{Duration, Instant};

use fastworker_core::connect::ConnectionTarget;
use fastworker_core::db::param_types;
use fastworker_core::errors::is_connectivity_error;
use fastworker_core::fetcher::Fetcher;
use fastworker_core::sql::STATEMENTS;

mod support;
use support::TestDatabase;

/// Upper bound of the waits (only how long a failing test takes to fail).
const PATIENCE: Duration = Duration::from_secs(60);

const SETTINGS: &str = "SELECT current_setting('plan_cache_mode'), current_setting('jit'),
        current_setting('enable_seqscan'), current_setting('enable_sort'),
        current_setting('lock_timeout'), current_setting('application_name')";

async fn settings_outside_a_transaction(client: &tokio_postgres::Client) -> Vec<String> {
    let row = client.query_one(SETTINGS, &[]).await.expect("settings");
    (0..6).map(|index| row.get::<_, String>(index)).collect()
}

/// Each statement of the job connection runs with the core's settings, yet none of them
/// stays on the session (where a pooler would hand it to other clients), and no statement
/// is left prepared on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_statements_carry_their_settings_and_leave_nothing_on_the_session() {
    let db = TestDatabase::create("pooled_settings").await;
    let target = ConnectionTarget::parse(&db.dsn)
        .expect("conninfo")
        .with_response_timeout(std::time::Duration::from_secs(4))
        .through_pooler(true);
    let mut jobs = target.connect().await.expect("job connection");
    let _fetcher = Fetcher::prepare(&mut jobs, None, 1, false)
        .await
        .expect("job settings");
    let direct = ConnectionTarget::parse(&db.dsn)
        .expect("conninfo")
        .with_response_timeout(std::time::Duration::from_secs(4));
    let mut direct_jobs = direct.connect().await.expect("direct job connection");
    // Kept: its prepared statements live as long as it does.
    let _direct_fetcher = Fetcher::prepare(&mut direct_jobs, None, 1, false)
        .await
        .expect("job settings");

    let in_statement = |row: tokio_postgres::Row| -> Vec<String> {
        (0..6).map(|index| row.get::<_, String>(index)).collect()
    };
    let pooled = in_statement(jobs.query_one(SETTINGS, &[]).await.expect("pooled"));
    let session = in_statement(direct_jobs.query_one(SETTINGS, &[]).await.expect("direct"));
    assert_eq!(
        pooled,
        vec![
            "force_generic_plan",
            "off",
            "off",
            "off",
            "1s",
            "fastworker"
        ]
    );
    assert_eq!(pooled, session);

    // The session itself keeps the server's defaults, and has no prepared statement.
    let left = settings_outside_a_transaction(jobs.raw_client()).await;
    assert_eq!(left, vec!["auto", "on", "on", "on", "0", "fastworker"]);
    let prepared: i64 = jobs
        .raw_client()
        // Unnamed itself (`query_one(&str)` would prepare a named statement).
        .query_typed_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .expect("prepared statements")
        .get(0);
    assert_eq!(prepared, 0);
    // Directly connected, the settings are the session's, and the claim is prepared.
    let direct_prepared: i64 = direct_jobs
        .raw_client()
        // Unnamed itself (`query_one(&str)` would prepare a named statement).
        .query_typed_one("SELECT count(*) FROM pg_prepared_statements", &[])
        .await
        .expect("prepared statements")
        .get(0);
    assert!(direct_prepared >= 2, "{direct_prepared}");
    drop((_fetcher, _direct_fetcher, jobs, direct_jobs));
    db.drop_database().await;
}

/// The parameter types sent with each unnamed statement are those PostgreSQL infers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parameter_types_sent_are_those_the_server_infers() {
    let db = TestDatabase::create("pooled_types").await;
    for (name, sql, _) in STATEMENTS {
        let statement = db.client.prepare(sql).await.expect(name);
        assert_eq!(param_types(sql), statement.params(), "{name}");
    }
    db.drop_database().await;
}

/// A half-open connection leaves its transaction to the server: a job connection that
/// stops talking in the middle of one (its claimed rows locked) must not keep them until
/// TCP keepalive notices, hours later. The server ends the session once the transaction
/// idles for the response timeout, directly connected and in pooler mode alike (where the
/// server process is a pooler's, which the worker cannot end itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_left_idle_is_ended_by_the_server_and_its_row_locks_released() {
    let db = TestDatabase::create("idle_transaction").await;
    let job_id = db.defer("task", "default", 0, None).await;
    for pooled in [true, false] {
        let target = ConnectionTarget::parse(&db.dsn)
            .expect("conninfo")
            .with_response_timeout(Duration::from_secs(1))
            .through_pooler(pooled);
        let jobs = target.connect().await.expect("job connection");
        let pid: i32 = jobs
            .raw_client()
            .query_typed_one("SELECT pg_backend_pid()", &[])
            .await
            .expect("backend pid")
            .get(0);
        // A transaction as the core opens one, that locks the job's row, then silence.
        jobs.batch_execute(&jobs.begin_statement())
            .await
            .expect("begin");
        jobs.batch_execute("SELECT id FROM procrastinate_jobs FOR UPDATE")
            .await
            .expect("lock the row");
        let state = |pid: i32| {
            let client = &db.client;
            async move {
                client
                    .query_opt("SELECT state FROM pg_stat_activity WHERE pid = $1", &[&pid])
                    .await
                    .expect("pg_stat_activity")
                    .map(|row| row.get::<_, String>(0))
            }
        };
        let seen = state(pid).await;
        assert_eq!(
            seen.as_deref(),
            Some("idle in transaction"),
            "pooled: {pooled}"
        );
        // Bounded only to decide how long a failure takes (never a measured duration).
        let deadline = Instant::now() + PATIENCE;
        while state(pid).await.is_some() {
            assert!(
                Instant::now() < deadline,
                "pooled: {pooled}: the idle transaction was never ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let free: Vec<i64> = db
            .client
            .query(
                "SELECT id FROM procrastinate_jobs FOR UPDATE SKIP LOCKED",
                &[],
            )
            .await
            .expect("lock from another session")
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(free, vec![job_id], "pooled: {pooled}");
        // The worker's side sees a lost connection, which it replaces.
        let error = jobs
            .query_one(fastworker_core::sql::WHERE_CONNECTED, &[])
            .await
            .expect_err("the session is gone");
        assert!(is_connectivity_error(&error), "{error}");
    }
    db.drop_database().await;
}
