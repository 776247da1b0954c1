"""Benchmark: reading a long input, chunked with retrieval against one full-attention pass.

For each input length it measures the tokens per CPU second of

* ``landmark``: a TRAINED landmark model (default: the shipped ``checkpoints/passkey-landmark``, 4
  layers, width 256) reading the input through ``InferenceSession`` as the reading options say (the
  library's options and defaults: chunks of ``--chunk-len`` 256 positions, top-k retrieval with
  ``--k`` 4, ``--granularity`` token_head, ``--kernel`` auto: the fused C++ kernel where it applies;
  the JSON's meta records the reading);
* ``full``: the same-size model with ordinary causal attention over the whole input in one forward
  pass (``F.scaled_dot_product_attention``; its cost does not depend on the weights, which are
  random); its cost grows with the square of the length, the landmark model's linearly (plus a
  landmark scan that grows with the memory).

Both sides compute the same outputs (``--mode``):

* ``read`` (default): what ``generate`` and a passkey trial do with a prompt: run it through the model
  and produce the next-token logits of its last position (``InferenceSession.read``; the full model's
  ``forward(..., logits_at=last)``);
* ``nll``: what ``landmark eval ppl`` does: the logits and the next-token loss of every position
  (``chunked_nll``; the full model's forward with targets).

The input is the start of a bundled book (Moby-Dick), tokenised with the checkpoint's tokenizer.
Trained weights matter for retrieval: which blocks the queries of a chunk select (and so how much
they have in common) depends on them. Each measurement runs in a fresh subprocess with one thread by
default (CPU time is the steady number on a shared machine); the C++ kernel is built or loaded before
the clock starts; every cell is measured ``--repeats`` times (default 3), the two sides alternating, and
the median is reported (all runs are in the JSON): the machine's speed drifts by +-25%. ``full`` is
skipped above ``--full-max`` tokens (its time grows with the square of the length).

Usage:
    python benchmarks/prefill.py                               # 2k 8k 32k 128k; table + JSON
    python benchmarks/prefill.py --lengths 4096 --out /tmp/prefill.json
    python benchmarks/prefill.py --smoke --out /tmp/prefill.json   # seconds: a test of the script itself

``--smoke``: toy sizes (300 and 600 tokens, one run per cell) and every measurement in this process
instead of a fresh one: the numbers mean nothing (tests/test_benchmarks.py). Options given with it
override its sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reading_args import parse_reading, reading_argv
from results_json import command_line, write_results

REPO = Path(__file__).resolve().parents[1]
BOOK = "moby_dick.txt"  # the bundled book whose start is the input
SMOKE = dict(lengths=[300, 600], repeats=1)  # --smoke


def book_tokens(tokenizer, length: int) -> list[int]:
    """The first ``length`` tokens of the book (repeated if the book is shorter)."""
    from landmark.data.books import bundled_books

    text = next(bundled_books().rglob(BOOK)).read_text(encoding="utf-8")
    ids = tokenizer.encode(text[: 8 * length])
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def worker(kind: str, length: int, args: argparse.Namespace, reading) -> dict:
    """Read the first ``length`` tokens of the book with ``kind``'s model (the landmark model with
    ``reading``, a ``Reading``); return the times."""
    import torch

    from landmark.checkpoint import load_model
    from landmark.data.landmarks import insert_landmarks
    from landmark.inference import InferenceSession, kernel
    from landmark.inference.session import chunked_nll
    from landmark.model import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.checkpoint)
    if kind == "full":
        model = GPT(dataclasses.replace(model.config, attention="full", seq_len=max(length, 512)))
    model.eval()
    kernel.kernel_module()  # built (once per machine) or loaded before the clock starts
    tokens = torch.tensor([book_tokens(tokenizer, length)])
    cfg = model.config
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        if kind == "landmark" and args.mode == "read":
            session = InferenceSession(
                model, 1, reading.retrieval, **reading.cache_kwargs(), threads=args.threads
            )
            session.read(insert_landmarks(tokens, cfg.block_size, cfg.landmark_id))
        elif kind == "landmark":
            chunked_nll(
                model, tokens, retrieval=reading.retrieval, **reading.cache_kwargs(), threads=args.threads
            )
        elif args.mode == "read":
            model(tokens, logits_at=torch.tensor([length - 1]))
        else:
            model(tokens[:, :-1], tokens[:, 1:])
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    row = {"model": kind, "length": length, "cpu_s": cpu, "wall_s": wall, "tokens_per_cpu_s": length / cpu}
    if kind == "landmark":
        row["reading"] = dataclasses.asdict(reading)
    return row


def checkpoint_block_size(parser: argparse.ArgumentParser, path: str) -> int:
    """The block size of the checkpoint at ``path`` (its config only; the parser's error if unusable)."""
    from landmark.checkpoint import open_checkpoint

    try:
        return open_checkpoint(path).model_config.block_size
    except ValueError as e:  # CheckpointError included
        parser.error(f"--checkpoint: {e}")


def median_run(runs: list[dict]) -> dict:
    """The run with the median CPU time (all runs kept under "runs"), or the first error."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    best = dict(sorted(ok, key=lambda r: r["cpu_s"])[len(ok) // 2])
    best["runs"] = [r["cpu_s"] for r in ok]
    return best


def run_one(kind: str, length: int, args: argparse.Namespace, reading) -> dict:
    """One measurement in a fresh process (its error as ``{"error": ...}``); with --smoke in this one.
    ``reading``: the landmark model's ``Reading`` (the worker process gets it as options)."""
    if args.smoke:
        return worker(kind, length, args, reading)
    cmd = [sys.executable, __file__, "--worker", kind, str(length), "--threads", str(args.threads)]
    cmd += ["--checkpoint", args.checkpoint, "--mode", args.mode, *reading_argv(reading)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": kind, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from landmark.inference.options import add_retrieval_arguments

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    parser.add_argument("--mode", choices=("read", "nll"), default="read", help="what both sides compute")
    parser.add_argument("--full-max", type=int, default=32768, help="longest input for the full model")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (alternating sides); median")
    parser.add_argument(
        "--checkpoint",
        default=str(REPO / "checkpoints" / "passkey-landmark"),
        help="a trained landmark model",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefill.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes, every measurement in this process (a test)"
    )
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    add_retrieval_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # its sizes as defaults: options given with it still count
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    reading = parse_reading(parser, args, block_size=checkpoint_block_size(parser, args.checkpoint))
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args, reading)))
        return

    header = f"{'tokens':>7} | {'landmark tok/s':>14} {'full tok/s':>10} | {'landmark / full':>15}"
    print(header)
    print("-" * len(header))
    results = []
    for length in args.lengths:
        lm_runs, full_runs = [], []
        for _ in range(args.repeats):  # alternated, so that a slow spell of the machine hits both sides
            lm_runs.append(run_one("landmark", length, args, reading))
            if length <= args.full_max:
                full_runs.append(run_one("full", length, args, reading))
        lm = median_run(lm_runs)
        full = median_run(full_runs) if full_runs else {"error": "skipped"}
        entry = {"length": length, "landmark": lm, "full": full}
        if "error" in lm:
            print(f"{length:>7} | landmark error: {lm['error']}")
        else:
            full_rate = full.get("tokens_per_cpu_s", float("nan"))
            entry["ratio"] = lm["tokens_per_cpu_s"] / full_rate if "error" not in full else None
            print(
                f"{length:>7} | {lm['tokens_per_cpu_s']:>14.0f} {full_rate:>10.0f} | "
                f"{entry['ratio'] if entry['ratio'] is not None else float('nan'):>14.2f}x"
            )
        results.append(entry)
    base = next((r for r in results if r["length"] == 8192 and "error" not in r["landmark"]), None)
    if base is not None:
        per_token = base["landmark"]["cpu_s"] / 8192
        for r in results:
            if "error" not in r["landmark"]:
                r["landmark_cost_vs_8k"] = r["landmark"]["cpu_s"] / r["length"] / per_token
        cost = ", ".join(
            f"{r['length']}: {r['landmark_cost_vs_8k']:.2f}" for r in results if "landmark_cost_vs_8k" in r
        )
        print(f"landmark CPU time per token against 8192 tokens: {cost}")
    print(
        f"tok/s: input tokens per CPU second ({args.threads} thread(s)); mode {args.mode}; "
        "full: one causal forward pass of the input"
    )
    write_results(
        args.out, {"results": results}, command=command_line(__file__, argv), checkpoint=args.checkpoint,
        reading=dataclasses.asdict(reading), threads=args.threads, mode=args.mode, repeats=args.repeats,
        smoke=args.smoke,
    )  # fmt: skip


if __name__ == "__main__":
    main()
