"""Passkey retrieval (shared/method.md s.6) with a Hugging Face model: base vs landmark fine-tuned.

For each context length (prompt tokens, landmarks not counted) and depth, ``--trials`` prompts with
seeded five-digit keys are built by :func:`landmark.hf.passkey.passkey_trial` (the text of
:mod:`landmark.data.passkey`, tokenized with the model's tokenizer) and answered greedily; a trial is
correct when the first integer generated equals the key. Models (``--models``):

* ``base``: the original model, its own attention (sdpa) over the whole prompt (``DynamicCache``);
* ``landmark``: the landmark fine-tuned model with top-k retrieval (``LandmarkRetrievalCache``: chunked
  prefill, k blocks per query and head, block memory on ``--memory-device``);
* ``landmark-full``: the landmark model with exact landmark attention over the whole context (no
  retrieval; positions beyond the native window are extrapolated like the base model's).

Every model sees the same keys; all models run at one length before the next length. ``base`` and
``landmark-full`` are skipped at a length (and longer ones) once one of their trials has not finished
within ``--time-limit`` seconds (the trial is stopped by an alarm; ``--landmark-time-limit`` for the
retrieval model, none by default); the table says so. Results are written to the JSON after every
trial; ``--resume`` keeps the trials already there and runs the rest.

Usage (the numbers in docs/huggingface.md)::

    python benchmarks/hf_passkey.py --landmark runs/hf-passkey/smollm2-landmark \\
        --lengths 2048 8192 16384 32768 --trials 3 --depths 0.5 --threads 2 --time-limit 1800
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("base", "landmark", "landmark-full")
RESULTS = Path(__file__).parent / "results"


class TrialTimeout(Exception):
    """A trial ran past --time-limit."""


def _alarm(signum, frame):
    raise TrialTimeout


def load(kind: str, args: argparse.Namespace):
    """(model, tokenizer) of one kind, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import landmark.hf as lhf

    if kind == "base":
        model = AutoModelForCausalLM.from_pretrained(
            args.base, attn_implementation="sdpa", local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(args.base, local_files_only=True)
    else:
        model, tokenizer = lhf.load_pretrained(args.landmark)
    return model.eval(), tokenizer


def keys_for(length: int, depth: float, trials: int, seed: int) -> list[int]:
    """Seeded five-digit keys, the same for every model."""
    import numpy as np

    from landmark.data.passkey import KEY_RANGE

    rng = np.random.default_rng([seed, length, round(depth * 1000)])
    return [int(k) for k in rng.integers(*KEY_RANGE, size=trials)]


def run(args: argparse.Namespace) -> dict:
    import torch

    from landmark.hf.passkey import hf_passkey_prompts, passkey_trial
    from landmark.inference import RetrievalConfig

    torch.set_num_threads(args.threads)
    retrieval = RetrievalConfig(k=args.k, granularity=args.granularity)
    out = Path(args.out)
    done: set[tuple] = set()
    if args.resume and out.is_file():  # keep what an earlier (interrupted) run measured
        report = json.loads(out.read_text(encoding="utf-8"))
        report["skipped"] = []
        done = {(t["model"], t["length"], t["depth"], t["key"]) for t in report["trials"]}
        report["settings"].setdefault("resumed_with", []).append(
            {k: v for k, v in vars(args).items() if k not in ("out", "markdown")}
        )
    else:
        report = {
            "settings": {
                **{k: v for k, v in vars(args).items() if k not in ("out", "markdown")},
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "cpu_count": os.cpu_count(),
            },
            "finetune": _finetune_summary(args.landmark),
            "trials": [],
            "skipped": [],
        }
    signal.signal(signal.SIGALRM, _alarm)
    loaded = {kind: load(kind, args) for kind in args.models}  # shorter lengths first, every model
    skip_from: dict[str, str] = {}
    for length in args.lengths:
        for kind, (model, tokenizer) in loaded.items():
            if kind in skip_from:
                report["skipped"].append({"model": kind, "length": length, "reason": skip_from[kind]})
                continue
            prompts = hf_passkey_prompts(tokenizer)
            trials = [(d, key) for d in args.depths for key in keys_for(length, d, args.trials, args.seed)]
            limit = args.landmark_time_limit if kind == "landmark" else args.time_limit
            for depth, key in trials:
                if (kind, length, depth, key) in done:
                    continue
                signal.alarm(limit)
                try:
                    result = passkey_trial(
                        model,
                        tokenizer,
                        length,
                        depth,
                        key,
                        retrieval=retrieval if kind == "landmark" else None,
                        max_new_tokens=args.max_new_tokens,
                        prompts=prompts,
                        chunk_len=args.chunk_len,
                        memory_device=args.memory_device,
                    )
                except TrialTimeout:
                    skip_from[kind] = f"a trial at {length} tokens ran past the {limit} s limit"
                    report["skipped"].append({"model": kind, "length": length, "reason": skip_from[kind]})
                    print(f"{kind:14s} {length:6d}  skipped: {skip_from[kind]}", flush=True)
                    break
                finally:
                    signal.alarm(0)
                report["trials"].append({"model": kind, **vars(result)})
                print(
                    f"{kind:14s} {length:6d} depth {depth:.2f} key {key}: "
                    f"{'OK' if result.correct else 'no'} {result.answer!r} ({result.seconds:.0f} s)",
                    flush=True,
                )
                out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _finetune_summary(path: str) -> dict | None:
    summary = Path(path) / "landmark-finetune.json"
    if not summary.is_file():
        return None
    data = json.loads(summary.read_text(encoding="utf-8"))
    keep = ("train_seconds", "train_loss", "steps_done", "tokens_seen", "eval_loss_before", "eval_loss_after")
    return {"config": data.get("config"), **{k: data.get(k) for k in keep}}


def markdown(report: dict) -> str:
    """Accuracy (correct / trials) and mean seconds per trial, by model and length."""
    lengths = sorted({t["length"] for t in report["trials"]} | {s["length"] for s in report["skipped"]})
    models = [m for m in MODELS if any(t["model"] == m for t in report["trials"] + report["skipped"])]
    head = "| model | " + " | ".join(f"{n:,} tokens" for n in lengths) + " |"
    lines = [head, "|---|" + "---|" * len(lengths)]
    for m in models:
        cells = []
        for n in lengths:
            rows = [t for t in report["trials"] if t["model"] == m and t["length"] == n]
            if rows:
                ok = sum(t["correct"] for t in rows)
                secs = sum(t["seconds"] for t in rows) / len(rows)
                cells.append(f"{ok}/{len(rows)} ({secs:.0f} s)")
            else:
                cells.append(
                    "skipped" if any(s["model"] == m and s["length"] == n for s in report["skipped"]) else ""
                )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    s = report["settings"]
    lines.append("")
    lines.append(
        "Cells: correct / trials (mean wall seconds per trial: prefill + "
        f"{s['max_new_tokens']} greedy tokens). "
        f"Depths {sorted({t['depth'] for t in report['trials']})}; "
        f"landmark: k = {s['k']}, granularity {s['granularity']}, chunks of "
        f"{s['chunk_len']}, memory on {s['memory_device'] or 'the model device'}; {s['threads']} threads."
    )
    limits = [r.get("time_limit") for r in [s, *s.get("resumed_with", [])]]
    lines.append(f"Time limit per trial of base/landmark-full: {max(x for x in limits if x)} s.")
    for skip in report["skipped"]:
        lines.append(f"- {skip['model']} at {skip['length']:,}: skipped ({skip['reason']}).")
    return "\n".join(lines) + "\n"


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """--base and --landmark, as ``load`` reads them (also used by hf_passkey_probe.py)."""
    from landmark.hf.smollm2 import default_smollm2_dir

    p.add_argument("--base", default=str(default_smollm2_dir()), help="the original model folder")
    p.add_argument(
        "--landmark", required=True, help="the landmark fine-tuned model (landmark hf finetune --out)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--models", nargs="+", choices=MODELS, default=["base", "landmark"])
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192, 16384, 32768])
    p.add_argument("--depths", nargs="+", type=float, default=[0.5])
    p.add_argument("--trials", type=int, default=3, help="keys per (length, depth)")
    p.add_argument("--k", type=int, default=4, help="blocks retrieved per query and head")
    p.add_argument("--granularity", default="token_head", choices=("token_head", "token", "head"))
    p.add_argument("--chunk-len", type=int, default=256, help="prefill chunk (positions)")
    p.add_argument("--memory-device", default=None, help="where block contents live (default: model device)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--time-limit", type=int, default=1800, help="seconds per trial before base/landmark-full are skipped"
    )
    p.add_argument(
        "--landmark-time-limit", type=int, default=0, help="the same for the retrieval model (0: none)"
    )
    p.add_argument("--resume", action="store_true", help="keep the trials already in --out, run the rest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RESULTS / "hf_passkey.json"))
    p.add_argument("--markdown", default=str(RESULTS / "hf_passkey.md"))
    args = p.parse_args()
    report = run(args)
    table = markdown(report)
    Path(args.markdown).write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
