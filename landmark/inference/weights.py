"""int8 weights for decoding on the CPU: every linear layer's weights in int8 with a scale per group.

Decoding one token streams all of a model's weights through the CPU once, so a small model's time per
token is its weights' bytes over the memory bandwidth: SmolLM2-135M reads 540 MB of float32 weights per
token. :func:`compact_weights` replaces each ``nn.Linear`` of a model (either family: the models of
``landmark.model`` and Hugging Face LLaMA-family models; the output head included) by an
:class:`Int8Linear` holding, for every output feature and group of ``INT8_GROUP`` input features, int8
values and one float32 scale (``max |w| / 127`` of the group: symmetric, round to nearest), the q8_0
layout of llama.cpp with a float32 scale: 1.125 bytes per weight, 28% of float32.

The layer computes ``x @ W^T + b`` with ``W = scale * q``: a step of a few rows (decoding) through the
C++ kernel (``csrc/int8_linear.cpp``), which reads the int8 values where they are stored; longer
inputs (reading a prompt, chunks of hundreds of rows) through ``F.linear`` on the weights converted to
the input's dtype for that call. Both compute the same weights (to float rounding: tested against a
float64 reference). The values differ from the original weights by at most half a step of their group,
``max |w| / 254``: the model changes a little (docs/inference.md, int8 weights, has what it does to
answers and perplexity). Inference only: a model with int8 weights is not saved or trained.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from landmark.inference.kernel import kernel_module
from landmark.inference.memory import quantize

WEIGHTS = ("model", "int8")  # --weights: the model's own weights, or int8 with a scale per group
INT8_GROUP = 32  # input features sharing one scale (llama.cpp's q8_0 blocks)
QUANTIZE_ROWS = 4096  # output features quantized at once (a vocabulary-sized head: 9 MB of temporaries)
KERNEL_MAX_ROWS = 8  # up to this many rows (decoding) go through the C++ kernel; more: F.linear


def quantize_int8(weight: Tensor, group: int = INT8_GROUP) -> tuple[Tensor, Tensor]:
    """``weight`` (out, in) as (q (out, in) int8, scale (out, in / group) float32): per group of
    ``group`` input features, scale = max |w| / 127 and q = round(w / scale), as the int8 block memory
    quantizes its blocks (``memory.quantize``; a group of zeros gets scale 0)."""
    out_features, in_features = weight.shape
    groups = weight.detach().reshape(out_features, in_features // group, group)
    parts = [quantize(rows, (-1,)) for rows in groups.split(QUANTIZE_ROWS)]  # bounded temporaries
    q, scale = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return q.reshape(out_features, in_features), scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (out, in) weights ``scale * q`` in ``dtype`` (q (out, in) int8, scale (out, in / group))."""
    out_features, in_features = q.shape
    groups = q.reshape(out_features, scale.shape[1], -1).to(dtype) * scale.to(dtype)[..., None]
    return groups.reshape(out_features, in_features)


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights and a float32 scale per (output feature, group of ``INT8_GROUP``
    input features); made from a linear layer by :meth:`from_linear`. Buffers: ``q`` (out, in) int8,
    ``scale`` (out, in / group) float32, ``bias`` (out,) or None."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 form of ``linear`` (its ``in_features`` a multiple of ``INT8_GROUP``)."""
        q, scale = quantize_int8(linear.weight)
        return cls(q.to(linear.weight.device), scale.to(linear.weight.device), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out), in ``x``'s dtype."""
        rows = x.reshape(-1, self.in_features)
        module = self._kernel(rows)
        if module is not None:
            bias = self.bias if self.bias is not None else _NO_BIAS
            y = module.int8_linear(rows.contiguous(), self.q, self.scale, bias.float().contiguous())
        else:
            weight = dequantize_int8(self.q, self.scale, x.dtype)
            y = F.linear(rows, weight, None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel(self, rows: Tensor):
        """The compiled module when this call takes the C++ kernel (a few float32 rows on the CPU)."""
        if rows.shape[0] > KERNEL_MAX_ROWS or rows.dtype != torch.float32 or rows.device.type != "cpu":
            return None
        if self.q.device.type != "cpu":
            return None
        return kernel_module()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, group={INT8_GROUP}"


_NO_BIAS = torch.empty(0)


def compact_weights(model: nn.Module, weights: str = "int8") -> nn.Module:
    """``model`` with its linear layers' weights in ``weights`` form, in place; returns the model.

    ``"model"``: unchanged. ``"int8"``: every ``nn.Linear`` whose ``in_features`` is a multiple of
    ``INT8_GROUP`` becomes an :class:`Int8Linear` (the others stay as they are); layers that are int8
    already are kept. A weight tied to an embedding (a shared output head) leaves the embedding as it
    is. Raises ValueError for an unknown ``weights``.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}; got {weights!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if _convertible(model) and weights == "int8":  # no parent to put the int8 layer in: in place fails
        raise ValueError("model is a single linear layer: use Int8Linear.from_linear(layer) for one layer")
    if weights == "model":
        return model
    names = [name for name, m in model.named_modules() if _convertible(m)]
    for name in names:  # one layer at a time: its float weights are freed before the next is converted
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, Int8Linear.from_linear(getattr(parent, child_name)))
    if names:  # the weights left (embeddings, norms) may be views of a memory-mapped weights file, which
        for tensor in (*model.parameters(), *model.buffers()):  # stays resident while any view lives
            if tensor.dtype.is_floating_point:
                tensor.data = tensor.data.clone()
    return model


def _convertible(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.in_features % INT8_GROUP == 0


def weights_of(model: nn.Module) -> str:
    """``"int8"`` if the model holds :class:`Int8Linear` layers, else ``"model"``."""
    return "int8" if any(isinstance(m, Int8Linear) for m in model.modules()) else "model"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights (and scales): what a decoding step streams, the embedding
    aside."""
    total = 0
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += module.q.nbytes + module.scale.nbytes
        elif isinstance(module, nn.Linear):
            total += module.weight.nbytes
    return total
