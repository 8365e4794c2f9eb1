# Sourced by demo.sh and test.sh: creates .venv at the repository root and installs the
# package into it (a maturin build of the Rust extension) with the given extras.

die() { echo "error: $*" >&2; exit 1; }
say() { echo "==> $*"; }

find_python() {
    local candidate
    for candidate in ${PYTHON:-} python3.11 python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

# ensure_venv EXTRAS: .venv with `pip install ".[EXTRAS]"`.
ensure_venv() {
    local extras=$1 python
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: the Rust toolchain is needed to build fastworker"
    if [ ! -x .venv/bin/python ]; then
        python=$(find_python) || die "CPython >= 3.10 not found (set PYTHON=/path/to/python3)"
        say "creating .venv with $("$python" --version 2>&1)"
        if ! "$python" -m venv .venv 2>/dev/null; then
            # Debian's python3 without python3-venv: fall back to virtualenv.
            rm -rf .venv
            "$python" -m pip install --quiet --user virtualenv ||
                "$python" -m pip install --quiet --break-system-packages --user virtualenv
            "$python" -m virtualenv --quiet .venv
        fi
    fi
    .venv/bin/python -m pip install --quiet --upgrade pip
    # A .venv made before the rename holds this package under its former distribution name
    # (`fastworker`, the same `fastworker` import package): remove it, so that one
    # distribution owns the files.
    if .venv/bin/python -m pip show --quiet fastworker >/dev/null 2>&1; then
        .venv/bin/python -m pip uninstall --quiet --yes fastworker
    fi
    say "building and installing procrastinate-fastworker[$extras] into .venv (maturin, release build; the first build takes a few minutes)"
    .venv/bin/python -m pip install --quiet ".[$extras]"
}
