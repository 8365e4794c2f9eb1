#!/usr/bin/env bash
# The side-by-side benchmark, on a fresh machine: .venv with fastworker (release build) and
# the bench extra (matplotlib for the plot, pgqueuer as a third system), a local PostgreSQL
# (installed and started if needed), then benches/e2e.py. Arguments go to it, e.g.
#   bash scripts/bench.sh --jobs 5000 --memory-jobs 0
#   bash scripts/bench.sh --only lock_chain,lateness,io,scale_out
#   bash scripts/bench.sh --dsn "host=db.example user=bench dbname=bench"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
source scripts/postgres.sh

ensure_venv bench
case " $* " in
    *" --dsn"*) ;;
    *) ensure_postgres ;;
esac
say "running benches/e2e.py (procrastinate's worker and fastworker, one database, one run)"
exec .venv/bin/python benches/e2e.py "$@"
