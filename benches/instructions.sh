#!/usr/bin/env bash
# Instructions per proxied request, counted by valgrind's callgrind: repeatable for the same
# binary and load whatever else the machine is doing (unlike seconds), so two builds can be
# compared exactly. See benches/README.md.
#
#   benches/instructions.sh                       # this checkout's release build, 1 connection
#   benches/instructions.sh --proxy-bin PATH      # another build
#   benches/instructions.sh --conns 64 --secs 10 --top 40
#   benches/instructions.sh --conns 256 --cache-sim   # also cache misses per request
#   benches/instructions.sh --conns 256 --atomics     # also atomic read-modify-writes
#
# Starts the mock upstream and budget-proxy (embedded store, the shipped agents with budgets
# that cannot run out) under callgrind, warms up for 3 s, zeroes the counters, drives
# generateContent with wrk, dumps, and prints instructions per request and the functions
# that cost the most. With --cache-sim, callgrind also simulates the caches (of this
# machine's sizes) and prints first-level instruction and data cache misses per request: a
# request's code runs about once, so how much of it has to be fetched again is what its
# layout costs (the PGO build's gain, see benches/README.md "Tenth round"). With --atomics,
# it counts the lock-prefixed instructions (atomic read-modify-writes: each one a full
# barrier, and a cache line taken from the other core when that core wrote it last) that a
# request executes, and where they are ("Eleventh round"). Installs
# valgrind and wrk from Debian when missing. Loopback only; everything it started is
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

proxy_bin="" conns=1 secs=10 top=25 cache_sim=no atomics=no
while [ $# -gt 0 ]; do
    case "$1" in
        --proxy-bin) proxy_bin="$2"; shift 2 ;;
        --conns) conns="$2"; shift 2 ;;
        --secs) secs="$2"; shift 2 ;;
        --top) top="$2"; shift 2 ;;
        --cache-sim) cache_sim=yes; shift ;;
        --atomics) atomics=yes; shift ;;
        *) echo "unknown argument: $1 (see the top of $0)" >&2; exit 2 ;;
    esac
done

. benches/lib.sh
install_missing valgrind:valgrind wrk:wrk
[ "$atomics" = no ] || install_missing objdump:binutils addr2line:binutils

echo "building (release)" >&2
cargo build --release --quiet --example mock-gemini
[ -n "$proxy_bin" ] || cargo build --release --quiet --bin budget-proxy
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
proxy_bin=${proxy_bin:-$TARGET_DIR/release/budget-proxy}

tmp=$(mktemp -d)
cleanup_at_exit "$tmp"

agents=$(python3 - "$tmp" <<'PY'
import json, sys
cfg = json.load(open("config/budgets.json"))
cfg["default"]["max_tokens"] = 10**15
for a in cfg["agents"].values():
    a["max_tokens"] = 10**15
json.dump(cfg, open(sys.argv[1] + "/budgets.json", "w"))
print(",".join(cfg["agents"]))
PY
)

mock_port=$(free_port) proxy_port=$(free_port) admin_port=$(free_port)
"$TARGET_DIR/release/examples/mock-gemini" --port "$mock_port" >/dev/null &
pids+=($!)
BUDGET_PROXY_LOG=error valgrind --tool=callgrind --cache-sim="$cache_sim" --dump-instr="$atomics" \
    --callgrind-out-file="$tmp/callgrind.out" \
    "$proxy_bin" serve --config "$tmp/budgets.json" \
    --listen "127.0.0.1:$proxy_port" --admin-listen "127.0.0.1:$admin_port" \
    --upstream "http://127.0.0.1:$mock_port" --state-dir "$tmp/state" --watch-config false \
    2>"$tmp/valgrind.log" &
proxy_pid=$!
pids+=("$proxy_pid")
wait_port "$mock_port"
wait_port "$proxy_port"

body='{"contents":[{"role":"user","parts":[{"text":"Say hello in five words."}]}]}'
drive() {
    wrk -t1 -c"$conns" -d"$1"s -s benches/wrk_report.lua "http://127.0.0.1:$proxy_port" \
        -- prefixed "$agents" "$body" | sed -n 's/^WRK_JSON //p'
}
drive 3 >/dev/null
callgrind_control -z "$proxy_pid" >/dev/null 2>&1
result=$(drive "$secs")
callgrind_control -d "$proxy_pid" >/dev/null 2>&1
requests=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$result")
dump=$(ls "$tmp"/callgrind.out.* | head -1)
total=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$dump")

