#!/usr/bin/env bash
# Export a trained draft for a serving engine (see README, Serving):
#   bash scripts/serve/export.sh <draft dir> --to llamacpp|vllm|sglang|speculators --out <dir>
# Options are those of python -m deepspec.export (--target, --outtype, --mask-host-id).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
exec "${PYTHON:-python3}" -m deepspec.export "$@"
