"""Tests of landmark.hf: conversion of LLaMA-family models, the collator and its loss, save/load, decoding.

Tiny random models (hidden 64, 2 layers, 4 heads, 2 kv heads) and a tiny byte-level BPE tokenizer are
built in-process: nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_helpers import BS, benchmark_module, cache_arg, converted, make_model, make_tokenizer  # noqa: E402

import landmark.hf as lhf  # noqa: E402
from landmark import landmark_attention  # noqa: E402
from landmark.data import insert_landmarks  # noqa: E402


def rope(x: torch.Tensor, theta: float, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding written out from its definition (half-split layout, as LLaMA's HF weights)."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    angles = positions.double()[:, None] * inv_freq[None]  # (T, d/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def manual_attention(
    attn, hidden: torch.Tensor, block_size: int, theta: float, repeat_kv: bool
) -> torch.Tensor:
    """One attention module by hand: projections, RoPE, landmark_attention, output projection."""
    B, T, _ = hidden.shape
    D = attn.head_dim
    q = attn.q_proj(hidden).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(hidden).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(hidden).view(B, T, -1, D).transpose(1, 2)
    pos = torch.arange(T)
    q, k = rope(q, theta, pos), rope(k, theta, pos)
    if repeat_kv:  # GQA written out: query head h reads kv head h // (H / Hkv)
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = landmark_attention(q, k, v, block_size, scale=D**-0.5, impl="reference")  # (B, H, T, D)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def capture_attention_io(model):
    """Forward hooks recording (hidden_states input, output) of every attention module."""
    records, handles = [], []
    for layer in model.model.layers:

        def hook(module, args, kwargs, output, _records=records):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            _records.append((module, hidden.detach(), output[0].detach()))

        handles.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
    return records, handles


# ---- convert -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("repeat_kv", [False, True], ids=["gqa-op", "gqa-repeated"])
def test_layers_equal_manual_landmark_attention(arch, repeat_kv):
    model, _tok = converted(arch)
    assert model.config._attn_implementation == "landmark"
    theta = model.config.rope_parameters["rope_theta"]
    lid = model.config.landmark_token_id
    raw = torch.randint(0, lid, (2, 30), generator=torch.Generator().manual_seed(1))
    ids = insert_landmarks(raw, BS, lid)  # (2, 34): landmarks at 7, 15, 23, 31
    records, handles = capture_attention_io(model)
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    assert len(records) == 2
    for attn, hidden, out in records:
        with torch.no_grad():
            expected = manual_attention(attn, hidden, BS, theta, repeat_kv)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_landmark_attention_differs_from_causal():
    model, _tok = converted()
    lid = model.config.landmark_token_id
    ids = insert_landmarks(torch.randint(0, lid, (1, 40)), BS, lid)
    with torch.no_grad():
        ours = model(ids).logits
        model.set_attn_implementation("eager")
        plain = model(ids).logits
        model.set_attn_implementation("landmark")
    # the first block is plain causal attention; later blocks differ
    torch.testing.assert_close(ours[:, : BS - 1], plain[:, : BS - 1], atol=1e-5, rtol=1e-4)
    assert (ours[:, BS:] - plain[:, BS:]).abs().max() > 1e-3


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_landmark_token_and_mean_rows(tie):
    tok = make_tokenizer()
    model = make_model(tie=tie, vocab=len(tok))
    n = len(tok)
    emb_mean = model.get_input_embeddings().weight.detach().mean(0).clone()
    out_mean = model.get_output_embeddings().weight.detach().mean(0).clone()
    model, tok = lhf.convert(model, tok, block_size=BS)
    lid = model.config.landmark_token_id
    assert lid == n == tok.convert_tokens_to_ids("<landmark>")
    assert model.config.vocab_size == n + 1 and model.get_input_embeddings().weight.shape[0] == n + 1
    torch.testing.assert_close(model.get_input_embeddings().weight[lid].detach(), emb_mean)
    if tie:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    else:
        assert model.get_output_embeddings().weight.shape[0] == n + 1
        torch.testing.assert_close(model.get_output_embeddings().weight[lid].detach(), out_mean)
    # the landmark is a special token: never split, skipped when decoding
    assert tok("a<landmark>b").input_ids.count(lid) == 1
    assert "<landmark>" not in tok.decode(tok("a<landmark>b").input_ids, skip_special_tokens=True)


def test_padded_vocab_reuses_row():
    """A model with more rows than the tokenizer has tokens: no resize, the row is re-initialised."""
    tok = make_tokenizer()
    model = make_model(vocab=len(tok) + 16)
    rows = model.get_input_embeddings().weight.shape[0]
    model, tok = lhf.convert(model, tok, block_size=BS)
    lid = model.config.landmark_token_id
    assert lid == len(tok) - 1 < rows == model.get_input_embeddings().weight.shape[0]
    w = model.get_input_embeddings().weight.detach()
    keep = torch.ones(rows, dtype=torch.bool)
    keep[lid] = False
    torch.testing.assert_close(w[lid], w[keep].mean(0))


def test_convert_twice_is_a_no_op_on_weights():
    model, tok = converted()
    before = model.get_input_embeddings().weight.detach().clone()
    model, tok = lhf.convert(model, tok, block_size=16)
    assert model.config.landmark_block_size == 16
    torch.testing.assert_close(model.get_input_embeddings().weight.detach(), before)


def test_bad_inputs():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        lhf.convert(
            transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)), tok
        )
    for bad in (1, 0, 257):
        with pytest.raises(ValueError, match="block_size"):
            lhf.convert(make_model(vocab=len(tok)), make_tokenizer(), block_size=bad)
    with pytest.raises(ValueError, match="dropout"):
        lhf.convert(make_model(vocab=len(tok), attention_dropout=0.1), make_tokenizer())
    # a tokenizer whose <landmark> id differs from the converted model's
    model, _ = converted()
    other = make_tokenizer()
    other.add_special_tokens(
        {"extra_special_tokens": ["<x>", "<landmark>"]}, replace_extra_special_tokens=False
    )
    with pytest.raises(ValueError, match="landmark_token_id"):
        lhf.convert(model, other)
    with pytest.raises(ValueError, match="missing"):
        lhf.convert(model, make_tokenizer())


def test_left_padding_and_4d_masks_are_refused():
    model, _tok = converted()
    lid = model.config.landmark_token_id
    ids = insert_landmarks(torch.randint(0, lid, (2, 14)), BS, lid)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with pytest.raises(ValueError, match="right-padded"):
        model(ids, attention_mask=mask)
    with pytest.raises(ValueError, match="4-D"):
        model(ids, attention_mask=torch.zeros(2, 1, ids.shape[1], ids.shape[1]))
    with pytest.raises(ValueError, match="position_ids"):
        model(ids, position_ids=torch.arange(ids.shape[1])[None] + 3)


def test_right_padded_batch_equals_single_sequences():
    model, tok = converted()
    lid = model.config.landmark_token_id
    g = torch.Generator().manual_seed(3)
    long = insert_landmarks(torch.randint(0, lid, (30,), generator=g), BS, lid)  # 34 positions
    short = insert_landmarks(torch.randint(0, lid, (17,), generator=g), BS, lid)  # 19 positions
    batch = torch.full((2, len(long)), tok.eos_token_id)
    mask = torch.zeros_like(batch)
    for row, seq in enumerate((long, short)):
        batch[row, : len(seq)], mask[row, : len(seq)] = seq, 1
    with torch.no_grad():
        both = model(batch, attention_mask=mask).logits
        for row, seq in enumerate((long, short)):
            alone = model(seq[None]).logits[0]
            torch.testing.assert_close(both[row, : len(seq)], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cached_decoding_equals_full_forward(arch):
    from transformers import DynamicCache

    model, _tok = converted(arch)
    lid = model.config.landmark_token_id
    ids = insert_landmarks(
        torch.randint(0, lid, (1, 27), generator=torch.Generator().manual_seed(4)), BS, lid
    )
    with torch.no_grad():
        full = model(ids).logits[0]  # (T, vocab)
        cache = DynamicCache(config=model.config)
        steps = [
            model(ids[:, :5], **cache_arg(model, cache), use_cache=True).logits[0]
        ]  # a prefill, then one by one
        for t in range(5, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], **cache_arg(model, cache), use_cache=True).logits[0])
    torch.testing.assert_close(torch.cat(steps), full, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(tmp_path):
    model, tok = converted(block_size=BS)
    lid = model.config.landmark_token_id
    ids = insert_landmarks(torch.randint(0, lid, (1, 30)), BS, lid)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = lhf.load_pretrained(tmp_path)
    assert loaded.config.landmark_token_id == lid and loaded.config.landmark_block_size == BS
    assert loaded.config._attn_implementation == "landmark"
    assert tok2.convert_tokens_to_ids("<landmark>") == lid
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, before)


def test_load_pretrained_refuses_unconverted(tmp_path):
    make_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a landmark model"):
        lhf.load_pretrained(tmp_path)


# ---- collator and loss ----------------------------------------------------------------------------


def test_collator_layout():
    tok = make_tokenizer()
    model = make_model(vocab=len(tok))
    model, tok = lhf.convert(model, tok, block_size=4)
    L = tok.convert_tokens_to_ids("<landmark>")
    collate = lhf.LandmarkCollator(tok, block_size=4, max_length=8)
    raw = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # a b c d e f g h (+ more, cut off)
    batch = collate([{"input_ids": raw}, {"input_ids": [20, 21, 22]}])
    I, P = -100, tok.eos_token_id
    assert batch["input_ids"].tolist() == [[10, 11, 12, L, 13, 14, 15, L], [20, 21, P, P, P, P, P, P]]
    assert batch["shift_labels"].tolist() == [[11, 12, 13, I, 14, 15, 16, I], [21, 22, I, I, I, I, I, I]]
    assert batch["labels"].tolist() == [[10, 11, 12, I, 13, 14, 15, I], [20, 21, I, I, I, I, I, I]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1, 1, 0, 0, 0, 0, 0, 0]]
    # max_length % block_size == block_size - 1: the landmark that would end the window is dropped
    b = lhf.LandmarkCollator(tok, block_size=4, max_length=7)([raw])
    assert b["input_ids"].tolist() == [[10, 11, 12, L, 13, 14, 15]]
    assert b["shift_labels"].tolist() == [[11, 12, 13, I, 14, 15, 16]]
    with pytest.raises(ValueError, match="at least 2"):
        collate([[5]])
    with pytest.raises(ValueError, match="already holds the landmark"):
        collate([[5, L, 6]])
    with pytest.raises(ValueError, match="convert"):
        lhf.LandmarkCollator(make_tokenizer(), 4, 8)


@pytest.mark.parametrize("max_length", [16, 23, 40])
def test_collator_positions(max_length):
    model, tok = converted()
    lid = model.config.landmark_token_id
    raw = list(range(1, 60))
    b = lhf.LandmarkCollator(tok, BS, max_length)([raw])
    ids, targets = b["input_ids"][0], b["shift_labels"][0]
    assert len(ids) == max_length
    pos = torch.arange(max_length)
    is_landmark = pos % BS == BS - 1
    assert ((ids == lid) == is_landmark).all()
    assert (targets[is_landmark] == -100).all()
    regular = ids[~is_landmark].tolist()
    assert regular == raw[: len(regular)]
    # every regular position predicts the next regular token, across landmarks
    assert targets[~is_landmark].tolist() == raw[1 : len(regular) + 1]


def intended_pairs(raw_rows: list[list[int]], block_size: int, max_length: int):
    """(row, position, target) triples written out by hand from the layout rule, independently of the
    collator: walk the positions, skip landmark positions, each regular position predicts the next raw."""
    triples = []
    for row, raw in enumerate(raw_rows):
        j = 0  # index of the raw token at the current regular position
        for p in range(max_length):
            if p % block_size == block_size - 1:
                continue
            if j + 1 >= len(raw):
                break
            triples.append((row, p, raw[j + 1]))
            j += 1
    return triples


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_loss_equals_hand_computed_cross_entropy(arch):
    model, tok = converted(arch)
    max_length = 20
    g = torch.Generator().manual_seed(5)
    raw_rows = [torch.randint(0, len(tok) - 1, (n,), generator=g).tolist() for n in (40, 11)]
    batch = lhf.LandmarkCollator(tok, BS, max_length)([{"input_ids": r} for r in raw_rows])
    out = model(**batch)
    logp = torch.log_softmax(out.logits.double(), dim=-1)
    triples = intended_pairs(raw_rows, BS, max_length)
    expected = -sum(logp[r, p, t] for r, p, t in triples) / len(triples)
    assert abs(out.loss.item() - expected.item()) < 1e-5
    assert abs(lhf.landmark_loss(out.logits, batch["shift_labels"]).item() - expected.item()) < 1e-5
    # the default shifted loss over `labels` alone would be a different quantity
    plain = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    )
    assert abs(plain.loss.item() - expected.item()) > 1e-4


def test_trainer_loss_equals_hand_computed_cross_entropy(tmp_path):
    """The Trainer's training path (compute_loss, with num_items_in_batch counted from shift_labels)."""
    from transformers import Trainer, TrainingArguments

    model, tok = converted()
    g = torch.Generator().manual_seed(6)
    raw_rows = [torch.randint(0, len(tok) - 1, (n,), generator=g).tolist() for n in (33, 18, 9)]
    collate = lhf.LandmarkCollator(tok, BS, 24)
    batch = collate([{"input_ids": r} for r in raw_rows])
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=3
    )
    trainer = Trainer(
        model=model, args=args, data_collator=collate, train_dataset=[{"input_ids": r} for r in raw_rows]
    )
    num_items = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    triples = intended_pairs(raw_rows, BS, 24)
    assert int(num_items) == len(triples)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    with torch.no_grad():
        logp = torch.log_softmax(
            model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double(), -1
        )
    expected = -sum(logp[r, p, t] for r, p, t in triples) / len(triples)
    assert abs(loss.item() - expected.item()) < 1e-5


