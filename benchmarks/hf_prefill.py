"""Benchmark: a Hugging Face model reading a long prompt with landmark retrieval, against its own forward.

For each prompt length (regular tokens of a bundled book, tokenized with the model's tokenizer):

* ``base``: the original model (``--base``, default the prepared SmolLM2-135M-Instruct, sdpa
  attention) runs the prompt in one forward pass and returns the last position's logits
  (``logits_to_keep=1``): what generation does with a prompt;
* ``landmark``: the same weights converted to landmark attention (:func:`landmark.hf.convert`; the new
  landmark embedding row is the mean of the others: reading cost does not depend on whether it was
  fine-tuned) read the prompt with landmarks inserted, through a
  :class:`landmark.hf.LandmarkRetrievalCache` as the reading options say (the library's options and
  defaults: ``--k`` 4, ``--granularity`` token_head, ``--kernel`` auto: the fused C++ kernel), ``--chunk-len``
  positions per forward call (default 256), last logits only: what :func:`landmark.hf.generate` does.
  The JSON's meta and the landmark rows record the reading.

Beyond the base model's window (8,192 for SmolLM2) its forward still runs: the timing is the point,
not its output. Each measurement runs in its own process with ``--threads`` torch threads (default
1), CPU time; ratios are between measurements of one invocation.

``--profile`` also times every call of the fused retrieval kernel inside the landmark read (CPU time,
per layer), so that the read splits into the kernel and the rest (the model's own layers, Python).

Usage::

    landmark hf prepare-smollm2          # once: the offline SmolLM2 weights
    python benchmarks/hf_prefill.py --lengths 4096 16384
    python benchmarks/hf_prefill.py --lengths 32768 --models landmark --profile --out /tmp/profile.json
    python benchmarks/hf_prefill.py --smoke --base DIR --out /tmp/hf_prefill.json   # seconds: a test

``--smoke``: toy sizes (256 tokens in chunks of 64: its own ``--chunk-len`` default, to read several
chunks at toy size) and every measurement in this process instead of a fresh one: the numbers mean
nothing; with ``--base`` a tiny model it runs in seconds (tests/test_benchmarks.py). Options given with
it override its sizes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reading_args import parse_reading, reading_argv
from results_json import command_line, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).parent / "results"
SMOKE = dict(lengths=[256], chunk_len=64)  # --smoke


def worker(kind: str, length: int, args: argparse.Namespace, reading) -> dict:
    """Read ``length`` tokens with the base model, or with its landmark conversion and ``reading`` (a
    ``Reading``); return the time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from landmark.data.books import bundled_books
    from landmark.inference import kernel

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(bundled_books().rglob("*.txt"))[:6])
    ids = tokenizer(text[: 8 * length]).input_ids[:length]
    if len(ids) < length:
        raise ValueError(f"the books give only {len(ids)} tokens; asked for {length}")
    kernel.kernel_module()
    with torch.no_grad():
        if kind == "base":
            c0 = time.process_time()
            model(input_ids=torch.tensor([ids]), logits_to_keep=1)
        else:
            from landmark.hf import LandmarkRetrievalCache, convert
            from landmark.hf.generate import hf_reader
            from landmark.inference.generate import prompt_streams

            model, tokenizer = convert(model, tokenizer)
            stream, lengths = prompt_streams(
                [ids], model.config.landmark_block_size, model.config.landmark_token_id
            )
            cache = LandmarkRetrievalCache(model, reading.retrieval, **reading.cache_kwargs())
            layers = model.config.num_hidden_layers
            kernel_s = [0.0] * layers
            if args.profile:  # time every call of the fused kernel (calls come in layer order per chunk)
                calls = [0]

                class Timed:
                    def __init__(self, module):
                        self.module = module

                    def retrieval_step(self, *inputs):
                        t0 = time.process_time()
                        out = self.module.retrieval_step(*inputs)
                        kernel_s[calls[0] % layers] += time.process_time() - t0
                        calls[0] += 1
                        return out

                original = kernel.kernel_plan
                kernel.kernel_plan = lambda module, *a, **kw: original(Timed(module), *a, **kw)
            try:
                c0 = time.process_time()
                hf_reader(model, cache, reading.chunk_len, threads=args.threads)(stream, lengths)
            finally:
                if args.profile:  # the process goes on with --smoke
                    kernel.kernel_plan = original
    cpu = time.process_time() - c0
    row = {"model": kind, "length": length, "cpu_s": cpu, "tokens_per_cpu_s": length / cpu}
    if kind == "landmark":
        row["reading"] = dataclasses.asdict(reading)
    if kind == "landmark" and args.profile:
        row["kernel_s"], row["kernel_s_per_layer"] = sum(kernel_s), kernel_s
    return row


