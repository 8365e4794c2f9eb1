//! What the integration tests share: a fresh database with procrastinate's schema per
//! test, on the server `FASTWORKER_TEST_DSN` names (default: the local one as postgres).

#![allow(dead_code, reason = "each test file uses its own part")]
#![allow(
    clippy::expect_used,
    reason = "test set-up: a failed expectation fails the test"
)]

use tokio_postgres::{Client, NoTls};

const SCHEMA: &str = include_str!("../fixtures/procrastinate_schema.sql");

pub fn admin_dsn() -> String {
    std::env::var("FASTWORKER_TEST_DSN")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=postgres".to_string())
}

pub async fn connect(dsn: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls)
        .await
        .expect("PostgreSQL must be reachable for these tests");
    tokio::spawn(connection);
    client
}

/// DROP/CREATE DATABASE refuse to run inside the implicit transaction of a multi-statement
/// batch, so they go one by one.
pub async fn recreate_database(admin: &Client, name: &str) {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .expect("drop old database");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
}

pub struct TestDatabase {
    pub name: String,
    pub dsn: String,
    pub client: Client,
}

impl TestDatabase {
    pub async fn create(label: &str) -> TestDatabase {
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

    pub async fn defer(&self, task: &str, queue: &str, priority: i32, lock: Option<&str>) -> i64 {
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

    pub async fn status(&self, job_id: i64) -> (String, i32) {
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

    pub async fn events(&self, job_id: i64) -> Vec<String> {
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

    pub async fn drop_database(self) {
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
