#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs fastworker and the test tools
# (requirements/test.txt) into .venv (maturin build), makes sure a local PostgreSQL runs
# (installing it with apt-get if absent) and PgBouncer (for the pooler tests),
# nss_wrapper (for a TLS test with HOME unset) and promtool (for the alert rules) are
# installed, then runs `cargo test` (the Rust core) and pytest. Exits non-zero if anything
# fails. Set FASTWORKER_TEST_DSN to use another server (tests create and drop databases).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

source scripts/postgres.sh

ensure_venv test,demo
if [ -z "${FASTWORKER_TEST_DSN:-}" ]; then
    ensure_postgres
fi
ensure_pgbouncer
ensure_nss_wrapper
ensure_promtool

failed=0
say "cargo test (Rust core)"
cargo test || failed=1
say "pytest"
.venv/bin/python -m pytest || failed=1

if [ "$failed" != 0 ]; then
    echo "FAILED: see the summaries above" >&2
    exit 1
fi
say "all tests passed"
