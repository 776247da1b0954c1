"""Landmark attention operators: a dense reference, an exact blockwise CPU path and a fused Triton path."""

from landmark.ops.attention import check_inputs, landmark_attention
from landmark.ops.reference import landmark_attention_reference, landmark_weights

__all__ = ["check_inputs", "landmark_attention", "landmark_attention_reference", "landmark_weights"]
