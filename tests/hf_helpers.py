"""Tiny models and a tiny tokenizer for the landmark.hf tests (built in-process, nothing downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch
import transformers

import landmark.hf as lhf

TEXT = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and "
    "see the watery part of the world. "
)
BS = 8  # block size of the tiny models: 7 tokens + 1 landmark


def cache_arg(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` and ``model.generate(...)``: ``cache`` from transformers 5.2x
    on, ``past_key_values`` before (the keyword ``landmark.hf.forward_cached`` uses), so that these tests
    also run under older transformers 5.x."""
    from landmark.hf.retrieval import _cache_keyword

    return {_cache_keyword(type(model)): cache}


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([TEXT] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


def make_model(arch: str = "llama", tie: bool = False, vocab: int = 320, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    common.update(overrides)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    elif arch == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    else:
        raise ValueError(arch)
    return model.eval()


def converted(arch: str = "llama", tie: bool = False, block_size: int = BS, **overrides):
    tok = make_tokenizer()
    model = make_model(arch, tie=tie, vocab=len(tok), **overrides)
    return lhf.convert(model, tok, block_size=block_size)


def write_tiny(folder: Path, tie: bool = False) -> tuple[Path, Path]:
    """An unconverted tiny Llama + tokenizer in ``folder/model``, a small corpus in ``folder/corpus``."""
    tok = make_tokenizer()
    model = make_model(vocab=len(tok), tie=tie)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    corpus = folder / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i in range(6):
        (corpus / f"doc_{i}.txt").write_text(TEXT * (20 + 5 * i), encoding="utf-8")
    return folder / "model", corpus


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` loaded as a module (the benchmarks folder is not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
