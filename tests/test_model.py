"""Tests of landmark.model: shapes, the loss around landmarks, and the three attentions against each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from landmark.data import landmark_example
from landmark.model import GPT, IGNORE_INDEX, ModelConfig

VOCAB, LANDMARK = 50, 49


def make(attention: str, seed: int = 0, **kw) -> GPT:
    cfg = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, seq_len=32, block_size=8)
    cfg.update(kw)
    torch.manual_seed(seed)
    return GPT(ModelConfig(attention=attention, landmark_id=LANDMARK, **cfg)).double()


@pytest.mark.parametrize("attention", ["landmark", "full", "xl"])
def test_shapes_and_loss(attention):
    model = make(attention, xl_segment=16)
    ids = torch.randint(0, VOCAB - 1, (3, 32))
    out = model(ids)
    assert out.logits.shape == (3, 32, VOCAB) and out.loss is None
    out = model(ids, ids)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert model(ids[:, :16]).logits.shape == (3, 16, VOCAB)  # shorter than seq_len: fine
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model(ids[0])


def test_loss_skips_landmarks_and_the_token_before_a_landmark_predicts_the_one_after():
    # block_size 4: three regular tokens, then a landmark L.
    a, b, c, d, e, f, g = range(1, 8)
    L = LANDMARK
    input_ids, targets = landmark_example(torch.tensor([[a, b, c, d, e, f, g]]), 4, L)
    assert input_ids.tolist() == [[a, b, c, L, d, e, f, L]]
    assert targets.tolist() == [[b, c, d, IGNORE_INDEX, e, f, g, IGNORE_INDEX]]  # c -> d across L

    model = make("landmark", seq_len=8, block_size=4)
    out = model(input_ids, targets)
    out.logits.retain_grad()
    logp = F.log_softmax(out.logits[0].double(), dim=-1)  # (8, V)
    scored = {0: b, 1: c, 2: d, 4: e, 5: f, 6: g}  # position -> its target, landmarks (3, 7) absent
    expected = -sum(logp[p, tok] for p, tok in scored.items()) / len(scored)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-6)  # loss in fp32
    out.loss.backward()
    grad = out.logits.grad[0]  # (8, V)
    assert grad[[3, 7]].abs().max() == 0  # the outputs at landmarks are not scored
    assert (grad[[0, 1, 2, 4, 5, 6]].abs().amax(dim=-1) > 0).all()


def test_landmark_with_one_block_equals_full_attention_except_at_the_landmark():
    full = make("full")
    landmark = make("landmark", block_size=32)  # one block: the last position is its landmark
    landmark.load_state_dict(full.state_dict())
    ids = torch.randint(0, VOCAB - 1, (2, 32))
    ids[:, -1] = LANDMARK
    lf, ll = full(ids).logits, landmark(ids).logits
    torch.testing.assert_close(ll[:, :-1], lf[:, :-1], rtol=1e-10, atol=1e-10)
    # The landmark query does not attend to itself; full attention does, so the last position differs.
    assert (ll[:, -1] - lf[:, -1]).abs().max() > 1e-6


def test_xl_with_one_segment_equals_full_attention():
    full = make("full")
    xl = make("xl", xl_segment=32)
    xl.load_state_dict(full.state_dict())
    ids = torch.randint(0, VOCAB, (2, 32))
    torch.testing.assert_close(xl(ids).logits, full(ids).logits, rtol=1e-10, atol=1e-10)


def _embedding_grad(model: GPT, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d loss / d (token embeddings): (B, T, n_embd)."""
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["h"] = output

    handle = model.embed.register_forward_hook(keep)
    model(ids, targets).loss.backward()
    handle.remove()
    return captured["h"].grad


def test_xl_passes_no_gradient_through_the_cache_but_uses_it():
    xl = make("xl", xl_segment=16)  # two segments of 16
    full = make("full")
    full.load_state_dict(xl.state_dict())
    ids = torch.randint(0, VOCAB, (2, 32))
    targets = torch.randint(0, VOCAB, (2, 32))
    targets[:, :16] = IGNORE_INDEX  # score segment 2 only
    g_xl, g_full = _embedding_grad(xl, ids, targets), _embedding_grad(full, ids, targets)
    # Segment 1 reaches segment 2's loss only through the cache, which is detached: zero gradient.
    assert g_xl[:, :16].abs().max() == 0
    assert (g_xl[:, 16:].abs().amax(dim=-1) > 0).all()
    assert (g_full[:, :16].abs().amax(dim=-1) > 0).all()  # the check would see a leak
    # ... yet the forward pass uses the cache: segment 1's tokens change segment 2's logits.
    other = ids.clone()
    other[:, :16] = (other[:, :16] + 1) % VOCAB
    with torch.no_grad():
        assert (xl(ids).logits[:, 16:] - xl(other).logits[:, 16:]).abs().max() > 1e-6
        # Each layer reaches one segment further back: with 2 layers, segment 1 (of 4) changes
        # segments 2 and 3 but not segment 4.
        xl4 = make("xl", xl_segment=8)
        moved = ids.clone()
        moved[:, :8] = (moved[:, :8] + 1) % VOCAB
        before, after = xl4(ids).logits, xl4(moved).logits
        assert (before[:, 16:24] - after[:, 16:24]).abs().max() > 1e-6
        torch.testing.assert_close(before[:, 24:], after[:, 24:], rtol=0, atol=0)


def test_config_errors_are_one_line():
    with pytest.raises(ValueError, match=r"block_size \(48\) must divide seq_len \(32\)"):
        make("landmark", block_size=48)
    with pytest.raises(ValueError, match="attention must be one of"):
        make("sparse")
    with pytest.raises(ValueError, match=r"xl_segment \(12\) must divide seq_len"):
        make("xl", xl_segment=12)
    with pytest.raises(ValueError, match="unknown model config key"):
        ModelConfig.from_dict({"n_layers": 3})


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("n_embd", 0, "n_embd must be an integer >= 1; got 0"),
        ("n_layer", 2.0, "n_layer must be an integer >= 1; got 2.0"),  # not an integer
        ("vocab_size", -1, "vocab_size must be an integer >= 1"),
        ("rope_base", float("inf"), "rope_base must be > 0 and finite; got inf"),
        ("rope_base", -1.0, "rope_base must be > 0; got -1.0"),
        ("dropout", 1.0, r"dropout must be in \[0, 1\); got 1.0"),
        ("dropout", float("nan"), "dropout must be in .* and finite; got nan"),
        ("attn_impl", "fast", "attn_impl must be one of auto, reference, blockwise, triton"),
    ],
)
def test_model_config_refuses_out_of_range_values(field, value, message):
    """A ModelConfig built in Python gets the same range checks as a training config file."""
    with pytest.raises(ValueError, match=message):
        ModelConfig(landmark_id=1, **{field: value})
