#!/usr/bin/env bash
# Runs every fuzz target (or those named as arguments) for a bounded time each.
#
#   fuzz/run.sh                      # all targets, 60 s each
#   FUZZ_SECONDS=600 fuzz/run.sh sip_roundtrip
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). libFuzzer's instrumentation needs nightly
# compiler flags; on a stable toolchain they are unlocked with RUSTC_BOOTSTRAP=1, which this
# script sets (a nightly toolchain works the same). No sanitizer is used (`-s none`): the code
# under test is safe Rust, and the targets check invariants themselves.
#
# The seed corpus in fuzz/corpus/<target> is read only; what the fuzzer finds goes to
# fuzz/work/corpus/<target> (git-ignored) and crashes to fuzz/artifacts/<target>. Exits
# non-zero if any target failed; reproduce a crash with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> fuzz/artifacts/<target>/crash-...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
seconds="${FUZZ_SECONDS:-60}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

cargo fuzz build -s none

failed=()
for t in "${targets[@]}"; do
    mkdir -p "work/corpus/$t" "artifacts/$t"
    echo "== $t: ${seconds}s"
    log="work/$t.log"
    if cargo fuzz run -s none "$t" "work/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        execs=$(grep -a 'stat::number_of_executed_units' "$log" | awk '{print $2}')
        rate=$(grep -a 'stat::average_exec_per_sec' "$log" | awk '{print $2}')
        echo "   ok: ${execs:-?} runs, ${rate:-?}/s (log: fuzz/$log)"
    else
        echo "   FAILED (log: fuzz/$log):"
        grep -a -A8 'panicked at' "$log" | head -20 || tail -20 "$log"
        grep -a 'Test unit written to' "$log" || true
        failed+=("$t")
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "all targets ran ${seconds}s without a failure"
