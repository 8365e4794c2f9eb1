#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs fastworker with its test extras into
# .venv (maturin build), makes sure a local PostgreSQL runs (installing it with apt-get if
# absent), then runs `cargo test` (the Rust core) and pytest. Exits non-zero if anything
# fails. Set FASTWORKER_TEST_DSN to use another server (tests create and drop databases).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

ADMIN_DSN="host=127.0.0.1 port=5432 user=postgres dbname=postgres"

as_postgres() { su postgres -s /bin/sh -c "$1"; }

server_is_up() { pg_isready -q -h 127.0.0.1 -p 5432 >/dev/null 2>&1; }

ensure_postgres() {
    local installed_now="" version
    if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "PostgreSQL is not installed; run as root or install it (apt-get install postgresql)"
        say "installing PostgreSQL (apt-get)"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql
        installed_now=1
    fi
    if ! server_is_up; then
        version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -z "$version" ]; then
            version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1 || true)
            [ -n "$version" ] || die "PostgreSQL server binaries not found"
            say "creating PostgreSQL $version cluster 'main'"
            pg_createcluster "$version" main
        fi
        say "starting PostgreSQL $version cluster 'main'"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        for _ in $(seq 1 60); do server_is_up && break; sleep 1; done
        server_is_up || die "PostgreSQL did not start on 127.0.0.1:5432"
    fi
    # The tests connect over TCP as `postgres` without a password.
    if ! psql "$ADMIN_DSN" -w -Atqc 'SELECT 1' >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && { [ -n "$installed_now" ] || [ "${CI:-}" = true ]; }; then
            say "allowing password-less TCP connections as postgres from 127.0.0.1 (test server)"
            local hba
            hba=$(as_postgres "psql -Atqc 'SHOW hba_file'")
            { echo "host all postgres 127.0.0.1/32 trust"; cat "$hba"; } >"$hba.new"
            chown postgres: "$hba.new" && mv "$hba.new" "$hba"
            as_postgres "psql -Atqc 'SELECT pg_reload_conf()'" >/dev/null
            sleep 1
        fi
        psql "$ADMIN_DSN" -w -Atqc 'SELECT 1' >/dev/null ||
            die "cannot connect with '$ADMIN_DSN'; set FASTWORKER_TEST_DSN to a server where databases may be created"
    fi
}

ensure_venv test,demo
if [ -z "${FASTWORKER_TEST_DSN:-}" ]; then
    ensure_postgres
fi

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
