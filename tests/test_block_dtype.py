"""Compact block memory (``RetrievalConfig.block_dtype``): block contents stored in float16, bfloat16 or
int8 with a scale per (block, kv head, keys|values), landmark keys as the model makes them; and block
contents in memory-mapped files (``RetrievalConfig.block_folder``).

Exactness is checked against a float memory holding exactly what the compact one represents: the
reference reading an int8 memory equals the reference reading a float32 memory whose blocks are the
int8 levels times their scales (every path reads the same numbers); the fixed graph equals the
reference on compact memories, and so does the fused C++ kernel; saved states keep the compact form and
load into any block dtype.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from inference_helpers import attend

from landmark.inference import BlockMemory, MemoryOptions, RetrievalConfig
from landmark.inference.cache import CacheOptions, RetrievalCache
from landmark.inference.memory import BlockStore, gather_blocks, quantize

BASE = 10000.0
STEPS = [[20, 20, 20], [5, 9, 1], [17, 3, 0], [1, 1, 1], [2, 2, 2], [20, 20, 20], [2, 0, 7], [20, 13, 20]]


def read(kernel, block_dtype, *, max_blocks=None, seed=2, granularity="token_head"):
    retrieval = RetrievalConfig(k=3, kernel=kernel, block_dtype=block_dtype, granularity=granularity)
    cache = RetrievalCache(
        2, block_size=8, rope_base=BASE, retrieval=retrieval, options=CacheOptions(20, max_blocks=max_blocks)
    )
    g = torch.Generator().manual_seed(seed)
    outs = []
    for lens in STEPS:
        width = max(lens)
        q = torch.randn(3, 6, width, 16, generator=g)
        k, v = torch.randn(2, 3, 2, width, 16, generator=g)
        outs += [cache.attend(layer, q, k, v, torch.tensor(lens)) for layer in range(2)]
    return outs, cache


def test_quantize_keeps_every_block_within_half_a_level():
    x = torch.randn(5, 3, 16, 8) * torch.rand(5, 3, 1, 1) * 10
    levels, scale = quantize(x, (-2, -1))
    assert levels.dtype == torch.int8 and scale.shape == (5, 3)
    assert int(levels.abs().max()) == 127  # the largest entry of every block uses the whole range
    assert bool(
        ((levels.float() * scale[..., None, None] - x).abs() <= scale[..., None, None] / 2 + 1e-6).all()
    )
    zero_levels, zero_scale = quantize(torch.zeros(1, 1, 4, 4), (-2, -1))
    assert not zero_levels.any() and not zero_scale.any()


@pytest.mark.parametrize("block_dtype", ["float16", "bfloat16", "int8"])
def test_a_compact_memory_reads_as_the_float_memory_of_its_numbers(block_dtype):
    """A step of the reference over a compact memory equals the same step over a float32 memory holding
    the numbers the compact one represents (int8 levels times their scales): the only difference from
    float32 storage is the rounding of the blocks, which stays small."""
    outs, cache = read("torch", block_dtype)
    memory = cache.memories[0]
    assert memory.keys.dtype == getattr(torch, block_dtype) and memory.quantized == (block_dtype == "int8")
    assert memory.landmark_keys.dtype == torch.float32  # the selection reads full precision
    as_float = BlockMemory((3, 2, 8, 16), rope_base=BASE, dtype=torch.float32, device="cpu")
    as_float.restore(memory.count, memory.logical_blocks())  # converted to float32 storage
    assert as_float.keys.dtype == torch.float32
    g = torch.Generator().manual_seed(5)
    q, local = torch.randn(3, 6, 7, 16, generator=g), torch.randn(2, 3, 2, 10, 16, generator=g)
    lengths = (torch.tensor([10, 9, 10]), torch.tensor([3, 2, 3]), torch.tensor([7, 7, 7]))
    eager = RetrievalConfig(k=3, kernel="torch")
    compact, full = (attend(q, *local, *lengths, m, eager, 8, BASE, 0.25) for m in (memory, as_float))
    assert torch.equal(compact, full)
    float_outs, _ = read("torch", "float32")
    assert 0 < max((a - b).abs().max() for a, b in zip(outs, float_outs)) < 0.05  # the blocks' rounding


@pytest.mark.parametrize("block_dtype", ["bfloat16", "int8"])
@pytest.mark.parametrize("max_blocks", [None, 5], ids=["unlimited", "ring"])
def test_the_graph_reads_compact_memories_like_the_reference(block_dtype, max_blocks):
    ref, ref_cache = read("torch", block_dtype, max_blocks=max_blocks)
    ours, our_cache = read("graph", block_dtype, max_blocks=max_blocks)
    assert max((a - b).abs().max() for a, b in zip(ref, ours)) < 1e-5
    for a, b in zip(ref_cache.memories, our_cache.memories):
        for name, t in a.logical_blocks().items():
            assert torch.equal(t, b.logical_blocks()[name]), name


def test_int8_memory_takes_about_a_quarter_of_float32():
    shape = (1, 3, 64, 64)  # SmolLM2-135M: 3 kv heads of 64, blocks of 64
    full = BlockMemory(shape, rope_base=BASE, dtype=torch.float32, device="cpu")
    small = BlockMemory(shape, rope_base=BASE, dtype=torch.float32, device="cpu",
                        options=MemoryOptions(storage_dtype=torch.int8))  # fmt: skip
    landmark = 3 * 64 * 4  # a block's landmark keys, float32 in both
    ratio = (small.nbytes_per_block() + landmark) / (full.nbytes_per_block() + landmark)
    assert 0.25 < ratio < 0.26


@pytest.mark.parametrize("saved, loaded", [("int8", "int8"), ("int8", "float32"), ("float32", "int8")])
def test_saved_states_keep_the_compact_form_and_load_into_any(tmp_path, saved, loaded):
    _, cache = read("torch", saved)
    path = tmp_path / "state.safetensors"
    cache.save(path, "model-id")
    again = RetrievalCache(2, block_size=8, rope_base=BASE, options=CacheOptions(20),
                           retrieval=RetrievalConfig(k=3, kernel="torch", block_dtype=loaded))  # fmt: skip
    again.load(path, "model-id")
    before, after = cache.memories[0], again.memories[0]
    assert after.keys.dtype == getattr(torch, loaded) and after.count == before.count
    slots = torch.arange(max(before.count)).expand(3, 2, -1)
    expected = gather_blocks(before.blocks, slots, torch.float32)
    got = gather_blocks(after.blocks, slots, torch.float32)
    for e, g in zip(expected, got):
        tol = 0 if saved == loaded or saved == "int8" else float(e.abs().amax()) / 127
        assert (e - g).abs().max() <= tol + 1e-6


def test_bad_block_dtypes_are_refused():
    with pytest.raises(ValueError, match="block_dtype must be one of"):
        RetrievalConfig(block_dtype="int4")
    with pytest.raises(ValueError, match="storage_dtype must be one of"):
        BlockMemory((1, 1, 4, 2), rope_base=BASE, dtype=torch.float32, device="cpu",
                    options=MemoryOptions(storage_dtype=torch.int16))  # fmt: skip
    assert BlockStore(torch.zeros(1), torch.zeros(1)).key_scale is None


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler to build the kernel"
)
@pytest.mark.parametrize("block_dtype", ["float16", "bfloat16", "int8"])
@pytest.mark.parametrize("granularity", ["token_head", "head"])
def test_the_cpu_kernel_reads_compact_blocks_like_the_reference(block_dtype, granularity, one_thread):
    """The fused C++ kernel converts each selected block as it visits it: the reference's outputs, on a
    wrapped ring buffer too."""
    for max_blocks in (None, 5):
        kw = dict(max_blocks=max_blocks, granularity=granularity)
        ref, _ = read("torch", block_dtype, **kw)
        ours, cache = read("cpp", block_dtype, **kw)
        assert cache.retrieval.kernel_for(torch.float32, torch.device("cpu"), cache.memories[0]) is not None
        assert max((a - b).abs().max() for a, b in zip(ref, ours)) < 1e-5


@pytest.mark.parametrize(
    ("block_dtype", "release_every"), [("model", 16), ("int8", 16), ("int8", 1), ("model", 3)]
)
def test_a_memory_mapped_block_folder_reads_like_memory_and_leaves_nothing(
    tmp_path, block_dtype, release_every, monkeypatch
):
    """Block contents in memory-mapped files of ``block_folder``: the same outputs as in memory (through
    the memory's growth, a wrapped ring, the kernel and the reference, with the pages handed back to the
    page cache after every write or every few); the files are unlinked at once, so the folder is empty,
    and the memory says what lives on disk."""
    monkeypatch.setattr("landmark.inference.memory.RELEASE_EVERY_WRITES", release_every)
    folder = tmp_path / "blocks"
    for kernel in ("torch", "auto"):
        ref, _ = read(kernel, block_dtype)
        retrieval = RetrievalConfig(k=3, kernel=kernel, block_dtype=block_dtype, block_folder=str(folder))
        cache = RetrievalCache(2, block_size=8, rope_base=BASE, retrieval=retrieval, options=CacheOptions(20))
        g = torch.Generator().manual_seed(2)
        ours = []
        for lens in STEPS:
            q = torch.randn(3, 6, max(lens), 16, generator=g)
            k, v = torch.randn(2, 3, 2, max(lens), 16, generator=g)
            ours += [cache.attend(layer, q, k, v, torch.tensor(lens)) for layer in range(2)]
        assert all(torch.equal(a, b) for a, b in zip(ref, ours))
        assert list(folder.iterdir()) == []
        sizes = cache.memories[0].nbytes()
        assert sizes["disk"] > 0 and sizes["ram"] == cache.memories[0].landmark_keys.numel() * 4


def resident_mb() -> float:
    """This process's resident memory (VmRSS), MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads resident memory from Linux's /proc")
