"""Turn a pretrained LLaMA-family causal LM into a landmark model, and load one back.

:func:`convert` adds the ``<landmark>`` token (a new embedding row initialised to the mean of the
existing rows, in the input embeddings and, when it is a separate matrix, in the output layer), records
the landmark settings on the config and switches the model to ``attn_implementation="landmark"``
(:mod:`landmark.hf.attention`). The model's own projections, RoPE and GQA layout are kept: nothing of
its modeling code is copied. ``save_pretrained`` then writes ``landmark_token_id`` and
``landmark_block_size`` into ``config.json``, and :func:`load_pretrained` restores the whole thing.

A plain ``AutoModelForCausalLM.from_pretrained`` of a saved landmark model loads with the default
attention (sdpa), which ignores the landmark structure: always load through :func:`load_pretrained`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from landmark.config import DEFAULT_BLOCK_SIZE
from landmark.files import note_sources
from landmark.hf.attention import ATTN_IMPLEMENTATION, register
from landmark.hf.checks import check_model_folder, load_causal_lm, loading
from landmark.optional import require

LANDMARK_TOKEN = "<landmark>"  # the landmark's token string, added as a special token
# Causal-LM classes whose attention modules compute q/k/v + RoPE and call the attention interface with
# un-repeated GQA keys (transformers 5.x: LlamaAttention and its copies), by config.json model_type.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(SUPPORTED_MODEL_TYPES.values())

log = logging.getLogger(__name__)


def convert(model: Any, tokenizer: Any, block_size: int = DEFAULT_BLOCK_SIZE) -> tuple[Any, Any]:
    """Make ``model`` a landmark model: ``<landmark>`` token, landmark attention, settings on the config.

    Args:
        model: a ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (modified in place).
        tokenizer: its tokenizer (modified in place: ``<landmark>`` is added as a special token).
        block_size: positions per block, landmark included (64 = 63 tokens + 1 landmark); at least 2
            and at most ``config.max_position_embeddings``.

    Returns:
        ``(model, tokenizer)``, the same objects. ``model.config.landmark_token_id`` and
        ``model.config.landmark_block_size`` are set, and ``model.config._attn_implementation`` is
        ``"landmark"``. Converting an already converted model again only checks the token id and sets
        the block size.

    Raises:
        ValueError: an unsupported architecture (the message lists the supported ones); a block size
            out of range; a tokenizer whose ``<landmark>`` id differs from ``config.landmark_token_id``;
            attention dropout > 0.
    """
    name = type(model).__name__
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"landmark.hf.convert does not support {name}; supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (causal LMs of the LLaMA family, unwrapped: convert "
            "before wrapping with peft, DDP or FSDP)"
        )
    config = model.config
    _check_block_size(block_size, config)
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(
            f"landmark attention does not implement attention dropout; set config.attention_dropout = 0 "
            f"(got {config.attention_dropout})"
        )
    if getattr(config, "sliding_window", None) is not None:
        log.warning(
            "%s has sliding_window=%s: landmark attention replaces it (every block stays reachable "
            "through its landmark); the window is ignored",
            name,
            config.sliding_window,
        )

    token_id = _tokenizer_landmark_id(tokenizer)
    config_id = getattr(config, "landmark_token_id", None)
    if config_id is not None:  # already converted: the tokenizer must agree
        if token_id != config_id:
            raise ValueError(
                f"the model's config.landmark_token_id is {config_id} but the tokenizer's {LANDMARK_TOKEN} "
                f"is {'missing' if token_id is None else token_id}: use the tokenizer saved with the model"
            )
    else:
        if token_id is None:
            tokenizer.add_special_tokens(
                {"extra_special_tokens": [LANDMARK_TOKEN]}, replace_extra_special_tokens=False
            )
            token_id = _tokenizer_landmark_id(tokenizer)
        _add_embedding_row(model, token_id)
        config.landmark_token_id = token_id
    config.landmark_block_size = block_size
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model, tokenizer


def _rope_or_dropout_problem(config: Mapping[str, Any]) -> str | None:
    """A ``config.json``'s RoPE variant that retrieval cannot re-position (scaled, partial), or attention
    dropout, which landmark attention does not implement; None for neither."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    if not isinstance(params, Mapping) or not isinstance(scaling, Mapping):
        return "its config.json has rope_parameters/rope_scaling that are not JSON objects"
    types = [d.get(key) for d in (params, scaling) for key in ("rope_type", "type")]
    rope_type = next((t for t in types if t not in (None, "default")), None)
    if rope_type is not None:
        return (
            f"its config.json sets rope_type {rope_type!r}: retrieval re-positions blocks by rotating their "
            "keys again, which only plain RoPE allows (rope_type 'default'); use a model without RoPE scaling"
        )
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1.0, 1):
        return f"its config.json sets partial_rotary_factor {partial}: retrieval needs RoPE over whole heads"
    dropout = config.get("attention_dropout", 0.0)
    if dropout not in (None, 0, 0.0):
        return f"its config.json sets attention_dropout {dropout}: landmark attention has no dropout"
    return None


def unsupported_config(config: Mapping[str, Any]) -> str | None:
    """Why the model of a ``config.json`` (as a dict) cannot be converted, read before it is loaded: a
    ``model_type`` or ``architectures`` outside the supported ones, a RoPE that retrieval cannot
    re-position, attention dropout (None: supported, or not said)."""
    if not isinstance(config, Mapping):
        return "its config.json is not a JSON object"
    problem = _rope_or_dropout_problem(config)
    if problem is not None:
        return problem
    model_type, names = config.get("model_type"), config.get("architectures")
    names = names if isinstance(names, list) and names else None
    known = model_type is None or (isinstance(model_type, str) and model_type in SUPPORTED_MODEL_TYPES)
    if known and (names is None or any(n in SUPPORTED_ARCHITECTURES for n in names)):
        return None
    classes = ", ".join(map(str, names or ["no architectures"]))
    return (
        f"its config.json describes a {model_type} model ({classes}); landmark.hf.convert supports "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type {', '.join(SUPPORTED_MODEL_TYPES)})"
    )


