"""Passkey retrieval against context length and depth (docs/method.md), and two harder tasks.

For each (length, depth) cell, ``trials`` prompts with seeded random five-digit keys are built with
:class:`landmark.data.passkey.PasskeyPrompts` (lengths in tokens of each model's tokenizer, landmarks
not counted) and scored: the first integer the model produces must equal the (asked) key. The task of a
run (:class:`PasskeyTask`): the paper's prompt (the default), prose filler from a corpus's validation
split (``haystack="books"``), or several named keys of which one is asked for (``task="multikey"``).
Everything random in a trial (its key, the other keys and names, where the prose starts) depends only
on (seed, length, depth, trial), so every model sees the same trials.

The wording (``PasskeyTask.wording``, :mod:`landmark.data.wordings`): ``paper`` (the default) asks the
paper's question about five-digit keys; ``train``, ``held-out`` and ``all`` draw each trial's wording
family, value kind (numbers of 5-7 digits, words, UUIDs, names, dates) and value from the trial's own
seeded stream, and score the answer with the kind's matcher (for numbers, the first integer). The report
gives the held-out families' accuracy first.

Both model families (:mod:`landmark.eval.models`) go through the same code:

* landmark models (``landmark``, ``hf-landmark``) generate greedily with top-k retrieval;
* the others (``full``, ``xl``, ``hf``) are scored in one teacher-forced pass over prompt + answer
  (:func:`teacher_forced_correct`): greedy decoding yields the key iff the argmax at each position of
  the answer up to the token that completes the value is the answer's next token and the value's
  matcher still reads the value once the token predicted after it is appended (for numbers: that token
  does not start with a digit). This is equivalent to greedy decoding whose answer starts at the first
  generated token (slightly stricter than "first integer anywhere"), and costs one pass instead of one
  per generated token.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from landmark.data.corpus import CorpusError
from landmark.data.passkey import (
    DEFAULT_MULTIKEY_KEYS,
    HAYSTACKS,
    KEY_RANGE,
    NAMES,
    TASKS,
    BookHaystack,
    Needle,
    PasskeyPrompts,
    multikey_needles,
)
from landmark.data.wordings import KINDS, PAPER, PAPER_KIND, WORDING_SETS, Wording, draw_wording, held_out
from landmark.data.wordings import fingerprint as wording_fingerprint
from landmark.eval.common import CellCache, ModelUnderTest, Reading, cache_key_options
from landmark.optional import pyplot
from landmark.plot import save_png
from landmark.resources import INT64, check_fits

NEEDLE_STREAM, HAYSTACK_STREAM, WORDING_STREAM = 1, 2, 3  # random streams of a trial, besides its key
WORDING_LABELS = {"train": "training wordings", "held-out": "held-out wordings", "all": "all wordings"}


@dataclass(frozen=True)
class PasskeyTask:
    """What the prompts of a passkey evaluation hold.

    Args:
        task: ``"passkey"`` (the paper's: one key) or ``"multikey"`` (``keys`` named keys, one asked).
        haystack: ``"repeat"`` (the paper's repeated sentences) or ``"books"`` (prose of ``corpus``).
        keys: multikey's number of keys, 2 to ``len(NAMES)`` (None: ``DEFAULT_MULTIKEY_KEYS``); the
            passkey task has one.
        corpus: the books haystack's corpus folder (None: the bundled books); its validation split.
        wording: the wording set (:data:`landmark.data.wordings.WORDING_SETS`): ``paper`` (the default),
            ``train``, ``held-out`` or ``all``.
    """

    task: str = "passkey"
    haystack: str = "repeat"
    keys: int | None = None
    corpus: str | None = None
    wording: str = "paper"

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
        if self.wording not in WORDING_SETS:
            raise ValueError(f"--wording must be one of {', '.join(WORDING_SETS)}; got {self.wording!r}")

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
        text = text if self.haystack == "repeat" else f"{text}, {self.haystack} haystack"
        return text if self.wording == "paper" else f"{text}, {WORDING_LABELS[self.wording]}"

    def source(self) -> BookHaystack | None:
        """The prose of a books haystack (read once per corpus), or None."""
        if self.haystack != "books":
            return None
        return _book_haystack(self.corpus)

    def cache_fields(self) -> dict | None:
        """What a cell's cache key adds for this task: None for the paper's (so its cells keep their
        keys), else task, haystack, keys and the prose's corpus fingerprint, and for a wording set other
        than the paper's, the set and its families' fingerprint."""
        if self.task == "passkey" and self.haystack == "repeat" and self.wording == "paper":
            return None
        source = self.source()
        fields = {"task": self.task, "haystack": self.haystack, "keys": self.n_keys,
                  "corpus": None if source is None else source.fingerprint}  # fmt: skip
        if self.wording != "paper":
            fields |= {"wording": self.wording, "families": wording_fingerprint(self.wording)}
        return fields


@functools.lru_cache(maxsize=4)
def _book_haystack(corpus: str | None) -> BookHaystack:
    """The books haystack of ``corpus``; a one-line ValueError naming ``--corpus``."""

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


def trial_needles(
    task: PasskeyTask, seed: int, length: int, depth: float, trial: int, key: int | str, draw=None
):
    """(needles, asked name) of trial ``trial`` of a cell (seeded): the paper's one key, or multikey's named
    keys (the asked one ``key``, at ``depth``; the others ``draw(rng)`` each, by default five-digit
    keys)."""
    if task.task == "passkey":
        return [Needle(key, depth)], None
    rng = _trial_rng(seed, length, depth, trial, NEEDLE_STREAM)
    if draw is None:
        return multikey_needles(rng, key, depth, task.n_keys)
    return multikey_needles(rng, key, depth, task.n_keys, draw)


class TrialSpec(NamedTuple):
    """What one trial asks, before its prompt is composed: the wording family, the value kind, the asked
    value, the needles and the asked name (multikey)."""

    wording: Wording
    kind: str
    key: int | str
    needles: list[Needle]
    ask: str | None


class Trial(NamedTuple):
    """A composed trial: its prompt, the asked value, its kind and its wording family's name."""

    prompt: list[int]
    key: int | str
    kind: str = PAPER_KIND
    family: str = "paper"


def cell_specs(task: PasskeyTask, seed: int, length: int, depth: float, trials: int) -> list[TrialSpec]:
    """The seeded :class:`TrialSpec` of every trial of a cell: the paper's keys (:func:`cell_keys`), or
    each trial's family, kind and value from its own stream (``WORDING_STREAM``)."""
    if task.wording == "paper":
        keys = cell_keys(seed, length, depth, trials)
        return [TrialSpec(PAPER, PAPER_KIND, k, *trial_needles(task, seed, length, depth, t, k))
                for t, k in enumerate(keys)]  # fmt: skip
    out = []
    for t in range(trials):
        family, kind, value = draw_wording(_trial_rng(seed, length, depth, t, WORDING_STREAM), task.wording)
        needles, ask = trial_needles(task, seed, length, depth, t, value, kind.draw)
        out.append(TrialSpec(family, kind.name, value, needles, ask))
    return out


def build_trials(
    prompts: PasskeyPrompts, task: PasskeyTask, seed: int, length: int, depth: float, trials: int
) -> list[Trial]:
    """Every :class:`Trial` of a cell, each prompt exactly ``length`` tokens."""
    out = []
    for t, spec in enumerate(cell_specs(task, seed, length, depth, trials)):
        rng = _trial_rng(seed, length, depth, t, HAYSTACK_STREAM)
        prompt = prompts.with_wording(spec.wording).compose(length, spec.needles, spec.ask, rng)[0]
        out.append(Trial(prompt, spec.key, spec.kind, spec.wording.name))
    return out


def cell_trials(
    prompts: PasskeyPrompts, task: PasskeyTask, seed: int, length: int, depth: float, trials: int
) -> list[tuple[list[int], int | str]]:
    """``(prompt, asked key)`` of every trial of a cell, each prompt exactly ``length`` tokens."""
    return [(t.prompt, t.key) for t in build_trials(prompts, task, seed, length, depth, trials)]


def value_tokens(m: ModelUnderTest, answer: list[int], key: int | str) -> int:
    """How many of the answer's tokens it takes to complete the value ``key`` (its text decoded)."""
    return next(i for i in range(1, len(answer) + 1) if str(key) in m.decode(answer[:i]))


@torch.no_grad()
def teacher_forced_correct(
    m: ModelUnderTest, prompts: PasskeyPrompts, prompt: list[int], key: int | str, kind: str = PAPER_KIND
) -> bool:
    """Whether greedy decoding after ``prompt`` would start with the value's tokens and end the value
    there, from one pass over prompt + the answer's tokens up to the one that completes the value (the
    model's own attention). "Ends there": the kind's matcher, read on the value's tokens and the token
    predicted after them, finds the value (a number followed by a digit is another number; a word
    followed by a letter another word).

    The answer's tokens before the value count too: SmolLM2's tokenizer writes `` 48213`` as a lone
    space followed by the digits, and greedy decoding must produce that space first.
    """
    answer = prompts.answer(key)
    expected = answer[: value_tokens(m, answer, key)]
    pred = m.tail_logits(prompt + expected, len(expected) + 1).argmax(-1).tolist()  # answer..., and after
    if pred[: len(expected)] != expected:
        return False
    return KINDS[kind].correct(m.decode(pred), key)


def score_trials(
    m: ModelUnderTest, prompts: PasskeyPrompts, trials: list[Trial], reading: Reading
) -> tuple[list[bool], list[int | str | None] | None]:
    """(correct, answers) of trials: landmark models generate with retrieval (answers: what the value
    kind's matcher reads in each generation, for numbers the first integer), the others are scored
    teacher-forced (answers None)."""
    if not m.retrieves:
        return [teacher_forced_correct(m, prompts, t.prompt, t.key, t.kind) for t in trials], None
    # enough new tokens for the longest answer (the paper's: the first key's, as its cells always had)
    paper = all(t.family == "paper" for t in trials)
    longest = len(prompts.answer(trials[0].key)) if paper else max(len(prompts.answer(t.key)) for t in trials)
    outs = m.generate([t.prompt for t in trials], longest + 2, reading)
    texts = [m.decode(o) for o in outs]
    answers = [KINDS[t.kind].find(x) for t, x in zip(trials, texts)]
    return [KINDS[t.kind].correct(x, t.key) for t, x in zip(trials, texts)], answers


def check_prompt_memory(lengths: list[int], option: str = "--lengths") -> None:
    """A length whose prompt's token ids alone (8 bytes a token) certainly cannot fit in this machine's
    memory is a ResourceError (a ValueError) naming ``option``: checkable before any model is loaded."""
    for n in lengths:
        check_fits(n * INT64, f"{option} {n}", "a prompt of that many tokens (its token ids alone)", "cpu")


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
    a negative ``seed``, depths outside [0, 1], a length (``option`` on the command line) too short
    to hold the prompt of one of its trials (its key sentences and question without filler), or trials
    and lengths whose keys or prompts certainly cannot fit in this machine's memory."""
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
    cells = len(lengths) * len(depths)
    check_fits(
        cells * trials * INT64,
        f"--trials {trials}",
        f"holding the keys of {cells} cells (8 bytes a trial)",
        "cpu",
    )
    check_prompt_memory(lengths, option)
    for m in models:
        prompts = PasskeyPrompts(m.encoder)
        for n in lengths:
            need = max(
                prompts.with_wording(x.wording).needed(x.needles, x.ask)
                for d in depths
                for x in cell_specs(task, seed, n, d, trials)
            )
            if n < need:
                raise ValueError(
                    f"{option}: {n} tokens cannot hold a {task.label} prompt of model {m.name!r} "
                    f"(minimum {need})"
                )
    task.source()  # the books haystack's corpus is readable


DEFAULT_READING = Reading()  # top-4 retrieval, per token and head, chunks of 256


@dataclass(frozen=True)
class PasskeyGrid:
    """The cells of a passkey evaluation: every length (tokens) x depth (fraction of the filler before
    the key), ``trials`` seeded prompts each (the same prompts for every model)."""

    lengths: list[int]
    depths: list[float]
    trials: int = 1
    seed: int = 0


def evaluate_passkey(
    models: list[ModelUnderTest],
    grid: PasskeyGrid,
    cache: CellCache,
    *,
    reading: Reading = DEFAULT_READING,
    task: PasskeyTask = PasskeyTask(),
    progress: bool = True,
) -> list[dict]:
    """Accuracy of every (model, length, depth) cell; finished cells are read from ``cache``.

    Args:
        reading: how landmark models read (k, granularity, chunk_len, ...); other models use their
            own attention.
        task: the task, haystack and number of keys of the prompts (default: the paper's).

    Returns:
        One dict per cell: model, kind, task, haystack, keys, wording, length, depth, accuracy, correct,
        trials, answers (landmark models: what the value kind's matcher read in each generation, for the
        paper's keys the first integer), keys asked, seconds; for a wording set other than the paper's
        also each trial's family, value kind, split (held_out) and result (hits).
    """
    check_passkey_cells(models, grid.lengths, grid.depths, grid.trials, grid.seed, task=task)
    results = []
    cells = [(m, n, d) for m in models for n in grid.lengths for d in grid.depths]
    bar = tqdm(total=len(cells) * grid.trials, desc="passkey", unit="trial", disable=not progress)
    for m, n, d in cells:
        bar.set_postfix_str(f"{m.name} @ {n} tokens, depth {d:.2f}")
        key = _cell_key(m, (n, d), grid, reading, task)
        cached = cache.get(key)
        if cached is None:
            cached = _run_cell(m, task, grid, (n, d), reading, bar)
            cache.put(key, cached)
        else:
            bar.update(grid.trials)
        results.append({"model": m.name, "kind": m.kind, "task": task.task, "haystack": task.haystack,
                        "keys_per_prompt": task.n_keys, "wording": task.wording, "length": n, "depth": d,
                        **cached})  # fmt: skip
    bar.close()
    return results


def _cell_key(
    m: ModelUnderTest, cell: tuple[int, float], grid: PasskeyGrid, reading: Reading, task: PasskeyTask
) -> dict:
    """The cache key of a (length, depth) cell: the weights, the model kind, the cell, the retrieval and
    the block size and landmark id of landmark models and (other than the paper's task) the task."""
    n, d = cell
    key = {
        "eval": "passkey", "weights": m.fingerprint(), "kind": m.kind, "length": n,
        "depth": d, "trials": grid.trials, "seed": grid.seed,
        "k": reading.k if m.retrieves else None,
        "granularity": reading.granularity if m.retrieves else None,
        "chunk_len": reading.chunk_len if m.retrieves else None,
        "options": cache_key_options(reading.options, m.kind),
        **m.landmark_key(),
    }  # fmt: skip
    fields = task.cache_fields()
    return key if fields is None else key | {"task": fields}


def _run_cell(
    m: ModelUnderTest,
    task: PasskeyTask,
    grid: PasskeyGrid,
    length_depth: tuple[int, float],
    reading: Reading,
    bar,
) -> dict:
    """Score the trials of one (length, depth) cell, ``m.trials_per_call`` at a time (None: all at once)."""
    t0 = time.perf_counter()
    trials = grid.trials
    prompts = PasskeyPrompts(m.encoder, task.source())
    cell = build_trials(prompts, task, grid.seed, *length_depth, trials)
    step = m.trials_per_call or len(cell)
    correct, answers = [], []
    for i in range(0, len(cell), step):
        ok, said = score_trials(m, prompts, cell[i : i + step], reading)
        correct += ok
        answers += said if said is not None else [None] * len(ok)
        bar.update(len(ok))
    out = {
        "accuracy": sum(correct) / trials, "correct": sum(correct), "trials": trials,
        "answers": answers if m.retrieves else None, "keys": [t.key for t in cell],
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip
    if task.wording != "paper":  # each trial's family, kind, split and result
        out |= {"families": [t.family for t in cell], "kinds": [t.kind for t in cell],
                "held_out": [held_out(t.family) for t in cell], "hits": correct}  # fmt: skip
    return out


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


def split_table(results: list[dict], held: bool) -> str:
    """Markdown of the trials of held-out (``held``) or training families only: one row per (model,
    length), per depth the correct trials of that split out of its trials, and the pooled accuracy."""
    depths = sorted({r["depth"] for r in results})
    rows = list(dict.fromkeys((r["model"], r["kind"], r["length"]) for r in results))
    cell = {(r["model"], r["length"], r["depth"]): r for r in results}
    lines = ["| model | length | " + " | ".join(f"depth {d:.0%}" for d in depths) + " | accuracy |"]
    lines.append("|---|---:|" + "---:|" * (len(depths) + 1))
    for name, kind, n in rows:
        counts = [_split_count(cell.get((name, n, d)), held) for d in depths]
        right, total = sum(c for c, _ in counts), sum(t for _, t in counts)
        vals = [f"{c}/{t}" if t else "-" for c, t in counts]
        pooled = f"{right / total:.0%} ({right}/{total})" if total else "-"
        lines.append(f"| {name} ({kind}) | {n} | " + " | ".join(vals) + f" | {pooled} |")
    return "\n".join(lines)


def _split_count(result: dict | None, held: bool) -> tuple[int, int]:
    """(correct, trials) of a cell's trials in held-out (``held``) or training families."""
    if result is None:
        return 0, 0
    picked = [hit for hit, h in zip(result["hits"], result["held_out"]) if h == held]
    return sum(picked), len(picked)


def passkey_report(results: list[dict], wording: str = "paper") -> str:
    """The markdown tables of a run: :func:`passkey_table`, which for a wording set other than the
    paper's says which families it holds; for ``all``, the held-out families' table first, then the
    training families', then both together."""
    if wording == "paper":
        return passkey_table(results)
    if wording != "all":
        which = "held-out" if wording == "held-out" else "training"
        return f"Trials in {which} wording families only.\n\n{passkey_table(results)}"
    return "\n\n".join([
        "**Held-out wording families**", split_table(results, True),
        "**Training wording families**", split_table(results, False),
        "**All wording families**", passkey_table(results),
    ])  # fmt: skip


def plot_passkey(results: list[dict], path) -> None:
    """PNG heatmaps (length x depth) of accuracy, one panel per model."""
    plt = pyplot()

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
    save_png(fig, path, dpi=120, bbox_inches="tight")
