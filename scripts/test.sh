#!/usr/bin/env bash
# The one test command: sets up the Python virtualenv that the real-client test
# (tests/python_sdk.rs, the official google-genai SDK) runs in, then runs every
# Rust test target.
#
#   scripts/test.sh [extra cargo test args…]     e.g. scripts/test.sh -- --nocapture
#
# Environment:
#   PYTHON                      interpreter used to create .venv (default: python3)
#   BUDGET_PROXY_TEST_PYTHON    use this interpreter (with google-genai installed)
#                               instead of setting up .venv
#
# Quick when .venv is already set up: it is rebuilt only when it is missing, broken,
# or tests/python/requirements.txt changed since it was installed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
VENV="$REPO/.venv"
REQUIREMENTS="$REPO/tests/python/requirements.txt"
STAMP="$VENV/.requirements.sha256"

say() { printf '==> %s\n' "$*"; }

export PIP_DISABLE_PIP_VERSION_CHECK=1

venv_ready() {
    [[ -x "$VENV/bin/python" ]] \
        && [[ -f "$STAMP" ]] \
        && [[ "$(cat "$STAMP")" == "$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)" ]] \
        && "$VENV/bin/python" -c 'import google.genai' >/dev/null 2>&1
}

if [[ -n "${BUDGET_PROXY_TEST_PYTHON:-}" ]]; then
    say "using BUDGET_PROXY_TEST_PYTHON=$BUDGET_PROXY_TEST_PYTHON for the google-genai SDK test"
elif venv_ready; then
    say "python venv ready: $VENV ($("$VENV/bin/python" -c 'from google import genai; print("google-genai", genai.__version__)'))"
else
    if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
        say "updating python venv $VENV"
    else
        say "creating python venv $VENV with ${PYTHON:-python3} ($("${PYTHON:-python3}" --version 2>&1))"
        "${PYTHON:-python3}" -m venv --clear "$VENV"
    fi
    say "pip install -r tests/python/requirements.txt"
    "$VENV/bin/python" -m pip install --quiet -r "$REQUIREMENTS"
    "$VENV/bin/python" -c 'import google.genai'
    sha256sum "$REQUIREMENTS" | cut -d' ' -f1 >"$STAMP"
    say "python venv ready: $("$VENV/bin/python" -c 'from google import genai; print("google-genai", genai.__version__)')"
fi
export BUDGET_PROXY_TEST_PYTHON="${BUDGET_PROXY_TEST_PYTHON:-$VENV/bin/python}"

say "cargo test --all-targets --no-fail-fast $*"
cargo test --all-targets --no-fail-fast "$@"
