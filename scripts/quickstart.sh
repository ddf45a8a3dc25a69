#!/usr/bin/env bash
# deepspec end to end on the embedded target (SmolLM2-135M-Instruct) on this CPU:
# regenerate answers with llama.cpp -> target cache -> train DSpark, DFlash and Eagle3 at the
# same budget -> evaluate each (temperature 1 and 0) -> one comparison table + a report.
#
#   bash scripts/quickstart.sh --fast   # 64 prompts, 40 steps per draft, 2 prompts per benchmark (~13 min)
#   bash scripts/quickstart.sh          # 1000 prompts, 400 steps, 4 prompts per benchmark (~60 min)
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
    *) echo "error: quickstart.sh: unknown option $arg (use --fast or --gpu)" >&2; exit 2 ;;
  esac
done

case "$PROFILE" in
  fast)    D_PROMPTS=64;  D_MAX_TOKENS=256; D_STEPS=40;  D_EVAL_SAMPLES=2; D_MAX_NEW=64 ;;
  default) D_PROMPTS=1000; D_MAX_TOKENS=384; D_STEPS=400; D_EVAL_SAMPLES=4; D_MAX_NEW=128 ;;
  gpu)
    echo "quickstart --gpu: on a GPU node run the documented recipe (README: 'GPU recipe'):"
    echo "  PROFILE=qwen3-4b bash scripts/data/prepare_data.sh"
    echo "  for a in dspark dflash eagle3; do target_cache_dir=out/data/qwen3-4b/target_cache \\"
    echo "      bash scripts/train/train.sh config/\$a/\${a}_qwen3_4b.py; done"
    echo "  target_name_or_path=Qwen/Qwen3-4B draft_name_or_path=~/checkpoints/deepspec/<exp>/step_latest \\"
    echo "      bash scripts/eval/eval.sh"
    exit 0 ;;
