"""Benchmark: versions of the C++ retrieval kernel on the same captured calls.

The kernel's share of a prompt read is small next to the machine's noise (+-25%); to compare two
versions of ``landmark/inference/csrc/retrieval.cpp``, this script replays the exact calls of one read
against each version, alternating, one thread, and reports the fastest of ``--repeats`` passes
(the least disturbed one) with each version's largest output difference from the first and whether
the selections are identical.

* ``capture``: the shipped small landmark model (``checkpoints/passkey-landmark``) reads the start of
  Moby-Dick (``--length`` tokens) as the reading options say (the library's options and defaults:
  ``--chunk-len`` 256, ``--k`` 4, ``--granularity`` token_head; but ``--kernel`` cpp: the calls to
  capture are the kernel's); the kernel's inputs of the last ``--calls`` calls (the last chunks, every
  layer) are saved with ``torch.save`` beside the reading (large: the block memory of every call; about
  3 GB for 12 calls at 128k tokens). With ``--old-blocks N``: no read, but two chunks of one layer of
  SmolLM2's layout against N random old blocks (the scan at lengths no read here reaches); with
  ``--decode-steps S``, S decode steps of one position each instead.
* ``compare``: builds each given source (``torch.utils.cpp_extension``, ``-O3 -march=native``) and
  replays the captured calls. ``@library`` as a source is the kernel the library itself built and uses
  (``landmark.inference.kernel``; no build here). Its JSON records the capture's reading.

Usage::

    python benchmarks/kernel_replay.py capture --length 8192 --calls 36 --out /tmp/calls_8k.pt
    git show HEAD~5:landmark/inference/csrc/retrieval.cpp > /tmp/old.cpp
    python benchmarks/kernel_replay.py compare /tmp/calls_8k.pt /tmp/old.cpp \
        landmark/inference/csrc/retrieval.cpp
    python benchmarks/kernel_replay.py compare /tmp/calls_8k.pt @library /tmp/new.cpp  # the library's first
    python benchmarks/kernel_replay.py capture --old-blocks 16384 --block-dtype int8 --out /tmp/calls_1m.pt
    python benchmarks/kernel_replay.py capture --old-blocks 16384 --decode-steps 20 --out /tmp/decode_1m.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reading_args import parse_reading
from results_json import command_line, write_results

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "@library"  # a compare source: the library's own compiled kernel


def capture(args: argparse.Namespace, reading) -> None:
    """Save the kernel inputs of the last ``args.calls`` calls of one read with ``reading`` (a
    ``Reading``): ``{"reading": ..., "length": ..., "calls": [...]}``."""
    import torch
    from prefill import book_tokens

    from landmark.checkpoint import load_model
    from landmark.data.landmarks import insert_landmarks
    from landmark.inference import InferenceSession, kernel

    torch.set_num_threads(1)
    model, tokenizer, _ = load_model(args.checkpoint)
    model.eval()
    cfg = model.config
    ids = insert_landmarks(
        torch.tensor([book_tokens(tokenizer, args.length)]), cfg.block_size, cfg.landmark_id
    )
    calls: list[tuple] = []

    class Recorder:  # the compiled module, keeping the inputs of the last calls
        def __init__(self, module):
            self.module = module

        def retrieval_step(self, *inputs):
            calls.append(tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs))
            del calls[: -args.calls]
            return self.module.retrieval_step(*inputs)

    original = kernel.kernel_plan
    kernel.kernel_plan = lambda module, *a, **k: original(Recorder(module), *a, **k)
    try:
        with torch.no_grad():
            session = InferenceSession(model, 1, reading.retrieval, **reading.cache_kwargs(), threads=1)
            session.read(ids)
    finally:
        kernel.kernel_plan = original
    if not calls:
        raise SystemExit(f"capture: the read made no kernel calls (--kernel {reading.kernel})")
    torch.save({"reading": dataclasses.asdict(reading), "length": args.length, "calls": calls}, args.out)
    print(f"saved the last {len(calls)} kernel calls of a {args.length}-token read to {args.out}")


SYNTHETIC_LAYOUT = {"heads": 9, "kv_heads": 3, "head_dim": 64, "block_size": 64}  # SmolLM2-135M's layer


def capture_synthetic(args: argparse.Namespace, reading) -> None:
    """Save the kernel inputs of two chunks (``--chunk-len`` rows) of one layer of SmolLM2's layout read
    against ``args.old_blocks`` random old blocks (the scan's cost at a length no read reaches here:
    16,384 blocks are a million tokens): ``{"reading": ..., "length": blocks x block size, "calls":
    [...]}``."""
    import torch

    from landmark.inference import kernel
    from landmark.inference.cache import CacheOptions, RetrievalCache

    torch.set_num_threads(1)
    h, kv, d, bs = (SYNTHETIC_LAYOUT[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    g = torch.Generator().manual_seed(0)
    cache = RetrievalCache(1, block_size=bs, rope_base=100000.0, retrieval=reading.retrieval,
                           options=CacheOptions(reading.chunk_len))  # fmt: skip

    def chunk(rows: int = reading.chunk_len):
        q, k, v = torch.randn(1, h, rows, d, generator=g), *torch.randn(2, 1, kv, rows, d, generator=g)
        return cache.attend(0, q, k, v)

    chunk()  # makes the layer's memory
    memory = cache.memories[0]
    memory.reserve(args.old_blocks + 2 * reading.chunk_len // bs + 1)
    for start in range(0, args.old_blocks, 1024):
        m = min(1024, args.old_blocks - start)
        memory.append(0, *torch.randn(2, kv, m, bs, d, generator=g))
    calls: list[tuple] = []

    class Recorder:  # the compiled module, keeping the inputs of every call
        def __init__(self, module):
            self.module = module

        def retrieval_step(self, *inputs):
            calls.append(tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in inputs))
            return self.module.retrieval_step(*inputs)

    original = kernel.kernel_plan
    kernel.kernel_plan = lambda module, *a, **k: original(Recorder(module), *a, **k)
    try:
        with torch.no_grad():
            for _ in range(args.decode_steps or 2):  # decode steps (a position each), or two chunks
                chunk(1 if args.decode_steps else reading.chunk_len)
    finally:
        kernel.kernel_plan = original
    if not calls:
        raise SystemExit(f"capture: the chunks made no kernel calls (--kernel {reading.kernel})")
    length = args.old_blocks * bs
    torch.save({"reading": dataclasses.asdict(reading), "length": length, "calls": calls}, args.out)
    steps = f"{args.decode_steps} decode steps" if args.decode_steps else "chunks"
    print(f"saved {len(calls)} kernel calls of {steps} against {args.old_blocks:,} random blocks: {args.out}")


def compare(args: argparse.Namespace) -> None:
    """Replay the captured calls against every source; print a table, write JSON."""
    import torch
    from torch.utils.cpp_extension import load

    from landmark.inference import kernel

    torch.set_num_threads(1)
    captured = torch.load(args.calls)
    if isinstance(captured, list):  # a file of an earlier version: the calls alone
        captured = {"reading": None, "length": None, "calls": captured}
    calls = captured["calls"]
    modules = []
    for src in args.sources:
        if src == LIBRARY:
            modules.append(kernel.kernel_module(required=True))
            continue
        tag = hashlib.sha1(Path(src).read_bytes()).hexdigest()[:8]
        others = [str(p) for p in kernel.SOURCES[1:]]  # the extension's other sources (it binds them)
        modules.append(
            load(name=f"kernel_replay_{tag}", sources=[src, *others], extra_cflags=["-O3", "-march=native"])
        )
    best = [float("inf")] * len(modules)
    first: list[list] = []
    for rep in range(args.repeats):  # alternating, so that a slow spell of the machine hits every version
        for i, module in enumerate(modules):
            t0 = time.process_time()
            outs = [module.retrieval_step(*c) for c in calls]
            best[i] = min(best[i], time.process_time() - t0)
            if rep == 0:
                first.append(outs)
    rows = []
    print(f"{'source':<50} {'ms (best)':>10} {'vs first':>9} {'max |out diff|':>15} {'same selection':>15}")
    for i, src in enumerate(args.sources):
        diff = max(float((a[0] - b[0]).abs().max()) for a, b in zip(first[0], first[i]))
        same = all(torch.equal(a[1], b[1]) for a, b in zip(first[0], first[i]))
        rows.append({"source": src, "best_cpu_s": best[i], "vs_first": best[i] / best[0], "max_diff": diff,
                     "same_selection": same})  # fmt: skip
        print(f"{src:<50} {1000 * best[i]:>10.1f} {best[i] / best[0]:>8.2f}x {diff:>15.2e} {same!s:>15}")
    if args.out:
        write_results(
            args.out, {"results": rows}, command=args.command, calls=str(args.calls),
            reading=captured["reading"], length=captured["length"], repeats=args.repeats,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from landmark.inference.options import add_retrieval_arguments

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("capture", help="save the kernel inputs of one read")
    p.add_argument("--length", type=int, default=8192, help="input tokens (default 8192)")
    p.add_argument(
        "--calls", type=int, default=36, help="keep the last N calls (default 36: 9 chunks x 4 layers)"
    )
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "passkey-landmark"))
    p.add_argument(
        "--old-blocks",
        type=int,
        default=None,
        help="instead of a read: two chunks of one layer of SmolLM2's layout against N random old blocks",
    )
    p.add_argument(
        "--decode-steps",
        type=int,
        default=0,
        help="with --old-blocks: that many decode steps (one position each) instead of the two chunks",
    )
    p.add_argument("--out", required=True, help="the file of captured calls (torch.save)")
    add_retrieval_arguments(p)
    # --kernel cpp, not the library's auto: a read without the kernel has nothing to capture
    p.set_defaults(kernel="cpp")
    kernel_option = next(a for a in p._actions if a.dest == "kernel")
    kernel_option.help = "the C++ kernel must run (default cpp here, not auto: else nothing is captured)"
    capture_parser = p
    p = sub.add_parser("compare", help="replay captured calls against kernel sources")
    p.add_argument("calls", help="a file written by `capture`")
    p.add_argument(
        "sources",
        nargs="+",
        help=f"retrieval.cpp versions ({LIBRARY}: the library's); the first is the baseline",
    )
    p.add_argument("--repeats", type=int, default=7, help="passes per source (default 7); the best counts")
    p.add_argument("--out", default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    args.command = command_line(__file__, argv)
    if args.cmd == "capture" and args.old_blocks is not None:
        if args.old_blocks < 1:
            capture_parser.error("--old-blocks must be >= 1")
        if args.decode_steps < 0:
            capture_parser.error("--decode-steps must be >= 0")
        capture_synthetic(
            args, parse_reading(capture_parser, args, block_size=SYNTHETIC_LAYOUT["block_size"])
        )
    elif args.cmd == "capture":
        if args.decode_steps:
            capture_parser.error("--decode-steps goes with --old-blocks")
        if args.length < 1 or args.calls < 1:
            capture_parser.error("--length and --calls must be >= 1")
        from prefill import checkpoint_block_size

        block_size = checkpoint_block_size(capture_parser, args.checkpoint)
        capture(args, parse_reading(capture_parser, args, block_size=block_size))
    else:
        if args.repeats < 1:
            parser.error("--repeats must be >= 1")
        compare(args)


if __name__ == "__main__":
    main()
