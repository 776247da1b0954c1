"""Generation with landmarks: one loop and one sampling rule for every model family.

A *reader* is anything that continues a batch of streams and returns the logits of each row's last
real position: ``InferenceSession.read`` for the library's ``GPT``, ``landmark.hf.generate``'s reader
for Hugging Face models (a ``LandmarkRetrievalCache`` or, for exact attention, a ``DynamicCache``).
``generate_with`` reads the prompts (landmarks inserted, consumed chunk by chunk: memory stays the
block memory plus one chunk) and then decodes token by token.

Landmarks are fed, never sampled. A prompt that ends with a complete block keeps its landmark back;
whenever the next stream position is a landmark position, the landmark is fed together with the next
regular token (``[landmark, token]``), and the following token is predicted from that token's output.
So the next token is always predicted by a regular token's output, as in training, where landmark
positions are not targets (docs/method.md), and the landmark's key joins the memory like
any other block's.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from landmark.data.landmarks import holds_integer_ids
from landmark.files import model_sources
from landmark.inference.cache import RetrievalCache, StateFiles
from landmark.inference.session import InferenceSession
from landmark.model import GPT, ModelConfig
from landmark.resources import INT64, check_fits, format_bytes

TokenCallback = Callable[[int, int], None]  # (batch row, token id)
Reader = Callable[[Tensor, Tensor], Tensor]  # (ids (B, C), lengths (B,)) -> (B, vocab) last logits


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature == 0``) or sampled at ``temperature`` from
    the smallest set of tokens whose probability reaches ``top_p``; ``seed`` seeds the sampler."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0; got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {self.temperature}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p!r}")
        if self.temperature == 0 and self.top_p < 1:
            raise ValueError(f"top_p={self.top_p} samples, and temperature=0 is greedy: set temperature > 0")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None (random); got {self.seed!r}")
        if self.seed is not None and not 0 <= self.seed <= 2**63 - 1:
            raise ValueError(f"seed must be in [0, 2**63 - 1]; got {self.seed}")


GREEDY = Sampling()  # the default: the most likely token


class BlockBytes(NamedTuple):
    """What one position costs in the block memory and where it is kept: the model's ``config`` (layers,
    kv heads, head dim), the bytes of one stored key/value element, the device holding block contents."""

    config: ModelConfig
    element_size: int = 4
    device: torch.device | str | None = None

    @classmethod
    def of(cls, config: ModelConfig, retrieval, model_dtype: torch.dtype, device) -> BlockBytes:
        """The cost of a model's positions read with ``retrieval`` (a ``RetrievalConfig``: its block
        dtype, else the model's ``model_dtype``), block contents kept on ``device``."""
        return cls(config, (retrieval.storage_dtype or model_dtype).itemsize, device)


def check_generation_memory(
    prompt_lengths: Sequence[int],
    max_new_tokens: int,
    blocks: BlockBytes | None = None,
    option: str = "max_new_tokens",
) -> None:
    """Refuse a generation that will certainly not fit: the generated ids alone (8 bytes each: a list
    slot) on the CPU (a stop token may end it earlier, but the ids are held as they come), and, with
    ``blocks`` (give them only when no stop token can end the generation early and no block cap
    bounds the memory), every position's keys and values in the block memory of each layer. A
    ResourceError (a ValueError) naming ``option``; nothing when it could fit."""
    rows = len(prompt_lengths)
    setting = f"{option} {max_new_tokens}" if option.startswith("--") else f"{option}={max_new_tokens}"
    what = f"holding the ids generated for {rows} prompt{'s' if rows > 1 else ''} (8 bytes each)"
    check_fits(rows * max_new_tokens * INT64, setting, what, "cpu")
    if blocks is not None:
        config = blocks.config
        positions = sum(prompt_lengths) + rows * max_new_tokens
        per_position = config.n_layer * 2 * config.n_kv_head * config.head_dim * blocks.element_size
        what = f"holding the keys and values of {positions:,} positions in the block memory (no block cap)"
        check_fits(positions * per_position, setting, what, blocks.device)


