"""Loss curves from the ``metrics.jsonl`` of training runs (``landmark plot-metrics``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

X_AXES = {"step": "optimizer step", "tokens": "tokens seen", "minutes": "wall-clock minutes"}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``path`` is the run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass run folders written by `landmark train`")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return rows


def _x(row: dict[str, Any], x: str) -> float:
    if x == "minutes":
        return row.get("elapsed_s", 0.0) / 60
    return row["tokens"] if x == "tokens" else row["step"]


def plot_metrics(
    runs: Sequence[str | Path],
    out: str | Path,
    x: str = "step",
    labels: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Draw training loss (lines) and validation loss (dashed, dots) of each run into a PNG.

    Args:
        runs: run folders (or ``metrics.jsonl`` files).
        out: the PNG to write.
        x: the horizontal axis: ``"step"``, ``"tokens"`` or ``"minutes"``.
        labels: a legend label per run; default the run folder names.
        title: the figure title.

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise ValueError(f"x must be one of {sorted(X_AXES)}; got {x!r}")
    labels = list(labels) if labels is not None else [Path(r).name or str(r) for r in runs]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (run, label) in enumerate(zip(runs, labels)):
        rows = read_metrics(run)
        color = f"C{i}"
        train = [(_x(r, x), r["loss"]) for r in rows if "loss" in r]
        val = [(_x(r, x), r["val_loss"]) for r in rows if "val_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, linestyle="--", marker="o", markersize=3, label=f"{label} val")
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel("cross-entropy loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
