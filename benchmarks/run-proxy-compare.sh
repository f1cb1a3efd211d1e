#!/usr/bin/env bash
# The proxy comparison of benchmarks/README.md: the same generator (sbc-loadgen) and the same
# scripted PBX (sbc-uas) with, in between, this SBC and then Kamailio 5.6 (the anchor config
# kamailio/kamailio-dispatcher.cfg: record-routing, stateful, dispatcher), at fixed rates,
# RUNS times each; then the highest call rate the SBC holds under MAX_FAIL failures.
#
# Pinning: the proxy under test on core 1, sbc-loadgen and sbc-uas on core 0 (taskset).
# Every measurement gets a freshly started proxy (no transactions of an earlier run still
# lingering in its tables), and the runs are interleaved: round r = SBC call, SBC REGISTER,
# Kamailio call, Kamailio REGISTER, so slow drift of the (noisy, shared) machine hits both.
#
# Usage: benchmarks/run-proxy-compare.sh     (from anywhere; builds in release first)
# Environment (defaults in brackets):
#   RUNS [3]                 rounds of the fixed-rate comparison
#   DURATION [10]            seconds per fixed-rate run
#   CALL_RATE [2000]         calls/s of the call comparison
#   REG_RATE [4000]          REGISTER/s of the REGISTER comparison
#   TICK_US [1000]           sbc-loadgen --tick-us, the same for every proxy
#   TAIL_S [35]              after each fixed-rate run, keep the proxy running this long and
#                            charge the CPU it spends meanwhile (transaction clean-up: the
#                            SBC's Timer J/L/M run 32 s, Kamailio's wait timer 5 s) to the
#                            run as well: the "incl. tail" column. 0 skips it.
#   WARMUP_S [0]             >0: before each fixed-rate run, the same load for this long into
#                            the same (fresh) proxy process, then WARMUP_IDLE_S of rest so its
#                            transactions expire: the measured run then finds the proxy's
#                            tables already grown and its memory already faulted in, as in a
#                            long-running proxy (steady state instead of first minute)
#   WARMUP_IDLE_S [40]
#   PROXIES ["sbc kamailio"] which proxies the comparison runs
#   SEARCH_RATES ["2000 4000 6000 8000 10000 12000 14000 16000"]  call rates of the max-rate search,
#                            ascending; it stops at the first rate that fails ("" skips it)
#   SEARCH_DURATION [10]     seconds per search step
#   SEARCH_PROXIES ["sbc"]   proxies searched (add kamailio to search it too)
#   MAX_FAIL [0.001]         a search step passes when failed/attempted <= MAX_FAIL
#   PROXY_PORT [25060]       UDP port of the proxy on 127.0.0.1
#   UAS_PORT [25070]         UDP port of sbc-uas on 127.0.0.2 and 127.0.0.3
#   CALL_SRC [127.0.0.10]    generator's source address for calls (a trunk of the SBC config)
#   REG_SRC [127.0.0.11]     generator's source address for REGISTER (a "phone")
#   NCHILD [4]               Kamailio UDP workers (the anchor's default)
#   SKIP_BUILD [0]           1: do not build; use the binaries already in BIN_FROM
#   BIN_FROM [target/release] where sbc, sbc-loadgen and sbc-uas are copied from (e.g. the
#                            bin/ of an earlier result, to rerun with the same binaries)
#   OUT [target/bench-results/proxy-compare-<timestamp>]
# Output in OUT: one JSON (sbc-loadgen --json) + its human summary per run, the proxies'
# logs, env.txt (machine, versions, load), summary.md (the tables) and summary.json.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-3}
DURATION=${DURATION:-10}
CALL_RATE=${CALL_RATE:-2000}
REG_RATE=${REG_RATE:-4000}
TICK_US=${TICK_US:-1000}
TAIL_S=${TAIL_S:-35}
WARMUP_S=${WARMUP_S:-0}
WARMUP_IDLE_S=${WARMUP_IDLE_S:-40}
PROXIES=${PROXIES:-"sbc kamailio"}
SEARCH_RATES=${SEARCH_RATES-"2000 4000 6000 8000 10000 12000 14000 16000"}
SEARCH_DURATION=${SEARCH_DURATION:-10}
SEARCH_PROXIES=${SEARCH_PROXIES:-"sbc"}
MAX_FAIL=${MAX_FAIL:-0.001}
PROXY_PORT=${PROXY_PORT:-25060}
UAS_PORT=${UAS_PORT:-25070}
CALL_SRC=${CALL_SRC:-127.0.0.10}
REG_SRC=${REG_SRC:-127.0.0.11}
NCHILD=${NCHILD:-4}
SKIP_BUILD=${SKIP_BUILD:-0}
BIN_FROM=${BIN_FROM:-target/release}
OUT=${OUT:-target/bench-results/proxy-compare-$(date +%Y%m%d-%H%M%S)}

