"""Passkey retrieval against context length and depth (shared/method.md section 6), and two harder tasks.

For each (length, depth) cell, ``trials`` prompts with seeded random five-digit keys are built with
:class:`landmark.data.passkey.PasskeyPrompts` (lengths in tokens of each model's tokenizer, landmarks
not counted) and scored: the first integer the model produces must equal the (asked) key. The task of a
run (:class:`PasskeyTask`): the paper's prompt (the default), prose filler from a corpus's validation
split (``haystack="books"``), or several named keys of which one is asked for (``task="multikey"``).
Everything random in a trial (its key, the other keys and names, where the prose starts) depends only
on (seed, length, depth, trial), so every model sees the same trials.

Both model families (:mod:`landmark.eval.models`) go through the same code:

* landmark models (``landmark``, ``hf-landmark``) generate greedily with top-k retrieval;
* the others (``full``, ``xl``, ``hf``) are scored in one teacher-forced pass over prompt + answer
  (:func:`teacher_forced_correct`): greedy decoding yields the key iff the argmax at each position of
  the answer up to its last digit is the answer's next token and the token predicted after the last
  digit does not start with a digit. This is equivalent to greedy decoding whose answer starts at the
  first generated token (slightly stricter than "first integer anywhere"), and costs one pass instead
  of one per generated token.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from landmark.data.passkey import (
    DEFAULT_MULTIKEY_KEYS,
    HAYSTACKS,
    KEY_RANGE,
    NAMES,
    TASKS,
    BookHaystack,
    Needle,
    PasskeyPrompts,
    first_integer,
    multikey_needles,
)
from landmark.eval.common import CellCache, ModelUnderTest, Reading, cache_key_options

NEEDLE_STREAM, HAYSTACK_STREAM = 1, 2  # random streams of a trial, besides its key


@dataclass(frozen=True)
class PasskeyTask:
    """What the prompts of a passkey evaluation hold.

    Args:
        task: ``"passkey"`` (the paper's: one key) or ``"multikey"`` (``keys`` named keys, one asked).
        haystack: ``"repeat"`` (the paper's repeated sentences) or ``"books"`` (prose of ``corpus``).
        keys: multikey's number of keys, 2 to ``len(NAMES)`` (None: ``DEFAULT_MULTIKEY_KEYS``); the
            passkey task has one.
        corpus: the books haystack's corpus folder (None: the bundled books); its validation split.
    """

    task: str = "passkey"
    haystack: str = "repeat"
    keys: int | None = None
    corpus: str | None = None

    def check(self) -> None:
        """One-line ValueErrors naming the option (--task, --keys, --haystack, --corpus)."""
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}; got {self.task!r}")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"--haystack must be one of {', '.join(HAYSTACKS)}; got {self.haystack!r}")
        if self.task == "passkey" and self.keys not in (None, 1):
            raise ValueError(f"--keys {self.keys}: the passkey task has one key; use --task multikey")
        if self.task == "multikey" and not 2 <= self.n_keys <= len(NAMES):
            raise ValueError(
                f"--keys must be between 2 and {len(NAMES)} for --task multikey (one name each); "
                f"got {self.keys}"
            )
        if self.corpus is not None and self.haystack != "books":
            raise ValueError("--corpus is the prose of --haystack books; the repeat haystack has none")

    @property
    def n_keys(self) -> int:
        """Keys per prompt."""
        if self.task == "passkey":
            return 1
        return DEFAULT_MULTIKEY_KEYS if self.keys is None else self.keys

    @property
    def label(self) -> str:
        """A short description: ``passkey``, ``multikey (4 keys), books haystack``."""
        text = self.task if self.task == "passkey" else f"multikey ({self.n_keys} keys)"
        return text if self.haystack == "repeat" else f"{text}, {self.haystack} haystack"

    def source(self) -> BookHaystack | None:
        """The prose of a books haystack (read once per corpus), or None."""
        if self.haystack != "books":
            return None
        return _book_haystack(self.corpus)

    def cache_fields(self) -> dict | None:
        """What a cell's cache key adds for this task: None for the paper's (so its cells keep their
        keys), else task, haystack, keys and the prose's corpus fingerprint."""
        if self.task == "passkey" and self.haystack == "repeat":
            return None
        source = self.source()
        return {"task": self.task, "haystack": self.haystack, "keys": self.n_keys,
                "corpus": None if source is None else source.fingerprint}  # fmt: skip


@functools.lru_cache(maxsize=4)
def _book_haystack(corpus: str | None) -> BookHaystack:
    """The books haystack of ``corpus``; a one-line ValueError naming ``--corpus``."""
    from landmark.data.corpus import CorpusError

    try:
        return BookHaystack(corpus)
    except (CorpusError, FileNotFoundError) as err:
        raise ValueError(f"--corpus: {err}") from None


def cell_keys(seed: int, length: int, depth: float, trials: int) -> list[int]:
    """The asked key of each trial of a cell (seeded: the same for every model and task)."""
    rng = np.random.default_rng([seed, length, round(depth * 1000)])
    return [int(x) for x in rng.integers(*KEY_RANGE, size=trials)]


def _trial_rng(seed: int, length: int, depth: float, trial: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, length, round(depth * 1000), trial, stream])


def trial_needles(task: PasskeyTask, seed: int, length: int, depth: float, trial: int, key: int):
    """(needles, asked name) of trial ``trial`` of a cell (seeded): the paper's one key, or multikey's named
    keys (the asked one ``key``, at ``depth``)."""
    if task.task == "passkey":
        return [Needle(key, depth)], None
    return multikey_needles(_trial_rng(seed, length, depth, trial, NEEDLE_STREAM), key, depth, task.n_keys)


def cell_trials(
    prompts: PasskeyPrompts, task: PasskeyTask, seed: int, length: int, depth: float, trials: int
) -> list[tuple[list[int], int]]:
    """``(prompt, asked key)`` of every trial of a cell, each prompt exactly ``length`` tokens."""
    out = []
    for t, key in enumerate(cell_keys(seed, length, depth, trials)):
        needles, ask = trial_needles(task, seed, length, depth, t, key)
        rng = _trial_rng(seed, length, depth, t, HAYSTACK_STREAM)
        out.append((prompts.compose(length, needles, ask, rng)[0], key))
    return out


@torch.no_grad()
def teacher_forced_correct(m: ModelUnderTest, prompts: PasskeyPrompts, prompt: list[int], key: int) -> bool:
    """Whether greedy decoding after ``prompt`` would start with the key's tokens and end the number
    there, from one pass over prompt + the answer's tokens up to its last digit (the model's own
    attention).

    The answer's tokens before the digits count too: SmolLM2's tokenizer writes `` 48213`` as a lone
    space followed by the digits, and greedy decoding must produce that space first.
    """
    answer = prompts.answer(key)
    last = max(i for i, t in enumerate(answer) if any(ch.isdigit() for ch in m.decode([t])))
    expected = answer[: last + 1]
    pred = m.tail_logits(prompt + expected, len(expected) + 1).argmax(-1).tolist()  # answer..., and after
    if pred[: len(expected)] != expected:
        return False
    after = m.decode([pred[len(expected)]])
    return not after[:1].isdigit()


def score_trials(
    m: ModelUnderTest, prompts: PasskeyPrompts, trials: list[tuple[list[int], int]], reading: Reading
) -> tuple[list[bool], list[int | None] | None]:
    """(correct, answers) of trials: landmark models generate with retrieval (answers: the first
    integer of each generation), the others are scored teacher-forced (answers None)."""
    keys = [x for _, x in trials]
    if not m.retrieves:
        return [teacher_forced_correct(m, prompts, p, x) for p, x in trials], None
    new = len(prompts.answer(keys[0])) + 2
    outs = m.generate([p for p, _ in trials], new, reading)
    answers = [first_integer(m.decode(o)) for o in outs]
    return [a == x for a, x in zip(answers, keys)], answers


def check_passkey_cells(
    models: list[ModelUnderTest],
    lengths: list[int],
    depths: list[float],
    trials: int,
    seed: int,
    option: str = "--lengths",
    task: PasskeyTask = PasskeyTask(),
) -> None:
    """One-line ValueErrors, before any work, for cells that cannot be run: a bad task, ``trials`` < 1,
    a negative ``seed``, depths outside [0, 1], or a length (``option`` on the command line) too short
    to hold the prompt of one of its trials (its key sentences and question without filler)."""
    task.check()
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
        prompts = PasskeyPrompts(m.encoder)
        for n in lengths:
            need = max(
                prompts.needed(*trial_needles(task, seed, n, d, t, key))
                for d in depths
                for t, key in enumerate(cell_keys(seed, n, d, trials))
            )
            if n < need:
                raise ValueError(
                    f"{option}: {n} tokens cannot hold a {task.label} prompt of model {m.name!r} "
                    f"(minimum {need})"
                )
    task.source()  # the books haystack's corpus is readable


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
    task: PasskeyTask = PasskeyTask(),
) -> list[dict]:
    """Accuracy of every (model, length, depth) cell; finished cells are read from ``cache``.

    Args:
        k, granularity, chunk_len: the retrieval of landmark models.
        options: further retrieval options of landmark models (search, kernel, memory_device,
            max_blocks; see ``landmark.inference.options.session_options``).
        task: the task, haystack and number of keys of the prompts (default: the paper's).

    Returns:
        One dict per cell: model, kind, task, haystack, keys, length, depth, accuracy, correct, trials,
        answers (landmark models: the first integer of each generation), keys asked, seconds.
    """
    check_passkey_cells(models, lengths, depths, trials, seed, task=task)
    reading = Reading(k, granularity, chunk_len, options)
    results = []
    cells = [(m, n, d) for m in models for n in lengths for d in depths]
    bar = tqdm(total=len(cells) * trials, desc="passkey", unit="trial", disable=not progress)
    for m, n, d in cells:
        bar.set_postfix_str(f"{m.name} @ {n} tokens, depth {d:.2f}")
        key = _cell_key(m, n, d, trials, seed, reading, task)
        cached = cache.get(key)
        if cached is None:
            cached = _run_cell(m, PasskeyPrompts(m.encoder, task.source()), task, seed, n, d, trials,
                               reading, bar)  # fmt: skip
            cache.put(key, cached)
        else:
            bar.update(trials)
        results.append({"model": m.name, "kind": m.kind, "task": task.task, "haystack": task.haystack,
                        "keys_per_prompt": task.n_keys, "length": n, "depth": d, **cached})  # fmt: skip
    bar.close()
    return results


