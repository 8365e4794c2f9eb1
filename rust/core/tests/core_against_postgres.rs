//! The core against a real PostgreSQL with procrastinate's schema, no Python involved.
//! Each test creates its own database and drops it at the end.
//! `FASTWORKER_TEST_DSN` points at a server where we may create databases
//! (default: `host=127.0.0.1 user=postgres dbname=postgres`).

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed expectation fails the test"
)]

use std::collections::HashSet;
use std::time::Duration;

use fastworker_core::completer::CompletionBatch;
use fastworker_core::connect::ConnectionTarget;
use fastworker_core::db::{Db, Within};
use fastworker_core::fetcher::{ClaimRequest, Claimant, Fetcher, QueueRoom, ScheduleLook};
use fastworker_core::{
    Completion, FinishStatus, HandoffEvent, JobRow, Outcome, WorkerConfig, WorkerCore,
};

mod support;
use support::{admin_dsn, connect, recreate_database, TestDatabase};

fn config(db: &TestDatabase, concurrency: usize) -> WorkerConfig {
    let mut config = WorkerConfig::from_conninfo(&db.dsn).expect("test dsn");
    config.concurrency = concurrency;
    config.wait = true;
    config.fetch_job_polling_interval = Duration::from_millis(100);
    config
}

/// Wait for the next batch of jobs, skipping logs.
async fn next_jobs(core: &WorkerCore) -> Vec<JobRow> {
    loop {
        let events = tokio::time::timeout(Duration::from_secs(20), core.next_events(100))
            .await
            .expect("jobs should arrive")
            .expect("core still running");
        let mut jobs = Vec::new();
        for event in events {
            match event {
                HandoffEvent::Jobs(batch) => jobs.extend(batch),
                HandoffEvent::Fatal(error) => panic!("fatal: {error}"),
                _ => {}
            }
        }
        if !jobs.is_empty() {
            return jobs;
        }
    }
}

