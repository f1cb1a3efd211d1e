#!/usr/bin/env bash
# The media relay comparison of benchmarks/README.md ("Media relay vs rtpengine"): the same
# RTP generator (media-bench gen) against, in turn, no relay at all (direct: the latency
# baseline), our relay (sbc-media-relay hosted by `media-bench relay-host`) and rtpengine
# (Debian's rtpengine-daemon, userspace forwarding: --table=-1, driven over ng by
# `media-bench ng-setup`), at STREAMS concurrent streams of PPS packets/s each.
#
# A stream is one direction of one call (one SSRC); a call carries two (A to B, B to A) on one
# m= line, so STREAMS=1000 is 500 calls and 50,000 packets/s into the relay.
#
# Pinning: the relay under test on core 1, the generator (and the ng setup) on core 0. Each
# measured run gets a freshly started relay; the runs are interleaved (round r: for each
# stream count: direct, sbc, rtpengine) so that slow drift of the shared machine hits all.
# Before each run the script waits (up to LOAD_WAIT s) for the 1-minute load average to fall
# under MAX_LOAD, and records it either way. Relay and generator run SCHED_FIFO (chrt -f
# RT_PRIO; all threads inherit it): on this shared 2-core VM other tenants' compilers would
# otherwise decide when the relay gets to run, and both latency and CPU per packet (which
# falls when packets queue up behind other work) would measure them rather than the relay.
#
# Installs nothing. Needs: taskset, python3, and rtpengine (apt-get install rtpengine-daemon).
#
# Usage: benchmarks/run-media-compare.sh     (from anywhere; builds in release first)
# Environment (defaults in brackets):
#   RUNS [3]                 rounds
#   DURATION [10]            measured seconds per run
#   WARMUP [2]               seconds of the same load before the measured window
#   STREAMS ["100 1000"]     stream counts (even; calls = streams / 2)
#   PPS [50]                 packets/s per stream (20 ms PCMU)
#   TICK_US [1000]           generator pacing tick
#   RELAYS ["direct sbc rtpengine"]  (add sbc-base to also run BASE_BIN's relay-host). A
#                            name ending in "+tick" (direct+tick, sbc+tick, rtpengine+tick,
#                            sbc-base+tick) runs the same relay with `gen --rx-on-tick`: the
#                            generator reads arrivals once per tick instead of sleeping on its
#                            sockets, so a relay's sends do not pay for waking it (loopback
#                            delivers in the sender's context; a far end on another host costs
#                            the relay no wake-up). Both kinds may share a set.
#   BASE_BIN []              a media-bench binary of another build (e.g. before a relay
#                            change), run as relay "sbc-base" in the same rounds
#   SBC_WORKERS [1]          forwarding threads of our relay (it has one core)
#   SBC_IO []                relay-host --io for relay "sbc" (epoll, uring); empty: the
#                            relay's default. BASE_BIN's "sbc-base" always gets its default,
#                            so BASE_BIN may be this same binary to compare the two backends
#   RTPE_THREADS [1]         rtpengine --num-threads (it has one core)
#   NG_PORT [22222]          rtpengine --listen-ng port on 127.0.0.1
#   RTPE_PORTS [40000-49999] rtpengine --port-min/--port-max
#   PEER_BASE [30000]        endpoints: A on 127.0.0.2, B on 127.0.0.3, port PEER_BASE+2c
#   RT_PRIO [10]             SCHED_FIFO priority of relay and generator; 0: normal scheduling
#   HOG [0]                  1: overload. A busy loop (bounded by the run's length) shares the
#                            relay's core, and the relay runs at normal priority beside it
#                            (the generator keeps RT_PRIO): the relay gets about half a core,
#                            as one does on a busy host. For what a relay does when it falls
#                            behind: losses, latency, CPU per packet.
#   MAX_LOAD [2.5]           wait for the 1-min load average to fall below this ...
#   LOAD_WAIT [60]           ... for at most this many seconds per run
#   SKIP_BUILD [0]           1: do not build; use the binary in BIN_FROM
#   BIN_FROM [${CARGO_TARGET_DIR:-target}/release]
#   OUT [target/bench-results/media-compare-<timestamp>]
# Output in OUT: per run NAME.json (media-bench gen --json) and NAME.txt, the relays' logs
# and maps, env.txt, summary.md and summary.json (media-compare-summary.py OUT remakes them).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
STREAMS=${STREAMS:-"100 1000"}
PPS=${PPS:-50}
TICK_US=${TICK_US:-1000}
RELAYS=${RELAYS:-"direct sbc rtpengine"}
SBC_WORKERS=${SBC_WORKERS:-1}
SBC_IO=${SBC_IO:-}
RTPE_THREADS=${RTPE_THREADS:-1}
NG_PORT=${NG_PORT:-22222}
RTPE_PORTS=${RTPE_PORTS:-40000-49999}
PEER_BASE=${PEER_BASE:-30000}
RT_PRIO=${RT_PRIO:-10}
MAX_LOAD=${MAX_LOAD:-2.5}
LOAD_WAIT=${LOAD_WAIT:-60}
HOG=${HOG:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
BASE_BIN=${BASE_BIN:-}
BIN_FROM=${BIN_FROM:-${CARGO_TARGET_DIR:-target}/release}
OUT=${OUT:-target/bench-results/media-compare-$(date +%Y%m%d-%H%M%S)}

missing=""
for tool in taskset chrt python3 ss; do
  command -v "$tool" >/dev/null || missing="$missing $tool"
done
case " $RELAYS " in
  *" rtpengine "*) command -v rtpengine >/dev/null || missing="$missing rtpengine(apt-get install rtpengine-daemon)" ;;
