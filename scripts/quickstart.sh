#!/usr/bin/env bash
# deepspec end to end on the embedded target (SmolLM2-135M-Instruct) on this CPU:
# regenerate answers with llama.cpp -> target cache -> train DSpark, DFlash and Eagle3 at the
# same budget -> evaluate each (temperature 1 and 0) -> one comparison table + a report.
#
#   bash scripts/quickstart.sh --fast   # 64 prompts, short training, 2 prompts per benchmark
#   bash scripts/quickstart.sh          # 400 prompts (all of mini.jsonl), longer training
#   bash scripts/quickstart.sh --gpu    # Qwen/Qwen3-4B on one GPU node (see README)
#
# A re-run reuses finished stages (answers, cache, checkpoints, evaluations). Ctrl-C stops
# cleanly (the llama.cpp servers are shut down; every stage resumes later).
# Outputs: out/quickstart/<profile>/ (data/, checkpoints/, eval/, report/REPORT.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
trap 'echo; echo "quickstart: interrupted; run the same command again to continue"; exit 130' INT TERM

PROFILE=default
for arg in "$@"; do
  case "$arg" in
    --fast) PROFILE=fast ;;
    --gpu) PROFILE=gpu ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "quickstart.sh: unknown option $arg (--fast, --gpu)" >&2; exit 2 ;;
  esac
done

case "$PROFILE" in
  fast)    NUM_PROMPTS=64;  MAX_TOKENS=256; STEPS=12;  EVAL_SAMPLES=2;  MAX_NEW=96 ;;
  default) NUM_PROMPTS=400; MAX_TOKENS=384; STEPS=60;  EVAL_SAMPLES=10; MAX_NEW=192 ;;
  gpu)
    echo "quickstart --gpu: on a GPU node run the documented recipe (README: 'GPU recipe'):"
    echo "  PROFILE=qwen3-4b bash scripts/data/prepare_data.sh"
    echo "  for a in dspark dflash eagle3; do target_cache_dir=out/data/qwen3-4b/target_cache \\"
    echo "      bash scripts/train/train.sh config/\$a/\${a}_qwen3_4b.py; done"
    echo "  target_name_or_path=Qwen/Qwen3-4B draft_name_or_path=~/checkpoints/deepspec/<exp>/step_latest \\"
    echo "      bash scripts/eval/eval.sh"
    exit 0 ;;
esac
WORK=out/quickstart/$PROFILE
TASKS=gsm8k,humaneval,mt-bench
start_all=$(date +%s)
stage() { echo; echo "== $* =="; }

stage "1/5 install and resolve the embedded target"
bash scripts/setup.sh --llamacpp
"$PY" -m deepspec.targets resolve embedded:smollm2-135m-instruct

stage "2/5 answers + target cache ($NUM_PROMPTS prompts of mini.jsonl) -> $WORK/data"
WORK_DIR=$WORK/data NUM_PROMPTS=$NUM_PROMPTS MAX_TOKENS=$MAX_TOKENS NUM_SERVERS=2 \
  CONFIG=config/dspark/dspark_smollm2_135m.py bash scripts/data/prepare_data.sh

stage "3/5 train DSpark, DFlash, Eagle3 ($STEPS steps each) -> $WORK/checkpoints"
for algo in dspark dflash eagle3; do
  ck=$WORK/checkpoints/deepspec/${algo}_smollm2_135m
  if [ -f "$ck/step_$STEPS/COMPLETE" ]; then echo "$algo: trained already ($ck/step_$STEPS)"; continue; fi
  t0=$(date +%s)
  "$PY" train.py --config "config/$algo/${algo}_smollm2_135m.py" \
    --opts "data.target_cache_path=$WORK/data/target_cache" "train.max_train_steps=$STEPS" \
    "logging.checkpoint_root=$WORK/checkpoints" "logging.tensorboard_root=$WORK/tensorboard" \
    "logging.checkpointing_steps=25"
  echo "$algo: trained in $(( $(date +%s) - t0 ))s"
done

stage "4/5 evaluate on $TASKS ($EVAL_SAMPLES prompts each, up to $MAX_NEW new tokens), temperature 1 and 0"
runs=()
for algo in dspark dflash eagle3; do
  for temp in 1.0 0; do
    out=$WORK/eval/${algo}_t$temp
    if [ ! -f "$out/results.json" ]; then
      "$PY" eval.py --target_name_or_path embedded:smollm2-135m-instruct \
        --draft_name_or_path "$WORK/checkpoints/deepspec/${algo}_smollm2_135m/step_latest" \
        --tasks "$TASKS" --max-samples "$EVAL_SAMPLES" --max-new-tokens "$MAX_NEW" --temperature "$temp" \
        --output-dir "$out"
    fi
    runs+=(--run "$algo@$temp=$out")
  done
done

stage "5/5 comparison"
"$PY" -m deepspec.eval.report "${runs[@]}" --out "$WORK/report" \
  --title "deepspec quickstart ($PROFILE profile): DSpark vs DFlash vs Eagle3 on SmolLM2-135M-Instruct" \
  --note "Training: $NUM_PROMPTS regenerated conversations, $STEPS steps per draft (global batch 16). Evaluation: $EVAL_SAMPLES prompts each of $TASKS, at most $MAX_NEW new tokens; speedup = speculative vs plain target decoding, same process, CPU."
echo
echo "quickstart ($PROFILE) finished in $(( $(date +%s) - start_all ))s; report: $WORK/report/REPORT.md"
