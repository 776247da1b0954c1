"""The per-layer stream state of retrieval inference, one implementation for every model family.

A ``RetrievalCache`` is what a model's attention layers hand their new queries, keys and values to
when reading or generating with landmark retrieval (docs/method.md). For each layer it keeps

* a ``BlockMemory`` of the complete blocks (keys without absolute positions, contents optionally on a
  slower ``memory_device``, an optional cap with FIFO eviction);
* the incomplete tail block (un-rotated keys and values);
* how many stream positions the layer has seen, per batch row;

and ``attend(layer, q, k, v)`` runs ``retrieval_attention`` of the new positions over the retrieved
blocks, the tail and themselves, chunk by chunk (``chunk_len``; a chunk's complete blocks join the
memory before the next chunk is read), and commits them. What the layers of one step share (rotation
tables, masks, or the fused kernel's plan) is built once per step and reused by every layer.

Both model families use it: ``landmark.model.GPT.forward(ids, cache=...)`` passes its layers' q, k, v
to ``attend``; the Hugging Face adapter (``landmark.hf.LandmarkRetrievalCache``, a transformers
``Cache``) un-rotates what transformers' attention modules computed and calls the same ``attend``.
Geometry (batch, kv heads, head dim, dtype, device) comes from the first tensors a layer sees.

Rows of a batch are independent streams and may differ in length: ``lengths`` (B,) gives the real new
positions of each row (right padding). Queries, keys and values are un-rotated: positions are applied
inside ``retrieval_attention`` (the "stingy" mapping), so they never exceed a few blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import Tensor

from landmark.files import atomic_write, check_output_file, safetensors_metadata
from landmark.inference import graph
from landmark.inference.memory import STORAGE_DTYPES, BlockMemory, MemoryOptions
from landmark.inference.retrieval import RetrievalConfig, StepStats, plan_step, retrieval_attention
from landmark.inference.search import IndexOptions, LandmarkIndex
from landmark.inference.step import LayerInputs, Step
from landmark.resources import check_device

DEFAULT_CHUNK_LEN = 256  # positions per prefill chunk (the paper uses 250 tokens)
MAX_CHUNK_LEN = 2**20  # positions per chunk at most (a chunk's activations are held at once)
STATE_FORMAT = "landmark-stream-state-v1"  # the metadata "format" of a saved state (RetrievalCache.save)


def is_saved_state(path: str | Path) -> bool:
    """Whether ``path`` is a stream state written by :meth:`RetrievalCache.save` (its header's metadata)."""
    meta = safetensors_metadata(path)
    return meta is not None and meta.get("format") == STATE_FORMAT


BLOCK_TENSORS = ("landmark_keys", "keys", "values")
STATE_TENSORS = (*BLOCK_TENSORS, "tail_k", "tail_v", "count", "tail_len")  # per layer
SCALE_TENSORS = ("key_scale", "value_scale")  # per layer, in a state whose blocks are stored as int8


class StateFileError(ValueError):
    """A saved stream state that cannot be loaded here (missing, not a state, damaged, or saved for other
    weights, settings or batch size); the message starts with the file's path."""


def check_state_header(path: str | Path) -> dict[str, str]:
    """The metadata of a saved stream state, from its header alone (before any model is loaded).

    Raises:
        StateFileError: ``path`` is missing, not a safetensors file, or not a saved landmark stream state.
    """
    path = Path(path)
    if not path.is_file():
        raise StateFileError(f"{path}: no saved state there")
    meta = safetensors_metadata(path)
    if meta is None:
        raise StateFileError(f"{path} is not a readable safetensors file (a state written by --save-state)")
    if meta.get("format") != STATE_FORMAT:
        raise StateFileError(f"{path} is not a saved landmark stream state (format {meta.get('format')!r})")
    return meta


def check_state_tensors(tensors: dict[str, Tensor], n_layers: int, block_size: int) -> None:
    """A saved state's tensors as :meth:`RetrievalCache.save` writes them: every one present, no other,
    shapes and dtypes consistent across layers, counts and lengths in range. A ValueError names the
    first that is not (an edited file must not load into a cache that then fails mid-read)."""
    per_layer = STATE_TENSORS + (SCALE_TENSORS if "layer0.key_scale" in tensors else ())
    names = {f"layer{i}.{t}" for i in range(n_layers) for t in per_layer} | {"length"}
    if set(tensors) != names:
        missing, extra = sorted(names - set(tensors))[:3], sorted(set(tensors) - names)[:3]
        raise ValueError(f"tensors missing {missing}, unexpected {extra}")
    length = tensors["length"]
    batch, heads, _, dim = tensors["layer0.tail_k"].shape
    _need(_counts(length, batch, 0, None), "length must be (streams,) integers >= 0")
    for i in range(n_layers):
        _check_layer_state({name: tensors[f"layer{i}.{name}"] for name in per_layer},
                           f"layer {i}", (batch, heads, dim), block_size, length)  # fmt: skip
        for name in ("count", "tail_len"):  # every layer read the same positions
            same = torch.equal(tensors[f"layer{i}.{name}"], tensors[f"layer0.{name}"])
            _need(same, f"layer {i}: {name} differs from layer 0's (every layer reads the same positions)")
    tail_len = tensors["layer0.tail_len"]
    _need(bool(((length - tail_len) % block_size == 0).all()), "length is not whole blocks plus the tail")


def _check_layer_state(t: dict[str, Tensor], where: str, bhd: tuple, block_size: int, length: Tensor) -> None:
    """One layer's saved tensors (see :func:`check_state_tensors`); ``bhd``: (streams, kv heads, head dim)."""
    (batch, heads, dim), lk = bhd, t["landmark_keys"]
    n = lk.shape[2] if lk.dim() == 4 else -1
    data = [lk, t["tail_k"], t["tail_v"]]
    _need(all(x.is_floating_point() and x.dtype == lk.dtype for x in data), f"{where}: dtypes differ")
    stored = t["keys"].dtype
    scaled = "key_scale" in t
    known = stored in (lk.dtype, *STORAGE_DTYPES) and (stored == torch.int8) == scaled
    _need(
        t["values"].dtype == stored and known,
        f"{where}: keys and values must share one storage dtype, the landmark keys' or one of "
        f"{', '.join(str(d).removeprefix('torch.') for d in STORAGE_DTYPES)} "
        f"(int8 with scales); got {stored} and {t['values'].dtype}",
    )
    shapes = {
        "landmark_keys": (batch, heads, n, dim),
        "keys": (batch, heads, n, dim, block_size),
        "values": (batch, heads, n, block_size - 1, dim),
        "tail_k": (batch, heads, t["tail_k"].shape[2], dim),
        "tail_v": (batch, heads, t["tail_k"].shape[2], dim),
        **({"key_scale": (batch, heads, n), "value_scale": (batch, heads, n)} if scaled else {}),
    }
    for name, shape in shapes.items():
        _need(tuple(t[name].shape) == shape, f"{where}: {name} has shape {tuple(t[name].shape)}, not {shape}")
        finite = not t[name].is_floating_point() or bool(torch.isfinite(t[name]).all())
        _need(finite, f"{where}: {name} holds values that are not finite numbers (a damaged file)")
    count, tail_len = t["count"], t["tail_len"]
    _need(_counts(count, batch, 0, n), f"{where}: count must be (streams,) integers in [0, {n}]")
    top = min(block_size - 1, t["tail_k"].shape[2])
    _need(_counts(tail_len, batch, 0, top), f"{where}: tail_len must be (streams,) integers in [0, {top}]")
    _need(bool((count * block_size + tail_len <= length).all()), f"{where}: more positions than length")


def _counts(x: Tensor, batch: int, low: int, high: int | None) -> bool:
    """Whether ``x`` is (batch,) integers in [low, high] (no upper bound when ``high`` is None)."""
    if tuple(x.shape) != (batch,) or x.is_floating_point() or x.dtype == torch.bool:
        return False
    return bool((x >= low).all()) and (high is None or bool((x <= high).all()))


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class StateFiles:
    """Read once, ask many: the saved state a generation continues, and where it saves its own.

    ``load``: a state saved earlier (a long document read once); the prompts continue it (a question
    about the document). ``save``: once the prompts are read, the state is saved here (before any
    generated token), so that later calls can load it instead of reading the prompts again; checked
    before any work (:func:`check_state_destination`). ``overwrite``: replace an existing ``save`` file
    that is not a saved state (never the ``load`` file).
    """

    load: str | Path | None = None
    save: str | Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("load", "save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str | os.PathLike):
                raise TypeError(f"StateFiles.{name} must be a file path (str or Path) or None; got {value!r}")

    def check(self, reads=()) -> None:
        """Refuse, before any work, a ``save`` destination that would lose data (ValueError); ``reads``:
        (file or folder, description) of what else the run reads (the model's folders)."""
        if self.save is not None:
            check_state_destination(self.save, self.overwrite, [(self.load, "the load_state file"), *reads])


def check_state_destination(
    path: str | Path, overwrite: bool = False, reads=(), option: str = "save_state"
) -> Path:
    """Where a state may be saved, checked before any work (:func:`landmark.files.check_output_file`):
    not a folder, not a file the run reads, never a safetensors file that is not a saved state (a
    model's weights, a delta: the Python API does not know which files its model came from), and any
    other existing file only if it is a saved state already (or ``overwrite``); never a file of the
    folders in ``reads`` (the loaders note a model's folders: :func:`landmark.files.model_sources`).
    One-line ValueErrors naming ``option``."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"{option} must be a file path (str or Path); got {path!r}")
    path = check_output_file(
        path, option, kind="a saved state", is_kind=is_saved_state, reads=reads, overwrite=overwrite
    )  # (stat errors named first)
    meta = safetensors_metadata(path) if path.is_file() else None
    if meta is not None and meta.get("format") != STATE_FORMAT:
        raise ValueError(
            f"{option} {path} holds tensors that are not a saved state (a model's weights or a delta?): it "
            "is never replaced, even with overwrite; give a new file name"
        )
    return path


class _Layer:
    """One layer's state: memory, tail block, tail lengths and stream lengths per row."""

    def __init__(self, memory: BlockMemory, tail_k: Tensor, tail_v: Tensor) -> None:
        self.memory = memory
        self.tail_k, self.tail_v = tail_k, tail_v  # (B, Hkv, block_size, D) un-rotated
        batch = tail_k.shape[0]
        self.tail_len = torch.zeros(batch, dtype=torch.long, device=tail_k.device)
        self.length = torch.zeros(batch, dtype=torch.long)  # stream positions seen, per row (CPU)


@dataclass(frozen=True)
class CacheOptions:
    """How a retrieval cache reads and keeps its streams (beside the :class:`RetrievalConfig`).

    Args:
        chunk_len: positions read at once inside ``attend`` (>= the model's block size, at most
            ``MAX_CHUNK_LEN``).
        memory_device: where block contents live (default: next to the keys), e.g. ``"cpu"``.
        max_blocks: cap on blocks per stream and layer (None: unlimited).
        evict: at the cap, drop the oldest block (FIFO) or raise ``MemoryFullError``.
    """

    chunk_len: int = DEFAULT_CHUNK_LEN
    memory_device: torch.device | str | None = None
    max_blocks: int | None = None
    evict: bool = True

    def __post_init__(self) -> None:
        chunk = self.chunk_len
        if isinstance(chunk, bool) or not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK_LEN:
            raise ValueError(f"chunk_len must be an integer in [1, {MAX_CHUNK_LEN:,}]; got {chunk!r}")
        blocks = self.max_blocks
        if blocks is not None and (isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1):
            raise ValueError(f"max_blocks must be >= 1 or None (unlimited); got {blocks!r}")
        if self.memory_device is not None:
            check_device(self.memory_device, "memory_device")
            object.__setattr__(self, "memory_device", torch.device(self.memory_device))

    @classmethod
    def pick(cls, fields: dict) -> tuple[CacheOptions, dict]:
        """The cache options among keyword ``fields`` (by name), and the other fields."""
        names = cls.__dataclass_fields__
        mine = {name: value for name, value in fields.items() if name in names}
        return cls(**mine), {name: value for name, value in fields.items() if name not in names}


class RetrievalCache:
    """Block memories and tails of every layer for a batch of independent streams.

    Args:
        n_layers: attention layers of the model.
        block_size: positions per block, landmark included.
        rope_base: the model's RoPE base (retrieval re-applies rotations at the stingy positions).
        retrieval: k, granularity, search, kernel (default ``RetrievalConfig()``).
        options: chunk length, where block contents live, a block cap (default ``CacheOptions()``).
    """

    def __init__(
        self,
        n_layers: int,
        *,
        block_size: int,
        rope_base: float,
        retrieval: RetrievalConfig | None = None,
        options: CacheOptions | None = None,
    ) -> None:
        retrieval = retrieval if retrieval is not None else RetrievalConfig()
        if not isinstance(retrieval, RetrievalConfig):
            raise ValueError(f"retrieval must be a landmark.inference.RetrievalConfig; got {retrieval!r}")
        options = options if options is not None else CacheOptions()
        if not isinstance(options, CacheOptions):
            raise ValueError(f"options must be a landmark.inference.CacheOptions; got {options!r}")
        if options.chunk_len < block_size:
            raise ValueError(
                f"chunk_len ({options.chunk_len}) must be at least one block (block_size = {block_size})"
            )
        self.n_layers, self.block_size, self.rope_base = n_layers, block_size, float(rope_base)
        self.retrieval, self.options, self.chunk_len = retrieval, options, options.chunk_len
        self.layers: list[_Layer | None] = [None] * n_layers
        self.stats = StepStats()
        self._plan_key: tuple | None = None
        self._plan = None

    # -- what the drivers read ---------------------------------------------------------------------

    @property
    def memories(self) -> list[BlockMemory]:
        """The layers' block memories (layers that have seen nothing yet are left out)."""
        return [layer.memory for layer in self.layers if layer is not None]

    def seq_length(self, layer: int = 0) -> Tensor:
        """(B,) stream positions a layer has seen (zeros before the first step; CPU int64)."""
        state = self.layers[layer]
        return state.length.clone() if state is not None else torch.zeros(0, dtype=torch.long)

    @property
    def batch_size(self) -> int | None:
        state = self.layers[0]
        return None if state is None else state.tail_k.shape[0]

    # -- the layer call ----------------------------------------------------------------------------

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        lengths: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        """Retrieval attention of a layer's new positions, which then join its stream state.

        Args:
            layer: the layer index.
            q: (B, H, T, D) un-rotated queries of the new positions; k, v: (B, Hkv, T, D) un-rotated.
            lengths: (B,) real new positions per row (default: all T); the rest is right padding.
            scale: score scale (default ``D ** -0.5``).

        Returns:
            (B, H, T, D) attention outputs (padding positions are zero).
        """
        batch, _, t, head_dim = q.shape
        state = self._state(layer, k)
        if state.tail_k.shape[0] != batch:
            raise ValueError(f"this cache holds {state.tail_k.shape[0]} streams; got a batch of {batch}")
        lengths = torch.full((batch,), t) if lengths is None else lengths.cpu().long()
        scale = scale if scale is not None else head_dim**-0.5
        state.memory.reserve(max((state.length + lengths).tolist()) // self.block_size)  # host integers
        if t <= self.chunk_len:
            return self._attend_chunk(state, q, k, v, lengths, scale)
        out = q.new_zeros(q.shape)
        for c0 in range(0, t, self.chunk_len):
            c1 = min(t, c0 + self.chunk_len)
            part = (lengths - c0).clamp(0, c1 - c0)
            out[:, :, c0:c1] = self._attend_chunk(
                state, q[:, :, c0:c1], k[:, :, c0:c1], v[:, :, c0:c1], part, scale
            )
        return out

    def prepare(
        self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        """Create every layer's (empty) state now rather than at its first ``attend``."""
        probe = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        for layer in range(self.n_layers):
            self._state(layer, probe)

    def reserve(self, blocks: int) -> None:
        """Make room for ``blocks`` blocks per stream in every layer that exists (a long input known in
        advance is then stored in one allocation, without doubling and copying)."""
        for state in self.layers:
            if state is not None:
                state.memory.reserve(blocks)

    def _state(self, layer: int, k: Tensor) -> _Layer:
        """The layer's state, created from the first keys it sees (batch, kv heads, head dim, dtype)."""
        state = self.layers[layer]
        if state is None:
            batch, kv_heads, _, head_dim = k.shape
            index = None
            if self.retrieval.search == "faiss":
                options = IndexOptions(approx_min_blocks=self.retrieval.approx_min_blocks)
                index = LandmarkIndex(batch, kv_heads, head_dim, options)
            folder = self.retrieval.block_folder
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
            o, dtype = self.options, self.retrieval.storage_dtype
            options = MemoryOptions(o.memory_device, o.max_blocks, o.evict, dtype, folder)
            memory = BlockMemory((batch, kv_heads, self.block_size, head_dim), rope_base=self.rope_base,
                                 dtype=k.dtype, device=k.device, options=options, index=index)  # fmt: skip
            tail_k = k.new_zeros(batch, kv_heads, self.block_size, head_dim)
            state = self.layers[layer] = _Layer(memory, tail_k, torch.zeros_like(tail_k))
        return state

    def _attend_chunk(
        self, state: _Layer, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float
    ) -> Tensor:
        """retrieval_attention of one chunk (at most ``chunk_len`` new positions); commit it."""
        if self.retrieval.takes_graph(q.dtype, q.device, state.memory):
            return self._attend_graph(state, q, k, v, lengths, scale)
        local_k, local_v, local_len = self._local(state, k, v, lengths)
        inputs = LayerInputs(q, local_k, local_v, state.memory, scale)
        lengths_dev = (local_len, state.tail_len, lengths.to(q.device))
        step = Step.of(inputs, lengths_dev, self.retrieval, self.block_size, self.rope_base)
        out = retrieval_attention(inputs, step, self.stats, self._step_plan(state, step, lengths, q.dtype))
        self._commit(state, local_k, local_v, local_len)
        state.length += lengths
        return out

    def _attend_graph(
        self, state: _Layer, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor, scale: float
    ) -> Tensor:
        """The chunk through ``landmark.inference.graph``: a fixed sequence of tensor operations."""
        memory = state.memory
        host = graph.HostStep(
            tail=(state.length % self.block_size).tolist(), new=lengths.tolist(), rows=q.shape[2],
            count=list(memory.count), start=list(memory.start), capacity=memory.capacity,
        )  # fmt: skip
        key = ("graph", host, q.dtype, q.device, scale)
        if key != self._plan_key:
            self._plan = graph.graph_step(host, self.retrieval, memory, q, scale, self.rope_base)
            self._plan_key = key
        step: graph.GraphStep = self._plan
        graph.claim_blocks(step, memory)
        layer_step = graph.compiled_layer_step() if self.retrieval.compile else graph.layer_step
        tail = (state.tail_k, state.tail_v)
        out, selected, tail, pending = layer_step(
            q, (k, v), tail, graph.memory_tensors(memory), step.plan, step.config
        )
        if pending is not None:  # block contents kept on another device
            memory.write(step.plan.writes[0], step.plan.writes[2], *pending)  # (repeated writes: the same)
        graph.count_reads(self.stats, step, q.shape[1], selected)
        state.tail_k, state.tail_v = tail
        state.tail_len = step.tail_len
        state.length += lengths
        return out

    def _step_plan(self, state: _Layer, step: Step, lengths: Tensor, dtype: torch.dtype):
        """What the layers of one step share (``plan_step``), built by the first layer and reused by the
        others (every layer reads the same chunk with the same tails and memory sizes)."""
        key = (
            tuple(state.memory.count),
            tuple(state.length.tolist()),
            tuple(lengths.tolist()),
            step.local_width,
        )
        if key != self._plan_key:
            self._plan = None
            if any(n > 0 for n in lengths.tolist()):
                self._plan = plan_step(step, state.memory, dtype)
            self._plan_key = key
        return self._plan

    def _local(self, state: _Layer, k: Tensor, v: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tail block + new positions per row: (B, Hkv, T, D) keys and values, (B,) real lengths."""
        bs = self.block_size
        tails = state.tail_len.tolist()
        local_len = state.tail_len + lengths.to(state.tail_len.device)
        if len(set(tails)) == 1 and bool((lengths == k.shape[2]).all()):  # one tail length, no padding
            local_k = torch.cat((state.tail_k[:, :, : tails[0]], k), dim=2)
            local_v = torch.cat((state.tail_v[:, :, : tails[0]], v), dim=2)
            return local_k, local_v, local_len
        t = int(local_len.max())
        j = torch.arange(t, device=k.device)[None, :]
        tail_len = state.tail_len[:, None]
        src = torch.where(j < tail_len, j, bs + j - tail_len)
        src = src.clamp(0, bs + k.shape[2] - 1)[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        local_k = torch.cat((state.tail_k, k), dim=2).gather(2, src)
        local_v = torch.cat((state.tail_v, v), dim=2).gather(2, src)
        return local_k, local_v, local_len

    def _commit(self, state: _Layer, local_k: Tensor, local_v: Tensor, local_len: Tensor) -> None:
        """Move the complete blocks of the local context to memory; keep the rest as the new tail."""
        bs = self.block_size
        counts = local_len.tolist()
        tails = state.tail_len.tolist()
        if len(set(counts)) == 1 and counts[0] < bs and len(set(tails)) == 1:  # no block completes
            state.tail_k[:, :, tails[0] : counts[0]] = local_k[:, :, tails[0] : counts[0]]
            state.tail_v[:, :, tails[0] : counts[0]] = local_v[:, :, tails[0] : counts[0]]
        else:
            for b, n in enumerate(counts):
                full = n // bs
                if full:
                    kb = local_k[b, :, : full * bs].unflatten(1, (full, bs))  # (Hkv, full, bs, D)
                    vb = local_v[b, :, : full * bs].unflatten(1, (full, bs))
                    state.memory.append(b, kb, vb)
                rest = n - full * bs
                state.tail_k[b, :, :rest] = local_k[b, :, full * bs : n]
                state.tail_v[b, :, :rest] = local_v[b, :, full * bs : n]
        state.tail_len = local_len % bs

    # -- read once, ask many: the state on disk -----------------------------------------------------

    def save(
        self, path: str | Path, model_id: str, *, overwrite: bool = False, weights: str = "model", reads=()
    ) -> None:
        """Write every layer's state (block memory in logical order, tail, lengths) to ``path``
        (safetensors, written to a temporary file and renamed: never half-written).

        Args:
            model_id: identifies the weights (``landmark.fingerprint.weights_fingerprint``); ``load``
                refuses a state saved for other weights.
            overwrite: replace an existing file that is not a saved state (an earlier state is always
                replaced).
            reads: (file or folder, description) of what the run reads (the model's folders): never
                replaced, even with ``overwrite``.

        Raises:
            ValueError: ``path`` is a folder, its folder is missing, or it is an existing file other
                than a saved state (without ``overwrite``); nothing is written then.
        """

        path = check_state_destination(path, overwrite, reads)
        states = self._filled_states("save")
        first = states[0]
        if len({tuple(st.length.tolist()) for st in states}) != 1:
            raise ValueError("the layers are in the middle of a step: save between steps")
        tensors: dict[str, Tensor] = {}
        for i, st in enumerate(states):
            tensors.update({f"layer{i}.{name}": t for name, t in st.memory.logical_blocks().items()})
            tensors[f"layer{i}.tail_k"] = st.tail_k.cpu()
            tensors[f"layer{i}.tail_v"] = st.tail_v.cpu()
            tensors[f"layer{i}.count"] = torch.tensor(st.memory.count, dtype=torch.long)
            tensors[f"layer{i}.tail_len"] = st.tail_len.cpu().clone()  # layers may share one (graph path)
        tensors["length"] = first.length.clone()
        meta = {
            "format": STATE_FORMAT,
            "model": model_id,
            "weights": weights,
            **{key: str(value) for key, value in self._geometry(first).items()},
        }
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def load(
        self,
        path: str | Path,
        model_id: str,
        device: torch.device | str | None = None,
        *,
        batch: int | None = None,
        dtype: torch.dtype | None = None,
        weights: str = "model",
    ) -> None:
        """Restore a state written by ``save`` into this cache, which must not have read anything yet;
        it is changed only once the file has passed every check.

        Args:
            batch, dtype: when given, the streams and dtype the state must have.

        Raises:
            StateFileError: the file is missing or not a saved state, or it was saved for other weights or
                another block size, RoPE base, layer count, batch size or dtype (the message says which).
        """

        path = Path(path)
        if any(st is not None and bool((st.length > 0).any()) for st in self.layers):
            raise ValueError("load needs a cache that has read nothing yet (a new session)")
        meta = check_state_header(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
        except SafetensorError as err:
            raise StateFileError(f"{path} is not a readable safetensors file: {err}") from None
        saved = meta.get("weights", "model")
        if saved != weights:  # (the fingerprints differ too: say why)
            raise StateFileError(
                f"{path} was saved by the model with {saved} weights; this one has {weights} weights "
                f"(--weights {saved} reads it)"
            )
        if meta.get("model") != model_id:
            raise StateFileError(
                f"{path} was saved for other weights (fingerprint {meta.get('model')}; this model's is "
                f"{model_id}): read the document again with this model"
            )
        want = {"n_layers": self.n_layers, "block_size": self.block_size, "rope_base": self.rope_base}
        for key, value in want.items():
            if meta.get(key) != str(value):
                raise StateFileError(f"{path} was saved with {key} = {meta.get(key)}; this model has {value}")
        try:
            check_state_tensors(tensors, self.n_layers, self.block_size)
        except ValueError as err:
            raise StateFileError(f"{path} is a damaged saved state: {err}") from None
        tail = tensors["layer0.tail_k"]
        described = {"batch": tail.shape[0], "kv_heads": tail.shape[1], "head_dim": tail.shape[3],
                     "dtype": tail.dtype}  # fmt: skip
        for key, value in described.items():  # the header describes the tensors it holds
            if meta.get(key) != str(value):
                raise StateFileError(f"{path} is a damaged saved state: its header says {key} = "
                                     f"{meta.get(key)!r}, its tensors {value}")  # fmt: skip
        if batch is not None and tail.shape[0] != batch:
            raise StateFileError(f"{path} holds {tail.shape[0]} streams; this session has {batch}")
        if dtype is not None and tail.dtype != dtype:
            raise StateFileError(f"{path} was saved in {tail.dtype}; the model runs in {dtype}")
        device = device if device is not None else "cpu"
        self.layers = [None] * self.n_layers
        self.prepare(tail.shape[0], tail.shape[1], tail.shape[3], tail.dtype, device)
        for i, st in enumerate(self.layers):
            saved = {name: tensors[f"layer{i}.{name}"] for name in (*BLOCK_TENSORS, *SCALE_TENSORS)
                     if f"layer{i}.{name}" in tensors}  # fmt: skip
            st.memory.restore(tensors[f"layer{i}.count"].tolist(), saved)
            st.tail_k.copy_(tensors[f"layer{i}.tail_k"])
            st.tail_v.copy_(tensors[f"layer{i}.tail_v"])
            st.tail_len = tensors[f"layer{i}.tail_len"].to(st.tail_len.device)
            st.length = tensors["length"].clone()

    def _filled_states(self, what: str) -> list[_Layer]:
        if any(st is None for st in self.layers) or not any(
            bool((st.length > 0).any()) for st in self.layers
        ):
            raise ValueError(f"nothing to {what}: the cache has not read anything yet")
        return self.layers  # type: ignore[return-value]

    def _geometry(self, state: _Layer) -> dict:
        batch, kv_heads, _, head_dim = state.tail_k.shape
        return {
            "n_layers": self.n_layers, "block_size": self.block_size, "rope_base": self.rope_base,
            "batch": batch, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(state.tail_k.dtype),
        }  # fmt: skip

    def reset(self) -> None:
        """Forget every stream (the cache can then serve a new batch)."""
        self.layers = [None] * self.n_layers
        self.stats = StepStats()
        self._plan_key = self._plan = None


def check_landmark_positions(
    ids: Tensor, lengths: Tensor, start: Tensor, block_size: int, landmark_id: int
) -> None:
    """Raise ValueError unless the landmark token sits exactly at the stream positions
    ``p % block_size == block_size - 1`` of the real positions of ``ids`` (B, C), rows starting at
    stream positions ``start`` (B,) with ``lengths`` (B,) real positions each."""
    bs, lm = block_size, landmark_id
    if ids.shape[1] <= 2:  # a decode step: in Python, cheaper than tensor operations
        for b, (row, n, s) in enumerate(zip(ids.tolist(), lengths.tolist(), start.tolist())):
            for t, token in enumerate(row[:n]):
                if ((s + t) % bs == bs - 1) != (token == lm):
                    _landmark_error(b, s + t, token, bs)
        return
    pos = start.cpu()[:, None] + torch.arange(ids.shape[1])[None, :]
    real = torch.arange(ids.shape[1])[None, :] < lengths.cpu()[:, None]
    should = (pos % bs == bs - 1).to(ids.device)
    bad = real.to(ids.device) & (should != (ids == lm))
    if bad.any():
        b, t = (int(x) for x in bad.nonzero()[0])
        _landmark_error(b, int(pos[b, t]), int(ids[b, t]), bs)


def _landmark_error(row: int, position: int, token: int, bs: int) -> None:
    raise ValueError(
        f"row {row}, stream position {position}: landmarks must sit exactly at positions "
        f"p % {bs} == {bs - 1} (use insert_landmarks); found token {token}"
    )
