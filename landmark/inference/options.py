"""Command-line options of retrieval inference, declared once for every command that reads with retrieval.

``add_retrieval_arguments`` adds the group (``--k``, ``--granularity``, ``--search``, ``--kernel``,
``--chunk-len``, ``--memory-device``, ``--max-blocks``) to ``landmark generate``, ``landmark hf generate``,
``landmark eval ppl`` / ``passkey`` and ``landmark quickstart``; with ``multiple=True`` (``eval ppl``)
``--k`` and ``--granularity`` take several values, one evaluation each. ``check_retrieval_arguments``
refuses bad values before any work is done (``check_chunk_len`` once the model's block size is known);
``Reading.from_args(args)`` turns the parsed values into the one options object that goes on to the
cache (its ``retrieval`` and ``cache_kwargs()``); ``add_state_arguments`` adds ``--save-state`` /
``--load-state`` (read a document once, ask many questions); ``add_sampling_arguments`` /
``check_sampling_arguments`` are the generation options of both generate commands, ``check_device``
the device names. Defaults come from ``RetrievalConfig`` and the cache, so they are the same everywhere.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from landmark.files import check_not_input, path_problem
from landmark.inference.cache import (
    DEFAULT_CHUNK_LEN,
    MAX_CHUNK_LEN,
    StateFileError,
    check_state_destination,
    check_state_header,
)
from landmark.inference.kernel import KERNELS, KernelUnavailableError, kernel_module
from landmark.inference.retrieval import BLOCK_DTYPES, GRANULARITIES, MAX_K, SEARCHES, RetrievalConfig
from landmark.inference.weights import WEIGHTS
from landmark.ops.support import triton_runs_on
from landmark.resources import check_device

_DEFAULT = RetrievalConfig()
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed
_SEVERAL = "; several values: one evaluation each"


def add_retrieval_arguments(
    parser: argparse.ArgumentParser, *, k_zero: str | None = None, multiple: bool = False
) -> None:
    """The retrieval option group.

    Args:
        k_zero: what ``--k 0`` means for this command (None: refused).
        multiple: ``--k`` and ``--granularity`` take one or more values (lists), one evaluation each.
    """
    g = parser.add_argument_group("retrieval (docs/method.md)")
    nargs, several = ("+", _SEVERAL) if multiple else (None, "")
    k_help = f"blocks retrieved per query and head, >= 1 (default {_DEFAULT.k})"
    if k_zero:
        k_help += f"; 0: {k_zero}"
    g.add_argument(
        "--k", type=int, nargs=nargs, default=[_DEFAULT.k] if multiple else _DEFAULT.k, help=k_help + several
    )
    g.add_argument(
        "--granularity",
        choices=GRANULARITIES,
        nargs=nargs,
        default=[_DEFAULT.granularity] if multiple else _DEFAULT.granularity,
        help=f"who picks the k blocks (default {_DEFAULT.granularity}){several}",
    )
    g.add_argument(
        "--search",
        choices=SEARCHES,
        default=_DEFAULT.search,
        help="landmark search: exact scan; faiss index (extra); bounded (super-block bounds, exact)",
    )
    g.add_argument(
        "--kernel",
        choices=KERNELS,
        default=_DEFAULT.kernel,
        help="auto: the fused C++ kernel for CPU float32 steps, the fixed graph (graph) on a GPU; cpp: the "
        "kernel always; graph: the fixed graph of tensor operations; triton: the graph attending through "
        "one Triton kernel (GPU); torch: the eager reference",
    )
    g.add_argument(
        "--block-dtype",
        choices=tuple(BLOCK_DTYPES),
        default=_DEFAULT.block_dtype,
        help="how the block memory stores block contents: as the model (default), float32, float16, "
        "bfloat16, or int8 with a scale per block (about a quarter of float32)",
    )
    g.add_argument(
        "--block-folder",
        default=None,
        help="keep block contents in memory-mapped files in this folder (inputs larger than RAM; "
        "default: in memory)",
    )
    g.add_argument(
        "--chunk-len",
        type=int,
        default=DEFAULT_CHUNK_LEN,
        help=f"positions read at once, >= the model's block size (default {DEFAULT_CHUNK_LEN})",
    )
    g.add_argument(
        "--memory-device", default=None, help="where block contents live, e.g. cpu (default: model's)"
    )
    g.add_argument(
        "--max-blocks", type=int, default=None, help="cap on memory blocks per row, >= 1 (FIFO eviction)"
    )
    parser.set_defaults(_k_zero=k_zero is not None)


def add_state_arguments(parser: argparse.ArgumentParser) -> None:
    """``--save-state`` and ``--load-state``: read a long document once, then ask many questions."""
    g = parser.add_argument_group("read once, ask many")
    g.add_argument(
        "--save-state", metavar="FILE", help="after reading the prompt, save the stream state here"
    )
    g.add_argument(
        "--load-state", metavar="FILE", help="continue a saved state: the prompt follows its document"
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="with --save-state: replace an existing file that is not a saved state (a file this "
        "command reads is never replaced)",
    )


def add_sampling_arguments(
    parser: argparse.ArgumentParser, *, max_new_tokens: int, temperature: float, top_p: float
) -> None:
    """``--max-new-tokens``, ``--temperature`` and ``--top-p`` with this command's defaults."""
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=max_new_tokens,
        help=f"tokens to generate, >= 1 (default {max_new_tokens})",
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=temperature,
        help=f"finite, >= 0; 0 = greedy (default {temperature})",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        help=f"nucleus sampling mass in (0, 1], 1 = off; only with --temperature > 0 (default {top_p})",
    )
    parser.set_defaults(default_top_p=top_p)


