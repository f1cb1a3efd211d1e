#!/usr/bin/env bash
# System calls, context switches and CPU per relayed packet, epoll vs io_uring backend, at
# STREAMS streams x 50 pps (perf stat on the relay process for 4 s inside a 9 s gen run).
# Needs perf (linux-perf) and root for chrt; loopback only, bounded (60 s per relay).
#   benchmarks/media-syscalls.sh      # STREAMS=1000, B=<media-bench binary>
set -euo pipefail
cd "$(dirname "$0")/.."
T=$(mktemp -d /tmp/sbc-media-syscalls.XXXXXX)
B=${B:-${CARGO_TARGET_DIR:-target}/release/media-bench}
STREAMS=${STREAMS:-1000}
calls=$((STREAMS / 2))
for io in epoll uring; do
  for r in 1; do
  rm -f $T/sc-$io.json
  chrt -f 10 taskset -c 1 $B relay-host --calls $calls --peer-base 30000 --io $io \
    --map-out $T/sc-$io.json --max-seconds 60 2>$T/sc-$io.log &
  pid=$!
  for _ in $(seq 100); do [ -s $T/sc-$io.json ] && break; sleep 0.1; done
  chrt -f 10 taskset -c 0 $B gen --map $T/sc-$io.json --pps 50 --seconds 6 --warmup 2 \
    --relay-core 1 --peer-base 30000 --label sc-$io >$T/sc-$io-$STREAMS-$r.txt 2>&1 &
  gpid=$!
  sleep 3
  perf stat -x, -e raw_syscalls:sys_enter,context-switches,task-clock -p $pid -- sleep 4 \
    2>$T/sc-$io-$STREAMS-$r.perf
  wait $gpid
  kill $pid; wait $pid 2>/dev/null || true
  echo "== $io $STREAMS streams run $r"; cat $T/sc-$io-$STREAMS-$r.perf; tail -1 $T/sc-$io-$STREAMS-$r.txt
  sleep 1
  done
done
