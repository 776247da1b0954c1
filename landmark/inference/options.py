"""Command-line options of retrieval inference, declared once for every command that reads with retrieval.

``add_retrieval_arguments`` adds the group (``--k``, ``--granularity``, ``--search``, ``--kernel``,
``--chunk-len``, ``--memory-device``, ``--max-blocks``); ``retrieval_config(args)`` and
``cache_options(args)`` turn the parsed values into a ``RetrievalConfig`` and the cache's keyword
options; ``add_state_arguments`` adds ``--save-state`` / ``--load-state`` (read a document once, ask
many questions). Defaults come from ``RetrievalConfig`` and the cache, so they are the same everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from landmark.inference.cache import DEFAULT_CHUNK_LEN
from landmark.inference.kernel import KERNELS
from landmark.inference.retrieval import GRANULARITIES, SEARCHES, RetrievalConfig

_DEFAULT = RetrievalConfig()


def add_retrieval_arguments(parser: argparse.ArgumentParser, *, k_zero: str | None = None) -> None:
    """The retrieval option group. ``k_zero``: what ``--k 0`` means for this command (None: refused)."""
    g = parser.add_argument_group("retrieval (shared/method.md s.4)")
    k_help = f"blocks retrieved per query and head (default {_DEFAULT.k})"
    if k_zero:
        k_help += f"; 0: {k_zero}"
    g.add_argument("--k", type=int, default=_DEFAULT.k, help=k_help)
    g.add_argument("--granularity", choices=GRANULARITIES, default=_DEFAULT.granularity)
    g.add_argument(
        "--search", choices=SEARCHES, default=_DEFAULT.search, help="landmark search (faiss: extra)"
    )
    g.add_argument(
        "--kernel",
        choices=KERNELS,
        default=_DEFAULT.kernel,
        help="CPU float32 steps: the fused C++ kernel where it applies (auto), always (cpp), never (torch)",
    )
    g.add_argument(
        "--chunk-len", type=int, default=DEFAULT_CHUNK_LEN, help="positions read at once (>= block size)"
    )
    g.add_argument(
        "--memory-device", default=None, help="where block contents live, e.g. cpu (default: model's)"
    )
    g.add_argument(
        "--max-blocks", type=int, default=None, help="cap on memory blocks per row (FIFO eviction)"
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


def check_retrieval_arguments(args: argparse.Namespace) -> None:
    """One-line ValueErrors for values the parser cannot check (before any work is done)."""
    if args.k < 0 or (args.k == 0 and not getattr(args, "_k_zero", False)):
        raise ValueError(f"--k must be >= 1; got {args.k}")
    if args.max_blocks is not None and args.max_blocks < 1:
        raise ValueError(f"--max-blocks must be >= 1; got {args.max_blocks}")
    if args.chunk_len < 1:
        raise ValueError(f"--chunk-len must be >= 1; got {args.chunk_len}")
    if args.search == "faiss":
        try:
            import faiss  # noqa: F401
        except ImportError:
            raise ValueError(
                '--search faiss needs faiss-cpu: pip install "landmark-attention[faiss]"'
            ) from None
    load = getattr(args, "load_state", None)
    if load is not None and not Path(load).is_file():
        raise ValueError(f"--load-state {load} does not exist")
    save = getattr(args, "save_state", None)
    if save is not None and not Path(save).resolve().parent.is_dir():
        raise ValueError(f"--save-state {save}: its folder does not exist")
    if (load or save) and args.k == 0:
        raise ValueError("--save-state/--load-state need retrieval (--k >= 1)")


def retrieval_config(args: argparse.Namespace) -> RetrievalConfig:
    """The ``RetrievalConfig`` of parsed options."""
    return RetrievalConfig(
        k=args.k, granularity=args.granularity, search=args.search, kernel=args.kernel,
        compile=getattr(args, "compile", False),
    )  # fmt: skip


def cache_options(args: argparse.Namespace) -> dict:
    """The cache's keyword options of parsed options (chunk_len, memory_device, max_blocks)."""
    return {"chunk_len": args.chunk_len, "memory_device": args.memory_device, "max_blocks": args.max_blocks}
