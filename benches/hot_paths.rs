//! `cargo bench`: the core's per-job hot paths, without Python.
//!
//! - notification parsing (every `job_inserted` / `abort_job_requested` payload);
//! - building the batched completion statement's parameters (500 outcomes);
//! - the hand-off channel (one 500-job batch from the dispatcher to the runner);
//! - decoding claimed rows (500 rows as the claim statement returns them), against the
//!   PostgreSQL of `FASTWORKER_TEST_DSN` (default: local, user postgres); skipped if
//!   unreachable.
//!
//! The hand-off's last step, turning a batch into Python objects, is measured by the
//! end-to-end benchmark (`benches/e2e.py`), since it needs an interpreter.

#![allow(
    clippy::expect_used,
    clippy::print_stderr,
    reason = "a benchmark: set-up failures abort it, and it reports on stderr"
)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fastworker_core::completer::CompletionBatch;
use fastworker_core::handoff;
use fastworker_core::listener::parse_notification;
use fastworker_core::{Completion, FinishStatus, HandoffEvent, JobRow, Metrics, Outcome};

const BATCH: usize = 500;

fn job(id: i64) -> JobRow {
    JobRow {
        id,
        status: "doing".into(),
        task_name: "app.tasks.send_email".into(),
        priority: 0,
        lock: None,
        queueing_lock: None,
        args: r#"{"to": "someone@example.org", "n": 1}"#.into(),
        scheduled_at_us: None,
        queue_name: "default".into(),
        attempts: 0,
        worker_id: Some(1),
    }
}

fn notifications(c: &mut Criterion) {
    let payload = r#"{"type": "job_inserted", "job_id": 123456}"#;
    c.bench_function("parse_notification/job_inserted", |b| {
        b.iter(|| parse_notification(black_box(payload)))
    });
    c.bench_function("parse_notification/malformed", |b| {
        b.iter(|| parse_notification(black_box("{\"type\": 12")))
    });
}

fn completion_statement(c: &mut Criterion) {
    let completions: Vec<Completion> = (0..BATCH as i64)
        .map(|job_id| Completion {
            job_id,
            attempts: 0,
            outcome: if job_id % 20 == 0 {
                Outcome::Retry {
                    retry_at: Some("2030-01-01T00:00:00+00:00".into()),
                    priority: None,
                    queue: None,
                    lock: None,
                }
            } else {
                Outcome::Finish {
                    status: FinishStatus::Succeeded,
                    delete: false,
                }
            },
        })
        .collect();
    let mut group = c.benchmark_group("completion_batch");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("build_500", |b| {
        b.iter(|| CompletionBatch::build(black_box(&completions)))
    });
    group.finish();
}

fn handoff_channel(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (sender, receiver) = handoff::channel(Arc::new(Metrics::default()));
    let mut group = c.benchmark_group("handoff");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function("batch_of_500", |b| {
        b.iter_batched(
            || (0..BATCH as i64).map(job).collect::<Vec<_>>(),
            |jobs| {
                sender.send(HandoffEvent::Jobs(jobs));
                runtime.block_on(receiver.next_events(16))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn decode_rows(c: &mut Criterion) {
    let dsn = std::env::var("FASTWORKER_TEST_DSN")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=postgres".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rows = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        // The claim statement's RETURNING list, for 500 made-up jobs.
        client
            .query(
                "SELECT n::bigint, 'doing'::text, 'app.tasks.send_email'::varchar, 0::int,
                        NULL::text, NULL::text, '{\"to\": \"someone@example.org\"}'::jsonb::text,
                        NULL::bigint, 'default'::varchar, 0::int, 1::bigint
                   FROM generate_series(1, $1::int) AS n",
                &[&(BATCH as i32)],
            )
            .await
    });
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => {
            eprintln!("decode_rows skipped: PostgreSQL unreachable ({error})");
            return;
        }
    };
    let mut group = c.benchmark_group("decode_rows");
    group.throughput(Throughput::Elements(rows.len() as u64));
    group.bench_function("claimed_500", |b| {
        b.iter(|| {
            rows.iter()
                .map(JobRow::from_row)
                .collect::<Result<Vec<_>, _>>()
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    notifications,
    completion_statement,
    handoff_channel,
    decode_rows
);
criterion_main!(benches);
