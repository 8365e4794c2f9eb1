#!/usr/bin/env bash
# The release artifacts, built and checked as a user would get them:
#   1. manylinux2014 wheels (glibc >= 2.17) with maturin and zig, in the release profile
#      (fat LTO, one codegen unit, stripped; Cargo.toml): x86_64, and aarch64 when the Rust
#      target for it is installed or can be added (cross-compiled by zig);
#   2. the sdist;
#   3. `auditwheel show` on each wheel (it must be manylinux_2_17, i.e. manylinux2014);
#   4. the x86_64 wheel installed, with its demo extra, into a fresh virtualenv that has
#      only pip, and the demo run from there (outside the repository, so nothing comes
#      from the source tree).
# Everything lands in dist/. The tools (maturin, ziglang, auditwheel) go into the build
# virtualenv .build-venv, not into .venv. Arguments go to the demo, e.g.
#   bash scripts/wheel.sh --jobs 5000 --local
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

# The wheels' platform: glibc 2.17 (manylinux2014) and later.
COMPATIBILITY=manylinux2014
X86_64=x86_64-unknown-linux-gnu
AARCH64=aarch64-unknown-linux-gnu

if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found: the Rust toolchain is needed to build the wheels"
python=$(find_python) || die "CPython >= 3.10 not found (set PYTHON=/path/to/python3)"

# --- the build tools --------------------------------------------------------------------
if [ ! -x .build-venv/bin/python ]; then
    say "creating the build virtualenv .build-venv"
    "$python" -m venv .build-venv
fi
say "installing maturin, ziglang and auditwheel into .build-venv"
.build-venv/bin/python -m pip install --quiet --upgrade pip
# maturin as pyproject.toml's build-system requires it; zig (from the ziglang package) links
# against glibc 2.17's symbols, so no manylinux container is needed.
.build-venv/bin/python -m pip install --quiet "maturin>=1.9,<2" ziglang auditwheel
maturin=.build-venv/bin/maturin
# maturin runs zig as `python3 -m ziglang`: the build virtualenv's python3 first on PATH.
export PATH="$(pwd)/.build-venv/bin:$PATH"

# --- the Rust targets ---------------------------------------------------------------------
targets=("$X86_64")
if rustup target list --installed 2>/dev/null | grep -qx "$AARCH64"; then
    targets+=("$AARCH64")
elif say "adding the Rust target $AARCH64 (rustup)" && rustup target add "$AARCH64"; then
    targets+=("$AARCH64")
else
    echo "==> SKIPPED aarch64: the Rust standard library for $AARCH64 is not installed and" \
        "rustup could not download it here; only the x86_64 wheel is built" \
        "(the release workflow builds aarch64)" >&2
fi

# --- wheels and sdist ---------------------------------------------------------------------
rm -rf dist
mkdir -p dist
for target in "${targets[@]}"; do
    say "building the $COMPATIBILITY wheel for $target (release profile: fat LTO, stripped)"
    "$maturin" build --release --zig --compatibility "$COMPATIBILITY" \
        --target "$target" --interpreter "$python" --out dist
done
say "building the sdist"
"$maturin" sdist --out dist

# --- checks -------------------------------------------------------------------------------
for wheel in dist/*.whl; do
    say "auditwheel show $(basename "$wheel")"
    report=$(.build-venv/bin/auditwheel show "$wheel")
    echo "$report"
    # "... is consistent with the following platform tag: "manylinux_2_17_x86_64"."
    echo "$report" | tr -d '\n' | grep -Eq 'consistent with the following platform tag:\s*"manylinux_2_17_' ||
        die "$(basename "$wheel") is not manylinux_2_17 (manylinux2014)"
done
say "sizes"
ls -l dist | awk 'NR > 1 { printf "    %10d bytes  %s\n", $5, $9 }'

# --- the x86_64 wheel in a fresh virtualenv -----------------------------------------------
wheel=$(ls dist/*-manylinux*_x86_64*.whl)
check_venv=$(mktemp -d)
trap 'rm -rf "$check_venv"' EXIT
say "installing $(basename "$wheel") with its demo extra into a fresh virtualenv (pip only)"
"$python" -m venv "$check_venv"
"$check_venv/bin/python" -m pip install --quiet --upgrade pip
"$check_venv/bin/python" -m pip install --quiet "$(pwd)/$wheel[demo]"
repository=$(pwd)
cd "$check_venv"
location=$("$check_venv/bin/python" -c 'import fastworker._core as c; print(c.__file__)')
case "$location" in
    "$repository"/*) die "fastworker was imported from the repository ($location), not from the wheel" ;;
esac
say "$("$check_venv/bin/fastworker" --version) (native module: ${location#"$check_venv"/})"
say "running the demo from the wheel"
"$check_venv/bin/python" -m fastworker.demo "$@"
say "wheels, sdist and demo: all good"
