#!/usr/bin/env bash
# Two builds of the SBC side by side under the same load: CPU per operation, minor page
# faults per operation, RSS and live transactions at the end of the load (benchmarks/README.md,
# "What the profiles say to fix"). Alternates A and B, ROUNDS times, a fresh SBC per run, the
# SBC on core 1 and sbc-loadgen + sbc-uas on core 0, everything on loopback, bounded in time.
#
#   benchmarks/ab-proxy.sh OLD_BIN_DIR NEW_BIN_DIR              # 4,000 REGISTER/s, 2 rounds
#   SCEN=call RATE=2000 benchmarks/ab-proxy.sh OLD_BIN_DIR NEW_BIN_DIR
#   TAIL_S=35 benchmarks/ab-proxy.sh OLD_BIN_DIR NEW_BIN_DIR    # also CPU incl. the clean-up
#   MEDIA=1 SCEN=call RATE=4000 benchmarks/ab-proxy.sh A B      # calls with media anchored
#                    (relay on 127.0.0.31 / .32, ports 30000-39999; offer, answer and delete
#                    per call, no RTP)
#
# A BIN_DIR holds sbc, sbc-uas and sbc-loadgen (e.g. target/release, or the bin/ of a
# benchmark result). Config: benchmarks/sbc-bench.toml with ports moved to PORT_BASE.. and an
# admin listener (for /status).
set -euo pipefail

[ $# -eq 2 ] || { echo "usage: $0 A_BIN_DIR B_BIN_DIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
SCEN=${SCEN:-register}
RATE=${RATE:-4000}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
TAIL_S=${TAIL_S:-0}
PORT_BASE=${PORT_BASE:-27060}
SIP_PORT=$PORT_BASE
UAS_PORT=$((PORT_BASE + 10))
ADMIN_PORT=$((PORT_BASE + 30))
CFG=$(mktemp /tmp/sbc-ab.XXXXXX.toml)
sed -e "s/127.0.0.1:25060/127.0.0.1:$SIP_PORT/" -e "s/:25070/:$UAS_PORT/g" \
  benchmarks/sbc-bench.toml >"$CFG"
printf '\n[admin]\nlisten = "127.0.0.1:%s"\n' "$ADMIN_PORT" >>"$CFG"
if [ "${MEDIA:-0}" = 1 ]; then
  python3 - "$CFG" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
media = """[media]
enabled = true
port_min = 30000
port_max = 39999

  [media.public]
  address = "127.0.0.31"

  [media.internal]
  address = "127.0.0.32"
"""
s, n = re.subn(r"\[media\]\nenabled = false\n", media, s)
assert n == 1, "no [media] enabled = false in the config"
open(p, "w").write(s)
PY
fi
SRC=127.0.0.11
[ "$SCEN" = call ] && SRC=127.0.0.10

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -f "$CFG"; }
trap cleanup EXIT

one() {
  local bin=$1 label=$2 lg sbc uas f0 f1 rss tx ok cpu c0 c1 tail=""
  lg=$(mktemp)
  taskset -c 0 "$bin/sbc-uas" --listen "127.0.0.2:$UAS_PORT" --listen "127.0.0.3:$UAS_PORT" \
    --duration $((DURATION + 30 + TAIL_S)) 2>/dev/null &
  uas=$!
  taskset -c 1 "$bin/sbc" run --config "$CFG" >/dev/null 2>&1 &
  sbc=$!
  pids=("$uas" "$sbc")
  sleep 1
  f0=$(awk '{print $10}' "/proc/$sbc/stat")
  c0=$(awk '{print $14 + $15}' "/proc/$sbc/stat")
  taskset -c 0 "$bin/sbc-loadgen" --scenario "$SCEN" --rate "$RATE" --duration "$DURATION" \
    --target "127.0.0.1:$SIP_PORT" --local "$SRC:0" --pid "$sbc" >"$lg" 2>&1
  f1=$(awk '{print $10}' "/proc/$sbc/stat")
  rss=$(awk '/VmRSS/{print $2}' "/proc/$sbc/status")
  tx=$(curl -s "http://127.0.0.1:$ADMIN_PORT/status" |
    python3 -c "import json,sys; print(json.load(sys.stdin).get('transactions'))" 2>/dev/null || echo -)
  ok=$(grep -o "succeeded [0-9]*" "$lg" | awk '{print $2}')
  cpu=$(grep -o "cpu [0-9.]* s, [0-9.]* us/op" "$lg" | tail -1)
  if [ "$TAIL_S" -gt 0 ]; then
    # CPU from before the load to TAIL_S after it: the operations' clean-up included
    # (clock ticks of 10 ms).
    sleep "$TAIL_S"
    c1=$(awk '{print $14 + $15}' "/proc/$sbc/stat")
    tail=" incl_tail_us/op=$(python3 -c "print(round(($c1-$c0)*1e6/$(getconf CLK_TCK)/max($ok,1),1))")"
  fi
  echo "$label $SCEN media=${MEDIA:-0} rate=$RATE ok=$ok $cpu minflt/op=$(python3 -c "print(round(($f1-$f0)/max($ok,1),3))") rss_kib=$rss transactions=$tx$tail load=$(cut -d' ' -f1 /proc/loadavg)"
  kill "$sbc" "$uas" 2>/dev/null || true
  wait "$sbc" "$uas" 2>/dev/null || true
  rm -f "$lg"
  sleep 2
}

for _ in $(seq "$ROUNDS"); do
  one "$1" A
  one "$2" B
done
