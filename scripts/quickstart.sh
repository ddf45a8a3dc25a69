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
# Outputs: the repository's out/quickstart/<profile>/ (data/, checkpoints/, eval/,
# report/REPORT.md), wherever you run it from.
#
# Every profile value can be overridden from the environment: NUM_PROMPTS, MAX_TOKENS, STEPS,
# BATCH, EVAL_SAMPLES, MAX_NEW (positive integers), ALGOS (dspark, dflash, eagle3),
# TASKS (eval_datasets/ names), TEMPERATURES (numbers >= 0) -- lists separated by commas
# and/or spaces --, EVAL_DTYPE (auto|bf16|fp32), INPUT (prompt files, separated by spaces or
# newlines), WORK (output directory), TRAIN_OPTS (extra key=value config overrides).
# All of them are checked before the first stage. The script does not change directory:
# relative paths in WORK, INPUT and TRAIN_OPTS name places where you stand.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
trap 'echo; echo "quickstart: interrupted; run the same command again to continue"; exit 130' INT TERM

PROFILE=default
for arg in "$@"; do
  case "$arg" in
    --fast) PROFILE=fast ;;
    --gpu) PROFILE=gpu ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
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
die() { echo "error: quickstart: $*" >&2; exit 2; }
# split_list NAME VALUE: the items of a list separated by commas and/or whitespace -> LIST
split_list() {
  local IFS=$', \t\n' raw item
  read -r -d '' -a raw <<< "$2" || true
  LIST=()
  for item in "${raw[@]}"; do [ -n "$item" ] && LIST+=("$item"); done
  [ "${#LIST[@]}" -gt 0 ] || die "$1 is empty; list at least one item (unset it to use the profile's value)"
}
# no_repeats NAME ITEM...: each item once
no_repeats() {
  local name=$1 seen=" " item
  shift
  for item in "$@"; do
    [[ "$seen" == *" $item "* ]] && die "$name lists '$item' twice; name each once"
    seen+="$item "
  done
  return 0
}
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
WORK=${WORK:-$ROOT/out/quickstart/$PROFILE}
for var in NUM_PROMPTS MAX_TOKENS STEPS BATCH EVAL_SAMPLES MAX_NEW; do
  val=${!var}
  if [ -n "$val" ] && { ! [[ "$val" =~ ^[1-9][0-9]*$ ]] || [ "${#val}" -gt 9 ]; }; then
    die "$var=$val is not a positive integer (unset it to use the profile's value)"
  fi
done
split_list ALGOS "$ALGOS"
algos=("${LIST[@]}")
for algo in "${algos[@]}"; do
  case "$algo" in
    dspark|dflash|eagle3) ;;
    *) die "ALGOS holds '$algo'; choose from dspark, dflash, eagle3 (e.g. ALGOS=dspark,eagle3)" ;;
  esac
  [ -f "$ROOT/config/$algo/${algo}_smollm2_135m.py" ] \
    || die "config file $ROOT/config/$algo/${algo}_smollm2_135m.py is missing; restore it (git checkout config/)"
