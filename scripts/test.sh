#!/usr/bin/env bash
# Install what the tests need (idempotent) and run the whole test suite.
#   bash scripts/test.sh            # everything
#   bash scripts/test.sh -k config  # extra arguments go to pytest
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
bash "$ROOT/scripts/setup.sh" --dev
cd "$ROOT"
exec "$PY" -m pytest tests "$@"
