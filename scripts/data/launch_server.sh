#!/usr/bin/env bash
# Start N inference-engine workers with an OpenAI-compatible API on ports BASE..BASE+N-1,
# wait until each answers /v1/models, and print their addresses and how to stop them.
#
# CPU, llama.cpp serving the embedded SmolLM2 GGUF (the engine that runs on CPU machines):
#   bash scripts/data/launch_server.sh --engine llamacpp --num-workers 1 --base-port 30000
#   bash scripts/data/launch_server.sh --engine llamacpp --model /path/to/any.gguf
# CPU, llama.cpp's native llama-server (bash scripts/setup.sh --llama-server): one
# single-threaded worker per core, 16 parallel slots each with continuous batching (~300
# completion tokens/s on 2 cores, 2.4x the Python servers; benchmarks/README.md):
#   bash scripts/data/launch_server.sh --engine llama-server --num-workers 2 --threads 1 --slots 16
# One node of GPUs, one SGLang (or vLLM) worker per GPU, or --tp GPUs per worker:
#   bash scripts/data/launch_server.sh --engine sglang --model Qwen/Qwen3-4B --num-workers 8
#   bash scripts/data/launch_server.sh --engine vllm --model Qwen/Qwen3-4B --num-workers 4 --tp 2
# Several nodes: run it on each node (add --host 0.0.0.0) and pass every HOST:PORT to
# generate_train_data.py --server-address.
# Stop the workers started with the same --engine/--model/--log-dir:
#   bash scripts/data/launch_server.sh --engine llamacpp --stop
#
# Options:
#   --engine sglang|vllm|llamacpp|llama-server   (default: llamacpp)
#   --model M        HF id or directory (sglang/vllm); GGUF file or
#                    embedded:smollm2-135m-instruct (llamacpp, llama-server: the default;
#                    llama-server serves setup.sh's bf16 GGUF of it)
#   --slots S        llama-server parallel slots per worker (default 16)
#   --num-workers N  (default 1)      --base-port P (default 30000)   --host H (default 127.0.0.1)
#   --tp G           GPUs per sglang/vllm worker (default 1); worker i gets GPUs i*G..i*G+G-1
#   --threads T      llama.cpp threads per worker (default: cores / workers)
#   --ctx C          llama.cpp context size (default 4096)
#   --log-dir D      default logs/<engine>_<model basename>
#   --wait S         seconds to wait for the workers (default 600)
#   --stop           stop the workers recorded in <log-dir>/pids
#   --extra "ARGS"   more arguments for the engine
# Before starting anything it checks every port BASE..BASE+N-1 is free (a port taken by
# another server would otherwise answer the readiness probe for a worker that died); after
# the probe it checks each worker is still alive and serves the model it was given.
# Every problem is one "error: ..." line on stderr and a non-zero exit.
set -euo pipefail

PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
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
SLOTS=16

die() {  # die CODE MESSAGE: one error line, non-zero exit
  echo "error: $2" >&2
  exit "$1"
}
# need_int NAME VALUE LOW HIGH: an integer in [LOW, HIGH], else one error line
need_int() {
  if ! [[ "$2" =~ ^(0|[1-9][0-9]*)$ ]] || [ "${#2}" -gt 9 ] || [ "$2" -lt "$3" ] || [ "$2" -gt "$4" ]; then
    die 2 "$1 must be an integer from $3 to $4, got '$2'"
  fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --stop) STOP=1; shift; continue ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    --engine|--model|--num-workers|--base-port|--host|--tp|--threads|--ctx|--log-dir|--wait|--extra|--slots)
      [ $# -ge 2 ] || die 2 "$1 needs a value (see --help)" ;;
    *) die 2 "unknown option '$1' (see --help)" ;;
  esac
  case "$1" in
    --engine) ENGINE=$2 ;;
    --model) MODEL=$2 ;;
    --num-workers) NUM=$2 ;;
    --base-port) BASE=$2 ;;
    --host) HOST=$2 ;;
    --tp) TP=$2 ;;
    --threads) THREADS=$2 ;;
    --slots) SLOTS=$2 ;;
    --ctx) CTX=$2 ;;
    --log-dir) LOG_DIR=$2 ;;
    --wait) WAIT=$2 ;;
    --extra) EXTRA=$2 ;;
  esac
  shift 2
