//! The core against a real PostgreSQL with procrastinate's schema, no Python involved.
//! Each test creates its own database and drops it at the end.
//! `FASTWORKER_TEST_DSN` points at a server where we may create databases
//! (default: `host=127.0.0.1 user=postgres dbname=postgres`).

use std::time::Duration;

use fastworker_core::{Completion, HandoffEvent, JobRow, Outcome, WorkerConfig, WorkerCore};
use tokio_postgres::{Client, NoTls};

const SCHEMA: &str = include_str!("fixtures/procrastinate_schema.sql");

fn admin_dsn() -> String {
    std::env::var("FASTWORKER_TEST_DSN")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=postgres".to_string())
}

async fn connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .expect("PostgreSQL must be reachable for these tests");
    tokio::spawn(connection);
    client
}

/// DROP/CREATE DATABASE refuse to run inside the implicit transaction of a multi-statement
/// batch, so they go one by one.
async fn recreate_database(admin: &Client, name: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop old database");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
}

struct TestDatabase {
    name: String,
    dsn: String,
    client: Client,
}

impl TestDatabase {
    async fn create(label: &str) -> TestDatabase {
        let name = format!("fw_core_{label}_{}", std::process::id());
        let admin = connect(&admin_dsn()).await;
        recreate_database(&admin, &name).await;
        let dsn = format!(
            "{} dbname={name}",
            admin_dsn().replace("dbname=postgres", "")
        );
        let client = connect(&dsn).await;
        client
            .batch_execute(SCHEMA)
            .await
            .expect("apply procrastinate schema");
        TestDatabase { name, dsn, client }
    }

    async fn defer(&self, task: &str, queue: &str, priority: i32, lock: Option<&str>) -> i64 {
        self.client
            .query_one(
                "INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, args)
                 VALUES ($1, $2, $3, $4, '{\"a\": 1}') RETURNING id",
                &[&queue, &task, &priority, &lock],
            )
            .await
            .expect("insert job")
            .get(0)
    }

    async fn status(&self, job_id: i64) -> (String, i32) {
        let row = self
            .client
            .query_one(
                "SELECT status::text, attempts FROM procrastinate_jobs WHERE id = $1",
                &[&job_id],
            )
            .await
            .expect("job row");
        (row.get(0), row.get(1))
    }

    async fn events(&self, job_id: i64) -> Vec<String> {
        self.client
            .query(
                "SELECT type::text FROM procrastinate_events WHERE job_id = $1 ORDER BY id",
                &[&job_id],
            )
            .await
            .expect("events")
            .iter()
            .map(|row| row.get(0))
            .collect()
    }

    async fn drop_database(self) {
        drop(self.client);
        let admin = connect(&admin_dsn()).await;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("drop database");
    }
}

