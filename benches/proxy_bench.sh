#!/usr/bin/env bash
# One command: the budget-proxy benchmark against nginx and direct access (see README.md).
#
#   benches/proxy_bench.sh            # 10 s per run (about 5 minutes in all)
#   benches/proxy_bench.sh --quick    # 3 s per run, for development
#   benches/proxy_bench.sh --rounds 3 # every run three times, medians and spread
#   benches/proxy_bench.sh --baseline-bin PATH  # another build in the same run (before/after)
#   benches/proxy_bench.sh --pgo      # the PGO build (scripts/build-pgo.sh, ~11 more minutes),
#                                     # with the plain release build as the baseline
#
# Builds the release binaries, installs nginx and wrk from Debian when missing, then runs
# benches/proxy_bench.py. Loopback only; every run is bounded; everything it started is
# stopped on exit (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."

. benches/lib.sh
install_missing nginx:nginx wrk:wrk
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

pgo=false
args=()
for a in "$@"; do
    if [ "$a" = "--pgo" ]; then pgo=true; else args+=("$a"); fi
done

echo "building (release)" >&2
# Two builds: one with an example would build the binary with the dev-dependencies' features
# (tokio "process"), which the shipped binary does not have.
cargo build --release --quiet --bin budget-proxy
cargo build --release --quiet --example mock-gemini
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
PROXY_BIN=$TARGET_DIR/release/budget-proxy
labels=()
if $pgo; then
    scripts/build-pgo.sh
    PROXY_BIN=$(pwd)/target/pgo/budget-proxy
    labels=(--proxy-label "PGO build (scripts/build-pgo.sh)")
    case " ${args[*]-} " in
        *" --baseline-bin "* | *" --baseline-bin="*) ;;
        *) labels+=(--baseline-bin "$TARGET_DIR/release/budget-proxy" --baseline-label "cargo build --release") ;;
    esac
fi

# 10,000 idle connections need file descriptors in this shell's children.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

py_pid=""
cleanup() {
    if [ -n "$py_pid" ] && kill -0 "$py_pid" 2>/dev/null; then
        kill -TERM "$py_pid" 2>/dev/null || true
        wait "$py_pid" 2>/dev/null || true
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

python3 benches/proxy_bench.py \
    --proxy-bin "$PROXY_BIN" ${labels[@]+"${labels[@]}"} \
    --mock-bin "$TARGET_DIR/release/examples/mock-gemini" \
    --nginx "$NGINX" ${args[@]+"${args[@]}"} &
py_pid=$!
wait "$py_pid"