def _cell_key(m, n, d, trials, seed, reading: Reading, task: PasskeyTask) -> dict:
    """The cache key of a cell: the weights, the model kind, the cell, the retrieval of landmark models
    and (other than the paper's task) the task."""
    key = {
        "eval": "passkey", "weights": m.fingerprint(), "kind": m.kind, "length": n,
        "depth": d, "trials": trials, "seed": seed,
        "k": reading.k if m.retrieves else None,
        "granularity": reading.granularity if m.retrieves else None,
        "chunk_len": reading.chunk_len if m.retrieves else None,
        "options": cache_key_options(reading.options, m.kind),
    }  # fmt: skip
    fields = task.cache_fields()
    return key if fields is None else key | {"task": fields}


def _run_cell(m, prompts, task, seed, n, d, trials, reading, bar) -> dict:
    """Score the trials of one cell, ``m.trials_per_call`` at a time (None: all in one batch)."""
    t0 = time.perf_counter()
    cell = cell_trials(prompts, task, seed, n, d, trials)
    step = m.trials_per_call or len(cell)
    correct, answers = [], []
    for i in range(0, len(cell), step):
        ok, said = score_trials(m, prompts, cell[i : i + step], reading)
        correct += ok
        answers += said if said is not None else [None] * len(ok)
        bar.update(len(ok))
    return {
        "accuracy": sum(correct) / trials, "correct": sum(correct), "trials": trials,
        "answers": answers if m.retrieves else None, "keys": [x for _, x in cell],
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


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
        if ax is axes[0][0]:
            ax.set_ylabel("context length (tokens)")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
