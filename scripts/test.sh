#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs fastworker and the test tools
# (requirements/test.txt) into .venv (maturin build), makes sure a local PostgreSQL runs
# (installing it with apt-get if absent) and PgBouncer (for the pooler tests), nss_wrapper
# (for a TLS test with HOME unset) and promtool (for the alert rules) are installed, then
# runs the lint checks (scripts/lint.sh: ruff check, ruff format --check, cargo fmt --check,
# cargo clippy with -D warnings), `cargo test` (the Rust core) and pytest. Every step runs;
# exits non-zero if any fails, naming those. Set FASTWORKER_TEST_DSN to use another server
# (tests create and drop databases).
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

failed=()
say "lint (scripts/lint.sh)"
bash scripts/lint.sh || failed+=("lint")
say "cargo test (Rust core)"
cargo test || failed+=("cargo test")
say "pytest"
.venv/bin/python -m pytest || failed+=("pytest")

if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (see the summaries above)" >&2
    exit 1
fi
say "all checks and tests passed"
