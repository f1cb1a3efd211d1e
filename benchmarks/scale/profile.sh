#!/usr/bin/env bash
# Profiles the SBC under one load of benchmarks/scale (perf record, flat, by symbol), for the
# hot-spot list of benchmarks/README.md "Scale and soak":
#
#   LOAD=calls benchmarks/scale/profile.sh   # CALL_RATE calls/s (media anchored, no RTP)
#   LOAD=media benchmarks/scale/profile.sh   # MEDIA_CALLS calls with RTP both ways
#
# Same layout and config as run.sh (sbc-scale.toml, SBC on core 1, generators on core 0).
# Needs perf (apt-get install -y linux-perf). Writes OUT/perf-LOAD.txt (top symbols, kernel
# and user, with and without children) and OUT/perf-LOAD.data. Stops what it started.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
LOAD="${LOAD:-calls}"
CALL_RATE="${CALL_RATE:-4000}"
MEDIA_CALLS="${MEDIA_CALLS:-500}"
SECONDS_LOAD="${SECONDS_LOAD:-10}"
OUT="${OUT:-$ROOT/target/bench-results/profile-$(date -u +%Y%m%d-%H%M%S)}"
# Absolute: the generated config names files under it, read by processes started elsewhere.
OUT="$(realpath -m "$OUT")"
BIN="${BIN_FROM:-${CARGO_TARGET_DIR:-$ROOT/target}/release}"
SIP=127.0.0.31:26060
ADMIN=http://127.0.0.31:29091

command -v perf > /dev/null || { echo "perf missing: apt-get install -y linux-perf" >&2; exit 1; }
mkdir -p "$OUT/pki"
"$BIN/sbc-phones" pki --ip 127.0.0.31 --out "$OUT/pki"
sed -e "s#@CERT@#$OUT/pki/cert.pem#" -e "s#@KEY@#$OUT/pki/key.pem#" "$HERE/sbc-scale.toml" > "$OUT/sbc-scale.toml"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

: > "$OUT/uas-media.log"
taskset -c 0 "$BIN/sbc-uas" --listen 127.0.0.33:26070 --listen 127.0.0.34:26070 --duration 600 \
  --media-log "$OUT/uas-media.log" --media-b-ip 127.0.0.36 --media-peer-base 40000 > "$OUT/uas.log" 2>&1 &
PIDS+=($!)
RUST_LOG=warn taskset -c 1 "$BIN/sbc" run --config "$OUT/sbc-scale.toml" > "$OUT/sbc.log" 2>&1 &
SBC_PID=$!
PIDS+=($SBC_PID)
for _ in $(seq 50); do curl -sf "$ADMIN/status" > /dev/null 2>&1 && break; sleep 0.2; done
sleep 3

case "$LOAD" in
  calls)
    taskset -c 0 "$BIN/sbc-loadgen" --scenario call --rate "$CALL_RATE" --duration "$SECONDS_LOAD" \
      --target "$SIP" --local 127.0.0.37:0 --pid "$SBC_PID" --json "$OUT/load.json" > "$OUT/load.log" 2>&1 &
    GEN=$!
    sleep 1
    ;;
  media)
    taskset -c 0 "$BIN/media-bench" sip-calls --calls "$MEDIA_CALLS" --target "$SIP" --local 127.0.0.35:0 \
      --a-ip 127.0.0.35 --b-ip 127.0.0.36 --peer-base 40000 --uas-log "$OUT/uas-media.log" \
      --pid "$SBC_PID" --rate 200 --seconds "$SECONDS_LOAD" --warmup 2 --settle 0 \
      --json "$OUT/load.json" > "$OUT/load.log" 2>&1 &
    GEN=$!
    sleep $(( MEDIA_CALLS / 200 + 4 ))
    ;;
  *) echo "LOAD must be calls or media" >&2; exit 2 ;;
esac
PIDS+=($GEN)
perf record -F 999 -g -p "$SBC_PID" -o "$OUT/perf-$LOAD.data" -- sleep $(( SECONDS_LOAD - 3 )) 2> "$OUT/perf-record.log"
wait "$GEN" || true
set +o pipefail   # head closes the pipe early
{
  echo "# perf, LOAD=$LOAD, $(date -u)"
  echo "## self time by symbol"
  perf report -i "$OUT/perf-$LOAD.data" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^$' | grep '%' | head -45
  echo "## self time by shared object"
  perf report -i "$OUT/perf-$LOAD.data" --no-children --sort dso --stdio 2>/dev/null | grep '%' | head -10
} > "$OUT/perf-$LOAD.txt"
cat "$OUT/perf-$LOAD.txt"
