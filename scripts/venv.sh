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

# ensure_venv NAMES: .venv with the package and, for each comma-separated name, the
# requirements file requirements/NAME.txt (tools: test, bench) if there is one, else the
# package's extra NAME (demo, metrics, otel): `ensure_venv test,demo` is
# `pip install ".[demo]" -r requirements/test.txt`.
ensure_venv() {
    local names=$1 python name extras="" requirements=()
    for name in ${names//,/ }; do
        if [ -f "requirements/$name.txt" ]; then
            requirements+=(-r "requirements/$name.txt")
        else
            extras="${extras:+$extras,}$name"
        fi
    done
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
    say "building and installing procrastinate-fastworker${extras:+[$extras]}${requirements[*]:+ with ${requirements[*]}} into .venv (maturin, release build; the first build takes a few minutes)"
    .venv/bin/python -m pip install --quiet ".${extras:+[$extras]}" "${requirements[@]}"
}