def test_a_memory_mapped_block_memory_hands_its_pages_back_and_keeps_them(tmp_path):
    """Writing 64 MB of blocks (keys and values) into a mapped memory makes them resident in this
    process; release_pages drops them from the process (its resident memory falls by most of that) and
    the blocks read back unchanged from the page cache (the contents of a shared file mapping are kept)."""
    from landmark.inference.memory import release_pages

    shape = (1, 2, 64, 64)  # batch, kv heads, block size, head dim: 16 KB of float32 keys per block and head
    memory = BlockMemory(shape, rope_base=BASE, dtype=torch.float32, device="cpu",
                         options=MemoryOptions(storage_folder=tmp_path))  # fmt: skip
    memory.reserve(1024)
    keys, values = torch.randn(2, 2, 1024, 64, 64, generator=torch.Generator().manual_seed(0))
    for start in range(0, 1024, 256):  # (fewer writes than RELEASE_EVERY_WRITES: nothing released yet)
        memory.append(0, keys[:, start : start + 256], values[:, start : start + 256])
    before = memory.logical_blocks()
    resident = resident_mb()
    for t in memory.blocks:
        if t is not None:
            release_pages(t)
    assert resident - resident_mb() > 0.75 * 64  # most of the 32 MB of keys and 32 MB of values
    after = memory.logical_blocks()
    assert all(torch.equal(before[name], after[name]) for name in before)
    torch.testing.assert_close(memory.raw_keys(after["keys"][0]), keys)  # (the offsets' rotation undone)
    assert torch.equal(after["values"][0], values[:, :, :-1])


