"""Perplexity against context length (docs/method.md, "Evaluation protocols").

Non-overlapping windows of each evaluation length are cut from a corpus split (raw tokens; the
landmark model inserts its own landmarks, which are never scored). Every window is evaluated from a
fresh state (memory reset per window); every model scores the same tokens (tokens 1..L-1 of each
window, each from all the tokens before it in the window):

* ``landmark`` and ``hf-landmark`` models: chunked reading with top-k retrieval (the library's
  ``chunked_nll``; a ``LandmarkRetrievalCache`` for Hugging Face models), all positions' logits of each
  chunk, once per requested k and granularity;
* ``full`` models: one causal pass over the whole window (beyond the training length for long windows,
  which is the point of the comparison); ``hf`` models: the same with their own attention, read chunk by
  chunk into their own cache;
* ``xl`` models: their segment recurrence over the window (each segment sees the previous one's cache).

Each family answers "NLL of these windows" itself (``ModelUnderTest.window_nll``,
:mod:`landmark.eval.models`); the cells, the cache and the table are shared.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from landmark.eval.common import CellCache, ModelUnderTest, Reading, cache_key_options
from landmark.eval.models import RETRIEVAL_KINDS
from landmark.optional import pyplot
from landmark.plot import save_png


@dataclass(frozen=True)
class Setting:
    """One line of the table: a model, and for landmark models a retrieval setting."""

    model: str
    kind: str
    k: int | None = None
    granularity: str | None = None

    @property
    def label(self) -> str:
        if self.kind not in RETRIEVAL_KINDS:
            return f"{self.model} ({self.kind})"
        return f"{self.model} ({self.kind}, k={self.k}, {self.granularity})"


def eval_windows(tokens: np.ndarray, length: int, max_tokens: int) -> np.ndarray:
    """(W, length) non-overlapping windows from the start of ``tokens``, W = max(1, max_tokens // length)."""
    n = min(len(tokens) // length, max(1, max_tokens // length))
    if n < 1:
        raise ValueError(f"the split holds {len(tokens)} tokens, fewer than one window of {length}")
    return np.asarray(tokens[: n * length], dtype=np.int64).reshape(n, length)


def windows_fingerprint(windows: np.ndarray) -> str:
    """A short hash of the tokens a cell scores: a cell is cached by what it reads, not by how many
    tokens the split holds (two corpora of equal size never share cells)."""
    return hashlib.sha256(np.ascontiguousarray(windows, dtype=np.int64).tobytes()).hexdigest()[:16]


def evaluate_perplexity(
    models: list[ModelUnderTest],
    tokens: np.ndarray,
    lengths: list[int],
    cache: CellCache,
    *,
    readings: Sequence[Reading] = (Reading(),),
    max_tokens: int = 16384,
    batch_size: int = 4,
    progress: bool = True,
) -> list[dict]:
    """Perplexity of every (setting, length) cell; finished cells are read from ``cache``.

    Args:
        tokens: the evaluated text's tokens; cells are keyed by a fingerprint of the windows cut from it.
        readings: one setting of every landmark model per reading (k, granularity, ...; the same
            ``chunk_len`` for all); other models read with their own attention, in chunks of the first
            reading's ``chunk_len``.
        max_tokens: tokens scored per length at most (whole windows); batch_size: windows per forward.

    Returns:
        One dict per cell: setting label, model, kind, k, granularity, length, windows, tokens scored,
        nll, ppl, seconds.
    """
    settings: list[tuple[ModelUnderTest, Setting, Reading]] = []
    for m in models:
        if m.retrieves:
            settings += [(m, Setting(m.name, m.kind, r.k, r.granularity), r) for r in readings]
        else:
            settings.append((m, Setting(m.name, m.kind), readings[0]))
    cells = [(m, s, r, n) for m, s, r in settings for n in lengths]
    results = []
    total = sum(len(eval_windows(tokens, n, max_tokens)) for *_, n in cells)
    bar = tqdm(total=total, desc="perplexity", unit="window", disable=not progress)
    for m, s, reading, n in cells:
        bar.set_postfix_str(f"{s.label} @ {n}")
        key = {
            "eval": "ppl", "weights": m.fingerprint(), "kind": s.kind, "k": s.k,
            "granularity": s.granularity, "length": n, "max_tokens": max_tokens,
            "chunk_len": reading.chunk_len,
            "content": windows_fingerprint(eval_windows(tokens, n, max_tokens)),
            "options": cache_key_options(reading.options, s.kind), **m.landmark_key(),
        }  # fmt: skip
        cached = cache.get(key)
        if cached is None:
            cached = _run_cell(m, eval_windows(tokens, n, max_tokens), batch_size, reading, bar)
            cache.put(key, cached)
        else:
            bar.update(cached["windows"])
        results.append({"setting": s.label, "model": s.model, "kind": s.kind, "k": s.k,
                        "granularity": s.granularity, "length": n, **cached})  # fmt: skip
    bar.close()
    return results


def _run_cell(m: ModelUnderTest, windows: np.ndarray, batch_size: int, reading: Reading, bar) -> dict:
    """Perplexity of one model over (W, L) windows, ``batch_size`` windows per call."""
    t0 = time.perf_counter()
    windows = torch.from_numpy(windows)
    nll, count = 0.0, 0
    for b in range(0, windows.shape[0], batch_size):
        sums, counts = m.window_nll(windows[b : b + batch_size], reading)
        nll, count = nll + float(sums.sum()), count + int(counts.sum())
        bar.update(len(sums))
    return {"windows": int(windows.shape[0]), "tokens": count, "nll": nll / count,
            "ppl": math.exp(nll / count), "seconds": time.perf_counter() - t0}  # fmt: skip


def perplexity_table(results: list[dict]) -> str:
    """Markdown: one row per setting, one column per length."""
    lengths = sorted({r["length"] for r in results})
    labels = list(dict.fromkeys(r["setting"] for r in results))
    cell = {(r["setting"], r["length"]): r for r in results}
    lines = ["| model / setting | " + " | ".join(str(n) for n in lengths) + " |"]
    lines.append("|---|" + "---:|" * len(lengths))
    for label in labels:
        vals = [f"{cell[(label, n)]['ppl']:.2f}" if (label, n) in cell else "" for n in lengths]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def plot_perplexity(results: list[dict], path) -> None:
    """PNG: perplexity against context length, one line per setting, log-scaled x axis."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["setting"] for r in results):
        rows = sorted((r for r in results if r["setting"] == label), key=lambda r: r["length"])
        ax.plot([r["length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity against context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