def load_converted(path: str | Path, **kwargs: Any) -> tuple[Any, Any]:
    """Load a landmark model and its tokenizer saved with ``save_pretrained`` (local folder only).

    Registers the ``"landmark"`` attention, loads with ``attn_implementation="landmark"`` and checks that
    the tokenizer's ``<landmark>`` id is ``config.landmark_token_id``. :func:`landmark.hf.load_pretrained`
    also takes delta folders; use it unless the folder is known to hold a whole model.

    Args:
        path: the folder written by ``model.save_pretrained(path)`` and ``tokenizer.save_pretrained(path)``.
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=torch.bfloat16``).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: the folder is missing or damaged (:func:`landmark.hf.checks.check_model_folder`), holds
            no landmark model (no ``landmark_token_id``/``landmark_block_size`` in its config), or the
            tokenizer does not match it.
    """
    transformers = require("transformers")

    path = check_model_folder(path, files=False)
    with loading(path):
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    missing = [a for a in ("landmark_token_id", "landmark_block_size") if getattr(config, a, None) is None]
    if missing:
        raise ValueError(
            f"{path} is not a landmark model (its config lacks {', '.join(missing)}): convert it first "
            "(`landmark hf convert --model DIR --out DIR`, or landmark.hf.convert and save_pretrained)"
        )
    check_model_folder(path)  # weights and tokenizer
    register()
    kwargs.setdefault("local_files_only", True)
    with loading(path):
        model = load_causal_lm(path, attn_implementation=ATTN_IMPLEMENTATION, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    token_id = _tokenizer_landmark_id(tokenizer)
    if token_id != config.landmark_token_id:
        raise ValueError(
            f"{path}: config.landmark_token_id is {config.landmark_token_id} but the tokenizer's "
            f"{LANDMARK_TOKEN} is {'missing' if token_id is None else token_id}"
        )
    _check_block_size(config.landmark_block_size, config)
    return note_sources(model, path), tokenizer


def landmark_token_id(model_or_config: Any) -> int:
    """``config.landmark_token_id`` of a converted model (or of its config); ValueError if not converted."""
    config = getattr(model_or_config, "config", model_or_config)
    token_id = getattr(config, "landmark_token_id", None)
    if token_id is None:
        raise ValueError("not a landmark model: convert it with landmark.hf.convert first")
    return int(token_id)


def encode_text(tokenizer: Any, text: str | list[str], add_special_tokens: bool = False) -> Any:
    """Token ids of ``text`` (or of each text of a list) with special-token strings kept as plain text.

    A ``<landmark>`` (or ``<|endoftext|>``) written in user text is encoded as ordinary characters, never
    as the special token, as :class:`landmark.data.Tokenizer` does on the native path: landmarks are
    inserted by the library at their positions only. ``add_special_tokens`` adds the tokenizer's own
    BOS/EOS as usual.

    Raises:
        ValueError: the tokenizer still produced the landmark id (it ignores ``split_special_tokens``).
    """
    ids = tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=True).input_ids
    token_id = _tokenizer_landmark_id(tokenizer)
    rows = [ids] if isinstance(text, str) else ids
    if token_id is not None and any(token_id in row for row in rows):
        raise ValueError(
            f"{type(tokenizer).__name__} encoded {LANDMARK_TOKEN} in the text as the landmark token "
            "(split_special_tokens unsupported): use a fast tokenizer"
        )
    return list(ids) if isinstance(text, str) else [list(row) for row in ids]


def _tokenizer_landmark_id(tokenizer: Any) -> int | None:
    """The id of ``<landmark>`` in the tokenizer's vocabulary, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: one lookup (get_vocab copies the whole vocabulary: ~50 ms)
        token_id = backend.token_to_id(LANDMARK_TOKEN)
    else:
        token_id = tokenizer.get_vocab().get(LANDMARK_TOKEN)
    return None if token_id is None else int(token_id)


def _check_block_size(block_size: Any, config: Any) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(
            f"block_size must be an int (positions per block, landmark included); got {block_size!r}"
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if block_size < 2 or (max_positions is not None and block_size > max_positions):
        raise ValueError(
            f"block_size must be between 2 (one token + the landmark) and the model's "
            f"max_position_embeddings ({max_positions}); got {block_size}"
        )


@torch.no_grad()
def _add_embedding_row(model: Any, token_id: int) -> None:
    """Make row ``token_id`` exist and equal the mean of the other rows, in the input embeddings and, when
    untied, in the output layer (tied weights share the one row)."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    if token_id >= old_rows:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not matrices[0]:
        matrices.append(output.weight)
        if getattr(output, "bias", None) is not None:
            _set_mean_row(output.bias, token_id, old_rows)
    for weight in matrices:
        _set_mean_row(weight, token_id, old_rows)


def _set_mean_row(weight: nn.Parameter | torch.Tensor, token_id: int, old_rows: int) -> None:
    """weight[token_id] = mean of the existing rows (those below ``old_rows``, ``token_id`` excluded)."""
    keep = torch.ones(min(old_rows, weight.shape[0]), dtype=torch.bool, device=weight.device)
    if token_id < len(keep):
        keep[token_id] = False
    mean = weight[: len(keep)][keep].float().mean(dim=0)
    weight[token_id] = mean.to(weight.dtype)
