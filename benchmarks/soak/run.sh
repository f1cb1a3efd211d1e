#!/usr/bin/env bash
# One-hour soak of the SBC at a steady mix (issue 8; benchmarks/README.md "Scale and soak"):
#
#   - PHONES_UDP + PHONES_TLS phones (sbc-phones: each its own UDP socket or TLS connection)
#     registered for the whole run, refreshing every PHONE_EXPIRES/2 s, unregistering at the end;
#     a TLS phone whose connection the SBC closes (its re-registration wave after a failover
#     does that on purpose) reconnects and registers again, as real phones do;
#   - REGISTER refreshes: REG_USERS phones (users u0..), REG_RATE REGISTER/s, Expires REG_EXPIRES
#     (every phone refreshes well before it expires), from REG_SOCKETS UDP sockets;
#   - CALL_RATE calls/s (INVITE/200/ACK, CALL_HOLD_MS, BYE), signalling only;
#   - MEDIA_CALLS calls kept up for the whole run with RTP both ways at 50 packets/s each way;
#   - one manual failover (POST /pools/pbx/failover) at half time and the failback
#     (POST /pools/pbx/failback) FAILBACK_AFTER seconds later;
#
# and every SAMPLE_S seconds one CSV line: the SBC's RSS, fds, threads, CPU, the admin
# /status table sizes and the /metrics gauges. After the load it waits SETTLE_S (longer than
# the registrations' Expires and the 32 s transaction linger) and checks: RSS at the end of
# the load within 10% of RSS after warm-up, every table back to its expected size (0), no fd
# growth against the fds before the load. analyze.py writes summary.md and soak.png.
#
#   benchmarks/soak/run.sh                                  # the hour (DURATION=3600)
#   DURATION=300 benchmarks/soak/run.sh                     # the 5-minute check of the script
#   nohup benchmarks/soak/run.sh > benchmarks/soak/results/soak.log 2>&1 &
#
# Everything on loopback addresses of its own (127.0.0.21-28, see sbc-soak.toml), bounded in
# time; it stops what it started (by pid) when it ends, also on failure or Ctrl-C.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
DURATION="${DURATION:-3600}"
WARMUP_S="${WARMUP_S:-$(( DURATION >= 1800 ? 300 : DURATION / 5 ))}"
SAMPLE_S="${SAMPLE_S:-10}"
SETTLE_S="${SETTLE_S:-180}"
REG_USERS="${REG_USERS:-5000}"
REG_RATE="${REG_RATE:-50}"
REG_EXPIRES="${REG_EXPIRES:-150}"
REG_SOCKETS="${REG_SOCKETS:-16}"
PHONES_UDP="${PHONES_UDP:-2000}"
PHONES_TLS="${PHONES_TLS:-500}"
PHONE_EXPIRES="${PHONE_EXPIRES:-120}"
CALL_RATE="${CALL_RATE:-30}"
CALL_HOLD_MS="${CALL_HOLD_MS:-2000}"
MEDIA_CALLS="${MEDIA_CALLS:-500}"
MEDIA_WINDOW_S="${MEDIA_WINDOW_S:-60}"
FAILOVER_AT="${FAILOVER_AT:-$(( DURATION / 2 ))}"
FAILBACK_AFTER="${FAILBACK_AFTER:-$(( DURATION >= 1800 ? 300 : DURATION / 10 ))}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
OUT="${OUT:-$HERE/results/soak-$DURATION-$STAMP}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
SBC_BIN="${SBC_BIN:-}"
BENCH_BIN_DIR="${BENCH_BIN_DIR:-}"

SIP=127.0.0.21:25060
ADMIN=http://127.0.0.21:29090

(( DURATION >= 60 && DURATION <= 7200 )) || { echo "DURATION must be 60..7200" >&2; exit 2; }
mkdir -p "$OUT/bin"

if [[ -z "$SBC_BIN" || -z "$BENCH_BIN_DIR" ]]; then
  if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
    (cd "$ROOT" && cargo build --release -p sbc -p sbc-benchmarks)
  fi
  SBC_BIN="$TARGET_DIR/release/sbc"
  BENCH_BIN_DIR="$TARGET_DIR/release"
fi
# Own copies: a rebuild during the hour must not change what runs.
cp "$SBC_BIN" "$OUT/bin/sbc"
for b in sbc-uas sbc-loadgen media-bench sbc-phones; do cp "$BENCH_BIN_DIR/$b" "$OUT/bin/$b"; done
BIN="$OUT/bin"
"$BIN/sbc-phones" pki --ip 127.0.0.21 --out "$OUT/pki"
sed -e "s#@CERT@#$OUT/pki/cert.pem#" -e "s#@KEY@#$OUT/pki/key.pem#" "$HERE/sbc-soak.toml" > "$OUT/sbc-soak.toml"

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

log() { echo "$(date +%s) $(date -u +%H:%M:%S) soak: $*" | tee -a "$OUT/events.log"; }

