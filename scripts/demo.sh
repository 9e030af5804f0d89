#!/usr/bin/env bash
# The main job: set up (first run only), then run the quickstart recipe on the demo model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec target/release/ftscript run scripts/quickstart.rhai "$@"