fn config(db: &TestDatabase, concurrency: usize) -> WorkerConfig {
    let mut config = WorkerConfig::new(db.dsn.clone());
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
            status: "succeeded".into(),
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
            status: "succeeded".into(),
            delete: true,
        },
    })
    .unwrap();
    core.complete(Completion {
        job_id: failed,
        attempts: 0,
        outcome: Outcome::Finish {
            status: "failed".into(),
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
                HandoffEvent::Jobs(jobs) => claimed.extend(jobs.into_iter().map(|job| job.id)),
                HandoffEvent::Drained => drained = true,
                _ => {}
            }
        }
    }
    assert_eq!(claimed, vec![only]);
    core.complete(succeeded(only)).unwrap();
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
                            status: "succeeded".into(),
                            delete: true,
                        }
                    } else {
                        Outcome::Finish {
                            status: "failed".into(),
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
    let mut config = WorkerConfig::new(
        "host=127.0.0.1 port=1 user=u password=topsecret dbname=x connect_timeout=2",
    );
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
    let error = WorkerCore::start(WorkerConfig::new(dsn))
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

/// Every node of an `EXPLAIN (FORMAT JSON)` plan, depth first.
fn plan_nodes(node: &serde_json::Value, out: &mut Vec<serde_json::Value>) {
    out.push(node.clone());
    if let Some(children) = node.get("Plans").and_then(|plans| plans.as_array()) {
        for child in children {
            plan_nodes(child, out);
        }
    }
}

async fn explain_execute(client: &Client, execute: &str) -> (Vec<serde_json::Value>, String) {
    let messages = client
        .simple_query(&format!("EXPLAIN (ANALYZE, FORMAT JSON) {execute}"))
        .await
        .expect("explain");
    let text = messages
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a plan");
    let explained: serde_json::Value = serde_json::from_str(&text).expect("plan JSON");
    let mut nodes = Vec::new();
    plan_nodes(&explained[0]["Plan"], &mut nodes);
    (nodes, text)
}

/// The core's sessions plan each statement once (generic plans) with JIT off, and the job
/// connection disables sorts. The claim's
/// generic plan must still walk procrastinate's priority index, never read the whole table,
/// even when it was planned while the table was empty (a new deployment) and the table has
/// grown since without an ANALYZE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_and_completion_plans_stay_on_indexes_when_planned_once() {
    use fastworker_core::connect::ConnectionTarget;
    use fastworker_core::sql::{CLAIM, COMPLETE, COMPLETE_AND_CLAIM};

    let db = TestDatabase::create("plans").await;
    let worker_id: i64 = db
        .client
        .query_one(
            "INSERT INTO procrastinate_workers DEFAULT VALUES RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let session = ConnectionTarget::parse(&db.dsn)
        .unwrap()
        .connect()
        .await
        .unwrap();
    // As the dispatcher sets up its job connection.
    fastworker_core::fetcher::Fetcher::prepare(&session, None, 1)
        .await
        .unwrap();
    let mode: String = session
        .query_one("SHOW plan_cache_mode", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(mode, "force_generic_plan");
    session
        .batch_execute(&format!(
            "PREPARE claim(varchar[], bigint, bigint, bigint, varchar[], varchar[], bigint[], \
             bigint[], bigint[]) AS {CLAIM}; \
             PREPARE complete_and_claim(varchar[], bigint, bigint, bigint, varchar[], \
             varchar[], bigint[], bigint[], bigint[], bigint[], int[], text[], bigint[], \
             int[], bigint[]) AS {COMPLETE_AND_CLAIM}; \
             PREPARE complete(bigint[], int[], text[], bigint[], int[], bigint[], int[], \
             text[], int[], text[], text[], bigint[]) AS {COMPLETE}"
        ))
        .await
        .unwrap();
    // Planned on the empty table: a claim that finds nothing.
    let claim =
        format!("EXECUTE claim(NULL, {worker_id}, 1, 1, '{{}}', '{{}}', '{{}}', '{{}}', '{{}}')");
    let (_, _) = explain_execute(&session, &claim).await;
    db.client
        .batch_execute(
            "INSERT INTO procrastinate_jobs (queue_name, task_name, args)
             SELECT 'default', 'noop', '{}' FROM generate_series(1, 20000)",
        )
        .await
        .unwrap();

    for (limit, analyze) in [(1, false), (100, false), (1, true), (100, true)] {
        if analyze {
            // New statistics invalidate the cached plans: they are planned again, now with
            // a cost estimate that JIT would have compiled.
            db.client
                .batch_execute("ANALYZE procrastinate_jobs")
                .await
                .unwrap();
        }
        // Concurrency far above the jobs held, so `limit` alone caps the claim.
        let claim = format!(
            "EXECUTE claim(NULL, {worker_id}, {limit}, 1000000, '{{}}', '{{}}', '{{}}', '{{}}', \
             '{{}}')"
        );
        // The same claim, ending two claimed jobs on the way (the oldest still `doing`).
        let doing: Vec<i64> = db
            .client
            .query(
                "SELECT id FROM procrastinate_jobs WHERE status = 'doing' ORDER BY id LIMIT 2",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let ending = format!("{doing:?}").replace('[', "{").replace(']', "}");
        let complete_and_claim = format!(
            "EXECUTE complete_and_claim(NULL, {worker_id}, {limit}, 1000000, '{{}}', '{{}}', \
             '{{}}', '{{}}', '{ending}', '{ending}', array_fill(0, ARRAY[{n}]), \
             array_fill('succeeded'::text, ARRAY[{n}]), '{{}}', '{{}}', '{{{worker_id}}}')",
            n = doing.len()
        );
        for (name, execute, expected_rows) in [
            ("claim", &claim, limit),
            (
                "complete_and_claim",
                &complete_and_claim,
                limit + doing.len() as i64,
            ),
        ] {
            let (nodes, text) = explain_execute(&session, execute).await;
            assert!(!text.contains("\"JIT\""), "JIT compiled {name}: {text}");
            let scans_jobs_by_priority = nodes.iter().any(|node| {
                node["Node Type"] == "Index Scan"
                    && node["Index Name"] == "procrastinate_jobs_priority_idx_v1"
            });
            assert!(scans_jobs_by_priority, "{name} plan: {text}");
            let reads_whole_table = nodes.iter().any(|node| {
                node["Node Type"] == "Seq Scan" && node["Relation Name"] == "procrastinate_jobs"
            });
            assert!(!reads_whole_table, "{name} plan: {text}");
            let rows = nodes[0]["Actual Rows"].as_i64().unwrap_or(-1);
            assert_eq!(rows, expected_rows, "{name} plan: {text}");
        }

        let (nodes, text) = explain_execute(
            &session,
            "EXECUTE complete(ARRAY[1, 2]::bigint[], ARRAY[0, 0], ARRAY['succeeded', 'failed'], \
             '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{1}')",
        )
        .await;
        assert!(
            !text.contains("\"JIT\""),
            "JIT compiled the completion: {text}"
        );
        let reads_whole_table = nodes.iter().any(|node| {
            node["Node Type"] == "Seq Scan" && node["Relation Name"] == "procrastinate_jobs"
        });
        assert!(!reads_whole_table, "completion plan: {text}");
    }
    drop(session);
    db.drop_database().await;
}