def option_values(value) -> list:
    """A parsed option as a list (single-valued options give one element)."""
    return list(value) if isinstance(value, list | tuple) else [value]


def check_distinct(option: str, values: list) -> None:
    """Refuse a list option that names the same value twice (the same cell would be computed twice)."""
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ValueError(
            f"{option} lists {', '.join(map(str, repeated))} more than once; give each value once"
        )


def without_negative_zero(values: list[float]) -> list[float]:
    """``values`` with -0.0 as 0.0 (``--depths -0.0`` is depth 0; its cells were labelled "-0%")."""
    return [v + 0.0 for v in values]


def add_weights_argument(parser: argparse.ArgumentParser) -> None:
    """``--weights``: how the model's linear layers hold their weights (``compact_weights``)."""
    parser.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="model",
        help="the linear layers' weights: as the model holds them (default), or int8 with a scale per "
        "group of 32 inputs (28%% of float32's bytes; decoding on a CPU about 2x faster; answers may "
        "change slightly, docs/inference.md)",
    )


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs (checked by :func:`check_device`, defaulted by
    :func:`resolve_device`); the same option for ``generate``, ``hf generate`` and ``eval``."""
    parser.add_argument(
        "--device",
        default=None,
        help="where the model runs: cpu, cuda or cuda:N (default: cuda if available, else cpu)",
    )


def resolve_device(value: str | None) -> str:
    """The ``--device`` value (see :func:`check_device`), or the default when None: cuda if this torch
    has a CUDA device, else cpu."""

    return value or ("cuda" if torch.cuda.is_available() else "cpu")


def check_retrieval_arguments(args: argparse.Namespace) -> None:
    """One-line ValueErrors for values the parser cannot check (before any work is done)."""
    if getattr(args, "compile", False) and args.kernel == "cpp":
        raise ValueError("--compile runs torch.compile'd stages in place of the C++ kernel, which --kernel "
                         "cpp asks for: give one of them")  # fmt: skip
    ks = option_values(args.k)
    k_zero = getattr(args, "_k_zero", False)
    bad = [k for k in ks if k < 0 or (k == 0 and not k_zero)]
    if bad:
        raise ValueError(f"--k must be >= {0 if k_zero else 1}; got {bad[0]}")
    if max(ks) > MAX_K:
        raise ValueError(f"--k must be at most {MAX_K:,} (blocks retrieved per query); got {max(ks)}")
    check_distinct("--k", ks)
    check_distinct("--granularity", option_values(args.granularity))
    other = [g for g in option_values(args.granularity) if g != "token_head"]
    if args.search == "bounded" and other:
        raise ValueError(f"--search bounded selects per query row and head: it needs --granularity "
                         f"token_head; got {other[0]}")  # fmt: skip
    if args.max_blocks is not None and args.max_blocks < 1:
        raise ValueError(f"--max-blocks must be >= 1; got {args.max_blocks}")
    if not 1 <= args.chunk_len <= MAX_CHUNK_LEN:
        raise ValueError(
            f"--chunk-len must be in [1, {MAX_CHUNK_LEN:,}] (positions per forward); got {args.chunk_len}"
        )
    check_device(args.memory_device, "--memory-device")
    if getattr(args, "block_folder", None) is not None:
        problem = path_problem(Path(args.block_folder), folder=True, writable=True)
        if problem is not None:
            raise ValueError(f"--block-folder {args.block_folder} {problem}")
    if args.kernel == "triton" and "device" in args:
        _check_triton_device(args.device)
    if args.kernel == "cpp":  # built (or found built) now, before the model is loaded
        try:
            kernel_module(required=True)
        except KernelUnavailableError as err:
            reason = err.__cause__ or err
            folder = os.environ.get("TORCH_EXTENSIONS_DIR")
            where = f" (the build folder: TORCH_EXTENSIONS_DIR={folder})" if folder else ""
            raise ValueError(f"--kernel cpp: {reason}{where}: use --kernel auto (the eager path)") from None
    if args.search == "faiss" and importlib.util.find_spec("faiss") is None:
        raise ValueError('--search faiss needs faiss-cpu: pip install "landmark-attention[faiss]"')
    _check_state_arguments(args, ks)


def _check_triton_device(device: str | None) -> None:
    """``--kernel triton`` with ``--device``: a CUDA device, or the Triton interpreter."""
    check_device(device, "--device")
    if not triton_runs_on(resolve_device(device)):
        raise ValueError(
            f"--kernel triton runs on a CUDA GPU; the model reads on {resolve_device(device)} here "
            "(TRITON_INTERPRET=1 runs it on the CPU, slowly): use --kernel auto"
        )


def _check_state_arguments(args: argparse.Namespace, ks: list[int]) -> None:
    """``--load-state`` must exist, and both state options need retrieval (``--save-state`` itself:
    :func:`check_save_state`, once the command knows what it reads)."""
    load = getattr(args, "load_state", None)
    if load is not None and not Path(load).is_file():
        problem = path_problem(Path(load), folder=False) or "is not a regular file"
        raise ValueError(f"--load-state {load} {problem}")
    if load is not None:
        try:
            meta = check_state_header(load)  # from its header: before the model is loaded
        except StateFileError as err:
            raise ValueError(f"--load-state {err}") from None
        saved, weights = meta.get("weights", "model"), getattr(args, "weights", "model")
        if saved != weights:
            raise ValueError(f"--load-state {load} was saved with --weights {saved}; this run has --weights "
                             f"{weights}: give --weights {saved}")  # fmt: skip
    save = getattr(args, "save_state", None)
    if (load or save) and 0 in ks:
        raise ValueError("--save-state/--load-state need retrieval (--k >= 1)")
    if getattr(args, "overwrite", False) and save is None and "save_state" in args:
        raise ValueError("--overwrite goes with --save-state (it is the file it may replace)")


def check_save_state(args: argparse.Namespace, reads: list[tuple[str | Path | None, str]]) -> None:
    """``--save-state`` never destroys an input: not a folder, not a file the command reads (``reads``:
    (file or folder, description); ``--load-state`` is added here), and an existing file only if it is
    a saved state already or ``--overwrite`` is given. Call before any work."""
    if args.save_state is None:
        return
    reads = [
        *reads,
        (args.load_state, "the --load-state file"),
        (getattr(args, "block_folder", None), "--block-folder"),
    ]
    check_state_destination(args.save_state, args.overwrite, reads, option="--save-state")


def check_block_folder(args: argparse.Namespace, reads: list[tuple[str | Path | None, str]]) -> None:
    """``--block-folder`` never lies inside a folder the command reads (``reads``: (folder, option), a
    delta's base model included): its memory files would be made among a model's files. Call before
    any work."""
    if getattr(args, "block_folder", None) is not None:
        folders = [(folder, option.removeprefix("a file of ")) for folder, option in reads]
        check_not_input(args.block_folder, folders, "--block-folder", parents_ok=True)


def check_chunk_len(args: argparse.Namespace, block_size: int, model: str = "the model") -> None:
    """``--chunk-len`` must hold at least one block of the model (known once the model is loaded)."""
    if args.chunk_len < block_size:
        raise ValueError(
            f"--chunk-len ({args.chunk_len}) must be at least one block ({block_size}) of {model}"
        )


def note_k_above_blocks(k: int, positions: int, block_size: int) -> None:
    """Say (stderr) when ``--k`` is above the blocks an input of ``positions`` regular tokens can make: the
    reading then retrieves every block (k is clamped to the blocks held; nothing grows with it)."""
    blocks = positions // (block_size - 1)
    if k > max(blocks, _DEFAULT.k):  # (the default k over a short input needs no note)
        print(f"note: --k {k} is above the {blocks:,} blocks this input can hold: every block is retrieved",
              file=sys.stderr)  # fmt: skip


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """``--max-new-tokens`` >= 1, a finite ``--temperature`` >= 0, ``--top-p`` in (0, 1] and ``--seed``
    only where sampling (temperature > 0); ``--top-p`` not given takes the command's default."""
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1; got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature must be a finite number >= 0 (0 = greedy); got {args.temperature}")
    top_p = getattr(args, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1]; got {top_p}")
    if top_p is not None and top_p < 1 and args.temperature == 0:
        raise ValueError(f"--top-p {top_p} samples, and --temperature 0 is greedy: give --temperature > 0, "
                         "or drop --top-p")  # fmt: skip
    seed = getattr(args, "seed", None)
    if seed is not None and args.temperature == 0:
        raise ValueError(f"--seed {seed} seeds sampling, and --temperature 0 is greedy: give --temperature "
                         "> 0, or drop --seed")  # fmt: skip
    if top_p is None:  # greedy keeps every token
        args.top_p = getattr(args, "default_top_p", 1.0) if args.temperature > 0 else 1.0
    check_seed(seed)


def check_utf8(text: str, option: str) -> str:
    """``text`` if it is valid Unicode; a prompt given as bytes that are not UTF-8 (Python keeps them as
    lone surrogates in ``sys.argv``) is a one-line ValueError naming ``option``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{option} is not UTF-8 text") from None
    return text


def check_seed(seed: int | None, option: str = "--seed") -> None:
    """A seed torch's generators take: None (random) or an integer in [0, 2**63 - 1]."""
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{option} must be an integer in [0, 2**63 - 1]; got {seed}")


# Reading fields only the retrieval cache reads, k aside: the model's own attention over the whole context
# (k=0, or a model without landmarks) would ignore them (Reading.retrieval_options_set)
RETRIEVAL_ONLY = ("granularity", "search", "kernel", "compile", "block_dtype", "block_folder",
                  "memory_device", "max_blocks")  # fmt: skip


@dataclass(frozen=True)
class Reading:
    """How a landmark model reads a long input: the one options object from the command line
    (:meth:`from_args`) to the retrieval cache (:attr:`retrieval`, :meth:`cache_kwargs`).

    ``k``, ``granularity``, ``search``, ``kernel``, ``compile`` and ``block_dtype`` are the
    :class:`RetrievalConfig` (checked there); ``chunk_len`` is the positions read per forward;
    ``memory_device`` where the block memory lives (None: the model's device); ``max_blocks`` the cap
    on memory blocks per row (None: no cap). The defaults are those of ``RetrievalConfig`` and the cache.
    """

    k: int = _DEFAULT.k
    granularity: str = _DEFAULT.granularity
    chunk_len: int = DEFAULT_CHUNK_LEN
    search: str = _DEFAULT.search
    kernel: str = _DEFAULT.kernel
    compile: bool = False
    block_dtype: str = _DEFAULT.block_dtype
    block_folder: str | None = None
    memory_device: str | None = None
    max_blocks: int | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace, **override: Any) -> Reading:
        """The reading of parsed options (``add_retrieval_arguments``); ``override``: e.g. one k of a
        list-valued ``--k``."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**(values | override))

    @property
    def retrieval(self) -> RetrievalConfig:
        """The retrieval setting (k, granularity, search, kernel, compile)."""
        return RetrievalConfig(
            k=self.k,
            granularity=self.granularity,
            search=self.search,
            kernel=self.kernel,
            compile=self.compile,
            block_dtype=self.block_dtype,
            block_folder=self.block_folder,
        )

    def cache_kwargs(self) -> dict[str, Any]:
        """The retrieval cache's keyword options (chunk_len, memory_device, max_blocks)."""
        return {
            "chunk_len": self.chunk_len,
            "memory_device": self.memory_device,
            "max_blocks": self.max_blocks,
        }

    def retrieval_options_set(self) -> list[str]:
        """The fields only the retrieval cache reads (``RETRIEVAL_ONLY``) that this reading sets away from
        their defaults: a model read with its own attention would ignore them."""
        default = Reading()
        return [name for name in RETRIEVAL_ONLY if getattr(self, name) != getattr(default, name)]

    @property
    def options(self) -> dict[str, Any]:
        """The options beside k, granularity and chunk_len (search, kernel, memory_device, max_blocks),
        as the evaluations' result cells record them."""
        return {"search": self.search, "kernel": self.kernel, "memory_device": self.memory_device,
                "max_blocks": self.max_blocks, "block_dtype": self.block_dtype}  # fmt: skip
