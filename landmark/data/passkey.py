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

Training samples for both model families come from one mix (:class:`PasskeyMix`, its options;
:class:`PasskeySamples`, the sampling core): :class:`PasskeyMixSampler` for the from-scratch models and
:class:`landmark.hf.passkey.PasskeyMixWindows` for fine-tuning Hugging Face models.

Lengths are counted in tokens of the model's tokenizer (landmarks not included). Each piece (and each
sentence of prose) is encoded once with a leading space, so a prompt is a concatenation of token lists
and has exactly the length asked for (the last filler sentence before the question may be cut).
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple

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
MAX_TRAINING_KEYS = 6  # a multikey training sample holds 2 to this many named keys
# the last seed word of a training sampler's streams, after (seed, rank, step) or (seed, window index):
PASSKEY_STREAM = 7919  # which windows become passkey samples (the from-scratch samples' draws too)
VARIANT_STREAM = 15485863  # the variant of each sample (PasskeyMix.variant)
EXTRA_STREAM = 104729  # a fine-tuning sample's draws; the from-scratch repeat windows
# sentence ends in prose: after . ! ? (optionally closing a quote or bracket), before a capital letter
# (optionally opening a quote or bracket); two alternatives because look-behinds have a fixed width
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(]?[A-Z])|(?<=[.!?][\"'”’)])\s+(?=[\"'“‘(]?[A-Z])")


@dataclass(frozen=True)
class Needle:
    """One key sentence of a prompt: its key (an integer, or the text of a value of another kind), its depth
    (0 = right after the instruction, 1 = right before the question) and, in multikey prompts, the name
    it belongs to. ``gap``: exactly so many filler tokens between its key sentence and the question (how
    a near key keeps its drawn distance); None: at the sentence boundary nearest to its depth."""

    key: int | str
    depth: float
    name: str | None = None
    gap: int | None = None


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


def near_distance(rng: np.random.Generator, near_gap: int | None, room: int) -> int:
    """Filler tokens between a near key sentence and its question (:class:`PasskeyMix`): uniformly random
    in ``[0, near_gap]`` (None: in ``[0, room]``), at most ``room``, the filler there is."""
    return min(room, int(rng.integers(0, (room if near_gap is None else near_gap) + 1)))


@dataclass(frozen=True)
class KeyPlace:
    """Where a training sample's asked key sentence goes, counted in filler tokens before its question: at
    least ``min_gap`` of them (a far key, in an earlier block, at a sentence boundary), or, ``near``,
    :func:`near_distance` of them (placed exactly; ``near_gap`` None: anywhere, at a sentence boundary)."""

    min_gap: int
    near: bool = False
    near_gap: int | None = 0

    @property
    def least(self) -> int:
        """The fewest filler tokens a sample needs between the key and the question."""
        return 0 if self.near else self.min_gap

    def needle(self, rng: np.random.Generator, key: int | str, n_filler: int) -> Needle:
        """The asked key's needle in a prompt of ``n_filler`` filler tokens, its depth drawn from ``rng``."""
        if not self.near:
            return Needle(key, rng.integers(0, n_filler - self.min_gap + 1) / n_filler)
        gap = near_distance(rng, self.near_gap, n_filler)
        depth = (n_filler - gap) / n_filler if n_filler else 1.0
        return Needle(key, depth, gap=None if self.near_gap is None else gap)


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
        cuts = [filler.boundary(x.depth) if x.gap is None else max(0, n_filler - x.gap) for x in needles]
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
        self,
        rng: np.random.Generator,
        n_tokens: int,
        min_gap: int,
        keys: int = 1,
        wordings: str = "paper",
        near: bool = False,
        near_gap: int | None = 0,
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

        ``near``: a near key (:class:`KeyPlace`): no ``min_gap``; the question follows the asked key
        sentence after :func:`near_distance` filler tokens (0 to ``near_gap``; None: anywhere).
        """
        place = KeyPlace(min_gap, near, near_gap)
        if wordings != "paper":
            family, kind, value = draw_wording(rng, _training_set(wordings))
            return self.with_wording(family)._sample(rng, n_tokens, place, keys, value, kind.draw)
        return self._sample(rng, n_tokens, place, keys, int(rng.integers(*KEY_RANGE)), _paper_key)

    def _sample(self, rng, n_tokens: int, place: KeyPlace, keys: int, key: int | str, draw) -> list[int]:
        """:meth:`training_sample` with its key drawn (``draw``: the other keys of a multikey sample)."""
        answer = self.answer(key)
        length = n_tokens - len(answer)
        probe = (
            [Needle(key, 0.0)]
            if keys == 1
            else multikey_needles(np.random.default_rng(0), key, 0.0, keys, draw)[0]
        )
        n_filler = length - self.needed(probe, None if keys == 1 else NAMES[0])
        if n_filler < place.least:
            raise ValueError(
                f"{n_filler} filler tokens cannot keep the key {place.least} tokens from the question"
            )
        needle = place.needle(rng, key, n_filler)
        needles, ask = [needle], None
        if keys > 1:
            needles, ask = multikey_needles(rng, key, needle.depth, keys, draw)
        asked = next(i for i, x in enumerate(needles) if x.key == key)
        needles[asked] = dataclasses.replace(needles[asked], gap=needle.gap)
        prompt, cuts = self.compose(length, needles, ask, rng=rng)
        end = self._end_of(needles, cuts, asked)
        if not place.near and len(prompt) - len(self.question_for(ask)) - end < place.min_gap:
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
        near_gap: int | None = 0,
        wordings: str = "paper",
    ) -> list[int]:
        """``n_tokens`` tokens holding ``pairs`` key/question pairs, each with its own random key::

            instruction, filler, [key sentence, >= min_gap filler, question, answer, filler] x pairs

        Every question asks for the most recent key, which lies at least ``min_gap`` tokens back (in an
        earlier block in training); the window ends with the last answer. ``pairs = 1`` is
        :meth:`training_sample`. More pairs per window give more retrieval targets per training token
        (one answer of about 3 tokens per pair, against hundreds of filler tokens that are easy to learn).

        ``near``: the probability that a pair is a near pair (:class:`PasskeyMix`): its question follows
        its key sentence after :func:`near_distance` filler tokens, 0 to ``near_gap`` (not snapped to
        sentence boundaries; None: anywhere in the pair's gap), so the key usually sits in the question's
        own block: the copy can then be learned with ordinary attention, the easy half of the task, while
        the other pairs teach it through the landmarks. ``near = 0`` keeps every key at least ``min_gap``
        tokens back. With ``near_gap = 0`` the key sits at a fixed distance from the answer, and a model
        can learn the copy as "attend so many tokens back", which does not carry over to keys further
        away; random gaps leave only the key's content to find it by.

        ``wordings``: ``"paper"`` (this builder's wording, the default) or ``"train"``: each pair in a
        training family drawn from ``rng`` (:meth:`training_sample`).
        """
        if pairs < 1:
            raise ValueError(f"pairs must be >= 1; got {pairs}")
        if not 0.0 <= near <= 1.0:
            raise ValueError(f"near must be in [0, 1]; got {near}")
        if near_gap is not None and near_gap < 0:
            raise ValueError(f"near_gap must be >= 0 filler tokens (None: anywhere); got {near_gap}")
        if pairs == 1:  # one pair: the one-key sample, near or not (no draw when near is 0)
            is_near = bool(near) and rng.random() < near
            return self.training_sample(
                rng, n_tokens, min_gap, wordings=wordings, near=is_near, near_gap=near_gap
            )
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
                short = near_distance(rng, near_gap, gap)  # all but a short gap
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


@dataclass(frozen=True)
class PasskeyMix:
    """The passkey training mix, one set of options for both model families (``landmark train``'s
    ``data.passkey_*``, ``landmark hf finetune``'s ``--passkey-*``): the share of training windows that
    become passkey samples, and of which kinds. Each kind is drawn per sample (:meth:`variant`), from the
    sample's own seeded stream.

    Args:
        share: share of the training windows replaced by passkey samples (0: off).
        pairs: key/question pairs per sample, each question about the latest key
            (:meth:`PasskeyPrompts.training_window`); more than 1 only with the repeated filler, one
            unnamed key per pair and plain text (``books``, ``multikey`` and ``chat`` 0).
        near: share of the pairs (of a one-pair sample: of the samples) whose key is not held at least one
            block back: its question follows the key sentence after a uniformly random 0 to ``near_gap``
            filler tokens (:func:`near_distance`), the key in the local context, usually the question's
            own block (the local copy; what ``landmark eval passkey`` asks at depth 1).
        near_gap: the most filler tokens between a near key and its question: 0, right before it; None,
            anywhere before the question, at a sentence boundary.
        books: share of the samples whose filler is prose of the training split (a :class:`BookHaystack`)
            instead of the repeated sentences.
        multikey: share of the samples with 2 to :data:`MAX_TRAINING_KEYS` named keys, one asked.
        chat: share of the samples in the tokenizer's chat template (:class:`ChatTurns`): the prompt is
            the user's message, the answer prefix and the value the assistant's reply.
        wordings: ``"paper"`` (the paper's sentences) or ``"train"``: each sample in a training wording
            family (:mod:`landmark.data.wordings`), never a held-out one.

    Raises:
        ValueError: a value out of range, or ``pairs > 1`` with ``books``, ``multikey`` or ``chat``.
    """

    share: float = 0.0
    pairs: int = 1
    near: float = 0.0
    near_gap: int | None = 0
    books: float = 0.0
    multikey: float = 0.0
    chat: float = 0.0
    wordings: str = "paper"

    @classmethod
    def of(cls, config: object) -> PasskeyMix:
        """The mix of a run configuration that spells these options ``passkey_<name>`` (the share as
        ``passkey_fraction``); options it lacks keep their defaults (``chat`` for ``landmark train``)."""
        names = {
            f.name: "passkey_fraction" if f.name == "share" else f"passkey_{f.name}" for f in fields(cls)
        }
        return cls(**{name: getattr(config, attr) for name, attr in names.items() if hasattr(config, attr)})

    def __post_init__(self) -> None:
        for name in ("share", "near", "books", "multikey", "chat"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"passkey {name} must be in [0, 1]; got {getattr(self, name)}")
        if self.pairs < 1:
            raise ValueError(f"passkey pairs must be >= 1; got {self.pairs}")
        if self.near_gap is not None and self.near_gap < 0:
            raise ValueError(
                f"passkey near_gap must be >= 0 filler tokens (None: anywhere); got {self.near_gap}"
            )
        _training_set(self.wordings)
        if self.pairs > 1 and (self.books or self.multikey or self.chat):
            raise ValueError(
                f"{self.pairs} passkey pairs per sample take the repeated filler, one unnamed key per pair "
                "and plain text: set the books, multikey and chat shares to 0, or pairs to 1"
            )

    def variant(self, rng: np.random.Generator) -> PasskeyVariant:
        """The kind of one sample, drawn from ``rng`` (the sample's own stream): with every share 0 no draw
        (the paper's samples); the draws in a fixed order, so that a share added later leaves the earlier
        ones. The near pairs of a sample of several are drawn per pair, with the sample."""
        near = self.near if self.pairs == 1 else 0.0
        if not (self.books or self.multikey or near or self.chat):
            return PasskeyVariant(False, 1, False)
        prose, several = rng.random() < self.books, rng.random() < self.multikey
        keys = int(rng.integers(2, MAX_TRAINING_KEYS + 1)) if several else 1
        is_near = bool(near and rng.random() < near)
        chat = bool(self.chat and rng.random() < self.chat)  # drawn last: the earlier draws stay
        return PasskeyVariant(bool(prose), keys, is_near, chat)


class PasskeyVariant(NamedTuple):
    """The kind of one passkey training sample (:meth:`PasskeyMix.variant`)."""

    prose: bool  # filler from the training split's prose (else the repeated sentences)
    keys: int  # named keys in the sample (1: the paper's one unnamed key)
    near: bool  # the asked key is a near key: its question follows within near_gap filler tokens
    chat: bool = False  # the sample in the tokenizer's chat template (the answer opens the reply)


def window_need(builders: Sequence[PasskeyPrompts], mix: PasskeyMix, min_gap: int) -> int:
    """Tokens a window needs to hold a one-key sample of ``mix`` from each of ``builders`` (in the
    longest family of ``mix.wordings``), its keys at least ``min_gap`` tokens before their questions, with
    ``mix.pairs`` pairs (each pair after the first repeats all but the instruction)."""
    one = max(b.min_sample(mix.wordings) for b in builders) + min_gap
    return one + (mix.pairs - 1) * (one - len(builders[0].instruction))


class PasskeySamples:
    """The sampling core of the passkey training mix, for one tokenizer and both model families: the prompt
    builder of each :class:`PasskeyVariant`, and samples of an exact length.

    Args:
        tokenizer: anything with ``encode(text) -> list[int]`` (:class:`Tokenizer`, or a Hugging Face
            tokenizer through :class:`landmark.hf.passkey.HFTokenEncoder`).
        mix: the options.
        haystack: the prose of the training split (a :class:`BookHaystack`); needed when ``mix.books``.
        turns: what the tokenizer's chat template puts around a message; needed when ``mix.chat``.

    Raises:
        ValueError: books or chat asked for without a haystack or a chat template.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        mix: PasskeyMix,
        haystack: BookHaystack | None = None,
        turns: ChatTurns | None = None,
    ) -> None:
        if mix.books and haystack is None:
            raise ValueError("passkey books > 0 needs a haystack (the BookHaystack of the training split)")
        if mix.chat and turns is None:
            raise ValueError("passkey chat > 0 needs the turns of a chat template; this tokenizer has none")
        self.mix = mix
        proses = (False, True) if mix.books else (False,)
        chats = (False, True) if mix.chat else (False,)
        self.builders = {  # (prose, chat) -> the builder
            (prose, chat): PasskeyPrompts(
                tokenizer, haystack if prose else None, chat=turns if chat else None
            )
            for prose in proses
            for chat in chats
        }

    def need(self, min_gap: int) -> int:
        """Tokens a window needs (:func:`window_need`; the prose builders need what the others do)."""
        plain = [b for (prose, _), b in self.builders.items() if not prose]
        return window_need(plain, self.mix, min_gap)

    def sample(
        self, rng: np.random.Generator, variant: PasskeyVariant, n_tokens: int, min_gap: int
    ) -> list[int]:
        """A sample of ``variant`` of exactly ``n_tokens`` token ids, prompt and answer, drawn from ``rng``;
        the far keys at least ``min_gap`` filler tokens before their questions. A multikey sample whose keys
        do not fit in the window: the one-key sample of the same stream."""
        mix, builder = self.mix, self.builders[(variant.prose, variant.chat)]
        if mix.pairs > 1:
            return builder.training_window(
                rng, n_tokens, min_gap, mix.pairs, mix.near, mix.near_gap, mix.wordings
            )
        state = rng.bit_generator.state
        try:
            return builder.training_sample(
                rng, n_tokens, min_gap, variant.keys, mix.wordings, variant.near, mix.near_gap
            )
        except ValueError:
            if variant.keys == 1:
                raise
        rng.bit_generator.state = state  # the draws of a one-key sample from the start of the stream
        return builder.training_sample(rng, n_tokens, min_gap, 1, mix.wordings, variant.near, mix.near_gap)


class PasskeyMixSampler:
    """A training sampler of the from-scratch models that replaces a seeded share of each batch's windows
    with passkey samples (:class:`PasskeyMix`, :class:`PasskeySamples`), and optionally a second share
    with repeat windows (``repeat_span``: corpus text in which a span of the window comes back later).

    ``batch(step)`` stays a pure function of (seed, rank, step), so resuming is exact. The repeat
    windows and the samples' variants are drawn from streams of their own, so ``repeat_fraction = 0``
    and the shares at 0 give exactly the batches of earlier versions.

    Args:
        base: the sampler of corpus windows.
        tokenizer: the run's tokenizer.
        mix: the passkey options (``mix.chat`` needs a chat template: refused).
        seed, rank: the run's seed and data-parallel rank.
        repeat_fraction: share of the windows turned into repeat windows, at most ``1 - mix.share``.
        haystack: the training split's prose, for ``mix.books``.
    """

    def __init__(
        self,
        base: WindowSampler,
        tokenizer: Tokenizer,
        mix: PasskeyMix,
        seed: int = 0,
        rank: int = 0,
        repeat_fraction: float = 0.0,
        haystack: BookHaystack | None = None,
    ):
        if not 0.0 <= repeat_fraction <= 1.0 - mix.share:
            raise ValueError(
                f"repeat_fraction must be in [0, 1 - passkey_fraction = {1.0 - mix.share:g}]; "
                f"got {repeat_fraction}"
            )
        self.base, self.mix, self.seed, self.rank = base, mix, seed, rank
        self.repeat_fraction = repeat_fraction
        self.samples = PasskeySamples(tokenizer, mix, haystack)
        layout = base.layout
        self.n_raw = layout.regular_tokens + 1  # a window reads one token more than it feeds (the target)
        # the key must end in an earlier block than the question: at least one block of regular tokens
        self.min_gap = layout.block_size - 1 if layout.landmarks else 1
        need = self.samples.need(self.min_gap)
        if mix.share > 0 and self.n_raw < need:
            raise ValueError(
                f"{mix.pairs} passkey pair(s) per window need windows of at least {need} tokens with this "
                f"tokenizer; the window holds {self.n_raw}: use a longer seq_len, fewer passkey_pairs "
                "or passkey_fraction = 0"
            )

    def batch(self, step: int) -> Batch:
        """Batch ``step`` of the base sampler with its passkey and repeat rows replaced."""
        batch = self.base.batch(step)
        rows = batch.input_ids.shape[0]
        rng = np.random.default_rng([self.seed, self.rank, step, PASSKEY_STREAM])
        passkey_rows = np.flatnonzero(rng.random(rows) < self.mix.share)
        if self.repeat_fraction:  # among the other rows, a share becomes repeat windows (own stream)
            rrng = np.random.default_rng([self.seed, self.rank, step, EXTRA_STREAM])
            chosen = rrng.random(rows) < self.repeat_fraction / (1.0 - self.mix.share)
            starts = self.base.starts(step)
            for row in np.flatnonzero(chosen):
                if row in passkey_rows:
                    continue
                raw = np.asarray(self.base.tokens[starts[row] : starts[row] + self.n_raw], dtype=np.int64)
                self._put(batch, row, torch.from_numpy(repeat_span(raw, rrng)))
        variants = np.random.default_rng([self.seed, self.rank, step, VARIANT_STREAM])
        for row in passkey_rows:
            raw = self.samples.sample(rng, self.mix.variant(variants), self.n_raw, self.min_gap)
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