def test_generate_with_a_block_folder_says_where_the_memory_went(tmp_path, capsys):
    from landmark.inference import generate
    from landmark.model import GPT, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, seq_len=64, block_size=8,
                      landmark_id=49)  # fmt: skip
    model = GPT(cfg).eval()
    prompt = torch.randint(0, 49, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    folder = tmp_path / "mapped"
    mapped = generate(model, [prompt], 5, k=2, block_dtype="int8", block_folder=str(folder))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    memory = re.fullmatch(rf"block memory: ([\d.]+) KB in RAM, ([\d.]+) KB mapped from {folder}", line)
    assert memory is not None, line  # a tiny model: kilobytes of landmark keys in RAM, of blocks mapped
    assert float(memory[2]) > float(memory[1]) > 0
    assert mapped == generate(model, [prompt], 5, k=2, block_dtype="int8")


def test_a_full_block_folder_is_an_oserror_naming_it(tmp_path, monkeypatch):
    """A block folder whose file cannot grow (a full disk, a file size limit): torch's RuntimeError becomes
    an OSError with the errno and the folder (the CLI's one-line error names --block-folder)."""
    from landmark.files import os_error_line

    def full(*args, **kwargs):
        raise RuntimeError(
            "unable to resize file </x/landmark-blocks.bin> to the right size: No space left (28)"
        )

    monkeypatch.setattr(torch, "from_file", full)
    with pytest.raises(OSError) as raised:
        BlockMemory((1, 1, 4, 2), rope_base=BASE, dtype=torch.float32, device="cpu",
                    options=MemoryOptions(storage_folder=tmp_path))  # fmt: skip
    assert raised.value.errno == 28 and raised.value.filename == str(tmp_path)
    line = os_error_line(raised.value, [(tmp_path, "--block-folder")])
    assert line.startswith(f"--block-folder {tmp_path}: ") and "\n" not in line
    assert list(tmp_path.iterdir()) == []  # the file made for the mapping is removed