echo "binary: $proxy_bin"
echo "connections: $conns, $secs s under callgrind, $requests requests"
python3 -c 'import sys; t,r=int(sys.argv[1]),int(sys.argv[2]); print(f"instructions per request: {t/r:,.0f} (whole process: runtime, store writer and all)")' "$total" "$requests"
if [ "$cache_sim" = yes ]; then
    python3 - "$dump" "$requests" <<'PY'
import sys
events = summary = None
for line in open(sys.argv[1]):
    if line.startswith("events:"):
        events = line.split()[1:]
    elif line.startswith("summary:"):
        summary = [int(x) for x in line.split()[1:]]
n = int(sys.argv[2])
got = dict(zip(events, summary))
print(f"first-level cache misses per request: instructions {got['I1mr'] / n:,.0f}, "
      f"data reads {got['D1mr'] / n:,.0f}, data writes {got['D1mw'] / n:,.0f} (simulated)")
PY
fi
if [ "$atomics" = yes ]; then
    # Addresses of the binary's lock-prefixed instructions (and xchg with memory, locked
    # implicitly), matched with callgrind's per-instruction counts.
    objdump -d --no-show-raw-insn "$proxy_bin" \
        | sed -n 's/^ *\([0-9a-f]*\):\s*\(lock \|xchg .*(\).*/\1/p' >"$tmp/locked"
    python3 - "$dump" "$requests" "$proxy_bin" "$tmp/locked" <<'PY'
import collections, os, re, subprocess, sys
dump, n, binary, locked = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lock_at = {int(a, 16) for a in open(locked) if a.strip()}
names, objs = {}, {}
def name(table, s):
    m = re.match(r"\((\d+)\)(?: (.*))?", s)
    if not m:
        return s
    if m.group(2) is not None:
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1), s)
runs = collections.Counter()
addr, skip, obj = 0, False, ""
for line in open(dump):
    line = line.rstrip("\n")
    if line.startswith("ob="):
        obj = name(objs, line[3:])
    elif line.startswith("cob="):
        name(objs, line[4:])
    elif line.startswith(("fn=", "cfn=")):
        name(names, line.split("=", 1)[1])
    elif line.startswith("calls="):
        skip = True
    elif line and (line[0].isdigit() or line[0] in "+-*"):
        p = line.split()
        a = p[0]
        if a.startswith("0x"):
            addr = int(a, 16)
        elif a[0] in "+-":
            addr += int(a, 16)
        elif a != "*":
            addr = int(a, 16)
        if skip:
            skip = False
        elif len(p) > 2 and os.path.basename(obj) == os.path.basename(binary) and addr in lock_at:
            runs[addr] += int(p[2])
print(f"atomic read-modify-writes per request (lock-prefixed, in the binary): {sum(runs.values()) / n:.1f}")
top = [(c, a) for a, c in runs.most_common() if c / n >= 0.5]
if top:
    out = subprocess.run(["addr2line", "-a", "-i", "-e", binary] + [hex(a) for _, a in top],
                         capture_output=True, text=True).stdout
    where = {}
    for block in re.split(r"\n(?=0x[0-9a-f]+\n)", out.strip()):
        lines = block.split("\n")
        frames = [os.path.basename(l.split(" ")[0]) for l in lines[1:]]
        where[int(lines[0], 16)] = " < ".join(frames[:6])
    for c, a in top:
        print(f"{c / n:6.2f}  {where.get(a, hex(a))}")
PY
fi
echo
echo "most instructions, own cost (per request):"
callgrind_annotate --show=Ir --sort=Ir --threshold=100 "$dump" 2>/dev/null \
    | sed -n '/file:function/,$p' | tail -n +3 \
    | grep -v -e 'clone.S:clone' -e 'pthread_create.c' -e 'thread_start' -e 'call_once{{vtable.shim}}' \
    | head -n "$top" \
    | python3 -c '
import re, sys
n = int(sys.argv[1])
for line in sys.stdin:
    m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)", line)
    if not m:
        continue
    name = re.sub(r"/root/\.cargo/registry/src/[^/]+/|/rustc/[0-9a-f]+/library/|\s*\[[^]]*\]$", "", m.group(2))
    count = int(m.group(1).replace(",", ""))
    print(f"{count / n:8,.0f}  {name[:150]}")
' "$requests"
