#!/usr/bin/env bash
# The benchmark rows the open issues still need, for a GPU machine lent by the device tool (no
# Rust there, no network): one group a call, each within one 600-s call.
#
# Here, once a build:   bash bench/open_rows.sh --pack
#   builds ftscript and the GPU test binaries (release) and packs them into .gpz/bin.tar.xz
#   (~12 MB; git ignores .gpz). Fetch the peers' wheels too where a group names them:
#   .whl-unsloth as bench/unsloth-wheels.txt says (39 MB slimmed), .whl-liger with
#   `pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
#    --platform manylinux_2_28_x86_64 --platform any -d .whl-liger liger-kernel==0.8.5`.
# There:                bash bench/open_rows.sh GROUP      (carry .gpz and the group's wheels)
#   every row's output goes to $OUT/log.txt, each row bounded by its time limit, marked
#   `== <time> <command>` and `== rc <code>`; `grep -E "^==|tokens_per_s|RATIO|BANDWIDTH|EVAL
#   SHARE" $OUT/log.txt` gives the numbers.
#
# group          issue  wheels       ~s   rows
# generation     21     -            390  generate_bench.py: 7B batch 1 (its share of the bandwidth
#                                         limit), SmolLM2-135M batch 1, 7B and 1.1B batch 64, 1.1B batch 1
# eval-share     21     -            150  eval_share.py 7b --gen-batch 256 (evaluation's share of a run)
# unsloth-7b     26     .whl-unsloth 560  7B q+v, all-linear r=16 and QLoRA NF4 "offload" vs Unsloth
# unsloth-whole  26     .whl-unsloth 480  7B and 1.1B "auto" vs Unsloth without checkpointing, 1.1B "offload"
# long-context   26     .whl-unsloth 590  long_context.py 7b at 16k, 32k, 64k (128k: run it alone)
# families       18     .whl-liger   560  Qwen3-8B "auto" and Gemma-3-12B "offload" vs HF+peft+Liger
# tests          all    -            300  the GPU tests (bench/gpu_tests.sh)
#
# The issues' targets are stated for an H200: a group prints the GPU first, and the rows say
# which it was.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--pack" ]; then
  set -e
  cargo build --release
  cargo test --release --no-run
  bash bench/gpu_tests.sh --collect
  mkdir -p .gpz
  grep -qx '/.gpz/' .git/info/exclude 2>/dev/null || echo '/.gpz/' >> .git/info/exclude
  XZ_OPT=-9 tar cJf .gpz/bin.tar.xz .gpu
  ls -la .gpz/bin.tar.xz
  exit 0
fi

group=${1:-}
case "$group" in
  generation | eval-share | unsloth-7b | unsloth-whole | long-context | families | tests) ;;
  *) echo "usage: bash bench/open_rows.sh --pack | generation | eval-share | unsloth-7b | unsloth-whole | long-context | families | tests" >&2; exit 2 ;;
esac
LOG=${OUT:-/tmp}/log.txt
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
for f in .gpz/*.tar.xz; do [ -e "$f" ] && tar xJf "$f"; done
[ -x .gpu/ftscript ] || { echo "no .gpu/ftscript: run bash bench/open_rows.sh --pack here and carry .gpz" | tee -a "$LOG"; exit 2; }
bash bench/gpu_tests.sh --setup >> "$LOG" 2>&1
LD_LIBRARY_PATH=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")/lib
export LD_LIBRARY_PATH FTSCRIPT=$PWD/target/release/ftscript
wheels=$(ls .whl-*/*.whl 2>/dev/null | tr '\n' ' ')
if [ -n "$wheels" ]; then
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee -a "$LOG"

# row SECONDS COMMAND...: one row, bounded, into the log
row() {
  local s=$1
  shift
  echo "== $(date +%T) $*" >> "$LOG"
  timeout "$s" "$@" >> "$LOG" 2>&1
  echo "== rc $? $(date +%T)" >> "$LOG"
}

G="python3 bench/generate_bench.py"
B="python3 bench/bench.py"
ALL_LINEAR="--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --r 16"
case "$group" in
  generation)
    row 160 $G 7b --batch 1 --prompts 4
    row 100 $G smollm2-135m --batch 1 --prompts 4
    row 120 $G 7b --batch 64 --prompts 64
    row 80 $G 1b --batch 64 --prompts 64
    row 120 $G 1b --batch 1 --prompts 8
    ;;
  eval-share) row 400 python3 bench/eval_share.py 7b --gen-batch 256 ;;
  unsloth-7b)
    row 180 $B 7b --offload --peer unsloth
    row 200 $B 7b $ALL_LINEAR --offload --peer unsloth
    row 180 $B 7b --quantize nf4 --offload --peer unsloth
    ;;
  unsloth-whole)
    row 200 $B 7b --auto --no-ckpt --peer unsloth
    row 150 $B 1b --auto --no-ckpt --peer unsloth
    row 130 $B 1b --offload --peer unsloth
    ;;
  long-context) row 590 python3 bench/long_context.py 7b --peer unsloth --lengths 16384,32768,65536 --timeout 280 ;;
  families)
    row 260 $B qwen3-8b --auto --no-ckpt --peer liger
    row 300 $B gemma3-12b --offload --peer liger
    ;;
  tests) row 590 bash bench/gpu_tests.sh ;;
esac
grep -E "^==|tokens_per_s|RATIO|BANDWIDTH|EVAL SHARE" "$LOG"
