"""The claim ledger: what the runner knows of each claim (a job id and the attempts it had
when claimed) between the core handing it over and its outcome being reported.

One object owns it, so that every rule about a claim's life is read in one place:
- handed over: the job has a context and owes exactly one outcome;
- started: its `_process_job` took its first step (only a started job may be cancelled,
  see `Worker._abort_job`);
- lost: the claim is no longer this worker's (another worker recovered the job), so the
  run stops as an abort would;
- timed out: the job ran over its timeout, so its cancellation ends it as a failure;
- abort requested: procrastinate's own `Worker._job_ids_to_abort`, shared by reference
  because procrastinate's methods (`_handle_abort_jobs_requested`, `_abort_job`) write it.

By claim, not by job id: a job recovered elsewhere and claimed here again may run here
twice at once, under its old claim and its new one. Pure: no I/O, no event loop.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

from procrastinate import job_context, jobs

Claim = tuple[int, int]
# What a handed-over claim carries until its outcome (the runner: its JobContext).
Context = TypeVar("Context")


def claim_of(job: jobs.Job) -> Claim:
    """One claim of a job: its id and the attempts it had when claimed."""
    assert job.id is not None
    return (job.id, job.attempts)


class ClaimLedger(Generic[Context]):
    def __init__(self, abort_reasons: dict[int, job_context.AbortReason]) -> None:
        self._awaiting_outcome: dict[Claim, Context] = {}
        self._started: set[Claim] = set()
        self._lost: set[Claim] = set()
        self._timed_out: set[int] = set()
        self._abort_reasons = abort_reasons

    # Handed over and started.

    def hand_over(self, claim: Claim, context: Context) -> None:
        """The core handed this claim over: it owes one outcome from now on."""
        self._awaiting_outcome[claim] = context

    def start(self, claim: Claim) -> None:
        self._started.add(claim)

    def is_started(self, claim: Claim) -> bool:
        return claim in self._started

    def awaiting_outcome(self, claim: Claim) -> bool:
        return claim in self._awaiting_outcome

    # Reported.

    def record_outcome(self, claim: Claim) -> bool:
        """An outcome of this claim is being reported: False if one was already (a
        middleware or an override reporting twice), so that the first one stands. A claim
        never handed over (a row that could not be decoded) reports once, too."""
        self._lost.discard(claim)
        return not (self._awaiting_outcome.pop(claim, None) is None and claim in self._started)

    def run_ended(self, claim: Claim) -> bool:
        """The run's task is done: True if its outcome is still owed (the task ended
        without reporting one)."""
        self._started.discard(claim)
        return claim in self._awaiting_outcome

    # Lost.

    def lose(self, claims: Iterable[Claim]) -> set[Claim]:
        """These claims are no longer this worker's; returns them as a set."""
        lost = set(claims)
        self._lost |= lost
        return lost

    def is_lost(self, claim: Claim) -> bool:
        return claim in self._lost

    # Timed out.

    def time_out(self, job_id: int) -> None:
        self._timed_out.add(job_id)

    def is_timed_out(self, job_id: int | None) -> bool:
        return job_id in self._timed_out

    def forget_time_out(self, job_id: int) -> None:
        self._timed_out.discard(job_id)

    # Abort requests (procrastinate's `_job_ids_to_abort`).

    def request_abort(
        self, job_id: int, reason: job_context.AbortReason, *, keep_earlier: bool = False
    ) -> None:
        """Ask the job to abort; ``keep_earlier``: a reason already given stands."""
        if keep_earlier:
            self._abort_reasons.setdefault(job_id, reason)
        else:
            self._abort_reasons[job_id] = reason

    def abort_requested(self, job_id: int | None) -> bool:
        return job_id in self._abort_reasons

    def abort_reason(self, claim: Claim) -> job_context.AbortReason | None:
        """Why the run of this claim should abort: a request for its job, else a lost
        claim (a user request, as far as the job can tell), else None."""
        reason = self._abort_reasons.get(claim[0])
        if reason is None and claim in self._lost:
            return job_context.AbortReason.USER_REQUEST
        return reason

    def forget_abort(self, job_id: int) -> None:
        self._abort_reasons.pop(job_id, None)
