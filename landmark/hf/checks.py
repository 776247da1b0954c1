"""Checked options, input folders and never-half-written output folders for the ``landmark hf`` commands.

* :func:`check_options`: numeric options against their ranges (:func:`int_range`, :func:`real_range`:
  integers, finite numbers; nan and inf refused), one-line ``ValueError`` exceptions naming the option.
* :func:`check_model_folder`: a local model folder (``config.json``, weights, a tokenizer) that exists,
  checked before anything is loaded: nothing is ever downloaded, so a missing folder is a mistake to
  report in one line (transformers would say "Repo id must be in the form ..."); its JSON files parse,
  and its ``config.json`` sizes are ones transformers accepts (:func:`config_problem`).
* :func:`loading`: turns the errors of ``from_pretrained`` on a damaged folder (truncated weights,
  invalid JSON, mismatched shapes, a config transformers' validation refuses) into one-line
  ``ValueError`` exceptions.
* :func:`shape_mismatch`: whether a landmark model's ``config.json`` can be that of a conversion of a
  base model's (the same shape, the vocabulary + the landmark token), read before either is loaded.
* :func:`check_out_folder`, :func:`staging_folder`, :func:`publish`: a command refuses an existing,
  non-empty output folder unless told ``overwrite``; it writes into a staging folder beside it and
  renames that into place at the end, so an interrupted run leaves the old folder intact and a finished
  one leaves no stale file of the previous run.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open  # a dependency of transformers

from landmark.data.books import check_outside_cache
from landmark.files import first_line, path_problem, replace_folder
from landmark.optional import require

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json")  # parsed when present, before loading
# config.json sizes that must be positive integers where given (LLaMA-family names)
CONFIG_SIZES = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "intermediate_size", "vocab_size", "max_position_embeddings")  # fmt: skip
STAGING_SUFFIX = ".partial"  # <parent>/.<name>.partial: written while a command runs

DEFAULT_NAME = "model folder"  # how messages name a model folder outside the command line
# config.json fields a landmark model keeps from the base it was converted from (its vocabulary aside)
SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size")  # fmt: skip
Rule = tuple[Callable[[Any], bool], str]  # (accepts the value, what is expected: "an integer >= 1")


def int_range(low: int, high: int | None = None) -> Rule:
    """An integer in ``[low, high]`` (``high`` None: no upper bound); bools are refused."""

    def ok(value: Any) -> bool:
        is_int = isinstance(value, int) and not isinstance(value, bool)
        return is_int and value >= low and (high is None or value <= high)

    return ok, f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"


def real_range(
    low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> Rule:
    """A finite number above ``low`` (``open_low``: strictly) and below ``high`` (``open_high``: strictly)."""

    def ok(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = value > low if open_low else value >= low
        below = high is None or (value < high if open_high else value <= high)
        return above and below

    if high is None:
        return ok, f"a finite number {'>' if open_low else '>='} {low:g}"
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    return ok, f"a number in {interval}"


def option_name(name: str) -> str:
    """The command-line option of a setting: ``lora_dropout`` -> ``--lora-dropout``."""
    return "--" + name.replace("_", "-")


def check_options(values: Mapping[str, Any], rules: Mapping[str, Rule]) -> None:
    """Check every ``values[name]`` that is not None against ``rules[name]``.

    Raises:
        ValueError: the first value out of its range, as ``--name must be <expected>; got <value>``.
    """
    for name, (ok, expected) in rules.items():
        value = values.get(name)
        if value is not None and not ok(value):
            raise ValueError(f"{option_name(name)} must be {expected}; got {value!r}")


def check_model_folder(path: str | Path, name: str = DEFAULT_NAME, files: bool = True) -> Path:
    """``path`` as a Path if it looks like a local model folder, else a one-line ``ValueError``.

    Args:
        path: the folder.
        name: how the message names it (``"--model"`` on the command line).
        files: check for weights and tokenizer files too (else only a valid ``config.json``).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(
            f"{name} {path}: the folder does not exist (a local model folder is expected; nothing is "
            "downloaded)"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ValueError(f"{name} {path} is not a model folder (it has no config.json)")
    config = _read_json(path, "config.json", name)
    problem = config_problem(config)
    if problem is not None:
        raise ValueError(f"{name} {path}: config.json {problem}")
    for kind, names in (("weights", WEIGHT_FILES), ("tokenizer", TOKENIZER_FILES)) if files else ():
        if not any((path / f).is_file() for f in names):
            raise ValueError(f"{name} {path} is not a model folder (no {kind}: none of {', '.join(names)})")
    for file in TOKENIZER_JSON_FILES:
        if (path / file).is_file():
            _read_json(path, file, name)
    return path


def _read_json(path: Path, file: str, name: str) -> Any:
    """The JSON of ``path / file``; a one-line ValueError naming the folder and the file if it does not
    parse."""
    try:
        return json.loads((path / file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name} {path}: {file} is not valid JSON ({first_line(err)})") from None


def config_problem(config: Any) -> str | None:
    """What in a ``config.json`` (parsed) transformers would refuse or build a broken model from: a size
    of CONFIG_SIZES given but not a positive integer, a hidden size not split evenly into attention
    heads, attention heads not split evenly into key/value heads; None when there is nothing wrong."""
    if not isinstance(config, dict):
        return "is not a JSON object"
    if not isinstance(config.get("model_type"), str):  # (a checkpoint of landmark train has none)
        return "has no model_type: not a Hugging Face model folder"
    for key in CONFIG_SIZES:
        value = config.get(key)
        if value is not None and not int_range(1)[0](value):
            return f"has {key} {value!r}: it must be a positive integer"
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads")
    if hidden is not None and heads is not None and hidden % heads:
        return f"has hidden_size {hidden}, not a multiple of num_attention_heads {heads}"
    if heads is not None and kv_heads is not None and heads % kv_heads:
        return f"has num_attention_heads {heads}, not a multiple of num_key_value_heads {kv_heads}"
    return None


EMBEDDING = "model.embed_tokens.weight"  # the input embedding of a LLaMA-family checkpoint


def embedding_problem(folder: Path, config: Mapping[str, Any]) -> str | None:
    """Whether the input embedding in ``folder/model.safetensors`` (its header alone) has the shape
    config.json gives it, (vocab_size, hidden_size); a mismatch in words, None if it fits or cannot be
    told (another file layout, a name not found: loading checks the rest)."""
    file = folder / "model.safetensors"
    want = (config.get("vocab_size"), config.get("hidden_size"))
    if not file.is_file() or None in want:
        return None
    try:
        with safe_open(str(file), "pt") as f:
            if EMBEDDING not in f.keys():  # noqa: SIM118 (no __contains__)
                return None
            shape = tuple(f.get_slice(EMBEDDING).get_shape())
    except (OSError, SafetensorError):
        return None  # a damaged file: loading says so
    if shape != want:
        return (
            f"config.json gives vocab_size {want[0]} and hidden_size {want[1]}, but its weights hold an "
            f"embedding of {shape[0]} x {shape[1]}: the config.json does not belong to these weights"
        )
    return None


def read_config(path: str | Path) -> dict:
    """The ``config.json`` of a folder checked by :func:`check_model_folder`, as a dict."""
    return json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))


