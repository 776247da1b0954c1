"""Generation from a converted model with landmarks inserted into the token stream.

Two caches:

* ``retrieval=None``: every earlier position stays in a ``DynamicCache`` and every query attends over
  all of them through the grouped softmax: exact, but each step reads the whole context.
* ``retrieval=RetrievalConfig(k=...)``: a :class:`landmark.hf.LandmarkRetrievalCache`: complete blocks
  go to a block memory, and every query attends to its top-k retrieved blocks plus its local context
  (docs/method.md, "Inference: block memory and top-k retrieval").

The loop, the sampling and the landmark rule are the library's one implementation
(:func:`landmark.inference.generate.generate_with`, shared with the library's ``GPT``); this module only
provides the reader: the prompt goes through the model ``chunk_len`` positions per forward call with
``logits_to_keep=1``, so reading a long prompt holds one chunk's activations and one row of logits.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from landmark.data.landmarks import holds_integer_ids
from landmark.files import model_sources
from landmark.hf.convert import encode_text, landmark_token_id
from landmark.inference.cache import DEFAULT_CHUNK_LEN, StateFiles
from landmark.inference.generate import (
    GREEDY,
    NO_STATE,
    Hooks,
    Landmarks,
    Sampling,
    TokenCallback,
    check_generation_memory,
    generate_with,
    in_order,
    report_memory,
)
from landmark.inference.options import Reading, check_utf8
from landmark.inference.session import reading_progress
from landmark.inference.threads import inference_threads, using_threads
from landmark.optional import require

_DEFAULT_READING = Reading()


def _retrieval_module() -> Any:
    """:mod:`landmark.hf.retrieval`, imported on first use: its cache subclasses transformers' Cache."""
    from landmark.hf import retrieval

    return retrieval


def hf_reader(model: Any, cache: Any, chunk_len: int = DEFAULT_CHUNK_LEN, threads: int | None = None):
    """A reader for :func:`generate_with`: feeds (B, C) ids (every row the same length) through
    ``model`` with ``cache``, ``chunk_len`` positions per forward, and returns (B, vocab) logits of
    the last position (with a :class:`landmark.hf.LandmarkRetrievalCache`, position ids of zeros: the
    model's RoPE is skipped, see ``unrotated_position_ids``); with ``threads`` torch threads (None:
    ``LANDMARK_THREADS`` or 1, see :mod:`landmark.inference.threads`)."""
    forward_cached = _retrieval_module().forward_cached
    device = model.get_input_embeddings().weight.device
    threads = inference_threads() if threads is None else threads

    def read(ids: Tensor, lengths: Tensor) -> Tensor:
        if bool((lengths != lengths[0]).any()):
            raise ValueError("Hugging Face models read rows of equal length only (no padding)")
        n = int(lengths[0])
        logits = None
        unrotated = getattr(cache, "unrotated_position_ids", None)  # a LandmarkRetrievalCache
        with reading_progress(n, chunk_len) as bar:
            for c0 in range(0, n, chunk_len):
                chunk = ids[:, c0 : min(n, c0 + chunk_len)].to(device)
                extra = {} if unrotated is None else {"position_ids": unrotated(chunk.shape[1], device)}
                with using_threads(threads):
                    logits = forward_cached(
                        model, chunk, cache, check_landmarks=False, logits_to_keep=1, **extra
                    ).logits
                bar.update(chunk.shape[1])
        return logits[:, -1]

    return read


def check_whole_context(reading: Reading | None) -> None:
    """A reading with ``k=0`` (exact attention over the whole context) sets no option of the retrieval
    cache (``Reading.retrieval_options_set``) away from its default: it would be ignored.

    Raises:
        ValueError: ``reading.search = 'bounded' is an option of the retrieval cache: ...``.
    """
    if reading is None or reading.k:
        return
    for name in reading.retrieval_options_set()[:1]:
        value, default = getattr(reading, name), getattr(_DEFAULT_READING, name)
        raise ValueError(
            f"reading.{name} = {value!r} is an option of the retrieval cache, and k=0 reads the whole "
            f"context with the model's own attention: set reading.k >= 1, or leave {name} at {default!r}"
        )


