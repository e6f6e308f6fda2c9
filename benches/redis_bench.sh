#!/usr/bin/env bash
# Throughput and p99 latency of the proxy: one replica on the embedded store, one replica
# on Redis, two replicas on Redis — against the offline mock upstream, with wrk, at 64
# connections (two replicas: 32 each, run at the same time, req/s summed).
#
#   benches/redis_bench.sh [seconds per run, default 10] [rounds, default 3]
#
# The three setups run one after the other, `rounds` times (interleaved, so a burst of
# load from elsewhere on the machine does not favour one setup); the table shows medians.
#
# Needs redis-server and wrk (Debian: apt-get install redis-server wrk). Everything runs on
# 127.0.0.1 and stops at the end. The numbers include the mock upstream and wrk sharing the
# machine's cores with the proxy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SECS="${1:-10}"
ROUNDS="${2:-3}"
CONNS=64
for tool in redis-server wrk; do
    command -v "$tool" >/dev/null || { echo "benches/redis_bench.sh: $tool is not installed (apt-get install $tool)" >&2; exit 2; }
done

echo "==> cargo build --release (budget-proxy, mock-gemini)" >&2
# Two builds: with an example the binary would get the dev-dependencies' tokio features.
cargo build --release --quiet --bin budget-proxy
cargo build --release --quiet --example mock-gemini
TARGET="${CARGO_TARGET_DIR:-target}/release"
. benches/lib.sh
WORK="$(mktemp -d)"
cleanup_at_exit "$WORK"

MOCK_PORT="$(free_port)"
"$TARGET/examples/mock-gemini" --port "$MOCK_PORT" >/dev/null 2>&1 &
pids+=($!)
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync everysec \
    --dir "$WORK" --loglevel warning >/dev/null 2>&1 &
pids+=($!)
wait_port "$MOCK_PORT"
wait_port "$REDIS_PORT"

cat >"$WORK/budgets.json" <<'JSON'
{"default": {"max_tokens": 1000000000000, "period": "monthly", "action_on_limit": "warn"},
 "agents": {"bench": {"max_tokens": 1000000000000, "period": "monthly", "action_on_limit": "block"}}}
JSON
cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"contents":[{"parts":[{"text":"Hello there"}]}],"generationConfig":{"maxOutputTokens":20}}'
LUA
PATH_URL="/agents/bench/v1beta/models/gemini-2.5-flash:generateContent"

# start_proxy NAME [extra flags…] → prints the proxy port
start_proxy() {
    local name="$1"; shift
    local port admin
    port="$(free_port)"; admin="$(free_port)"
    BUDGET_PROXY_LOG=warn "$TARGET/budget-proxy" serve --config "$WORK/budgets.json" \
        --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "http://127.0.0.1:$MOCK_PORT" --state-dir "$WORK/state-$name" \
        --watch-config false "$@" >"$WORK/$name.log" 2>&1 &
    pids+=($!)
    echo "$!" >"$WORK/$name.pid"
    wait_port "$port"
    echo "$port"
}
stop_proxy() { local pid; pid="$(cat "$WORK/$1.pid")"; kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }

# wrk_run PORT CONNS → "req_per_sec p99_ms"
wrk_run() {
    wrk -t2 -c"$2" -d"${SECS}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$1$PATH_URL" >"$WORK/wrk-$1.txt"
    python3 - "$WORK/wrk-$1.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", t)
v, unit = float(m.group(1)), m.group(2)
p99 = v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", t)
if non2xx:
    print("warning: %s non-2xx responses" % non2xx.group(1), file=sys.stderr)
print("%.0f %.2f" % (rps, p99))
PY
}

warm() { wrk -t1 -c8 -d1s -s "$WORK/post.lua" "http://127.0.0.1:$1$PATH_URL" >/dev/null; }

# median FORMAT VALUES…
median() { python3 -c 'import sys, statistics; print(sys.argv[1] % statistics.median(float(x) for x in sys.argv[2:]))' "$@"; }
EMB_R=(); EMB_L=(); R1_R=(); R1_L=(); R2_R=(); R2_L=()
for round in $(seq 1 "$ROUNDS"); do
    echo "==> round $round/$ROUNDS: 1 replica, embedded store" >&2
    P="$(start_proxy "embedded$round")"; warm "$P"
    read -r rps p99 < <(wrk_run "$P" "$CONNS"); stop_proxy "embedded$round"
    EMB_R+=("$rps"); EMB_L+=("$p99")

    echo "==> round $round/$ROUNDS: 1 replica, Redis" >&2
    P="$(start_proxy "redis1-$round" --redis-url "redis://127.0.0.1:$REDIS_PORT/")"; warm "$P"
    read -r rps p99 < <(wrk_run "$P" "$CONNS"); stop_proxy "redis1-$round"
    R1_R+=("$rps"); R1_L+=("$p99")

    echo "==> round $round/$ROUNDS: 2 replicas, Redis (32 connections each, at once)" >&2
    PA="$(start_proxy "redisA$round" --redis-url "redis://127.0.0.1:$REDIS_PORT/")"
    PB="$(start_proxy "redisB$round" --redis-url "redis://127.0.0.1:$REDIS_PORT/")"
    warm "$PA"; warm "$PB"
    wrk_run "$PA" $((CONNS / 2)) >"$WORK/a.out" &
    WA=$!
    wrk_run "$PB" $((CONNS / 2)) >"$WORK/b.out" &
    WB=$!
    wait "$WA" "$WB"
    read -r A_RPS A_P99 <"$WORK/a.out"
    read -r B_RPS B_P99 <"$WORK/b.out"
    stop_proxy "redisA$round"; stop_proxy "redisB$round"
    R2_R+=("$((A_RPS + B_RPS))"); R2_L+=("$(python3 -c "print(max($A_P99, $B_P99))")")
done
EMB_RPS="$(median %.0f "${EMB_R[@]}")"; EMB_P99="$(median %.2f "${EMB_L[@]}")"
R1_RPS="$(median %.0f "${R1_R[@]}")"; R1_P99="$(median %.2f "${R1_L[@]}")"
R2_RPS="$(median %.0f "${R2_R[@]}")"; R2_P99="$(median %.2f "${R2_L[@]}")"
echo "runs (req/s): embedded ${EMB_R[*]} | redis ${R1_R[*]} | 2x redis ${R2_R[*]}" >&2

ratio() { python3 -c "print('%.2f' % ($1 / $EMB_RPS))"; }
printf '\n%-34s %10s %10s %14s\n' "setup (${CONNS} conns, ${SECS}s, median of ${ROUNDS})" "req/s" "p99 ms" "vs embedded"
printf '%-34s %10s %10s %14s\n' "1 replica, embedded store" "$EMB_RPS" "$EMB_P99" "1.00"
printf '%-34s %10s %10s %14s\n' "1 replica, Redis" "$R1_RPS" "$R1_P99" "$(ratio "$R1_RPS")"
printf '%-34s %10s %10s %14s\n' "2 replicas, Redis (sum)" "$R2_RPS" "$R2_P99" "$(ratio "$R2_RPS")"
echo
echo "(all processes share this machine's $(nproc) cores: proxy, mock upstream, redis-server, wrk)"
