#!/usr/bin/env bash
# New calls while media flows: MEDIA_CALLS calls with RTP both ways through the SBC (media-bench
# sip-calls, 50 packets/s per direction), and meanwhile CALL_RATE calls/s for CALL_S seconds
# (sbc-loadgen --scenario call, media anchored, no RTP of their own): call setup latency,
# failures, SBC CPU per call, RTP loss. Compares builds: each of BIN_DIRS in turn, ROUNDS
# times, a fresh SBC per run. Loopback only, bounded in time (every process has a duration).
#
#   benchmarks/scale/calls-under-media.sh OLD_BIN_DIR NEW_BIN_DIR
#   MEDIA_CALLS=500 CALL_RATE=1000 CALL_S=10 ROUNDS=2 benchmarks/scale/calls-under-media.sh A B
#
# A BIN_DIR holds sbc, sbc-uas, sbc-loadgen, sbc-phones and media-bench. Same layout and config
# as run.sh (sbc-scale.toml; SBC on core 1, generators on core 0). Output: one line per run,
# and OUT/<label>-<round>/{load.json,media.json,*.log}.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 BIN_DIR [BIN_DIR ...]" >&2; exit 2; }
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
MEDIA_CALLS="${MEDIA_CALLS:-500}"
CALL_RATE="${CALL_RATE:-1000}"
CALL_S="${CALL_S:-10}"
ROUNDS="${ROUNDS:-2}"
OUT="$(realpath -m "${OUT:-$ROOT/target/bench-results/calls-under-media-$(date -u +%Y%m%d-%H%M%S)}")"
SIP=127.0.0.31:26060
ADMIN=http://127.0.0.31:29091
# Media runs through setup (200 calls/s), 3 s of warm-up, the call load and 3 s after it.
MEDIA_S=$((CALL_S + 6))

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  PIDS=()
}
trap cleanup EXIT INT TERM

one() { # bin_dir label round
  local BIN=$1 dir="$OUT/$2-$3"
  mkdir -p "$dir/pki"
  "$BIN/sbc-phones" pki --ip 127.0.0.31 --out "$dir/pki" > /dev/null
  sed -e "s#@CERT@#$dir/pki/cert.pem#" -e "s#@KEY@#$dir/pki/key.pem#" "$HERE/sbc-scale.toml" > "$dir/sbc.toml"
  : > "$dir/uas-media.log"
  taskset -c 0 "$BIN/sbc-uas" --listen 127.0.0.33:26070 --listen 127.0.0.34:26070 \
    --duration $((MEDIA_S + 60)) --media-log "$dir/uas-media.log" --media-b-ip 127.0.0.36 \
    --media-peer-base 40000 > "$dir/uas.log" 2>&1 &
  PIDS+=($!)
  RUST_LOG=warn taskset -c 1 "$BIN/sbc" run --config "$dir/sbc.toml" > "$dir/sbc.log" 2>&1 &
  local sbc=$!
  PIDS+=($sbc)
  for _ in $(seq 50); do curl -sf "$ADMIN/status" > /dev/null 2>&1 && break; sleep 0.2; done
  sleep 2
  taskset -c 0 "$BIN/media-bench" sip-calls --calls "$MEDIA_CALLS" --target "$SIP" \
    --local 127.0.0.35:0 --a-ip 127.0.0.35 --b-ip 127.0.0.36 --peer-base 40000 \
    --uas-log "$dir/uas-media.log" --pid "$sbc" --rate 200 --seconds "$MEDIA_S" --warmup 0 \
    --settle 0 --json "$dir/media.json" > "$dir/media.log" 2>&1 &
  local media=$!
  PIDS+=($media)
  sleep $((MEDIA_CALLS / 200 + 4))
  taskset -c 0 "$BIN/sbc-loadgen" --scenario call --rate "$CALL_RATE" --duration "$CALL_S" \
    --target "$SIP" --local 127.0.0.37:0 --pid "$sbc" --json "$dir/load.json" > "$dir/load.log" 2>&1
  wait "$media" || true
  python3 - "$dir" "$2" "$3" <<'PY'
import json, sys
d, label, rnd = sys.argv[1:4]
l = json.load(open(f"{d}/load.json"))
try:  # media-bench sip-calls writes one report per media window; this script runs one
    w = json.load(open(f"{d}/media.json"))["windows"][0]
    media = f"rtp sent {w['sent']} lost {w['lost']} relay p99 {w['lat_p99_us']} us"
except (OSError, ValueError, KeyError, IndexError) as e:
    media = f"no media report ({e!r}): see media.log"
print(f"{label} round {rnd}: calls {l['succeeded']}/{l['attempted']} failed {l['failed']} "
      f"setup p50 {l['latency_p50_ms']:.3f} p99 {l['latency_p99_ms']:.3f} ms, "
      f"SBC {l['cpu_us_per_op']:.1f} us/call incl. media; {media}")
PY
  cleanup
  sleep 2
}

mkdir -p "$OUT"
echo "MEDIA_CALLS=$MEDIA_CALLS CALL_RATE=$CALL_RATE CALL_S=$CALL_S ROUNDS=$ROUNDS; load $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$OUT/env.txt"
for r in $(seq "$ROUNDS"); do
  i=0
  for b in "$@"; do
    i=$((i + 1))
    one "$b" "bin$i" "$r" | tee -a "$OUT/summary.txt"
  done
done