esac
# Every profile value can be overridden from the environment (the CI test runs a tiny one).
NUM_PROMPTS=${NUM_PROMPTS:-$D_PROMPTS}
MAX_TOKENS=${MAX_TOKENS:-$D_MAX_TOKENS}
STEPS=${STEPS:-$D_STEPS}
BATCH=${BATCH:-}                  # sequences per optimizer step (default: the config's, 4)
EVAL_SAMPLES=${EVAL_SAMPLES:-$D_EVAL_SAMPLES}
MAX_NEW=${MAX_NEW:-$D_MAX_NEW}
TASKS=${TASKS:-gsm8k,humaneval,mt-bench}
TEMPERATURES=${TEMPERATURES:-1.0 0}
EVAL_DTYPE=${EVAL_DTYPE:-bf16}    # bf16 is this CPU's fast path; fp32 for bit-exact greedy
ALGOS=${ALGOS:-dspark dflash eagle3}
WORK=${WORK:-out/quickstart/$PROFILE}
for var in NUM_PROMPTS MAX_TOKENS STEPS BATCH EVAL_SAMPLES MAX_NEW; do
  val=${!var}
  if [ -n "$val" ] && ! [[ "$val" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: quickstart: $var=$val is not a positive integer (unset it to use the profile's value)" >&2
    exit 2
  fi
done
for temp in $TEMPERATURES; do
  if ! [[ "$temp" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "error: quickstart: TEMPERATURES holds '$temp', not a number >= 0 (e.g. TEMPERATURES=\"1.0 0\")" >&2
    exit 2
  fi
done
start_all=$(date +%s)
stage() { echo; echo "== $* =="; }

stage "1/5 install and resolve the embedded target"
# the default profile regenerates its answers with llama.cpp's native server (built once,
# 10-25 min; 2.4x the Python servers' tokens/s); --fast keeps the Python servers
server_opt=()
[ "$PROFILE" = default ] && [ "${LLAMA_SERVER:-1}" = 1 ] && server_opt=(--llama-server)
bash scripts/setup.sh --llamacpp "${server_opt[@]}"
"$PY" -m deepspec.targets resolve embedded:smollm2-135m-instruct

# prompts: mini.jsonl (400: chat, math, code), then the mixed training set's first file
INPUT=${INPUT:-data/train_prompts/mini.jsonl data/train_prompts/mixed_train_000.jsonl}
stage "2/5 answers + target cache ($NUM_PROMPTS prompts of $INPUT) -> $WORK/data"
WORK_DIR=$WORK/data NUM_PROMPTS=$NUM_PROMPTS MAX_TOKENS=$MAX_TOKENS INPUT=$INPUT \
  CONFIG=config/dspark/dspark_smollm2_135m.py bash scripts/data/prepare_data.sh

stage "3/5 train $ALGOS ($STEPS steps each) -> $WORK/checkpoints"
batch_opts=()
[ -n "$BATCH" ] && batch_opts=("train.global_batch_size=$BATCH" "train.local_batch_size=$BATCH")
for algo in $ALGOS; do
  ck=$WORK/checkpoints/deepspec/${algo}_smollm2_135m
  if [ -f "$ck/step_$STEPS/COMPLETE" ]; then echo "$algo: trained already ($ck/step_$STEPS)"; continue; fi
  t0=$(date +%s)
  # shellcheck disable=SC2086  # TRAIN_OPTS: extra key=value overrides, split on spaces
  "$PY" train.py --config "config/$algo/${algo}_smollm2_135m.py" \
    --opts "data.target_cache_path=$WORK/data/target_cache" "train.max_train_steps=$STEPS" \
    "${batch_opts[@]}" \
    "logging.checkpoint_root=$WORK/checkpoints" "logging.tensorboard_root=$WORK/tensorboard" \
    "logging.checkpointing_steps=$(( STEPS > 4 ? STEPS / 4 : 1 ))" ${TRAIN_OPTS:-}
  echo "$algo: trained in $(( $(date +%s) - t0 ))s -> $ck/step_$STEPS"
done

stage "4/5 evaluate on $TASKS ($EVAL_SAMPLES prompts each, up to $MAX_NEW new tokens, $EVAL_DTYPE), temperature ${TEMPERATURES// /, }"
# plain decoding is measured once per temperature (with the first draft) and reused by the others
runs=()
first=""
for algo in $ALGOS; do
  ck=$WORK/checkpoints/deepspec/${algo}_smollm2_135m/step_$STEPS
  for temp in $TEMPERATURES; do
    out=$WORK/eval/${algo}_t$temp
    reuse=()
    [ -n "$first" ] && reuse=(--baseline-from "$WORK/eval/${first}_t$temp")
    # reuse an evaluation only if it is newer than its checkpoint (and its baseline)
    if [ ! "$out/results.json" -nt "$ck/COMPLETE" ] || \
       { [ -n "$first" ] && [ "$WORK/eval/${first}_t$temp/results.json" -nt "$out/results.json" ]; }; then
      "$PY" eval.py --target_name_or_path embedded:smollm2-135m-instruct --draft_name_or_path "$ck" \
        --tasks "$TASKS" --max-samples "$EVAL_SAMPLES" --max-new-tokens "$MAX_NEW" --temperature "$temp" \
        --dtype "$EVAL_DTYPE" --output-dir "$out" "${reuse[@]}"
    else
      echo "$algo at temperature $temp: evaluated already ($out/results.json)"
    fi
    runs+=(--run "$algo@$temp=$out")
  done
  [ -z "$first" ] && first=$algo
done

stage "5/5 comparison"
"$PY" -m deepspec.eval.report "${runs[@]}" --out "$WORK/report" \
  --title "deepspec quickstart ($PROFILE profile): DSpark vs DFlash vs Eagle3 on SmolLM2-135M-Instruct" \
  --note "Training: $NUM_PROMPTS regenerated conversations, $STEPS steps of ${BATCH:-4} sequences per draft. Evaluation: $EVAL_SAMPLES prompts each of $TASKS, at most $MAX_NEW new tokens; $EVAL_DTYPE; speedup = speculative vs plain target decoding (measured once per temperature, during the first draft's evaluation), CPU."
echo
echo "quickstart ($PROFILE) finished in $(( $(date +%s) - start_all ))s; report: $WORK/report/REPORT.md"
