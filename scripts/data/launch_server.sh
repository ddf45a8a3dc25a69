#!/usr/bin/env bash
# Start N inference-engine workers with an OpenAI-compatible API on ports BASE..BASE+N-1,
# wait until each answers /v1/models, and print their addresses and how to stop them.
#
# CPU, llama.cpp serving the embedded SmolLM2 GGUF (the engine that runs on CPU machines):
#   bash scripts/data/launch_server.sh --engine llamacpp --num-workers 1 --base-port 30000
#   bash scripts/data/launch_server.sh --engine llamacpp --model /path/to/any.gguf
# One node of GPUs, one SGLang (or vLLM) worker per GPU, or --tp GPUs per worker:
#   bash scripts/data/launch_server.sh --engine sglang --model Qwen/Qwen3-4B --num-workers 8
#   bash scripts/data/launch_server.sh --engine vllm --model Qwen/Qwen3-4B --num-workers 4 --tp 2
# Several nodes: run it on each node (add --host 0.0.0.0) and pass every HOST:PORT to
# generate_train_data.py --server-address.
# Stop the workers started with the same --engine/--model/--log-dir:
#   bash scripts/data/launch_server.sh --engine llamacpp --stop
#
# Options:
#   --engine sglang|vllm|llamacpp   (default: llamacpp)
#   --model M        HF id or directory (sglang/vllm); GGUF file or
#                    embedded:smollm2-135m-instruct (llamacpp, the default)
#   --num-workers N  (default 1)      --base-port P (default 30000)   --host H (default 127.0.0.1)
#   --tp G           GPUs per sglang/vllm worker (default 1); worker i gets GPUs i*G..i*G+G-1
#   --threads T      llama.cpp threads per worker (default: cores / workers)
#   --ctx C          llama.cpp context size (default 4096)
#   --log-dir D      default logs/<engine>_<model basename>
#   --wait S         seconds to wait for the workers (default 600)
#   --stop           stop the workers recorded in <log-dir>/pids
#   --extra "ARGS"   more arguments for the engine
set -euo pipefail

PY=${PYTHON:-python3}
ENGINE=llamacpp
MODEL=""
NUM=1
BASE=30000
HOST=127.0.0.1
TP=1
THREADS=""
CTX=4096
LOG_DIR=""
WAIT=600
STOP=0
EXTRA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --engine) ENGINE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --num-workers) NUM=$2; shift 2 ;;
    --base-port) BASE=$2; shift 2 ;;
    --host) HOST=$2; shift 2 ;;
    --tp) TP=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --ctx) CTX=$2; shift 2 ;;
    --log-dir) LOG_DIR=$2; shift 2 ;;
    --wait) WAIT=$2; shift 2 ;;
    --stop) STOP=1; shift ;;
    --extra) EXTRA=$2; shift 2 ;;
    -h|--help) sed -n '2,31p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "launch_server.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$ENGINE" in
  llamacpp) [ -n "$MODEL" ] || MODEL=embedded:smollm2-135m-instruct ;;
  sglang|vllm) [ -n "$MODEL" ] || { echo "launch_server.sh: --engine $ENGINE needs --model" >&2; exit 2; } ;;
  *) echo "launch_server.sh: unknown engine '$ENGINE' (sglang, vllm, llamacpp)" >&2; exit 2 ;;
esac
name=$(basename "${MODEL#embedded:}")
name=${name%.gguf}
LOG_DIR=${LOG_DIR:-logs/${ENGINE}_${name}}
PIDS="$LOG_DIR/pids"

if [ "$STOP" = 1 ]; then
  [ -f "$PIDS" ] || { echo "launch_server.sh: no $PIDS; nothing to stop"; exit 0; }
  while read -r pid; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && echo "stopped worker pid $pid" || true
  done < "$PIDS"
  rm -f "$PIDS"
  exit 0
fi

