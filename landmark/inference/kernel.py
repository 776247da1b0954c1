"""The fused C++ retrieval kernel for the CPU (``csrc/retrieval.cpp``), compiled on first use; the same
extension holds the int8 linear layer of ``landmark.inference.weights`` (``csrc/int8_linear.cpp``).

Retrieval attention in eager PyTorch runs a few hundred tensor operations per layer and step
(rotations, the landmark scan, top-k, gathering the k blocks of every query row and head, the grouped
softmax): a decode step spends most of its time dispatching them, and a prefill chunk most of its time
copying the selected blocks (``index_select``) before scoring them. The kernel does the same
computation in one call per layer and step, for a decode step (one or two query rows) and a prefill
chunk alike: per (batch row, kv head, tile of 32 query rows) it scans the landmark keys once for the
tile, keeps the top k per query row and head, and scores the selected blocks where they are stored
(no gather copy). Work is split in those large pieces, so a second thread or a busy neighbour costs
little synchronisation.

It is used when (``kernel_applies``):

* the queries, the local context and the block memory are on the CPU, in float32 (the block contents
  may be stored compact: float16, bfloat16, or int8 with scales; each selected block is converted into
  a buffer of one block as it is visited); ``compile`` is off.

For granularity ``"token_head"`` with exact search the kernel also selects the blocks; for the other
granularities (``"token"``, ``"head"``) and FAISS search the eager path selects them and the kernel
attends (it reads the given blocks, ``retrieval.reference_selection``, where they are stored, as it
reads its own).

Any batch (rows of different lengths, different memory sizes, memories that have evicted blocks) is
handled. Anything else takes the eager path, ``retrieval.reference_attention``, which stays the
reference (as ``landmark.ops.reference`` is for the training-time operators): tests check the kernel
against it (outputs to float rounding, the selected blocks on non-tied scores) over odd sizes, GQA,
ragged batches, both model families. ``RetrievalConfig.kernel`` chooses: ``"auto"`` (default: the
kernel when it applies and compiles), ``"cpp"`` (the same, but an error if it cannot be compiled),
``"graph"`` (the fixed graph of tensor operations, ``landmark.inference.graph``: the GPU path, also
runnable on the CPU), ``"torch"`` (never). The build uses ``torch.utils.cpp_extension`` (a C++
compiler and ninja; about a minute, once, cached under ``TORCH_EXTENSIONS_DIR``); if it fails,
``"auto"`` warns once and uses the eager path. ``LANDMARK_KERNEL=0`` in the environment turns the
kernel off everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from landmark.model import rope_angles

if TYPE_CHECKING:
    from landmark.inference.memory import BlockMemory
    from landmark.inference.step import LayerInputs, Step

KERNELS = ("auto", "cpp", "graph", "torch", "triton")
KERNEL_ENV = "LANDMARK_KERNEL"  # "0": the C++ kernels are not used (the eager paths run instead)
SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("retrieval.cpp", "int8_linear.cpp"))
_VERSION = 4  # bump when the C++ source changes incompatibly (the build cache is keyed by the name)


class KernelUnavailableError(RuntimeError):
    """The C++ retrieval kernel could not be built here."""


@functools.cache
def _build():
    """The compiled extension module, or the exception that prevented it."""
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return KernelUnavailableError(f"{KERNEL_ENV}=0 in the environment")
    try:
        import torch.utils.cpp_extension as cpp_extension  # imported only to build: it pulls in setuptools

        name = f"landmark_retrieval_v{_VERSION}_{_cpu_tag()}"  # the tag covers the source and the CPU
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        built = folder / f"{name}.so"
        if built.is_file():  # built before: loaded as it is, without the build lock
            return _import_built(name, built)
        _clear_stale_lock(folder / "lock")
        sources = [str(p) for p in SOURCES]
        flags = ["-O3", "-march=native"]
        return cpp_extension.load(name=name, sources=sources, extra_cflags=flags, verbose=False)
    except Exception as err:  # no compiler, no ninja, a failed build: the eager path still works
        return KernelUnavailableError(f"{type(err).__name__}: {err}")


STALE_LOCK_S = 600  # a build takes about a minute: an older build lock was left by a killed process


def _import_built(name: str, path: Path):
    """The extension module built at ``path``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clear_stale_lock(lock: Path) -> None:
    """Remove a build lock older than ``STALE_LOCK_S`` (its build was killed: torch would wait for it
    forever); say so when a younger one makes this process wait."""
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return  # no lock: nobody is building
    if age > STALE_LOCK_S:
        lock.unlink(missing_ok=True)
    else:
        warnings.warn(f"waiting for another build of the retrieval kernel ({lock}; remove it if none runs)",
                      stacklevel=2)  # fmt: skip


