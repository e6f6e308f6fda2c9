#!/usr/bin/env bash
# The production build: budget-proxy compiled with profile-guided optimisation (PGO).
#
#   scripts/build-pgo.sh        # writes target/pgo/budget-proxy (11 minutes on 2 cores after a release build)
#
# Why: a proxied request runs ~25–30k instructions spread over tokio, hyper, our server and
# the usage scanner, each executed about once per request, so the code a request touches does
# not stay in the CPU's instruction cache between requests (callgrind's cache simulation at
# 256 connections: ~900 first-level instruction-cache misses per request, nginx ~160). With a
# profile of real traffic, LLVM lays the hot paths out together, moves cold blocks away and
# inlines where calls are hot: ~350 misses and ~17 % fewer instructions per request
# (benches/README.md, "Tenth round").
#
# Steps: build an instrumented binary (target/pgo-gen), run it against the mock upstream
# under a mix of the calls agents make (generateContent, streamGenerateContent with and
# without alt=sse, countTokens; 1, 64 and 256 connections), against an HTTPS upstream
# (HTTP/2, as Google is reached), with TLS on the agents' port, and with Redis when
# `redis-server` is installed, so none of those paths is treated as cold; merge the profile
# with the llvm-profdata of rustc's own LLVM version (Debian package `llvm-N`, installed when
# missing); build with it (target/pgo-use) and copy the binary to target/pgo/budget-proxy.
# Only the binary is built this way: `cargo build --release` and the tests are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

. benches/lib.sh

llvm_major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
if [ -z "$llvm_major" ]; then
    echo "build-pgo: cannot tell rustc's LLVM version from 'rustc -vV'" >&2
    exit 1
fi
PROFDATA=/usr/lib/llvm-$llvm_major/bin/llvm-profdata
if [ ! -x "$PROFDATA" ]; then
    # A profile must be merged by the LLVM that rustc was built with: another major version
    # may not read its raw format.
    install_missing "$PROFDATA:llvm-$llvm_major" || {
        echo "build-pgo: rustc uses LLVM $llvm_major; install llvm-profdata of that version (Debian: llvm-$llvm_major)" >&2
        exit 1
    }
fi
install_missing wrk:wrk

TMP=$(mktemp -d)
cleanup_at_exit "$TMP"
PROFILES=$TMP/profiles
mkdir -p "$PROFILES" target/pgo

echo "build-pgo: building the instrumented binary (target/pgo-gen)" >&2
# A fixed path (LLVM_PROFILE_FILE below says where profiles go): a new one per run would
# change RUSTFLAGS and rebuild every crate.
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$ROOT/target/pgo-gen/profiles" CARGO_TARGET_DIR=target/pgo-gen \
    cargo build --release --quiet --bin budget-proxy
cargo build --release --quiet --example mock-gemini
GEN=$ROOT/target/pgo-gen/release/budget-proxy
MOCK=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/mock-gemini

# The shipped agents with budgets training cannot exhaust (admission runs every request).
python3 - "$TMP" <<'PY'
import json, sys
cfg = json.load(open("config/budgets.json"))
cfg["default"]["max_tokens"] = 10**15
for a in cfg["agents"].values():
    a["max_tokens"] = 10**15
json.dump(cfg, open(sys.argv[1] + "/budgets.json", "w"))
print(",".join(cfg["agents"]), file=open(sys.argv[1] + "/agents", "w"))
PY
AGENTS=$(cat "$TMP/agents")
BODY='{"contents":[{"role":"user","parts":[{"text":"Say hello in five words."}]}],"generationConfig":{"maxOutputTokens":64}}'
"$GEN" gen-cert --out-dir "$TMP/certs" --host 127.0.0.1 --host localhost >/dev/null

mock_port=$(free_port)
"$MOCK" --port "$mock_port" >/dev/null &
pids+=($!)
tls_mock_port=$(free_port)
"$MOCK" --port "$tls_mock_port" --tls-cert "$TMP/certs/cert.pem" --tls-key "$TMP/certs/key.pem" >/dev/null &
pids+=($!)
wait_port "$mock_port"
wait_port "$tls_mock_port"

# train NAME SCHEME CONNECTIONS… -- PROXY ARGS…: run the instrumented proxy with the args,
# drive it with the mix for 4 s per connection count, then stop it with SIGTERM (the
# profile is written when the process exits).
train() {
    local name=$1 scheme=$2 conns=()
    shift 2
    while [ "$1" != "--" ]; do conns+=("$1"); shift; done
    shift
    local port admin
    port=$(free_port)
    admin=$(free_port)
    echo "build-pgo: training: $name" >&2
    LLVM_PROFILE_FILE="$PROFILES/bp-%m.profraw" BUDGET_PROXY_LOG=error BUDGET_PROXY_ADMIN_TOKEN=pgo \
        "$GEN" serve --config "$TMP/budgets.json" --listen "127.0.0.1:$port" \
        --admin-listen "127.0.0.1:$admin" --state-dir "$TMP/state-$name" --watch-config false "$@" &
    local pid=$!
    pids+=("$pid")
    wait_port "$port"
    local out
    for c in "${conns[@]}"; do
        out=$(wrk -t1 -c"$c" -d4s -s benches/wrk_report.lua "$scheme://127.0.0.1:$port" -- mix "$AGENTS" "$BODY")
        # A profile of refusals would train the wrong path.
        if grep -q -E "Non-2xx|Socket errors" <<<"$out"; then
            echo "build-pgo: training ($name, $c connections) got errors:" >&2
            echo "$out" >&2
            exit 1
        fi
    done
    for route in api/budget/status api/budget/usage metrics readyz; do
        curl -s -o /dev/null -H "Authorization: Bearer pgo" "http://127.0.0.1:$admin/$route" || true
    done
    kill -TERM "$pid"
    wait "$pid" || { echo "build-pgo: the instrumented proxy ($name) did not exit cleanly" >&2; exit 1; }
}

train plain http 1 64 256 -- --upstream "http://127.0.0.1:$mock_port"
train https-upstream http 64 -- --upstream "https://127.0.0.1:$tls_mock_port" --upstream-ca "$TMP/certs/cert.pem"
train tls-agents https 64 -- --upstream "http://127.0.0.1:$mock_port" \
    --tls-cert "$TMP/certs/cert.pem" --tls-key "$TMP/certs/key.pem"
if command -v redis-server >/dev/null 2>&1; then
    redis_port=$(free_port)
    redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
    pids+=($!)
    wait_port "$redis_port"
    train redis http 64 -- --upstream "http://127.0.0.1:$mock_port" --redis-url "redis://127.0.0.1:$redis_port/"
else
    echo "build-pgo: redis-server not installed; the Redis store's code is not trained" >&2
fi

# The profile's name carries its hash: a new profile changes RUSTFLAGS, so cargo rebuilds
# every crate with it (with a fixed name it would keep crates built with an older one).
"$PROFDATA" merge -o "$TMP/merged.profdata" "$PROFILES"/*.profraw
sum=$(sha256sum "$TMP/merged.profdata" | cut -c1-16)
rm -f target/pgo/*.profdata
PROFILE=$ROOT/target/pgo/budget-proxy-$sum.profdata
cp "$TMP/merged.profdata" "$PROFILE"

echo "build-pgo: building with the profile (target/pgo-use)" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE -Cllvm-args=-pgo-warn-missing-function=false" \
    CARGO_TARGET_DIR=target/pgo-use cargo build --release --quiet --bin budget-proxy
cp target/pgo-use/release/budget-proxy target/pgo/budget-proxy
echo "build-pgo: target/pgo/budget-proxy" >&2
