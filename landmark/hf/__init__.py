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
"""

from landmark.hf.attention import landmark_attention_forward, landmark_attention_mask, register
from landmark.hf.collator import IGNORE_INDEX, LandmarkCollator, landmark_loss, regular_tokens_per_window
from landmark.hf.convert import (
    LANDMARK_TOKEN,
    SUPPORTED_ARCHITECTURES,
    convert,
    landmark_token_id,
    load_pretrained,
)
from landmark.hf.generate import generate

__all__ = [
    "IGNORE_INDEX",
    "LANDMARK_TOKEN",
    "SUPPORTED_ARCHITECTURES",
    "LandmarkCollator",
    "convert",
    "generate",
    "landmark_attention_forward",
    "landmark_attention_mask",
    "landmark_loss",
    "landmark_token_id",
    "load_pretrained",
    "register",
    "regular_tokens_per_window",
]
