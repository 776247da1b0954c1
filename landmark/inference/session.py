"""Inference over inputs of any length with a ``GPT``: chunked reading with block memory and top-k retrieval.

``InferenceSession`` is a landmark ``GPT`` plus a ``RetrievalCache`` (``landmark.inference.cache``:
the per-layer block memories and tail blocks of a batch of independent streams, the same state the
Hugging Face models use). ``feed`` runs new stream positions (landmarks included) through
``GPT.forward(..., cache=...)`` chunk by chunk and returns their logits; ``read`` returns only the
logits of each row's last position (reading a long prompt: memory stays the block memory plus one
chunk). The helpers below insert landmarks automatically:

* ``chunked_logits(model, tokens)``: logits for every token of arbitrarily long inputs (all chunks,
  not only the last), optionally the loss;
* ``chunked_nll(model, tokens)``: the next-token loss, logits consumed chunk by chunk;
* ``generate`` (in ``landmark.inference.generate``): prompt reading, then token-by-token decoding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from landmark.config import MAX_THREADS
from landmark.data.landmarks import holds_integer_ids, insert_landmarks, landmark_targets
from landmark.files import model_sources
from landmark.fingerprint import weights_fingerprint
from landmark.inference.cache import CacheOptions, RetrievalCache, check_landmark_positions
from landmark.inference.retrieval import RetrievalConfig, StepStats
from landmark.inference.threads import inference_threads, using_threads
from landmark.inference.weights import weights_of
from landmark.model import GPT
from landmark.resources import check_fits

__all__ = [
    "InferenceSession",
    "SessionStats",
    "chunked_logits",
    "chunked_nll",
    "landmark_stream",
    "sum_nll",
]


PROGRESS_FROM = 16  # chunks: a read of more shows a progress bar (on a terminal)


def reading_progress(positions: int, chunk_len: int) -> tqdm:
    """A progress bar over the positions of a long read, on stderr when it is a terminal (none for
    reads of at most ``PROGRESS_FROM`` chunks, nor when stderr is redirected); a context manager."""
    quiet = positions <= PROGRESS_FROM * chunk_len
    return tqdm(total=positions, desc="reading", unit="tok", unit_scale=True, leave=False,
                disable=True if quiet else None)  # fmt: skip


@dataclass
class SessionStats:
    """Totals over a session (for benchmarks and the inference report)."""

    steps: int = 0
    positions: int = 0
    layer: StepStats = field(default_factory=StepStats)


def retrieval_config(retrieval: RetrievalConfig | None = None, **fields) -> RetrievalConfig:
    """``retrieval``, or a ``RetrievalConfig`` built from its field names (``k=4, granularity=...``):
    the shorthand that ``InferenceSession`` and the generation helpers accept. Not both."""
    if retrieval is not None and fields:
        raise ValueError(f"pass retrieval=RetrievalConfig(...) or its fields {sorted(fields)}, not both")
    if retrieval is None:
        known = sorted(RetrievalConfig.__dataclass_fields__)
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; retrieval options: {known}")
        return RetrievalConfig(**fields)
    if not isinstance(retrieval, RetrievalConfig):
        raise ValueError(f"retrieval must be a landmark.inference.RetrievalConfig; got {retrieval!r}")
    return retrieval


class InferenceSession:
    """A landmark ``GPT`` plus the ``RetrievalCache`` of a batch of streams.

    Args:
        model: a ``GPT`` with ``attention="landmark"``.
        batch_size: number of independent streams.
        retrieval: k, granularity, search, kernel, ... (``RetrievalConfig``); or give its fields as
            keywords (``k=4, granularity="head"``).
        threads: torch threads while the model runs (None: ``LANDMARK_THREADS`` or 1; see
            ``landmark.inference.threads`` for why one).
        **options: the cache's options (:class:`~landmark.inference.cache.CacheOptions`) by name:
            ``chunk_len`` (positions per chunk when feeding long inputs, >= block_size),
            ``memory_device`` (where block contents live, default the model's device, e.g. ``"cpu"``),
            ``max_blocks`` (a cap on blocks per stream, None: unlimited) and ``evict`` (FIFO eviction
            or an error at the cap); and the retrieval fields when ``retrieval`` is not given.
    """

    def __init__(
        self,
        model: GPT,
        batch_size: int = 1,
        retrieval: RetrievalConfig | None = None,
        *,
        threads: int | None = None,
        **options,
    ):
        cfg = getattr(model, "config", None)
        if getattr(cfg, "attention", None) != "landmark":
            kind = getattr(cfg, "attention", type(model).__name__)
            raise ValueError(
                f"retrieval inference needs a model trained with landmark attention; this one uses {kind!r}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}")
        param = next(model.parameters())  # each stream holds a key and a value tail block per layer
        tails = batch_size * cfg.n_layer * 2 * cfg.n_kv_head * cfg.block_size * cfg.head_dim
        what = "holding the streams' key/value tail blocks"
        check_fits(tails * param.element_size(), f"batch_size={batch_size}", what, param.device)
        self.model, self.config, self.batch_size = model, cfg, batch_size
        cache_options, retrieval_fields = CacheOptions.pick(options)
        self.retrieval = retrieval_config(retrieval, **retrieval_fields)
        self.cache = RetrievalCache(cfg.n_layer, block_size=cfg.block_size, rope_base=cfg.rope_base,
                                    retrieval=self.retrieval, options=cache_options)  # fmt: skip
        self.chunk_len = cache_options.chunk_len
        self.threads = inference_threads() if threads is None else threads
        whole = isinstance(self.threads, int) and not isinstance(self.threads, bool)
        if not whole or not 1 <= self.threads <= MAX_THREADS:
            raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}]; got {threads!r}")
        param = next(model.parameters())
        self.device = param.device
        self.cache.prepare(batch_size, cfg.n_kv_head, cfg.head_dim, param.dtype, param.device)
        self.stats = SessionStats(layer=self.cache.stats)
        self._fingerprint: str | None = None

    @property
    def memories(self):
        """The layers' block memories (empty before the first ``feed``)."""
        return self.cache.memories

    @property
    def length(self) -> Tensor:
        """(B,) stream positions fed so far, per row (CPU int64)."""
        state = self.cache.layers[-1]
        return state.length.clone() if state is not None else torch.zeros(self.batch_size, dtype=torch.long)

    @torch.no_grad()
    def feed(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Run new stream positions through the model.

        Args:
            ids: (B, C) token ids continuing each stream, landmarks included at stream positions
                ``p % block_size == block_size - 1``; right-padded where lengths differ.
            lengths: (B,) real positions per row (default: all C).

        Returns:
            (B, C, vocab) logits (padding positions are garbage).

        Raises:
            ValueError: ``ids`` without positions (C = 0), ids that are not token ids of the model,
                landmarks out of place, bad ``lengths``; the session is then unchanged.
        """
        ids, lengths = self._check(ids, lengths, empty=False)
        return torch.cat([logits for _, logits in self._chunks(ids, lengths)], dim=1)

    @torch.no_grad()
    def iter_feed(self, ids: Tensor, lengths: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
        """Like ``feed``, but yields ``(c0, logits)`` chunk by chunk (logits of positions c0..c0+len-1),
        so that long inputs never hold all their logits at once. ``ids`` without positions (C = 0) yield
        nothing."""
        ids, lengths = self._check(ids, lengths)
        yield from self._chunks(ids, lengths)

    def _chunks(self, ids: Tensor, lengths: Tensor) -> Iterator[tuple[int, Tensor]]:
        """``(c0, logits)`` of checked ``ids`` and ``lengths``, chunk by chunk."""
        for c0 in range(0, ids.shape[1], self.chunk_len):
            c1 = min(ids.shape[1], c0 + self.chunk_len)
            part = (lengths - c0).clamp(0, c1 - c0)
            yield c0, self._forward(ids[:, c0:c1], part).logits

    @torch.no_grad()
    def read(self, ids: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Run new stream positions through the model and return the logits of each row's LAST real
        position, (B, vocab): reading a prompt. Only one logits row per stream and chunk is computed,
        so memory stays the block memory plus one chunk whatever the input length.

        Arguments as in ``feed`` (``ids`` with at least one position); the logits of a row without new
        positions are undefined.
        """
        ids, lengths = self._check(ids, lengths, empty=False)
        self.cache.reserve(int((self.length + lengths).max()) // self.config.block_size)  # one allocation
        last = (lengths - 1).clamp_min(0)
        out = None
        with reading_progress(ids.shape[1], self.chunk_len) as bar:
            for c0 in range(0, ids.shape[1], self.chunk_len):
                c1 = min(ids.shape[1], c0 + self.chunk_len)
                part = (lengths - c0).clamp(0, c1 - c0)
                here = (last >= c0) & (last < c1)
                at = torch.where(here, last - c0, 0)
                logits = self._forward(ids[:, c0:c1], part, at).logits[:, 0]  # (B, vocab)
                out = logits if out is None else torch.where(here.to(logits.device)[:, None], logits, out)
                bar.update(c1 - c0)
        return out

    def save_state(self, path: str | Path, *, overwrite: bool = False) -> None:
        """Save what the streams have read (block memories, tails, positions) to ``path``
        (safetensors, atomic): a long document read once can be asked many questions
        (``load_state`` in a new session of the same model).

        Raises:
            ValueError: ``path`` is a folder or an existing file other than a saved state (pass
                ``overwrite=True`` to replace such a file); nothing is written then.
        """
        self.cache.save(path, self._model_id(), overwrite=overwrite, weights=weights_of(self.model),
                        reads=model_sources(self.model))  # fmt: skip

    def load_state(self, path: str | Path) -> None:
        """Continue the streams saved in ``path`` (this session must not have read anything yet).

        Raises:
            ValueError: a state of other weights, another block size or batch size, or not a state.
        """
        if bool((self.length > 0).any()):
            raise ValueError("load_state needs a new session (this one has read something already)")
        dtype = next(self.model.parameters()).dtype
        self.cache.load(path, self._model_id(), self.device, batch=self.batch_size, dtype=dtype,
                        weights=weights_of(self.model))  # fmt: skip

    def _model_id(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.model)
        return self._fingerprint

    def _check(self, ids: Tensor, lengths: Tensor | None, empty: bool = True) -> tuple[Tensor, Tensor]:
        """``ids`` and ``lengths`` checked (nothing read yet); ``empty``: ids may have no positions."""
        ids = torch.as_tensor(ids).to(self.device)
        if ids.dim() != 2 or ids.shape[0] != self.batch_size:
            raise ValueError(f"ids must have shape ({self.batch_size}, length); got {tuple(ids.shape)}")
        if not empty and ids.shape[1] == 0:
            raise ValueError(
                f"ids must hold at least one position: shape ({self.batch_size}, length >= 1); "
                f"got {tuple(ids.shape)}"
            )
        if not holds_integer_ids(ids):
            raise ValueError(f"ids must be integer token ids; got {ids.dtype}")
        lengths = (
            torch.full((self.batch_size,), ids.shape[1]) if lengths is None else self._lengths(lengths, ids)
        )
        self._check_vocabulary(ids)
        check_landmark_positions(ids, lengths, self.length, self.config.block_size, self.config.landmark_id)
        return ids, lengths

    def _check_vocabulary(self, ids: Tensor) -> None:
        """Every position, padding included (the model embeds it), is a token id of the vocabulary."""
        vocab = self.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise ValueError(f"ids must lie in [0, {vocab}) (the model's vocabulary); found {int(bad)}")

    def _lengths(self, lengths: Tensor, ids: Tensor) -> Tensor:
        """``lengths`` checked: (B,) integers in [0, ids.shape[1]] (never clamped in silence)."""
        return checked_lengths(lengths, self.batch_size, ids.shape[1], "the positions given")

    def _forward(self, ids: Tensor, lengths: Tensor, logits_at: Tensor | None = None):
        self.stats.steps += 1
        self.stats.positions += int(lengths.sum())
        with using_threads(self.threads):
            return self.model(ids, cache=self.cache, lengths=lengths, logits_at=logits_at)


@torch.no_grad()
def chunked_logits(
    model: GPT,
    tokens: Tensor,
    lengths: Tensor | None = None,
    *,
    targets: bool = False,
    **session_kwargs,
) -> tuple[Tensor, Tensor | None]:
    """Logits for every token of (arbitrarily long) inputs, processed in chunks with retrieval.

    Args:
        tokens: (B, n) regular tokens (no landmarks; they are inserted here), right-padded.
        lengths: (B,) real tokens per row (default: all n).
        targets: also return the mean next-token loss over real positions (the last token of each row
            has no target).
        **session_kwargs: ``InferenceSession`` options (k, granularity, chunk_len, memory_device, ...).

    Returns:
        logits (B, n, vocab) at the regular tokens (logits[:, t] predicts token t + 1), and the loss or
        None.

    Raises:
        TypeError: ``targets`` that is not a bool.
        ValueError: ``tokens`` that are not a (B, n >= 1) batch of token ids without landmarks, bad
            ``lengths``.
    """
    if not isinstance(targets, bool):
        raise TypeError(f"targets must be a bool (True: also return the loss); got {_short(targets)}")
    batch, n, lengths = _rows(tokens, lengths)
    if n == 0:
        raise ValueError(f"tokens must hold at least one token: shape ({batch}, n >= 1); got ({batch}, 0)")
    bs, lm = model.config.block_size, model.config.landmark_id
    stream = rows_with_landmarks(tokens, lengths, bs, lm)  # (B, n') right-padded
    stream_len = lengths + lengths // (bs - 1)
    session = InferenceSession(model, batch, **session_kwargs)
    logits_stream = session.feed(stream, stream_len)
    regular = torch.arange(stream.shape[1]) % bs != bs - 1
    logits = logits_stream[:, regular][:, :n]
    loss = None
    if targets:
        tgt = tokens[:, 1:].to(logits.device)
        valid = (torch.arange(n - 1)[None, :] < (lengths - 1)[:, None]).to(logits.device)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, reduction="none")
        loss = (ce * valid).sum() / valid.sum().clamp_min(1)
    return logits, loss


def rows_with_landmarks(tokens: Tensor, lengths: Tensor, block_size: int, landmark_id: int) -> Tensor:
    """(B, n) right-padded tokens -> (B, n') streams with landmarks, right-padded, row by row. Real tokens
    that are the landmark id are a ValueError naming ``tokens`` (they are regular tokens)."""
    real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
    found = (tokens.cpu() == landmark_id) & real
    if bool(found.any()):
        b, t = (int(x) for x in found.nonzero()[0])
        raise ValueError(
            f"tokens must not contain the landmark token id {landmark_id} (row {b}, token {t}): pass the "
            "regular tokens only, without landmarks; they are inserted here"
        )
    rows = [
        insert_landmarks(tokens[b, : int(lengths[b])], block_size, landmark_id)
        for b in range(tokens.shape[0])
    ]
    width = max(r.shape[0] for r in rows)
    out = torch.full((tokens.shape[0], width), landmark_id, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, : r.shape[0]] = r
    return out


@torch.no_grad()
def chunked_nll(
    model: GPT, tokens: Tensor, lengths: Tensor | None = None, **session_kwargs
) -> tuple[Tensor, Tensor]:
    """Next-token negative log-likelihood of long inputs, processed in chunks with retrieval.

    Memory stays O(chunk x vocab): logits are consumed chunk by chunk. Landmarks are inserted here
    and are not scored; the token before a landmark is scored on the token after it.

    Args:
        tokens: (B, n) regular tokens, right-padded; lengths: (B,) real tokens (default n).

    Returns:
        (nll_sum, count): (B,) float64 sums of -log p(token t+1 | tokens <= t) and (B,) numbers of
        scored tokens (length - 1 per row).
    """
    batch, _, lengths = _rows(tokens, lengths)
    stream, stream_len, targets = landmark_stream(
        tokens, lengths, model.config.block_size, model.config.landmark_id
    )
    session = InferenceSession(model, batch, **session_kwargs)
    return sum_nll(session.iter_feed(stream, stream_len), targets), (lengths - 1).clamp_min(0)


def _short(value: object) -> str:
    """``repr(value)`` for a message: a tensor by its kind and shape, anything else cut at 60 characters."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rows(tokens: Tensor, lengths: Tensor | None) -> tuple[int, int, Tensor]:
    """(B, n, lengths) of a batch of integer token rows, right-padded, with ``lengths`` (B,) real tokens
    per row (default n; a list is taken too); anything else is a ValueError naming ``tokens``."""
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a (batch, length) tensor of token ids; got {shape}")
    if not holds_integer_ids(tokens):
        raise ValueError(f"tokens must hold integer token ids; got {tokens.dtype}")
    batch, n = tokens.shape
    if lengths is None:
        return batch, n, torch.full((batch,), n)
    return batch, n, checked_lengths(lengths, batch, n, "real tokens per row")


def checked_lengths(lengths: Tensor | list[int], batch: int, n: int, what: str) -> Tensor:
    """``lengths`` as (batch,) int64 on the CPU: integers in [0, n]; else a ValueError naming
    ``lengths`` (``what`` they count, in the message)."""
    as_tensor = torch.as_tensor(lengths).cpu()
    if as_tensor.shape != (batch,) or not holds_integer_ids(as_tensor):
        raise ValueError(f"lengths must be ({batch},) integers ({what}); got {tuple(as_tensor.shape)} "
                         f"{as_tensor.dtype}")  # fmt: skip
    if bool((as_tensor < 0).any()) or bool((as_tensor > n).any()):
        raise ValueError(f"lengths must lie in [0, {n}] ({what}); got {as_tensor.tolist()}")
    return as_tensor.long()


def landmark_stream(
    tokens: Tensor, lengths: Tensor | None, block_size: int, landmark_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """What a landmark model reads to score (B, n) right-padded regular tokens (``lengths`` real ones
    per row, default n): the streams with their landmarks and their targets.

    Returns:
        stream (B, n') right-padded, stream_len (B,), and targets (B, n'): at a regular position the
        next regular token; -100 at landmarks, at padding and at each row's last regular token.
    """

    _, _, lengths = _rows(tokens, lengths)
    bs = block_size
    stream = rows_with_landmarks(tokens, lengths, bs, landmark_id)
    stream_len = lengths + lengths // (bs - 1)
    targets = landmark_targets(stream, bs)  # next regular token; -100 at landmarks and the very end
    real = torch.arange(stream.shape[1])[None, :] < stream_len[:, None]
    targets = torch.where(real, targets, torch.full_like(targets, -100))
    # the last regular token of a shorter row would be scored on its padding: never score past the end
    last = torch.arange(stream.shape[1])[None, :] >= (stream_len - 1 - (stream_len % bs == 0).long())[:, None]
    return stream, stream_len, torch.where(last, torch.full_like(targets, -100), targets)


def sum_nll(chunks: Iterator[tuple[int, Tensor]], targets: Tensor) -> Tensor:
    """(B,) float64 sums of the cross-entropy of ``(c0, (B, c, vocab) logits)`` chunks against
    ``targets[:, c0 : c0 + c]`` (positions whose target is -100 not scored)."""
    nll = torch.zeros(targets.shape[0], dtype=torch.float64)
    for c0, logits in chunks:
        tgt = targets[:, c0 : c0 + logits.shape[1]].to(logits.device)
        ce = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), tgt.clamp_min(0), reduction="none"
        )  # (B, c)
        nll += (ce * (tgt != -100)).sum(1).double().cpu()
    return nll
