#!/usr/bin/env bash
# Export a trained draft for a serving engine (see docs/serving.md):
#   bash scripts/serve/export.sh <draft dir> --to llamacpp|vllm|sglang|speculators --out <dir>
# Options are those of python -m deepspec.export (--target, --outtype, --mask-host-id).
# Runs where you stand: a relative <draft dir>, --out or --target names a path in your
# current directory, never one inside this checkout (the repository is put on PYTHONPATH).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m deepspec.export "$@"
