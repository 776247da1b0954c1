"""A fused C++ kernel for decode steps on the CPU (``csrc/decode.cpp``), compiled on first use.

A decode step of ``retrieval_attention`` in eager PyTorch runs about 150 small tensor operations per
layer (rotations, the landmark scan, top-k, gathering the k blocks of every head, the grouped
softmax); on a CPU each costs microseconds of dispatch, which is most of the step. The kernel does the
same computation in one call per layer and reads the selected blocks where they are stored (no
gather copy). It is used for decode steps (at most ``DECODE_ROWS`` query rows) when:

* model and block memory are on the CPU, in float32;
* every batch row holds the same number ``n >= k`` of blocks and no row's ring buffer has wrapped
  (no eviction yet), every query row is real;
* granularity ``"token_head"``, exact landmark search, ``compile`` off.

Anything else takes the eager path, which stays the reference: tests check the kernel against it
(outputs and selections, odd sizes, GQA, batches, two-row steps). ``RetrievalConfig.decode_kernel``
chooses: ``"auto"`` (default: the kernel when it applies and compiles), ``"cpp"`` (the same, but an
error if it cannot be compiled), ``"torch"`` (never). The build uses ``torch.utils.cpp_extension``
(a C++ compiler and ninja; about a minute, once, cached under ``TORCH_EXTENSIONS_DIR``); if it fails,
``"auto"`` warns once and uses the eager path. ``LANDMARK_DECODE_KERNEL=0`` in the environment turns
the kernel off everywhere.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from landmark.model import rope_angles

if TYPE_CHECKING:
    from landmark.inference.memory import BlockMemory

KERNELS = ("auto", "cpp", "torch")
_SOURCE = Path(__file__).with_name("csrc") / "decode.cpp"


class KernelUnavailableError(RuntimeError):
    """The C++ decode kernel could not be built here."""


@functools.cache
def _build():
    """The compiled extension module, or the exception that prevented it."""
    if os.environ.get("LANDMARK_DECODE_KERNEL", "1") == "0":
        return KernelUnavailableError("LANDMARK_DECODE_KERNEL=0 in the environment")
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"landmark_decode_v1_{_cpu_tag()}",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffp-contract=off"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, a failed build: the eager path still works
        return KernelUnavailableError(f"{type(err).__name__}: {err}")


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction sets: the build uses ``-march=native``, so a cached build
    must not be loaded on a machine with other instruction sets (a shared home directory)."""
    import hashlib
    import platform

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def kernel_module(required: bool = False):
    """The compiled module; None if it cannot be built (a warning, once), or an error if ``required``."""
    mod = _build()
    if isinstance(mod, Exception):
        if required:
            raise KernelUnavailableError(
                f'decode_kernel="cpp" but the C++ decode kernel could not be built: {mod}'
            ) from mod
        _warn_once(str(mod))
        return None
    return mod


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"landmark: C++ decode kernel unavailable, using the eager path ({reason})", stacklevel=3)


def kernel_applies(
    rows: int,
    q_len: Tensor,
    dtype: torch.dtype,
    memory: BlockMemory | None,
    k: int,
    granularity: str,
    search: str,
    compile: bool,
) -> bool:
    """Whether a decode step of ``rows`` query rows (``q_len`` (B,) real ones, queries of ``dtype``) over
    this memory can take the kernel."""
    if memory is None or granularity != "token_head" or search != "exact" or compile:
        return False
    if dtype != torch.float32 or memory.dtype != torch.float32:
        return False
    if memory.device.type != "cpu" or memory.storage_device.type != "cpu" or q_len.device.type != "cpu":
        return False
    counts = memory.count
    if counts[0] < k or any(c != counts[0] for c in counts) or any(memory.start):
        return False
    return bool((q_len == rows).all())


@dataclass
class KernelPlan:
    """What a decode step through the kernel computes once for all layers (``kernel_plan``)."""

    module: Any  # the compiled extension
    q_local: Tensor  # (B, C) local position of each query row
    cos_table: Tensor  # (P, D/2): the eager decode path's angle table, same size, same values
    sin_table: Tensor
    k: int
    local_positions: int  # local context positions attended to, summed over rows (for StepStats)


def kernel_plan(
    module: Any,
    q_start: Tensor,
    rows: int,
    local_len: Tensor,
    local_width: int,
    k: int,
    block_size: int,
    head_dim: int,
    rope_base: float,
) -> KernelPlan:
    """The layer-independent part of a decode step: q_start, local_len (B,) as in ``retrieval_attention``;
    local_width: the length of the local context tensors (>= max(local_len))."""
    q_local = (q_start.long()[:, None] + torch.arange(rows, device=q_start.device)).contiguous()
    cos_table, sin_table = step_rope_table(k, local_width, block_size, head_dim, rope_base, q_start.device)
    return KernelPlan(module, q_local, cos_table, sin_table, k, int(local_len.sum()))


def decode_step(
    q: Tensor, local_k: Tensor, local_v: Tensor, local_len: Tensor, q_len: Tensor, memory: BlockMemory,
    plan: KernelPlan, scale: float,
) -> Tensor:  # fmt: skip
    """``retrieval_attention`` of a decode step through the kernel; arguments as there, (B, H, C, D) out.

    The caller has checked ``kernel_applies`` and built ``plan`` (``kernel_plan``).
    """
    return plan.module.decode_step(
        q.contiguous(),
        plan.q_local,
        q_len.long().contiguous(),
        local_k.contiguous(),
        local_v.contiguous(),
        local_len.long().contiguous(),
        memory.landmark_keys,
        memory.keys,
        memory.values,
        plan.cos_table,
        plan.sin_table,
        memory.count[0],
        plan.k,
        scale,
    )


def step_rope_table(
    k: int, local_width: int, block_size: int, head_dim: int, base: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The angle table of a step whose local context is ``local_width`` positions: every position it
    uses is below (k + 2 + local blocks) * block_size. The eager decode path and the kernel index the
    same table (same size, so the same cos/sin values bit for bit)."""
    return _rope_table((k + 2 + -(-local_width // block_size)) * block_size, head_dim, base, device)


@functools.lru_cache(maxsize=32)
def _rope_table(n: int, dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin (n, dim / 2) of positions 0..n-1 (entry p equals ``rope_angles`` of position p)."""
    return rope_angles(torch.arange(n, device=device), dim, base)
