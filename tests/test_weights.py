"""int8 weights (``landmark.inference.weights``): every linear layer's weights in int8 with a float32
scale per group of 32 input features.

Exactness is checked against float64 layers holding exactly the numbers the int8 layer represents
(``scale * q``): the C++ kernel (a few float32 rows) and the ``F.linear`` path (longer inputs, other
dtypes) over odd sizes, with and without bias; whole models of both families, converted with
``compact_weights``, against float64 twins whose linear weights are those numbers, in a full pass and
while decoding with retrieval; and the command line.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from landmark.inference import kernel as kernel_mod
from landmark.inference.weights import (
    INT8_GROUP,
    KERNEL_MAX_ROWS,
    Int8Linear,
    compact_weights,
    dequantize_int8,
    quantize_int8,
    weight_bytes,
    weights_of,
)
from landmark.model import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def linear(in_features: int, out_features: int, bias: bool, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(out_features, 1) * 4)  # rows of different magnitudes
    return layer


def reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """``x @ (scale * q)^T + bias`` in float64."""
    weight = dequantize_int8(layer.q, layer.scale, torch.float64)
    bias = None if layer.bias is None else layer.bias.double()
    return nn.functional.linear(x.double(), weight, bias)


def test_quantize_int8_rounds_each_group_to_127_levels_of_its_largest_weight():
    w = torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    w[2, 32:64] = 0  # a group of zeros
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == (7, 96) and scale.shape == (7, 3)
    assert scale[2, 1] == 0 and (q[2, 32:64] == 0).all()
    groups = w.view(7, 3, 32)
    assert torch.allclose(scale, groups.abs().amax(-1) / 127)
    assert q.abs().max() == 127
    err = (dequantize_int8(q, scale) - w).view(7, 3, 32).abs().amax(-1)
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-12).all()  # at most half a step of its group


@pytest.mark.parametrize("rows", [1, 2, 3, KERNEL_MAX_ROWS])
@pytest.mark.parametrize("shape", [(32, 1), (64, 37), (96, 130), (576, 192)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_equals_the_float64_reference_of_its_weights(rows, shape, bias):
    layer = Int8Linear.from_linear(linear(*shape, bias=bias))
    assert layer._kernel(torch.zeros(rows, shape[0])) is not None  # the C++ kernel takes these calls
    x = torch.randn(2, rows, shape[0], generator=torch.Generator().manual_seed(rows))[:1]
    got = layer(x)
    assert got.shape == (1, rows, shape[1]) and got.dtype == torch.float32
    want = reference(layer, x)
    assert (got.double() - want).abs().max() <= 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize(("rows", "dtype"), [(KERNEL_MAX_ROWS + 1, torch.float32), (300, torch.float32),
                                             (3, torch.float64), (5, torch.bfloat16)])  # fmt: skip
def test_long_inputs_and_other_dtypes_take_f_linear_on_the_same_weights(rows, dtype):
    layer = Int8Linear.from_linear(linear(64, 45, bias=True))
    x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    assert layer._kernel(x) is None
    got = layer(x)
    assert got.dtype == dtype and got.shape == (rows, 45)
    want = reference(layer, x)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2}[dtype]
    assert (got.double() - want).abs().max() <= tol * max(1.0, want.abs().max().item())


def test_without_the_kernel_the_layer_computes_the_same(monkeypatch):
    layer = Int8Linear.from_linear(linear(96, 50, bias=True))
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(2))
    with_kernel = layer(x)
    monkeypatch.setattr("landmark.inference.weights.kernel_module", lambda: None)
    assert torch.allclose(layer(x), with_kernel, rtol=1e-5, atol=1e-5)


def test_kernel_refuses_shapes_it_cannot_read():
    module = kernel_mod.kernel_module(required=True)
    q, scale = quantize_int8(torch.randn(4, 64))
    with pytest.raises(RuntimeError, match="shapes disagree"):
        module.int8_linear(torch.randn(1, 32), q, scale, torch.empty(0))
    with pytest.raises(RuntimeError, match="float32"):
        module.int8_linear(torch.randn(1, 64).double(), q, scale, torch.empty(0))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        module.int8_linear(torch.randn(1, 64), q, torch.ones(4, 8), torch.empty(0))


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, seq_len=64, block_size=8,
                      landmark_id=49, attn_impl="reference")  # fmt: skip
    return GPT(cfg).eval()


def twin(model: nn.Module) -> nn.Module:
    """A float64 copy of an int8 model whose linear layers hold the int8 layers' numbers."""
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                layer = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                layer.weight.data = dequantize_int8(child.q, child.scale, torch.float64)
                if child.bias is not None:
                    layer.bias.data = child.bias.double()
                setattr(parent, name, layer)
    return out.double()


