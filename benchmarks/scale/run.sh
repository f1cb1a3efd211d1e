#!/usr/bin/env bash
# Scale runs of the SBC (issue 8; benchmarks/README.md "Scale and soak"):
#
#   reg    for N in PHONES (1,000 / 5,000 / 20,000): a fresh SBC, N phones registered (80% UDP,
#          each its own socket; 20% TLS, each its own connection) and refreshing every
#          expires/2; RSS before, after the UDP phones, after the TLS phones (memory per
#          registration); then a calls/s ramp (CALL_RATES, CALL_S seconds each) with the phones
#          still refreshing, until more than 0.1% of the calls fail: calls/s capacity,
#          setup latency p50/p99, SBC CPU per call, RSS.
#   media  for C in MEDIA_CALLS (100 / 500 / 1,000 / 2,000): a fresh SBC, C calls placed through
#          it (media-bench sip-calls), RTP both ways at 50 packets/s per direction (C@P: P
#          packets/s instead; 2000@10 is the default's last point, see the README) for
#          MEDIA_S seconds, hang-up: packets/s, SBC CPU, RSS per call with media, one-way
#          latency p50/p99, call setup latency p50/p99.
#   kam-media  the media part through Kamailio + rtpengine 10.5 (kamailio-rtpengine.cfg:
#          the anchor config plus rtpengine_offer/answer/delete; rtpengine userspace
#          forwarding, one thread, both on core 1): packets/s, latency, rtpengine's CPU and
#          RSS per call (media-bench measures the rtpengine pid), Kamailio's CPU and PSS.
#   kam    the reg part's UDP phones and call ramp against Kamailio 5.6 (the anchor config of
#          benchmarks/kamailio, as run-proxy-compare.sh runs it): Kamailio forwards REGISTER
#          and keeps no registration (the PBX is the registrar), has no TLS listener in that
#          config and no media, so only its memory under N refreshing UDP phones and its call
#          ramp compare.
#
#   benchmarks/scale/run.sh                               # PARTS="reg media kam"
#   PARTS=media MEDIA_CALLS="100 500" benchmarks/scale/run.sh
#   SBC_MEDIA=0 PARTS=reg benchmarks/scale/run.sh         # the SBC without media anchoring
#
# Layout: the SBC (or Kamailio) on core 1, every generator and the UAS on core 0 (taskset);
# loopback addresses of its own (127.0.0.3x, see sbc-scale.toml). Every run is bounded; the
# script stops what it started (by pid) when it ends, also on failure or Ctrl-C.
# summary.py OUT writes summary.md, summary.json and the PNG curves (into OUT and, with
# PLOTS_TO, next to benchmarks/README.md).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PARTS="${PARTS:-reg media kam}"
PHONES="${PHONES:-1000 5000 20000}"
TLS_PCT="${TLS_PCT:-20}"
EXPIRES="${EXPIRES:-120}"
PHONE_RATE="${PHONE_RATE:-500}"
# Seconds after each phone phase before RSS is read: the initial REGISTERs' transactions
# (32 s Timer K linger) are gone and the table holds what refreshes keep in it.
REG_SETTLE_S="${REG_SETTLE_S:-35}"
CALL_RATES="${CALL_RATES:-500 1000 2000 3000 4000 6000 8000 10000 12000}"
CALL_S="${CALL_S:-10}"
MEDIA_CALLS="${MEDIA_CALLS:-100 500 1000 2000@10}"
MEDIA_S="${MEDIA_S:-10}"
STAMP="$(date -u +%Y%m%d-%H%M%S)"
OUT="${OUT:-$ROOT/target/bench-results/scale-$STAMP}"
# Absolute: the generated config names files under it, read by processes started elsewhere.
OUT="$(realpath -m "$OUT")"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
KAMAILIO="${KAMAILIO:-/usr/sbin/kamailio}"

SIP=127.0.0.31:26060
TLS=127.0.0.31:26061
ADMIN=http://127.0.0.31:29091
KAM_SIP=127.0.0.31:26062

