# Sourced by test.sh and bench.sh (after venv.sh): ensure_postgres makes sure a local
# PostgreSQL runs on 127.0.0.1:5432 and accepts `postgres` without a password, installing
# and starting it if needed. ensure_pgbouncer installs PgBouncer (tests/test_pooler.py
# starts its own, in transaction mode, in front of that server). ensure_nss_wrapper
# installs nss_wrapper (tests/reliability/test_tls_parity.py gives a worker a user
# database of its own, to check libpq's home directory with HOME unset). ensure_promtool
# puts Prometheus' promtool into .venv/bin (tests/test_alerts.py runs the alert rules).

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
            die "cannot connect with '$ADMIN_DSN'; point FASTWORKER_TEST_DSN (tests) or --dsn (bench) at a server where databases may be created"
    fi
}

ensure_pgbouncer() {
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] && return 0
    if [ "$(id -u)" != 0 ]; then
        say "PgBouncer is not installed (apt-get install pgbouncer): the pooler tests will be skipped"
        return 0
    fi
    say "installing PgBouncer (apt-get)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pgbouncer
    # Only the binary is wanted: the tests start their own.
    if command -v systemctl >/dev/null 2>&1; then systemctl disable --now pgbouncer >/dev/null 2>&1 || true; fi
}

ensure_nss_wrapper() {
    local library
    for library in /usr/lib/*/libnss_wrapper.so /usr/lib*/libnss_wrapper.so; do
        [ -e "$library" ] && return 0
    done
    if [ "$(id -u)" != 0 ]; then
        say "nss_wrapper is not installed (apt-get install libnss-wrapper): a TLS test will be skipped"
        return 0
    fi
    say "installing nss_wrapper (apt-get)"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnss-wrapper
}

ensure_promtool() {
    command -v promtool >/dev/null 2>&1 && return 0
    [ -x .venv/bin/promtool ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        say "promtool is not installed: the alert rules are checked on their YAML alone"
        return 0
    fi
    # Only the binary is wanted: unpacked from Debian's prometheus package, not installed
    # (which would start a Prometheus server).
    say "fetching promtool (Debian's prometheus package, unpacked into .venv/bin)"
    local scratch
    scratch=$(mktemp -d)
    if ! (cd "$scratch" && apt-get download -q prometheus >/dev/null 2>&1); then
        if [ "$(id -u)" = 0 ]; then apt-get update -q; fi
        if ! (cd "$scratch" && apt-get download -q prometheus); then
            say "could not fetch promtool: the alert rules are checked on their YAML alone"
            rm -rf "$scratch"
            return 0
        fi
    fi
    dpkg-deb --fsys-tarfile "$scratch"/prometheus_*.deb | tar -x -O ./usr/bin/promtool >.venv/bin/promtool
    chmod 0755 .venv/bin/promtool
    rm -rf "$scratch"
}
