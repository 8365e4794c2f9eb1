//! Plan stability: no statement of the core reads `procrastinate_jobs` (or
//! `procrastinate_events`) whole, at any table size.
//!
//! The core plans each statement once per connection (generic plans, see `connect.rs`), so
//! a plan made on a small table, or on statistics gone stale, stays in use as the table
//! grows. Every statement of `sql::STATEMENTS` is explained as its own session runs it
//! (same settings), on tables of 0, 100, 2,000, 20,000 and 1,000,000 jobs, a mix of
//! `todo`, `doing` and finished ones with their events, ANALYZEd (directly connected, and
//! as behind a transaction pooler: settings per transaction, see `db.rs`); and once more on
//! a table grown from empty without an ANALYZE. A failure names the statement and the size.

#![allow(
    clippy::expect_used,
    clippy::panic,
    reason = "a test: a failed expectation fails the test"
)]

use fastworker_core::connect::ConnectionTarget;
use fastworker_core::db::Db;
use fastworker_core::fetcher::Fetcher;
use fastworker_core::sql::{Session, STATEMENTS};
use tokio_postgres::Client;

mod support;
use support::TestDatabase;

const SIZES: [i64; 5] = [0, 100, 2_000, 20_000, 1_000_000];
const TABLES: [&str; 2] = ["procrastinate_jobs", "procrastinate_events"];
/// Indexes a plan may walk whole (see `problems`).
const BOUNDED_WALKS: [&str; 3] = [
    "procrastinate_jobs_priority_idx_v1",
    "procrastinate_jobs_lock_idx_v1",
    "idx_procrastinate_jobs_worker_not_null",
];
/// Partial indexes of waiting jobs (`todo`, or `todo` and `doing`), walked whole by the
/// steps that must see every waiting job: the claims' look at the schedule (`sql.rs`
/// `schedule_look`; procrastinate's schema has no index on `scheduled_at`), which runs only
/// when a claim comes back short, when every claimable job is taken, and only when something
/// may have changed the schedule; and "queue depth" (a count of the waiting and running
/// jobs), sampled every few seconds only when metrics are served.
const WAITING_JOBS_WALKS: [&str; 3] = [
    "procrastinate_jobs_priority_idx_v1",
    "procrastinate_jobs_queueing_lock_idx_v1",
    "procrastinate_jobs_id_lock_idx_v1",
];

/// Add jobs up to `size`, ids `from + 1 ..= size`: 82% finished, 6% todo (a fifth of them
/// scheduled in the future), 2% doing (for one of five workers), 10% cancelled or aborted;
/// one in 40 with a lock, priorities 0-4, two events each. Triggers are off while loading
/// (a million notifications would be pointless), so the events are written here.
async fn fill(client: &Client, from: i64, size: i64) {
    if size <= from {
        return;
    }
    client
        .batch_execute(&format!(
            "ALTER TABLE procrastinate_jobs DISABLE TRIGGER USER;
             INSERT INTO procrastinate_jobs
                    (id, queue_name, task_name, priority, lock, args, status, scheduled_at,
                     attempts, worker_id)
             SELECT n, 'queue_' || (n % 3), 'task_' || (n % 7), (n % 5)::int,
                    CASE WHEN n % 40 = 0 THEN 'lock_' || n END,
                    jsonb_build_object('n', n),
                    (CASE WHEN n % 50 = 1 THEN 'doing'
                          WHEN n % 100 < 6 THEN 'todo'
                          WHEN n % 100 < 10 THEN 'cancelled'
                          WHEN n % 100 < 16 THEN 'failed'
                          ELSE 'succeeded' END)::procrastinate_job_status,
                    CASE WHEN n % 100 = 5 THEN now() + interval '1 day' END,
                    CASE WHEN n % 50 = 1 OR n % 100 < 6 THEN 0 ELSE 1 END,
                    CASE WHEN n % 50 = 1 THEN (SELECT min(id) FROM procrastinate_workers) + n % 5 END
               FROM generate_series({first}, {size}) AS n;
             INSERT INTO procrastinate_events (job_id, type)
             SELECT n, kind::procrastinate_job_event_type
               FROM generate_series({first}, {size}) AS n, (VALUES ('deferred'), ('started')) AS k(kind);
             ALTER TABLE procrastinate_jobs ENABLE TRIGGER USER;
             SELECT setval('procrastinate_jobs_id_seq', {size});",
            first = from + 1,
        ))
        .await
        .expect("fill the jobs table");
}

/// The statement's plan as its session makes it (generic), as JSON nodes. Behind a
/// pooler, in a transaction with the settings each of the core's transactions has.
async fn plan(db: &Db, name: &str, sql: &str) -> serde_json::Value {
    let client = db.raw_client();
    if db.is_pooled() {
        client
            .batch_execute(&db.begin_statement())
            .await
            .expect(name);
    }
    let explained = explain(client, name, sql).await;
    if db.is_pooled() {
        client.batch_execute("COMMIT").await.expect(name);
    }
    explained
}

async fn explain(client: &Client, name: &str, sql: &str) -> serde_json::Value {
    let statement = client.prepare(sql).await.expect(name);
    let types: Vec<String> = statement
        .params()
        .iter()
        .map(|t| t.name().to_string())
        .collect();
    let nulls = vec!["NULL"; types.len()].join(", ");
    let prepared = if types.is_empty() {
        format!("PREPARE explained AS {sql}")
    } else {
        format!("PREPARE explained ({}) AS {sql}", types.join(", "))
    };
    client.batch_execute(&prepared).await.expect(name);
    let execute = if types.is_empty() {
        "EXECUTE explained".to_string()
    } else {
        format!("EXECUTE explained({nulls})")
    };
    let rows = client
        .simple_query(&format!("EXPLAIN (FORMAT JSON) {execute}"))
        .await
        .expect(name);
    client
        .batch_execute("DEALLOCATE explained")
        .await
        .expect(name);
    let text = rows
        .iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a plan");
    serde_json::from_str(&text).expect("plan JSON")
}

