"""Random-access inference: block memory, top-k retrieval through landmarks, long-context generation."""

from landmark.inference.cache import DEFAULT_CHUNK_LEN, CacheOptions, RetrievalCache
from landmark.inference.full_cache import FullCache
from landmark.inference.generate import generate, sample_next
from landmark.inference.memory import BlockMemory, MemoryFullError, MemoryOptions
from landmark.inference.retrieval import GRANULARITIES, RetrievalConfig, retrieval_attention, select_blocks
from landmark.inference.session import InferenceSession, chunked_logits, chunked_nll
from landmark.inference.step import LayerInputs, Step

__all__ = [
    "DEFAULT_CHUNK_LEN",
    "GRANULARITIES",
    "BlockMemory",
    "CacheOptions",
    "FullCache",
    "InferenceSession",
    "LayerInputs",
    "MemoryFullError",
    "MemoryOptions",
    "RetrievalCache",
    "RetrievalConfig",
    "Step",
    "chunked_logits",
    "chunked_nll",
    "generate",
    "retrieval_attention",
    "sample_next",
    "select_blocks",
]
