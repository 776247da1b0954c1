"""landmark-attention: Landmark Attention (Mohtashami & Jaggi, NeurIPS 2023) for PyTorch.

The core operation is :func:`landmark_attention`, the training-time grouped softmax that teaches a
Transformer to use one landmark token per block as that block's address.
"""

from landmark.ops import landmark_attention, landmark_attention_reference, landmark_weights

__version__ = "0.1.0"
__all__ = ["__version__", "landmark_attention", "landmark_attention_reference", "landmark_weights"]
