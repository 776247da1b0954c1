"""Benchmark: inference speed under load, by thread count (why the library uses one thread by default).

Reads ``--length`` tokens of a bundled book with the shipped landmark model (``InferenceSession.read``,
k = 4) and then decodes ``--tokens`` tokens greedily, in a fresh subprocess per setting:

* ``threads``: 1 (the library's default, ``landmark.inference.threads``) or 2 (every core here);
* ``neighbour``: ``idle`` (nothing else runs) or ``busy`` (another process runs single-threaded
  matrix products on the machine for the whole measurement, as a second job or a user's other work
  would).

It reports wall-clock seconds (what the user waits) for the prompt and per generated token, and the
ratio to one thread on the idle machine. The issue's target: with the library's default threads and a
busy neighbour, at most 1.5x the one-thread idle time.

Usage:
    python benchmarks/threads.py                 # table + benchmarks/results/threads.json
    python benchmarks/threads.py --length 4096 --tokens 16 --repeats 2
    python benchmarks/threads.py --smoke --out /tmp/threads.json   # seconds: a test of the script itself

``--smoke``: toy sizes (a 300-token prompt, 4 tokens), every measurement in this process instead of a
fresh one, and no wait for the neighbour to start: the numbers mean nothing; it checks that every
setting runs and the JSON is whole (tests/test_benchmarks.py). Options given with it override these.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_json import command_line, write_results

REPO = Path(__file__).resolve().parents[1]
SMOKE = dict(length=300, tokens=4, settle=0.0)  # --smoke
NEIGHBOUR = (
    "import torch\n"
    "torch.set_num_threads(1)\n"
    "a = torch.randn(512, 512)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)


def worker(args: argparse.Namespace) -> dict:
    import torch

    from landmark.checkpoint import load_model
    from landmark.data.landmarks import insert_landmarks
    from landmark.inference import InferenceSession, kernel

    sys.path.insert(0, str(Path(__file__).parent))
    from prefill import book_tokens

    kernel.kernel_module()
    model, tokenizer, _ = load_model(args.checkpoint)
    model.eval()
    cfg = model.config
    tokens = torch.tensor([book_tokens(tokenizer, args.length)])
    stream = insert_landmarks(tokens, cfg.block_size, cfg.landmark_id)
    if int(stream[0, -1]) == cfg.landmark_id:
        stream = stream[:, :-1]
    threads = args.threads if args.threads > 0 else None  # 0: the library's default
    session = InferenceSession(model, 1, k=4, threads=threads)
    with torch.no_grad():
        w0 = time.perf_counter()
        logits = session.read(stream)
        prompt_s = time.perf_counter() - w0
        bs, lm = cfg.block_size, cfg.landmark_id
        w0 = time.perf_counter()
        for _ in range(args.tokens):
            logits[0, lm] = float("-inf")
            tok = int(logits[0].argmax())
            pos = int(session.length[0])
            ids = torch.tensor([[lm, tok]]) if pos % bs == bs - 1 else torch.tensor([[tok]])
            logits = session.read(ids)
        decode_s = (time.perf_counter() - w0) / args.tokens
    return {"threads_used": session.threads, "prompt_s": prompt_s, "decode_s_per_token": decode_s}


def run_one(threads: int, neighbour: str, args: argparse.Namespace) -> dict:
    busy = None
    if neighbour == "busy":
        busy = subprocess.Popen([sys.executable, "-c", NEIGHBOUR], env={"OMP_NUM_THREADS": "1", "PATH": ""})
        time.sleep(args.settle)  # let it start
    try:
        if args.smoke:
            return worker(argparse.Namespace(**{**vars(args), "threads": threads}))
        cmd = [sys.executable, __file__, "--worker", "--threads", str(threads), "--length", str(args.length)]
        cmd += ["--tokens", str(args.tokens), "--checkpoint", args.checkpoint]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--length", type=int, default=8192, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="generated tokens")
    parser.add_argument("--repeats", type=int, default=1, help="measure every setting this many times")
    parser.add_argument("--checkpoint", default=str(REPO / "checkpoints" / "passkey-landmark"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads.json"))
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to let the busy neighbour start (default 2)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes, every measurement in this process (a test)"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # its sizes as defaults: options given with it still count
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    settings = [(1, "idle"), (0, "busy"), (1, "busy"), (2, "idle"), (2, "busy")]
    results = []
    for rep in range(args.repeats):
        for threads, neighbour in settings:
            r = run_one(threads, neighbour, args)
            results.append({"threads": threads or "default", "neighbour": neighbour, "repeat": rep, **r})
    base = [r for r in results if r["threads"] == 1 and r["neighbour"] == "idle"]
    base_prompt = min(r["prompt_s"] for r in base)
    base_decode = min(r["decode_s_per_token"] for r in base)
    print(
        f"{'threads':>11} {'neighbour':>9} | {'prompt s':>8} {'x idle 1t':>9} | "
        f"{'ms/token':>8} {'x idle 1t':>9}"
    )
    for r in results:
        r["prompt_vs_idle_1t"] = r["prompt_s"] / base_prompt
        r["decode_vs_idle_1t"] = r["decode_s_per_token"] / base_decode
        label = f"{r['threads']}" + (f" ({r['threads_used']})" if r["threads"] == "default" else "")
        print(
            f"{label:>11} {r['neighbour']:>9} | {r['prompt_s']:8.2f} {r['prompt_vs_idle_1t']:8.2f}x | "
            f"{r['decode_s_per_token'] * 1e3:8.2f} {r['decode_vs_idle_1t']:8.2f}x"
        )
    print(
        f"wall-clock time; prompt of {args.length} tokens, then {args.tokens} tokens decoded; "
        "default = the library's"
    )
    write_results(
        args.out, {"results": results}, command=command_line(__file__, argv), length=args.length,
        tokens=args.tokens, smoke=args.smoke,
    )  # fmt: skip


if __name__ == "__main__":
    main()
