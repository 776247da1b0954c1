"""Benchmark: long-input processing speed, chunked prefill with retrieval vs one full-attention pass.

For each input length it measures the tokens per second of

* ``landmark``: a TRAINED landmark model (default: the shipped ``checkpoints/passkey-landmark``, 4
  layers, width 256), ``chunked_nll`` (``InferenceSession``, chunks of 256 positions, top-k retrieval
  with k = 4, granularity token_head): what ``landmark eval ppl`` and ``landmark eval passkey`` run,
  and what ``generate`` runs over a prompt;
* ``full``: the same-size model with ordinary causal attention over the whole input in one forward
  pass (``F.scaled_dot_product_attention``; its cost does not depend on the weights, which are
  random); its cost grows with the square of the length, the landmark model's linearly (plus a
  landmark scan that grows with the memory).

The input is the start of a bundled book (Moby-Dick), tokenised with the checkpoint's tokenizer.
Trained weights matter for retrieval: which blocks the queries of a chunk select (and so how much
they have in common) depends on them; a random model's queries all select nearly the same blocks.
Each measurement runs in a fresh subprocess with one thread by default (CPU time is the steady
number on a shared machine); the ratios are taken between measurements of the same invocation.

Usage:
    python benchmarks/prefill.py                               # 2k 8k 32k; table + JSON
    python benchmarks/prefill.py --lengths 4096 --out /tmp/prefill.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BOOK = "moby_dick.txt"  # the bundled book whose start is the input


def worker(kind: str, length: int, args: argparse.Namespace) -> dict:
    import dataclasses

    import torch

    from landmark.checkpoint import load_model
    from landmark.data.books import bundled_books
    from landmark.inference.session import chunked_nll
    from landmark.model import GPT

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer, _ = load_model(args.checkpoint)
    if kind == "full":
        model = GPT(dataclasses.replace(model.config, attention="full", seq_len=max(length, 512)))
    model.eval()
    book = next(bundled_books().rglob(BOOK))
    ids = tokenizer.encode(book.read_text(encoding="utf-8")[: 8 * length])[:length]
    if len(ids) < length:
        raise ValueError(f"{BOOK} gives only {len(ids)} tokens; asked for {length}")
    tokens = torch.tensor([ids])
    c0, w0 = time.process_time(), time.perf_counter()
    with torch.no_grad():
        if kind == "landmark":
            chunked_nll(model, tokens, k=args.k, chunk_len=args.chunk_len)
        else:
            model(tokens)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    return {"model": kind, "length": length, "cpu_s": cpu, "wall_s": wall, "tokens_per_cpu_s": length / cpu}


def run_one(kind: str, length: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, str(length), "--threads", str(args.threads)]
    cmd += ["--k", str(args.k), "--chunk-len", str(args.chunk_len), "--checkpoint", args.checkpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": kind, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument(
        "--checkpoint",
        default=str(REPO / "checkpoints" / "passkey-landmark"),
        help="a trained landmark model",
    )
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--chunk-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prefill.json"))
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return

    header = f"{'tokens':>7} | {'landmark tok/s':>14} {'full tok/s':>10} | {'landmark / full':>15}"
    print(header)
    print("-" * len(header))
    results = []
    for length in args.lengths:
        lm, full = run_one("landmark", length, args), run_one("full", length, args)
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
    print("tok/s: input tokens per CPU second (one thread); full: one causal forward pass of the input")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/prefill.py " + " ".join(sys.argv[1:]),
        "machine": platform.platform(),
        "checkpoint": args.checkpoint,
        "k": args.k,
        "chunk_len": args.chunk_len,
        "threads": args.threads,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
