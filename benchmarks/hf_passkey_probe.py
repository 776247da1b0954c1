"""Teacher-forced passkey probe for Hugging Face models: the loss on the key after the question.

``landmark eval passkey --model NAME=hf:FOLDER`` answers right or wrong, and a trial at 8k tokens takes
minutes. This probe builds the same prompts (the paper's task, the same seeded keys:
:func:`landmark.eval.passkey.cell_keys`), appends the expected answer (`` 48213.``) and
runs one forward pass per prompt, reporting the loss per token on the key's tokens after "The pass key
is" (nats; a guess among five-digit keys costs about 2.3 per digit) and whether every one of them is the
argmax (what greedy decoding would produce). Models (``--models``):

* ``base``: the original model, its own attention (sdpa);
* ``landmark-full``: the landmark model with exact landmark attention over the whole prompt (landmarks
  inserted as in training; no retrieval). A model that has not learned to route attention through its
  landmarks fails here already, inside its training length, so run this before hour-long evaluations.

Usage::

    python benchmarks/hf_passkey_probe.py --landmark runs/hf-passkey/smollm2-landmark \\
        --lengths 512 2048 --depths 0.25 0.5 0.75 --trials 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("base", "landmark-full")


def answer_loss(model, prompt: list[int], answer: list[int], key_tokens: int) -> tuple[float, bool]:
    """(mean loss per token over the first ``key_tokens`` answer tokens, all of them argmax).

    Args:
        prompt: the passkey prompt's token ids (ends with "The pass key is").
        answer: the expected continuation's ids (`` 48213.``); the first ``key_tokens`` are the key's.
    """
    import torch

    raw = torch.tensor(prompt + answer, dtype=torch.long)  # (n,)
    landmark_id = getattr(model.config, "landmark_token_id", None)
    if landmark_id is None:
        inputs, targets = raw[:-1], raw[1:]  # (n - 1,)
    else:
        from landmark.data.landmarks import landmark_example

        inputs, targets = landmark_example(raw, int(model.config.landmark_block_size), int(landmark_id))
    with torch.no_grad():
        logits = model(input_ids=inputs[None]).logits[0].float()  # (T, vocab)
    scored = (targets != -100).nonzero().flatten()  # positions predicting a regular token
    scored = scored[-len(answer) :][:key_tokens]  # ... the key's tokens after the question
    losses = torch.nn.functional.cross_entropy(logits[scored], targets[scored], reduction="none")
    exact = bool((logits[scored].argmax(-1) == targets[scored]).all())
    return float(losses.mean()), exact


def run(args: argparse.Namespace) -> dict:
    import torch

    from landmark.eval.models import load_hf
    from landmark.eval.passkey import cell_keys
    from landmark.hf.passkey import hf_passkey_prompts

    torch.set_num_threads(args.threads)
    rows = []
    for kind in args.models:
        m = load_hf(kind, args.base if kind == "base" else args.landmark)
        model, tokenizer = m.model, m.tokenizer
        prompts = hf_passkey_prompts(tokenizer)
        for length in args.lengths:
            for depth in args.depths:
                start = time.perf_counter()
                cell = []
                for key in cell_keys(args.seed, length, depth, args.trials):
                    answer = prompts.answer(key)  # " 48213."
                    key_ids = prompts.tokenizer.encode(f" {key}")
                    key_tokens = len(key_ids) if answer[: len(key_ids)] == key_ids else len(answer)
                    loss, exact = answer_loss(model, prompts.prompt(length, depth, key), answer, key_tokens)
                    cell.append({"key": key, "loss": loss, "exact": exact})
                row = {
                    "model": kind,
                    "length": length,
                    "depth": depth,
                    "loss": sum(c["loss"] for c in cell) / len(cell),
                    "exact": sum(c["exact"] for c in cell),
                    "trials": cell,
                    "seconds": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                print(
                    f"{kind:14s} {length:6d} depth {depth:.2f}: key loss {row['loss']:.2f} nats/token, "
                    f"exact {row['exact']}/{len(cell)} ({row['seconds']:.0f} s)",
                    flush=True,
                )
        del m, model
    return {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}


def markdown(report: dict) -> str:
    """Loss per key token (exact / trials) by model and length, one column per depth."""
    depths = report["settings"]["depths"]
    lines = [
        "| model | length | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
        "|---|---:|" + "---:|" * len(depths),
    ]
    keys = sorted(
        {(r["model"], r["length"]) for r in report["rows"]}, key=lambda x: (MODELS.index(x[0]), x[1])
    )
    for model, length in keys:
        cells = []
        for d in depths:
            r = next(
                (r for r in report["rows"] if (r["model"], r["length"], r["depth"]) == (model, length, d)),
                None,
            )
            cells.append(f"{r['loss']:.2f} ({r['exact']}/{len(r['trials'])})" if r else "")
        lines.append(f"| {model} | {length:,} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"Cells: mean loss per key token in nats (a uniform guess over five-digit keys: about "
        f"{math.log(10):.1f} per digit), and how many keys every token of which is the argmax."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from landmark.hf.smollm2 import default_smollm2_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=str(default_smollm2_dir()), help="the original model folder")
    p.add_argument(
        "--landmark", required=True, help="the landmark fine-tuned model (landmark hf finetune --out)"
    )
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    p.add_argument("--depths", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    p.add_argument("--trials", type=int, default=4, help="keys per (length, depth)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report (default: none)")
    args = p.parse_args(argv)
    report = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
