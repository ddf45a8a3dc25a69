#!/usr/bin/env bash
# Serve the embedded target (or any GGUF) with an exported draft on llama.cpp's native
# llama-server, on loopback, with an OpenAI-compatible API.
#   python -m deepspec.export <draft dir> --to llamacpp --out exported/dspark
#   bash scripts/serve/llamacpp.sh --draft exported/dspark/draft.gguf --spec-type draft-dspark --n-max 7
# Options (defaults in brackets):
#   --draft FILE        draft GGUF written by the export (required; "none" serves the target alone)
#   --spec-type TYPE    draft-dspark | draft-eagle3 (the export's manifest says which) [draft-dspark]
#   --n-max N           tokens drafted per round [7]
#   --p-min P           DSpark: stop drafting at a slot whose confidence is below P [0]
#   --target FILE       target GGUF [the embedded SmolLM2 bf16 GGUF from setup.sh --llama-server]
#   --port N [8080]  --threads N [nproc]  --slots N [1]  --ctx N [4096]
#   extra arguments after -- go to llama-server as they are
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
DRAFT="" SPEC_TYPE=draft-dspark N_MAX=7 P_MIN=0 TARGET="" PORT=8080 THREADS=$(nproc) SLOTS=1 CTX=4096
EXTRA=()
die() { echo "error: llamacpp.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --draft) DRAFT=${2:-}; shift 2 ;;
    --spec-type) SPEC_TYPE=${2:-}; shift 2 ;;
    --n-max) N_MAX=${2:-}; shift 2 ;;
    --p-min) P_MIN=${2:-}; shift 2 ;;
    --target) TARGET=${2:-}; shift 2 ;;
    --port) PORT=${2:-}; shift 2 ;;
    --threads) THREADS=${2:-}; shift 2 ;;
    --slots) SLOTS=${2:-}; shift 2 ;;
    --ctx) CTX=${2:-}; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see the header of scripts/serve/llamacpp.sh)" ;;
  esac
done
[ -n "$DRAFT" ] || die "--draft is required (a GGUF from python -m deepspec.export --to llamacpp, or none)"
case "$SPEC_TYPE" in draft-dspark|draft-eagle3|draft-dflash) ;; *) die "--spec-type must be draft-dspark, draft-eagle3 or draft-dflash, not '$SPEC_TYPE'" ;; esac
for v in N_MAX PORT THREADS SLOTS CTX; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a positive integer, not '${!v}'"
done
mapfile -t paths < <(cd "$ROOT" && "$PY" -m deepspec.targets llama-server)
BIN=${paths[0]:-}
[ -x "$BIN" ] || die "llama-server is not built ($BIN); run bash scripts/setup.sh --llama-server"
TARGET=${TARGET:-${paths[1]:-}}
[ -f "$TARGET" ] || die "target GGUF $TARGET does not exist; run bash scripts/setup.sh --llama-server or pass --target"
args=(-m "$TARGET" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -tb "$THREADS" -np "$SLOTS" -c "$CTX" --no-webui)
if [ "$DRAFT" != none ]; then
  [ -f "$DRAFT" ] || die "draft GGUF $DRAFT does not exist; export one with python -m deepspec.export --to llamacpp"
  args+=(-md "$DRAFT" --spec-type "$SPEC_TYPE" --spec-draft-n-max "$N_MAX" --spec-draft-n-min 0
         --spec-draft-p-min "$P_MIN" -td "$THREADS" -tbd "$THREADS")
fi
exec "$BIN" "${args[@]}" "${EXTRA[@]}"