def check_within_positions(config: Mapping[str, Any], values: Mapping[str, Any]) -> None:
    """Each ``values[name]`` (positions; None: unchecked) is at most the model's
    ``max_position_embeddings`` (when its ``config.json`` has one).

    Raises:
        ValueError: ``--name must be at most the model's max_position_embeddings (N); got V``.
    """
    limit = config.get("max_position_embeddings")
    for name, value in values.items():
        if limit is not None and value is not None and value > limit:
            raise ValueError(
                f"{option_name(name)} must be at most the model's max_position_embeddings "
                f"({limit}); got {value}"
            )


def shape_mismatch(landmark: Mapping[str, Any], base: Mapping[str, Any]) -> str | None:
    """How the ``config.json`` of a landmark model (``landmark``, as a dict) shows that it was not
    converted from the model of ``base``'s: a field of SHAPE_FIELDS that differs (fields one of them
    lacks are not compared), or a vocabulary other than the base's with the landmark token added (its
    id past the base's rows adds one row); None when they agree."""
    for key in SHAPE_FIELDS:
        mine, theirs = landmark.get(key), base.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            return f"{key} {theirs}, the landmark model's {mine}"
    vocab, base_vocab = landmark.get("vocab_size"), base.get("vocab_size")
    if not (isinstance(vocab, int) and isinstance(base_vocab, int)):
        return None
    token = landmark.get("landmark_token_id")
    expected = {max(base_vocab, token + 1)} if isinstance(token, int) else {base_vocab, base_vocab + 1}
    if vocab not in expected:
        return f"vocab_size {base_vocab}, the landmark model's {vocab} (the base's + its landmark token)"
    return None


