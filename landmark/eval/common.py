"""Shared pieces of the evaluations: models under test, result caching, progress."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from landmark.data.books import check_outside_cache
from landmark.eval.models import (
    HF_PREFIX,
    RETRIEVAL_KINDS,
    GPTUnderTest,
    HFUnderTest,
    ModelUnderTest,
    Reading,
    load_models,
    parse_model_arg,
)
from landmark.files import (  # noqa: F401 - the writers
    CELLS,
    check_not_input,
    check_results_folder,
    record_results,
    write_json_atomic,
    write_text_atomic,
)
from landmark.fingerprint import weights_fingerprint
from landmark.hf.delta import is_delta
from landmark.hf.smollm2 import default_smollm2_dir
from landmark.inference.options import (
    check_block_folder,
    check_device,
    check_distinct,
    check_retrieval_arguments,
)

__all__ = [
    "CellCache",
    "GPTUnderTest",
    "HFUnderTest",
    "ModelUnderTest",
    "Reading",
    "load_models",
    "parse_model_arg",
    "weights_fingerprint",
]

# the default reading's options that change results (where the memory lives does not)
DEFAULT_OPTIONS = {k: v for k, v in sorted(Reading().options.items()) if k != "memory_device"}


def recorded_args(args: Any) -> dict[str, Any]:
    """The command's options as a results file records them: the parser's internal fields (the
    function to run, ``_``-prefixed notes) left out."""
    return {k: v for k, v in vars(args).items() if k != "func" and not k.startswith("_")}


def eval_command(args: Any) -> str:
    """``"eval ppl"``, ``"eval passkey"``, ...: the command whose results a folder records."""
    return f"eval {args.eval_command}"


def result_files(name: str) -> tuple[str, str, str]:
    """The files an evaluation writes into its results folder: ``<name>.md``, ``.json`` and ``.png``."""
    return f"{name}.md", f"{name}.json", f"{name}.png"


class CellCache:
    """One JSON file per finished result cell, so an interrupted evaluation resumes where it stopped."""

    def __init__(self, folder: Path):
        self.folder = folder / CELLS
        # made with the first cell: an evaluation stopped before it leaves no empty folders

    def _path(self, key: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.folder / f"{digest}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        """The cached result of ``key``, or None: not computed yet, or a damaged cell file (said on
        stderr; the cell is then computed again and the file replaced)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            cell = json.loads(path.read_text(encoding="utf-8"))
            if cell["key"] != json.loads(json.dumps(key)) or not isinstance(cell["result"], dict):
                raise ValueError("it holds another cell")
            return cell["result"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
            print(f"warning: {path} is damaged ({err}); computing the cell again", file=sys.stderr)
            return None

    def put(self, key: dict[str, Any], result: dict[str, Any]) -> None:
        if not self.folder.is_dir():
            record_results(self.folder.parent, [self.folder.name])
            self.folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self._path(key), {"key": key, "result": result})


def cache_key_options(options: dict | None, kind: str) -> dict | None:
    """The session options that change a landmark model's results (all but where memory lives), for
    a cache key; None for other models and for the defaults (so default cells keep their keys)."""
    if kind not in RETRIEVAL_KINDS or not options:
        return None
    kept = {k: v for k, v in sorted(options.items()) if k != "memory_device"}
    return None if kept == DEFAULT_OPTIONS else kept


def check_lengths(lengths: list[int], models: list[ModelUnderTest], what: str = "--lengths") -> None:
    """Every length holds at least one block of every landmark model (two tokens of any model)."""
    if not lengths:
        raise ValueError(f"{what} is empty: give at least one evaluation length in tokens")
    for m in models:
        bs = m.block_size
        short = [n for n in lengths if n < max(bs, 2)]
        if short:
            raise ValueError(
                f"{what}: {short} shorter than one block ({bs} tokens) of model {m.name!r}; "
                "use longer lengths"
            )


def check_common_arguments(args: Any, outputs: Iterable[str] = ()) -> None:
    """Checks every evaluation command shares, before any model is loaded: the retrieval options,
    ``--device``, ``--out`` (a folder, not a file, where none of the command's ``outputs`` is a file
    the library did not write; the cell cache's folder is added here) and ``--lengths`` (no value
    twice) where the command has them."""

    check_retrieval_arguments(args)
    check_device(args.device, "--device")
    if "lengths" in args:
        check_distinct("--lengths", args.lengths)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: give a folder for the results")
    reads = input_folders(args)
    for spec in getattr(args, "model", None) or []:  # (before transformers is imported to load them)
        name, given = parse_model_arg(spec)  # (NAME=PATH, NAME=hf:FOLDER or PATH)
        folder = given.removeprefix(HF_PREFIX)
        if not os.path.lexists(folder):
            raise ValueError(
                f"--model {name} {folder} is not a folder: it does not exist (a local model folder is "
                "expected; nothing is downloaded)"
            )
    check_not_input(out, reads, parents_ok=True)
    check_block_folder(args, reads)
    check_outside_cache(out)
    check_results_folder(out, [*outputs, CELLS], command=eval_command(args))


def input_folders(args: Any) -> list[tuple[str, str]]:
    """(folder, option) of what an evaluation reads: its models (``--model NAME=PATH`` or
    ``NAME=hf:FOLDER``), ``--base``, ``--data`` and ``--corpus`` (the bundled books aside)."""
    specs = getattr(args, "model", None) or []
    found = [(spec.split("=", 1)[-1].removeprefix(HF_PREFIX), "--model") for spec in specs]
    for name in ("base", "data", "corpus"):
        value = getattr(args, name, None)
        if value and value != "bundled":
            found.append((str(value).removeprefix(HF_PREFIX), f"--{name}"))
    if getattr(args, "base", None) is None and any(is_delta(folder) for folder, _ in found):
        found.append((str(default_smollm2_dir()), "a delta's base model"))  # what a delta is rebuilt over
    return found
