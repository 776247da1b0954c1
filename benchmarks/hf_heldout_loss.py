"""Held-out language-model loss of a Hugging Face model before and after landmark conversion/fine-tuning.

Converting a model (``landmark.hf.convert``) changes every attention layer to the grouped softmax of
landmark attention, with landmark tokens the model has never seen: its loss jumps until fine-tuning
teaches it to use them. This script measures by how much, on the same validation windows of the bundled
books (``--windows`` windows of ``--max-length`` positions, landmarks included, as ``landmark hf
finetune --eval-windows`` cuts them), for each model given:

* ``--base DIR``: the original model, its own causal attention over the same regular tokens (no
  landmarks), and, converted on the spot, the same model with landmark attention before any training;
* ``--landmark DIR`` (repeatable): fine-tuned landmark models (``landmark hf finetune --out``).

Loss: mean cross-entropy per regular token in nats (landmarks are inputs, never targets).

Usage::

    python benchmarks/hf_heldout_loss.py --landmark runs/hf-passkey/smollm2-landmark \\
        --landmark runs/hf-passkey/smollm2-landmark-s5 --windows 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def heldout_loss(model, tokenizer, windows: list, max_length: int) -> float:
    """Mean loss per regular token over ``windows`` (each (raw_tokens,) int64 regular tokens)."""
    import torch

    from landmark.hf.collator import LandmarkCollator

    block_size = getattr(model.config, "landmark_block_size", None)
    collate = LandmarkCollator(tokenizer, int(block_size), max_length) if block_size is not None else None
    total, count = 0.0, 0
    with torch.no_grad():
        for raw in windows:
            if collate is None:
                inputs, targets = raw[:-1], raw[1:]  # (n,)
            else:
                batch = collate([raw])
                inputs, targets = batch["input_ids"][0], batch["shift_labels"][0]
            logits = model(input_ids=inputs[None]).logits[0].float()  # (T, vocab)
            loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((targets != -100).sum())
    return total / count


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import landmark.hf as lhf
    from landmark.hf.collator import regular_tokens_per_window
    from landmark.hf.data import TokenWindows, tokenize_corpus
    from landmark.hf.smollm2 import default_smollm2_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(default_smollm2_dir()), help="the original model folder")
    p.add_argument("--landmark", action="append", default=[], help="a fine-tuned landmark model (repeatable)")
    p.add_argument("--block-size", type=int, default=64, help="block size of the on-the-spot conversion")
    p.add_argument("--max-length", type=int, default=512, help="positions per window, landmarks included")
    p.add_argument("--windows", type=int, default=4, help="validation windows")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON report (default: none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True)
    raw_tokens = regular_tokens_per_window(args.max_length, args.block_size) + 1
    tokens = tokenize_corpus(tokenizer, None, "validation", progress=False)
    windows = [
        TokenWindows(tokens, raw_tokens, limit=args.windows)[i]["input_ids"] for i in range(args.windows)
    ]
    rows = []

    def report(name: str, model, tok) -> None:
        loss = heldout_loss(model.eval(), tok, windows, args.max_length)
        rows.append({"model": name, "loss": loss, "perplexity": math.exp(loss)})
        print(f"{name:60s} loss {loss:.3f}  perplexity {math.exp(loss):8.2f}", flush=True)

    base = AutoModelForCausalLM.from_pretrained(args.base, local_files_only=True)
    report(f"{args.base} (own attention, no landmarks)", base, tokenizer)
    converted, conv_tok = lhf.convert(base, tokenizer, block_size=args.block_size)
    report(f"{args.base} converted, block {args.block_size}, not trained", converted, conv_tok)
    del base, converted
    for path in args.landmark:
        model, tok = lhf.load_pretrained(path)
        report(path, model, tok)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        Path(args.out).write_text(
            json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n", encoding="utf-8"
        )


if __name__ == "__main__":
    main()
