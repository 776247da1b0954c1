"""Training throughput of the small landmark, full-attention and Transformer-XL models, in one run.

Builds the three models from the ``[model]`` sections of ``configs/small-{landmark,full,xl}.toml`` and
times full training steps (forward, backward, gradient clipping, AdamW) on random tokens, the same
shapes the training loop uses (landmark windows carry a landmark every ``block_size`` positions).
The models take turns: each round runs ``--steps`` steps of every model, in a rotating order, so a
change of machine load hits all of them alike. Prints a table of tokens/s with the ratio to full
attention, and writes JSON (default ``benchmarks/results/train_throughput.json``).

    python benchmarks/train_throughput.py                    # 4 rounds x 3 steps per model
    python benchmarks/train_throughput.py --rounds 2 --steps 2 --batch-size 4
    python benchmarks/train_throughput.py --set model.n_layer=2 --out /tmp/tt.json   # presets changed
    python benchmarks/train_throughput.py --smoke --out /tmp/tt.json   # seconds: a test of the script

``--set SECTION.KEY=VALUE`` (repeatable) changes every preset as ``landmark train --set`` does.
``--smoke``: tiny models (1 layer, width 32, 64-position windows, blocks of 16), 2 windows per step, one
round of one step: the numbers mean nothing; it checks that every model trains and the JSON is whole
(tests/test_benchmarks.py). Options given with it override these; its ``--set`` values come first.

"tokens" are model input positions (landmarks included: 1 in 64 positions of a landmark window);
the JSON also gives text tokens/s (landmarks excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from landmark.data import landmark_example
from landmark.model import GPT
from landmark.train import make_optimizer
from landmark.train_config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_json import command_line

REPO = Path(__file__).resolve().parents[1]
KINDS = ("landmark", "full", "xl")
SMOKE_SETS = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=2", "model.seq_len=64",
    "model.block_size=16", "model.xl_segment=32", "data.vocab_size=300",
]  # fmt: skip
SMOKE = dict(rounds=1, steps=1, warmup=1, batch_size=2)  # --smoke, with SMOKE_SETS


def build(kind: str, batch_size: int, seed: int, sets: list[str] = ()):
    """Model, optimizer and one batch (input_ids, targets: (B, seq_len)) for ``configs/small-<kind>.toml``
    changed by ``sets`` (``section.key=value`` overrides)."""
    cfg = load_config(REPO / "configs" / f"small-{kind}.toml", [*sets, f"train.batch_size={batch_size}"])
    vocab = cfg.data.vocab_size
    mc = cfg.model_config(vocab_size=vocab, landmark_id=vocab - 1)
    torch.manual_seed(seed)
    model = GPT(mc)
    optimizer = make_optimizer(model, cfg)
    g = torch.Generator().manual_seed(seed)
    if kind == "landmark":
        n = mc.seq_len // mc.block_size * (mc.block_size - 1)
        raw = torch.randint(0, vocab - 1, (batch_size, n + 1), generator=g)
        ids, targets = landmark_example(raw, mc.block_size, mc.landmark_id)
    else:
        raw = torch.randint(0, vocab - 1, (batch_size, mc.seq_len + 1), generator=g)
        ids, targets = raw[:, :-1], raw[:, 1:]
    return model, optimizer, ids, targets, mc, cfg.train.grad_clip


def _git_version() -> str:
    """``git describe --always --dirty`` of the repository ("dirty": uncommitted changes were measured)."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def train_step(model: GPT, optimizer: torch.optim.Optimizer, ids, targets, grad_clip: float, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, targets).loss
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="rounds; each runs every model (default 4)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model first (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8, as the presets)")
    p.add_argument("--models", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.json"))
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="change every preset (repeatable), e.g. --set model.n_layer=2",
    )  # fmt: skip
    p.add_argument("--smoke", action="store_true", help="tiny models, one step each (a test)")
    args = p.parse_args(argv)
    if args.smoke:  # its sizes as defaults: options given with it still count
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
        args.sets = [*SMOKE_SETS, *args.sets]
    if args.threads:
        torch.set_num_threads(args.threads)

    runs = {k: build(k, args.batch_size, seed=0, sets=args.sets) for k in args.models}
    for kind, (model, opt, ids, targets, _, clip) in runs.items():
        for _ in range(args.warmup):
            train_step(model, opt, ids, targets, clip, args.bf16)
        print(f"warmed up {kind}: {model.num_parameters() / 1e6:.2f}M parameters", flush=True)

    load_before = os.getloadavg()
    times: dict[str, list[float]] = {k: [] for k in args.models}  # seconds per step, one per round
    for r in range(args.rounds):
        order = args.models[r % len(args.models) :] + args.models[: r % len(args.models)]
        for kind in order:
            model, opt, ids, targets, _, clip = runs[kind]
            start = time.perf_counter()
            for _ in range(args.steps):
                train_step(model, opt, ids, targets, clip, args.bf16)
            times[kind].append((time.perf_counter() - start) / args.steps)
        line = ", ".join(f"{k} {times[k][-1]:.2f} s/step" for k in args.models)
        print(f"round {r + 1}/{args.rounds}: {line}", flush=True)
    load_after = os.getloadavg()

    results = {}
    for kind in args.models:
        _, _, ids, _, mc, _ = runs[kind]
        positions = ids.numel()
        text = positions - (ids == mc.landmark_id).sum().item() if kind == "landmark" else positions
        total = sum(times[kind])
        results[kind] = {
            "seconds_per_step_mean": total / len(times[kind]),
            "seconds_per_step_median": statistics.median(times[kind]),
            "seconds_per_step_rounds": times[kind],
            "tokens_per_step": positions,
            "text_tokens_per_step": text,
            "tokens_per_s": positions * len(times[kind]) / total,
            "text_tokens_per_s": text * len(times[kind]) / total,
            "parameters": runs[kind][0].num_parameters(),
            "model": mc.to_dict(),
        }
    base = results.get("full")
    print(f"\n{'model':<10} {'s/step':>8} {'tokens/s':>10} {'text tok/s':>11} {'vs full':>8}")
    for kind, res in results.items():
        if base is not None:
            res["ratio_to_full"] = res["tokens_per_s"] / base["tokens_per_s"]
            res["text_ratio_to_full"] = res["text_tokens_per_s"] / base["text_tokens_per_s"]
        ratio = f"{res['ratio_to_full']:.2f}x" if base is not None else "n/a"
        print(
            f"{kind:<10} {res['seconds_per_step_mean']:>8.2f} {res['tokens_per_s']:>10,.0f} "
            f"{res['text_tokens_per_s']:>11,.0f} {ratio:>8}"
        )
    out = {
        "command": command_line(__file__, argv),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "git": _git_version(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "batch_size": args.batch_size,
        "sets": args.sets,
        "smoke": args.smoke,
        "bf16": args.bf16,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "results": results,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nload average (1, 5, 15 min) before {load_before}, after {load_after}; wrote {path}")


if __name__ == "__main__":
    main()
