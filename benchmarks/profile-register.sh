#!/usr/bin/env bash
# Instructions the SBC spends per forwarded REGISTER, counted by valgrind's callgrind (issue 2,
# benchmarks/README.md "Through a proxy"). Instruction counts do not depend on the load of the
# machine, so this is the figure to compare builds with on a noisy VM; the CPU-time comparison
# with Kamailio stays in run-proxy-compare.sh.
#
# Runs `sbc run` with benchmarks/sbc-bench.toml (ports moved to PORT_BASE..) under callgrind,
# sbc-uas behind it, sbc-loadgen --scenario register at RATE/s for DURATION s (USERS users), waits IDLE_S
# (the transactions' 32 s Timer J linger), stops the SBC and prints the inclusive cost of the
# SIP handler per REGISTER and the whole process. Loopback only; bounded in time.
#
#   benchmarks/profile-register.sh                 # RATE=100 DURATION=10 IDLE_S=40 USERS=25
#   OUT=/tmp/prof benchmarks/profile-register.sh   # keep callgrind.out for callgrind_annotate
#   SKIP_BUILD=1 BIN=/path/to/other/bin benchmarks/profile-register.sh   # another build
#
# Needs valgrind (apt-get install valgrind). Builds in release first unless SKIP_BUILD=1.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RATE=${RATE:-100}
DURATION=${DURATION:-10}
IDLE_S=${IDLE_S:-40}
# The proxy comparison sends 40,000 REGISTERs for 1,000 users (40 each: refreshes dominate);
# RATE x DURATION / USERS keeps that ratio here.
USERS=${USERS:-$((RATE * DURATION / 40))}
PORT_BASE=${PORT_BASE:-26060}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$(mktemp -d /tmp/sbc-profile-register.XXXXXX)}
mkdir -p "$OUT"
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 2; }
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release -q -p sbc -p sbc-benchmarks
fi
BIN=${BIN:-$TARGET_DIR/release}   # or the bin/ of another build, to compare
SIP_PORT=$PORT_BASE
UAS_PORT=$((PORT_BASE + 10))
sed -e "s/127.0.0.1:25060/127.0.0.1:$SIP_PORT/" -e "s/:25070/:$UAS_PORT/g" \
  benchmarks/sbc-bench.toml >"$OUT/sbc.toml"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

"$BIN/sbc-uas" --listen "127.0.0.2:$UAS_PORT" --listen "127.0.0.3:$UAS_PORT" \
  --duration $((DURATION + IDLE_S + 300)) 2>"$OUT/uas.log" &
pids+=($!)
valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.out" \
  "$BIN/sbc" run --config "$OUT/sbc.toml" >"$OUT/sbc.log" 2>&1 &
SBC_PID=$!
pids+=("$SBC_PID")
# valgrind starts slowly: wait until the SBC answers (an OPTIONS-free check: its log says so).
for _ in $(seq 120); do
  grep -q "listening" "$OUT/sbc.log" 2>/dev/null && break
  sleep 0.5
done
sleep 2
"$BIN/sbc-loadgen" --scenario register --rate "$RATE" --duration "$DURATION" --users "$USERS" \
  --target "127.0.0.1:$SIP_PORT" --local 127.0.0.11:0 --json "$OUT/loadgen.json" \
  >"$OUT/loadgen.txt" 2>&1
sleep "$IDLE_S"
kill -INT "$SBC_PID"
for _ in $(seq 100); do kill -0 "$SBC_PID" 2>/dev/null || break; sleep 0.2; done
ok=$(python3 -c "import json,sys; d=json.load(open('$OUT/loadgen.json')); print(d.get('succeeded', d.get('ok', 0)))")
echo "REGISTERs answered 2xx: $ok (loadgen summary: $OUT/loadgen.txt)"
callgrind_annotate --inclusive=yes "$OUT/callgrind.out" 2>/dev/null >"$OUT/inclusive.txt"
total=$(grep -m1 "PROGRAM TOTALS" "$OUT/inclusive.txt" | awk '{gsub(",","",$1); print $1}')
handler=$(grep -m1 "Proxy as .*Handler>::on_message" "$OUT/inclusive.txt" \
  | awk '{gsub(",","",$1); print $1}')
python3 - "$total" "${handler:-0}" "$ok" <<'EOF'
import sys
total, handler, ok = (int(x) for x in sys.argv[1:])
ok = max(ok, 1)
print(f"whole process: {total/1e6:.1f} M instructions ({total/ok:,.0f} per REGISTER)")
print(f"SIP handler:   {handler/ok:,.0f} instructions per REGISTER")
EOF
echo "profile: callgrind_annotate --inclusive=yes $OUT/callgrind.out | less"
