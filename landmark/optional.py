"""Optional dependencies, imported on first use.

The core library needs torch, numpy, tokenizers, safetensors, tqdm and matplotlib. Hugging Face models
need the ``hf`` extra (transformers, peft, accelerate, gguf), the fused GPU kernels ``triton`` (the
``gpu`` extra), very large memories ``faiss`` and lm-evaluation-harness the ``lmeval`` extra. Their
modules are imported here, when a function first needs them, so that ``import landmark`` and every
command that does not use them start without them; :func:`require` says which extra installs a missing
one. matplotlib is imported the same way: it is installed with the core library, but takes about a
second to import and only the plotting functions need it.

This module imports nothing from the library (every layer may use it).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the extra of `pip install -e ".[extra]"` that installs it (None: the core install)
EXTRAS: dict[str, str | None] = {
    "transformers": "hf",
    "peft": "hf",
    "accelerate": "hf",
    "gguf": "hf",
    "triton": "gpu",
    "faiss": "faiss",
    "lm_eval": "lmeval",
    "datasets": "lmeval",
    "matplotlib": None,
}


def require(name: str) -> ModuleType:
    """Import the optional module ``name`` (``"transformers"``, ``"transformers.trainer_utils"``...).

    Raises:
        ImportError: one line naming the package and the install command, when it is not installed.
    """
    root = name.split(".")[0]
    if root not in EXTRAS:
        raise ValueError(f"{root} is not one of the optional dependencies: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(name)
    except ImportError as err:
        if err.name is None or err.name.split(".")[0] != root:
            raise  # installed, but something it needs is broken: the original error says what
        extra = EXTRAS[root]
        how = f'pip install -c constraints.txt -e ".[{extra}]"' if extra else f"pip install {root}"
        raise ImportError(f"{root} is needed for this and is not installed: {how}") from None


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` drawing to files (the non-interactive Agg backend)."""
    require("matplotlib").use("Agg")
    return require("matplotlib.pyplot")
