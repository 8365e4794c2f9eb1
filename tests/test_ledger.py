"""The claim ledger's rules, without a database or an event loop: each claim owes exactly
one outcome, and only what the ledger was told moves it."""

from __future__ import annotations

from procrastinate.job_context import AbortReason

from fastworker.runner.ledger import ClaimLedger

CLAIM = (7, 0)
RECLAIMED = (7, 1)  # the same job, recovered elsewhere and claimed here again


def ledger() -> tuple[ClaimLedger[str], dict[int, AbortReason]]:
    abort_reasons: dict[int, AbortReason] = {}
    return ClaimLedger(abort_reasons), abort_reasons


def test_a_claim_handed_over_owes_one_outcome_and_only_the_first_one_counts() -> None:
    claims, _ = ledger()
    claims.hand_over(CLAIM, "context")
    claims.start(CLAIM)
    assert claims.awaiting_outcome(CLAIM)
    assert claims.record_outcome(CLAIM) is True
    assert not claims.awaiting_outcome(CLAIM)
    # A middleware reporting again while the run is still going: refused.
    assert claims.record_outcome(CLAIM) is False
    # Its task ends: nothing more is owed.
    assert claims.run_ended(CLAIM) is False
    assert not claims.is_started(CLAIM)


def test_a_run_that_ended_without_an_outcome_still_owes_it() -> None:
    claims, _ = ledger()
    claims.hand_over(CLAIM, "context")
    claims.start(CLAIM)
    assert claims.run_ended(CLAIM) is True
    # The runner then reports it (failed or aborted): that one counts.
    assert claims.record_outcome(CLAIM) is True


def test_a_claim_never_handed_over_reports_its_outcome() -> None:
    """A row that could not be decoded fails without being handed over or started."""
    claims, _ = ledger()
    assert claims.record_outcome(CLAIM) is True


def test_claims_of_one_job_are_told_apart() -> None:
    claims, _ = ledger()
    claims.hand_over(CLAIM, "old run")
    claims.hand_over(RECLAIMED, "new run")
    claims.start(CLAIM)
    claims.lose([CLAIM])
    assert claims.is_lost(CLAIM) and not claims.is_lost(RECLAIMED)
    assert claims.is_started(CLAIM) and not claims.is_started(RECLAIMED)
    assert claims.abort_reason(CLAIM) == AbortReason.USER_REQUEST
    assert claims.abort_reason(RECLAIMED) is None
    assert claims.record_outcome(CLAIM) is True
    assert claims.awaiting_outcome(RECLAIMED)


def test_an_outcome_clears_the_lost_mark() -> None:
    claims, _ = ledger()
    claims.hand_over(CLAIM, "context")
    assert claims.lose([CLAIM, RECLAIMED]) == {CLAIM, RECLAIMED}
    claims.record_outcome(CLAIM)
    assert not claims.is_lost(CLAIM)
    assert claims.is_lost(RECLAIMED)


def test_abort_requests_are_procrastinates_dict() -> None:
    claims, abort_reasons = ledger()
    claims.request_abort(7, AbortReason.SHUTDOWN)
    assert abort_reasons == {7: AbortReason.SHUTDOWN}
    # A timeout's request leaves an earlier reason standing; another request replaces it.
    claims.request_abort(7, AbortReason.USER_REQUEST, keep_earlier=True)
    assert abort_reasons == {7: AbortReason.SHUTDOWN}
    claims.request_abort(7, AbortReason.USER_REQUEST)
    assert abort_reasons == {7: AbortReason.USER_REQUEST}
    # procrastinate's own methods write the same dict: the ledger sees it.
    abort_reasons[8] = AbortReason.SHUTDOWN
    assert claims.abort_requested(8)
    # A request outranks a lost claim's reason.
    claims.lose([(8, 0)])
    assert claims.abort_reason((8, 0)) == AbortReason.SHUTDOWN
    claims.forget_abort(7)
    claims.forget_abort(7)  # twice: no error
    assert not claims.abort_requested(7)
    assert not claims.abort_requested(None)


def test_timed_out_jobs_are_marked_until_forgotten() -> None:
    claims, _ = ledger()
    assert not claims.is_timed_out(7)
    claims.time_out(7)
    assert claims.is_timed_out(7)
    assert not claims.is_timed_out(None)
    claims.forget_time_out(7)
    claims.forget_time_out(7)
    assert not claims.is_timed_out(7)
