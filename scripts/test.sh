#!/usr/bin/env bash
# The whole test suite: set up (first run only), then unit and integration tests, which compare
# ftscript against the Python reference stack installed in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --release --no-fail-fast -- --test-threads=2 "$@"