def test_generate_inserts_landmarks():
    model, tok = converted()
    lid = model.config.landmark_token_id
    prompt = torch.randint(0, lid, (13,), generator=torch.Generator().manual_seed(7))
    _text, new = lhf.generate(model, tok, prompt, max_new_tokens=12)
    assert len(new) == 12 and lid not in new.tolist()
    # greedy decoding equals argmax of full forwards over the landmarked stream
    seq = prompt.tolist()
    with torch.no_grad():
        for token in new.tolist():
            ids = insert_landmarks(torch.tensor(seq), BS, lid)
            if ids[-1] == lid:
                ids = ids[:-1]
            logits = model(ids[None]).logits[0, -1]
            logits[lid] = -math.inf
            assert int(logits.argmax()) == token
            seq.append(token)


@pytest.mark.parametrize("landmarks", [True, False])
@pytest.mark.parametrize("prompt_len", [9, 13, 14])
def test_passkey_probe_answer_loss_equals_step_by_step_log_probs(landmarks, prompt_len):
    """benchmarks/hf_passkey_probe.py scores the answer tokens where greedy decoding would predict them.

    The answer (4 tokens, the first 3 scored) crosses a block boundary for these prompt lengths; the
    reference predicts each answer token from a full forward over the prompt and the answer tokens before
    it, landmarks inserted as in generation (a trailing landmark dropped: the regular token before it
    predicts the next token).
    """
    probe = benchmark_module("hf_passkey_probe")
    vocab = len(make_tokenizer())
    model = converted()[0] if landmarks else make_model(vocab=vocab)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
    answer = torch.randint(0, vocab, (4,), generator=g).tolist()
    loss, exact = probe.answer_loss(model, prompt, answer, key_tokens=3)
    logps, argmax_ok = [], []
    with torch.no_grad():
        for i in range(3):
            ids = torch.tensor(prompt + answer[:i])
            if landmarks:
                lid = model.config.landmark_token_id
                ids = insert_landmarks(ids, BS, lid)
                ids = ids[:-1] if ids[-1] == lid else ids
            logits = model(ids[None]).logits[0, -1].double()
            logps.append(torch.log_softmax(logits, -1)[answer[i]].item())
            argmax_ok.append(int(logits.argmax()) == answer[i])
    assert abs(loss - (-sum(logps) / 3)) < 1e-4
    assert exact == all(argmax_ok)