done
no_repeats ALGOS "${algos[@]}"
split_list TASKS "$TASKS"
tasks=("${LIST[@]}")
known_tasks=()
for f in "$ROOT"/eval_datasets/*.jsonl; do [ -f "$f" ] && known_tasks+=("$(basename "$f" .jsonl)"); done
for task in "${tasks[@]}"; do
  [[ " ${known_tasks[*]} " == *" $task "* ]] \
    || die "TASKS holds '$task', not an eval dataset; choose from ${known_tasks[*]} (e.g. TASKS=gsm8k,mt-bench)"
done
no_repeats TASKS "${tasks[@]}"
TASKS=$(IFS=,; echo "${tasks[*]}")
split_list TEMPERATURES "$TEMPERATURES"
temps=("${LIST[@]}")
for temp in "${temps[@]}"; do
  [[ "$temp" =~ ^([0-9]+(\.[0-9]*)?|\.[0-9]+)$ ]] && [ "${#temp}" -le 12 ] \
    || die "TEMPERATURES holds '$temp', not a number >= 0 (e.g. TEMPERATURES=\"1.0 0\")"
done
no_repeats TEMPERATURES "${temps[@]}"
case "$EVAL_DTYPE" in
  auto|bf16|fp32) ;;
  *) die "EVAL_DTYPE=$EVAL_DTYPE; choose auto, bf16 or fp32" ;;
esac
if [ -n "${INPUT:-}" ]; then  # prompt files: newline-separated when INPUT holds a newline
  if [[ "$INPUT" == *$'\n'* ]]; then
    mapfile -t inputs < <(printf '%s\n' "$INPUT" | sed '/^[[:space:]]*$/d')
  else
    read -r -a inputs <<< "$INPUT"
  fi
  [ "${#inputs[@]}" -gt 0 ] || die "INPUT names no prompt file (unset it to use the profile's prompts)"
  for f in "${inputs[@]}"; do
    [ -f "$f" ] || die "INPUT names $f, which is not a file (paths are relative to $PWD)"
  done
else
  inputs=("$ROOT/data/train_prompts/mini.jsonl" "$ROOT/data/train_prompts/mixed_train_000.jsonl")
fi
INPUT=$(printf '%s\n' "${inputs[@]}")
[ -n "$WORK" ] || die "WORK is empty; name an output directory"
[ ! -e "$WORK" ] || [ -d "$WORK" ] || die "WORK=$WORK is a file, not a directory; choose another output directory"
train_opts=()
[ -n "${TRAIN_OPTS:-}" ] && read -r -a train_opts <<< "$TRAIN_OPTS"
for opt in "${train_opts[@]}"; do
  [[ "$opt" =~ ^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=. ]] \
    || die "TRAIN_OPTS holds '$opt', not a key=value config override (e.g. TRAIN_OPTS=\"train.lr=3e-4 logging.logging_steps=1\")"
done
# the overrides against every config (skipped before setup.sh installed deepspec's requirements)
if [ "${#train_opts[@]}" -gt 0 ]; then
  why=$(ALGOS="${algos[*]}" "$PY" - "$ROOT" "${train_opts[@]}" 2>&1 <<'PYEOF'
import os, sys
try:
    from deepspec.config import load_config
    from deepspec.errors import DeepSpecError
except ImportError:
    sys.exit(0)
root, opts = sys.argv[1], sys.argv[2:]
for algo in os.environ["ALGOS"].split():
    try:
        load_config(os.path.join(root, "config", algo, f"{algo}_smollm2_135m.py"), opts)
    except DeepSpecError as exc:
        print(" ".join(str(exc).split()))
        sys.exit(1)
PYEOF
  ) || die "TRAIN_OPTS: ${why:-cannot be checked}"
fi
start_all=$(date +%s)
stage() { echo; echo "== $* =="; }

stage "1/5 install and resolve the embedded target"
# the default profile regenerates its answers with llama.cpp's native server (built once,
# 10-25 min; 2.4x the Python servers' tokens/s); --fast keeps the Python servers
server_opt=()
[ "$PROFILE" = default ] && [ "${LLAMA_SERVER:-1}" = 1 ] && server_opt=(--llama-server)
bash "$ROOT/scripts/setup.sh" --llamacpp "${server_opt[@]}"
"$PY" -m deepspec.targets resolve embedded:smollm2-135m-instruct

# prompts (default): mini.jsonl (400: chat, math, code), then the mixed training set's first file
stage "2/5 answers + target cache ($NUM_PROMPTS prompts of ${inputs[*]}) -> $WORK/data"
WORK_DIR=$WORK/data NUM_PROMPTS=$NUM_PROMPTS MAX_TOKENS=$MAX_TOKENS INPUT=$INPUT \
  CONFIG="$ROOT/config/dspark/dspark_smollm2_135m.py" bash "$ROOT/scripts/data/prepare_data.sh"

stage "3/5 train ${algos[*]} ($STEPS steps each) -> $WORK/checkpoints"
batch_opts=()
[ -n "$BATCH" ] && batch_opts=("train.global_batch_size=$BATCH" "train.local_batch_size=$BATCH")
for algo in "${algos[@]}"; do
  ck=$WORK/checkpoints/deepspec/${algo}_smollm2_135m
  if [ -f "$ck/step_$STEPS/COMPLETE" ]; then echo "$algo: trained already ($ck/step_$STEPS)"; continue; fi
  t0=$(date +%s)
  "$PY" "$ROOT/train.py" --config "$ROOT/config/$algo/${algo}_smollm2_135m.py" \
    --opts "data.target_cache_path=$WORK/data/target_cache" "train.max_train_steps=$STEPS" \
    "${batch_opts[@]}" \
    "logging.checkpoint_root=$WORK/checkpoints" "logging.tensorboard_root=$WORK/tensorboard" \
    "logging.checkpointing_steps=$(( STEPS > 4 ? STEPS / 4 : 1 ))" "${train_opts[@]}"
  echo "$algo: trained in $(( $(date +%s) - t0 ))s -> $ck/step_$STEPS"
done

stage "4/5 evaluate on $TASKS ($EVAL_SAMPLES prompts each, up to $MAX_NEW new tokens, $EVAL_DTYPE), temperature $(IFS=,; echo "${temps[*]}" | sed 's/,/, /g')"
# plain decoding is measured once per temperature (with the first draft) and reused by the others
runs=()
first=""
for algo in "${algos[@]}"; do
  ck=$WORK/checkpoints/deepspec/${algo}_smollm2_135m/step_$STEPS
  for temp in "${temps[@]}"; do
    out=$WORK/eval/${algo}_t$temp
    reuse=()
    [ -n "$first" ] && reuse=(--baseline-from "$WORK/eval/${first}_t$temp")
    # reuse an evaluation only if it is newer than its checkpoint (and its baseline)
    if [ ! "$out/results.json" -nt "$ck/COMPLETE" ] || \
       { [ -n "$first" ] && [ "$WORK/eval/${first}_t$temp/results.json" -nt "$out/results.json" ]; }; then
      "$PY" "$ROOT/eval.py" --eval-datasets-dir "$ROOT/eval_datasets" \
        --target_name_or_path embedded:smollm2-135m-instruct --draft_name_or_path "$ck" \
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
