"""Block memory: the keys and values of every complete earlier block, per layer.

For each batch row the memory holds ``count[b]`` complete blocks in chronological order (logical index
0 = oldest). Per block it keeps the landmark key apart from the block's contents:

* ``landmark_keys``: (B, Hkv, capacity, D), un-rotated, on the model's device: scored against every
  query (the scan rotates the query, not the N landmark keys);
* ``keys``: (B, Hkv, capacity, D, block_size), key-major inside a block (a query's scores against a
  block are one vector-matrix product), and ``values``: (B, Hkv, capacity, block_size - 1, D), the
  block's contents, on ``storage_device`` (CPU RAM while the model runs on CUDA, for example);
  only the blocks that retrieval selects are copied to the model's device.

Keys carry no position: a block's key at offset ``j`` inside the block (its landmark at
``block_size - 1``) is stored rotated by RoPE for position ``j`` only, which is the same wherever the
block is later placed. Retrieval places a block at slot ``s`` (positions ``s * bs + j``) by rotating
the query by ``-s * bs`` instead (RoPE is relative: ``R(a) q . R(b) k = q . R(b - a) k``), so a
retrieved block is used as it is stored, with no copy or rotation of its keys. ``raw_keys`` undoes
the offsets (for inspection and tests).

Capacity is unlimited by default (storage doubles as needed). With ``max_blocks`` set, a full row
evicts its oldest block first-in-first-out when ``evict`` is true, and raises ``MemoryFullError``
otherwise. Storage is a ring buffer per row: logical block ``i`` lives at physical slot
``(start[b] + i) % capacity``.

Optionally (``index``, a ``landmark.inference.search.LandmarkIndex``) the memory also keeps a
nearest-neighbour index over the landmark keys up to date: every append adds the new landmark keys to
it and tells it how many of the row's blocks have been evicted so far (blocks are numbered by
``sequence = evicted[b] + logical index``, which never changes while a block is held).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import math
import mmap
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from landmark.model import apply_rope, rope_angles
from landmark.resources import check_fits

if TYPE_CHECKING:
    from landmark.inference.search import LandmarkIndex


# A memory-mapped block memory hands the pages it touched back to the OS page cache every this many
# writes (one write per chunk read, or per block completed while generating): the process then keeps
# resident only what recent steps wrote and read, not every page it ever touched.
RELEASE_EVERY_WRITES = 16


def release_pages(tensor: Tensor) -> None:
    """Unmap the resident pages of a tensor mapped from a shared file (``torch.from_file(shared=True)``)
    from this process: the data stays in the file and the page cache and is mapped back on the next
    access (``madvise(MADV_DONTNEED)``, which keeps the contents of shared file mappings). Linux only;
    elsewhere nothing is done."""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_DONTNEED"):
        return
    storage = tensor.untyped_storage()
    start = storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    length = storage.data_ptr() + storage.nbytes() - start
    if _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), mmap.MADV_DONTNEED) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"madvise: {os.strerror(code)}")


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, with ``madvise``'s argument types declared."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc


class MemoryFullError(ValueError):
    """Raised when a block does not fit a capped memory that may not evict."""


@dataclass(frozen=True)
class MemoryOptions:
    """Where a block memory keeps its block contents and how many blocks it holds per row."""

    storage_device: torch.device | str | None = None  # block contents (default: next to the keys)
    max_blocks: int | None = None  # cap per row (None: unlimited)
    evict: bool = True  # a full row drops its oldest block (else MemoryFullError)
    # the block contents' dtype (None: the keys'): float32, float16, bfloat16, or int8 with one scale per
    # block, kv head and keys|values; landmark keys keep the keys' dtype (the selection reads them)
    storage_dtype: torch.dtype | None = None
    # block contents in memory-mapped files in this folder (CPU storage): pages the OS may write out
    # and drop, so that a memory larger than RAM fits; the files are unlinked at once (nothing is
    # left behind) and their space is freed with the memory
    storage_folder: str | os.PathLike | None = None


STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8)
INT8_LEVELS = 127.0  # int8 blocks: x = round(x / scale) * scale with scale = max |x| / INT8_LEVELS


class BlockStore(NamedTuple):
    """A memory's block contents as stored: keys (B, Hkv, capacity, D, bs) and values (B, Hkv, capacity,
    bs - 1, D); int8 storage adds one float32 scale per (row, kv head, slot) for each (else None)."""

    keys: Tensor
    values: Tensor
    key_scale: Tensor | None = None
    value_scale: Tensor | None = None


class BlockMemory:
    """Complete blocks of one attention layer for a batch of independent streams."""

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        *,
        rope_base: float,
        dtype: torch.dtype,
        device: torch.device | str,
        options: MemoryOptions | None = None,
        index: LandmarkIndex | None = None,
    ):
        """``shape``: (batch rows, kv heads, block size, head dim); ``options``: where the block contents
        live and the cap (``MemoryOptions``; default: next to the keys, unlimited)."""
        options = options if options is not None else MemoryOptions()
        storage_device, max_blocks, evict = options.storage_device, options.max_blocks, options.evict
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1 or None (unlimited); got {max_blocks}")
        if options.storage_dtype not in (None, *STORAGE_DTYPES):
            raise ValueError(
                f"storage_dtype must be one of {STORAGE_DTYPES} or None; got {options.storage_dtype!r}"
            )
        self.storage_dtype = options.storage_dtype or dtype
        self.storage_folder = None if options.storage_folder is None else Path(options.storage_folder)
        batch, kv_heads, block_size, head_dim = shape
        self.batch, self.kv_heads, self.block_size, self.head_dim = batch, kv_heads, block_size, head_dim
        self.dtype, self.device = dtype, torch.device(device)
        self.storage_device = torch.device(storage_device) if storage_device is not None else self.device
        if options.storage_folder is not None and self.storage_device.type != "cpu":
            raise ValueError(
                f"a storage folder holds block contents in CPU memory; the storage device is "
                f"{self.storage_device}"
            )
        self.rope_base = rope_base
        # RoPE angles (float32) of the in-block offsets 0..block_size-1: (block_size, D/2)
        self._cos, self._sin = rope_angles(torch.arange(block_size, device=self.device), head_dim, rope_base)
        self.max_blocks, self.evict = max_blocks, evict
        self.count = [0] * batch  # blocks held per row
        self.start = [0] * batch  # ring-buffer start per row
        self.evicted = [0] * batch  # blocks evicted so far per row (sequence number of logical block 0)
        self.index = index
        self.capacity = self._writes = 0
        self.landmark_keys = self.keys = self.values = self.key_scale = self.value_scale = None
        self._allocate(min(16, max_blocks or 16))

    def _allocate(self, capacity: int) -> None:
        """Grow the storage to ``capacity`` blocks, keeping every row's blocks in logical order."""
        b, h, d, n = self.batch, self.kv_heads, self.head_dim, self.block_size - 1
        if self.storage_folder is None:  # (a mapped file takes disk, not memory)
            item = torch.empty(0, dtype=self.storage_dtype).element_size()
            contents = b * h * capacity * (2 * n + 1) * d * item  # keys (n + 1 slots) and values (n)
            check_fits(contents, f"{capacity:,} blocks per stream", "the block memory of one layer",
                       self.storage_device)  # fmt: skip
        lk = torch.zeros(b, h, capacity, d, dtype=self.dtype, device=self.device)
        new = BlockStore(
            self._zeros((b, h, capacity, d, n + 1), self.storage_dtype),
            self._zeros((b, h, capacity, n, d), self.storage_dtype),
            *([self._zeros((b, h, capacity), torch.float32) for _ in "kv"] if self.quantized else []),
        )
        if self.capacity:
            for row in range(b):
                idx = self.physical(row, torch.arange(self.count[row]))
                lk[row, :, : self.count[row]] = self.landmark_keys[row, :, idx.to(self.device)]
                for t, old in zip(new, self.blocks):
                    if t is not None:
                        t[row, :, : self.count[row]] = old[row, :, idx.to(self.storage_device)]
            self.start = [0] * b
        self.landmark_keys, self.capacity = lk, capacity
        self.keys, self.values, self.key_scale, self.value_scale = new
        self.release_pages()  # (the copy touched every page of the new files)

    def _zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """A zero tensor for block contents: on the storage device, or mapped from a new file in the
        storage folder (unlinked at once: the mapping keeps it until the tensor is freed)."""
        if self.storage_folder is None:
            return torch.zeros(shape, dtype=dtype, device=self.storage_device)
        fd, name = tempfile.mkstemp(prefix="landmark-blocks-", suffix=".bin", dir=self.storage_folder)
        os.close(fd)
        try:
            return torch.from_file(name, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        except RuntimeError as err:  # the file could not grow: a full disk, a file size limit
            found = re.search(r"\((\d+)\)\s*$", str(err))
            code = int(found[1]) if found else errno.EIO
            raise OSError(code, os.strerror(code), str(self.storage_folder)) from None
        finally:
            os.unlink(name)

    def nbytes(self) -> dict[str, int]:
        """Bytes allocated: ``"ram"`` (landmark keys, and block contents unless in a storage folder) and
        ``"disk"`` (block contents mapped from the storage folder)."""
        blocks = sum(t.numel() * t.element_size() for t in self.blocks if t is not None)
        lk = self.landmark_keys.numel() * self.landmark_keys.element_size()
        return (
            {"ram": lk, "disk": blocks}
            if self.storage_folder is not None
            else {"ram": lk + blocks, "disk": 0}
        )

    @property
    def quantized(self) -> bool:
        """Whether block contents are stored as int8 with scales."""
        return self.storage_dtype == torch.int8

    @property
    def blocks(self) -> BlockStore:
        """The block contents as stored."""
        return BlockStore(self.keys, self.values, self.key_scale, self.value_scale)

    def reserve(self, blocks: int) -> None:
        """Make room for at least ``blocks`` blocks per row. Storage grows geometrically (at least
        doubling), so that reserving a little more at every step copies the memory O(log n) times."""
        blocks = min(blocks, self.max_blocks or blocks)
        if blocks > self.capacity:
            self._allocate(min(max(blocks, 2 * self.capacity), self.max_blocks or 2 * blocks))

    def physical(self, row: int, logical: Tensor) -> Tensor:
        """Physical slots of logical block indices of one row."""
        return (logical + self.start[row]) % self.capacity

    def physical_index(self, logical: Tensor) -> Tensor:
        """(B, ...) logical indices -> physical slots, per row."""
        if not any(self.start):  # no row has wrapped around
            return logical
        start = torch.tensor(self.start, device=logical.device).view(-1, *([1] * (logical.dim() - 1)))
        return (logical + start) % self.capacity

    def append(self, row: int, keys: Tensor, values: Tensor) -> None:
        """Add complete blocks to one row.

        Args:
            keys: (Hkv, m, block_size, D) un-rotated keys of m blocks, the landmark's key last.
            values: (Hkv, m, block_size, D); the landmark's value is not stored (it carries no weight).
        """
        m = keys.shape[1]
        kept, slots = self.claim(row, m)
        if slots:
            rows = torch.full((len(slots),), row, device=self.device)
            pick = torch.tensor(kept, device=keys.device)
            self.write(rows, torch.tensor(slots, device=self.device), keys[:, pick].transpose(0, 1),
                       values[:, pick].transpose(0, 1))  # fmt: skip
        if self.index is not None and m:
            self.index.add(row, keys[:, :, -1])
            self.index.forget(row, self.evicted[row], lambda: self.row_landmarks(row))

    def claim(self, row: int, m: int) -> tuple[list[int], list[int]]:
        """Account for ``m`` new blocks of one row on the host: grow the storage if it may, evict the
        oldest blocks first-in-first-out where capped (``MemoryFullError``, before any change, if it may
        not), and say where the new blocks go.

        Returns:
            (kept, slots): the indices (0..m-1) of the new blocks that stay held, and their storage slots
            (distinct; a block evicted by a later block of the same call is left out).
        """
        room = self.max_blocks
        if room is not None and not self.evict and self.count[row] + m > room:
            raise MemoryFullError(
                f"the block memory is full ({room} blocks = {room * self.block_size} positions) and eviction "
                "is off: raise max_blocks, allow eviction, or shorten the input"
            )
        need = self.count[row] + m
        if need > self.capacity and (room is None or self.capacity < room):
            grown = max(need, 2 * self.capacity)
            self._allocate(grown if room is None else min(grown, room))
        kept, slots, count, start = ring_slots(self.count[row], self.start[row], self.capacity, m)
        self.evicted[row] += self.count[row] + m - count
        self.count[row], self.start[row] = count, start
        return kept, slots

    def write(self, rows: Tensor, slots: Tensor, keys: Tensor, values: Tensor) -> None:
        """Store P blocks at the given (row, slot) pairs (slots from ``claim``).

        Args:
            rows, slots: (P,) long, on the model's device.
            keys: (P, Hkv, block_size, D) un-rotated, the landmark's key last; values: (P, Hkv,
                block_size, D), the landmark's value is not stored.
        """
        self.landmark_keys[rows, :, slots] = keys[:, :, -1].to(self.dtype)
        if self.storage_device != self.device:  # landmark keys here, block contents there
            rows, slots = rows.to(self.storage_device), slots.to(self.storage_device)
            keys, values = keys.to(self.storage_device), values.to(self.storage_device)
        store_blocks(self.blocks, (rows, slots), keys, values, self.offset_angles(keys.device))
        if self.storage_folder is not None:
            self._writes += 1
            if self._writes % RELEASE_EVERY_WRITES == 0:
                self.release_pages()

    def release_pages(self) -> None:
        """Hand the block contents' resident pages back to the page cache (a storage folder only; see
        :func:`release_pages`): the process's resident memory then holds only what later steps touch."""
        if self.storage_folder is not None:
            for t in self.blocks:
                if t is not None:
                    release_pages(t)

    def offset_angles(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin (block_size, D/2) of the in-block offsets, on ``device``."""
        if self._cos.device == device:
            return self._cos, self._sin
        return self._cos.to(device), self._sin.to(device)

    def landmarks(self) -> Tensor:
        """(B, Hkv, N, D) landmark keys in logical order, N = max count (rows with fewer are padded)."""
        n = max(self.count)
        if not any(self.start):  # no row has wrapped around: logical order is storage order
            return self.landmark_keys[:, :, :n]
        logical = torch.arange(n, device=self.device).expand(self.batch, n)
        idx = self.physical_index(logical)  # (B, N)
        return self.landmark_keys.gather(
            2, idx[:, None, :, None].expand(-1, self.kv_heads, -1, self.head_dim)
        )

    def row_landmarks(self, row: int) -> Tensor:
        """(Hkv, count[row], D) landmark keys of one row in logical order."""
        idx = self.physical(row, torch.arange(self.count[row], device=self.device))
        return self.landmark_keys[row][:, idx]

    def gather_per_head(self, logical: Tensor) -> tuple[Tensor, Tensor]:
        """Blocks chosen separately for every kv head, moved to the model's device.

        Args:
            logical: (B, Hkv, M) logical block indices (each < count of its row; pad with 0).

        Returns:
            keys: (B, Hkv, M, D, block_size), key-major, rotated by their in-block offsets, the
            landmark's last;
            values: (B, Hkv, M, block_size - 1, D) of the regular tokens. Only these blocks of these
            heads are read and moved.
        """
        keys, values = gather_blocks(self.blocks, self.physical_index(logical), self.dtype)
        return keys.to(self.device), values.to(self.device)

    def raw_keys(self, keys: Tensor) -> Tensor:
        """Stored (offset-rotated, key-major) block keys (..., D, block_size) -> the un-rotated keys
        (..., block_size, D)."""
        keys = keys.transpose(-1, -2)
        return apply_rope(keys, self._cos.to(keys.device), -self._sin.to(keys.device))

    def landmarks_at(self, logical: Tensor) -> Tensor:
        """(B, U) logical indices -> (B, Hkv, U, D) landmark keys."""
        idx = self.physical_index(logical.to(self.device))
        rows = torch.arange(self.batch, device=self.device)[:, None]
        return self.landmark_keys[rows, :, idx].transpose(1, 2)

    def logical_blocks(self) -> dict[str, Tensor]:
        """Every row's blocks in logical order, padded to max(count) blocks (for saving), on the CPU:
        ``landmark_keys`` (B, Hkv, N, D) un-rotated, ``keys`` (B, Hkv, N, D, block_size) and ``values``
        (B, Hkv, N, block_size - 1, D) as stored (their storage dtype), and for int8 storage
        ``key_scale`` and ``value_scale`` (B, Hkv, N)."""
        n = max(self.count)
        logical = torch.arange(n).expand(self.batch, n)
        idx = self.physical_index(logical) if n else logical  # (B, N)
        rows = torch.arange(self.batch)[:, None]
        pick = lambda t: t[rows, :, idx.to(t.device)].transpose(1, 2).cpu()  # noqa: E731
        named = {"landmark_keys": self.landmark_keys, **self.blocks._asdict()}
        return {name: pick(t) for name, t in named.items() if t is not None}

    def restore(self, count: list[int], saved: dict[str, Tensor]) -> None:
        """Replace the content of an empty memory with saved blocks (``logical_blocks``'s tensors,
        ``count[b]`` real blocks in row b), converted to this memory's storage dtype where they were
        saved in another. Block numbering restarts at 0 (``evicted``); the FAISS index, if any, is
        built from the restored landmark keys."""
        landmark_keys = saved["landmark_keys"]
        if len(count) != self.batch or any(c > landmark_keys.shape[2] for c in count):
            raise ValueError("saved block counts do not match the saved blocks")
        if self.max_blocks is not None and max(count, default=0) > self.max_blocks:
            raise ValueError(
                f"the saved state holds {max(count)} blocks per row; max_blocks (--max-blocks) is "
                f"{self.max_blocks}: load it with max_blocks of at least {max(count)}"
            )
        if any(self.count):
            raise ValueError("restore needs an empty memory")
        self.start, self.evicted = [0] * self.batch, [0] * self.batch
        self.reserve(max(max(count, default=0), 1))
        n = landmark_keys.shape[2]
        self.landmark_keys[:, :, :n] = landmark_keys.to(self.device, self.dtype)
        blocks = BlockStore(**{f: saved.get(f) for f in BlockStore._fields})
        if blocks.keys.dtype != self.storage_dtype:  # stored otherwise: through the model's dtype
            blocks = requantized(blocks, self.storage_dtype, self.dtype)
        for t, new in zip(self.blocks, blocks):
            if t is not None:
                t[:, :, :n] = new.to(self.storage_device)
        self.count = list(count)
        if self.index is not None:
            for row, c in enumerate(count):
                if c:
                    self.index.add(row, self.landmark_keys[row, :, :c])

    def nbytes_per_block(self) -> int:
        """Bytes of one block's stored keys (landmark's included) and values, all kv heads: what
        retrieving it for every kv head reads."""
        contents = (2 * self.block_size - 1) * self.head_dim * self.keys.element_size()
        return self.kv_heads * (contents + (8 if self.quantized else 0))  # two float32 scales


def gather_blocks(store: BlockStore, slots: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Blocks chosen separately for every kv head, read where they are stored, in ``dtype``.

    Args:
        store: a memory's block contents (``BlockMemory.blocks``); slots: (B, Hkv, M) storage slots (any
            device).

    Returns:
        (B, Hkv, M, D, block_size) keys and (B, Hkv, M, block_size - 1, D) values, on the storage's
        device (int8 blocks times their scales).
    """
    b, h, m = slots.shape
    capacity, d, n = store.keys.shape[2], store.keys.shape[3], store.keys.shape[4]
    row_head = torch.arange(b * h, device=slots.device).view(b, h, 1) * capacity
    flat = (row_head + slots).view(-1).to(store.keys.device)  # index into (B * Hkv * capacity)
    keys = store.keys.view(-1, d, n).index_select(0, flat).view(b, h, m, d, n).to(dtype)
    values = store.values.view(-1, n - 1, d).index_select(0, flat).view(b, h, m, n - 1, d).to(dtype)
    if store.key_scale is not None:
        keys = keys * store.key_scale.view(-1).index_select(0, flat).view(b, h, m, 1, 1).to(dtype)
        values = values * store.value_scale.view(-1).index_select(0, flat).view(b, h, m, 1, 1).to(dtype)
    return keys, values


def quantize(x: Tensor, dims: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """int8 levels of ``x`` and the float32 scale per entry of the other dimensions (max |x| over
    ``dims`` / INT8_LEVELS; zero blocks get scale 0)."""
    x = x.float()
    scale = x.abs().amax(dim=dims) / INT8_LEVELS
    levels = torch.round(x / scale.clamp_min(1e-30)[(...,) + (None,) * len(dims)]).clamp(
        -INT8_LEVELS, INT8_LEVELS
    )
    return levels.to(torch.int8), scale


def requantized(store: BlockStore, storage_dtype: torch.dtype, dtype: torch.dtype) -> BlockStore:
    """Block contents converted to ``storage_dtype`` (through ``dtype``, the model's)."""
    keys, values = store.keys.to(dtype), store.values.to(dtype)
    if store.key_scale is not None:
        keys = keys * store.key_scale[..., None, None].to(dtype)
        values = values * store.value_scale[..., None, None].to(dtype)
    if storage_dtype != torch.int8:
        return BlockStore(keys.to(storage_dtype), values.to(storage_dtype))
    (keys, key_scale), (values, value_scale) = quantize(keys, (-2, -1)), quantize(values, (-2, -1))
    return BlockStore(keys, values, key_scale, value_scale)


def ring_slots(count: int, start: int, capacity: int, m: int) -> tuple[list[int], list[int], int, int]:
    """Where ``m`` new blocks go in a ring of ``capacity`` slots holding ``count`` blocks from ``start``;
    a full ring drops its oldest block first (first in, first out).

    Returns:
        (kept, slots, count, start): the indices (0..m-1) of the new blocks still held afterwards, their
        slots (distinct), and the ring's new count and start.
    """
    slots = []
    for _ in range(m):
        if count == capacity:
            start, count = (start + 1) % capacity, count - 1
        slots.append((start + count) % capacity)
        count += 1
    kept = min(m, capacity)
    return list(range(m - kept, m)), slots[m - kept :], count, start


def store_blocks(
    store: BlockStore,
    where: tuple[Tensor, Tensor],
    keys: Tensor,
    values: Tensor,
    offset_angles: tuple[Tensor, Tensor],
) -> None:
    """Write P blocks into a memory's block contents in one indexed copy per tensor (landmark keys are
    written by the caller).

    Args:
        store: the memory's ``BlockStore``; where: (P,) rows and (P,) slots the blocks go to.
        keys, values: (P, Hkv, bs, D) un-rotated, the landmark last (its value is not stored);
            offset_angles: cos, sin (bs, D/2) of the in-block offsets.
    """
    rows, slots = where
    rotated = apply_rope(keys, *offset_angles).transpose(-1, -2)  # rotated by the in-block offsets
    values = values[:, :, :-1]
    if store.key_scale is not None:  # int8: one scale per block, kv head and keys|values
        (rotated, key_scale), (values, value_scale) = quantize(rotated, (-2, -1)), quantize(values, (-2, -1))
        store.key_scale[rows, :, slots] = key_scale
        store.value_scale[rows, :, slots] = value_scale
    store.keys[rows, :, slots] = rotated.to(store.keys.dtype)
    store.values[rows, :, slots] = values.to(store.values.dtype)
