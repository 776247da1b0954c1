#!/usr/bin/env bash
# Prepare what a GPU machine needs for SmolLM2 work, within a remote-run tool's limits (at most 64 MiB
# travels per call, working tree included; a machine stays warm 30 s after a call).
#
#   bash scripts/gpu_carry.sh            # write .gpu/ and move the checkpoint weights aside
#   bash scripts/gpu_carry.sh --restore  # put the checkpoint weights back (do it as soon as the calls end)
#   bash scripts/gpu_carry.sh --collect FOLDER DEST  # join a delta returned in parts (FOLDER/delta/) into DEST
#
# .gpu/ (git-excluded) gets: p1/gguf.a and p2/gguf.b (the SmolLM2 GGUF in two halves, 47 MiB each),
# whl/ (the gguf wheel: the machine lacks it) and delta/ (the shipped delta). The tracked weights of
# checkpoints/ (60 MB) are moved to .gpu-hold/ so that the working tree is 8 MB. The calls, each within
# 30 s of the last (docs/attention.md, "Carrying SmolLM2 to a GPU"): carry [.gpu/p1, .gpu/whl] and
# keep them outside the repository there (/root/keep: ignored folders beside a carried path do not
# survive the next call); carry [.gpu/p2] to join and prepare; carry [.gpu/delta] to fine-tune.
set -euo pipefail
cd "$(dirname "$0")/.."
HOLD=.gpu-hold
WEIGHTS=(checkpoints/passkey-landmark/model.safetensors checkpoints/smollm2-landmark/delta.safetensors)
# Keep .gpu/ and .gpu-hold/ out of git status (not needed by --collect, which may run outside a clone).
exclude_carried() {
  local exclude
  exclude=$(git rev-parse --git-path info/exclude 2>/dev/null) || return 0
  mkdir -p "$(dirname "$exclude")"
  for ignored in /.gpu/ /.gpu-hold/; do
    grep -qxF "$ignored" "$exclude" 2>/dev/null || echo "$ignored" >>"$exclude"
  done
}
if [ "${1:-}" = "--collect" ]; then
  src="${2:?--collect FOLDER DEST: the returned folder (with delta/) and where the delta goes}"
  dest="${3:?--collect FOLDER DEST: where the joined delta goes}"
  [ -f "$src/delta/delta.json" ] || { echo "gpu_carry: $src/delta/delta.json is missing" >&2; exit 2; }
  [ -e "$dest" ] && { echo "gpu_carry: $dest exists; pick a new folder" >&2; exit 2; }
  mkdir -p "$dest.tmp"
  cp "$src/delta/delta.json" "$dest.tmp/"
  cat "$src"/delta/delta.safetensors.part* >"$dest.tmp/delta.safetensors"
  got=$(sha256sum "$dest.tmp/delta.safetensors" | cut -d' ' -f1)
  if [ "$got" != "$(cat "$src/delta/delta.safetensors.sha256")" ]; then
    rm -rf "$dest.tmp"
    echo "gpu_carry: joined delta sha256 $got does not match the machine's" >&2; exit 1
  fi
  mv "$dest.tmp" "$dest"
  echo "delta joined into $dest (sha256 $got)"
  exit 0
fi
if [ "${1:-}" = "--restore" ]; then
  for f in "${WEIGHTS[@]}"; do
    if [ -f "$HOLD/$f" ]; then mkdir -p "$(dirname "$f")" && mv "$HOLD/$f" "$f"; fi
  done
  git status --short -- checkpoints
  echo "checkpoint weights restored"
  exit 0
fi
exclude_carried
PYTHON=${PYTHON:-.venv/bin/python}
gguf=$("$PYTHON" -c "from landmark.hf.smollm2 import find_gguf; print(find_gguf(install=True))")
size=$(stat -c %s "$gguf")
half=$(((size + 1) / 2))
mkdir -p .gpu/p1 .gpu/p2 .gpu/whl .gpu/delta
head -c "$half" "$gguf" >.gpu/p1/gguf.a
tail -c +"$((half + 1))" "$gguf" >.gpu/p2/gguf.b
sha256sum "$gguf" | cut -d' ' -f1 >.gpu/p2/gguf.sha256
cp checkpoints/smollm2-landmark/delta.json checkpoints/smollm2-landmark/delta.safetensors .gpu/delta/
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .gpu/whl "gguf==$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
for f in "${WEIGHTS[@]}"; do
  if [ -f "$f" ]; then mkdir -p "$HOLD/$(dirname "$f")" && mv "$f" "$HOLD/$f"; fi
done
tree=$( (git ls-files -z | xargs -0 du -cb 2>/dev/null || true) | tail -1 | cut -f1)  # moved files: missing
echo "working tree now $((tree / 1048576)) MiB; .gpu/: $(du -sh .gpu | cut -f1)"
echo "restore the weights after the remote calls: bash scripts/gpu_carry.sh --restore"
