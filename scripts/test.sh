#!/usr/bin/env bash
# Install what the tests need (idempotent; the first run compiles llama.cpp and its
# native server for the regeneration and export tests, and puts vLLM and speculators in
# virtualenvs of their own) and run the whole test suite.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k config  # extra arguments go to pytest
# The quick tier alone (no servers, a few minutes): python -m pytest tests/unit (README, Tests).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
bash "$ROOT/scripts/setup.sh" --dev --llamacpp --serving
cd "$ROOT"
# shared 2-core machines: busy-waiting OpenMP threads slow torch several-fold
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec "$PY" -m pytest tests "$@"
