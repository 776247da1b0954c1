"""The passkey retrieval task (docs/method.md): prompts for evaluation, samples for training.

A prompt is the instruction, filler, the key sentence at a chosen depth, more filler, and the question;
the answer is the key::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will
    quiz you about the important information there. The grass is green. The sky is blue. ... The pass
    key is 48213. Remember it. 48213 is the pass key. ... What is the pass key? The pass key is 48213.

That is the paper's task, the default. Two harder variants use the same builder:

* **books haystack** (:class:`BookHaystack`): the filler is real prose, consecutive sentences of a
  corpus's validation split from a seeded sentence on, instead of the repeated sentences; the key
  sentence goes to the sentence boundary nearest to its depth.
* **multikey** (:func:`multikey_needles`, after RULER's multi-key needle): several key sentences with
  different names ("The pass key for Alice is 48213. ...") at depths spread over the context; the
  question asks for one of them by name ("What is the pass key for Alice? The pass key for Alice is").

Both take other **wordings** (:mod:`landmark.data.wordings`): a :class:`PasskeyPrompts` with another
wording family states other values (numbers of 5-7 digits, words, UUIDs, names, dates) in other words;
the training samplers draw from the training families only when asked (``wordings="train"``).

Lengths are counted in tokens of the model's tokenizer (landmarks not included). Each piece (and each
sentence of prose) is encoded once with a leading space, so a prompt is a concatenation of token lists
and has exactly the length asked for (the last filler sentence before the question may be cut).
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from landmark.data.books import bundled_books
from landmark.data.corpus import CorpusError, read_corpus
from landmark.data.landmarks import landmark_example
from landmark.data.tokenizer import Tokenizer
from landmark.data.windows import Batch, WindowSampler
from landmark.data.wordings import (
    KINDS,
    PAPER,
    TRAINING_WORDINGS,
    Wording,
    draw_wording,
    families,
    first_integer,
)

__all__ = ["first_integer"]  # re-exported: where the evaluation and the probes have always found it

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NAMED_KEY_SENTENCE = "The pass key for {name} is {key}. Remember it. {key} is the pass key for {name}."
NAMED_QUESTION = "What is the pass key for {name}? The pass key for {name} is"
KEY_RANGE = (10000, 100000)  # five-digit keys
# the names of multikey's keys (--keys is at most their number)
NAMES = (
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ines", "Jonas",
    "Kemal", "Lena", "Marco", "Nadia", "Oscar", "Priya", "Rosa", "Sven", "Tamara", "Victor",
)  # fmt: skip
TASKS = ("passkey", "multikey")
HAYSTACKS = ("repeat", "books")
DEFAULT_MULTIKEY_KEYS = 4  # keys of --task multikey unless --keys says otherwise
# sentence ends in prose: after . ! ? (optionally closing a quote or bracket), before a capital letter
# (optionally opening a quote or bracket); two alternatives because look-behinds have a fixed width
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(]?[A-Z])|(?<=[.!?][\"'”’)])\s+(?=[\"'“‘(]?[A-Z])")


@dataclass(frozen=True)
class Needle:
    """One key sentence of a prompt: its key (an integer, or the text of a value of another kind), its depth
    (0 = right after the instruction, 1 = right before the question) and, in multikey prompts, the name
    it belongs to."""

    key: int | str
    depth: float
    name: str | None = None


def _paper_key(rng: np.random.Generator) -> int:
    return int(rng.integers(*KEY_RANGE))


def multikey_needles(
    rng: np.random.Generator,
    key: int | str,
    depth: float,
    count: int,
    draw: Callable[[np.random.Generator], int | str] = _paper_key,
) -> tuple[list[Needle], str]:
    """``count`` named keys, the asked one (``key``) at ``depth``, the others spread over the context.

    The depths are the ``count`` evenly spaced slots ``0, 1/(count-1), ..., 1``, the slot nearest to
    ``depth`` moved to ``depth`` for the asked key; names (from :data:`NAMES`) and the other keys (all
    distinct from each other and from ``key``; ``draw(rng)`` each, by default a five-digit key) are drawn
    from ``rng``.

    Returns:
        (needles, the asked name).
    """
    if not 2 <= count <= len(NAMES):
        raise ValueError(f"multikey needs 2 to {len(NAMES)} keys; got {count}")
    names = [str(n) for n in rng.choice(NAMES, size=count, replace=False)]
    keys = {key}
    while len(keys) < count:
        keys.add(draw(rng))
    others = sorted(keys - {key})
    rng.shuffle(others)
    slots = [i / (count - 1) for i in range(count)]
    asked = min(range(count), key=lambda i: abs(slots[i] - depth))
    slots[asked] = depth
    needles = [Needle(key if i == asked else others.pop(), slots[i], names[i]) for i in range(count)]
    return needles, names[asked]


def _probe_values(wording: Wording, draws: int = 16) -> list[str]:
    """Values of every kind of a family to size its samples: ``draws`` seeded ones each."""
    rng = np.random.default_rng(0)
    return [KINDS[k].draw(rng) for k in wording.kinds for _ in range(draws)]


def _training_set(wordings: str) -> str:
    """The wording set a training sampler may draw from; a ValueError for any other (held-out ones)."""
    if wordings not in TRAINING_WORDINGS:
        raise ValueError(f"training wordings must be one of {', '.join(TRAINING_WORDINGS)}; got {wordings!r}")
    return wordings


class BookHaystack:
    """Real prose as filler: the sentences of one split of a corpus (default the validation split of the
    bundled books), read once; each prompt takes consecutive sentences from a seeded one on.

    Args:
        corpus: a corpus folder (:func:`landmark.data.read_corpus`); None: the bundled books.
        split: the split whose documents give the sentences.

    Raises:
        CorpusError / FileNotFoundError: the corpus cannot be read (or the split is missing).
    """

    def __init__(self, corpus: str | Path | None = None, split: str = "validation") -> None:

        read = read_corpus(corpus if corpus is not None else bundled_books())
        if split not in read.splits:
            raise CorpusError(f"corpus {read.root} has no {split!r} split (it has {sorted(read.splits)})")
        self.root, self.split, self.fingerprint = read.root, split, read.fingerprint(split)
        self.sentences: list[str] = []
        for doc in read.splits[split]:
            text = " ".join(doc.read_text().split())  # line breaks and runs of spaces -> one space
            self.sentences += [s for s in _SENTENCE_END.split(text) if s]
        if not self.sentences:
            raise CorpusError(f"the {split!r} split of {read.root} holds no text")

    def sentences_from(self, rng: np.random.Generator):
        """Consecutive sentences from a seeded first one (after the split's last, its first again)."""
        i = int(rng.integers(len(self.sentences)))
        while True:
            yield self.sentences[i]
            i = (i + 1) % len(self.sentences)


@dataclass(frozen=True)
class Filler:
    """``tokens`` of filler and where its sentences start (token offsets, the first 0, ascending), or
    ``starts`` None for the repeated filler, whose boundaries are the multiples of ``unit``."""

    tokens: list[int]
    starts: list[int] | None = None
    unit: int = 0

    def boundary(self, depth: float) -> int:
        """The sentence boundary where a key sentence at ``depth`` goes: the one nearest to
        ``depth * len(tokens)`` (repeated filler: rounded to whole filler groups, as the paper's
        prompts always were)."""
        n = len(self.tokens)
        if self.starts is None:
            return min(n, round(depth * n / self.unit) * self.unit)
        x = depth * n
        i = bisect.bisect_left(self.starts, x)
        return min(self.starts[max(0, i - 1) : i + 1], key=lambda s: abs(s - x))


@dataclass(frozen=True)
class ChatTurns:
    """What a chat template puts around a prompt, as token ids: ``user`` before the user's message (the
    template's system turn included), ``assistant`` between the message and the assistant's answer.
    :func:`landmark.hf.passkey.chat_turns` reads them off a Hugging Face tokenizer's template."""

    user: tuple[int, ...]
    assistant: tuple[int, ...]


@dataclass
class PasskeyPrompts:
    """Token-level passkey prompts for one tokenizer.

    Args:
        tokenizer: anything with ``encode(text) -> list[int]`` (:class:`Tokenizer`, or a Hugging Face
            tokenizer through :class:`landmark.hf.passkey.HFTokenEncoder`).
        haystack: None for the paper's repeated filler, or a :class:`BookHaystack` (real prose).
        wording: the family whose key sentences and questions the prompts hold (default: the paper's).
        chat: None for plain text, or the :class:`ChatTurns` of a chat template: the instruction, the
            filler, the key sentences and the question are the user's message, and the answer prefix
            (``"The locker code is"``) starts the assistant's reply.
    """

    tokenizer: Tokenizer
    haystack: BookHaystack | None = None
    wording: Wording = PAPER
    chat: ChatTurns | None = None

    def __post_init__(self) -> None:
        enc = self.tokenizer.encode
        self.instruction = enc(INSTRUCTION) if self.chat is None else [*self.chat.user, *enc(INSTRUCTION)]
        self.filler = enc(" " + FILLER)
        self.question = self._question_tokens(None)

    def _question_tokens(self, name: str | None) -> list[int]:
        """The question and the answer prefix (in a chat: the user's question, the turn change, then the
        answer prefix opening the assistant's reply)."""
        w = self.wording
        if self.chat is None:
            return self.tokenizer.encode(" " + w.question_text(name))
        question, answer = w.question_text(name, answer=False), w.answer_text(name)
        reply = self.tokenizer.encode(answer) if answer else []
        return [*self.tokenizer.encode(" " + question), *self.chat.assistant, *reply]

    def with_wording(self, wording: Wording) -> PasskeyPrompts:
        """The same builder (tokenizer, haystack) with another wording family."""
        return self if wording == self.wording else dataclasses.replace(self, wording=wording)

    def key_sentence(self, key: int | str, name: str | None = None) -> list[int]:
        """The key sentence (named in multikey prompts)."""
        return self.tokenizer.encode(" " + self.wording.key_text(key, name))

    def question_for(self, name: str | None = None) -> list[int]:
        """The question (about the key of ``name`` in multikey prompts)."""
        return self.question if name is None else self._question_tokens(name)

    def answer(self, key: int | str) -> list[int]:
        """The expected continuation: `` 48213.``"""
        return self.tokenizer.encode(f" {key}.")

    def min_length(self, key: int = 99999) -> int:
        """Tokens of a prompt of the paper's task without filler."""
        return self.needed([Needle(key, 0.0)])

    def min_sample(self, wordings: str = "paper") -> int:
        """Tokens of a one-key training sample without filler (prompt and answer) in the longest family of
        a wording set, with long values of each kind (the paper's: :meth:`min_length` + the answer of
        the largest key)."""
        if wordings == "paper":
            return self.min_length() + len(self.answer(KEY_RANGE[1] - 1))
        return max(
            b.needed([Needle(v, 0.0)]) + len(b.answer(v))
            for b in map(self.with_wording, families(_training_set(wordings)))
            for v in _probe_values(b.wording)
        )

    def needed(self, needles: Sequence[Needle], ask: str | None = None) -> int:
        """Tokens of a prompt holding ``needles`` and the question about ``ask``, without filler."""
        sentences = sum(len(self.key_sentence(x.key, x.name)) for x in needles)
        return len(self.instruction) + sentences + len(self.question_for(ask))

    def prompt(
        self, length: int, depth: float, key: int, rng: np.random.Generator | None = None
    ) -> list[int]:
        """A prompt of the paper's task of exactly ``length`` tokens with the key sentence at ``depth`` (0 =
        right after the instruction, 1 = right before the question), snapped to a sentence boundary;
        ``rng`` picks the prose of a books haystack."""
        return self.compose(length, [Needle(key, depth)], rng=rng)[0]

    def compose(
        self,
        length: int,
        needles: Sequence[Needle],
        ask: str | None = None,
        rng: np.random.Generator | None = None,
    ) -> tuple[list[int], list[int]]:
        """A prompt of exactly ``length`` tokens: the instruction, filler with the ``needles``' key
        sentences at their depths (each at a sentence boundary), the question about ``ask`` (None: the
        paper's question).

        Returns:
            (prompt, the number of filler tokens before each needle, in the order given).

        Raises:
            ValueError: a depth outside [0, 1], or ``length`` too short for the prompt without filler.
        """
        bad = [x.depth for x in needles if not 0.0 <= x.depth <= 1.0]
        if bad:
            raise ValueError(f"depth must be in [0, 1]; got {bad[0]}")
        n_filler = length - self.needed(needles, ask)
        if n_filler < 0:
            raise ValueError(
                f"length {length} is too short for a passkey prompt (minimum {self.needed(needles, ask)})"
            )
        filler = self._filler(n_filler, rng)
        cuts = [filler.boundary(x.depth) for x in needles]
        out, done = list(self.instruction), 0
        for i in sorted(range(len(needles)), key=lambda i: cuts[i]):  # stable: ties keep the given order
            out += filler.tokens[done : cuts[i]] + self.key_sentence(needles[i].key, needles[i].name)
            done = cuts[i]
        return out + filler.tokens[done:] + self.question_for(ask), cuts

    def _filler(self, n: int, rng: np.random.Generator | None) -> Filler:
        """``n`` tokens of filler: the repeated sentences, or prose from the haystack (``rng`` needed)."""
        if self.haystack is None:
            unit = len(self.filler)
            return Filler((self.filler * (n // unit + 1))[:n], unit=unit)
        if rng is None:
            raise ValueError("a books haystack needs rng: the prose of a prompt is drawn with it")
        tokens, starts = [], []
        sentences = self.haystack.sentences_from(rng)
        while len(tokens) < n:
            starts.append(len(tokens))
            tokens += self.tokenizer.encode(" " + next(sentences))
        if len(tokens) == n:  # the last sentence ends right before the question: a boundary too
            starts.append(n)
        return Filler(tokens[:n], starts)

    def training_sample(
        self, rng: np.random.Generator, n_tokens: int, min_gap: int, keys: int = 1, wordings: str = "paper"
    ) -> list[int]:
        """``n_tokens`` tokens ending with the answer; at least ``min_gap`` filler tokens separate the asked
        key sentence from the question (so that, in training, the key lies in an earlier block).

        ``keys`` > 1: a multikey sample (named keys spread over the window, one asked, as
        :func:`multikey_needles`); the filler is this builder's (repeated sentences, or the haystack's
        prose drawn with ``rng``). With ``keys`` 1 and no haystack, the paper's sample (its draws from
        ``rng`` unchanged).

        ``wordings``: ``"paper"`` (this builder's wording, the default) or ``"train"``: a training family
        (never a held-out one), a value kind and a value drawn from ``rng`` first
        (:func:`landmark.data.wordings.draw_wording`).
        """
        if wordings != "paper":
            family, kind, value = draw_wording(rng, _training_set(wordings))
            return self.with_wording(family)._sample(rng, n_tokens, min_gap, keys, value, kind.draw)
        return self._sample(rng, n_tokens, min_gap, keys, int(rng.integers(*KEY_RANGE)), _paper_key)

    def _sample(self, rng, n_tokens: int, min_gap: int, keys: int, key: int | str, draw) -> list[int]:
        """:meth:`training_sample` with its key drawn (``draw``: the other keys of a multikey sample)."""
        answer = self.answer(key)
        length = n_tokens - len(answer)
        probe = (
            [Needle(key, 0.0)]
            if keys == 1
            else multikey_needles(np.random.default_rng(0), key, 0.0, keys, draw)[0]
        )
        n_filler = length - self.needed(probe, None if keys == 1 else NAMES[0])
        if n_filler < min_gap:
            raise ValueError(
                f"{n_filler} filler tokens cannot keep the key {min_gap} tokens from the question"
            )
        depth = rng.integers(0, n_filler - min_gap + 1) / n_filler
        needles, ask = [Needle(key, depth)], None
        if keys > 1:
            needles, ask = multikey_needles(rng, key, depth, keys, draw)
        asked = next(i for i, x in enumerate(needles) if x.key == key)
        prompt, cuts = self.compose(length, needles, ask, rng=rng)
        if len(prompt) - len(self.question_for(ask)) - self._end_of(needles, cuts, asked) < min_gap:
            # snapping to a sentence boundary moved the key too late: put it first
            needles[asked] = Needle(key, 0.0, needles[asked].name)
            prompt, _ = self.compose(length, needles, ask, rng=rng)
        return prompt + answer

    def _end_of(self, needles: Sequence[Needle], cuts: list[int], i: int) -> int:
        """Where needle ``i``'s key sentence ends in a prompt composed with filler ``cuts``: the
        instruction, the filler before it, and the key sentences placed before or at its cut."""
        before = [j for j in range(len(needles)) if cuts[j] < cuts[i] or (cuts[j] == cuts[i] and j <= i)]
        sentences = sum(len(self.key_sentence(needles[j].key, needles[j].name)) for j in before)
        return len(self.instruction) + cuts[i] + sentences

    def training_window(
        self,
        rng: np.random.Generator,
        n_tokens: int,
        min_gap: int,
        pairs: int = 1,
        near: float = 0.0,
        near_gap: int = 0,
        wordings: str = "paper",
    ) -> list[int]:
        """``n_tokens`` tokens holding ``pairs`` key/question pairs, each with its own random key::

            instruction, filler, [key sentence, >= min_gap filler, question, answer, filler] x pairs

        Every question asks for the most recent key, which lies at least ``min_gap`` tokens back (in an
        earlier block in training); the window ends with the last answer. ``pairs = 1`` is
        :meth:`training_sample`. More pairs per window give more retrieval targets per training token
        (one answer of about 3 tokens per pair, against hundreds of filler tokens that are easy to learn).

        ``near``: the probability that a pair's question follows its key sentence directly (no filler in
        between, so the key usually sits in the question's own block): the copy can then be learned
        with ordinary attention, the easy half of the task, while the other pairs teach it through the
        landmarks. ``near = 0`` keeps every key at least ``min_gap`` tokens back.

        ``near_gap``: a near pair's question follows its key sentence after a uniformly random number of
        filler tokens in ``[0, near_gap]`` (not snapped to sentence boundaries) instead of directly. With
        ``near_gap = 0`` the key sits at a fixed distance from the answer, and a model can learn the copy
        as "attend so many tokens back", which does not carry over to keys further away; random gaps
        leave only the key's content to find it by.

        ``wordings``: ``"paper"`` (this builder's wording, the default) or ``"train"``: each pair in a
        training family drawn from ``rng`` (:meth:`training_sample`).
        """
        if pairs < 1:
            raise ValueError(f"pairs must be >= 1; got {pairs}")
        if not 0.0 <= near <= 1.0:
            raise ValueError(f"near must be in [0, 1]; got {near}")
        if near_gap < 0:
            raise ValueError(f"near_gap must be >= 0 filler tokens; got {near_gap}")
        if pairs == 1 and near == 0.0:
            return self.training_sample(rng, n_tokens, min_gap, wordings=wordings)
        if wordings == "paper":
            keys = [(self, int(k)) for k in rng.integers(*KEY_RANGE, size=pairs)]
        else:
            drawn = [draw_wording(rng, _training_set(wordings)) for _ in range(pairs)]
            keys = [(self.with_wording(family), value) for family, _, value in drawn]
        fixed = len(self.instruction) + sum(
            len(b.key_sentence(k)) + len(b.question) + len(b.answer(k)) for b, k in keys
        )
        spare = n_tokens - fixed - pairs * min_gap
        if spare < 0:
            raise ValueError(
                f"{n_tokens} tokens cannot hold {pairs} passkey pairs with {min_gap} filler tokens between "
                f"each key and its question (need {n_tokens - spare})"
            )
        # 2 * pairs filler runs: one before each key sentence, one between each key and its question;
        # the spare tokens are split among them at uniformly random cut points.
        cuts = np.sort(rng.integers(0, spare + 1, size=2 * pairs - 1))
        extra = np.diff(np.concatenate([[0], cuts, [spare]]))
        unit = len(self.filler)

        def filler(n: int) -> list[int]:  # starts at a sentence boundary, may end inside a sentence
            return (self.filler * (n // unit + 1))[:n]

        out = list(self.instruction)
        for i, (builder, key) in enumerate(keys):
            gap = min_gap + int(extra[2 * i + 1])
            before = int(extra[2 * i])
            if near and rng.random() < near:  # the gap's filler moves before the key sentence
                short = min(gap, int(rng.integers(0, near_gap + 1)))  # all but a short gap
                before, gap = before + gap - short, short
            out += filler(before) + builder.key_sentence(key)
            out += filler(gap) + builder.question + builder.answer(key)
        assert len(out) == n_tokens
        return out


REPEAT_SPAN = (16, 64)  # tokens of the span that a repeat window copies (inclusive range)


def repeat_span(raw: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A corpus window in which a span of its own text comes back later: ``raw`` with
    ``raw[b : b + m] = raw[a : a + m]`` for a random span length ``m`` in ``REPEAT_SPAN`` and random
    ``a < b - m + 1`` (the copy starts after the original ends, from right after it to the window's end).

    Every token of the copy but the first is predictable by finding the original and reading on: dense
    copy targets (up to 63 per window, against about 3 for a passkey answer) at distances from zero to
    the whole window, most of them in an earlier block, reached through its landmark. The text around
    stays natural.
    """
    n = len(raw)
    m = int(rng.integers(REPEAT_SPAN[0], REPEAT_SPAN[1] + 1))
    if n < 2 * m + 1:
        raise ValueError(f"a window of {n} tokens cannot repeat a span of {m} tokens")
    a = int(rng.integers(0, n - 2 * m + 1))
    b = int(rng.integers(a + m, n - m + 1))
    out = np.array(raw, copy=True)
    out[b : b + m] = raw[a : a + m]
    return out


class PasskeyMixSampler:
    """A training sampler that replaces a seeded fraction of each batch's windows with passkey samples,
    and optionally a second fraction with repeat windows (``repeat_span``: corpus text in which a span
    of the window comes back later).

    ``batch(step)`` stays a pure function of (seed, rank, step), so resuming is exact. The repeat
    windows are drawn from a separate random stream, so ``repeat_fraction = 0`` gives exactly the
    batches of earlier versions.
    """

    def __init__(
        self,
        base: WindowSampler,
        tokenizer: Tokenizer,
        fraction: float,
        seed: int = 0,
        rank: int = 0,
        pairs: int = 1,
        near: float = 0.0,
        near_gap: int = 0,
        repeat_fraction: float = 0.0,
        wordings: str = "paper",
    ):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"passkey_fraction must be in [0, 1]; got {fraction}")
        if not 0.0 <= repeat_fraction <= 1.0 - fraction:
            raise ValueError(
                f"repeat_fraction must be in [0, 1 - passkey_fraction = {1.0 - fraction:g}]; "
                f"got {repeat_fraction}"
            )
        if pairs < 1:
            raise ValueError(f"passkey_pairs must be >= 1; got {pairs}")
        if not 0.0 <= near <= 1.0:
            raise ValueError(f"passkey_near must be in [0, 1]; got {near}")
        if near_gap < 0:
            raise ValueError(f"passkey_near_gap must be >= 0; got {near_gap}")
        self.base, self.fraction, self.seed, self.rank, self.pairs = base, fraction, seed, rank, pairs
        self.near, self.near_gap, self.repeat_fraction = near, near_gap, repeat_fraction
        self.wordings = _training_set(wordings)  # "paper" or "train": never held-out families
        self.prompts = PasskeyPrompts(tokenizer)
        layout = base.layout
        self.n_raw = layout.regular_tokens + 1  # a window reads one token more than it feeds (the target)
        # the key must end in an earlier block than the question: at least one block of regular tokens
        self.min_gap = layout.block_size - 1 if layout.landmarks else 1
        one = self.prompts.min_sample(wordings) + self.min_gap
        need = one + (pairs - 1) * (one - len(self.prompts.instruction))
        if fraction > 0 and self.n_raw < need:
            raise ValueError(
                f"{pairs} passkey pair(s) per window need windows of at least {need} tokens with this "
                f"tokenizer; the window holds {self.n_raw}: use a longer seq_len, fewer passkey_pairs "
                "or passkey_fraction = 0"
            )

    def batch(self, step: int) -> Batch:
        batch = self.base.batch(step)
        rng = np.random.default_rng([self.seed, self.rank, step, 7919])
        passkey_rows = np.flatnonzero(rng.random(batch.input_ids.shape[0]) < self.fraction)
        if self.repeat_fraction:  # among the other rows, a share becomes repeat windows (own stream)
            rrng = np.random.default_rng([self.seed, self.rank, step, 104729])
            chosen = rrng.random(batch.input_ids.shape[0]) < self.repeat_fraction / (1.0 - self.fraction)
            starts = self.base.starts(step)
            for row in np.flatnonzero(chosen):
                if row in passkey_rows:
                    continue
                raw = np.asarray(self.base.tokens[starts[row] : starts[row] + self.n_raw], dtype=np.int64)
                self._put(batch, row, torch.from_numpy(repeat_span(raw, rrng)))
        for row in passkey_rows:
            raw = self.prompts.training_window(
                rng, self.n_raw, self.min_gap, self.pairs, self.near, self.near_gap, self.wordings
            )
            self._put(batch, row, torch.tensor(raw, dtype=torch.long))
        return batch

    def _put(self, batch: Batch, row: int, raw: torch.Tensor) -> None:
        """Replace one row of the batch by the window of raw tokens ``raw`` (``n_raw`` of them)."""
        layout = self.base.layout
        if layout.landmarks:
            inp, tgt = landmark_example(raw, layout.block_size, layout.landmark_id, layout.ignore_index)
        else:
            inp, tgt = raw[:-1], raw[1:]
        batch.input_ids[row], batch.targets[row] = inp, tgt