mkdir -p "$OUT/bin"
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  (cd "$ROOT" && cargo build --release -p sbc -p sbc-benchmarks)
fi
for b in sbc sbc-uas sbc-loadgen sbc-phones media-bench; do
  cp "${BIN_FROM:-$TARGET_DIR/release}/$b" "$OUT/bin/$b"
done
BIN="$OUT/bin"
"$BIN/sbc-phones" pki --ip 127.0.0.31 --out "$OUT/pki"
sed -e "s#@CERT@#$OUT/pki/cert.pem#" -e "s#@KEY@#$OUT/pki/key.pem#" "$HERE/sbc-scale.toml" > "$OUT/sbc-scale.toml"
# SBC_MEDIA=0: signalling only (no media anchoring), as the Kamailio anchor config.
if [[ "${SBC_MEDIA:-1}" == 0 ]]; then
  sed -i 's/^enabled = true$/enabled = false/' "$OUT/sbc-scale.toml"
  grep -q '^enabled = false$' "$OUT/sbc-scale.toml"
fi

PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
log() { echo "$(date -u +%H:%M:%S) scale: $*" | tee -a "$OUT/events.log"; }
rss() { awk '/VmRSS/{print $2}' "/proc/$1/status"; }
# Kamailio: the sum of PSS over its processes (they share one big shared-memory segment,
# which plain RSS would count once per process).
pss_tree() {
  local t=0 p
  for p in "$@"; do
    t=$(( t + $(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null || echo 0) ))
  done
  echo "$t"
}
children() { pgrep -P "$1" | tr '\n' ' ' || true; }
ticks_tree() {  # utime+stime ticks summed over pids
  local t=0 p
  for p in "$@"; do
    t=$(( t + $(awk '{s=$0; sub(/.*\) /, "", s); split(s, f, " "); print f[12] + f[13]}' "/proc/$p/stat" 2>/dev/null || echo 0) ))
  done
  echo "$t"
}

{
  echo "date: $(date -u)"; echo "host: $(uname -a)"; echo "nproc: $(nproc)"
  echo "loadavg: $(cat /proc/loadavg)"; echo "ulimit -n: $(ulimit -n)"
  echo "PARTS=$PARTS PHONES=$PHONES TLS_PCT=$TLS_PCT EXPIRES=$EXPIRES CALL_RATES=$CALL_RATES CALL_S=$CALL_S"
  echo "MEDIA_CALLS=$MEDIA_CALLS MEDIA_S=$MEDIA_S"
  echo "sbc md5: $(md5sum < "$BIN/sbc")"
  (cd "$ROOT" && git rev-parse HEAD 2>/dev/null && git status --short 2>/dev/null | head -40) || true
} > "$OUT/env.txt"

start_uas() {  # $1 = name
  : > "$OUT/$1-uas-media.log"
  taskset -c 0 "$BIN/sbc-uas" --listen 127.0.0.33:26070 --listen 127.0.0.34:26070 --duration 3600 \
    --expires "$EXPIRES" --media-log "$OUT/$1-uas-media.log" --media-b-ip 127.0.0.36 \
    --media-peer-base 40000 > "$OUT/$1-uas.log" 2>&1 &
  UAS_PID=$!
  PIDS+=($UAS_PID)
}

start_sbc() {  # $1 = name
  RUST_LOG=warn taskset -c 1 "$BIN/sbc" run --config "$OUT/sbc-scale.toml" > "$OUT/$1-sbc.log" 2>&1 &
  SBC_PID=$!
  PIDS+=($SBC_PID)
  for _ in $(seq 50); do
    curl -sf "$ADMIN/status" > /dev/null 2>&1 && break
    sleep 0.2
  done
  curl -sf "$ADMIN/status" > /dev/null || { echo "SBC did not come up" >&2; cat "$OUT/$1-sbc.log" >&2; exit 1; }
  sleep 3
}

