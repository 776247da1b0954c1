"""Constants shared across the library, in one place.

Everything tunable that is not a per-run hyper-parameter lives here, so that no module hard-codes
a number that another module must agree with.
"""

from __future__ import annotations

# A block is `block_size` consecutive positions; the last one is its landmark (docs/method.md).
# 63 regular tokens + 1 landmark: a power of two, which the fused GPU kernel requires.
DEFAULT_BLOCK_SIZE: int = 64

# The paper's from-scratch setting: 50 regular tokens + 1 landmark.
PAPER_BLOCK_SIZE: int = 51

# The blockwise CPU implementation processes queries in tiles of whole blocks: a tile spans
# max(1, BLOCKWISE_TILE_ROWS // block_size) blocks of query rows and all the keys they can see, so its
# memory is O(len x block) instead of O(len^2). One block of 64 rows was fastest on a 2-core CPU at
# 512 to 8192 positions (larger tiles waste work above the causal diagonal and fall out of cache).
BLOCKWISE_TILE_ROWS: int = 64

# The fused Triton kernel: supported block sizes (the tile is one block) and head dimensions.
TRITON_BLOCK_SIZES: tuple[int, ...] = (16, 32, 64, 128)
TRITON_MAX_HEAD_DIM: int = 128
# float64 on a GPU: the largest block_size x padded head_dim tile the Triton kernel is run with. Measured
# on an H200 (scripts/gpu_check.sh): 64 x 64 runs; 128 x 128 asks for 384 KiB of shared
# memory (three float64 tiles) where the chip has 227 KiB. Larger float64 tiles go to the blockwise path.
TRITON_FP64_MAX_TILE: int = 64 * 64

# Names accepted by `landmark_attention(..., impl=...)`.
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "reference", "blockwise", "triton")

# Files of a Hugging Face landmark fine-tune (`landmark hf finetune --out RUN`), read by the delta export.
FINETUNE_SUMMARY_FILE: str = "landmark-finetune.json"  # next to the saved model: settings and losses
LORA_ADAPTER_FOLDER: str = "lora-adapter"  # with LoRA: the peft adapter, inside the output folder

# CPU threads per process (`train.threads`, `LANDMARK_THREADS`, `InferenceSession(threads=)`): beyond the
# logical CPUs of the largest machines more threads only wait at every barrier, and each costs a stack and
# a process-table entry (a million asked for ran the machine out of processes).
MAX_THREADS: int = 1024

# Gradient accumulation (`train.grad_accum`, `hf finetune --grad-accum`): each micro-batch adds 1/N of its
# gradient to float32 sums; past 2**24 (float32's 24-bit significand) such shares no longer change the
# sums they are added to, so the further micro-batches of a larger N would be computed and then lost.
MAX_GRAD_ACCUM: int = 2**24
