"""Data for training language models with landmarks: corpus, tokenizer, token arrays, windows.

The usual path::

    from landmark.data import prepare_data, WindowSampler

    data = prepare_data()  # the bundled books, a trained 8192-token BPE, cached under cache/
    sampler = WindowSampler(data.splits["train"].tokens, seq_len=512, batch_size=16,
                            landmark_id=data.tokenizer.landmark_id, block_size=64, seed=0)
    batch = sampler.batch(step)  # input_ids, targets: (16, 512) int64, landmarks not targets
"""

from landmark.data.books import bundled_books, cache_root
from landmark.data.corpus import Corpus, CorpusError, Document, read_corpus
from landmark.data.dataset import PreparedData, TokenSplit, load_split, prepare_data, tokenize_split
from landmark.data.landmarks import insert_landmarks, landmark_example, landmark_mask, landmark_targets
from landmark.data.tokenizer import EOT_TOKEN, LANDMARK_TOKEN, Tokenizer
from landmark.data.windows import Batch, SequentialWindows, WindowLayout, WindowSampler

__all__ = [
    "EOT_TOKEN",
    "LANDMARK_TOKEN",
    "Batch",
    "Corpus",
    "CorpusError",
    "Document",
    "PreparedData",
    "SequentialWindows",
    "TokenSplit",
    "Tokenizer",
    "WindowLayout",
    "WindowSampler",
    "bundled_books",
    "cache_root",
    "insert_landmarks",
    "landmark_example",
    "landmark_mask",
    "landmark_targets",
    "load_split",
    "prepare_data",
    "read_corpus",
    "tokenize_split",
]
