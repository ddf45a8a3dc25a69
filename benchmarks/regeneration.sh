#!/usr/bin/env bash
# Completion tokens/s of each answer-regeneration backend on this machine, on the same
# prompts (the first N of a prompt file), sampled at temperature 0.8, up to 384 new tokens:
#
#   bash benchmarks/regeneration.sh                 # 64 prompts of data/train_prompts/mini.jsonl
#   N=128 BACKENDS="llama-server:16 hf:32" bash benchmarks/regeneration.sh
#
# BACKENDS: space-separated ENGINE:WIDTH, with WIDTH = parallel slots per server
# (llama-server: one single-threaded server per core), servers of one thread each
# (llamacpp, the Python server) or batch size (hf, transformers in-process). Each line
# printed is generate_train_data.py's summary of one backend.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
N=${N:-64}
INPUT=${INPUT:-data/train_prompts/mini.jsonl}
MAX_TOKENS=${MAX_TOKENS:-384}
BACKENDS=${BACKENDS:-"llamacpp:2 hf:32 hf:64 llama-server:4 llama-server:8 llama-server:16"}
PORT=${PORT:-$("$PY" -c "from deepspec.utils.distributed import find_free_port; print(find_free_port())")}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

"$PY" scripts/data/download_and_split.py --input "$INPUT" --name bench --max-rows "$N" --test-size 0 \
  --output-dir "$WORK/prompts" --eval-dir "$WORK/eval" >/dev/null
for backend in $BACKENDS; do
  engine=${backend%%:*}
  width=${backend##*:}
  out="$WORK/$engine-$width.jsonl"
  common=(--input-file-path "$WORK/prompts/train.jsonl" --output-file-path "$out" --max-tokens "$MAX_TOKENS"
    --temperature 0.8 --no-progress)
  case "$engine" in
    hf)
      line=$("$PY" scripts/data/generate_train_data.py --engine hf --model embedded:smollm2-135m-instruct \
        --batch-size "$width" --concurrency "$N" "${common[@]}" 2>&1 | grep 'regeneration:')
      ;;
    llamacpp|llama-server)
      workers=$width slots=1 slot_opts=()  # llamacpp: WIDTH single-request servers
      if [ "$engine" = llama-server ]; then workers=$(nproc) slots=$width slot_opts=(--slots "$width"); fi
      addresses=()
      for ((i = 0; i < workers; i++)); do addresses+=("127.0.0.1:$((PORT + i))"); done
      bash scripts/data/launch_server.sh --engine "$engine" --base-port "$PORT" --log-dir "$WORK/logs-$engine" \
        --num-workers "$workers" --threads 1 "${slot_opts[@]}" >/dev/null
      line=$("$PY" scripts/data/generate_train_data.py --server-address "${addresses[@]}" \
        --concurrency $((workers * slots)) "${common[@]}" 2>&1 | grep 'regeneration:') || true
      bash scripts/data/launch_server.sh --engine "$engine" --log-dir "$WORK/logs-$engine" --stop >/dev/null
      ;;
    *) echo "error: unknown backend $backend (hf:B, llamacpp:N, llama-server:SLOTS)" >&2; exit 2 ;;
  esac
  echo "$engine:$width  $line"
done
