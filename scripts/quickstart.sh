#!/usr/bin/env bash
# deepspec's main job on the embedded default target (SmolLM2-135M-Instruct, on CPU).
#
# Installs what is missing, resolves the embedded target (converted once to an HF
# directory under ~/.cache/deepspec/targets) and chats with it for one prompt. The later
# pipeline stages (answer regeneration, target cache, training, evaluation) are added to
# this script as they land.
#
#   bash scripts/quickstart.sh ["your prompt"]
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
PROMPT=${1:-"Give me three tips for staying healthy."}
echo "== 1/1 resolve the embedded target and chat with it"
"$PY" -m deepspec.targets chat embedded:smollm2-135m-instruct "$PROMPT" --max-new-tokens 128