def report_memory(cache: RetrievalCache, folder: str) -> None:
    """Print (stderr) the block memory ``cache`` holds in RAM and maps from the block ``folder``."""
    total = {"ram": 0, "disk": 0}
    for memory in cache.memories:
        for where, n in memory.nbytes().items():
            total[where] += n
    ram, disk = format_bytes(total["ram"]), format_bytes(total["disk"])
    print(f"block memory: {ram} in RAM, {disk} mapped from {folder}", file=sys.stderr)


def in_order(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    """One callable running the ``steps`` that are not None, in order (None when there are none): the
    hooks that run once the prompts are read."""
    present = [step for step in steps if step is not None]
    if not present:
        return None

    def run() -> None:
        for step in present:
            step()

    return run


NO_STATE = StateFiles()  # the default: read the prompts, save nothing


def sample_next(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> Tensor:
    """(B, vocab) logits -> (B,) token ids: greedy when temperature == 0, else temperature + nucleus.

    Raises:
        ValueError: the logits hold NaN (the model's weights are damaged: nothing can be chosen).
    """
    if bool(torch.isnan(logits).any()):
        raise ValueError("the model's next-token scores are not numbers (NaN): its weights may be damaged")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # the best logit subtracted first: a tiny temperature gives -inf to the others, not inf - inf
    # (and no temperature below float32's smallest normal number, which would round to 0 and give 0 / 0,
    # nor above its largest, which would round to inf and give -inf / inf = nan for a masked token)
    temperature = min(max(temperature, torch.finfo(torch.float32).tiny), torch.finfo(torch.float32).max)
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # the smallest set reaching top_p
        keep[..., 0] = True  # the best token always (a top_p below float32's range compared as 0)
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def with_landmarks(tokens: Sequence[int], start: int, block_size: int, landmark_id: int) -> list[int]:
    """Regular tokens continuing a stream at position ``start``, with the landmarks inserted at the stream
    positions ``p % block_size == block_size - 1`` (a landmark due at ``start`` comes first)."""
    out, pos = [], start
    for token in tokens:
        if pos % block_size == block_size - 1:
            out.append(landmark_id)
            pos += 1
        out.append(int(token))
        pos += 1
    return out


def prompt_streams(
    prompts: Sequence[Sequence[int]],
    block_size: int,
    landmark_id: int | None,
    start: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """B token lists -> (B, n) streams with their landmarks, right-padded, and (B,) lengths.

    Row b continues a stream at position ``start[b]`` (default 0). A stream that would end with a
    landmark keeps it back (it is fed with the first generated token). With ``landmark_id`` None (a
    model without landmarks) the streams are the prompts.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    start = [0] * len(prompts) if start is None else [int(x) for x in start]
    rows = [[int(t) for t in p] for p in prompts]
    if landmark_id is not None:
        if any(landmark_id in r for r in rows):
            raise ValueError(
                f"prompts must not contain the landmark token id {landmark_id}: landmarks are inserted here"
            )
        rows = [with_landmarks(r, s, block_size, landmark_id) for r, s in zip(rows, start)]
    lengths = torch.tensor([len(r) for r in rows])
    stream = torch.zeros((len(rows), int(lengths.max())), dtype=torch.long)
    for b, r in enumerate(rows):
        stream[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return stream, lengths


class Landmarks(NamedTuple):
    """Where landmarks go in a model's stream: the last position of every block of ``block_size``
    (``landmark_id`` None: a model without landmarks), counted from ``start``: (B,) the stream positions
    the prompts continue (a state read earlier; None: 0)."""

    block_size: int
    landmark_id: int | None
    start: Sequence[int] | None = None


class Hooks(NamedTuple):
    """What ``generate_with`` calls and stops on."""

    stop_ids: Sequence[int] = ()  # a row stops after generating one of these (kept in its output)
    on_token: TokenCallback | None = None  # on_token(row, token) for every token, as soon as it exists
    after_prompt: Callable[[], None] | None = None  # once the prompts are read (saving the state)


NO_HOOKS = Hooks()


def _stop_tensor(stop_ids: Sequence[int], vocab_size: int | None = None) -> Tensor:
    """``Hooks.stop_ids`` as a (S,) int64 tensor; anything but a sequence of integer ids (in
    ``[0, vocab_size)`` when given: the model's tokens) is a ValueError naming it."""
    try:
        ids = None if isinstance(stop_ids, str) else torch.as_tensor(list(stop_ids))
    except (TypeError, ValueError, RuntimeError):
        ids = None
    if ids is not None and ids.numel() == 0:
        return torch.empty(0, dtype=torch.long)
    if ids is None or ids.dim() != 1 or not holds_integer_ids(ids) or bool((ids < 0).any()):
        raise ValueError(f"Hooks.stop_ids must be a sequence of integer token ids (>= 0); got {stop_ids!r}")
    if vocab_size is not None and bool((ids >= vocab_size).any()):
        bad = int(ids[ids >= vocab_size][0])
        raise ValueError(
            f"Hooks.stop_ids must be token ids of this model, in [0, {vocab_size}); got {bad}, which it "
            "never generates"
        )
    return ids.long()


@torch.no_grad()
def generate_with(
    read: Reader,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    landmarks: Landmarks,
    sampling: Sampling = Sampling(),
    hooks: Hooks = NO_HOOKS,
) -> list[list[int]]:
    """The generation loop: read the prompts, then decode token by token.

    Args:
        read: the model's reader (see the module).
        landmarks: where landmarks go (``Landmarks``; ``landmark_id`` None: a model without them;
            ``start``: the stream positions the prompts continue).
        prompts: B token-id lists (regular tokens, no landmarks), of different lengths if the reader
            allows it.
        max_new_tokens: regular tokens to generate per row (>= 1).
        sampling: greedy or sampled (``Sampling``).
        hooks: stop tokens and callbacks (``Hooks``).

    Returns:
        The generated token ids of each row.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1; got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling (Sampling() is greedy); got {sampling!r}")
    (block_size, landmark_id, start), (stop_ids, on_token, after_prompt) = landmarks, hooks
    stop = _stop_tensor(stop_ids)
    stream, lengths = prompt_streams(prompts, block_size, landmark_id, start)
    logits = read(stream, lengths)  # (B, vocab)
    positions = lengths + (torch.tensor(list(start), dtype=torch.long) if start is not None else 0)
    if after_prompt is not None:
        after_prompt()
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    batch = len(prompts)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        logits = logits.float().cpu()
        if landmark_id is not None:
            logits[:, landmark_id] = float("-inf")  # a landmark is never sampled
        token = sample_next(logits, sampling.temperature, sampling.top_p, generator).cpu()  # (B,)
        for b in range(batch):
            if not done[b]:
                out[b].append(int(token[b]))
                if on_token is not None:
                    on_token(b, int(token[b]))
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        landmark_first = torch.zeros(batch, dtype=torch.bool)
        if landmark_id is not None:  # the next position is a landmark's: feed it first
            landmark_first = positions % block_size == block_size - 1
        first = torch.where(landmark_first, landmark_id if landmark_id is not None else 0, token)
        ids = torch.stack((first, token), dim=1)  # (B, 2)
        lengths = torch.where(done, 0, 1 + landmark_first.long())
        width = 2 if bool(landmark_first[lengths > 0].any()) else 1
        logits = read(ids[:, :width], lengths)
        positions += lengths
    return out


def _check_token_ids(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """``prompts`` is a non-empty list of token-id lists, and every id is an integer token of the model's
    vocabulary (an id out of range would index past the embedding): a one-line TypeError or ValueError
    naming the prompt and the id."""
    if isinstance(prompts, Tensor | str | bytes) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of token-id lists (per row); got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    for row, prompt in enumerate(prompts):
        try:
            ids = [operator.index(token) for token in prompt]
        except TypeError:
            raise ValueError(f"prompts[{row}] must hold integer token ids") from None
        bad = next((token for token in ids if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompts[{row}] holds {bad}, not a token id in [0, {vocab_size}) of this model")


@torch.no_grad()
def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    *,
    sampling: Sampling = GREEDY,
    hooks: Hooks = NO_HOOKS,
    state: StateFiles = NO_STATE,
    **session_kwargs,
) -> list[list[int]]:
    """Generate continuations of a batch of prompts of any length with a landmark ``GPT``.

    Args:
        prompts: B token-id lists (regular tokens, no landmarks), of different lengths if you like.
        max_new_tokens: tokens to generate per prompt (>= 1).
        sampling: greedy (the default) or ``Sampling(temperature, top_p, seed)``.
        hooks: ``Hooks(stop_ids, on_token, after_prompt)``: stop a row when it generates one of
            ``stop_ids`` (token ids in [0, vocab_size), e.g. the tokenizer's ``eot_id``; it is kept in the
            output); call ``on_token(row, token)`` for every generated token as soon as it exists
            (streaming output); call ``after_prompt()`` once the prompts are read.
        state: read once, ask many (:class:`landmark.inference.cache.StateFiles`, never a bare path):
            continue a saved state (``load``), save the state once the prompts are read (``save``).
        **session_kwargs: ``InferenceSession`` options (retrieval or its fields k, granularity, ...;
            chunk_len, memory_device, ...).

    Returns:
        The generated token ids of each row.
    """
    _check_token_ids(prompts, model.config.vocab_size)
    if not isinstance(hooks, Hooks):
        raise TypeError(f"hooks must be a Hooks(stop_ids=..., on_token=..., after_prompt=...); got {hooks!r}")
    for name in ("on_token", "after_prompt"):
        if getattr(hooks, name) is not None and not callable(getattr(hooks, name)):
            raise TypeError(f"Hooks.{name} must be a function or None; got {getattr(hooks, name)!r}")
    _stop_tensor(hooks.stop_ids, model.config.vocab_size)
    if not isinstance(state, StateFiles):
        raise TypeError(
            "state must be a StateFiles(load=..., save=...) (landmark.inference.cache.StateFiles), not a "
            f"bare path; got {state!r}"
        )
    session = InferenceSession(model, len(prompts), **session_kwargs)  # no memory allocated yet
    _check_memory(session, prompts, max_new_tokens, certain=not hooks.stop_ids)
    state.check(model_sources(model))
    if state.load is not None:
        session.load_state(state.load)
    cfg = model.config
    return generate_with(
        session.read,
        prompts,
        max_new_tokens,
        landmarks=Landmarks(cfg.block_size, cfg.landmark_id, session.length.tolist()),
        sampling=sampling,
        hooks=hooks._replace(after_prompt=_after_prompt(session, state, hooks.after_prompt)),
    )


def _check_memory(
    session: InferenceSession, prompts: Sequence[Sequence[int]], max_new_tokens: int, certain: bool
) -> None:
    """:func:`check_generation_memory` of a generation by ``session``; ``certain``: no stop token can
    end it early (its block memory is then checked too, when in RAM and without a block cap)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        return  # (refused by generate_with)
    retrieval, options, param = session.retrieval, session.cache.options, next(session.model.parameters())
    device = options.memory_device or param.device
    bounded = options.max_blocks is not None or retrieval.block_folder  # capped, or kept on disk
    blocks = None if bounded or not certain else BlockBytes.of(session.config, retrieval, param.dtype, device)
    check_generation_memory([len(p) for p in prompts], max_new_tokens, blocks)


def _after_prompt(
    session: InferenceSession, state: StateFiles, then: Callable[[], None] | None
) -> Callable[[], None] | None:
    """What runs once the prompts are read: saying where a memory kept in a block folder went, saving the
    state (``state.save``), then the caller's ``then``."""
    folder = session.retrieval.block_folder
    report = functools.partial(report_memory, session.cache, folder) if folder else None
    save = None
    if state.save is not None:
        save = functools.partial(session.save_state, state.save, overwrite=state.overwrite)
    return in_order(report, save, then)
