"""Benchmark: decoding cost per generated token, landmark retrieval (k blocks) vs a full key/value cache.

For each context length (tokens already in the context) it measures, for

* ``landmark``: the small preset with landmark attention, ``InferenceSession`` with top-k retrieval
  as the reading options say (the library's options and defaults: ``--k`` 4, ``--granularity``
  token_head, ``--chunk-len``, ``--search``, ``--memory-device``, ``--max-blocks``), decoding exactly as
  ``generate`` does (the landmark is fed with the token that completes a block, so about one step in 63
  has two query rows), decode steps through ``--kernel`` (default auto: the fused C++ kernel; the JSON
  records whether it was used);
* ``eager``: the same reading with ``kernel="torch"`` (the eager PyTorch decode path, whatever
  ``--kernel`` says);
* ``compiled`` (with ``--compiled``): the same reading with ``compile=True`` (the decode steps' retrieval
  attention through ``torch.compile``; warmed up over two blocks first so that compilation is not measured);
* ``full``: the same-size model with ordinary attention, ``FullCache`` (preallocated rotated K/V
  cache, one SDPA over every cached position per layer and token),

the time per generated token (CPU time of the process and wall time; the machine may be shared, so
CPU time with one thread is the steadier number), the bytes of keys/values the step must READ per token
(summed over layers: landmark keys scored + the retrieved blocks' keys and values + the local context,
versus every cached key and value), computed from sizes and cross-checked with the session's
``StepStats`` counters, and the peak resident memory of the process. Every landmark cell records the
reading it measured (``reading``: ``Reading`` as a dict), the JSON's meta the reading asked for.

Weights are random (decode cost does not depend on them). To reach long contexts without an hour of
prefill, the memories and caches are filled with random keys/values of the right shapes and layout
(``--fill random``; decode cost does not depend on the values either: only the selected blocks'
indices change, not how many are read). At ``--prefill-context`` (default 4096) each model is also
prefilled for real from random tokens, to show the same per-token cost.

Each measurement runs in a fresh subprocess (peak memory of one cannot leak into another); ratios
full / landmark are computed from measurements of the same invocation.

Usage:
    python benchmarks/decode.py                                  # 4k 16k 64k 256k; table + JSON
    python benchmarks/decode.py --contexts 4096 16384 --tokens 32 --out /tmp/decode.json
    python benchmarks/decode.py --worker landmark 65536 random --tokens 200 --profile   # one cell, profiled
    python benchmarks/decode.py --smoke --out /tmp/decode.json   # seconds: a test of the script itself

``--smoke``: toy sizes (one 420-token context, a 300-token prefill, 32 tokens) and every measurement in
this process instead of a fresh one (peak memory is then not per measurement): the numbers mean
nothing; it checks that every side runs and the JSON is whole (tests/test_benchmarks.py). Options given
with it override its sizes. Exit status 1 if a measurement failed (its error is in the JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from math import nan
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reading_args import parse_reading, reading_argv
from results_json import command_line

MODELS = ("landmark", "eager", "full")  # plus "compiled" (landmark with RetrievalConfig.compile): --compiled
SMALL = dict(vocab_size=8192, n_layer=6, n_embd=256, n_head=8, n_kv_head=8, seq_len=512)  # configs/small-*
BLOCK = 64
# --smoke: sizes of seconds; the 32 tokens after either context cross a block boundary (a step of two
# query rows, a landmark and a token)
SMOKE = dict(contexts=[420], prefill_context=300, tokens=32, warmup=1)


def counters(stats) -> dict[str, int]:
    """The counters of a ``StepStats`` (its integer fields; not its optional ``selections`` trace)."""
    values = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
    return {name: v for name, v in values.items() if isinstance(v, int) and not isinstance(v, bool)}


def build(kind: str):
    import torch

    from landmark.model import GPT, ModelConfig

    torch.manual_seed(0)
    if kind == "landmark":
        cfg = ModelConfig(
            **SMALL, attention="landmark", block_size=BLOCK, landmark_id=SMALL["vocab_size"] - 1
        )
    else:
        cfg = ModelConfig(**SMALL, attention="full")
    return GPT(cfg).eval()


def side_reading(kind: str, reading):
    """The reading a side measures: ``landmark`` the one asked for, ``eager`` the same with the eager
    PyTorch decode path, ``compiled`` the same through ``torch.compile``."""
    if kind == "eager":
        return dataclasses.replace(reading, kernel="torch")
    if kind == "compiled":
        return dataclasses.replace(reading, compile=True)
    return reading


def worker(kind: str, context: int, fill: str, args: argparse.Namespace, reading) -> dict:
    """Decode ``args.tokens`` tokens after ``context`` tokens of context with ``reading`` (a
    ``Reading``; the landmark sides' own: :func:`side_reading`); return the measurements."""
    import torch

    from landmark.data.landmarks import insert_landmarks
    from landmark.inference import FullCache, InferenceSession

    torch.set_num_threads(args.threads)
    landmark = kind in ("landmark", "eager", "compiled")
    model = build("landmark" if landmark else "full")
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    elem = 4  # float32
    per_layer_kv = cfg.n_kv_head * cfg.head_dim * elem  # bytes of one position's key (or value), one layer
    t0 = time.perf_counter()
    tok = 1
    if landmark:
        bs, lm = cfg.block_size, cfg.landmark_id
        reading = side_reading(kind, reading)
        session = InferenceSession(
            model, 1, reading.retrieval, **reading.cache_kwargs(), threads=args.threads
        )
        n_blocks, tail = divmod(context, bs - 1)
        if fill == "random":
            for memory in session.memories:
                memory.reserve(n_blocks + (args.tokens + 2 * BLOCK + args.warmup) // (bs - 1) + 2)
                for b0 in range(0, n_blocks, 1024):  # in slices, to bound the temporary
                    m = min(1024, n_blocks - b0)
                    shape = (cfg.n_kv_head, m, bs, cfg.head_dim)
                    memory.append(0, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))
            for state in session.cache.layers:
                state.tail_k[:, :, :tail].normal_(generator=gen)
                state.tail_v[:, :, :tail].normal_(generator=gen)
                state.tail_len[:] = tail
                state.length[:] = n_blocks * bs + tail
        else:
            prompt = insert_landmarks(torch.randint(0, lm, (1, context), generator=gen), bs, lm)
            if int(prompt[0, -1]) == lm:  # as generate(): a final landmark goes in with the next token
                prompt = prompt[:, :-1]
            tok = int(session.read(prompt)[0].argmax())

        def step(tok: int) -> int:
            # as generate(): when the next position is a landmark's, the landmark goes in first
            if int(session.length[0]) % bs == bs - 1:
                ids = torch.tensor([[lm, tok]])
            else:
                ids = torch.tensor([[tok]])
            out = session.read(ids)[0]
            out[lm] = float("-inf")
            return int(out.argmax())

        state_bytes = sum(
            (m.keys.numel() + m.values.numel() + m.landmark_keys.numel()) * elem for m in session.memories
        )
    else:
        decoder = FullCache.for_model(model, 1, max_len=context + args.warmup + args.tokens + 1)
        if fill == "random":
            decoder.fill_random(context, gen)
        else:
            prompt = torch.randint(0, cfg.vocab_size, (1, context), generator=gen)
            for c0 in range(0, context, 512):
                chunk = prompt[:, c0 : c0 + 512]
                logits = model(chunk, cache=decoder, logits_at=torch.tensor([chunk.shape[1] - 1])).logits
            tok = int(logits[0, -1].argmax())

        def step(tok: int) -> int:
            return int(model(torch.tensor([[tok]]), cache=decoder).logits[0, 0].argmax())

        state_bytes = decoder.nbytes()
    fill_s = time.perf_counter() - t0

    # compiled: warm up over more than a block, so that the two-row step (a token and its landmark) and
    # the growing local context have been compiled before the measurement
    warmup = max(args.warmup, 2 * BLOCK) if kind == "compiled" else args.warmup
    with torch.no_grad():
        w0 = time.perf_counter()
        for _ in range(warmup):
            tok = step(tok)
        warmup_s = time.perf_counter() - w0
        if landmark:
            before = counters(session.stats.layer)
            start_len = int(session.length[0])
        else:
            start_len = decoder.length
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(args.tokens):
            tok = step(tok)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        if args.profile:  # where the time goes: cProfile of as many more steps, to stderr
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(args.tokens):
                tok = step(tok)
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(12)

    n = args.tokens
    result = {
        "model": kind,
        "context": context,
        "fill": fill,
        "tokens": n,
        "cpu_ms_per_token": cpu / n * 1e3,
        "wall_ms_per_token": wall / n * 1e3,
        "setup_s": fill_s,
        "warmup_tokens": warmup,
        "warmup_s": warmup_s,
        "state_bytes": state_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if landmark:
        after = counters(session.stats.layer)
        d = {key: after[key] - before[key] for key in after}
        end_len = int(session.length[0])
        # from the counters: landmark keys scored, (block, kv head) pairs read, local positions
        block_bytes = session.memories[0].nbytes_per_block() // cfg.n_kv_head  # one block, one kv head
        counted = (
            d["landmarks_scored"] * per_layer_kv
            + d["block_heads_fetched"] * block_bytes
            + d["local_positions"] * per_layer_kv * 2
        ) / n
        # from sizes: every step reads all N landmark keys, k blocks per head and the local context
        steps = []
        for p in range(start_len, end_len):
            if p % bs == bs - 1:
                continue  # a landmark, fed with the token after it
            rows = 2 if p % bs == 0 and p > start_len else 1  # [landmark, token] or [token]
            blocks = (p - rows + 1) // bs  # blocks in memory when the step runs (at most --max-blocks)
            blocks = min(blocks, reading.max_blocks or blocks)
            k_eff = min(reading.k, blocks)
            local = (p - rows + 1) % bs + rows
            # each query row of each head reads its own k_eff blocks (keys and values) of its kv head
            steps.append(
                blocks * per_layer_kv + rows * cfg.n_head * k_eff * block_bytes + local * per_layer_kv * 2
            )
        sized = sum(steps) * cfg.n_layer / n
        kernel = session.retrieval.kernel_for(torch.float32, torch.device("cpu"), session.memories[0])
        result.update(
            kv_bytes_per_token=sized,
            kv_bytes_per_token_counted=counted,
            counters=d,
            kernel=kernel is not None,
            reading=dataclasses.asdict(reading),
        )
    else:
        # every step reads every cached key and value (the context, the tokens before it, itself)
        sized = sum((start_len + i + 1) * per_layer_kv * 2 for i in range(n)) * cfg.n_layer / n
        result.update(kv_bytes_per_token=sized)
    return result


def run_one(kind: str, context: int, fill: str, args: argparse.Namespace, reading) -> dict:
    """One measurement in a fresh process (its error as ``{"error": ...}``); with --smoke in this one.
    ``reading``: the ``Reading`` asked for (the worker process gets it as options)."""
    if args.smoke:
        return worker(kind, context, fill, args, reading)
    cmd = [sys.executable, __file__, "--worker", kind, str(context), fill]
    cmd += ["--tokens", str(args.tokens), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    cmd += reading_argv(reading)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "model": kind,
            "context": context,
            "fill": fill,
            "error": proc.stderr.strip().splitlines()[-1:],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def main(argv: list[str] | None = None) -> int:
    from landmark.inference.options import add_retrieval_arguments

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument(
        "--prefill-context", type=int, default=4096, help="also prefill this context for real"
    )
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens measured per run")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)"
    )
    parser.add_argument(
        "--compiled", action="store_true", help="also measure the landmark model with compile=True"
    )
    parser.add_argument(
        "--profile", action="store_true", help="with --worker: print a cProfile of the decode steps (stderr)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="toy sizes, every measurement in this process (a test)"
    )
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "CONTEXT", "FILL"), help=argparse.SUPPRESS)
    add_retrieval_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:  # its sizes as defaults: options given with it still count
        parser.set_defaults(**SMOKE)
        args = parser.parse_args(argv)
    reading = parse_reading(parser, args, block_size=BLOCK)

    if args.worker:
        kind, context, fill = args.worker
        print(json.dumps(worker(kind, int(context), fill, args, reading)))
        return 0

    # The per-token floor both models share (weights, layers, sampling): the full model on an empty cache.
    floor = run_one("full", 0, "random", args, reading)
    print(f"floor: {floor.get('cpu_ms_per_token', float('nan')):.2f} ms/token (full model, empty cache)")
    runs = [(c, "random") for c in args.contexts]
    if args.prefill_context:
        runs.append((args.prefill_context, "prefill"))
    results = []
    header = (
        f"{'context':>8} {'fill':>8} | {'landmark ms/tok':>15} {'eager':>6} {'compiled':>8} "
        f"{'full ms/tok':>11} "
        f"{'speed-up':>8} {'eager':>6} {'compiled':>8} {'above floor':>11} | "
        f"{'landmark KV MiB/tok':>19} {'full KV MiB/tok':>15} {'fewer':>6} | {'peak RSS MiB lm/full':>20}"
    )
    print(header)
    print("-" * len(header))
    for context, fill in runs:
        sides = MODELS + (("compiled",) if args.compiled else ())
        row = {m: run_one(m, context, fill, args, reading) for m in sides}
        lm, eager, comp, full = row["landmark"], row["eager"], row.get("compiled", {}), row["full"]
        entry = {
            "context": context,
            "fill": fill,
            "landmark": lm,
            "eager": eager,
            "compiled": comp,
            "full": full,
        }
        if "error" in lm or "error" in full or "error" in comp or "error" in eager:
            err = lm.get("error") or eager.get("error") or comp.get("error") or full.get("error")
            print(f"{context:>8} {fill:>8} | error: {err}")
        else:
            entry["speedup_cpu"] = full["cpu_ms_per_token"] / lm["cpu_ms_per_token"]
            entry["speedup_wall"] = full["wall_ms_per_token"] / lm["wall_ms_per_token"]
            entry["eager_speedup_cpu"] = full["cpu_ms_per_token"] / eager["cpu_ms_per_token"]
            if comp:
                entry["compiled_speedup_cpu"] = full["cpu_ms_per_token"] / comp["cpu_ms_per_token"]
                entry["compiled_speedup_wall"] = full["wall_ms_per_token"] / comp["wall_ms_per_token"]
            entry["kv_bytes_ratio"] = full["kv_bytes_per_token"] / lm["kv_bytes_per_token"]
            base = floor.get("cpu_ms_per_token", 0.0)  # attention + retrieval cost above the shared floor
            entry["attention_speedup_cpu"] = (full["cpu_ms_per_token"] - base) / max(
                lm["cpu_ms_per_token"] - base, 1e-9
            )
            print(
                f"{context:>8} {fill:>8} | {lm['cpu_ms_per_token']:>15.2f} {eager['cpu_ms_per_token']:>6.2f} "
                f"{comp.get('cpu_ms_per_token', nan):>8.2f} "
                f"{full['cpu_ms_per_token']:>11.2f} {entry['speedup_cpu']:>7.1f}x "
                f"{entry['eager_speedup_cpu']:>5.1f}x "
                f"{entry.get('compiled_speedup_cpu', nan):>7.1f}x {entry['attention_speedup_cpu']:>10.1f}x | "
                f"{mib(lm['kv_bytes_per_token']):>19} "
                f"{mib(full['kv_bytes_per_token']):>15} {entry['kv_bytes_ratio']:>5.0f}x | "
                f"{mib(lm['peak_rss_bytes']):>9}/{mib(full['peak_rss_bytes'])}"
            )
        results.append(entry)
    print(
        "ms/tok: CPU time per generated token (one thread); landmark: decode steps through the C++ kernel "
        f"(used: {all(r['landmark'].get('kernel', False) for r in results)}); "
        "eager: kernel='torch'; "
        "compiled: landmark with compile=True; above floor: speed-up of the landmark time above the floor; "
        "KV MiB/tok: keys/values read per token, all layers; landmark bytes from sizes, "
        "counters agree:",
        all(
            abs(r["landmark"]["kv_bytes_per_token"] - r["landmark"]["kv_bytes_per_token_counted"])
            <= 1e-6 * r["landmark"]["kv_bytes_per_token"]
            for r in results
            if "error" not in r["landmark"]
        ),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": command_line(__file__, argv),
        "machine": platform.platform(),
        "processor": platform.processor(),
        "model": {**SMALL, "block_size": BLOCK},
        "reading": dataclasses.asdict(reading),
        "threads": args.threads,
        "tokens": args.tokens,
        "smoke": args.smoke,
    }
    out.write_text(json.dumps({"meta": meta, "floor": floor, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")
    failed = [
        m for r in [{"floor": floor}, *results] for m in r.values() if isinstance(m, dict) and "error" in m
    ]
    if failed:
        print(f"decode.py: {len(failed)} measurement(s) failed (see 'error' in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