for tool in taskset kamailio jq python3 ss; do
  command -v "$tool" >/dev/null || { echo "missing $tool (scripts/install-deps.sh installs kamailio)"; exit 1; }
done
[ "$(nproc)" -ge 2 ] || { echo "needs 2 cores (core 0: generator + uas, core 1: proxy)"; exit 1; }

if [ "$SKIP_BUILD" != 1 ]; then
  cargo build --release -p sbc -p sbc-benchmarks
fi
mkdir -p "$OUT/bin"
OUT=$(cd "$OUT" && pwd)
# Private copies: others may rebuild target/release while this runs.
cp "$BIN_FROM/sbc" "$BIN_FROM/sbc-loadgen" "$BIN_FROM/sbc-uas" "$OUT/bin/"
BIN=$OUT/bin

# --- configs: the checked-in ones, ports substituted --------------------------------------
sed -e "s/127\.0\.0\.1:25060/127.0.0.1:$PROXY_PORT/" -e "s/:25070\"/:$UAS_PORT\"/" \
  -e "s/\"127\.0\.0\.10\"/\"$CALL_SRC\"/" -e "s/127\.0\.0\.10:5099/$CALL_SRC:5099/" \
  benchmarks/sbc-bench.toml >"$OUT/sbc-bench.toml"
"$BIN/sbc" check-config "$OUT/sbc-bench.toml"
sed "s/127\.0\.0\.1:5060/127.0.0.1:$PROXY_PORT/g" benchmarks/kamailio/kamailio-dispatcher.cfg \
  >"$OUT/kamailio-dispatcher.cfg"
sed "s/:5070 /:$UAS_PORT /" benchmarks/kamailio/dispatcher.list >"$OUT/dispatcher.list"
KAM_ARGS=(-f "$OUT/kamailio-dispatcher.cfg" -DD -E -m 2048 -M 8 -x tlsf -X tlsf
  -A "DISPATCHER_LIST=\"$OUT/dispatcher.list\"" -A "CTL_SOCKET=\"unix:$OUT/kamailio_ctl\""
  -A "NCHILD=$NCHILD" -Y "$OUT")
kamailio -c "${KAM_ARGS[@]}" >"$OUT/kamailio-check.log" 2>&1 ||
  { echo "kamailio config check failed:"; cat "$OUT/kamailio-check.log"; exit 1; }

# --- process handling: only what this script started is ever killed -----------------------
UAS_PID=""
PROXY_PID=""
cleanup() {
  set +e
  [ -n "$PROXY_PID" ] && stop_proxy
  if [ -n "$UAS_PID" ]; then
    kill "$UAS_PID" 2>/dev/null
    wait "$UAS_PID" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_bound() { [ -n "$(ss -Huln "src 127.0.0.1:$PROXY_PORT" 2>/dev/null)" ]; }

# Processes of the proxy now running: the SBC, or Kamailio's main process and its children.
proxy_pids() {
  echo "$PROXY_PID"
  pgrep -P "$PROXY_PID" || true
}

start_proxy() { # proxy log
  local proxy=$1 log=$2
  if port_bound; then
    echo "127.0.0.1:$PROXY_PORT (udp) is already in use; set PROXY_PORT"
    exit 1
  fi
  case $proxy in
    sbc)
      RUST_LOG=warn taskset -c 1 "$BIN/sbc" run --config "$OUT/sbc-bench.toml" 2>"$log" &
      PROXY_PID=$!
      for _ in $(seq 50); do port_bound && break; sleep 0.1; done
      sleep 0.5
      ;;
    kamailio)
      taskset -c 1 kamailio "${KAM_ARGS[@]}" 2>"$log" &
      PROXY_PID=$!
      # As in benchmarks/README.md: let the dispatcher probe both nodes (OPTIONS every 1 s).
      sleep 3
      ;;
  esac
  if ! kill -0 "$PROXY_PID" 2>/dev/null || ! port_bound; then
    echo "$proxy did not start:"
    cat "$log"
    exit 1
  fi
}

