#!/usr/bin/env bash
# The failover drill of benchmarks/README.md ("Failover drill"): steady load of calls and
# REGISTERs through a proxy in front of a primary/standby pair of scripted PBXs (two sbc-uas
# processes), then the primary is killed mid-run. Run against this SBC and against Kamailio's
# dispatcher (the anchor config kamailio/kamailio-dispatcher.cfg) with alike probe settings:
# OPTIONS every 1 s, 2 misses to go down. Reports, per proxy: detection time, failed calls
# and registrations, the extra setup delay of the calls that arrived during the gap, how
# many calls were delayed, and the time to the first successful call on the standby.
#
# Everything is on loopback, every process is bounded (sbc-loadgen by count and deadline,
# sbc-uas by --duration), and only what this script started is ever signalled (by pid).
#
# Usage: benchmarks/failover-drill/run.sh     (from anywhere; builds in release first)
# Environment (defaults in brackets):
#   RUNS [3]               rounds; each round runs every proxy once, interleaved
#   DURATION [20]          seconds of load per run
#   CALL_RATE [50]         calls/s (INVITE/100/180/200/ACK/BYE/200, no hold)
#   REG_RATE [20]          REGISTER/s (200 users, no authentication)
#   KILL_AT [8]            seconds into the load when the primary is killed
#   FAULT [kill]           kill: SIGKILL of the primary sbc-uas (its port is closed: the
#                          kernel answers ICMP port unreachable); stop: SIGSTOP (frozen,
#                          the socket stays open and silently queues)
#   PROXIES ["sbc sbc-bt500 kamailio-retry kamailio-retry-mark kamailio"]
#                          sbc: this SBC with sbc-drill.toml (branch timeout 1 s, the
#                          default); sbc-btN: the same with branch_timeout_ms = N (e.g.
#                          sbc-bt500); kamailio: the anchor config
#                          as is (no retry); kamailio-retry: -A WITH_FAILOVER (serial retry
#                          to the standby on timeout/5xx, the anchor's "with serial retry");
#                          kamailio-retry-mark: also -A WITH_MARK (mark the node down at once)
#   PROXY_PORT [26060]     UDP port of the proxy on 127.0.0.1
#   UAS_PORT [26070]       UDP port of sbc-uas on 127.0.0.2 (primary) and 127.0.0.3 (standby)
#   NCHILD [4]             Kamailio UDP workers
#   SKIP_BUILD [0]         1: use the binaries in BIN_FROM as they are
#   BIN_FROM [target/release]
#   OUT [target/bench-results/failover-drill-<timestamp>]
# Output in OUT: per run NAME.calls.csv / NAME.regs.csv (sbc-loadgen --trace), NAME.txt
# (loadgen summaries), NAME.log (the proxy's log), NAME.kill (the kill time); env.txt,
# summary.md and summary.json (made by analyze.py OUT, which can be rerun on any OUT).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
RUNS=${RUNS:-3}
DURATION=${DURATION:-20}
CALL_RATE=${CALL_RATE:-50}
REG_RATE=${REG_RATE:-20}
KILL_AT=${KILL_AT:-8}
FAULT=${FAULT:-kill}
PROXIES=${PROXIES:-"sbc sbc-bt500 kamailio-retry kamailio-retry-mark kamailio"}
PROXY_PORT=${PROXY_PORT:-26060}
UAS_PORT=${UAS_PORT:-26070}
NCHILD=${NCHILD:-4}
SKIP_BUILD=${SKIP_BUILD:-0}
BIN_FROM=${BIN_FROM:-target/release}
OUT=${OUT:-target/bench-results/failover-drill-$(date +%Y%m%d-%H%M%S)}
CALL_SRC=127.0.0.10
REG_SRC=127.0.0.11

