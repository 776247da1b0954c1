"""landmark-attention: Landmark Attention (Mohtashami & Jaggi, NeurIPS 2023) for PyTorch.

The core operation is :func:`landmark_attention`, the training-time grouped softmax that teaches a
Transformer to use one landmark token per block as that block's address.

``import landmark`` is light: the operations (and torch) load on first use of one of them, so that the
``landmark`` command can answer Ctrl-C while torch loads with one line.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "landmark_attention", "landmark_attention_reference", "landmark_weights"]


def __getattr__(name: str) -> object:
    """``landmark.landmark_attention`` and the other operations of ``__all__``, from :mod:`landmark.ops`."""
    if name in __all__:
        from landmark import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'landmark' has no attribute {name!r}")