{
  echo "date: $(date -u)"; echo "host: $(uname -a)"; echo "nproc: $(nproc)"
  echo "loadavg: $(cat /proc/loadavg)"; echo "ulimit -n: $(ulimit -n)"
  echo "DURATION=$DURATION WARMUP_S=$WARMUP_S SAMPLE_S=$SAMPLE_S SETTLE_S=$SETTLE_S"
  echo "REG_USERS=$REG_USERS REG_RATE=$REG_RATE REG_EXPIRES=$REG_EXPIRES REG_SOCKETS=$REG_SOCKETS"
  echo "PHONES_UDP=$PHONES_UDP PHONES_TLS=$PHONES_TLS PHONE_EXPIRES=$PHONE_EXPIRES"
  echo "CALL_RATE=$CALL_RATE CALL_HOLD_MS=$CALL_HOLD_MS MEDIA_CALLS=$MEDIA_CALLS"
  echo "FAILOVER_AT=$FAILOVER_AT FAILBACK_AFTER=$FAILBACK_AFTER"
  echo "sbc md5: $(md5sum < "$BIN/sbc")"
  (cd "$ROOT" && git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -40) || true
} > "$OUT/env.txt"

TOTAL=$(( DURATION + SETTLE_S + 120 ))
: > "$OUT/uas-media.log"
"$BIN/sbc-uas" --listen 127.0.0.23:25070 --listen 127.0.0.24:25070 --duration "$TOTAL" \
  --expires "$REG_EXPIRES" --media-log "$OUT/uas-media.log" --media-b-ip 127.0.0.26 \
  --media-peer-base 40000 > "$OUT/uas.log" 2>&1 &
PIDS+=($!)
RUST_LOG=warn "$BIN/sbc" run --config "$OUT/sbc-soak.toml" > "$OUT/sbc.log" 2>&1 &
SBC_PID=$!
PIDS+=($SBC_PID)
for _ in $(seq 50); do
  curl -sf "$ADMIN/status" > /dev/null 2>&1 && break
  sleep 0.2
done
curl -sf "$ADMIN/status" > /dev/null || { echo "SBC admin API did not come up" >&2; cat "$OUT/sbc.log" >&2; exit 1; }
sleep 3   # first probes: both nodes Up
log "SBC pid $SBC_PID up; baseline $(ls /proc/$SBC_PID/fd | wc -l) fds, $(awk '/VmRSS/{print $2}' /proc/$SBC_PID/status) KiB"

python3 "$HERE/sample.py" --pid "$SBC_PID" --admin "$ADMIN" --every "$SAMPLE_S" \
  --seconds "$TOTAL" --csv "$OUT/samples.csv" --events "$OUT/events.log" > "$OUT/sampler.log" 2>&1 &
SAMPLER=$!
PIDS+=($SAMPLER)
sleep "$SAMPLE_S"   # one baseline sample before the load

log "load start"
START=$(date +%s)
"$BIN/sbc-loadgen" --scenario register --rate "$REG_RATE" --duration "$DURATION" --target "$SIP" \
  --local 127.0.0.28:0 --sockets "$REG_SOCKETS" --users "$REG_USERS" --expires "$REG_EXPIRES" \
  --pid "$SBC_PID" --json "$OUT/register.json" > "$OUT/register.log" 2>&1 &
REG=$!; PIDS+=($REG)
"$BIN/sbc-loadgen" --scenario call --rate "$CALL_RATE" --duration "$DURATION" --target "$SIP" \
  --local 127.0.0.27:0 --hold-ms "$CALL_HOLD_MS" --pid "$SBC_PID" --json "$OUT/calls.json" \
  > "$OUT/calls.log" 2>&1 &
CALLS=$!; PIDS+=($CALLS)
"$BIN/sbc-phones" run --target "$SIP" --target-tls 127.0.0.21:25061 --ca "$OUT/pki/ca.pem" \
  --udp "$PHONES_UDP" --tls "$PHONES_TLS" --local-ip 127.0.0.29 --expires "$PHONE_EXPIRES" \
  --rate 200 --duration "$DURATION" --ready-file "$OUT/phones.ready" --json "$OUT/phones.json" \
  --reconnect > "$OUT/phones.log" 2>&1 &
PHONES=$!; PIDS+=($PHONES)
WINDOWS=$(( (DURATION - 10) / MEDIA_WINDOW_S ))
(( WINDOWS >= 1 )) || WINDOWS=1
"$BIN/media-bench" sip-calls --calls "$MEDIA_CALLS" --target "$SIP" --local 127.0.0.25:0 \
  --a-ip 127.0.0.25 --b-ip 127.0.0.26 --peer-base 40000 --uas-log "$OUT/uas-media.log" \
  --pid "$SBC_PID" --rate 100 --seconds "$MEDIA_WINDOW_S" --windows "$WINDOWS" --warmup 2 \
  --settle 0 --relay-core 1 --label soak-media --json "$OUT/media.json" > "$OUT/media.log" 2>&1 &
MEDIA=$!; PIDS+=($MEDIA)

sleep "$WARMUP_S"
log "warm-up end"
sleep $(( FAILOVER_AT > WARMUP_S ? FAILOVER_AT - WARMUP_S : 0 ))
log "failover: $(curl -s -X POST "$ADMIN/pools/pbx/failover" | tr -d '\n')"
sleep "$FAILBACK_AFTER"
log "failback: $(curl -s -X POST "$ADMIN/pools/pbx/failback" | tr -d '\n')"

rc=0
wait "$REG" || rc=$?
wait "$CALLS" || rc=$?
wait "$PHONES" || rc=$?
log "load generators done (rc $rc); waiting for the media calls' hang-up"
wait "$MEDIA" || rc=$?
log "load end (rc $rc); settling ${SETTLE_S}s"
sleep "$SETTLE_S"
log "settled"
sleep $(( SAMPLE_S + 1 ))   # one last sample after the settle mark
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
python3 "$HERE/analyze.py" "$OUT" | tee "$OUT/verdict.txt"
log "done: $OUT"