stop_pid() {  # stops one pid we started and waits for it
  kill "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

wait_file() {  # $1 = file, $2 = seconds
  local i
  for i in $(seq $(( $2 * 5 ))); do [[ -s "$1" ]] && return 0; sleep 0.2; done
  echo "timed out waiting for $1" >&2
  return 1
}

# Phones: UDP in processes of at most 8,000 (the fd limit is per process), then TLS.
# $1 = run name, $2 = N, $3 = SIP target, $4 = TLS target or "", $5 = duration
start_phones() {
  local name=$1 n=$2 target=$3 tls_target=$4 dur=$5
  local tls=0
  [[ -n "$tls_target" ]] && tls=$(( n * TLS_PCT / 100 ))
  local udp=$(( n - tls )) k=0 left
  PHONE_PIDS=()
  left=$udp
  while (( left > 0 )); do
    local chunk=$(( left > 8000 ? 8000 : left ))
    taskset -c 0 "$BIN/sbc-phones" run --target "$target" --udp "$chunk" --tls 0 \
      --local-ip 127.0.0.38 --user-prefix "u${k}x" --expires "$EXPIRES" --rate "$PHONE_RATE" \
      --duration "$dur" --ready-file "$OUT/$name-phones-udp$k.ready" \
      --json "$OUT/$name-phones-udp$k.json" > "$OUT/$name-phones-udp$k.log" 2>&1 &
    PHONE_PIDS+=($!); PIDS+=($!)
    left=$(( left - chunk )); k=$(( k + 1 ))
  done
  for (( j = 0; j < k; j++ )); do wait_file "$OUT/$name-phones-udp$j.ready" 120; done
  sleep "$REG_SETTLE_S"
  RSS_UDP=$(rss_of_target)
  [[ -n "${STATUS_URL:-}" ]] && curl -s "$STATUS_URL" > "$OUT/$name-status-udp.json" || true
  if (( tls > 0 )); then
    taskset -c 0 "$BIN/sbc-phones" run --target "$target" --target-tls "$tls_target" \
      --ca "$OUT/pki/ca.pem" --udp 0 --tls "$tls" --local-ip 127.0.0.38 --user-prefix "t" \
      --expires "$EXPIRES" --rate "$PHONE_RATE" --duration "$dur" \
      --ready-file "$OUT/$name-phones-tls.ready" --json "$OUT/$name-phones-tls.json" \
      > "$OUT/$name-phones-tls.log" 2>&1 &
    PHONE_PIDS+=($!); PIDS+=($!)
    wait_file "$OUT/$name-phones-tls.ready" 180
  fi
  (( tls > 0 )) && sleep "$REG_SETTLE_S"
  RSS_ALL=$(rss_of_target)
  PHONES_UDP=$udp; PHONES_TLS=$tls
}

# A calls/s ramp: stops at the first rate with more than 0.1% failures.
# $1 = run name, $2 = target, $3.. = pids to measure
ramp() {
  local name=$1 target=$2; shift 2
  local pidargs=() p r
  for p in "$@"; do pidargs+=(--pid "$p"); done
  for r in $CALL_RATES; do
    local j="$OUT/$name-call-$r.json"
    taskset -c 0 "$BIN/sbc-loadgen" --scenario call --rate "$r" --duration "$CALL_S" \
      --target "$target" --local 127.0.0.37:0 "${pidargs[@]}" --json "$j" \
      > "$OUT/$name-call-$r.log" 2>&1 || true
    echo "{\"rss_kib\": $(rss_of_target)}" > "$OUT/$name-call-$r.rss.json"
    local fr
    fr=$(python3 -c "import json,sys; d=json.load(open('$j')); print(d['failure_ratio'])" 2>/dev/null || echo 1)
    log "$name: $r calls/s failure ratio $fr"
    if python3 -c "import sys; sys.exit(0 if float('$fr') > 0.001 else 1)"; then break; fi
    sleep 3
  done
}

if [[ " $PARTS " == *" reg "* ]]; then
  for n in $PHONES; do
    name="reg-sbc-$n"
    log "$name: start"
    start_uas "$name"
    start_sbc "$name"
    rss_of_target() { rss "$SBC_PID"; }
    STATUS_URL="$ADMIN/status"
    RSS_BASE=$(rss "$SBC_PID")
    start_phones "$name" "$n" "$SIP" "$TLS" 900
    log "$name: $PHONES_UDP UDP + $PHONES_TLS TLS phones up; RSS $RSS_BASE -> $RSS_UDP -> $RSS_ALL KiB"
    curl -s "$ADMIN/status" > "$OUT/$name-status.json" || true
    curl -s "$ADMIN/metrics" > "$OUT/$name-metrics.txt" || true
    echo "{\"proxy\": \"sbc\", \"phones\": $n, \"udp\": $PHONES_UDP, \"tls\": $PHONES_TLS, \"rss_base_kib\": $RSS_BASE, \"rss_udp_kib\": $RSS_UDP, \"rss_all_kib\": $RSS_ALL, \"fds\": $(ls /proc/$SBC_PID/fd | wc -l)}" > "$OUT/$name-mem.json"
    ramp "$name" "$SIP" "$SBC_PID"
    for p in "${PHONE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done   # they unregister
    for p in "${PHONE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    stop_pid "$SBC_PID"; stop_pid "$UAS_PID"
    sleep 2
  done
fi

if [[ " $PARTS " == *" media "* ]]; then
  for spec in $MEDIA_CALLS; do
    c=${spec%@*}; pps=50; [[ "$spec" == *@* ]] && pps=${spec#*@}
    name="media-sbc-$c"
    log "$name: start"
    start_uas "$name"
    start_sbc "$name"
    taskset -c 0 "$BIN/media-bench" sip-calls --calls "$c" --target "$SIP" --local 127.0.0.35:0 \
      --a-ip 127.0.0.35 --b-ip 127.0.0.36 --peer-base 40000 --uas-log "$OUT/$name-uas-media.log" \
      --pid "$SBC_PID" --rate 200 --pps "$pps" --seconds "$MEDIA_S" --warmup 2 --relay-core 1 --settle 2 \
      --label "$name" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || log "$name: failed (see $name.log)"
    curl -s "$ADMIN/metrics" > "$OUT/$name-metrics.txt" || true   # sbc_media_dropped_total etc.
    log "$name: $(tail -1 "$OUT/$name.log")"
    stop_pid "$SBC_PID"; stop_pid "$UAS_PID"
    sleep 2
  done
fi

if [[ " $PARTS " == *" kam "* ]]; then
  sed -e "s/^listen=udp:127.0.0.1:5060/listen=udp:$KAM_SIP/" -e "s/^listen=tcp:127.0.0.1:5060/listen=tcp:$KAM_SIP/" \
      -e "s/^alias=\"127.0.0.1:5060\"/alias=\"$KAM_SIP\"/" \
      -e "s/sip:sbc@127.0.0.1/sip:sbc@127.0.0.31/" \
      "$ROOT/benchmarks/kamailio/kamailio-dispatcher.cfg" > "$OUT/kamailio.cfg"
  printf '1 sip:127.0.0.33:26070 0 10\n1 sip:127.0.0.34:26070 0 5\n' > "$OUT/dispatcher.list"
  for n in $PHONES; do
    name="reg-kam-$n"
    log "$name: start"
    start_uas "$name"
    mkdir -p "$OUT/kam-$n"
    taskset -c 1 "$KAMAILIO" -f "$OUT/kamailio.cfg" -DD -E -m 2048 -M 8 -x tlsf -X tlsf \
      -A "DISPATCHER_LIST=\"$OUT/dispatcher.list\"" -A "CTL_SOCKET=\"unix:$OUT/kam-$n/ctl\"" \
      -A NCHILD=4 -Y "$OUT/kam-$n" > "$OUT/$name-kamailio.log" 2>&1 &
    KAM_PID=$!
    PIDS+=($KAM_PID)
    sleep 4
    KAM_PIDS="$KAM_PID $(children "$KAM_PID")"
    # shellcheck disable=SC2086
    rss_of_target() { pss_tree $KAM_PIDS; }
    STATUS_URL=""
    RSS_BASE=$(rss_of_target)
    start_phones "$name" "$n" "$KAM_SIP" "" 900
    log "$name: $PHONES_UDP UDP phones up; PSS $RSS_BASE -> $RSS_ALL KiB"
    echo "{\"proxy\": \"kamailio\", \"phones\": $n, \"udp\": $PHONES_UDP, \"tls\": 0, \"rss_base_kib\": $RSS_BASE, \"rss_udp_kib\": $RSS_UDP, \"rss_all_kib\": $RSS_ALL}" > "$OUT/$name-mem.json"
    # shellcheck disable=SC2086
    ramp "$name" "$KAM_SIP" $KAM_PIDS
    for p in "${PHONE_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PHONE_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    stop_pid "$KAM_PID"; stop_pid "$UAS_PID"
    sleep 2
  done
fi

if [[ " $PARTS " == *" kam-media "* ]]; then
  sed -e "s/^listen=udp:127.0.0.1:5060/listen=udp:$KAM_SIP/" -e "s/^listen=tcp:127.0.0.1:5060/listen=tcp:$KAM_SIP/" \
      -e "s/^alias=\"127.0.0.1:5060\"/alias=\"$KAM_SIP\"/" \
      -e "s/sip:sbc@127.0.0.1/sip:sbc@127.0.0.31/" \
      "$HERE/kamailio-rtpengine.cfg" > "$OUT/kamailio-rtpengine.cfg"
  printf '1 sip:127.0.0.33:26070 0 10\n1 sip:127.0.0.34:26070 0 5\n' > "$OUT/dispatcher.list"
  for spec in $MEDIA_CALLS; do
    c=${spec%@*}; pps=50; [[ "$spec" == *@* ]] && pps=${spec#*@}
    name="media-kamrtpe-$c"
    log "$name: start"
    start_uas "$name"
    taskset -c 1 rtpengine --config-file=none --foreground --log-stderr --log-level=4 \
      --interface=127.0.0.39 --listen-ng=127.0.0.39:22232 --port-min=30000 --port-max=39999 \
      --table=-1 --num-threads=1 --delete-delay=0 > "$OUT/$name-rtpengine.log" 2>&1 &
    RTPE_PID=$!; PIDS+=($RTPE_PID)
    mkdir -p "$OUT/kamm-$c"
    taskset -c 1 "$KAMAILIO" -f "$OUT/kamailio-rtpengine.cfg" -DD -E -m 2048 -M 8 -x tlsf -X tlsf \
      -A "DISPATCHER_LIST=\"$OUT/dispatcher.list\"" -A "CTL_SOCKET=\"unix:$OUT/kamm-$c/ctl\"" \
      -A "RTPENGINE_SOCK=\"udp:127.0.0.39:22232\"" \
      -A NCHILD=4 -Y "$OUT/kamm-$c" > "$OUT/$name-kamailio.log" 2>&1 &
    KAM_PID=$!; PIDS+=($KAM_PID)
    sleep 4
    KAM_PIDS="$KAM_PID $(children "$KAM_PID")"
    # shellcheck disable=SC2086
    k0=$(ticks_tree $KAM_PIDS); p0=$(pss_tree $KAM_PIDS); t0=$(date +%s.%N)
    taskset -c 0 "$BIN/media-bench" sip-calls --calls "$c" --target "$KAM_SIP" --local 127.0.0.35:0 \
      --a-ip 127.0.0.35 --b-ip 127.0.0.36 --peer-base 40000 --uas-log "$OUT/$name-uas-media.log" \
      --pid "$RTPE_PID" --rate 200 --pps "$pps" --seconds "$MEDIA_S" --warmup 2 --relay-core 1 --settle 2 \
      --label "$name" --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1 || log "$name: failed (see $name.log)"
    # shellcheck disable=SC2086
    k1=$(ticks_tree $KAM_PIDS); p1=$(pss_tree $KAM_PIDS); t1=$(date +%s.%N)
    echo "{\"kamailio_cpu_ticks\": $(( k1 - k0 )), \"clk_tck\": $(getconf CLK_TCK), \"seconds\": $(echo "$t1 - $t0" | bc), \"kamailio_pss_before_kib\": $p0, \"kamailio_pss_after_kib\": $p1}" > "$OUT/$name-kamailio.json"
    log "$name: $(tail -1 "$OUT/$name.log")"
    stop_pid "$KAM_PID"; stop_pid "$RTPE_PID"; stop_pid "$UAS_PID"
    sleep 2
  done
fi

python3 "$HERE/summary.py" "$OUT" ${PLOTS_TO:+"$PLOTS_TO"} | tee "$OUT/summary.txt" || true
log "done: $OUT"