def run_one(kind: str, length: int, args: argparse.Namespace, reading) -> dict:
    """One measurement in a fresh process (its error as ``{"error": ...}``); with --smoke in this one.
    ``reading``: the landmark model's ``Reading`` (the worker process gets it as options)."""
    if args.smoke:
        return worker(kind, length, args, reading)
    cmd = [sys.executable, __file__, "--worker", kind, str(length), "--threads", str(args.threads)]
    cmd += ["--base", args.base, *reading_argv(reading)]
    cmd += ["--profile"] if args.profile else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"model": kind, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    from landmark.config import DEFAULT_BLOCK_SIZE
    from landmark.hf.smollm2 import default_smollm2_dir
    from landmark.inference.options import add_retrieval_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(default_smollm2_dir()), help="the original model folder")
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    p.add_argument("--models", nargs="+", choices=("base", "landmark"), default=["base", "landmark"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time the fused retrieval kernel (per layer) inside the landmark read",
    )
    p.add_argument("--out", default=str(RESULTS / "hf_prefill.json"))
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes, every measurement in this process (a test)"
    )
    p.add_argument("--worker", nargs=2, metavar=("MODEL", "LENGTH"), help=argparse.SUPPRESS)
    add_retrieval_arguments(p)
    args = p.parse_args(argv)
    if args.smoke:  # its sizes as defaults: options given with it still count
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    reading = parse_reading(p, args, block_size=DEFAULT_BLOCK_SIZE)  # convert()'s block size
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args, reading)))
        return
    results = []
    print(f"{'tokens':>7} | {'base CPU s':>10} {'landmark CPU s':>14} | {'landmark / base time':>20}")
    for length in args.lengths:
        row = {"length": length}
        for kind in args.models:
            row[kind] = run_one(kind, length, args, reading)
        base_s = row.get("base", {}).get("cpu_s")
        lm_s = row.get("landmark", {}).get("cpu_s")
        row["time_ratio"] = lm_s / base_s if base_s and lm_s else None
        results.append(row)
        print(
            f"{length:>7} | {base_s or float('nan'):>10.1f} {lm_s or float('nan'):>14.1f} | "
            f"{row['time_ratio'] or float('nan'):>19.2f}x"
        )
        for kind in args.models:
            if "error" in row[kind]:
                print(f"        {kind} error: {row[kind]['error']}")
        lm = row.get("landmark", {})
        if "kernel_s" in lm:
            per = sorted(lm["kernel_s_per_layer"])
            print(
                f"        landmark: kernel {lm['kernel_s']:.1f} s ({lm['kernel_s'] / lm['cpu_s']:.0%} of the "
                f"read; per layer {per[0]:.2f}-{per[-1]:.2f} s, median {per[len(per) // 2]:.2f} s), the "
                f"rest {lm['cpu_s'] - lm['kernel_s']:.1f} s"
            )
    print(
        f"CPU seconds to read the prompt ({args.threads} thread(s)); landmark: k = {reading.k}, "
        f"{reading.granularity}, chunks of {reading.chunk_len}, retrieval"
    )
    write_results(
        args.out, {"results": results}, command=command_line(__file__, argv), base=args.base,
        reading=dataclasses.asdict(reading), threads=args.threads, smoke=args.smoke,
    )  # fmt: skip


if __name__ == "__main__":
    main()
