#!/usr/bin/env bash
# The test suite against each procrastinate release the pin in pyproject.toml allows (the
# newest of each series: fastworker/compat.py's TESTED_SERIES; tests/test_compat.py checks
# that RELEASES, TESTED_SERIES and the pin agree). Each release gets its own virtualenv, .venv-procrastinate-X.Y.Z,
# with the package built once (a wheel of this tree), the demo extra, the test tools and that
# procrastinate. Arguments go to pytest (default: the whole suite), e.g.
#   bash scripts/compat.sh tests/test_compat.py tests/differential -x -q
# Exits non-zero if the suite fails against any release; prints one line per release.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
source scripts/postgres.sh

RELEASES=(3.10.0)
# Another list, to try releases outside the pin: PROCRASTINATE_RELEASES="3.9.0 3.10.0"
if [ -n "${PROCRASTINATE_RELEASES:-}" ]; then
    read -r -a RELEASES <<<"$PROCRASTINATE_RELEASES"
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
python=$(find_python) || die "CPython >= 3.10 not found (set PYTHON=/path/to/python3)"
if [ -z "${FASTWORKER_TEST_DSN:-}" ]; then
    ensure_postgres
fi

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
say "building the package once (pip wheel, release profile)"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" .
wheel=$(ls "$wheels"/*.whl)

declare -A outcome
failed=0
for release in "${RELEASES[@]}"; do
    venv=".venv-procrastinate-$release"
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv"
        "$python" -m venv "$venv"
    fi
    say "installing fastworker, its demo extra, the test tools and procrastinate==$release into $venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
    "$venv/bin/python" -m pip install --quiet "$wheel[demo]" -r requirements/test.txt
    # Then the release: outside the pin too (pip warns of the conflict; that is the point).
    "$venv/bin/python" -m pip install --quiet "procrastinate==$release" 2>&1 |
        grep -v "requires procrastinate" >&2 || true
    installed=$("$venv/bin/python" -c 'import procrastinate; print(procrastinate.__version__)')
    [ "$installed" = "$release" ] || die "$venv has procrastinate $installed, not $release"
    say "pytest against procrastinate $release"
    if "$venv/bin/python" -m pytest "$@"; then
        outcome[$release]=passed
    else
        outcome[$release]=FAILED
        failed=1
    fi
done

for release in "${RELEASES[@]}"; do
    echo "procrastinate $release: ${outcome[$release]}"
done
exit "$failed"
