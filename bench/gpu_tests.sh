#!/usr/bin/env bash
# The GPU tests, on a GPU machine without Rust (the device machine: no toolchain, no network).
# Here:   cargo test --release --no-run && bash bench/gpu_tests.sh --collect   (copies the test
#         binaries and ftscript into .gpu/, which git ignores)
# There:  bash bench/gpu_tests.sh      (with .gpu carried; --skip-kernels leaves out fused and
#         quant; --setup only links things up, to run one binary by hand)
# The test binaries look for the repository, its Python and the ftscript binary where they were
# built; there that path is linked to the copy, and the machine's python3 (torch, transformers,
# peft) stands in for the project's virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=(fused training quant recipes callbacks parity seq2seq generate)
if [ "${1:-}" = "--collect" ]; then
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  for t in "${tests[@]}"; do
    cp "$(ls -t target/release/deps/$t-* | grep -v '\.d$' | head -1)" ".gpu/$t"
  done
  cp target/release/ftscript .gpu/ftscript
  # without symbols they fit in one carry (64 MiB with the working tree)
  strip .gpu/* 2>/dev/null || true
  pwd > .gpu/built-in
  exit 0
fi
torch_lib=$(python3 -c "import os, torch; print(os.path.dirname(torch.__file__))")/lib
export LD_LIBRARY_PATH=$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
built=$(cat .gpu/built-in)
if [ "$built" != "$PWD" ]; then
  mkdir -p "$(dirname "$built")" && ln -sfn "$PWD" "$built"
fi
mkdir -p .venv/bin target/release
# a wrapper, not a link: a linked venv python would lose its site-packages
[ -x .venv/bin/python ] || printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > .venv/bin/python
chmod +x .venv/bin/python
cp .gpu/ftscript target/release/ftscript
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# --setup: only the links above, to run one test binary by hand (.gpu/NAME --exact TEST)
[ "${1:-}" = "--setup" ] && exit 0
# every group runs; the script fails at the end if any did
failed=()
run() { echo "== $*"; "$@" || failed+=("$1"); }
[ "${1:-}" = "--skip-kernels" ] || run .gpu/fused --include-ignored --test-threads=1
# decode_linear's plain loads (what GPUs before sm_90 run) on this one too
[ "${1:-}" = "--skip-kernels" ] || run env FTSCRIPT_NVRTC_DEFINES=DECODE_BULK=0 .gpu/fused --include-ignored --exact decode_linear_matches_linear_and_the_lora_update
[ "${1:-}" = "--skip-kernels" ] || run .gpu/quant --include-ignored --exact cuda_dequant_kernel_matches_op_path matches_bitsandbytes_cuda_fixture
run .gpu/training --include-ignored --exact offloaded_checkpoints_train_like_kept_ones a_memory_budget_keeps_the_peak_within_it_and_trains_the_same kept_attention_back_propagates_as_recomputation_on_the_gpu --nocapture
run .gpu/recipes --exact a_hook_generates_with_the_model_and_sees_the_adapters_of_its_step a_failing_callback_keeps_a_checkpoint_and_names_its_line
run .gpu/callbacks --exact early_stopping_stops_where_the_patience_rule_says
run .gpu/parity --include-ignored --exact bf16_training_loss_on_the_gpu_matches_transformers --nocapture
run .gpu/generate --include-ignored --exact cuda_graph_decoding_gives_the_tokens_of_op_by_op_decoding scoring_in_the_prompts_forward_on_the_gpu_matches_transformers --nocapture
run .gpu/seq2seq --include-ignored --exact t5_bf16_training_loss_on_the_gpu_matches_transformers --nocapture
[ ${#failed[@]} -eq 0 ] || { echo "FAILED: ${failed[*]}"; exit 1; }
