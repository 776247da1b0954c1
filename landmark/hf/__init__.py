"""Hugging Face transformers integration: landmark fine-tuning of LLaMA-family causal LMs.

Needs the ``hf`` extra (``pip install -c constraints.txt -e '.[hf]'``: transformers 5.x, accelerate,
peft, safetensors, gguf). See docs/huggingface.md. The usual path::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    import landmark.hf

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model, tokenizer = landmark.hf.convert(model, tokenizer, block_size=64)
    collator = landmark.hf.LandmarkCollator(tokenizer, block_size=64, max_length=512)
    ...  # fine-tune (landmark.hf.finetune, or `landmark hf finetune`)
    model.save_pretrained(out); tokenizer.save_pretrained(out)
    model, tokenizer = landmark.hf.load_pretrained(out)

Long inputs with top-k block retrieval (docs/method.md, "Inference: block memory and top-k retrieval")::

    from landmark.inference import RetrievalConfig

    text, ids = landmark.hf.generate(model, tokenizer, long_prompt, retrieval=RetrievalConfig(k=4))
    cache = landmark.hf.LandmarkRetrievalCache(model, RetrievalConfig(k=4), memory_device="cpu")
    out = landmark.hf.forward_cached(model, input_ids_with_landmarks, cache)  # model(..., cache=cache)
    # under this transformers version's cache keyword (past_key_values before 5.2x), checked to be used;
    # or model.generate(..., cache=cache,
    #                   logits_processor=[landmark.hf.LandmarkLogitsProcessor.for_model(model)])

``LandmarkRetrievalCache``, ``LandmarkLogitsProcessor`` and ``forward_cached`` import transformers; they
are loaded on first use, so that ``import landmark.hf`` stays light.
"""

from typing import Any

from landmark.hf.attention import landmark_attention_forward, landmark_attention_mask, register
from landmark.hf.collator import IGNORE_INDEX, LandmarkCollator, landmark_loss, regular_tokens_per_window
from landmark.hf.convert import (
    LANDMARK_TOKEN,
    SUPPORTED_ARCHITECTURES,
    convert,
    landmark_token_id,
)
from landmark.hf.delta import load_pretrained
from landmark.hf.generate import generate

__all__ = [
    "IGNORE_INDEX",
    "LANDMARK_TOKEN",
    "SUPPORTED_ARCHITECTURES",
    "LandmarkCollator",
    "LandmarkLogitsProcessor",
    "LandmarkRetrievalCache",
    "convert",
    "forward_cached",
    "generate",
    "landmark_attention_forward",
    "landmark_attention_mask",
    "landmark_loss",
    "landmark_token_id",
    "load_pretrained",
    "register",
    "regular_tokens_per_window",
]


def __getattr__(name: str) -> Any:
    """Lazy attributes: the retrieval cache and logits processor (they import transformers)."""
    if name in ("LandmarkRetrievalCache", "LandmarkLogitsProcessor", "forward_cached"):
        from landmark.hf import retrieval

        return getattr(retrieval, name)
    raise AttributeError(f"module 'landmark.hf' has no attribute {name!r}")