mkdir -p "$LOG_DIR"
if [ -f "$PIDS" ]; then
  while read -r pid; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      echo "launch_server.sh: workers from $PIDS are still running (pid $pid); stop them first with --stop" >&2
      exit 1
    fi
  done < "$PIDS"
fi
: > "$PIDS"

if [ "$ENGINE" = llamacpp ]; then
  "$PY" -c "import llama_cpp.server" 2>/dev/null || {
    echo "launch_server.sh: llama-cpp-python[server] is not installed; run bash scripts/setup.sh --llamacpp" >&2
    exit 1
  }
  if [[ "$MODEL" == embedded:* ]]; then
    GGUF=$("$PY" -c "import sys; from deepspec.targets import embedded_gguf_path; print(embedded_gguf_path(sys.argv[1]))" "${MODEL#embedded:}")
  else
    GGUF=$MODEL
  fi
  [ -f "$GGUF" ] || { echo "launch_server.sh: GGUF file not found: $GGUF" >&2; exit 1; }
  cores=$(nproc)
  THREADS=${THREADS:-$(( cores / NUM > 0 ? cores / NUM : 1 ))}
fi

# Workers get their own session, so closing this terminal does not stop them.
DETACH=""
command -v setsid >/dev/null && DETACH=setsid
addresses=()
for ((i = 0; i < NUM; i++)); do
  port=$((BASE + i))
  log="$LOG_DIR/worker_$i.log"
  gpus=$(seq -s, $((i * TP)) $((i * TP + TP - 1)))
  case "$ENGINE" in
    llamacpp)
      # shellcheck disable=SC2086
      $DETACH nohup "$PY" -m llama_cpp.server --model "$GGUF" --host "$HOST" --port "$port" \
        --n_ctx "$CTX" --n_threads "$THREADS" --n_threads_batch "$THREADS" $EXTRA > "$log" 2>&1 &
      ;;
    sglang)
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$gpus $DETACH nohup "$PY" -m sglang.launch_server --model-path "$MODEL" \
        --host "$HOST" --port "$port" --tp-size "$TP" $EXTRA > "$log" 2>&1 &
      ;;
    vllm)
      # shellcheck disable=SC2086
      CUDA_VISIBLE_DEVICES=$gpus $DETACH nohup "$PY" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
        --host "$HOST" --port "$port" --tensor-parallel-size "$TP" $EXTRA > "$log" 2>&1 &
      ;;
  esac
  echo $! >> "$PIDS"
  addresses+=("$HOST:$port")
done

# Wait until every worker lists its models, or one of them dies.
probe_host=$HOST
[ "$probe_host" = 0.0.0.0 ] && probe_host=127.0.0.1
deadline=$(( $(date +%s) + WAIT ))
mapfile -t pids < "$PIDS"
for ((i = 0; i < NUM; i++)); do
  pid=${pids[$i]}
  port=$((BASE + i))
  until "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" \
      "http://$probe_host:$port/v1/models" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "launch_server.sh: worker $i (port $port) exited; last lines of $LOG_DIR/worker_$i.log:" >&2
      tail -n 20 "$LOG_DIR/worker_$i.log" >&2
      bash "${BASH_SOURCE[0]}" --engine "$ENGINE" --model "$MODEL" --log-dir "$LOG_DIR" --stop >/dev/null
      exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "launch_server.sh: worker $i (port $port) not ready after ${WAIT}s; see $LOG_DIR/worker_$i.log" >&2
      bash "${BASH_SOURCE[0]}" --engine "$ENGINE" --model "$MODEL" --log-dir "$LOG_DIR" --stop >/dev/null
      exit 1
    fi
    sleep 1
  done
done

echo "ready: $NUM $ENGINE worker(s) for $MODEL (logs in $LOG_DIR)"
echo "  --server-address ${addresses[*]}"
echo "stop: bash scripts/data/launch_server.sh --engine $ENGINE --model $MODEL --log-dir $LOG_DIR --stop"
