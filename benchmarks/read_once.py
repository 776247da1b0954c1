"""Benchmark: memory of generating over a very long prompt, and reusing a saved state ("read once, ask many").

Two measurements with the shipped small landmark model (``checkpoints/passkey-landmark``) on a
bundled book, each in its own process, one thread:

* ``memory``: ``generate`` over a ``--memory-tokens`` prompt (default 100,000) and 16 new tokens; the
  growth of the peak resident memory from before the call to after it, against the block memory
  (every layer's stored landmark keys, keys and values, as allocated). Target: growth at
  most the block memory + 300 MB, i.e. the logits of the prompt are never held.
* ``reuse``: read a ``--doc-tokens`` document (default 32,768) and save its state; then, in a new
  session, load the state and answer a question (16 prompt tokens, 16 generated), against reading the
  document again and answering. Target: at least 20x faster.

Usage:
    python benchmarks/read_once.py                        # -> benchmarks/results/read_once.json
    python benchmarks/read_once.py --smoke --out /tmp/read_once.json   # seconds: a test of the script

``--smoke``: toy sizes (a 600-token prompt, a 300-token document) and both measurements in this process
instead of a fresh one each (the memory growth is then not of a fresh process): the numbers mean
nothing (tests/test_benchmarks.py). Options given with it override its sizes.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_json import command_line, write_results

REPO = Path(__file__).resolve().parents[1]
SMOKE = dict(memory_tokens=600, doc_tokens=300)  # --smoke


def _setup(args):
    import torch

    from landmark.checkpoint import load_model
    from landmark.inference import kernel

    sys.path.insert(0, str(Path(__file__).parent))
    from prefill import book_tokens

    torch.set_num_threads(1)
    kernel.kernel_module()
    model, tokenizer, _ = load_model(args.checkpoint)
    return model.eval(), tokenizer, book_tokens


def memory_worker(args) -> dict:
    import torch

    from landmark.inference import InferenceSession
    from landmark.inference.generate import Landmarks, Sampling, generate_with

    model, tokenizer, book_tokens = _setup(args)
    ids = book_tokens(tokenizer, args.memory_tokens)
    session = InferenceSession(model, 1, k=4)
    cfg = model.config
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    with torch.no_grad():
        out = generate_with(session.read, [ids], 16, landmarks=Landmarks(cfg.block_size, cfg.landmark_id),
                            sampling=Sampling())  # fmt: skip
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    memory = sum(
        (m.landmark_keys.numel() + m.keys.numel() + m.values.numel()) * m.keys.element_size()
        for m in session.memories
    )
    return {
        "prompt_tokens": len(ids),
        "generated": len(out[0]),
        "seconds": seconds,
        "peak_rss_growth_bytes": rss1 - rss0,
        "block_memory_bytes": memory,
        "growth_minus_memory_mb": (rss1 - rss0 - memory) / 2**20,
    }


def reuse_worker(args) -> dict:
    import torch

    from landmark.inference import generate
    from landmark.inference.cache import StateFiles

    model, tokenizer, book_tokens = _setup(args)
    doc = book_tokens(tokenizer, args.doc_tokens)
    question = tokenizer.encode(" Call me Ishmael. Some years ago, never mind how long precisely")[:16]
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        state = Path(tmp) / "doc.safetensors"
        t0 = time.perf_counter()
        generate(model, [doc], 1, k=4, state=StateFiles(save=state))
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = generate(model, [doc + question], 16, k=4)[0]
        again_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        loaded = generate(model, [question], 16, k=4, state=StateFiles(load=state))[0]
        loaded_s = time.perf_counter() - t0
        size = state.stat().st_size
    return {
        "doc_tokens": len(doc),
        "read_and_save_s": read_s,
        "read_again_and_answer_s": again_s,
        "load_and_answer_s": loaded_s,
        "speedup": again_s / loaded_s,
        "state_bytes": size,
        "answers": {"read_again": again, "loaded": loaded},
    }


def run(kind: str, args) -> dict:
    """One measurement in a fresh process; with --smoke in this one."""
    if args.smoke:
        return (memory_worker if kind == "memory" else reuse_worker)(args)
    cmd = [sys.executable, __file__, "--worker", kind, "--checkpoint", args.checkpoint]
    cmd += ["--memory-tokens", str(args.memory_tokens), "--doc-tokens", str(args.doc_tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "passkey-landmark"))
    p.add_argument("--memory-tokens", type=int, default=100_000)
    p.add_argument("--doc-tokens", type=int, default=32_768)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "read_once.json"))
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes, both measurements in this process (a test)"
    )
    p.add_argument("--worker", choices=("memory", "reuse"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # its sizes as defaults: options given with it still count
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    if args.worker:
        fn = memory_worker if args.worker == "memory" else reuse_worker
        print(json.dumps(fn(args)))
        return
    memory, reuse = run("memory", args), run("reuse", args)
    mb = 2**20
    growth, block = memory["peak_rss_growth_bytes"] / mb, memory["block_memory_bytes"] / mb
    print(
        f"generate over {memory['prompt_tokens']} tokens ({memory['seconds']:.0f} s): peak RSS grew "
        f"{growth:.0f} MB, block memory {block:.0f} MB, difference {memory['growth_minus_memory_mb']:.0f} MB"
    )
    print(
        f"document of {reuse['doc_tokens']} tokens: read again + answer "
        f"{reuse['read_again_and_answer_s']:.2f} s, load state + answer {reuse['load_and_answer_s']:.2f} s: "
        f"{reuse['speedup']:.1f}x "
        f"(state file {reuse['state_bytes'] / mb:.0f} MB)"
    )
    write_results(
        args.out, {"memory": memory, "reuse": reuse}, command=command_line(__file__, argv), smoke=args.smoke
    )


if __name__ == "__main__":
    main()
