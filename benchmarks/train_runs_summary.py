"""Summarise training runs: copy their metrics.jsonl into docs/results/ and print loss at start and end.

    python benchmarks/train_runs_summary.py runs/small-landmark runs/small-full runs/small-xl

For each run: steps and tokens done, wall time, training tokens/s (tokens over the time of the training
steps, evaluation excluded), the first and last logged training loss, and the validation loss at step 0
and at the end. Writes ``docs/results/<run>.metrics.jsonl`` and ``docs/results/train_runs_summary.json``
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

from landmark.plot import read_metrics

REPO = Path(__file__).resolve().parents[1]


def summarise(run: Path) -> dict:
    rows = read_metrics(run)
    config = json.loads((run / "config.json").read_text())
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    step_time = sum((b["tokens"] - a["tokens"]) / b["tokens_per_s"] for a, b in itertools.pairwise(rows))
    last = rows[-1]
    return {
        "run": run.name,
        "attention": config["model"]["attention"],
        "steps": last["step"],
        "tokens": last["tokens"],
        "wall_minutes": last["elapsed_s"] / 60,
        "tokens_per_s": last["tokens"] / step_time,
        "first_loss": {"step": train_rows[0]["step"], "loss": train_rows[0]["loss"]},
        "last_loss": {"step": train_rows[-1]["step"], "loss": train_rows[-1]["loss"]},
        "first_val_loss": {"step": val_rows[0]["step"], "val_loss": val_rows[0]["val_loss"]},
        "last_val_loss": {"step": val_rows[-1]["step"], "val_loss": val_rows[-1]["val_loss"]},
        "val_losses": [(r["step"], r["val_loss"]) for r in val_rows],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    """Copy and summarise the runs; returns the summaries (also written as JSON)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "results")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for run in args.runs:
        shutil.copyfile(run / "metrics.jsonl", args.out / f"{run.name}.metrics.jsonl")
        summaries.append(summarise(run))
    (args.out / "train_runs_summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    print(
        "| run | steps | tokens | minutes | tokens/s | train loss first -> last | val loss step 0 -> last |"
    )
    print("|---|---|---|---|---|---|---|")
    for s in summaries:
        fl, ll, fv, lv = s["first_loss"], s["last_loss"], s["first_val_loss"], s["last_val_loss"]
        print(
            f"| {s['run']} | {s['steps']} | {s['tokens']:,} | {s['wall_minutes']:.1f} "
            f"| {s['tokens_per_s']:,.0f} "
            f"| {fl['loss']:.3f} (step {fl['step']}) -> {ll['loss']:.3f} (step {ll['step']}) "
            f"| {fv['val_loss']:.3f} -> {lv['val_loss']:.3f} (step {lv['step']}) |"
        )
    return summaries


if __name__ == "__main__":
    main()
