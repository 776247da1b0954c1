"""Checkpoints of a training run, written atomically, and :func:`load_model` for inference code.

A run folder holds ``checkpoints/step_XXXXXXXX/`` folders, each complete::

    model.safetensors   the weights (float32, the tied embedding stored once)
    config.json         the resolved run config: model, data (tokenizer path, landmark_id, ...), train
    tokenizer.json      the tokenizer, so that the checkpoint is self-contained
    state.pt            optimizer state, step, tokens seen, elapsed time, RNG states (torch.save)

A checkpoint is written into a hidden temporary folder beside the others and renamed into place when
every file is on disk, so a crash (``kill -9`` included) never leaves a partial ``step_*`` folder; the
latest checkpoint is the ``step_*`` folder with the highest step. Left-over temporary folders are
removed by :func:`clean_partial`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from landmark.data.tokenizer import TOKENIZER_FILE, Tokenizer
from landmark.files import note_sources, os_error_of, path_problem, staged_folder
from landmark.model import GPT, ModelConfig
from landmark.resources import check_device

FORMAT = "landmark-checkpoint-v1"
CHECKPOINTS = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "state.pt"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
LOAD_ATTEMPTS = 10  # a run folder's latest checkpoint pruned while it loads: pick the new latest, this often
RETRY_PAUSE = 0.002  # seconds, times the attempt: between the attempts


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the one-line message says why and what to do."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder and its config (the state is loaded on demand by :meth:`load_state`)."""

    path: Path
    step: int
    config: dict[str, Any]

    @property
    def model_config(self) -> ModelConfig:
        """The saved ``[model]`` settings, every field present: a missing one is never defaulted (a
        full-attention model would load as a landmark model, a block of 16 as one of 64)."""
        saved = self.config["model"]
        missing = sorted({f.name for f in fields(ModelConfig)} - set(saved))
        if missing:
            raise ValueError(f"model settings lack {', '.join(missing)}")
        return ModelConfig.from_dict(saved)

    def load_state(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """The training state written with the checkpoint (optimizer, step, RNG, counters)."""
        return torch.load(self.path / STATE_FILE, map_location=map_location, weights_only=True)

    def load_weights(self, model: nn.Module) -> None:
        """Copy the saved weights into ``model`` (strict: the parameter names and shapes must match)."""
        state = load_file(str(self.path / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{self.path} does not fit the model: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: GPT,
    config: dict[str, Any],
    tokenizer: Tokenizer,
    state: dict[str, Any],
    keep: int = 0,
) -> Path:
    """Write ``<run_dir>/checkpoints/step_<step>/`` atomically and prune older checkpoints.

    Args:
        run_dir: the run folder.
        step: optimizer steps done.
        model: the model (unwrapped from DistributedDataParallel).
        config: the resolved run config (JSON-serialisable), written as config.json with ``step``.
        tokenizer: written as tokenizer.json.
        state: anything ``torch.load(weights_only=True)`` can read back (tensors, numbers, dicts, lists).
        keep: keep only the newest ``keep`` checkpoints (0 = all).

    Returns:
        The checkpoint folder. When it already exists (the same step saved twice) it is left as it is.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if not final.is_dir():
        try:
            with staged_folder(final, durable=True) as tmp:
                weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
                save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT, "step": str(step)})
                meta = {"format": FORMAT, "step": step, **config}
                (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
                (tmp / TOKENIZER_FILE).write_text(tokenizer.to_json(), encoding="utf-8")
                with open(tmp / STATE_FILE, "wb") as f:  # a failed write raises with its errno
                    torch.save(state, f)
        except Exception as err:  # safetensors and torch report a full disk as their own errors
            cause = os_error_of(err)
            if cause is None or cause is err:
                raise
            raise OSError(cause.errno, cause.strerror, str(final)) from err
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            if old != final:
                prune_checkpoint(old)
    return final


def prune_checkpoint(path: Path) -> None:
    """Remove a checkpoint folder in one step for its readers: it is renamed to a hidden name first (a
    loader then sees it whole or not at all, never half-deleted), then deleted; a left-over hidden
    folder is removed by :func:`clean_partial`."""
    doomed = path.with_name(f".{path.name}.pruned")
    try:
        os.rename(path, doomed)
    except OSError:
        return  # already gone (another process pruned it)
    shutil.rmtree(doomed, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir: str | Path) -> None:
    """Remove temporary folders that an interrupted :func:`save_checkpoint` left behind."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step_"):
                shutil.rmtree(p, ignore_errors=True)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint folder, or the latest checkpoint of a run folder.

    Raises:
        CheckpointError: nothing usable at ``path``.
    """
    path = Path(path)
    if _is_run_folder(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"{path} is neither a checkpoint folder nor a run folder with checkpoints/step_*: "
                "pass the run's out_dir or one of its checkpoints/step_* folders"
            )
        path = latest
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: {' and '.join(missing)} missing")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE} is not valid JSON ({err})") from None
    except OSError as err:
        raise CheckpointError(f"{path / CONFIG_FILE} cannot be read ({err.strerror or err})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format {found!r})")
    if isinstance(config.get("step"), bool) or not isinstance(config.get("step"), int):
        raise CheckpointError(f"{path / CONFIG_FILE}: step must be an integer; got {config.get('step')!r}")
    return Checkpoint(path, config["step"], config)


def _is_run_folder(path: Path) -> bool:
    """Whether ``path`` names a run folder (its latest checkpoint is meant), not a checkpoint folder."""
    return not (_STEP_DIR.match(path.name) or (path / WEIGHTS_FILE).is_file())


def model_config_diff(saved: ModelConfig, wanted: ModelConfig) -> list[str]:
    """``["n_layer: 6 (checkpoint) != 4 (config)", ...]`` for every field that differs."""
    a, b = saved.to_dict(), wanted.to_dict()
    return [f"{k}: {a[k]!r} (checkpoint) != {b[k]!r} (config)" for k in a if a[k] != b[k]]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """Load a trained model for inference or evaluation.

    Args:
        path: a checkpoint folder (``<run>/checkpoints/step_*``) or a run folder (its latest checkpoint).
        device: where to put the model.

    Returns:
        ``(model, tokenizer, config)``: the GPT in eval mode with the saved weights, its tokenizer
        (``tokenizer.landmark_id == model.config.landmark_id``), and the resolved run config
        (``config["model"]``, ``config["data"]``, ``config["train"]``, ``config["step"]``).

    Raises:
        CheckpointError: ``path`` holds no usable checkpoint.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a run or checkpoint folder (str or Path); got {path!r}")
    path = Path(path)
    check_device(device, "device")  # one torch knows and this machine has
    device = torch.device(device)
    problem = path_problem(path, folder=True)
    if problem == "does not exist":
        raise CheckpointError(_missing_checkpoint(path))
    if problem not in (None, "is a file, not a folder"):
        raise CheckpointError(
            f"{path} {problem}: pass the run's out_dir or one of its checkpoints/step_* folders"
        )
    from_run = _is_run_folder(path)
    for attempt in range(LOAD_ATTEMPTS):
        if attempt:
            time.sleep(RETRY_PAUSE * attempt)  # let the writer finish its rename and prune
        chosen = latest_checkpoint(path) if from_run else path
        if chosen is None and (path / CHECKPOINTS).is_dir() and attempt < LOAD_ATTEMPTS - 1:
            continue  # a listing taken while checkpoints are renamed can miss them all: list again
        try:
            ckpt = open_checkpoint(chosen if chosen is not None else path)
            model, tokenizer = _load_parts(ckpt)
            check_tokenizer(ckpt, model.config, tokenizer)
            note_sources(model, ckpt.path, path)  # (the run folder too, when one was given)
            return model.to(device).eval(), tokenizer, ckpt.config
        except (CheckpointError, OSError):
            if chosen is None or chosen.is_dir():
                raise  # nothing was removed under us: the checkpoint itself is at fault
            if not from_run or attempt == LOAD_ATTEMPTS - 1:
                run = path if from_run else path.parent.parent
                raise CheckpointError(
                    f"checkpoint {chosen.name} was removed while loading (a run is training into {run}): "
                    "try again"
                ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _missing_checkpoint(path: Path) -> str:
    """Why ``path`` cannot be loaded when it does not exist: a checkpoint of a run that holds others (a
    training run prunes its older checkpoints as it goes, perhaps a moment ago), or nothing at all."""
    run = path.parent.parent
    latest = latest_checkpoint(run) if path.parent.name == CHECKPOINTS and path.parent.is_dir() else None
    if latest is not None:
        return (
            f"checkpoint {path.name} of {run} is gone (a training run prunes its older checkpoints as it "
            f"goes); the run holds {latest.name} now: pass {run} for its latest checkpoint"
        )
    return f"{path} does not exist: pass the run's out_dir or one of its checkpoints/step_* folders"


def _load_parts(ckpt: Checkpoint) -> tuple[GPT, Tokenizer]:
    """The model with its weights and the tokenizer of ``ckpt``; a damaged or incomplete folder (invalid
    model settings, a truncated or empty weights file, weights of other shapes, no tokenizer.json) is a
    one-line CheckpointError instead of the library's own exception."""
    try:
        model = GPT(ckpt.model_config)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt.path / CONFIG_FILE}: invalid model settings ({err})") from None
    try:
        ckpt.load_weights(model)
    except (SafetensorError, RuntimeError, OSError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
        reason = next((line for line in lines if "size mismatch" in line), lines[0])[:200]
        raise CheckpointError(
            f"{ckpt.path / WEIGHTS_FILE} cannot be loaded into the model of config.json ({reason}): "
            "the file is damaged or belongs to another model"
        ) from None
    if not (ckpt.path / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{ckpt.path / TOKENIZER_FILE} is missing: the checkpoint is incomplete")
    try:
        tokenizer = Tokenizer.load(ckpt.path)
    except Exception as err:  # the tokenizers library raises a bare Exception for an unreadable file
        raise CheckpointError(f"{ckpt.path / TOKENIZER_FILE} cannot be read ({err})") from None
    return model, tokenizer


def check_tokenizer(ckpt: Checkpoint, model_config: ModelConfig, tokenizer: Tokenizer) -> None:
    """Refuse a tokenizer.json that is not the one config.json records (fingerprint, landmark id) or that
    has more tokens than the model's embedding (a larger ``model.vocab_size`` is padding: allowed)."""
    data = ckpt.config.get("data") or {}
    recorded = data.get("tokenizer_fingerprint")
    if recorded is None:
        raise CheckpointError(
            f"{ckpt.path / CONFIG_FILE} lacks data.tokenizer_fingerprint: the tokenizer cannot be checked "
            "against the one the model was trained with"
        )
    if recorded != tokenizer.fingerprint:
        raise CheckpointError(
            f"{ckpt.path}: tokenizer.json (fingerprint {tokenizer.fingerprint}) is not the tokenizer the "
            f"model was trained with (config.json: data.tokenizer_fingerprint {recorded})"
        )
    if tokenizer.landmark_id != model_config.landmark_id and model_config.attention == "landmark":
        raise CheckpointError(f"{ckpt.path}: tokenizer.json does not match config.json (landmark_id)")
    trained = data.get("block_size")  # the blocks the training data's landmarks were laid out in
    if model_config.attention == "landmark" and data.get("landmarks") and trained != model_config.block_size:
        raise CheckpointError(
            f"{ckpt.path / CONFIG_FILE}: model.block_size {model_config.block_size} is not the block size "
            f"the model was trained with (data.block_size {trained})"
        )
    if model_config.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(
            f"{ckpt.path}: model.vocab_size {model_config.vocab_size} in config.json is smaller than the "
            f"tokenizer's {tokenizer.vocab_size} tokens"
        )
