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
# Runs where you stand: relative --draft and --target paths name files in your current
# directory. Before starting llama-server it checks every option, that both files are GGUF
# files, and that 127.0.0.1:PORT is free; each problem is one "error:" line and exit 2.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-python3}
DRAFT="" SPEC_TYPE=draft-dspark N_MAX=7 P_MIN=0 TARGET="" PORT=8080 THREADS=$(nproc) SLOTS=1 CTX=4096
EXTRA=()
die() { echo "error: llamacpp.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    --draft|--spec-type|--n-max|--p-min|--target|--port|--threads|--slots|--ctx)
      if [ $# -lt 2 ] || [[ "$2" == --* ]]; then
        die "$1 needs a value (see the header of scripts/serve/llamacpp.sh)"
      fi ;;
    *) die "unknown option $1 (see the header of scripts/serve/llamacpp.sh)" ;;
  esac
  case "$1" in
    --draft) DRAFT=$2 ;;
    --spec-type) SPEC_TYPE=$2 ;;
    --n-max) N_MAX=$2 ;;
    --p-min) P_MIN=$2 ;;
    --target) TARGET=$2 ;;
    --port) PORT=$2 ;;
    --threads) THREADS=$2 ;;
    --slots) SLOTS=$2 ;;
    --ctx) CTX=$2 ;;
  esac
  shift 2
done
[ -n "$DRAFT" ] || die "--draft is required (a GGUF from python -m deepspec.export --to llamacpp, or none)"
case "$SPEC_TYPE" in draft-dspark|draft-eagle3|draft-dflash) ;; *) die "--spec-type must be draft-dspark, draft-eagle3 or draft-dflash, not '$SPEC_TYPE'" ;; esac
for v in N_MAX THREADS SLOTS CTX; do
  val=${!v}
  { [[ "$val" =~ ^[1-9][0-9]*$ ]] && [ "${#val}" -le 9 ]; } \
    || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a positive integer, not '$val'"
done
{ [[ "$PORT" =~ ^[1-9][0-9]{0,4}$ ]] && [ "$PORT" -le 65535 ]; } \
  || die "--port must be a positive integer from 1 to 65535, not '$PORT'"
[[ "$P_MIN" =~ ^(0?\.[0-9]+|0(\.[0-9]*)?|1(\.0*)?)$ ]] \
  || die "--p-min must be a number from 0 to 1 (e.g. 0.3), not '$P_MIN'"
mapfile -t paths < <(cd "$ROOT" && "$PY" -m deepspec.targets llama-server)
BIN=${paths[0]:-}
[ -x "$BIN" ] || die "llama-server is not built ($BIN); run bash scripts/setup.sh --llama-server"
TARGET=${TARGET:-${paths[1]:-}}
[ -f "$TARGET" ] || die "target GGUF $TARGET does not exist; run bash scripts/setup.sh --llama-server or pass --target"
if [ "$DRAFT" != none ]; then
  if [ -d "$DRAFT" ]; then
    [ -f "$DRAFT/draft.gguf" ] \
      && die "--draft $DRAFT is the export directory; pass the GGUF inside it: --draft $(printf '%q' "$DRAFT/draft.gguf")"
    die "--draft $DRAFT is a directory, not a GGUF file; export the draft with python -m deepspec.export <draft> --to llamacpp --out DIR and pass DIR/draft.gguf"
  fi
  [ -f "$DRAFT" ] || die "draft GGUF $DRAFT does not exist; export one with python -m deepspec.export --to llamacpp"
fi
# is_gguf FILE: a readable file that starts with the GGUF magic (NUL bytes dropped before bash)
is_gguf() { [ -r "$1" ] && [ "$(head -c 4 -- "$1" 2>/dev/null | tr -d '\0')" = GGUF ]; }
is_gguf "$TARGET" || die "--target $TARGET is not a GGUF file (it does not start with 'GGUF'); pass the target's GGUF (llama.cpp's convert_hf_to_gguf.py writes one) or leave --target out for the embedded target"
if [ "$DRAFT" != none ]; then
  is_gguf "$DRAFT" || die "--draft $DRAFT is not a GGUF file (it does not start with 'GGUF'); pass the draft.gguf written by python -m deepspec.export <draft> --to llamacpp --out DIR"
fi
# the port must be free: llama-server would otherwise fail after loading both models
why=$(cd "$ROOT" && "$PY" -m deepspec.utils.ports 127.0.0.1 "$PORT" 2>&1) || {
  case "$why" in
    taken*) die "port $PORT on 127.0.0.1 is already in use (another server?): stop that process or choose another --port" ;;
    *) die "cannot listen on 127.0.0.1:$PORT (${why#other }): choose another --port" ;;
  esac
}
args=(-m "$TARGET" --host 127.0.0.1 --port "$PORT" -t "$THREADS" -tb "$THREADS" -np "$SLOTS" -c "$CTX" --no-webui)
if [ "$DRAFT" != none ]; then
  args+=(-md "$DRAFT" --spec-type "$SPEC_TYPE" --spec-draft-n-max "$N_MAX" --spec-draft-n-min 0
         --spec-draft-p-min "$P_MIN" -td "$THREADS" -tbd "$THREADS")
fi
exec "$BIN" "${args[@]}" "${EXTRA[@]}"