case $FAULT in kill | stop) ;; *) echo "FAULT must be kill or stop"; exit 1 ;; esac
for tool in taskset kamailio python3 ss; do
  command -v "$tool" >/dev/null || { echo "missing $tool (scripts/install-deps.sh installs kamailio)"; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (core 0: generator + PBXs, core 1: proxy)"; exit 1; }
[ "$KILL_AT" -lt "$DURATION" ] || { echo "KILL_AT must be below DURATION"; exit 1; }

if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release -p sbc -p sbc-benchmarks
fi
mkdir -p "$OUT/bin"
OUT=$(cd "$OUT" && pwd)
cp "$BIN_FROM/sbc" "$BIN_FROM/sbc-loadgen" "$BIN_FROM/sbc-uas" "$OUT/bin/"
BIN=$OUT/bin

# --- configs: the checked-in ones, ports substituted -----------------------------------------
sed -e "s/127\.0\.0\.1:26060/127.0.0.1:$PROXY_PORT/" -e "s/:26070\"/:$UAS_PORT\"/" \
  benchmarks/failover-drill/sbc-drill.toml >"$OUT/sbc-drill.toml"
"$BIN/sbc" check-config "$OUT/sbc-drill.toml" >/dev/null
sbc_config() { # proxy name -> config file (sbc-btN: branch_timeout_ms = N)
  local ms=${1#sbc-bt}
  if [ "$1" = sbc ]; then
    echo "$OUT/sbc-drill.toml"
    return
  fi
  [[ $ms =~ ^[0-9]+$ ]] || { echo "bad proxy name $1 (sbc-bt<ms>)" >&2; exit 1; }
  sed "s/^branch_timeout_ms = .*/branch_timeout_ms = $ms/" "$OUT/sbc-drill.toml" >"$OUT/sbc-drill-bt$ms.toml"
  "$BIN/sbc" check-config "$OUT/sbc-drill-bt$ms.toml" >/dev/null
  echo "$OUT/sbc-drill-bt$ms.toml"
}
sed "s/127\.0\.0\.1:5060/127.0.0.1:$PROXY_PORT/g" benchmarks/kamailio/kamailio-dispatcher.cfg \
  >"$OUT/kamailio-dispatcher.cfg"
sed "s/:5070 /:$UAS_PORT /" benchmarks/kamailio/dispatcher.list >"$OUT/dispatcher.list"
kam_args() { # variant
  local a=(-f "$OUT/kamailio-dispatcher.cfg" -DD -E -m 2048 -M 8 -x tlsf -X tlsf
    -A "DISPATCHER_LIST=\"$OUT/dispatcher.list\"" -A "CTL_SOCKET=\"unix:$OUT/kamailio_ctl\""
    -A "NCHILD=$NCHILD" -Y "$OUT")
  case $1 in
    kamailio-retry) a+=(-A WITH_FAILOVER) ;;
    kamailio-retry-mark) a+=(-A WITH_FAILOVER -A WITH_MARK) ;;
  esac
  printf '%s\n' "${a[@]}"
}
for v in kamailio kamailio-retry kamailio-retry-mark; do
  mapfile -t args < <(kam_args "$v")
  kamailio -c "${args[@]}" >"$OUT/kamailio-check-$v.log" 2>&1 ||
    { echo "kamailio config check ($v) failed:"; cat "$OUT/kamailio-check-$v.log"; exit 1; }
done

# --- processes: only what this script started is ever signalled --------------------------------
PROXY_PID=""
PRIMARY_PID=""
STANDBY_PID=""
stop_pid() { # pid
  local pid=$1
  [ -n "$pid" ] || return 0
  kill -CONT "$pid" 2>/dev/null || true
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
stop_proxy() {
  [ -n "$PROXY_PID" ] || return 0
  local kids
  kids=$(pgrep -P "$PROXY_PID" | tr '\n' ' ' || true)
  stop_pid "$PROXY_PID"
  # shellcheck disable=SC2086
  [ -n "$kids" ] && kill -9 $kids 2>/dev/null || true
  PROXY_PID=""
  for _ in $(seq 50); do port_bound 127.0.0.1 "$PROXY_PORT" || break; sleep 0.1; done
}
cleanup() {
  set +e
  stop_proxy
  stop_pid "$PRIMARY_PID"
  stop_pid "$STANDBY_PID"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_bound() { [ -n "$(ss -Huln "src $1:$2" 2>/dev/null)" ]; }

start_uas() { # ip log -> pid in UAS_STARTED
  taskset -c 0 "$BIN/sbc-uas" --listen "$1:$UAS_PORT" --duration $((DURATION + 60)) 2>"$2" &
  UAS_STARTED=$!
}

start_proxy() { # proxy log
  local proxy=$1 log=$2
  if port_bound 127.0.0.1 "$PROXY_PORT"; then
    echo "127.0.0.1:$PROXY_PORT (udp) is already in use; set PROXY_PORT"
    exit 1
  fi
  case $proxy in
    sbc | sbc-bt*)
      local cfg
      cfg=$(sbc_config "$proxy")
      # The SBC logs to stdout (tracing's fmt writer); WARN is every node transition and switch.
      RUST_LOG=warn NO_COLOR=1 taskset -c 1 "$BIN/sbc" run --config "$cfg" >"$log" 2>&1 &
      PROXY_PID=$!
      ;;
    kamailio*)
      mapfile -t args < <(kam_args "$proxy")
      taskset -c 1 kamailio "${args[@]}" >"$log" 2>&1 &
      PROXY_PID=$!
      ;;
    *) echo "unknown proxy $proxy"; exit 1 ;;
  esac
  for _ in $(seq 50); do port_bound 127.0.0.1 "$PROXY_PORT" && break; sleep 0.1; done
  # Both proxies probe the nodes every second: let them see both answer.
  sleep 3
  if ! kill -0 "$PROXY_PID" 2>/dev/null || ! port_bound 127.0.0.1 "$PROXY_PORT"; then
    echo "$proxy did not start:"
    cat "$log"
    exit 1
  fi
}

