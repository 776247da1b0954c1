"""Benchmark: landmark attention (blockwise, reference) against PyTorch SDPA on the CPU.

Measures forward+backward wall time and peak extra memory of

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` (the baseline),
* ``blockwise``: ``landmark_attention(impl="blockwise")``,
* ``reference``: ``landmark_attention(impl="reference")`` (dense, O(len^2) memory),

at several sequence lengths (batch 1, 8 heads, head_dim 64, float32 by default). Each measurement
runs in a fresh subprocess, so the peak resident memory of one cannot leak into another; "peak extra
memory" is the growth of the process's peak RSS during one forward+backward, over what the inputs
already used. Times are the best of ``--repeats`` runs after one warm-up run (the dense reference
above 2048 is run once: it takes minutes), and are reported as ratios to SDPA measured in the same
invocation (machines are noisy; absolute numbers are not comparable across runs). Before timing,
blockwise is checked against the reference at a small size.

Usage:
    python benchmarks/attention.py                      # seq 512, 2048, 8192; table + JSON
    python benchmarks/attention.py --seqs 1024 4096 --out /tmp/bench.json
    python benchmarks/attention.py --smoke --out /tmp/bench.json   # seconds: a test of the script itself

``--smoke``: toy sizes (seq 64 and 128, 2 heads of 16, blocks of 16, one timed run) and every
measurement in this process instead of a fresh one (peak memory is then not per measurement): the
numbers mean nothing (tests/test_benchmarks.py). Options given with it override its sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_json import command_line

IMPLS = ("sdpa", "blockwise", "reference")
SMOKE = dict(seqs=[64, 128], heads=2, head_dim=16, block_size=16, repeats=1, threads=1)  # --smoke


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
        return True
    except OSError:
        return False


def worker(impl: str, seq: int, args: argparse.Namespace) -> dict:
    """Run one measurement in this process and return it as a dict."""
    import torch
    import torch.nn.functional as F

    from landmark import landmark_attention

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (1, args.heads, seq, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype)

    def step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> None:
        if impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = landmark_attention(q, k, v, args.block_size, impl=impl)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    # Warm-up (lazy library initialisation must not count as memory of the op). The dense reference
    # is warmed up at a small size and timed once: one run at 8192 takes minutes.
    slow = impl == "reference" and seq > 2048
    warm = [t[:, :, :256].detach().requires_grad_(t.requires_grad) for t in (q, k, v, grad)] if slow else None
    step(*(warm or (q, k, v, grad)))
    baseline = _rss_kib("VmRSS")
    exact_peak = _reset_peak_rss()
    t0 = time.perf_counter()
    step(q, k, v, grad)  # the memory measurement, and the first timing
    times = [time.perf_counter() - t0]
    peak = _rss_kib("VmHWM")
    for _ in range(0 if slow else args.repeats - 1):
        t0 = time.perf_counter()
        step(q, k, v, grad)
        times.append(time.perf_counter() - t0)
    return {
        "impl": impl,
        "seq": seq,
        "time_s": min(times),
        "times_s": times,
        "peak_extra_mib": (peak - baseline) / 1024,
        "peak_is_exact": exact_peak,
        "threads": torch.get_num_threads(),
    }


def check_exactness(args: argparse.Namespace) -> float:
    """Max abs difference of blockwise against reference (output and grads) at a small size."""
    import torch

    from landmark import landmark_attention

    torch.manual_seed(0)
    shape = (1, args.heads, 300, args.head_dim)
    q, k, v = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(3))
    err = 0.0
    outs = {}
    for impl in ("reference", "blockwise"):
        out = landmark_attention(q, k, v, args.block_size, impl=impl)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        outs[impl] = (out, *grads)
    for a, b in zip(outs["reference"], outs["blockwise"]):
        err = max(err, (a - b).abs().max().item())
    return err


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--out", default="benchmarks/results/attention_cpu.json")
    p.add_argument(
        "--smoke", action="store_true", help="toy sizes, every measurement in this process (a test)"
    )
    p.add_argument("--worker", nargs=2, metavar=("IMPL", "SEQ"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # its sizes as defaults: options given with it still count
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return 0

    err = check_exactness(args)
    print(f"exactness: blockwise vs reference, fp64, seq 300: max abs diff {err:.2e}")
    if err > 1e-9:
        print("blockwise does not match the reference: not benchmarking", file=sys.stderr)
        return 1

    passthrough = [
        "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--block-size", str(args.block_size),
        "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads),
    ]  # fmt: skip
    results = []
    for seq in args.seqs:
        for impl in args.impls:
            if args.smoke:
                results.append(worker(impl, seq, args))
                print(
                    f"  measured {impl:>9} seq {seq:>6}: {results[-1]['time_s'] * 1000:9.1f} ms", flush=True
                )
                continue
            cmd = [sys.executable, __file__, "--worker", impl, str(seq), *passthrough]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            else:
                why = (
                    "killed (out of memory?)"
                    if proc.returncode < 0
                    else proc.stderr.strip().splitlines()[-1:]
                )
                row = {"impl": impl, "seq": seq, "error": str(why)}
            results.append(row)
            status = f"{row['time_s'] * 1000:9.1f} ms" if "time_s" in row else row["error"]
            print(f"  measured {impl:>9} seq {seq:>6}: {status}", flush=True)

    by = {(r["impl"], r["seq"]): r for r in results}
    for r in results:
        sdpa, ref = by.get(("sdpa", r["seq"]), {}), by.get(("reference", r["seq"]), {})
        if "time_s" in r and "time_s" in sdpa:
            r["time_vs_sdpa"] = r["time_s"] / sdpa["time_s"]
        if "peak_extra_mib" in r and "peak_extra_mib" in ref and ref["peak_extra_mib"] > 0:
            r["memory_vs_reference"] = r["peak_extra_mib"] / ref["peak_extra_mib"]

    header = "| impl | seq | fwd+bwd ms | x SDPA time | peak extra MiB | x reference memory |"
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['seq']} | {r['error']} | | | |")
            continue
        tv = f"{r['time_vs_sdpa']:.2f}" if "time_vs_sdpa" in r else ""
        mv = f"{r['memory_vs_reference']:.3f}" if "memory_vs_reference" in r else ""
        ms, mib = r["time_s"] * 1000, r["peak_extra_mib"]
        lines.append(f"| {r['impl']} | {r['seq']} | {ms:.1f} | {tv} | {mib:.1f} | {mv} |")
    table = "\n".join(lines)
    print()
    print(table)

    import torch

    meta = {
        "command": command_line(__file__, argv),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "batch": 1,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "block_size": args.block_size,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "threads": args.threads or "default",
        "exactness_max_abs_diff": err,
        "smoke": args.smoke,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps({"meta": meta, "results": results, "table": table}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
