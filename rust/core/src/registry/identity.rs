//! This process's worker id, and registering it.

use std::sync::atomic::{AtomicI64, Ordering};

use crate::db::Db;
use crate::errors::{CoreError, CoreResult};
use crate::fetcher::Claimant;
use crate::handoff::HandoffSender;
use crate::protocol::{HandoffEvent, LogLevel};
use crate::sql;

pub async fn register_worker(client: &Db) -> CoreResult<i64> {
    let row = client
        .query_one(sql::REGISTER_WORKER, &[])
        .await
        .map_err(|error| CoreError::database("registering the worker", error))?;
    row.try_get(0)
        .map_err(|error| CoreError::database("registering the worker", error))
}

/// This process's worker id. If its row in `procrastinate_workers` disappears (another
/// worker pruned it as stalled, someone deleted it), the first role to notice registers a
/// new one; the jobs claimed under the old id are still this process's to end, so every
/// id it has had stays known.
pub struct Identity {
    current: AtomicI64,
    all: std::sync::Mutex<Vec<i64>>,
    registering: tokio::sync::Mutex<()>,
}

impl Identity {
    pub fn new(worker_id: i64) -> Identity {
        Identity {
            current: AtomicI64::new(worker_id),
            all: std::sync::Mutex::new(vec![worker_id]),
            registering: tokio::sync::Mutex::new(()),
        }
    }

    pub fn current(&self) -> i64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Every worker id this process has had, the current one first.
    pub fn all(&self) -> Vec<i64> {
        let mut ids = match self.all.lock() {
            Ok(ids) => ids.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        ids.reverse();
        ids
    }

    pub fn claimant(&self) -> Claimant {
        Claimant {
            worker_id: self.current(),
            worker_ids: self.all(),
        }
    }

    /// `gone` has no row any more: register again (once, whoever notices first) and say
    /// so. Returns the id to use from now on.
    pub async fn register_again(
        &self,
        client: &Db,
        gone: i64,
        handoff: &HandoffSender,
        noticed: &str,
    ) -> CoreResult<i64> {
        let _one_at_a_time = self.registering.lock().await;
        let current = self.current();
        if current != gone {
            return Ok(current);
        }
        let worker_id = register_worker(client).await?;
        match self.all.lock() {
            Ok(mut ids) => ids.push(worker_id),
            Err(poisoned) => poisoned.into_inner().push(worker_id),
        }
        self.current.store(worker_id, Ordering::SeqCst);
        handoff.log(
            LogLevel::Warning,
            "worker_registered_again",
            format!(
                "Worker {gone} is no longer in procrastinate_workers ({noticed}): another \
                 worker pruned it as stalled, or its row was deleted. Registered again as \
                 worker {worker_id}; the jobs it runs are still ended by it"
            ),
        );
        handoff.send(HandoffEvent::WorkerId(worker_id));
        Ok(worker_id)
    }
}