@pytest.mark.parametrize("landmarks", [True, False])
def test_heldout_loss_script_equals_the_models_own_loss(landmarks):
    """benchmarks/hf_heldout_loss.py: its per-token mean over windows equals the model's loss on them."""
    script = benchmark_module("hf_heldout_loss")
    model, tok = converted() if landmarks else (make_model(vocab=len(make_tokenizer())), make_tokenizer())
    g = torch.Generator().manual_seed(3)
    max_length = 24
    windows = [torch.randint(0, len(make_tokenizer()), (22,), generator=g) for _ in range(3)]
    got = script.heldout_loss(model, tok, windows, max_length)
    with torch.no_grad():
        if landmarks:
            batch = lhf.LandmarkCollator(tok, BS, max_length)([{"input_ids": w} for w in windows])
            expected = model(**batch).loss.item()  # all windows full: the per-token mean over the batch
        else:
            ids = torch.stack(windows)
            expected = model(input_ids=ids, labels=ids).loss.item()
    assert abs(got - expected) < 1e-5


def test_dispatch_count_benchmark_counts_every_reading(tmp_path):
    """benchmarks/dispatch_count.py: a row per reading, whole-chunk row groups dispatching fewer operations
    than groups of 64 rows (one group per chunk instead of four), the fixed graph fewer still and without
    host synchronisations, full attention fewest; JSON written. (The compiled graph's reading compiles
    with inductor, minutes on a CPU: left to the benchmark's own runs.)"""
    bench = benchmark_module("dispatch_count")
    out = tmp_path / "dc.json"
    argv = ["--length", "512", "--row-groups", "64", "256", "--readings", "full", "reference", "graph"]
    rows = bench.main([*argv, "--out", str(out)])
    ops = {r["reading"]: r["ops_per_layer_chunk"] for r in rows}
    assert list(ops) == ["full", "reference, row_group=64", "reference, row_group=256", "graph"]
    assert 0 < ops["full"] < ops["graph"] < ops["reference, row_group=256"] < ops["reference, row_group=64"]
    syncs = {r["reading"]: r["syncs_per_layer_chunk"] for r in rows}
    assert syncs["graph"] <= syncs["full"] < 0.1 < syncs["reference, row_group=256"]
    assert rows[-1]["ops_vs_full"] == round(ops["graph"] / ops["full"], 2)
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(rows))
