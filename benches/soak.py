"""Chaos soak: a mixed workload under random faults, then a check of every job.

    python benches/soak.py --seconds 1200 [--workers 4] [--rate 150] [--seed 1]

Runs on a private PostgreSQL cluster it creates (PostgreSQL restarts are among the faults,
so never on a shared server) and removes at the end. The workers' own connections (claims,
completions, heartbeat, LISTEN, recovery) go through the fault proxy of `tests/faults`;
their apps' pools connect directly. For `--seconds`:

- jobs are deferred while the workers drain (`--rate` per second): short jobs, 5% of
  jobs failing and retried by procrastinate's RetryStrategy, long abortable jobs of which
  some get an abort request (running) or are cancelled (waiting), and a periodic task
  every second (procrastinate's periodic deferrer, in every worker);
- every few seconds a random fault:
  - the proxy cuts, black-holes (half-open) or delays one round trip of a random kind
    (claim, complete-and-claim, retry transaction, one-by-one writes, heartbeat, abort
    poll, orphan search, recovery, LISTEN, a new connection's start-up or its session
    settings) at a random message boundary;
  - pg_terminate_backend or pg_cancel_backend of one of the workers' connections;
  - a statement_timeout of 20 ms for the connections made in the next 2 s;
  - another session holding a running job's row lock for 1-5 s;
  - a live worker's row deleted (as if pruned during a network split);
  - SIGKILL of a worker (a new one starts, with --recover-stalled-jobs, and the others
    recover its jobs); a PostgreSQL restart;
  - a worker stalled (SIGSTOP, then SIGCONT) 4 x 2.5 s: its periodic deferrer lags;
  - recovery meeting passing errors: another session inserts, in an open transaction, a
    job with the queueing lock of every running job that has one, and holds it past the
    stalled timeout while a worker is SIGKILLed (the recovery of that worker's jobs meets
    lock timeouts until the session rolls back).

Then deferring stops, the queue drains, the workers stop, and the database is checked:
no job lost (every id the deferrer got back is there), none stuck (left todo/doing), none
run twice for the same claim (two executions of one job at the same attempts), none run
without its own claim (executions <= `started` events per job), every claim ended by
exactly one write (`started` events == attempts, allowing for procrastinate's
abort-requested retry branch, which fails a job without counting the attempt), and the
RSS of the worker that was never killed stays flat. Exit status 1 if any check fails.
Jobs run again after stalled-job recovery (a new claim, after a SIGKILL) are reported.
Also checked: no `record` job (which never fails by itself) ended `failed` (a recovery that
gave up on a job would), except one that could not go back to `todo` because another job
with its queueing lock was waiting (procrastinate's rule; the workers' logs name each), and
no periodic second was deferred twice. Loopback only; bounded
in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from psycopg.conninfo import make_conninfo
from tests.faults.harness import classify
from tests.faults.proxy import Fault, FaultProxy
from tests.reliability.helpers import (
    PrivateCluster,
    WorkerProcess,
    create_executions_table,
    fastworker_backends,
    terminate_backend,
)

DATABASE = "soak"
# A heartbeat can be late by a response timeout plus a reconnect: the stalled timeout
# leaves room for that (a live worker must never look stalled).
HEARTBEAT, STALLED, RESPONSE_TIMEOUT = "1", "10", "3"
CORE_ROLE = "soak_core"
PROXY_KINDS = [
    "claim", "complete_and_claim", "complete", "begin", "commit", "finish_one", "retry_one",
    "heartbeat", "abort_poll", "orphans", "listen", "recover_lock", "recover_retry",
    "startup", "set",
]  # fmt: skip


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Deferrer(threading.Thread):
    """Defers jobs at `rate` per second until stopped; survives restarts and killed
    connections (a batch whose commit is in doubt is not counted as deferred)."""

    def __init__(self, dsn: str, rate: int, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.dsn, self.rate, self.rng = dsn, rate, rng
        self.ids: dict[str, list[int]] = {"record": [], "flaky": [], "abortable": []}
        self.locks = 0
        self.stopping = threading.Event()
        self.errors = 0

    def batch(self) -> list[tuple[str, str]]:
        jobs = []
        for _ in range(max(1, self.rate // 10)):
            roll = self.rng.random()
            if roll < 0.02:
                jobs.append(("abortable", json.dumps({"sleep": 20})))
            elif roll < 0.04:
                # Runs for a while with a queueing lock: what the queueing-lock fault holds.
                jobs.append(("locked", json.dumps({"n": 0, "sleep": 1 + self.rng.random() * 2})))
            elif roll < 0.5:
                jobs.append(("flaky", json.dumps({"n": 0, "fail_percent": 5})))
            else:
                jobs.append(("record", json.dumps({"n": 0, "sleep": self.rng.random() * 0.05})))
        return jobs

    def run(self) -> None:
        connection: psycopg.Connection[Any] | None = None
        while not self.stopping.is_set():
            started = time.monotonic()
            try:
                if connection is None or connection.closed:
                    connection = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                jobs = self.batch()
                plain = [(task, args) for task, args in jobs if task != "locked"]
                rows = connection.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args) "
                    "SELECT 'default', t, a::jsonb FROM unnest(%s::text[], %s::text[]) AS j(t, a) "
                    "RETURNING id, task_name",
                    ([task for task, _ in plain], [args for _, args in plain]),
                ).fetchall()
                for task, args in jobs:
                    if task == "locked":
                        self.locks += 1
                        # A lock already waiting ('todo') refuses the job, as defer() would.
                        rows += connection.execute(
                            "INSERT INTO procrastinate_jobs "
                            "(queue_name, task_name, args, queueing_lock) "
                            "VALUES ('default', 'record', %s::jsonb, %s) "
                            "ON CONFLICT (queueing_lock) WHERE status = 'todo' DO NOTHING "
                            "RETURNING id, task_name",
                            (args, f"soak-{self.locks % 50}"),
                        ).fetchall()
                for job_id, task in rows:
                    self.ids[task].append(job_id)
            except psycopg.Error:
                self.errors += 1
                connection = None
                time.sleep(0.2)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))


def query(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    for attempt in range(60):
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
                cursor = connection.execute(sql, params)  # type: ignore[arg-type]
                return cursor.fetchall() if cursor.description is not None else []
        except psycopg.OperationalError:
            if attempt == 59:
                raise
            time.sleep(0.5)
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=int, default=150, help="jobs deferred per second")
    parser.add_argument("--concurrency", type=int, default=30)
    parser.add_argument("--fault-every", type=float, default=6.0, help="mean seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--logs", type=Path, default=None, help="keep worker logs here")
    arguments = parser.parse_args()
    seed = arguments.seed if arguments.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"soak: {arguments.seconds:.0f} s, {arguments.workers} workers, seed {seed}", flush=True)

    logs = arguments.logs or Path(f"/tmp/fastworker-soak-{seed}")
    logs.mkdir(parents=True, exist_ok=True)
    for old in logs.glob("worker*.log"):
        old.unlink()  # a run with the same seed starts its logs anew
    # Room for 4 workers' connections (3-4 each, and their apps' pools of up to 8), the
    # load's, and server processes of connections a fault left behind for a while.
    cluster = PrivateCluster(max_connections=200)
    try:
        cluster.create_database(DATABASE)
        dsn = cluster.dsn(DATABASE)
        create_executions_table(dsn)
        # The workers' cores connect as a role of their own: a statement_timeout fault set
        # on it hits their connections, not their apps' pools (procrastinate's periodic
        # deferrer, reused as is, stops its worker on a database error).
        for grant in (
            f"CREATE ROLE {CORE_ROLE} LOGIN",
            f"GRANT ALL ON ALL TABLES IN SCHEMA public TO {CORE_ROLE}",
            f"GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {CORE_ROLE}",
        ):
            query(dsn, grant)
        with FaultProxy("127.0.0.1", cluster.port, classify=classify) as proxy:
            return soak(arguments, rng, cluster, dsn, proxy, logs)
    finally:
        cluster.destroy()


def soak(
    arguments: argparse.Namespace,
    rng: random.Random,
    cluster: PrivateCluster,
    dsn: str,
    proxy: FaultProxy,
    logs: Path,
) -> int:
    spawned = 0
    core_dsn = make_conninfo(proxy.dsn(dsn), user=CORE_ROLE)

    def spawn(periodic: bool = True) -> WorkerProcess:
        nonlocal spawned
        spawned += 1
        options = [
            "--concurrency", str(arguments.concurrency), "--recover-stalled-jobs",
            "--heartbeat", HEARTBEAT, "--stalled-timeout", STALLED, "--polling", "2",
            "--abort-polling", "1", "--reconnect-timeout", "120", "--log-level", "WARNING",
            "--core-dsn", core_dsn, "--response-timeout", RESPONSE_TIMEOUT,
        ]  # fmt: skip
        if periodic:
            options.append("--periodic")
        worker = WorkerProcess(dsn, logs / f"worker{spawned}.log", *options)
        SPAWNED_AT[worker.pid] = time.monotonic()
        return worker

    # Worker 0 is never killed: its RSS is the memory figure.
    steady = spawn()
    others = [spawn() for _ in range(arguments.workers - 1)]
    deferrer = Deferrer(dsn, arguments.rate, rng)
    deferrer.start()
    faults: Counter[str] = Counter()
    rss: list[tuple[float, int]] = []
    started = time.monotonic()
    next_fault = started + rng.expovariate(1 / arguments.fault_every)
    next_abort = started + 1
    next_sample = started + 2
    try:
        while (now := time.monotonic()) - started < arguments.seconds:
            time.sleep(0.2)
            if now >= next_sample:
                sample = rss_kib(steady.pid)
                if sample:
                    rss.append((now - started, sample))
                next_sample = now + 2
            if now >= next_abort:
                next_abort = now + 1.5
                abort_some(dsn, rng, faults)
            if now >= next_fault:
                next_fault = now + rng.expovariate(1 / arguments.fault_every)
                others = inject(rng, cluster, dsn, proxy, steady, others, spawn, faults)
            for worker in [steady, *others]:
                if worker.alive():
                    continue
                if worker is not steady and failed_to_start(worker):
                    # Started while PostgreSQL restarted: a worker refuses to start on an
                    # unreachable database (exit code 3 of the CLI). Start another.
                    others.remove(worker)
                    others.append(spawn())
                    faults["a new worker's start met a restart (started again)"] += 1
                    continue
                print(f"worker {worker.pid} exited: {worker.log()[-2000:]}", flush=True)
                return 1
    finally:
        deferrer.stopping.set()
        deferrer.join(timeout=30)
    elapsed = time.monotonic() - started
    print(f"deferring stopped after {elapsed:.0f} s; draining", flush=True)

    # Drain: cancel/abort what is left of the long jobs, wait for the rest.
    drained = False
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        query(dsn, "SELECT procrastinate_cancel_job_v1(id, true, false) FROM procrastinate_jobs "
                   "WHERE task_name = 'abortable' AND status IN ('todo', 'doing') "
                   "AND NOT abort_requested")  # fmt: skip
        left = query(
            dsn,
            "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing') "
            "AND (task_name <> 'periodic_tick' OR scheduled_at IS NULL OR scheduled_at <= now())",
        )[0][0]
        if left == 0:
            drained = True
            break
        time.sleep(1)
    codes = [worker.stop(timeout=120) for worker in [steady, *others]]
    for fired in proxy.fired:
        faults[f"proxy {fired.fault.action} at {fired.fault.point} ({fired.kind})"] += 1
    return report(dsn, deferrer, faults, rss, elapsed, drained, codes, logs)


SPAWNED_AT: dict[int, float] = {}


def failed_to_start(worker: WorkerProcess) -> bool:
    """The worker ended at its start (within seconds), the database being unreachable."""
    young = time.monotonic() - SPAWNED_AT.get(worker.pid, 0.0) < 30
    return young and "cannot connect to PostgreSQL" in worker.log()


def abort_some(dsn: str, rng: random.Random, faults: Counter[str]) -> None:
    """Abort a running long job, or cancel a waiting one."""
    try:
        rows = query(
            dsn,
            "SELECT id, status::text FROM procrastinate_jobs WHERE task_name = 'abortable' "
            "AND status IN ('todo', 'doing') AND NOT abort_requested ORDER BY random() LIMIT 1",
        )
        if rows and rng.random() < 0.7:
            job_id, status = rows[0]
            query(dsn, "SELECT procrastinate_cancel_job_v1(%s, true, false)", job_id)
            faults["abort requested" if status == "doing" else "cancelled while waiting"] += 1
    except psycopg.Error:
        pass


def inject(
    rng: random.Random,
    cluster: PrivateCluster,
    dsn: str,
    proxy: FaultProxy,
    steady: WorkerProcess,
    others: list[WorkerProcess],
    spawn: Any,
    faults: Counter[str],
) -> list[WorkerProcess]:
    kind = rng.choices(
        [
            "proxy", "terminate", "cancel", "statement_timeout", "row_lock", "prune_live",
            "sigkill", "restart", "stall", "queueing_lock_recovery",
        ],
        weights=[10, 3, 3, 1, 2, 1, 2, 1, 1, 1],
    )[0]  # fmt: skip
    if kind == "proxy":
        target = rng.choice(PROXY_KINDS)
        # Where in the round trip: (point, reply message index, reply message type).
        point, index, reply_type = rng.choice(
            [
                ("before_request", 0, None),
                ("mid_request", 0, None),
                ("after_request", 0, None),
                ("after_reply_message", 0, None),  # after its first reply message
                ("after_reply_message", 0, "C"),  # just before ReadyForQuery
            ]
        )
        action = rng.choices(["cut", "blackhole", "delay"], weights=[7, 2, 1])[0]
        proxy.clear_faults()  # one armed fault at a time
        proxy.add_fault(
            Fault(
                kind=target,
                point=point,  # type: ignore[arg-type]
                index=index,
                reply_type=reply_type,
                action=action,  # type: ignore[arg-type]
                delay_seconds=rng.uniform(0.2, 2.0),
                blackhole_seconds=20.0,
            )
        )
        return others
    if kind == "sigkill":
        if others:
            victim = others.pop(rng.randrange(len(others)))
            victim.kill()
            others.append(spawn())
            faults["SIGKILL a worker (and start a new one)"] += 1
        return others
    if kind == "restart":
        cluster.restart()
        faults["PostgreSQL restart"] += 1
        return others
    if kind == "stall":
        stall(rng.choice([steady, *others]))
        faults["a worker stalled (SIGSTOP) 4 x 2.5 s"] += 1
        return others
    if kind == "queueing_lock_recovery":
        if others and hold_queueing_locks(dsn, float(STALLED) + rng.uniform(2, 6)):
            victim = others.pop(rng.randrange(len(others)))
            victim.kill()
            others.append(spawn())
            faults["queueing locks of running jobs held past the stalled timeout, SIGKILL"] += 1
        return others
    try:
        if kind == "statement_timeout":
            # A connection made meanwhile keeps it: one of them is made now.
            query(dsn, f"ALTER ROLE {CORE_ROLE} SET statement_timeout TO '20ms'")
            backends = [pid for pid, _ in fastworker_backends(dsn, DATABASE)]
            if backends:
                terminate_backend(dsn, rng.choice(backends))
            time.sleep(2)
            query(dsn, f"ALTER ROLE {CORE_ROLE} RESET statement_timeout")
            faults["statement_timeout 20 ms on a worker connection made anew"] += 1
        elif kind == "row_lock":
            rows = query(
                dsn,
                "SELECT id FROM procrastinate_jobs WHERE status = 'doing' "
                "ORDER BY random() LIMIT 1",
            )
            if rows:
                hold_row_lock(dsn, rows[0][0], rng.uniform(1, 5))
                faults["row lock held on a running job"] += 1
        elif kind == "prune_live":
            rows = query(
                dsn,
                "DELETE FROM procrastinate_workers WHERE id = (SELECT id FROM "
                "procrastinate_workers WHERE last_heartbeat > now() - interval '3 s' "
                "ORDER BY random() LIMIT 1) RETURNING id",
            )
            if rows:
                faults["a live worker's row deleted (pruned)"] += 1
        else:
            backends = [pid for pid, _ in fastworker_backends(dsn, DATABASE)]
            if backends:
                pid = rng.choice(backends)
                if kind == "terminate":
                    terminate_backend(dsn, pid)
                    faults["pg_terminate_backend (a worker connection)"] += 1
                else:
                    query(dsn, "SELECT pg_cancel_backend(%s)", pid)
                    faults["pg_cancel_backend (a worker connection)"] += 1
    except psycopg.Error:
        pass
    return others


def stall(worker: WorkerProcess) -> None:
    """SIGSTOP the worker 4 times for 2.5 s (a paused VM, a long GC), from a thread."""

    def pause() -> None:
        for _ in range(4):
            try:
                os.kill(worker.pid, signal.SIGSTOP)
                time.sleep(2.5)
            except OSError:
                return
            finally:
                with contextlib.suppress(OSError):
                    os.kill(worker.pid, signal.SIGCONT)
            time.sleep(0.5)

    threading.Thread(target=pause, daemon=True).start()


def hold_queueing_locks(dsn: str, seconds: float) -> bool:
    """Another session inserts, uncommitted, a waiting job with the queueing lock of every
    running job that has one, holds it for `seconds`, then rolls back: a recovery that puts
    one of those jobs back to `todo` waits on it (and meets its lock timeout) meanwhile."""
    held = threading.Event()
    holding: list[int] = []

    def hold() -> None:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as connection:
                rows = connection.execute(
                    "INSERT INTO procrastinate_jobs (queue_name, task_name, args, queueing_lock) "
                    "SELECT DISTINCT 'default', 'record', '{}'::jsonb, queueing_lock "
                    "FROM procrastinate_jobs "
                    "WHERE status = 'doing' AND queueing_lock LIKE 'soak-%' "
                    "ON CONFLICT (queueing_lock) WHERE status = 'todo' DO NOTHING RETURNING id"
                ).fetchall()
                if rows:
                    holding.extend(row[0] for row in rows)
                    held.set()
                    time.sleep(seconds)
                connection.rollback()
        except psycopg.Error:
            pass
        finally:
            held.set()

    threading.Thread(target=hold, daemon=True).start()
    held.wait(timeout=10)
    return bool(holding)


def hold_row_lock(dsn: str, job_id: int, seconds: float) -> None:
    """Another session (a DBA) keeps a job row locked for `seconds`, from a thread."""

    def hold() -> None:
        try:
            with psycopg.connect(dsn, connect_timeout=5) as connection:
                connection.execute(
                    "SELECT 1 FROM procrastinate_jobs WHERE id = %s FOR UPDATE", (job_id,)
                )
                time.sleep(seconds)
                connection.rollback()
        except psycopg.Error:
            pass

    threading.Thread(target=hold, daemon=True).start()


STALLED_JOB_FAILED = re.compile(
    r"Stalled job (\d+) could not be retried and was marked failed: duplicate key value "
    r'violates unique constraint "procrastinate_jobs_queueing_lock_idx_v1"'
)


def jobs_failed_for_their_queueing_lock(logs: Path) -> set[int]:
    """The jobs a recovery marked failed, as the workers' logs say, because another job
    with their queueing lock was waiting."""
    return {
        int(match.group(1))
        for log in logs.glob("worker*.log")
        for match in STALLED_JOB_FAILED.finditer(log.read_text(errors="replace"))
    }


def report(
    dsn: str,
    deferrer: Deferrer,
    faults: Counter[str],
    rss: list[tuple[float, int]],
    elapsed: float,
    drained: bool,
    codes: list[int],
    logs: Path,
) -> int:
    failures: list[str] = []
    deferred = [job_id for ids in deferrer.ids.values() for job_id in ids]
    statuses = dict(query(dsn, "SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1"))
    by_task = query(
        dsn,
        "SELECT task_name, status::text, count(*) FROM procrastinate_jobs "
        "GROUP BY 1, 2 ORDER BY 1, 2",
    )
    present = {
        row[0]
        for row in query(dsn, "SELECT id FROM procrastinate_jobs WHERE id = ANY(%s)", deferred)
    }
    lost = len(deferred) - len(present)
    unfinished = statuses.get("todo", 0) + statuses.get("doing", 0)
    # Each execution recorded needs its own claim ('started' event); each claim exactly one
    # terminal or retry write (attempts).
    per_job = query(
        dsn,
        """SELECT j.id, j.status::text, j.attempts, j.abort_requested,
                  coalesce(e.starts, 0), coalesce(x.runs, 0)
             FROM procrastinate_jobs j
             LEFT JOIN (SELECT job_id, count(*) AS starts FROM procrastinate_events
                         WHERE type = 'started' GROUP BY 1) e ON e.job_id = j.id
             LEFT JOIN (SELECT job_id, count(*) AS runs FROM fw_executions GROUP BY 1) x
                    ON x.job_id = j.id
            WHERE j.status NOT IN ('todo', 'doing')""",
    )
    run_without_claim = [row for row in per_job if row[5] > row[4]]
    # procrastinate_retry_job_v2 on a job whose abort was requested marks it failed without
    # counting the attempt (and leaves abort_requested set): e.g. a killed worker's job
    # aborted before stalled-job recovery retried it.
    claim_not_ended_once = [
        row
        for row in per_job
        if row[4] != row[2] and not (row[1] == "failed" and row[3] and row[4] == row[2] + 1)
    ]
    succeeded_never_ran = [row for row in per_job if row[1] == "succeeded" and row[5] == 0]
    # `record` jobs never fail by themselves: one that ended failed was given up on (by a
    # recovery that met a passing error, say). The one failure a recovery may write: the
    # job cannot go back to `todo` because another job holding its queueing lock is
    # `todo`, committed (procrastinate's unique index; the load defers `soak-N` jobs while
    # one of the same lock runs). The workers' logs name each such job.
    cannot_go_back = jobs_failed_for_their_queueing_lock(logs)
    record_failed_all = query(
        dsn,
        "SELECT id, attempts, queueing_lock FROM procrastinate_jobs "
        "WHERE task_name = 'record' AND status = 'failed' ORDER BY id",
    )
    record_failed = [row for row in record_failed_all if row[0] not in cannot_go_back]
    duplicate_periodic = query(
        dsn,
        "SELECT args->>'timestamp', count(*) FROM procrastinate_jobs "
        "WHERE task_name = 'periodic_tick' GROUP BY 1 HAVING count(*) > 1",
    )
    executions = query(dsn, "SELECT count(*) FROM fw_executions")[0][0]
    reruns = sum(max(0, row[5] - 1) for row in per_job)
    # Two executions of the same claim (same job, same attempts): run twice.
    run_twice = query(
        dsn,
        "SELECT job_id, attempts, count(*) FROM fw_executions "
        "GROUP BY 1, 2 HAVING count(*) > 1 ORDER BY 1",
    )

    print(f"\n== soak figures ({elapsed:.0f} s of load)")
    print(f"jobs deferred by the load: {len(deferred)} ({deferrer.errors} batches failed)")
    print(f"jobs in the database by status: {statuses}")
    for task, status, count in by_task:
        print(f"  {task:>14} {status:>10} {count}")
    print(
        f"executions recorded: {executions} (runs of a job after its first: {reruns}, each "
        f"under a new claim: a retry, or a recovery after a SIGKILL)"
    )
    print(
        f"jobs: deferred {len(deferred)}, lost {lost}, stuck (todo/doing) {unfinished}, "
        f"run twice for one claim {len(run_twice)}"
    )
    print("faults injected:")
    for kind, count in sorted(faults.items()):
        print(f"  {count:4d}  {kind}")
    if rss:
        quarter = max(1, len(rss) // 4)
        first = statistics.median(sample for _, sample in rss[:quarter])
        last = statistics.median(sample for _, sample in rss[-quarter:])
        peak = max(sample for _, sample in rss)
        growth = last - first
        print(
            f"RSS of the never-killed worker: first quarter median {first / 1024:.1f} MiB, "
            f"last quarter median {last / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
            f"growth {growth / 1024:+.1f} MiB over {len(rss)} samples"
        )
        if growth > max(16 * 1024, 0.15 * first):
            failures.append(f"RSS grew by {growth / 1024:.1f} MiB")
    checks = {
        "the queue drained": drained and unfinished == 0,
        "workers stopped cleanly (exit 0)": all(code == 0 for code in codes),
        "no deferred job lost": lost == 0,
        "no job run twice for one claim": not run_twice,
        "no execution without its own claim": not run_without_claim,
        "every claim ended by exactly one write": not claim_not_ended_once,
        "every succeeded job ran": not succeeded_never_ran,
        "no record job ended failed (but for its queueing lock taken)": not record_failed,
        "no periodic second deferred twice": not duplicate_periodic,
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
        if not ok:
            failures.append(name)
    for label, rows in (
        ("run without claim", run_without_claim),
        ("claim not ended once", claim_not_ended_once),
        ("succeeded, never ran", succeeded_never_ran),
        ("record jobs failed", record_failed),
        ("run twice for one claim", run_twice),
    ):
        if rows:
            print(f"  {label}: {rows[:10]}")
    print(
        "record jobs failed because another job with their queueing lock was todo: "
        f"{len(record_failed_all) - len(record_failed)}"
    )
    print(f"periodic seconds deferred twice: {len(duplicate_periodic)} {duplicate_periodic[:5]}")
    print(f"exit codes: {codes}; lost: {lost}; left todo/doing: {unfinished}")
    if unfinished:
        stuck = query(
            dsn,
            "SELECT id, status::text, task_name, attempts, worker_id, abort_requested"
            " FROM procrastinate_jobs WHERE status IN ('todo', 'doing') ORDER BY id LIMIT 20",
        )
        print(f"left todo/doing (id, status, task, attempts, worker, abort requested): {stuck}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