esac
[ -z "$missing" ] || { echo "missing:$missing"; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (core 0: generator, core 1: relay)"; exit 1; }

if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release -p sbc-benchmarks
fi
mkdir -p "$OUT/bin"
OUT=$(cd "$OUT" && pwd)
# A private copy: others may rebuild the target directory while this runs.
cp "$BIN_FROM/media-bench" "$OUT/bin/"
MB=$OUT/bin/media-bench
case " $RELAYS " in
  *" sbc-base "*)
    [ -x "$BASE_BIN" ] || { echo "RELAYS has sbc-base: set BASE_BIN to a media-bench binary"; exit 1; }
    cp "$BASE_BIN" "$OUT/bin/media-bench-base"
    ;;
esac

# --- process handling: only what this script started is ever killed -----------------------
RELAY_PID=""
HOG_PID=
start_hog() {
  [ "$HOG" = 1 ] || return 0
  timeout $((DURATION + WARMUP + 15)) taskset -c 1 sh -c 'while :; do :; done' &
  HOG_PID=$!
}
stop_hog() {
  if [ -n "$HOG_PID" ]; then
    kill "$HOG_PID" 2>/dev/null || true
    wait "$HOG_PID" 2>/dev/null || true
  fi
  HOG_PID=""
}
stop_relay() {
  stop_hog
  local pid=$RELAY_PID
  RELAY_PID=""
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  set +e
  stop_relay
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_for_file() { # file seconds
  local i
  for i in $(seq $(($2 * 10))); do
    [ -s "$1" ] && return 0
    kill -0 "$RELAY_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

wait_for_quiet() {
  local waited=0 l1
  while :; do
    l1=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$l1" -v m="$MAX_LOAD" 'BEGIN { exit !(l < m) }'; then return 0; fi
    if [ "$waited" -ge "$LOAD_WAIT" ]; then
      echo "   (load average $l1 still >= $MAX_LOAD after ${LOAD_WAIT}s: running anyway)"
      return 0
    fi
    sleep 5
    waited=$((waited + 5))
  done
}

ng_port_bound() { [ -n "$(ss -Huln "src 127.0.0.1:$NG_PORT" 2>/dev/null)" ]; }

RT=()
[ "$RT_PRIO" -gt 0 ] && RT=(chrt -f "$RT_PRIO")
# The relay's priority: with HOG=1 normal, so that the busy loop beside it gets its share.
RRT=("${RT[@]}")
[ "$HOG" = 1 ] && RRT=()
gen_args=(--pps "$PPS" --seconds "$DURATION" --warmup "$WARMUP" --tick-us "$TICK_US" --relay-core 1
  --peer-base "$PEER_BASE")

one_run() { # relay streams run
  local relay=$1 streams=$2 run=$3
  local calls=$((streams / 2))
  local name="$relay-$streams-$run"
  local map="$OUT/$name.map.json"
  local gen_args=("${gen_args[@]}")
  case $relay in
    *+tick) relay=${relay%+tick}; gen_args+=(--rx-on-tick) ;;
  esac
  wait_for_quiet
  echo "== $name: $streams streams ($calls calls) x $PPS pps, ${DURATION}s (load avg $(cut -d' ' -f1-3 /proc/loadavg))"
  case $relay in
    direct)
      "${RT[@]}" taskset -c 0 "$MB" gen --direct --calls "$calls" "${gen_args[@]}" --label "$name" \
        --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || { cat "$OUT/$name.txt"; exit 1; }
      ;;
    sbc | sbc-base)
      local host=$MB
      local io_args=()
      [ -n "$SBC_IO" ] && io_args=(--io "$SBC_IO")
      [ "$relay" = sbc-base ] && { host=$OUT/bin/media-bench-base; io_args=(); }
      "${RRT[@]}" taskset -c 1 "$host" relay-host --calls "$calls" --peer-base "$PEER_BASE" \
        --workers "$SBC_WORKERS" "${io_args[@]}" --map-out "$map" --max-seconds $((DURATION + WARMUP + 120)) \
        2>"$OUT/$name.log" &
      RELAY_PID=$!
      wait_for_file "$map" 30 || { echo "relay-host did not set up:"; cat "$OUT/$name.log"; exit 1; }
      start_hog
      "${RT[@]}" taskset -c 0 "$MB" gen --map "$map" "${gen_args[@]}" --label "$name" \
        --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 || { cat "$OUT/$name.txt"; exit 1; }
      stop_relay
      ;;
    rtpengine)
      if ng_port_bound; then echo "127.0.0.1:$NG_PORT is in use; set NG_PORT"; exit 1; fi
      "${RRT[@]}" taskset -c 1 rtpengine --config-file=none --foreground --log-stderr --log-level=5 \
        --interface=127.0.0.1 --listen-ng="127.0.0.1:$NG_PORT" \
        --port-min="${RTPE_PORTS%-*}" --port-max="${RTPE_PORTS#*-}" --table=-1 \
        --num-threads="$RTPE_THREADS" --delete-delay=0 2>"$OUT/$name.log" &
      RELAY_PID=$!
      sleep 0.5
      taskset -c 0 "$MB" ng-setup --calls "$calls" --peer-base "$PEER_BASE" \
        --ng "127.0.0.1:$NG_PORT" --pid "$RELAY_PID" --map-out "$map" >>"$OUT/$name.txt" 2>&1 ||
        { echo "ng-setup failed:"; cat "$OUT/$name.txt" "$OUT/$name.log"; exit 1; }
      start_hog
      "${RT[@]}" taskset -c 0 "$MB" gen --map "$map" "${gen_args[@]}" --label "$name" \
        --json "$OUT/$name.json" >>"$OUT/$name.txt" 2>&1 || { cat "$OUT/$name.txt"; exit 1; }
      stop_relay
      ;;
    *) echo "unknown relay $relay"; exit 1 ;;
  esac
  tail -1 "$OUT/$name.txt" | sed 's/^/   /'
  sleep 1
}

