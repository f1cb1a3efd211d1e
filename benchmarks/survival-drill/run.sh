#!/usr/bin/env bash
# The contrast of issue 9 (benchmarks/README.md, "Calls in progress when the PBX dies"):
# the same drill through a front-door Kamailio + dispatcher (the anchor config
# benchmarks/kamailio/kamailio-dispatcher.cfg) and through the SBC, in front of the same
# pair of real Kamailio PBX nodes (record-routing proxies, tests/kamailio/pbx.cfg). The
# drill itself is the #[ignore]d test tests/tests/survival_contrast.rs; this script runs it
# RUNS times (alternating which setup goes first) and makes the table of medians.
#
# Everything is on loopback, every loop in the drill is bounded, and the test only ever
# signals the Kamailio process groups it started itself.
#
# Usage: benchmarks/survival-drill/run.sh        (from anywhere)
# Environment (defaults in brackets):
#   RUNS [3]        runs; each runs both setups
#   RTP_SECS [10]   seconds of RTP after the kill (30 for the issue's drill)
#   CALLS [50]      calls per setup (1-250)
#   SETUPS ["dispatcher sbc"]  dispatcher: the anchor config as is; dispatcher-retry: with
#                   -A WITH_FAILOVER -A WITH_MARK; sbc: the SBC (default config + the pool).
#                   Even runs take them in reverse order.
#   OUT [target/bench-results/survival-drill-<timestamp>]
# Cargo's target dir is CARGO_TARGET_DIR as usual.
# Output in OUT: results.jsonl (one line per setup and run), run-N.txt (each run's output),
# env.txt, summary.md (made by summary.py OUT, which can be rerun on any OUT).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
RUNS=${RUNS:-3}
RTP_SECS=${RTP_SECS:-10}
CALLS=${CALLS:-50}
SETUPS=${SETUPS:-"dispatcher sbc"}
OUT=${OUT:-target/bench-results/survival-drill-$(date +%Y%m%d-%H%M%S)}

for tool in kamailio python3 cargo; do
  command -v "$tool" >/dev/null || [ -x "/usr/sbin/$tool" ] ||
    { echo "missing $tool (scripts/install-deps.sh installs kamailio)"; exit 1; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: >"$OUT/results.jsonl"

cargo test -p sbc-tests --test survival_contrast --no-run

{
  echo "date: $(date -Is)"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git diff --quiet HEAD 2>/dev/null || echo '(with uncommitted changes)')"
  echo "kernel: $(uname -r)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) x $(nproc)"
  echo "kamailio: $( (kamailio -v 2>/dev/null || /usr/sbin/kamailio -v 2>/dev/null) | head -1)"
  echo "load avg at start: $(cat /proc/loadavg)"
  echo "RUNS=$RUNS RTP_SECS=$RTP_SECS CALLS=$CALLS SETUPS=$SETUPS"
} | tee "$OUT/env.txt"

for run in $(seq 1 "$RUNS"); do
  # shellcheck disable=SC2086
  if [ $((run % 2)) = 1 ]; then setups=$SETUPS; else setups=$(printf '%s\n' $SETUPS | tac | xargs); fi
  echo "== run $run ($setups; load avg $(cut -d' ' -f1-3 /proc/loadavg))"
  SURVIVAL_CONTRAST_RTP_SECS=$RTP_SECS SURVIVAL_CONTRAST_CALLS=$CALLS \
    SURVIVAL_CONTRAST_SETUPS=$setups SURVIVAL_CONTRAST_JSON=$OUT/results.jsonl \
    timeout $((RTP_SECS * 2 + 240)) \
    cargo test -q -p sbc-tests --test survival_contrast -- --ignored --nocapture \
    >"$OUT/run-$run.txt" 2>&1 || { echo "run $run failed:"; tail -40 "$OUT/run-$run.txt"; }
  grep '^|' "$OUT/run-$run.txt" || true
done

python3 "$ROOT/benchmarks/survival-drill/summary.py" "$OUT" | tee "$OUT/summary.md"
echo "results in $OUT"
