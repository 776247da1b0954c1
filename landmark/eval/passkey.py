"""Passkey retrieval against context length and depth (shared/method.md section 6).

For each (length, depth) cell, ``trials`` prompts with seeded random five-digit keys are built with
:class:`landmark.data.passkey.PasskeyPrompts` (lengths in tokens, landmarks not counted) and scored:
the first integer the model produces must equal the key.

* ``landmark`` models generate greedily with retrieval (``landmark.inference.generate``), the trials of
  a cell as one batch.
* ``full`` and ``xl`` models are scored in one teacher-forced pass over prompt + answer: greedy
  decoding yields the key iff the argmax at each key-digit position is the next key token and the token
  predicted after the last digit does not start with a digit. This is equivalent to greedy decoding
  whose answer starts at the first generated token (slightly stricter than "first integer anywhere"),
  and costs one pass instead of one per generated token.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from tqdm import tqdm

from landmark.data.passkey import KEY_RANGE, PasskeyPrompts, first_integer
from landmark.eval.common import CellCache, ModelUnderTest, cache_key_options, weights_fingerprint
from landmark.inference import generate


def _keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    rng = np.random.default_rng([seed, length, round(depth * 1000)])
    return [int(x) for x in rng.integers(*KEY_RANGE, size=trials)]


@torch.no_grad()
def _teacher_forced_correct(m: ModelUnderTest, prompts: PasskeyPrompts, prompt: list[int], key: int) -> bool:
    answer = prompts.answer(key)
    digits = [t for t in answer if any(ch.isdigit() for ch in m.tokenizer.decode([t]))]
    ids = torch.tensor([prompt + digits])
    h = m.model.hidden_states(ids)[0, len(prompt) - 1 :]  # positions predicting digits..., and after
    pred = m.model.logits(h[None])[0].argmax(-1).tolist()
    if pred[: len(digits)] != digits:
        return False
    after = m.tokenizer.decode([pred[len(digits)]])
    return not after[:1].isdigit()


def check_passkey_cells(
    models: list[ModelUnderTest],
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int,
    option: str = "--lengths",
) -> None:
    """One-line ValueErrors, before any work, for cells that cannot be run: ``trials`` < 1, a negative
    ``seed``, depths outside [0, 1], or a length (``option`` on the command line) too short to hold the
    prompt of one of its keys."""
    if trials < 1:
        raise ValueError(f"--trials must be >= 1; got {trials}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0; got {seed}")
    bad = [d for d in depths if not 0 <= d <= 1]
    if not depths or bad:
        raise ValueError(f"--depths must be a non-empty list of fractions in [0, 1]; got {depths}")
    if not lengths:
        raise ValueError(f"{option} is empty: give at least one prompt length in tokens")
    for m in models:
        prompts = PasskeyPrompts(m.tokenizer)
        for n in lengths:
            keys = {x for d in depths for x in _keys(seed, n, d, trials)}
            need = max(prompts.min_length(x) for x in keys)
            if n < need:
                raise ValueError(
                    f"{option}: {n} tokens cannot hold a passkey prompt of model {m.name!r} (minimum {need})"
                )


def evaluate_passkey(
    models: list[ModelUnderTest],
    lengths: list[int],
    depths: list[float],
    trials: int,
    cache: CellCache,
    *,
    seed: int = 0,
    k: int = 4,
    granularity: str = "token_head",
    chunk_len: int = 256,
    progress: bool = True,
    options: dict | None = None,
) -> list[dict]:
    """Accuracy of every (model, length, depth) cell; finished cells are read from ``cache``.

    ``options``: further ``InferenceSession`` keywords of landmark models (search, kernel, memory_device,
    max_blocks; see ``landmark.inference.options.session_options``).
    """
    check_passkey_cells(models, lengths, depths, trials, seed)
    results = []
    fingerprints = {m.name: weights_fingerprint(m.model) for m in models}  # once per model, not per cell
    cells = [(m, n, d) for m in models for n in lengths for d in depths]
    bar = tqdm(cells, desc="passkey", unit="cell", disable=not progress)
    for m, n, d in bar:
        bar.set_postfix_str(f"{m.name} @ {n} tokens, depth {d:.2f}")
        prompts = PasskeyPrompts(m.tokenizer)
        key = {
            "eval": "passkey", "weights": fingerprints[m.name], "kind": m.kind, "length": n,
            "depth": d, "trials": trials, "seed": seed,
            "k": k if m.kind == "landmark" else None,
            "granularity": granularity if m.kind == "landmark" else None,
            "chunk_len": chunk_len if m.kind == "landmark" else None,
            "options": cache_key_options(options, m.kind),
        }  # fmt: skip
        cached = cache.get(key)
        if cached is None:
            t0 = time.perf_counter()
            keys = _keys(seed, n, d, trials)
            texts = [prompts.prompt(n, d, x) for x in keys]
            if m.kind == "landmark":
                new = len(prompts.answer(keys[0])) + 2
                outs = generate(m.model, texts, max_new_tokens=new, k=k, granularity=granularity,
                                chunk_len=chunk_len, **(options or {}))  # fmt: skip
                answers = [first_integer(m.tokenizer.decode(o)) for o in outs]
                correct = [a == x for a, x in zip(answers, keys)]
            else:
                correct = [_teacher_forced_correct(m, prompts, t, x) for t, x in zip(texts, keys)]
                answers = None
            cached = {"accuracy": sum(correct) / trials, "correct": sum(correct), "trials": trials,
                      "answers": answers, "keys": keys, "seconds": time.perf_counter() - t0}  # fmt: skip
            cache.put(key, cached)
        results.append({"model": m.name, "kind": m.kind, "length": n, "depth": d, **cached})
    return results


def passkey_table(results: list[dict]) -> str:
    """Markdown: one row per (model, length), one column per depth, and the mean."""
    depths = sorted({r["depth"] for r in results})
    rows = list(dict.fromkeys((r["model"], r["kind"], r["length"]) for r in results))
    cell = {(r["model"], r["length"], r["depth"]): r for r in results}
    lines = ["| model | length | " + " | ".join(f"depth {d:.0%}" for d in depths) + " | mean |"]
    lines.append("|---|---:|" + "---:|" * (len(depths) + 1))
    for name, kind, n in rows:
        accs = [cell[(name, n, d)]["accuracy"] for d in depths if (name, n, d) in cell]
        vals = [f"{a:.0%}" for a in accs]
        lines.append(f"| {name} ({kind}) | {n} | " + " | ".join(vals) + f" | {np.mean(accs):.0%} |")
    return "\n".join(lines)


def plot_passkey(results: list[dict], path) -> None:
    """PNG heatmaps (length x depth) of accuracy, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in results))
    lengths = sorted({r["length"] for r in results})
    depths = sorted({r["depth"] for r in results})
    fig, axes = plt.subplots(
        1, len(names), figsize=(3.2 + 2.2 * len(depths) * len(names) / 3, 3.6), squeeze=False
    )
    for ax, name in zip(axes[0], names):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for r in results:
            if r["model"] == name:
                grid[lengths.index(r["length"]), depths.index(r["depth"])] = r["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("key depth")
        ax.set_ylabel("context length (tokens)")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
