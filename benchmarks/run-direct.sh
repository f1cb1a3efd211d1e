#!/usr/bin/env bash
# Reproduces the "generator ceiling" runs of benchmarks/README.md: sbc-loadgen straight at
# sbc-uas, no proxy in between, each pinned to its own core. Every case runs RUNS times; the
# table printed at the end holds the median of each column over those runs.
#
# Usage: benchmarks/run-direct.sh            (from anywhere; builds in release first)
# Environment:
#   RUNS=3                 runs per case
#   DURATION=10            seconds per run
#   UAS_ADDR=127.0.0.1:5070  where sbc-uas listens (loopback only)
#   OUT=target/bench-results/direct-<timestamp>   where the JSON files go
#   CASES="call:500 call:2000 call:2500 register:4000"   scenario:rate list
set -euo pipefail

cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
UAS_ADDR=${UAS_ADDR:-127.0.0.1:5070}
OUT=${OUT:-target/bench-results/direct-$(date +%Y%m%d-%H%M%S)}
CASES=${CASES:-"call:500 call:2000 call:2500 register:4000"}

cargo build -p sbc-benchmarks --release
BIN=target/release
mkdir -p "$OUT"

taskset -c 1 "$BIN/sbc-uas" --listen "$UAS_ADDR" --duration 3600 2>"$OUT/uas.log" &
UAS_PID=$!
# Stop only the UAS this script started, however the script ends.
trap 'kill "$UAS_PID" 2>/dev/null || true; wait "$UAS_PID" 2>/dev/null || true' EXIT
sleep 0.5
kill -0 "$UAS_PID" || { echo "sbc-uas did not start:"; cat "$OUT/uas.log"; exit 1; }

# One "key":value per line in the JSON, so plain awk can read it.
field() { grep -m1 "^  \"$2\":" "$1" | sed 's/^[^:]*://; s/,$//'; }
median() { sort -g | awk '{v[NR]=$1} END {if (NR == 0) print "-"; else print v[int((NR + 1) / 2)]}'; }

for case in $CASES; do
  scenario=${case%%:*}
  rate=${case##*:}
  for run in $(seq 1 "$RUNS"); do
    json="$OUT/$scenario-$rate-$run.json"
    echo "== $scenario $rate/s run $run"
    taskset -c 0 "$BIN/sbc-loadgen" --scenario "$scenario" --rate "$rate" --duration "$DURATION" \
      --target "$UAS_ADDR" --pid "$UAS_PID" --json "$json" | tee "$OUT/$scenario-$rate-$run.txt"
    sleep 1
  done
done

{
  echo "| scenario | rate/s | attempted | failed | p50 ms | p99 ms | max ms | loadgen us/op | uas us/op | sched. lag max ms |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for case in $CASES; do
    scenario=${case%%:*}
    rate=${case##*:}
    row="| $scenario | $rate"
    for k in attempted failed latency_p50_ms latency_p99_ms latency_max_ms loadgen_cpu_us_per_op cpu_us_per_op send_lag_max_ms; do
      v=$(for f in "$OUT/$scenario-$rate-"*.json; do field "$f" "$k"; done | median)
      row="$row | $v"
    done
    echo "$row |"
  done
} | tee "$OUT/summary.md"
echo "results in $OUT"
