"""The ``landmark`` command line (also ``python -m landmark``).

Each sub-command lives in a small function ``cmd_<name>(args)`` registered in ``build_parser``.
A mistake the user can fix (config, corpus, checkpoint, missing file) is printed as one line
``error: ...`` with exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch
from tqdm import tqdm

from landmark import __version__, landmark_attention, landmark_weights
from landmark.checkpoint import CheckpointError
from landmark.data import CorpusError, bundled_books, prepare_data
from landmark.data.books import CACHE_ENV
from landmark.data.dataset import prepare_error_line
from landmark.eval.cli import add_eval_parser
from landmark.files import (
    is_within,
    missing_folders,
    os_error_line,
    os_error_text,
    path_problem,
    remove_empty_folders,
)
from landmark.hf.checks import staging_folder
from landmark.hf.cli import add_hf_parser
from landmark.hf.finetune import last_checkpoint
from landmark.inference.cli import add_generate_parser
from landmark.inference.kernel import KERNEL_ENV
from landmark.inference.options import check_distinct, check_seed
from landmark.inference.threads import inference_threads
from landmark.ops.support import triton_unsupported_reason
from landmark.plot import plot_metrics
from landmark.quickstart import add_quickstart_parser
from landmark.train import TrainingError, shutdown_distributed, train
from landmark.train_config import ConfigError, check_tokenizer_options, load_config


def cmd_demo(args: argparse.Namespace) -> int:
    """Run landmark attention on random inputs: exactness against the reference, time, a weight map."""

    try:
        _check_demo(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    bs = args.block_size
    print(f"landmark attention demo: block_size={bs} ({bs - 1} tokens + 1 landmark), heads={args.heads}")

    # 1. A picture of the weights: 3 blocks of 4, one head.
    q = torch.randn(1, 1, 12, 8, dtype=torch.float64)
    k = torch.randn(1, 1, 12, 8, dtype=torch.float64)
    w = landmark_weights(q, k, 4)[0, 0]
    shades = " .:-=+*#%@"
    print("\nweights of 12 queries (rows) over 12 keys (cols), block_size 4; L = landmark column")
    print("      " + "".join("L" if j % 4 == 3 else str(j % 10) for j in range(12)))
    for i in range(12):
        row = "".join(shades[min(int(x * (len(shades) - 1) + 0.999), len(shades) - 1)] for x in w[i].tolist())
        print(f"  {i:2d}  {row}   (sum {w[i].sum().item():.3f})")

    # 2. Exactness and speed at the requested lengths.
    print(f"\n{'seq':>7} {'blockwise fwd+bwd':>18} {'max |blockwise - reference|':>28}")
    for seq in args.seqs:
        shape = (1, args.heads, seq, args.head_dim)
        q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
        t0 = time.perf_counter()
        out = landmark_attention(q, k, v, bs, impl="blockwise")
        out.sum().backward()
        elapsed = time.perf_counter() - t0
        if seq <= args.max_reference_seq:
            ref = landmark_attention(q.detach(), k.detach(), v.detach(), bs, impl="reference")
            diff = f"{(ref - out.detach()).abs().max().item():.2e}"
        else:
            diff = f"(reference skipped above {args.max_reference_seq})"
        print(f"{seq:>7} {elapsed * 1000:>15.1f} ms {diff:>28}")
    return 0


DEMO_MAX_ELEMENTS = 2**27  # heads x seq x head_dim of one demo tensor (512 MB in float32, ~10 alive)
DEMO_MAX_REFERENCE = 2**30  # heads x seq**2 of the dense reference's weights (8 GB in float64)


def _check_demo(args: argparse.Namespace) -> None:
    """``landmark demo``'s sizes: positive, and small enough for this machine's memory."""

    for option, value in (
        ("--block-size", args.block_size),
        ("--heads", args.heads),
        ("--head-dim", args.head_dim),
    ):
        if value < (2 if option == "--block-size" else 1):
            raise ValueError(f"{option} must be >= {2 if option == '--block-size' else 1}; got {value}")
    check_distinct("--seqs", args.seqs)
    bad = [n for n in args.seqs if n < 1]
    if bad:
        raise ValueError(f"--seqs must be lengths >= 1; got {bad[0]}")
    big = [n for n in args.seqs if args.heads * n * args.head_dim > DEMO_MAX_ELEMENTS]
    if big:
        raise ValueError(
            f"--seqs {big[0]} x --heads x --head-dim exceeds {DEMO_MAX_ELEMENTS:,} elements per tensor"
        )
    if args.max_reference_seq < 0:
        raise ValueError(f"--max-reference-seq must be >= 0; got {args.max_reference_seq}")
    dense = min(args.max_reference_seq, max(args.seqs))
    if args.heads * dense**2 > DEMO_MAX_REFERENCE:
        raise ValueError(
            f"--max-reference-seq {args.max_reference_seq}: the dense reference at {dense} positions would "
            f"hold {args.heads * dense**2:,} weights (at most {DEMO_MAX_REFERENCE:,}); lower it"
        )
    check_seed(args.seed)


def cmd_info(args: argparse.Namespace) -> int:
    """Print versions and which attention implementation ``auto`` picks here."""

    print(f"landmark-attention {__version__}")
    cuda, threads = torch.cuda.is_available(), torch.get_num_threads()
    print(f"torch {torch.__version__}, CUDA available: {cuda}, threads: {threads}")
    if importlib.util.find_spec("triton") is not None:
        print(f"triton {importlib.metadata.version('triton')}")
    else:
        print("triton: not installed (the fused GPU kernel is unavailable; blockwise is used)")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = triton_unsupported_reason(torch.empty(1, 1, 1, 64, device=device), 64)
    print(f"impl='auto' on {device} with block_size 64: {'triton' if reason is None else 'blockwise'}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model from a TOML config (also under torchrun: one process per rank)."""

    cfg = load_config(args.config, args.set)
    try:
        train(cfg, resume=args.resume)
    finally:
        shutdown_distributed()
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Train/load the tokenizer and tokenise a corpus into cached token arrays; print where."""

    names = {"vocab_size": "--vocab-size", "gpt2_dir": "--gpt2-dir"}
    if args.gpt2_dir is not None and args.tokenizer != "gpt2":
        raise ConfigError(f"--gpt2-dir goes with --tokenizer gpt2; got --tokenizer {args.tokenizer}")
    check_tokenizer_options(args.tokenizer, args.vocab_size, args.gpt2_dir or "", names)
    if args.out is not None:
        problem = path_problem(Path(args.out), folder=True, writable=True)
        if problem == "is a file, not a folder":
            raise ConfigError(f"--out {args.out} is a file: pass a folder for the tokenizer and token arrays")
        if problem is not None:
            raise ConfigError(f"--out {args.out} {problem}: pass a folder for the tokenizer and token arrays")
        if args.corpus != "bundled" and Path(args.corpus).is_dir() and is_within(args.out, args.corpus):
            raise ConfigError(
                f"--out {args.out} is inside --corpus {args.corpus}: give the arrays their own folder"
            )
    corpus = bundled_books() if args.corpus == "bundled" else args.corpus
    try:
        data = prepare_data(corpus, args.out, args.tokenizer, args.vocab_size, args.gpt2_dir)
    except ValueError as err:  # a foreign --out, a bad corpus, damaged GPT-2 BPE files
        prefixes = {"folder": "--out ", "corpus": "--corpus: ", "gpt2_dir": "--gpt2-dir: "}
        raise ConfigError(prepare_error_line(err, prefixes)) from None
    print(f"prepared data in {data.folder}")
    print(f"  tokenizer: {data.folder / 'tokenizer.json'} ({data.tokenizer!r})")
    for name, split in data.splits.items():
        print(f"  {name}: {len(split):,} tokens, {len(split.documents)} documents -> {name}.bin")
    return 0


def cmd_plot_metrics(args: argparse.Namespace) -> int:
    """Plot training and validation loss of one or more runs into a PNG."""

    try:
        out = plot_metrics(
            args.runs, args.out, x=args.x, labels=args.labels, title=args.title, overwrite=args.overwrite
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


class _StoreOnce(argparse._StoreAction):
    """argparse's ``store``, refusing an option given twice (argparse keeps the last value silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault(_GIVEN, set())
        if option_string is not None and self.dest in given:
            parser.error(f"{'/'.join(self.option_strings)} is given more than once: give it once")
        given.add(self.dest)
        super().__call__(parser, namespace, values, option_string)