done

case "$ENGINE" in
  llamacpp|llama-server) [ -n "$MODEL" ] || MODEL=embedded:smollm2-135m-instruct ;;
  sglang|vllm) [ -n "$MODEL" ] || die 2 "--engine $ENGINE needs --model (an HF id or directory)" ;;
  *) die 2 "unknown --engine '$ENGINE' (choose sglang, vllm, llamacpp or llama-server)" ;;
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

need_int --num-workers "$NUM" 1 1024
need_int --base-port "$BASE" 1 65535
[ $((BASE + NUM - 1)) -le 65535 ] || die 2 "--base-port $BASE with --num-workers $NUM needs ports up to $((BASE + NUM - 1)), past 65535; choose a lower --base-port"
need_int --tp "$TP" 1 1024
[ -z "$THREADS" ] || need_int --threads "$THREADS" 1 4096
need_int --ctx "$CTX" 16 10000000
need_int --slots "$SLOTS" 1 4096
need_int --wait "$WAIT" 1 604800
[ -n "$HOST" ] || die 2 "--host is empty (use 127.0.0.1, or 0.0.0.0 to serve other machines)"

if [ -f "$PIDS" ]; then
  while read -r pid; do
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      die 1 "workers from $PIDS are still running (pid $pid); stop them first with --stop"
    fi
  done < "$PIDS"
fi

# Every port must be free: a server already there would answer the readiness probe.
for ((i = 0; i < NUM; i++)); do
  port=$((BASE + i))
  why=$(cd "$ROOT" && "$PY" -m deepspec.utils.ports "$HOST" "$port" 2>&1) || {
    case "$why" in
      taken*) die 1 "port $port on $HOST is already in use (another server?): stop that process or choose another --base-port" ;;
      *) die 1 "cannot listen on $HOST:$port (${why#other }): check --host and --base-port" ;;
    esac
  }
done

if [ "$ENGINE" = llamacpp ] || [ "$ENGINE" = llama-server ]; then
  GGUF=$MODEL
  if [ "$ENGINE" = llamacpp ]; then
    "$PY" -c "import llama_cpp.server" 2>/dev/null \
      || die 1 "llama-cpp-python[server] is not installed; run bash scripts/setup.sh --llamacpp"
    if [[ "$MODEL" == embedded:* ]]; then  # the GGUF the package ships
      GGUF=$("$PY" -c "import sys; from deepspec.targets import embedded_gguf_path; print(embedded_gguf_path(sys.argv[1]))" "${MODEL#embedded:}" 2>/dev/null) \
        || die 2 "unknown embedded model '$MODEL' (the embedded one is embedded:smollm2-135m-instruct)"
    fi
  else
    embedded=embedded:smollm2-135m-instruct
    [[ "$MODEL" == embedded:* ]] && embedded=$MODEL
    mapfile -t paths < <("$PY" -m deepspec.targets llama-server "$embedded" 2>/dev/null) \
      && [ "${#paths[@]}" = 2 ] || die 2 "unknown embedded model '$MODEL' (the embedded one is embedded:smollm2-135m-instruct)"
    LLAMA_SERVER_BIN=${paths[0]}
    [ -x "$LLAMA_SERVER_BIN" ] || die 1 "llama-server is not built ($LLAMA_SERVER_BIN); run bash scripts/setup.sh --llama-server (or set LLAMA_SERVER_BIN)"
    if [[ "$MODEL" == embedded:* ]]; then  # the bf16 GGUF setup.sh converted
      GGUF=${paths[1]}
      [ -f "$GGUF" ] || die 1 "no GGUF of the embedded target at $GGUF; run bash scripts/setup.sh --llama-server"
    fi
  fi
  [ -f "$GGUF" ] || die 2 "GGUF file not found: $GGUF (check --model)"
  cores=$(nproc)
  THREADS=${THREADS:-$(( cores / NUM > 0 ? cores / NUM : 1 ))}
  SERVED=$GGUF
