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

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "==> grafana dashboard check"
python3 packaging/grafana/check_dashboard.py

echo "==> cargo test"
cargo test --workspace