def prompt_ids(model: Any, tokenizer: Any, prompt: str | Tensor, continuation: bool = False) -> list[int]:
    """The raw token ids of ``prompt``, checked: the HF twin of the native path's prompt handling.

    Text is tokenized with the tokenizer's special tokens (BOS; none for a ``continuation`` of a saved
    state), special-token strings inside it kept as plain text (:func:`landmark.hf.convert.encode_text`):
    a ``<landmark>`` typed by a user is never a landmark. Token ids must be a flat sequence of integers
    within the model's vocabulary, without the landmark id (landmarks are inserted here).

    Raises:
        ValueError: an empty prompt; ids that are not integers, out of range, or hold the landmark id.
    """
    landmark_id = landmark_token_id(model)
    if isinstance(prompt, str):
        check_utf8(prompt, "prompt")  # (a lone surrogate: the tokenizer's TypeError named nothing)
        raw = encode_text(tokenizer, prompt, add_special_tokens=not continuation)
    else:
        if not isinstance(prompt, Tensor | list | tuple) or (
            isinstance(prompt, Tensor) and prompt.dim() == 0
        ):
            raise TypeError(f"prompt must be text or (n,) token ids; got {type(prompt).__name__} {prompt!r}")
        ids = torch.as_tensor(prompt)
        if not holds_integer_ids(ids):
            raise ValueError(f"prompt: token ids must be integers; got dtype {ids.dtype}")
        raw = ids.flatten().tolist()
        vocab = int(model.get_input_embeddings().weight.shape[0])
        bad = [t for t in raw if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token ids must be in [0, {vocab}); got {bad[0]}")
        if landmark_id in raw:
            raise ValueError(
                f"prompt: token ids must not contain the landmark token id {landmark_id} (at index "
                f"{raw.index(landmark_id)}): pass raw tokens, landmarks are inserted by generate"
            )
    if not raw:
        raise ValueError("prompt: the prompt is empty")
    return raw


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompt: str | Tensor,
    max_new_tokens: int = 32,
    *,
    sampling: Sampling = GREEDY,
    reading: Reading | None = None,
    on_token: TokenCallback | None = None,
    state: StateFiles = NO_STATE,
) -> tuple[str, Tensor]:
    """Continue ``prompt`` by ``max_new_tokens`` regular tokens (batch size 1).

    Args:
        model: a converted model (:func:`landmark.hf.convert` or :func:`landmark.hf.load_pretrained`).
        tokenizer: its tokenizer.
        prompt: text (tokenized with the tokenizer's special tokens, e.g. BOS; special-token strings in it
            are plain text) or (n,) raw token ids (never the landmark id), see :func:`prompt_ids`.
        max_new_tokens: regular tokens to generate (>= 1); stops early at the tokenizer's eos token.
        sampling: greedy (the default) or ``Sampling(temperature, top_p, seed)``.
        reading: how the prompt is read (:class:`landmark.inference.options.Reading`): top-k block
            retrieval through a :class:`landmark.hf.LandmarkRetrievalCache` (``Reading(k=4)``); None or
            ``k=0``: exact attention over the whole context (``DynamicCache``), in chunks of
            ``reading.chunk_len`` positions per forward (its retrieval options left at their defaults,
            :func:`check_whole_context`).
        on_token: called as ``on_token(0, token)`` for every generated token (streaming).
        state: with retrieval, read once, ask many (:class:`landmark.inference.cache.StateFiles`):
            continue a saved state (``load``), save the state once the prompt is read (``save``).

    Returns:
        ``(text, ids)``: the decoded new tokens, and (num_new,) int64 ids of the new regular tokens.
    """
    transformers = require("transformers")
    if reading is not None and not isinstance(reading, Reading):
        raise TypeError(f"reading must be a Reading(k=...) or None; got {reading!r}")
    if not isinstance(state, StateFiles):
        raise TypeError(f"state must be a StateFiles(load=..., save=...), not a bare path; got {state!r}")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token must be a function on_token(row, token) or None; got {on_token!r}")

    retrieves = reading is not None and reading.k != 0
    chunk_len = reading.chunk_len if reading is not None else DEFAULT_CHUNK_LEN
    if isinstance(prompt, str) and not callable(tokenizer):  # (token ids need none)
        raise TypeError(
            f"tokenizer must be the model's tokenizer for a text prompt (load_pretrained returns it); got "
            f"{tokenizer!r}"
        )
    raw = prompt_ids(model, tokenizer, prompt, continuation=state.load is not None)
    if isinstance(max_new_tokens, int) and max_new_tokens > 0:  # (anything else: generate_with names it)
        check_generation_memory([len(raw)], max_new_tokens)  # the ids it returns, at least
    if not retrieves and (state.load is not None or state.save is not None):
        raise ValueError("saved states are states of the retrieval cache: pass reading=Reading(k=...)")
    check_whole_context(reading)
    state.check(model_sources(model))
    if retrieves:
        retrieval_cache = _retrieval_module().LandmarkRetrievalCache
        cache = retrieval_cache(model, reading.retrieval, **reading.cache_kwargs())
        if state.load is not None:
            cache.load_state(state.load, model)
    else:
        cache = transformers.DynamicCache(config=model.config)
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    start = [cache.get_seq_length()] if state.load is not None else None
    save = None if state.save is None else functools.partial(
        cache.save_state, state.save, model, overwrite=state.overwrite)  # fmt: skip
    report = None
    if retrieves and reading.block_folder:  # say where the memory went once the prompt is read
        report = functools.partial(report_memory, cache.stream, reading.block_folder)
    landmarks = Landmarks(int(model.config.landmark_block_size), landmark_token_id(model), start)
    new = generate_with(
        hf_reader(model, cache, chunk_len),
        [raw],
        max_new_tokens,
        landmarks=landmarks,
        sampling=sampling,
        hooks=Hooks(() if eos is None else (eos,), on_token, in_order(report, save)),
    )[0]
    out_ids = torch.tensor(new, dtype=torch.long)
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return text, out_ids