fn succeeded(job_id: i64) -> Completion {
    Completion {
        job_id,
        attempts: 0,
        outcome: Outcome::Finish {
            status: FinishStatus::Succeeded,
            delete: false,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_never_exceed_concurrency_and_outcomes_are_written() {
    let db = TestDatabase::create("concurrency").await;
    let mut ids = Vec::new();
    for _ in 0..25 {
        ids.push(db.defer("t", "default", 0, None).await);
    }
    let core = WorkerCore::start(config(&db, 10)).await.expect("start");
    let mut done = 0;
    while done < 25 {
        let jobs = next_jobs(&core).await;
        let doing: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM procrastinate_jobs WHERE status = 'doing'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(doing <= 10, "{doing} jobs in doing with concurrency 10");
        for job in jobs {
            assert_eq!(job.status, "doing");
            assert_eq!(job.worker_id, Some(core.worker_id()));
            assert_eq!(job.args, "{\"a\": 1}");
            core.complete(succeeded(job.id)).unwrap();
            done += 1;
        }
    }
    core.shutdown().await.expect("shutdown");
    for id in ids {
        assert_eq!(db.status(id).await, ("succeeded".to_string(), 1));
        assert_eq!(
            db.events(id).await,
            vec!["deferred", "started", "succeeded"]
        );
    }
    let workers: i64 = db
        .client
        .query_one("SELECT count(*) FROM procrastinate_workers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(workers, 0, "the worker unregisters at shutdown");
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_order_and_the_lock_rule_hold_in_a_batch() {
    let db = TestDatabase::create("locks").await;
    let low = db.defer("t", "default", 0, None).await;
    let high = db.defer("t", "default", 5, None).await;
    let locked_first = db.defer("t", "default", 0, Some("L")).await;
    let locked_second = db.defer("t", "default", 0, Some("L")).await;
    let core = WorkerCore::start(config(&db, 10)).await.expect("start");
    let jobs = next_jobs(&core).await;
    let claimed: Vec<i64> = jobs.iter().map(|job| job.id).collect();
    // Same-lock jobs never run together: the second waits for the first.
    assert_eq!(claimed, vec![high, low, locked_first]);
    for job in &jobs {
        core.complete(succeeded(job.id)).unwrap();
    }
    let jobs = next_jobs(&core).await;
    assert_eq!(
        jobs.iter().map(|job| job.id).collect::<Vec<_>>(),
        vec![locked_second]
    );
    core.complete(succeeded(locked_second)).unwrap();
    core.shutdown().await.expect("shutdown");
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_and_delete_follow_procrastinate_functions() {
    let db = TestDatabase::create("retry").await;
    let retried = db.defer("t", "default", 0, None).await;
    let deleted = db.defer("t", "default", 0, None).await;
    let failed = db.defer("t", "default", 0, None).await;
    let mut config = config(&db, 10);
    config.queues = Some(vec!["default".into()]);
    let core = WorkerCore::start(config).await.expect("start");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.extend(next_jobs(&core).await.into_iter().map(|job| job.id));
    }
    core.complete(Completion {
        job_id: retried,
        attempts: 0,
        outcome: Outcome::Retry {
            retry_at: Some("2999-01-01T00:00:00+00:00".into()),
            priority: Some(7),
            queue: Some("elsewhere".into()),
            lock: None,
        },
    })
    .unwrap();
    core.complete(Completion {
        job_id: deleted,
        attempts: 0,
        outcome: Outcome::Finish {
            status: FinishStatus::Succeeded,
            delete: true,
        },
    })
    .unwrap();
    core.complete(Completion {
        job_id: failed,
        attempts: 0,
        outcome: Outcome::Finish {
            status: FinishStatus::Failed,
            delete: false,
        },
    })
    .unwrap();
    core.shutdown().await.expect("shutdown");

    let row = db
        .client
        .query_one(
            "SELECT status::text, attempts, priority, queue_name, scheduled_at > now() FROM procrastinate_jobs WHERE id = $1",
            &[&retried],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "todo");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, i32>(2), 7);
    assert_eq!(row.get::<_, String>(3), "elsewhere");
    assert!(row.get::<_, bool>(4));
    // As with procrastinate's own functions: `scheduled` fires before `deferred_for_retry`
    // (trigger name order), and once more when unregistering the worker nulls the job's
    // worker_id (the scheduled-events trigger fires on any UPDATE of a scheduled todo job).
    assert_eq!(
        db.events(retried).await,
        vec![
            "deferred",
            "started",
            "scheduled",
            "deferred_for_retry",
            "scheduled"
        ]
    );
    let gone: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM procrastinate_jobs WHERE id = $1",
            &[&deleted],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0);
    assert_eq!(db.status(failed).await, ("failed".to_string(), 1));
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_false_reports_drained() {
    let db = TestDatabase::create("drain").await;
    let only = db.defer("t", "default", 0, None).await;
    let mut config = config(&db, 4);
    config.wait = false;
    let core = WorkerCore::start(config).await.expect("start");
    let mut drained = false;
    let mut claimed = Vec::new();
    while !drained {
        for event in core.next_events(100).await.expect("running") {
            match event {
                HandoffEvent::Jobs(jobs) => {
                    // Not drained while a claimed job runs: it may free a lock or retry.
                    for job in jobs {
                        claimed.push(job.id);
                        core.complete(succeeded(job.id)).unwrap();
                    }
                }
                HandoffEvent::Drained => drained = true,
                _ => {}
            }
        }
    }
    assert_eq!(claimed, vec![only]);
    core.shutdown().await.expect("shutdown");
    assert_eq!(db.status(only).await.0, "succeeded");
    db.drop_database().await;
}

/// Completing a job and claiming the next happen in one statement, whose snapshot still
/// shows the completed job `doing`: it must not hold its lock nor its slot for that claim.
/// With concurrency 1, `wait=False` and no polling to catch up, a chain of same-lock jobs
/// only drains if each completion frees the next job in the very same round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_frees_its_lock_and_slot_for_the_claim_in_the_same_statement() {
    let db = TestDatabase::create("chain").await;
    let first = db.defer("t", "default", 0, Some("L")).await;
    let second = db.defer("t", "default", 0, Some("L")).await;
    let third = db.defer("t", "default", 0, Some("L")).await;
    let mut config = config(&db, 1);
    config.wait = false;
    config.listen_notify = false;
    config.fetch_job_polling_interval = Duration::from_secs(3600);
    let core = WorkerCore::start(config).await.expect("start");
    let mut claimed = Vec::new();
    let mut drained = false;
    while !drained {
        let events = tokio::time::timeout(Duration::from_secs(20), core.next_events(100))
            .await
            .expect("the chain should go on without polling")
            .expect("running");
        for event in events {
            match event {
                HandoffEvent::Jobs(jobs) => {
                    assert_eq!(jobs.len(), 1, "concurrency 1");
                    let job_id = jobs[0].id;
                    claimed.push(job_id);
                    let outcome = if job_id == second {
                        // The delete branch ends a job too.
                        Outcome::Finish {
                            status: FinishStatus::Succeeded,
                            delete: true,
                        }
                    } else {
                        Outcome::Finish {
                            status: FinishStatus::Failed,
                            delete: false,
                        }
                    };
                    core.complete(Completion {
                        job_id,
                        attempts: 0,
                        outcome,
                    })
                    .unwrap();
                }
                HandoffEvent::Drained => drained = true,
                HandoffEvent::Fatal(error) => panic!("fatal: {error}"),
                _ => {}
            }
        }
    }
    assert_eq!(claimed, vec![first, second, third]);
    core.shutdown().await.expect("shutdown");
    assert_eq!(db.status(first).await.0, "failed");
    assert_eq!(db.status(third).await.0, "failed");
    let left: i64 = db
        .client
        .query_one(
            "SELECT count(*) FROM procrastinate_jobs WHERE id = $1",
            &[&second],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "deleted");
    db.drop_database().await;
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let mut config = WorkerConfig::from_conninfo(
        "host=127.0.0.1 port=1 user=u password=topsecret dbname=x connect_timeout=2",
    )
    .expect("valid conninfo");
    config.concurrency = 1;
    let error = WorkerCore::start(config).await.err().expect("must fail");
    let message = error.to_string();
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(!message.contains("topsecret"), "{message}");
}

#[tokio::test]
async fn a_database_without_the_schema_is_refused() {
    let name = format!("fw_core_noschema_{}", std::process::id());
    let admin = connect(&admin_dsn()).await;
    recreate_database(&admin, &name).await;
    let dsn = format!(
        "{} dbname={name}",
        admin_dsn().replace("dbname=postgres", "")
    );
    let error = WorkerCore::start(WorkerConfig::from_conninfo(&dsn).expect("dsn"))
        .await
        .err()
        .expect("must fail");
    assert!(
        error
            .to_string()
            .contains("procrastinate schema is missing"),
        "{error}"
    );
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

/// A registered worker, and a job session with the claim statements prepared, as the
/// dispatcher sets it up.
async fn job_session(db: &TestDatabase) -> (Db, Fetcher, Claimant) {
    let worker_id: i64 = db
        .client
        .query_one(
            "SELECT worker_id FROM procrastinate_register_worker_v1()",
            &[],
        )
        .await
        .expect("a worker")
        .get(0);
    let mut session = ConnectionTarget::parse(&db.dsn)
        .expect("conninfo")
        .connect()
        .await
        .expect("job session");
    let fetcher = Fetcher::prepare(&mut session, None, 10, false)
        .await
        .expect("claim statements");
    let claimant = Claimant {
        worker_id,
        worker_ids: vec![worker_id],
    };
    (session, fetcher, claimant)
}

/// A job the worker ends lets go of its `worker_id` (procrastinate's function keeps it):
/// deleting the worker row, at shutdown or as a stalled worker, then rewrites none of the
/// jobs it ran, only those still `doing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_job_lets_go_of_its_worker() {
    let db = TestDatabase::create("let_go").await;
    let first = db.defer("t", "default", 0, None).await;
    let second = db.defer("t", "default", 0, None).await;
    let (session, fetcher, claimant) = job_session(&db).await;
    let room = QueueRoom::default();
    let request = ClaimRequest {
        claimant: &claimant,
        limit: 1,
        room: &room,
        abandoned: &[],
        look_at_schedule: false,
    };
    let worker_of = |id: i64| {
        let client = &db.client;
        async move {
            client
                .query_one(
                    "SELECT worker_id FROM procrastinate_jobs WHERE id = $1",
                    &[&id],
                )
                .await
                .expect("job row")
                .get::<_, Option<i64>>(0)
        }
    };
    let claimed = fetcher
        .claim(&session, Within::OwnTransaction, &request)
        .await
        .expect("claim");
    assert_eq!(
        claimed.jobs.iter().map(|job| job.id).collect::<Vec<_>>(),
        vec![first]
    );
    assert_eq!(worker_of(first).await, Some(claimant.worker_id));
    // Ends the first, claims the second.
    let batch = CompletionBatch::build(&[succeeded(first)]);
    let claimed = fetcher
        .complete_and_claim(&session, &batch, &request)
        .await
        .expect("complete and claim");
    assert_eq!(claimed.ended, HashSet::from([first]));
    assert_eq!(db.status(first).await.0, "succeeded");
    assert_eq!(
        worker_of(first).await,
        None,
        "the ended job let go of its worker"
    );
    assert_eq!(
        worker_of(second).await,
        Some(claimant.worker_id),
        "the running one holds it"
    );
    drop(session);
    db.drop_database().await;
}

/// A claim asked to look at the schedule, when it comes back short, also tells in the same
/// statement when the earliest job scheduled for later is due: an empty claim is one
/// statement, not two. A full claim, or one not asked, makes no look.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_claim_looks_at_the_schedule_in_its_own_statement() {
    let db = TestDatabase::create("look").await;
    let due_now = db.defer("t", "default", 0, None).await;
    let later: i64 = db
        .client
        .query_one(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args, scheduled_at)
             VALUES ('default', 't', '{}', now() + interval '1 hour') RETURNING id",
            &[],
        )
        .await
        .expect("a job scheduled in an hour")
        .get(0);
    let (session, fetcher, claimant) = job_session(&db).await;
    let room = QueueRoom::default();
    let request = |limit, look_at_schedule| ClaimRequest {
        claimant: &claimant,
        limit,
        room: &room,
        abandoned: &[],
        look_at_schedule,
    };
    let in_an_hour = |look: ScheduleLook| match look {
        ScheduleLook::DueIn(due_in) => {
            due_in > Duration::from_secs(3500) && due_in <= Duration::from_secs(3600)
        }
        _ => false,
    };

    // Full: one job asked, one claimed.
    let claimed = fetcher
        .claim(&session, Within::OwnTransaction, &request(1, true))
        .await
        .expect("claim");
    assert_eq!(
        claimed.jobs.iter().map(|job| job.id).collect::<Vec<_>>(),
        vec![due_now]
    );
    assert_eq!(claimed.schedule, ScheduleLook::NotMade);
    // Short, not asked.
    let claimed = fetcher
        .claim(&session, Within::OwnTransaction, &request(5, false))
        .await
        .expect("claim");
    assert!(claimed.jobs.is_empty());
    assert_eq!(claimed.schedule, ScheduleLook::NotMade);
    // Short, asked.
    let claimed = fetcher
        .claim(&session, Within::OwnTransaction, &request(5, true))
        .await
        .expect("claim");
    assert!(claimed.jobs.is_empty());
    assert!(in_an_hour(claimed.schedule), "{:?}", claimed.schedule);
    // The statement that ends a batch and claims looks the same way.
    let batch = CompletionBatch::build(&[succeeded(due_now)]);
    let claimed = fetcher
        .complete_and_claim(&session, &batch, &request(5, true))
        .await
        .expect("complete and claim");
    assert_eq!(claimed.ended, HashSet::from([due_now]));
    assert!(claimed.jobs.is_empty());
    assert!(in_an_hour(claimed.schedule), "{:?}", claimed.schedule);
    assert_eq!(db.status(due_now).await.0, "succeeded");
    // Nothing scheduled for later.
    db.client
        .execute("DELETE FROM procrastinate_jobs WHERE id = $1", &[&later])
        .await
        .expect("delete");
    let claimed = fetcher
        .claim(&session, Within::OwnTransaction, &request(5, true))
        .await
        .expect("claim");
    assert_eq!(claimed.schedule, ScheduleLook::NothingLater);
    drop(session);
    db.drop_database().await;
}
