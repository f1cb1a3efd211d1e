#!/usr/bin/env bash
# Runs the whole test suite: installs missing dependencies (scripts/install-deps.sh),
# then format check, clippy (warnings are errors) and every test in the workspace.
# Works from any directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -d "$HOME/.cargo/bin" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
# kamailio lives in /usr/sbin, which a non-root PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

bash "$ROOT/scripts/install-deps.sh" </dev/null

# One clean build on CI: incremental state would only double the disk it needs.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
echo "==> disk before the build: $(df -h --output=avail . | tail -1 | tr -d ' ') free"

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "==> grafana dashboard check"
python3 packaging/grafana/check_dashboard.py

echo "==> cargo test"
cargo test --workspace
echo "==> disk after the build: $(du -sh "${CARGO_TARGET_DIR:-$ROOT/target}" 2>/dev/null | cut -f1) in the target directory, $(df -h --output=avail . | tail -1 | tr -d ' ') free"