_GIVEN = "_options_given"  # the namespace attribute where _StoreOnce notes the options seen


class Parser(argparse.ArgumentParser):
    """The command line's parser: every valued option (``store``) may be given once; its subcommands'
    parsers are of this class too (argparse makes them with the parent's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        parsed.__dict__.pop(_GIVEN, None)
        return parsed

    def error(self, message: str) -> NoReturn:
        """One line on stderr, ``error: <message> (landmark <command> --help)``, and exit status 2 (argparse
        prints its whole usage first)."""
        print(f"error: {' '.join(message.split())} ({self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def environment_problem() -> str | None:
    """What is wrong with the environment variables the library reads (``LANDMARK_THREADS``,
    ``LANDMARK_KERNEL``, ``LANDMARK_CACHE``), in one line, or None; checked before any command runs."""
    try:
        inference_threads()
    except ValueError as err:
        return str(err)
    kernel = os.environ.get(KERNEL_ENV)
    if kernel not in (None, "", "0", "1"):
        return f"{KERNEL_ENV} must be 0 (the C++ kernels off) or 1; got {kernel!r}"
    cache = os.environ.get(CACHE_ENV)
    if cache and os.path.exists(os.path.expanduser(cache)) and not os.path.isdir(os.path.expanduser(cache)):
        return f"{CACHE_ENV}={cache} is a file: it must name a folder (created if missing)"
    return None


def _finetune_checkpoint(out: str) -> bool:
    """Whether ``hf finetune --out OUT`` left a checkpoint to resume from."""
    return last_checkpoint(staging_folder(out)) is not None


def cache_error_line(err: OSError) -> str | None:
    """A failed read or write inside the cache folder ``$LANDMARK_CACHE`` names (one that cannot be
    created, say), in one line naming the variable; None for any other path."""
    cache = os.environ.get(CACHE_ENV)
    if not cache or err.filename is None or not is_within(str(err.filename), os.path.expanduser(cache)):
        return None
    return f"{CACHE_ENV}={cache} (the cache folder): cannot use {err.filename}: {os_error_text(err)}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="landmark", description="Landmark Attention: random-access, effectively unlimited context."
    )
    parser.add_argument("--version", action="version", version=f"landmark-attention {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the landmark attention op on random inputs and show what it does")
    p.add_argument(
        "--seqs", type=int, nargs="+", default=[512, 2048], help="sequence lengths (default: 512 2048)"
    )
    p.add_argument("--block-size", type=int, default=64, help="positions per block, landmark included")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument(
        "--max-reference-seq", type=int, default=2048, help="compare with the dense reference up to here"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("info", help="versions and the implementation chosen on this machine")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "train",
        help="train a language model (landmark, full or xl) from a TOML config",
        description="Train from a TOML config ([model], [data], [train]; see docs/training.md). "
        "Many processes: torchrun --standalone --nproc_per_node N -m landmark train CONFIG",
    )
    p.add_argument("config", help="TOML config file, e.g. configs/small-landmark.toml")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value (a TOML literal), e.g. --set train.lr=3e-4; repeatable",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in train.out_dir"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("prepare", help="tokenise a corpus into cached token arrays and say where")
    p.add_argument("--corpus", default="bundled", help='a folder of .txt documents, or "bundled" (default)')
    p.add_argument("--tokenizer", default="bpe", choices=["bpe", "gpt2"])
    p.add_argument("--vocab-size", type=int, default=8192, help="bpe: vocabulary size (default 8192)")
    p.add_argument("--gpt2-dir", default=None, help="gpt2: folder of encoder.json and vocab.bpe")
    p.add_argument("--out", default=None, help="output folder (default: under the cache)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("plot-metrics", help="plot training/validation loss of runs into a PNG")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default="loss.png", help="the PNG to write (default loss.png)")
    p.add_argument("--x", default="step", choices=["step", "tokens", "minutes"], help="horizontal axis")
    p.add_argument("--labels", nargs="+", default=None, help="legend label per run (default: folder names)")
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a PNG")
    p.set_defaults(func=cmd_plot_metrics)

    add_hf_parser(sub)  # `landmark hf ...`: Hugging Face models (landmark/hf/cli.py)
    add_eval_parser(sub)  # `landmark eval ...`: perplexity and passkey (landmark/eval/cli.py)
    add_quickstart_parser(sub)  # `landmark quickstart`: the main job (landmark/quickstart.py)
    add_generate_parser(sub)  # `landmark generate`: retrieval generation (landmark/inference/cli.py)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    problem = environment_problem()
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    made = missing_folders(getattr(args, "block_folder", None))  # (the block memory's files are unlinked)
    try:
        return args.func(args)
    except OSError as err:  # a file that cannot be read or written (permissions, a full disk): one line
        plain = isinstance(err, FileNotFoundError) and err.errno is None  # a message of the library's own
        print(f"error: {err if plain else cache_error_line(err) or os_error_line(err)}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, CorpusError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: every output is written atomically, so nothing half-written is left
        trains = args.command == "train" or getattr(args, "hf_command", None) == "finetune"
        hint = " (--resume continues from the last checkpoint)" if trains else ""
        if getattr(args, "hf_command", None) == "finetune" and not _finetune_checkpoint(args.out):
            hint = " (no checkpoint was saved yet: run the command again, without --resume)"
        for bar in list(getattr(tqdm, "_instances", ())):  # a bar left open redraws after the message
            bar.close()
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
    finally:
        remove_empty_folders(made)  # the --block-folder the command made, once nothing is left in it


if __name__ == "__main__":
    sys.exit(main())