@contextmanager
def loading(path: str | Path, name: str = DEFAULT_NAME) -> Iterator[None]:
    """Re-raise the errors of loading a damaged model folder as one-line ``ValueError`` exceptions."""

    try:
        yield
    except Exception as err:
        loading_error = isinstance(err, OSError | RuntimeError | ValueError | SafetensorError)
        if not loading_error and not _config_error(err):
            raise
        if _config_error(err) and err.__cause__ is not None:
            err = err.__cause__  # "Class validation error for validator ...": the validator's own error
        raise ValueError(f"{name} {path}: cannot load the model: {first_line(err)}") from None


KEY_KINDS = ("missing", "unexpected", "mismatched")  # weights transformers reports as not matching


def load_causal_lm(folder: str | Path, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)``, refusing (a
    ValueError) weights that do not match the config: tensors missing (transformers would initialise them
    at random and run), unexpected or of other shapes. Call it inside :func:`loading`."""
    transformers = require("transformers")
    kwargs = {"local_files_only": True, **kwargs, "output_loading_info": True}
    bars = transformers.utils.logging  # (its "Loading weights" bar: under a second, and it stood above
    shown = bars.is_progress_bar_enabled()  # the one-line error of a model refused once loaded)
    bars.disable_progress_bar()
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    finally:
        if shown:
            bars.enable_progress_bar()
    wrong = {kind: sorted(map(str, info.get(f"{kind}_keys") or ())) for kind in KEY_KINDS}
    if any(wrong.values()):
        said = "; ".join(f"{len(keys)} {kind} ({', '.join(keys[:2])}{', ...' if len(keys) > 2 else ''})"
                         for kind, keys in wrong.items() if keys)  # fmt: skip
        raise ValueError(f"its weights do not match its config.json: {said}")
    return model


def _config_error(err: Exception) -> bool:
    """Whether ``err`` is huggingface_hub's strict-dataclass validation error (raised by transformers'
    configs for values they refuse; not a ValueError), recognised by its class name so that this module
    does not import huggingface_hub."""
    return any(c.__name__ == "StrictDataclassError" for c in type(err).__mro__)


def check_out_folder(out: str | Path, overwrite: bool, name: str = "--out") -> Path:
    """``out`` as a Path if a command may write there: missing, an empty folder, or ``overwrite``.

    Raises:
        ValueError: ``out`` is a file, or a non-empty folder without ``overwrite`` (the message says to
            pass ``--overwrite``), or a non-empty folder that is no model or delta (never replaced).
    """
    out = Path(out)
    problem = path_problem(out, folder=True, writable=True)  # a loop, a path that cannot be made
    if problem is not None and problem != "is a file, not a folder":
        raise ValueError(f"{name} {out} {problem}")
    if out.name in ("", ".", "..") or Path.cwd().resolve().is_relative_to(out.resolve()):
        raise ValueError(f"{name} {out} is the current folder or holds it: give a new folder to write")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {out} is a file, not a folder")
    check_outside_cache(out, name)  # (hf prepare-smollm2 alone writes its model there)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{name} {out} already exists and is not empty: pass --overwrite to replace it, or choose "
            "another folder"
        )
    if out.is_dir() and any(out.iterdir()) and not _model_or_delta(out):
        held = sorted(p.name for p in out.iterdir())
        raise ValueError(
            f"{name} {out} holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}, not a Hugging Face "
            "model or a delta: --overwrite replaces only those; choose another folder"
        )
    return out


def _model_or_delta(folder: Path) -> bool:
    """Whether ``folder`` is what the Hugging Face commands write (so that ``--overwrite`` may replace
    it): a model (a config.json with a ``model_type``) or a delta (a delta.json)."""
    if (folder / "delta.json").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" in config


def staging_folder(out: str | Path) -> Path:
    """The folder a command writes before :func:`publish` renames it to ``out`` (the same for every
    process of a torchrun job)."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def clear_staging(out: str | Path) -> Path:
    """Remove what a killed run left in ``out``'s staging folder; return that folder."""
    staging = staging_folder(out)
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def publish(out: str | Path) -> Path:
    """Move ``out``'s staging folder to ``out``, replacing what was there (checked by
    :func:`check_out_folder`) only once the new folder is complete."""
    return replace_folder(staging_folder(out), out)


def for_option(err: ValueError, option: str) -> ValueError:
    """``err`` reworded for the command line: its "model folder X" becomes "<option> X", or the message
    is prefixed with "<option>: "."""
    text = str(err)
    if text.startswith(DEFAULT_NAME + " "):
        return ValueError(option + text[len(DEFAULT_NAME) :])
    if text.startswith(option + " "):  # named already
        return ValueError(text)
    return ValueError(f"{option}: {text}")
