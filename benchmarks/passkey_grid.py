"""Merge `landmark eval passkey` outputs into one passkey grid: a markdown table, a JSON file, a heatmap.

Each input is a ``passkey.json`` written by ``landmark eval passkey --out DIR`` (or a copy). Cells of
the same model, task, haystack, length and depth are summed (runs with other ``--seed`` values add
keys to a cell); every (model, task) pair becomes one heatmap panel (length x depth, accuracy) drawn
by the evaluation's own plot, :func:`landmark.eval.passkey.plot_passkey`.

Usage (the SmolLM2 grid of docs/evaluation.md)::

    python benchmarks/passkey_grid.py benchmarks/results/smollm2_passkey/version2/*.json \
        --out benchmarks/results/smollm2_passkey/grid.json --png docs/results/smollm2_passkey.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_json import command_line, write_results


def task_label(result: dict) -> str:
    """``passkey``, ``books`` or ``multikey-4`` (a books haystack with several keys: both)."""
    label = "passkey" if result["task"] == "passkey" else f"multikey-{result['keys_per_prompt']}"
    if result.get("haystack") == "books":
        label = "books" if label == "passkey" else f"{label}, books"
    return label


def retrieval_label(args: dict) -> str:
    """The retrieval settings of an evaluation (its ``args``) that differ from the defaults, e.g.
    ``" (token)"`` or ``" (k=2, token)"``; ``""`` for the defaults (k = 4, token_head, chunks of 256)."""
    from landmark.inference import RetrievalConfig
    from landmark.inference.cache import DEFAULT_CHUNK_LEN

    default = RetrievalConfig()
    parts = []
    if args.get("k", default.k) != default.k:
        parts.append(f"k={args['k']}")
    if args.get("granularity", default.granularity) != default.granularity:
        parts.append(str(args["granularity"]))
    if args.get("chunk_len", DEFAULT_CHUNK_LEN) != DEFAULT_CHUNK_LEN:
        parts.append(f"chunks of {args['chunk_len']}")
    return f" ({', '.join(parts)})" if parts else ""


def merge(paths: list[Path], rename: dict[str, str]) -> list[dict]:
    """The cells of every file, summed per (model, task, length, depth), in first-seen order. A landmark
    model evaluated with other retrieval settings than the defaults is a model of its own (its name
    followed by them: ``landmark (token)``), so that no cell sums two settings."""
    cells: dict[tuple, dict] = {}
    for path in paths:
        data = json.loads(path.read_text(encoding="utf-8"))
        for r in data["results"]:
            model = rename.get(r["model"], r["model"])
            if "landmark" in r.get("kind", ""):
                model += retrieval_label(data.get("args") or {})
            key = (model, task_label(r), r["length"], r["depth"])
            cell = cells.setdefault(key, {"model": model, "task": key[1], "length": key[2], "depth": key[3],
                                          "correct": 0, "trials": 0, "seconds": 0.0})  # fmt: skip
            cell["correct"] += r["correct"]
            cell["trials"] += r["trials"]
            cell["seconds"] += r["seconds"]
    for cell in cells.values():
        cell["accuracy"] = cell["correct"] / cell["trials"]
    return list(cells.values())


def table(cells: list[dict]) -> str:
    """Markdown: one line per (model, task, length), correct/trials per depth and in all."""
    depths = sorted({c["depth"] for c in cells})
    head = "| model | task | length | " + " | ".join(f"depth {d:g}" for d in depths) + " | all |"
    lines = [head, "|---|---|---:|" + "---:|" * (len(depths) + 1)]
    rows = dict.fromkeys((c["model"], c["task"], c["length"]) for c in cells)
    for model, task, length in rows:
        mine = {c["depth"]: c for c in cells if (c["model"], c["task"], c["length"]) == (model, task, length)}
        parts = [f"{mine[d]['correct']}/{mine[d]['trials']}" if d in mine else "-" for d in depths]
        right = sum(c["correct"] for c in mine.values())
        total = sum(c["trials"] for c in mine.values())
        lines.append(f"| {model} | {task} | {length} | " + " | ".join(parts) + f" | {right}/{total} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="passkey.json files of landmark eval passkey")
    parser.add_argument("--rename", nargs="*", default=[], metavar="OLD=NEW", help="model names to merge")
    parser.add_argument("--out", type=Path, required=True, help="the merged JSON")
    parser.add_argument("--png", type=Path, default=None, help="heatmaps, one panel per (model, task)")
    args = parser.parse_args(argv)
    rename = dict(item.split("=", 1) for item in args.rename)
    cells = merge(args.inputs, rename)
    print(table(cells))
    write_results(
        args.out, {"cells": cells}, command=command_line(__file__, argv), inputs=[str(p) for p in args.inputs]
    )
    if args.png is not None:
        from landmark.eval.passkey import plot_passkey

        panels = [dict(c, model=f"{c['model']}: {c['task']}") for c in cells]
        args.png.parent.mkdir(parents=True, exist_ok=True)
        plot_passkey(panels, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