stop_proxy() {
  local pid=$PROXY_PID
  PROXY_PID=""
  local kids
  kids=$(pgrep -P "$pid" | tr '\n' ' ' || true)
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    # shellcheck disable=SC2086
    kill -9 "$pid" $kids 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  # Kamailio's children exit with the main process; make sure none is left on the port.
  for _ in $(seq 50); do port_bound || break; sleep 0.1; done
}

# utime + stime (clock ticks) summed over the given pids (each covers all its threads).
ticks() {
  local sum=0 p f
  for p in "$@"; do
    f=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null) || continue
    # shellcheck disable=SC2086
    set -- $f
    sum=$((sum + ${12} + ${13}))
  done
  echo "$sum"
}
CLK_TCK=$(getconf CLK_TCK)

# Datagrams the kernel dropped on one bound UDP socket (its receive buffer was full): the
# "drops" column of /proc/net/udp for IP:PORT, summed over the sockets bound there.
sock_drops() { # ip port
  local key
  key=$(echo "$1" | awk -F. -v port="$2" '{ printf "%02X%02X%02X%02X:%04X", $4, $3, $2, $1, port }')
  awk -v k="$key" '$2 == k { d += $NF } END { print d + 0 }' /proc/net/udp
}

udp_errors() { awk '/^Udp:/ { if (h) { print "InErrors=" $4, "RcvbufErrors=" $6, "SndbufErrors=" $7; exit } h = 1 }' /proc/net/snmp; }

# One generator run against the running proxy; NAME.json, NAME.txt, NAME.extra.json.
run_load() { # name scenario rate duration tail_s
  local name=$1 scenario=$2 rate=$3 duration=$4 tail_s=$5
  local src=$CALL_SRC
  [ "$scenario" = register ] && src=$REG_SRC
  local pids pid_args=() p
  pids=$(proxy_pids | tr '\n' ' ')
  for p in $pids; do pid_args+=(--pid "$p"); done
  local udp0 udp1 t0 t1 t2 load
  udp0=$(udp_errors)
  local uas_drops0
  uas_drops0=$(( $(sock_drops 127.0.0.2 "$UAS_PORT") + $(sock_drops 127.0.0.3 "$UAS_PORT") ))
  load=$(cut -d' ' -f1-3 /proc/loadavg)
  # shellcheck disable=SC2086
  t0=$(ticks $pids)
  echo "== $name: $scenario $rate/s for $duration s (load avg $load)"
  taskset -c 0 "$BIN/sbc-loadgen" --scenario "$scenario" --rate "$rate" --duration "$duration" \
    --target "127.0.0.1:$PROXY_PORT" --local "$src:0" --tick-us "$TICK_US" "${pid_args[@]}" \
    --json "$OUT/$name.json" >"$OUT/$name.txt" 2>&1 ||
    { echo "sbc-loadgen failed:"; cat "$OUT/$name.txt"; exit 1; }
  # shellcheck disable=SC2086
  t1=$(ticks $pids)
  udp1=$(udp_errors)
  local proxy_drops uas_drops
  proxy_drops=$(sock_drops 127.0.0.1 "$PROXY_PORT")
  uas_drops=$(( $(sock_drops 127.0.0.2 "$UAS_PORT") + $(sock_drops 127.0.0.3 "$UAS_PORT") - uas_drops0 ))
  t2=$t1
  if [ "$tail_s" -gt 0 ]; then
    sleep "$tail_s"
    # shellcheck disable=SC2086
    t2=$(ticks $pids)
  fi
  head -3 "$OUT/$name.txt" | tail -2
  kill -0 "$PROXY_PID" 2>/dev/null || { echo "!! the proxy died during $name"; }
  jq -n --arg load "$load" --arg udp0 "$udp0" --arg udp1 "$udp1" --argjson hz "$CLK_TCK" \
    --argjson t0 "$t0" --argjson t1 "$t1" --argjson t2 "$t2" --argjson tail "$tail_s" \
    --arg pids "$pids" --argjson pd "$proxy_drops" --argjson ud "$uas_drops" \
    '{loadavg_before: $load, udp_snmp_before: $udp0, udp_snmp_after: $udp1, proxy_pids: $pids,
      proxy_socket_drops: $pd, uas_socket_drops: $ud,
      proxy_cpu_run_s: (($t1 - $t0) / $hz), proxy_cpu_tail_s: (($t2 - $t1) / $hz),
      tail_s: $tail}' >"$OUT/$name.extra.json"
}

