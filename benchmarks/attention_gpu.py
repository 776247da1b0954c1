"""Benchmark: the fused Triton landmark attention against FlashAttention (PyTorch SDPA) on a CUDA GPU.

Times forward and forward+backward of

* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` restricted to the
  FlashAttention backend (the baseline; plain causal attention, no landmarks),
* ``triton``: ``landmark_attention(impl="triton")`` (through the ``landmark::triton_forward`` op),

at sequence lengths 2048 .. 32768 (batch 1, 16 heads, head_dim 64, bfloat16 and float16,
block_size 64 by default), with CUDA events (median of ``--repeats`` after ``--warmup`` runs), plus the
peak extra GPU memory of one forward+backward. Times are reported as ratios to SDPA measured in the
same invocation. Before timing, the kernels are checked against the exact blockwise implementation at
a moderate size (outputs and q/k/v gradients, float32 and bfloat16, with grouped-query attention and
an unaligned query offset); the script stops if the check fails.

Usage:
    python benchmarks/attention_gpu.py              # table + benchmarks/results/attention_gpu.json
    python benchmarks/attention_gpu.py --seqs 2048 8192 --dtypes bfloat16 --out /tmp/gpu.json
    python benchmarks/attention_gpu.py --device cpu --interpret # tiny smoke run of the code path, no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

DTYPES = ("bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--seqs", type=int, nargs="+", default=None, help="default: 2048 4096 8192 16384 32768")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    p.add_argument("--out", default="benchmarks/results/attention_gpu.json")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument(
        "--interpret",
        action="store_true",
        help="run the kernels through the Triton interpreter (with --device cpu: a smoke test of this\n"
        "script at tiny sizes; the timings mean nothing)",
    )
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.interpret:
        p.error("--device cpu needs --interpret (the Triton kernels run on the CPU only in the interpreter)")
    if args.seqs is None:
        args.seqs = [64, 128] if args.device == "cpu" else [2048, 4096, 8192, 16384, 32768]
    return args


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    import torch

    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device: str) -> float | None:
    """Peak GPU memory allocated during ``fn()`` beyond what was allocated before, in MiB."""
    import torch

    if device != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def make_attention(impl: str, block_size: int, device: str):
    import torch
    import torch.nn.functional as F

    from landmark import landmark_attention

    if impl == "triton":
        return lambda q, k, v: landmark_attention(q, k, v, block_size, impl="triton")

    def sdpa(q, k, v):
        if device == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    del torch
    return sdpa


def check_correctness(device: str) -> list[dict[str, Any]]:
    """Triton against the exact blockwise implementation (float32 compute) at a moderate size."""
    import torch

    from landmark.ops.blockwise import blockwise_backward, blockwise_forward
    from landmark.ops.triton import triton_backward, triton_forward

    small = device == "cpu"
    configs = [
        # (batch, heads, kv_heads, q_len, k_len, head_dim, block_size)
        (1, 4, 2, 1000, 1000, 64, 64) if not small else (1, 2, 1, 50, 50, 16, 16),
        (2, 4, 4, 777, 1500, 64, 64) if not small else (1, 2, 2, 37, 90, 24, 32),
    ]
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 5e-2}  # max |error| / max |expected|
    results = []
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in configs:
        batch, heads, kv_heads, q_len, k_len, head_dim, bs = shape
        scale = head_dim**-0.5
        q32 = torch.randn(batch, heads, q_len, head_dim, device=device, generator=gen)
        k32 = torch.randn(batch, kv_heads, k_len, head_dim, device=device, generator=gen)
        v32 = torch.randn(batch, kv_heads, k_len, head_dim, device=device, generator=gen)
        g32 = torch.randn(batch, heads, q_len, head_dim, device=device, generator=gen)
        for dtype, tol in tolerance.items():
            q, k, v, g = (t.to(dtype) for t in (q32, k32, v32, g32))
            out, lse = triton_forward(q, k, v, bs, scale)
            got = [out, *triton_backward(g, q, k, v, out, lse, bs, scale)]
            # The exact answer for the rounded inputs: blockwise in float32.
            qe, ke, ve, ge = (t.float() for t in (q, k, v, g))
            out_e, lse_e = blockwise_forward(qe, ke, ve, bs, scale)
            expected = [out_e, *blockwise_backward(ge, qe, ke, ve, bs, scale)]
            errors = {}
            for name, a, b in zip(("out", "dq", "dk", "dv"), got, expected):
                if not torch.isfinite(a).all():
                    errors[name] = float("inf")
                else:
                    errors[name] = float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30))
            errors["lse"] = float((lse - lse_e).abs().max() / lse_e.abs().max().clamp_min(1e-30))
            ok = all(e <= tol for e in errors.values())
            dtype_name = str(dtype).removeprefix("torch.")
            results.append(
                {
                    "shape": list(shape),
                    "dtype": dtype_name,
                    "relative_max_error": errors,
                    "tolerance": tol,
                    "ok": ok,
                }
            )
            status = "ok" if ok else "FAILED"
            shown = " ".join(f"{n}={e:.1e}" for n, e in errors.items())
            print(f"check B{batch}-H{heads}-Hkv{kv_heads}-Tq{q_len}-Tk{k_len}-D{head_dim}-bs{bs} "
                  f"{dtype_name:9s} {shown}  (tol {tol:.0e}) {status}")  # fmt: skip
    return results


def measure(impl: str, q, k, v, grad, args: argparse.Namespace) -> dict[str, Any]:
    """Forward and forward+backward times and peak extra memory of one implementation on one input."""
    import torch

    attn = make_attention(impl, args.block_size, args.device)

    def forward() -> None:
        with torch.no_grad():
            attn(q, k, v)

    def forward_backward() -> None:
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)

    try:
        return {
            f"{impl}_fwd_ms": time_ms(forward, args.device, args.warmup, args.repeats),
            f"{impl}_fwd_bwd_ms": time_ms(forward_backward, args.device, args.warmup, args.repeats),
            f"{impl}_peak_extra_mib": peak_extra_mib(forward_backward, args.device),
        }
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {f"{impl}_{key}": None for key in ("fwd_ms", "fwd_bwd_ms", "peak_extra_mib")} | {
            f"{impl}_error": "out of memory"
        }


def benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for seq in args.seqs:
            gen = torch.Generator(device=args.device).manual_seed(seq)
            shape = (args.batch, args.heads, seq, args.head_dim)
            q, k, v, grad = (
                torch.randn(shape, device=args.device, dtype=dtype, generator=gen) for _ in range(4)
            )
            for t in (q, k, v):
                t.requires_grad_()
            row: dict[str, Any] = {"dtype": dtype_name, "seq": seq}
            for impl in ("sdpa", "triton"):
                row.update(measure(impl, q, k, v, grad, args))
            for key in ("fwd", "fwd_bwd"):
                a, b = row[f"triton_{key}_ms"], row[f"sdpa_{key}_ms"]
                row[f"ratio_{key}"] = a / b if a and b else None
            rows.append(row)
            print_row(row)
    return rows


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


HEADER = (
    f"{'dtype':9s} {'seq':>6s} | {'sdpa fwd':>9s} {'triton fwd':>10s} {'ratio':>6s} | "
    f"{'sdpa f+b':>9s} {'triton f+b':>10s} {'ratio':>6s} | {'sdpa MiB':>9s} {'triton MiB':>10s}"
)


def print_row(row: dict[str, Any]) -> None:
    print(
        f"{row['dtype']:9s} {row['seq']:6d} | {_fmt(row['sdpa_fwd_ms'], '9.3f')} "
        f"{_fmt(row['triton_fwd_ms'], '10.3f')} {_fmt(row['ratio_fwd'], '6.2f')} | "
        f"{_fmt(row['sdpa_fwd_bwd_ms'], '9.3f')} {_fmt(row['triton_fwd_bwd_ms'], '10.3f')} "
        f"{_fmt(row['ratio_fwd_bwd'], '6.2f')} | {_fmt(row['sdpa_peak_extra_mib'], '9.1f')} "
        f"{_fmt(row['triton_peak_extra_mib'], '10.1f')}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "attention_gpu.py: no CUDA device is available (torch.cuda.is_available() is False); this "
            "benchmark needs an NVIDIA GPU. For a smoke test of the script itself: --device cpu --interpret",
            file=sys.stderr,
        )
        return 2
    try:
        import triton
    except ImportError:
        print(
            "attention_gpu.py: triton is not installed (pip install 'landmark-attention[gpu]')",
            file=sys.stderr,
        )
        return 2

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()})"
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton.__version__}")
    print(
        f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, block_size {args.block_size}; "
        f"median of {args.repeats} after {args.warmup} warm-up runs; ratio = triton / sdpa"
    )
    check = [] if args.skip_check else check_correctness(args.device)
    if not all(c["ok"] for c in check):
        print(
            "attention_gpu.py: the Triton kernels failed the correctness check; not timing them",
            file=sys.stderr,
        )
        return 1
    print(HEADER)
    rows = benchmark(args)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "landmark attention (triton) vs SDPA FlashAttention (causal): forward, forward+backward",
        "device": device_name,
        "interpreted": args.interpret,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "batch": args.batch,
            "heads": args.heads,
            "head_dim": args.head_dim,
            "block_size": args.block_size,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "statistic": "median",
        },
        "correctness_check": check,
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