{
  echo "date: $(date -Is)"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git diff --quiet HEAD 2>/dev/null || echo '(with uncommitted changes)')"
  echo "binaries from: $BIN_FROM (sbc md5 $(md5sum "$BIN/sbc" | cut -c1-32))"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
  echo "kamailio: $(kamailio -v 2>/dev/null | head -1)"
  echo "load avg at start: $(cat /proc/loadavg)"
  echo "RUNS=$RUNS DURATION=$DURATION CALL_RATE=$CALL_RATE REG_RATE=$REG_RATE KILL_AT=$KILL_AT FAULT=$FAULT NCHILD=$NCHILD"
  echo "PROXIES=$PROXIES PROXY_PORT=$PROXY_PORT UAS_PORT=$UAS_PORT"
  echo "pinning: proxy taskset -c 1; sbc-loadgen and both sbc-uas taskset -c 0"
} | tee "$OUT/env.txt"

for run in $(seq 1 "$RUNS"); do
  for proxy in $PROXIES; do
    name="$proxy-$run"
    echo "== $name ($FAULT the primary at ${KILL_AT}s of ${DURATION}s; load avg $(cut -d' ' -f1-3 /proc/loadavg))"
    for port_ip in 127.0.0.2 127.0.0.3; do
      if port_bound "$port_ip" "$UAS_PORT"; then echo "$port_ip:$UAS_PORT is in use"; exit 1; fi
    done
    start_uas 127.0.0.2 "$OUT/$name.uas-primary.log"
    PRIMARY_PID=$UAS_STARTED
    start_uas 127.0.0.3 "$OUT/$name.uas-standby.log"
    STANDBY_PID=$UAS_STARTED
    sleep 0.3
    start_proxy "$proxy" "$OUT/$name.log"
    echo "$proxy" >"$OUT/$name.proxy"
    taskset -c 0 "$BIN/sbc-loadgen" --scenario call --rate "$CALL_RATE" --duration "$DURATION" \
      --target "127.0.0.1:$PROXY_PORT" --local "$CALL_SRC:0" --trace "$OUT/$name.calls.csv" \
      --json "$OUT/$name.calls.json" >"$OUT/$name.calls.txt" 2>&1 &
    CALLS_PID=$!
    taskset -c 0 "$BIN/sbc-loadgen" --scenario register --rate "$REG_RATE" --duration "$DURATION" \
      --users 200 --target "127.0.0.1:$PROXY_PORT" --local "$REG_SRC:0" \
      --trace "$OUT/$name.regs.csv" --json "$OUT/$name.regs.json" >"$OUT/$name.regs.txt" 2>&1 &
    REGS_PID=$!
    sleep "$KILL_AT"
    date +%s.%N >"$OUT/$name.kill"
    if [ "$FAULT" = kill ]; then
      kill -KILL "$PRIMARY_PID"
      wait "$PRIMARY_PID" 2>/dev/null || true
      PRIMARY_PID=""
    else
      kill -STOP "$PRIMARY_PID"
    fi
    wait "$CALLS_PID" || { echo "sbc-loadgen (calls) failed:"; cat "$OUT/$name.calls.txt"; exit 1; }
    wait "$REGS_PID" || { echo "sbc-loadgen (register) failed:"; cat "$OUT/$name.regs.txt"; exit 1; }
    kill -0 "$PROXY_PID" 2>/dev/null || echo "!! the proxy died during $name"
    stop_proxy
    stop_pid "$PRIMARY_PID"
    PRIMARY_PID=""
    stop_pid "$STANDBY_PID"
    STANDBY_PID=""
    python3 "$ROOT/benchmarks/failover-drill/analyze.py" --one "$OUT" "$name" || true
    sleep 1
  done
done

python3 "$ROOT/benchmarks/failover-drill/analyze.py" "$OUT" | tee "$OUT/summary.md"
echo "results in $OUT"