{
  echo "date: $(date -Is)"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git diff --quiet HEAD 2>/dev/null || echo '(with uncommitted changes)')"
  echo "binaries from: $BIN_FROM (sbc md5 $(md5sum "$BIN/sbc" | cut -c1-32))"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
  echo "kamailio: $(kamailio -v 2>/dev/null | head -1)"
  echo "rustc: $(rustc --version 2>/dev/null)"
  echo "net.core.rmem_max: $(cat /proc/sys/net/core/rmem_max)"
  echo "load avg at start: $(cat /proc/loadavg)"
  echo "RUNS=$RUNS DURATION=$DURATION CALL_RATE=$CALL_RATE REG_RATE=$REG_RATE TICK_US=$TICK_US TAIL_S=$TAIL_S WARMUP_S=$WARMUP_S WARMUP_IDLE_S=$WARMUP_IDLE_S"
  echo "PROXIES=$PROXIES SEARCH_RATES=$SEARCH_RATES SEARCH_DURATION=$SEARCH_DURATION SEARCH_PROXIES=$SEARCH_PROXIES MAX_FAIL=$MAX_FAIL NCHILD=$NCHILD"
  echo "pinning: proxy taskset -c 1; sbc-loadgen and sbc-uas taskset -c 0"
} | tee "$OUT/env.txt"

taskset -c 0 "$BIN/sbc-uas" --listen "127.0.0.2:$UAS_PORT" --listen "127.0.0.3:$UAS_PORT" \
  --duration 7200 2>"$OUT/uas.log" &
UAS_PID=$!
sleep 0.5
kill -0 "$UAS_PID" || { echo "sbc-uas did not start:"; cat "$OUT/uas.log"; exit 1; }

# --- fixed-rate comparison -----------------------------------------------------------------
for run in $(seq 1 "$RUNS"); do
  for proxy in $PROXIES; do
    for case in "call:$CALL_RATE" "register:$REG_RATE"; do
      scenario=${case%%:*}
      rate=${case##*:}
      name="cmp-$proxy-$scenario-$rate-$run"
      start_proxy "$proxy" "$OUT/$name.log"
      if [ "$WARMUP_S" -gt 0 ]; then
        run_load "warmup-$name" "$scenario" "$rate" "$WARMUP_S" 0
        sleep "$WARMUP_IDLE_S"
      fi
      run_load "$name" "$scenario" "$rate" "$DURATION" "$TAIL_S"
      stop_proxy
      sleep 1
    done
  done
done

# --- max-rate search: step up the call rate until failed/attempted > MAX_FAIL ---------------
for proxy in $SEARCH_PROXIES; do
  [ -n "$SEARCH_RATES" ] || break
  for rate in $SEARCH_RATES; do
    name="search-$proxy-call-$rate"
    start_proxy "$proxy" "$OUT/$name.log"
    run_load "$name" call "$rate" "$SEARCH_DURATION" 0
    stop_proxy
    sleep 1
    if ! jq -e --argjson m "$MAX_FAIL" '.attempted > 0 and .not_started == 0 and (.failed / .attempted) <= $m' \
      "$OUT/$name.json" >/dev/null; then
      echo "   $proxy fails at $rate calls/s: stopping the search"
      break
    fi
  done
done

kill "$UAS_PID" 2>/dev/null || true
wait "$UAS_PID" 2>/dev/null || true
UAS_PID=""

MAX_FAIL=$MAX_FAIL python3 "$ROOT/benchmarks/proxy-compare-summary.py" "$OUT" | tee "$OUT/summary.md"
echo "results in $OUT"
