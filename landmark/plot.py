"""Loss curves from the ``metrics.jsonl`` of training runs (``landmark plot-metrics``)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from landmark.files import atomic_write, check_output_file, os_error_text
from landmark.optional import pyplot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
X_AXES = {"step": "optimizer step", "tokens": "tokens seen", "minutes": "wall-clock minutes"}


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``path`` is the run folder or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a metrics file: pass runs written by `landmark train`")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass run folders written by `landmark train`")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start}): not the metrics of a training run"
        ) from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {os_error_text(err)}") from None
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if isinstance(row, dict):  # anything else is not a metrics line
            rows.append(row)
    return rows


def _x(row: dict[str, Any], x: str) -> Any:
    if x == "minutes":  # (a row without its time is left out, not drawn at minute 0)
        elapsed = row.get("elapsed_s")
        return elapsed / 60 if _finite(elapsed) else None
    return row.get("tokens") if x == "tokens" else row.get("step")


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _points(rows: list[dict[str, Any]], x: str, key: str) -> list[tuple[float, float]]:
    """(x, ``key``) of the rows where both are finite numbers (a NaN loss or a damaged line is left out)."""
    pairs = ((_x(r, x), r.get(key)) for r in rows)
    return [(a, b) for a, b in pairs if _finite(a) and _finite(b)]


def plot_metrics(
    runs: Sequence[str | Path],
    out: str | Path,
    x: str = "step",
    labels: Sequence[str] | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Draw training loss (lines) and validation loss (dashed, dots) of each run into a PNG.

    Args:
        runs: run folders (or ``metrics.jsonl`` files).
        out: the PNG to write.
        x: the horizontal axis: ``"step"``, ``"tokens"`` or ``"minutes"``.
        labels: a legend label per run; default the run folder names.
        title: the figure title.
        overwrite: replace an existing ``out`` that is not a PNG.

    Raises:
        ValueError: ``out`` is not a ``.png`` name, is a folder, or is an existing file other than a
            PNG (without ``overwrite``); ``labels`` does not give one name per run; a run has no metrics.

    Returns:
        The written path.
    """
    plt = pyplot()

    out = check_plot_out(out, overwrite)
    if x not in X_AXES:
        raise ValueError(f"x must be one of {sorted(X_AXES)}; got {x!r}")
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"--labels gives {len(labels)} name(s) for {len(runs)} run(s): give one per run")
    given = labels is not None
    labels = list(labels) if labels is not None else [Path(r).name or str(r) for r in runs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:  # two curves under one name
        raise ValueError(
            f"--labels lists {repeated[0]!r} more than once: give each run its own name"
            if given
            else f"two runs are named {repeated[0]!r} in the legend: give --labels, one name per run"
        )
    labels = [printable(label) for label in labels]  # (names of bytes that are not UTF-8 failed matplotlib)
    title = printable(title) if title else title
    metrics = [read_metrics(run) for run in runs]
    curves = [(_points(rows, x, "loss"), _points(rows, x, "val_loss")) for rows in metrics]
    empty = [str(run) for run, (train, val) in zip(runs, curves) if not train and not val]
    if empty:
        raise ValueError(f"no metrics to plot in {', '.join(empty)} (metrics.jsonl has no row with a finite "
                         f"{x} and loss yet)")  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, ((train, val), label) in enumerate(zip(curves, labels)):
        color = f"C{i}"
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
    fig.tight_layout()
    save_png(fig, out)
    return out


def save_png(fig: Any, path: str | Path, **savefig: Any) -> None:
    """Write a matplotlib figure to ``path`` as a PNG through the one atomic writer (a temporary file
    renamed onto ``path``: a symbolic link there is replaced, never written through), then close it."""
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", **savefig))
    finally:
        pyplot().close(fig)


def printable(text: str) -> str:
    """``text`` with bytes that were not UTF-8 (kept by Python as lone surrogates in arguments and file
    names) shown as the replacement character."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # a surrogate no byte stands for
        return text.encode("utf-8", "replace").decode("utf-8")


def is_png(path: Path) -> bool:
    """Whether ``path`` starts with the PNG signature."""
    try:
        with open(path, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def check_plot_out(out: str | Path, overwrite: bool = False) -> Path:
    """``--out`` of ``plot-metrics``: a ``.png`` file name whose folder exists; an existing file only if
    it is a PNG (or ``overwrite``). One-line ValueErrors, before anything is read or written."""
    out = Path(out)
    if out.suffix.lower() != ".png":  # (".png" alone is a hidden file's name, without a suffix)
        raise ValueError(f"--out {out}: the plot is a PNG; give a file name ending in .png, such as loss.png")
    return check_output_file(out, "--out", kind="a PNG image", is_kind=is_png, overwrite=overwrite)
