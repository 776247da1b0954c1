"""Shared pieces of the evaluations: models under test, result caching, progress."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from landmark.data.tokenizer import Tokenizer
from landmark.fingerprint import weights_fingerprint
from landmark.inference.retrieval import RetrievalConfig
from landmark.model import ATTENTION_KINDS, GPT

__all__ = ["CellCache", "ModelUnderTest", "weights_fingerprint"]

_RETRIEVAL = RetrievalConfig()
DEFAULT_OPTIONS = {"kernel": _RETRIEVAL.kernel, "max_blocks": None, "search": _RETRIEVAL.search}


@dataclass
class ModelUnderTest:
    """A loaded checkpoint with the name it is reported under."""

    name: str
    path: str
    model: GPT
    tokenizer: Tokenizer

    @property
    def kind(self) -> str:
        return self.model.config.attention


def parse_model_arg(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after the folder) -> (name, path)."""
    if "=" in text:
        name, path = text.split("=", 1)
    else:
        path = text
        name = Path(text.rstrip("/")).name
    if not name or not path:
        raise ValueError(f"--model must be NAME=PATH or PATH; got {text!r}")
    return name, path


def load_models(specs: list[str], device: str = "cpu") -> list[ModelUnderTest]:
    """Load every ``NAME=PATH`` checkpoint; a one-line ValueError naming ``--model`` for no model, a name
    given twice, a missing or damaged checkpoint or an unknown model kind."""
    from landmark.checkpoint import CheckpointError, load_model

    if not specs:
        raise ValueError("give at least one --model NAME=PATH (a training run folder or checkpoint)")
    named = [parse_model_arg(spec) for spec in specs]
    names = [name for name, _ in named]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--model names {twice} more than once: give every checkpoint its own NAME=PATH")
    out = []
    for name, path in named:
        try:
            model, tokenizer, _ = load_model(path, device=device)
        except CheckpointError as err:
            raise ValueError(f"--model {name}: {err}") from None
        if model.config.attention not in ATTENTION_KINDS:
            raise ValueError(
                f"--model {name}: unknown model kind {model.config.attention!r}; known: {ATTENTION_KINDS}"
            )
        out.append(ModelUnderTest(name, path, model.eval(), tokenizer))
    return out


class CellCache:
    """One JSON file per finished result cell, so an interrupted evaluation resumes where it stopped."""

    def __init__(self, folder: Path):
        self.folder = folder / "cells"
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / f"{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        path = self._path(key)
        if path.is_file():
            return json.loads(path.read_text())["result"]
        return None

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        write_json_atomic(self._path(key), {"key": key, "result": result})


def cache_key_options(options: dict | None, kind: str) -> dict | None:
    """The session options that change a landmark model's results (all but where memory lives), for
    a cache key; None for other models and for the defaults (so default cells keep their keys)."""
    if kind != "landmark" or not options:
        return None
    kept = {k: v for k, v in sorted(options.items()) if k != "memory_device"}
    return None if kept == DEFAULT_OPTIONS else kept


def write_json_atomic(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def check_lengths(lengths: list[int], models: list[ModelUnderTest], what: str = "--lengths") -> None:
    if not lengths:
        raise ValueError(f"{what} is empty: give at least one evaluation length in tokens")
    for m in models:
        bs = m.model.config.block_size if m.kind == "landmark" else 1
        short = [n for n in lengths if n < max(bs, 2)]
        if short:
            raise ValueError(
                f"{what}: {short} shorter than one block ({bs} tokens) of model {m.name!r}; "
                "use longer lengths"
            )
