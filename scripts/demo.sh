#!/usr/bin/env bash
# The demo, on a fresh machine: a virtualenv in .venv, fastworker built and installed with
# the demo extra, then `python -m fastworker.demo` (20,000 no-op jobs on a throwaway
# embedded PostgreSQL, drained by fastworker). Arguments go to the demo, e.g.
#   bash scripts/demo.sh --compare           # also run procrastinate's own worker
#   bash scripts/demo.sh --jobs 50000 --concurrency 200 --local
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

ensure_venv demo
say "running the demo"
exec .venv/bin/python -m fastworker.demo "$@"