/// Every node of a plan, depth first, each with whether it is part of a claim's look at
/// the schedule: the subtree of a member of the statement's `UNION ALL` gated by a one-time
/// filter (`$look AND` the claim came back short).
fn nodes(node: &serde_json::Value, in_look: bool, out: &mut Vec<(serde_json::Value, bool)>) {
    let in_look = in_look
        || (node["Node Type"] == "Result"
            && node["Parent Relationship"] == "Member"
            && node.get("One-Time Filter").is_some());
    out.push((node.clone(), in_look));
    if let Some(children) = node.get("Plans").and_then(|plans| plans.as_array()) {
        for child in children {
            nodes(child, in_look, out);
        }
    }
}

/// What is wrong with a statement's plan, if anything.
/// `empty`: the table is empty; walking an empty index whole costs nothing, and the
/// statements that are prepared once (the job connection's) are checked again on the
/// table grown without an ANALYZE.
fn problems(name: &str, plan: &serde_json::Value, empty: bool) -> Vec<String> {
    let mut all = Vec::new();
    nodes(&plan[0]["Plan"], false, &mut all);
    let mut found = Vec::new();
    for (node, in_look) in &all {
        let relation = node["Relation Name"].as_str().unwrap_or("");
        let kind = node["Node Type"].as_str().unwrap_or("");
        if kind == "Seq Scan" && TABLES.contains(&relation) {
            found.push(format!("Seq Scan on {relation}"));
        }
        // An index walked whole is a table read whole, in another order; but the claim
        // walks procrastinate's priority index (in claim order, stopped by its LIMIT), and
        // the indexes of `doing` jobs hold only the jobs running now, whatever the size.
        let index = node["Index Name"].as_str().unwrap_or("");
        let walks_whole = !empty
            && kind.contains("Index")
            && node.get("Index Cond").is_none()
            && !BOUNDED_WALKS.contains(&index)
            && !((*in_look || name == "queue depth") && WAITING_JOBS_WALKS.contains(&index));
        if walks_whole {
            found.push(format!("{kind} on {index} without an index condition"));
        }
    }
    if plan[0].get("JIT").is_some() {
        found.push("JIT".into());
    }
    // The claims walk procrastinate's priority index: the claim order, without a sort.
    if name.starts_with("claim") || name.starts_with("complete and claim") {
        let by_priority = all.iter().any(|(node, _)| {
            node["Node Type"] == "Index Scan"
                && node["Index Name"] == "procrastinate_jobs_priority_idx_v1"
        });
        if !by_priority {
            found.push("not on procrastinate_jobs_priority_idx_v1".into());
        }
    }
    found
}

/// The job and registry sessions; `pooled`: as through a transaction pooler (settings per
/// transaction).
async fn sessions(db: &TestDatabase, pooled: bool) -> (Db, Db) {
    let target = ConnectionTarget::parse(&db.dsn)
        .expect("conninfo")
        .through_pooler(pooled);
    let mut jobs = target.connect().await.expect("job session");
    // As the dispatcher sets up its job connection.
    Fetcher::prepare(&mut jobs, None, 1, false)
        .await
        .expect("job session settings");
    let registry = target.connect().await.expect("registry session");
    (jobs, registry)
}

async fn check_every_statement(jobs: &Db, registry: &Db, label: &str, empty: bool) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, sql, session) in STATEMENTS {
        let client = match session {
            Session::Jobs => jobs,
            Session::Registry => registry,
        };
        let plan = plan(client, name, sql).await;
        for problem in problems(name, &plan, empty) {
            failures.push(format!("{name}, {label}: {problem}\n{plan}"));
        }
    }
    failures
}

/// A database with five workers (the `doing` jobs of `fill` are theirs), ANALYZEd empty.
async fn database(label: &str) -> TestDatabase {
    let db = TestDatabase::create(label).await;
    db.client
        .batch_execute(
            "INSERT INTO procrastinate_workers SELECT FROM generate_series(1, 5);
             SET maintenance_work_mem TO '256MB';
             ANALYZE procrastinate_jobs; ANALYZE procrastinate_events",
        )
        .await
        .expect("workers");
    db
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_statement_reads_the_jobs_table_whole_at_any_size() {
    let db = database("plans").await;
    let mut failures = Vec::new();
    let mut filled = 0;
    for size in SIZES {
        fill(&db.client, filled, size).await;
        filled = size;
        db.client
            .batch_execute("ANALYZE procrastinate_jobs; ANALYZE procrastinate_events")
            .await
            .unwrap();
        // New sessions, as a worker started now would have.
        for pooled in [false, true] {
            let (jobs, registry) = sessions(&db, pooled).await;
            let label = format!("{size} jobs{}", if pooled { ", pooler" } else { "" });
            failures.extend(check_every_statement(&jobs, &registry, &label, size == 0).await);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    db.drop_database().await;
}

/// A worker started on an empty table keeps its plans while the table grows without an
/// ANALYZE (a new deployment, autovacuum not run yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_made_on_an_empty_table_stay_on_indexes_as_it_grows() {
    let db = database("plans_stale").await;
    fill(&db.client, 0, 20_000).await;
    let (jobs, registry) = sessions(&db, false).await;
    let failures =
        check_every_statement(&jobs, &registry, "20,000 jobs, not analyzed", false).await;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    db.drop_database().await;
}
