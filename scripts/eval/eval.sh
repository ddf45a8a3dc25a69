#!/usr/bin/env bash
# Evaluate a draft checkpoint with lossless speculative decoding against its target.
#
#   bash scripts/eval/eval.sh
#   target_name_or_path=Qwen/Qwen3-4B \
#   draft_name_or_path=~/checkpoints/deepspec/dspark_block7_qwen3_4b/step_latest \
#   bash scripts/eval/eval.sh --tasks gsm8k,mt-bench --max-samples 50
#   # a released DeepSpec draft, as its hub id (downloaded once) or a local copy:
#   target_name_or_path=Qwen/Qwen3-4B draft_name_or_path=deepseek-ai/dspark_qwen3_4b_block7 \
#   bash scripts/eval/eval.sh --tasks gsm8k
#
# Variables: target_name_or_path, draft_name_or_path, output_dir, temperature.
# Extra arguments go to eval.py (--tasks, --max-samples, --max-new-tokens,
# --confidence-threshold, --survival-threshold, --seed, --no-baseline, --dtype, --batch-size,
# --policy fixed|threshold|cumulative|scheduled, --sps-table, --split). Default tasks and caps:
# gsm8k 500, math500 500, aime25 30, humaneval 164, mbpp 256, livecodebench 500,
# mt-bench 80, alpaca 500, arena-hard-v2 500; max_new_tokens 2048, temperature 1.0.
#
# Runs where you stand: relative paths you give (draft_name_or_path, output_dir,
# --baseline-from, --sps-table, --eval-datasets-dir) name places in your current directory.
# The defaults point into the repository: prompts from its eval_datasets/, results in its
# out/eval/<draft run>_t<temperature>/.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

target_name_or_path=${target_name_or_path:-embedded:smollm2-135m-instruct}
draft_name_or_path=${draft_name_or_path:-${HOME}/checkpoints/deepspec/dspark_smollm2_135m/step_latest}
temperature=${temperature:-1.0}
# the run's name: <run> of <run>/step_N, else the draft's own name (a released draft or hub id)
run_name=$(basename "${draft_name_or_path%/}")
case "$run_name" in step_*) run_name=$(basename "$(dirname "${draft_name_or_path%/}")") ;; esac
output_dir=${output_dir:-$ROOT/out/eval/${run_name}_t${temperature}}

# --eval-datasets-dir comes first: one given in "$@" overrides it (argparse keeps the last)
exec "${PYTHON:-python3}" "$ROOT/eval.py" \
    --eval-datasets-dir "$ROOT/eval_datasets" \
    --target_name_or_path "${target_name_or_path}" \
    --draft_name_or_path "${draft_name_or_path}" \
    --temperature "${temperature}" \
    --output-dir "${output_dir}" \
    "$@"
