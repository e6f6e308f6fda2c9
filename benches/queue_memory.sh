#!/usr/bin/env bash
# Memory cost of parked requests (issue: queue action). Prints the proxy's extra RSS with
# N requests parked (default 10,000) and PASS/FAIL against 64 MiB per 10,000.
#   benches/queue_memory.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# Two builds: with an example the binary would get the dev-dependencies' tokio features.
cargo build --release --bin budget-proxy
cargo build --release --example queue-memory
exec target/release/examples/queue-memory "${1:-10000}"