else
  SERVED=$MODEL
fi

mkdir -p "$LOG_DIR" 2>/dev/null || die 1 "cannot create the log directory $LOG_DIR; choose a writable --log-dir"
: > "$PIDS" 2>/dev/null || die 1 "cannot write $PIDS; choose a writable --log-dir"

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
    llama-server)
      # one KV pool of SLOTS x CTX tokens, shared by the slots (continuous batching)
      # shellcheck disable=SC2086
      $DETACH nohup "$LLAMA_SERVER_BIN" -m "$GGUF" --host "$HOST" --port "$port" -np "$SLOTS" \
        -c $((SLOTS * CTX)) -t "$THREADS" -tb "$THREADS" --no-webui $EXTRA > "$log" 2>&1 &
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
[ "$probe_host" = "::" ] && probe_host=::1
[[ "$probe_host" == *:* ]] && probe_host="[$probe_host]"
stop_all() {
  bash "${BASH_SOURCE[0]}" --engine "$ENGINE" --model "$MODEL" --log-dir "$LOG_DIR" --stop >/dev/null 2>&1 || true
}
show_log() {  # the worker log's last lines, indented so that none reads as our own error line
  tail -n 20 "$1" 2>/dev/null | sed 's/^/  | /' >&2 || true
}
# probe URL EXPECTED: 0 = answers and lists EXPECTED (by file/base name; any model when
# EXPECTED is empty), 3 = answers with another model (printed), 1 = no answer yet
probe() {
  "$PY" - "$1" "$2" <<'PYEOF'
import json, os, sys, urllib.request
url, expected = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(url, timeout=2) as response:
        ids = [str(m.get("id")) for m in json.load(response).get("data", [])]
except Exception:
    sys.exit(1)
def key(name):
    base = os.path.basename(name.rstrip("/"))
    return base[:-5] if base.lower().endswith(".gguf") else base
if expected and not any(i == expected or key(i) == key(expected) for i in ids):
    print(ids[0] if ids else "no model")
    sys.exit(3)
PYEOF
}
expected=$SERVED
[ -n "$EXTRA" ] && expected=""  # --extra may rename the served model
deadline=$(( $(date +%s) + WAIT ))
mapfile -t pids < "$PIDS"
for ((i = 0; i < NUM; i++)); do
  pid=${pids[$i]}
  port=$((BASE + i))
  while true; do
    rc=0
    other=$(probe "http://$probe_host:$port/v1/models" "$expected") || rc=$?
    if ! kill -0 "$pid" 2>/dev/null; then
      # checked after the probe too: a probe answered by someone else must not count
      echo "error: worker $i (port $port) exited; its log $LOG_DIR/worker_$i.log ends with the lines below" >&2
      show_log "$LOG_DIR/worker_$i.log"
      stop_all
      exit 1
    fi
    if [ "$rc" = 0 ]; then
      break
    elif [ "$rc" = 3 ]; then
      stop_all
      die 1 "port $port answers with model '$other', not $SERVED: another server holds the port; stop it or choose another --base-port"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      stop_all
      die 1 "worker $i (port $port) not ready after ${WAIT}s; see $LOG_DIR/worker_$i.log (or raise --wait)"
    fi
    sleep 1
  done
done

echo "ready: $NUM $ENGINE worker(s) for $MODEL (logs in $LOG_DIR)"
echo "  --server-address ${addresses[*]}"
# the stop command, runnable where you stand: every word quoted for the shell (paths with spaces)
q() { printf '%q' "$1"; }
echo "stop: bash $(q "${BASH_SOURCE[0]}") --engine $(q "$ENGINE") --model $(q "$MODEL") --log-dir $(q "$LOG_DIR") --stop"
