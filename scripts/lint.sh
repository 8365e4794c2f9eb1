#!/usr/bin/env bash
# The lint checks, each by name:
#   ruff-check     ruff check python tests benches          (rules: pyproject.toml)
#   ruff-format    ruff format --check python tests benches
#   cargo-fmt      cargo fmt --check                        (every crate of the workspace)
#   cargo-clippy   cargo clippy --workspace --all-targets -- -D warnings
#                                                           (lints: Cargo.toml's [workspace.lints])
# With no argument, all of them, as scripts/test.sh (so CI) runs them; with names, those
# (each pre-commit hook in .pre-commit-config.yaml runs one). Every check named runs, then
# the script exits non-zero naming those that failed. ruff comes from .venv
# (requirements/test.txt; scripts/test.sh installs it); rustfmt and clippy are added with
# rustup when the toolchain lacks them.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

CHECKS=(ruff-check ruff-format cargo-fmt cargo-clippy)

ruff_command() {
    if [ -x .venv/bin/ruff ]; then
        echo .venv/bin/ruff
    elif command -v ruff >/dev/null 2>&1; then
        command -v ruff
    else
        die "ruff not found: bash scripts/test.sh installs it into .venv (requirements/test.txt)"
    fi
}

# ensure_cargo_component NAME SUBCOMMAND: `cargo SUBCOMMAND` works, adding the rustup
# component NAME (rustfmt, clippy) if it does not.
ensure_cargo_component() {
    local component=$1 subcommand=$2
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    cargo "$subcommand" --version >/dev/null 2>&1 && return 0
    command -v rustup >/dev/null 2>&1 ||
        die "cargo $subcommand not found and no rustup to add the $component component"
    say "adding the Rust component $component (rustup)"
    rustup component add "$component" || die "rustup could not add $component"
}

run_check() {
    local ruff
    case $1 in
        ruff-check) ruff=$(ruff_command) && "$ruff" check python tests benches ;;
        ruff-format) ruff=$(ruff_command) && "$ruff" format --check python tests benches ;;
        cargo-fmt) ensure_cargo_component rustfmt fmt && cargo fmt --check ;;
        # --workspace: the PyO3 binding too (not a default member). Same profile and target
        # directory as `cargo test`, so a second run only checks what changed.
        cargo-clippy)
            ensure_cargo_component clippy clippy &&
                cargo clippy --workspace --all-targets -- -D warnings
            ;;
        *) die "unknown check '$1' (of ${CHECKS[*]})" ;;
    esac
}

checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=("${CHECKS[@]}")
failed=()
for check in "${checks[@]}"; do
    say "lint: $check"
    run_check "$check" || failed+=("$check")
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "lint FAILED: ${failed[*]}" >&2
    exit 1
fi
say "lint passed: ${checks[*]}"