{
  echo "date: $(date -Is)"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git diff --quiet HEAD -- media-relay benchmarks 2>/dev/null || echo '(media-relay/benchmarks with uncommitted changes)')"
  echo "media-bench md5: $(md5sum "$MB" | cut -c1-32)"
  [ -n "$BASE_BIN" ] && echo "sbc-base: $BASE_BIN md5 $(md5sum "$BASE_BIN" | cut -c1-32)"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
  echo "rtpengine: $(rtpengine --version 2>&1 | head -1)"
  echo "rustc: $(rustc --version 2>/dev/null)"
  echo "load avg at start: $(cat /proc/loadavg)"
  echo "RUNS=$RUNS DURATION=$DURATION WARMUP=$WARMUP STREAMS=$STREAMS PPS=$PPS TICK_US=$TICK_US"
  echo "RELAYS=$RELAYS SBC_WORKERS=$SBC_WORKERS SBC_IO=$SBC_IO RTPE_THREADS=$RTPE_THREADS RT_PRIO=$RT_PRIO HOG=$HOG MAX_LOAD=$MAX_LOAD LOAD_WAIT=$LOAD_WAIT"
  echo "pinning: relay taskset -c 1; generator and ng setup taskset -c 0; SCHED_FIFO ${RT_PRIO} (0: off)"
} | tee "$OUT/env.txt"

for run in $(seq 1 "$RUNS"); do
  for streams in $STREAMS; do
    for relay in $RELAYS; do
      one_run "$relay" "$streams" "$run"
    done
  done
done

echo "load avg at end: $(cat /proc/loadavg)" | tee -a "$OUT/env.txt"
python3 "$ROOT/benchmarks/media-compare-summary.py" "$OUT" | tee "$OUT/summary.md"
echo "results in $OUT"
