#!/usr/bin/env bash
# SBC memory per TLS phone (benchmarks/README.md, "TLS memory per phone"): a fresh SBC and
# sbc-uas, N phones over TLS (each its own connection) registering through it, RSS before the
# phones and SETTLE s after the last one's first answer (refresh transactions gone); bytes per
# phone = RSS growth / N. TLS=0 UDP=N gives the UDP figure. Loopback only (127.0.0.41-48, see
# sbc-tls-mem.toml), bounded in time; it stops what it started.
#
#   benchmarks/scale/tls-memory.sh                        # N=2000, binaries of target/release
#   BIN=/path/to/other/build N=2000 benchmarks/scale/tls-memory.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN=${BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
N=${N:-2000}
TLS=${TLS:-$N}
UDP=${UDP:-0}
SETTLE=${SETTLE:-35}
OUT=${OUT:-$(mktemp -d /tmp/sbc-tls-mem.XXXXXX)}
mkdir -p "$OUT"
[ -x "$BIN/sbc" ] && [ -x "$BIN/sbc-phones" ] && [ -x "$BIN/sbc-uas" ] ||
  { echo "needs sbc, sbc-phones, sbc-uas in $BIN (cargo build --release -p sbc -p sbc-benchmarks)" >&2; exit 2; }
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
"$BIN/sbc-phones" pki --ip 127.0.0.41 --out "$OUT/pki" >/dev/null
sed -e "s#@CERT@#$OUT/pki/cert.pem#" -e "s#@KEY@#$OUT/pki/key.pem#" "$HERE/sbc-tls-mem.toml" >"$OUT/sbc.toml"
taskset -c 0 "$BIN/sbc-uas" --listen 127.0.0.43:27070 --listen 127.0.0.44:27070 \
  --duration 600 --expires 120 >"$OUT/uas.log" 2>&1 &
PIDS+=($!)
RUST_LOG=warn taskset -c 1 "$BIN/sbc" run --config "$OUT/sbc.toml" >"$OUT/sbc.log" 2>&1 &
SBC=$!
PIDS+=("$SBC")
for _ in $(seq 100); do curl -sf http://127.0.0.41:29191/status >/dev/null 2>&1 && break; sleep 0.2; done
sleep 3
R0=$(awk '/^VmRSS/{print $2}' "/proc/$SBC/status")
taskset -c 0 "$BIN/sbc-phones" run --target 127.0.0.41:27060 --target-tls 127.0.0.41:27061 \
  --ca "$OUT/pki/ca.pem" --udp "$UDP" --tls "$TLS" --local-ip 127.0.0.48 --user-prefix t \
  --expires 120 --rate 500 --duration 300 --ready-file "$OUT/ready.json" \
  --json "$OUT/phones.json" >"$OUT/phones.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 900); do [ -s "$OUT/ready.json" ] && break; sleep 0.2; done
[ -s "$OUT/ready.json" ] || { echo "phones not ready (see $OUT)" >&2; exit 1; }
sleep "$SETTLE"
R1=$(awk '/^VmRSS/{print $2}' "/proc/$SBC/status")
echo "phones: udp=$UDP tls=$TLS $(cat "$OUT/ready.json" | tr -d '\n')"
echo "RSS before ${R0} KiB, with the phones ${R1} KiB: $(( (R1 - R0) * 1024 / N )) bytes per phone"