def test_compact_weights_converts_every_eligible_linear_layer_in_place():
    model = gpt()
    before = weight_bytes(model)
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert linears and weights_of(model) == "model"
    assert compact_weights(model, "model") is model and weights_of(model) == "model"
    assert compact_weights(model) is model
    assert weights_of(model) == "int8"
    assert not [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert sorted(n for n, m in model.named_modules() if isinstance(m, Int8Linear)) == sorted(linears)
    assert weight_bytes(model) == pytest.approx(before * (1 + 4 / INT8_GROUP) / 4)
    layers = {n: m.q for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    compact_weights(model)  # int8 already: kept as they are
    assert all(m.q is layers[n] for n, m in model.named_modules() if isinstance(m, Int8Linear))
    with pytest.raises(ValueError, match="weights must be one of"):
        compact_weights(model, "int4")


def test_layers_whose_inputs_are_not_whole_groups_stay_float():
    model = nn.Sequential(nn.Linear(48, 64), nn.Linear(64, 10))
    compact_weights(model)
    assert type(model[0]) is nn.Linear and isinstance(model[1], Int8Linear)


def test_gpt_with_int8_weights_reads_and_decodes_as_its_float64_twin(monkeypatch):
    from landmark.inference import chunked_logits, generate
    from landmark.inference.weights import kernel_module

    model = compact_weights(gpt())
    reference_model = twin(model)
    tokens = torch.randint(0, 48, (2, 41), generator=torch.Generator().manual_seed(3))
    got, _ = chunked_logits(model, tokens, k=2, chunk_len=16)
    want, _ = chunked_logits(reference_model, tokens, k=2, chunk_len=16)
    assert (got.double() - want).abs().max() < 1e-4
    calls = []
    monkeypatch.setattr(
        "landmark.inference.weights.kernel_module", lambda: calls.append(1) or kernel_module()
    )
    prompts = [tokens[0, :30].tolist(), tokens[1, :17].tolist()]
    assert generate(model, prompts, 10, k=2) == generate(reference_model, prompts, 10, k=2)
    assert calls  # the decode steps went through the C++ kernel


def test_hf_model_with_int8_weights_matches_its_float64_twin_through_retrieval():
    from hf_helpers import converted

    import landmark.hf as lhf
    from landmark.inference.options import Reading

    model, tok = converted()
    compact_weights(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert model.get_input_embeddings().weight.dtype == torch.float32  # the embedding is kept
    reference_model = twin(model)
    prompt = "The grass is green. The sky is blue. " * 6
    text, ids = lhf.generate(model, tok, prompt, 12, reading=Reading(k=2, chunk_len=16))
    want_text, want_ids = lhf.generate(reference_model, tok, prompt, 12, reading=Reading(k=2, chunk_len=16))
    assert ids.tolist() == want_ids.tolist() and text == want_text


def test_generate_cli_takes_weights_int8(tmp_path, capsys):
    from landmark.checkpoint import load_model, save_checkpoint
    from landmark.cli import main
    from landmark.data.tokenizer import Tokenizer
    from landmark.inference import generate

    text = ["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 20
    tokenizer = Tokenizer.train(text, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32,
                      seq_len=32, block_size=8, landmark_id=tokenizer.landmark_id)  # fmt: skip
    run = tmp_path / "run"
    data = {"tokenizer_fingerprint": tokenizer.fingerprint}
    save_checkpoint(run, 1, GPT(cfg), {"model": cfg.to_dict(), "data": data, "train": {}}, tokenizer, {})
    args = ["generate", "--checkpoint", str(run), "--max-new-tokens", "6", "--k", "2", "--temperature", "0"]
    prompt = "The sky is blue. " * 8
    assert main([*args, "--prompt", prompt, "--weights", "int8", "--no-stop", "--chunk-len", "16"]) == 0
    model = compact_weights(load_model(run)[0])
    want = generate(model, [tokenizer.encode(prompt)], 6, k=2, chunk_len=16)[0]
    assert capsys.readouterr().out == tokenizer.decode(want) + "\n"
    with pytest.raises(SystemExit):
        main([*args, "--prompt", "x", "--weights", "int4"])
    assert "--weights: invalid choice" in capsys.readouterr().err


def test_kernels_turned_off_on_purpose_are_not_warned_about(monkeypatch, recwarn):
    """LANDMARK_KERNEL=0 printed a raw UserWarning (with its source line) naming the retrieval kernel;
    the int8 layers then compute through F.linear, as the test above checks."""
    monkeypatch.setenv("LANDMARK_KERNEL", "0")
    kernel_mod._build.cache_clear()
    try:
        assert kernel_mod.kernel_module() is None
        layer = Int8Linear.from_linear(linear(64, 9, bias=False))
        x = torch.randn(1, 64)
        assert (layer(x).double() - reference(layer, x)).abs().max() < 1e-5
    finally:
        monkeypatch.delenv("LANDMARK_KERNEL")
        kernel_mod._build.cache_clear()
    assert not [w for w in recwarn if "kernels are unavailable" in str(w.message)]


def test_compact_weights_names_what_it_cannot_convert():
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module; got NoneType"):
        compact_weights(None)
    with pytest.raises(TypeError, match="got str"):
        compact_weights("checkpoints/passkey-landmark")
    with pytest.raises(ValueError, match=r"single linear layer: use Int8Linear\.from_linear"):
        compact_weights(nn.Linear(64, 5))