def _cpu_tag() -> str:
    """A short tag of this CPU's instruction sets and of the source: the build uses ``-march=native``,
    so a cached build must not be loaded on a machine with other instruction sets (a shared home
    directory), nor after the source changed."""

    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags += platform.processor()
    return hashlib.sha1(flags.encode() + b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:8]


def kernel_module(required: bool = False):
    """The compiled module; None if it cannot be built (a warning, once), or an error if ``required``."""
    mod = _build()
    if isinstance(mod, Exception):
        if required:
            raise KernelUnavailableError(
                f'kernel="cpp" but the C++ retrieval kernel could not be built: {mod}'
            ) from mod
        if os.environ.get(KERNEL_ENV) != "0":  # (turned off on purpose: nothing to warn about)
            _warn_once(str(mod))
        return None
    return mod


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"landmark: the C++ kernels are unavailable, using the eager paths ({reason})", stacklevel=3
    )


def kernel_applies(
    dtype: torch.dtype, device: torch.device, memory: BlockMemory | None, compile: bool
) -> bool:
    """Whether a step with queries of ``dtype`` on ``device`` over this memory can take the kernel (the
    selection too for granularity token_head and exact search; else the eager path selects)."""
    if memory is None or compile:
        return False
    if dtype != torch.float32 or memory.dtype != torch.float32:  # block contents: any storage dtype
        return False
    return torch.device(device).type == memory.device.type == memory.storage_device.type == "cpu"


@dataclass
class KernelPlan:
    """What a step through the kernel shares across its layers: the module and the angle table."""

    module: Any  # the compiled extension
    cos_table: Tensor  # (P, D/2) RoPE angles of positions 0..P-1, float32
    sin_table: Tensor
    selects: bool = True  # the kernel selects (token_head, exact search); else it is given a selection


def kernel_plan(module: Any, step: Step, k: int, selects: bool = True) -> KernelPlan:
    """The plan of ``step`` (its local width, block size, head dim and RoPE base) retrieving ``k``
    blocks; ``selects``: whether the kernel selects the blocks itself (else the step passes it a
    selection)."""
    geometry = (k, step.local_width, step.block_size, step.head_dim, step.rope_base)
    cos, sin = rope_table(*geometry, torch.device("cpu"))
    return KernelPlan(module, cos, sin, selects)


def retrieval_step(
    inputs: LayerInputs, step: Step, plan: KernelPlan, selected: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``retrieval_attention`` through the kernel: one call of the compiled module for a layer and step.

    Arguments as in ``retrieval_attention``; ``selected``: (B, H, C, K <= k) logical block indices made
    elsewhere (valid first, ascending, -1 for none), or None: the kernel selects (token_head, exact).
    Returns the (B, H, C, D) outputs and the (B, H, C, K) selected logical block indices (ascending; -1
    where a row has fewer blocks, and on padding rows).
    """
    memory = inputs.memory
    longs = [t.long().contiguous() for t in (step.q_start, step.q_len, step.local_len)]
    count = torch.tensor(memory.count, dtype=torch.long)
    start = torch.tensor(memory.start, dtype=torch.long)
    out, selected = plan.module.retrieval_step(
        inputs.q.contiguous(), longs[0], longs[1], inputs.local_k.contiguous(), inputs.local_v.contiguous(),
        longs[2], memory.landmark_keys, memory.keys, memory.values, count, start,
        _NO_SELECTION if selected is None else selected.long().contiguous(),
        plan.cos_table, plan.sin_table, step.retrieval.k, inputs.scale,
        *(_NO_SCALE if t is None else t for t in (memory.key_scale, memory.value_scale)),
    )  # fmt: skip
    return out, selected


_NO_SELECTION = torch.empty(0, dtype=torch.long)
_NO_SCALE = torch.empty(0)  # block contents stored without scales (not int8)


def rope_table(
    k: int, local_width: int, block_size: int, head_dim: int, base: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos, sin (P, D/2) of positions 0..P-1, enough for a step whose local context is ``local_width``
    positions (every position it uses is below (k + 2) * block_size + local_width); P is rounded up to
    a power of two so that steps of similar sizes share one table."""
    need = (k + 2 + -(-local_width // block_size)) * block_size
    return _rope_table(1 << (need - 1).bit_length(), head_dim, base, device)


@functools.lru_cache(maxsize=16)
def _rope_table(n: int, dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos, sin (n, dim / 2) of positions 0..n-1 (entry p equals ``rope_angles`` of position p)."""
    cos, sin = rope_angles(torch.arange(n, device=device), dim, base)
    return cos.contiguous(), sin.contiguous()
