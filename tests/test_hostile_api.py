"""The Python API under hostile arguments: a ValueError naming the argument, before any work."""

from __future__ import annotations

import os

import pytest

from landmark.checkpoint import load_model
from landmark.hf.checks import check_out_folder
from landmark.inference import InferenceSession

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = os.path.join(REPO, "checkpoints", "passkey-landmark")


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bogus", "is not a device"),
        ("cuda:x", "is not a device"),
        (3.5, "is not a device"),
        ("meta", "expected cpu, cuda or cuda:N"),
        ("cuda", "no CUDA device"),
        ("cpu:5", "expected cpu, cuda or cuda:N"),
    ],
)
def test_an_unknown_memory_device_is_a_value_error(device, message):
    """A device torch does not know, one blocks cannot live on ("meta": the answers were garbage), or
    one this machine does not have (an AssertionError from torch before)."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"
        message = "CUDA device(s) here"
    model, _, _ = load_model(SMALL)
    with pytest.raises(ValueError, match=f"memory_device .*{message}"):
        InferenceSession(model, 1, memory_device=device)


@pytest.mark.parametrize("out", [".", "..", "{cwd}", "{parent}"])
def test_an_output_folder_never_is_the_current_folder_or_holds_it(tmp_path, monkeypatch, out):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    out = out.format(cwd=work, parent=work.parent)
    with pytest.raises(ValueError, match="is the current folder or holds it"):
        check_out_folder(out, overwrite=True, name="--out")
    assert check_out_folder(work / "new", overwrite=False) == work / "new"


@pytest.mark.parametrize("lengths", [[70], [-1], [3.0], [[2]], [1, 2]])
def test_impossible_lengths_are_refused_not_clamped(lengths):
    import torch

    model, tok, _ = load_model(SMALL)
    session = InferenceSession(model, 1)
    ids = torch.tensor([tok.encode("the sea and the ship")])[:, :5]
    with pytest.raises(ValueError, match="lengths must"):
        session.feed(ids, torch.tensor(lengths))
    assert int(session.length[0]) == 0  # nothing was read


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        ("float", "ids must be integer token ids; got torch.float32"),
        ("bool", "ids must be integer token ids; got torch.bool"),
        (10**6, r"ids must lie in \[0, \d+\) \(the model's vocabulary\); found 1000000"),
        (-1, r"ids must lie in \[0, \d+\) \(the model's vocabulary\); found -1"),
    ],
)
def test_feed_refuses_what_is_not_a_token_id(ids, message):
    """Float ids, or ids outside the vocabulary: a ValueError naming ids (torch's embedding raised a
    RuntimeError or an IndexError)."""
    import torch

    model, tok, _ = load_model(SMALL)
    good = torch.tensor([tok.encode("the sea and the ship")])[:, :5]
    bad = {"float": good.float(), "bool": good.bool()}.get(ids)
    if bad is None:
        bad = good.clone()
        bad[0, 2] = ids
    session = InferenceSession(model, 1)
    with pytest.raises(ValueError, match=message):
        session.feed(bad)
    assert int(session.length[0]) == 0


def test_load_model_names_a_bad_path_or_device():
    with pytest.raises(TypeError, match="path must be a run or checkpoint folder"):
        load_model(3)
    with pytest.raises(ValueError, match="device 'tpu' is not a device"):
        load_model(SMALL, device="tpu")


@pytest.mark.parametrize(
    "prompts, says",
    [([[10**9]], r"prompts\[0\] holds 1000000000, not a token id"), ([[1], [-3]], r"prompts\[1\] holds -3"),
     ([[1.5]], r"prompts\[0\] must hold integer token ids")],
)  # fmt: skip
def test_generate_refuses_token_ids_outside_the_vocabulary(prompts, says):
    """An id beyond the embedding was an IndexError from deep inside the model."""
    from landmark.inference import generate

    model, _, _ = load_model(SMALL)
    with pytest.raises(ValueError, match=says):
        generate(model, prompts, 2)


def test_generate_refuses_a_length_that_certainly_cannot_fit():
    """With no stop token (eot_id None) the generation is as long as asked: 10**15 tokens need 8 PB for
    their ids alone; refused before any work. With a stop token it may end early: not refused."""
    from landmark.inference import generate
    from landmark.inference.generate import Hooks

    model, tok, _ = load_model(SMALL)
    with pytest.raises(
        ValueError, match=r"max_new_tokens=1000000000000000: holding the ids .* needs at least"
    ):
        generate(model, [tok.encode("the sea")], 10**15)
    assert len(generate(model, [tok.encode("the sea")], 2, hooks=Hooks((tok.eot_id,)))[0]) <= 2


@pytest.mark.parametrize("batch_size, says", [(10**12, "batch_size=1000000000000: holding the streams'"),
                                              (2.5, "batch_size must be an integer >= 1")])  # fmt: skip
def test_a_session_of_impossibly_many_streams_is_refused(batch_size, says):
    """InferenceSession(batch_size=10**12) was a MemoryError from the tail buffers' allocation."""
    model, _, _ = load_model(SMALL)
    with pytest.raises(ValueError, match=says):
        InferenceSession(model, batch_size)


def test_a_temperature_near_zero_samples_the_best_token():
    """A temperature of 1e-320 (0 in float32) divided the logits into inf - inf: torch.multinomial then
    raised on NaN probabilities. It samples the best token, as greedy decoding does."""
    import torch

    from landmark.inference.generate import sample_next

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for temperature in (1e-320, 1e-45, 1e-30):
        for top_p in (1.0, 0.5):
            token = sample_next(logits, temperature, top_p, torch.Generator().manual_seed(1))
            assert torch.equal(token, logits.argmax(dim=-1))


def test_nan_scores_are_refused_not_sampled():
    """Weights with bytes overwritten gave NaN logits: sampling raised torch's "probability tensor
    contains inf, nan" (a traceback) and greedy decoding returned an arbitrary token."""
    import torch

    from landmark.inference.generate import sample_next

    logits = torch.randn(2, 50)
    logits[1, 3] = float("nan")
    for temperature in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"not numbers \(NaN\): its weights may be damaged"):
            sample_next(logits, temperature, 1.0, torch.Generator().manual_seed(0))


def test_a_huge_temperature_samples_without_nan():
    """A temperature of 1e308 (inf in float32) made -inf / inf = nan for a masked token: torch.multinomial
    raised. It samples (nearly uniformly) and never a masked token."""
    import torch

    from landmark.inference.generate import sample_next

    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 7] = float("-inf")  # a masked token (the landmark)
    for top_p in (1.0, 0.5):
        token = sample_next(logits, 1e308, top_p, torch.Generator().manual_seed(1))
        assert token.shape == (2,) and bool((token != 7).all())


def test_a_top_p_near_zero_samples_the_best_token():
    """top_p=1e-300 compared as 0 in float32: the nucleus kept no token and torch.multinomial raised. The
    best token is always in the nucleus."""
    import torch

    from landmark.inference.generate import sample_next

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for top_p in (1e-300, 5e-324, 1e-9):
        token = sample_next(logits, 1.0, top_p, torch.Generator().manual_seed(1))
        assert torch.equal(token, logits.argmax(dim=-1))


def test_a_block_folder_that_is_a_file_is_refused(tmp_path):
    """``block_folder`` naming a file: a ValueError naming block_folder (FileExistsError from the first
    write before); a folder that does not exist yet is made when the memory is."""
    from landmark.inference import RetrievalConfig

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    with pytest.raises(ValueError, match=r"block_folder .*notes\.txt is a file, not a folder"):
        RetrievalConfig(k=2, block_folder=str(a_file))
    assert a_file.read_text() == "keep me"
    assert RetrievalConfig(k=2, block_folder=str(tmp_path / "new")).block_folder == str(tmp_path / "new")


def test_the_cpp_kernel_and_compile_exclude_each_other():
    """compile=True took torch.compile'd stages and silently left the C++ kernel asked for unused."""
    from landmark.inference import RetrievalConfig

    with pytest.raises(ValueError, match='kernel="cpp" and compile exclude each other'):
        RetrievalConfig(k=2, kernel="cpp", compile=True)
    assert RetrievalConfig(k=2, kernel="torch", compile=True).compile


def test_api_arguments_of_the_wrong_kind_are_named():
    """A tensor for generate's prompts (a RuntimeError "Boolean value of Tensor ... is ambiguous"), a
    device this machine lacks for load_model (torch's AssertionError), a 1-D tensor for chunked_nll (an
    unpacking error naming nothing): each names its argument."""
    import torch

    from landmark.inference import chunked_nll, generate

    model, tok, _ = load_model(SMALL)
    ids = torch.tensor([tok.encode("the sea and the ship")])
    with pytest.raises(TypeError, match=r"prompts must be a list of token-id lists .*got Tensor"):
        generate(model, ids, 2)
    with pytest.raises(TypeError, match=r"prompts must be a list of token-id lists .*got str"):
        generate(model, "the sea", 2)
    with pytest.raises(ValueError, match=r"device cuda:99: (this torch has no CUDA device|only \d+ CUDA)"):
        load_model(SMALL, device="cuda:99")  # a device this machine lacks
    with pytest.raises(
        ValueError, match=r"tokens must be a \(batch, length\) tensor of token ids; got \(5,\)"
    ):
        chunked_nll(model, ids[0], torch.tensor([5]), k=4)


def test_a_state_never_replaces_weights_even_with_overwrite(tmp_path):
    """save_state(..., overwrite=True) onto a checkpoint's model.safetensors replaced the weights with a
    stream state (the run no longer loaded): a safetensors file that is not a saved state is never
    replaced; another file is, with overwrite."""
    import shutil

    import torch

    from landmark.inference import generate
    from landmark.inference.cache import StateFiles

    run = tmp_path / "run"
    shutil.copytree(SMALL, run)
    weights = next(run.rglob("model.safetensors"))
    before = weights.read_bytes()
    model, tok, _ = load_model(run)
    session = InferenceSession(model, 1)
    session.read(torch.tensor([tok.encode("the sea and the ship")]))
    with pytest.raises(ValueError, match=r"is a file of .*, the model's, which this command reads"):
        session.save_state(weights, overwrite=True)  # (the loaders note the model's folders)
    other = tmp_path / "other"  # the weights of a model this session did not load
    shutil.copytree(SMALL, other)
    others = next(other.rglob("model.safetensors"))
    with pytest.raises(ValueError, match=r"holds tensors that are not a saved state .* even with overwrite"):
        session.save_state(others, overwrite=True)
    with pytest.raises(ValueError, match="holds tensors that are not a saved state"):
        generate(model, [tok.encode("the sea")], 1, k=2, state=StateFiles(save=others, overwrite=True))
    assert weights.read_bytes() == before and others.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("replace me")
    session.save_state(notes, overwrite=True)
    assert notes.read_bytes()[:8] != b"replace "


def test_more_api_arguments_of_the_wrong_kind_are_named(tmp_path):
    """insert_landmarks of a list (AttributeError) or of float "ids" (accepted); generate's sampling as a
    string (AttributeError); chunked_logits of float tokens (accepted) and chunked_nll's lengths as a
    list (AttributeError); load_config's overrides as one string (a message about 't'); a
    LandmarkCollator whose windows hold no landmark (accepted): each names its argument."""
    import torch

    from landmark.data.landmarks import insert_landmarks
    from landmark.inference import chunked_logits, chunked_nll, generate
    from landmark.train_config import load_config

    with pytest.raises(TypeError, match="tokens must be a"):
        insert_landmarks([[1, 2, 3]], 4, 5)
    with pytest.raises(TypeError, match="tokens must hold integer token ids"):
        insert_landmarks(torch.tensor([[1.5, 2.0, 3.0]]), 4, 5)
    model, tok, _ = load_model(SMALL)
    ids = torch.tensor([tok.encode("the sea and the ship and the whale")])
    with pytest.raises(TypeError, match="sampling must be a Sampling"):
        generate(model, [ids[0].tolist()], 2, sampling="greedy")
    with pytest.raises(ValueError, match="tokens must hold integer token ids"):
        chunked_logits(model, ids.float(), torch.tensor([ids.shape[1]]), k=4)
    nll, count = chunked_nll(model, ids, [ids.shape[1]], k=4)  # a list of lengths is taken as a tensor
    assert count.tolist() == [ids.shape[1] - 1] and torch.isfinite(nll).all()
    with pytest.raises(TypeError, match=r"overrides must be a list of 'section\.key=value' strings"):
        load_config(None, "train.lr=1")
    from hf_helpers import make_tokenizer

    import landmark.hf as lhf

    with pytest.raises(ValueError, match="max_length must be an int of at least one block"):
        lhf.LandmarkCollator(make_tokenizer(), block_size=16, max_length=8)


@pytest.mark.parametrize("stop_ids", ["abc", [1.5], [[1, 2]], 3, [True]])
def test_stop_ids_that_are_not_token_ids_are_named(stop_ids):
    """``Hooks(stop_ids='abc')`` failed with torch's "too many dimensions 'str'"."""
    from landmark.inference import generate
    from landmark.inference.generate import Hooks

    model, tokenizer, _ = load_model(SMALL)
    with pytest.raises(ValueError, match=r"Hooks\.stop_ids must be a sequence of integer token ids"):
        generate(model, [tokenizer.encode("The whale " * 20)], 2, hooks=Hooks(stop_ids=stop_ids))
    assert generate(model, [tokenizer.encode("The whale")], 2, hooks=Hooks(stop_ids=[]))  # none: fine


@pytest.mark.parametrize("lengths", [[3.5], [[3]], [3, 3]])
def test_chunked_nll_lengths_must_be_one_integer_per_row(lengths):
    """Float lengths were truncated silently (3.5 read as 3)."""
    import torch

    from landmark.inference import chunked_nll

    model, tokenizer, _ = load_model(SMALL)
    tokens = torch.tensor([tokenizer.encode("The whale " * 20)])
    with pytest.raises(ValueError, match=r"lengths must be \(1,\) integers"):
        chunked_nll(model, tokens, torch.tensor(lengths), k=4)
    _, count = chunked_nll(model, tokens, [3], k=4)
    assert count.tolist() == [2]


def test_paths_and_tokenizers_of_the_wrong_kind_are_named(tmp_path):
    """``load_pretrained(12345)``, ``StateFiles(save=5)`` and ``generate(model, None, ...)`` failed inside
    pathlib and convert.py with messages that named no argument."""
    from hf_helpers import converted

    import landmark.hf as lhf
    from landmark.inference.cache import StateFiles
    from landmark.inference.options import Reading

    with pytest.raises(TypeError, match="path must be a folder path"):
        lhf.load_pretrained(12345)
    with pytest.raises(TypeError, match="base must be a folder path"):
        lhf.load_pretrained(tmp_path, base=3)
    with pytest.raises(TypeError, match=r"StateFiles\.save must be a file path"):
        StateFiles(save=5)
    with pytest.raises(TypeError, match=r"StateFiles\.load must be a file path"):
        StateFiles(load=["a"])
    model, _ = converted()
    with pytest.raises(TypeError, match="tokenizer must be the model's tokenizer"):
        lhf.generate(model, None, "text", 2, reading=Reading(k=4))


def test_evaluation_cells_follow_the_model_config(tmp_path):
    """A checkpoint whose config.json changed (its RoPE base) was served the old model's cached cells:
    the cells' model fingerprint covers the configuration as well as the weights."""
    import json
    import shutil

    from landmark.eval.models import load_gpt

    copy = tmp_path / "pk"
    shutil.copytree(SMALL, copy)
    before = load_gpt("a", str(copy)).fingerprint()
    assert before == load_gpt("b", SMALL).fingerprint()  # where the model lies does not matter
    config = json.loads((copy / "config.json").read_text())
    config["model"]["rope_base"] = 500.0
    (copy / "config.json").write_text(json.dumps(config))
    assert load_gpt("a", str(copy)).fingerprint() != before


def test_negative_stop_ids_and_lengths_beyond_the_tokens_are_named():
    """A stop id of -5 (no token can match it) was taken; a length of 100 for 5 tokens was reported as
    101 (the count with landmarks)."""
    import torch

    from landmark.inference import chunked_nll, generate
    from landmark.inference.generate import Hooks

    model, tokenizer, _ = load_model(SMALL)
    with pytest.raises(ValueError, match=r"integer token ids \(>= 0\)"):
        generate(model, [tokenizer.encode("The whale")], 2, hooks=Hooks(stop_ids=(-5,)))
    tokens = torch.tensor([tokenizer.encode("The whale is white")[:5]])
    with pytest.raises(
        ValueError, match=r"lengths must lie in \[0, 5\] \(real tokens per row\); got \[100\]"
    ):
        chunked_nll(model, tokens, torch.tensor([100]), k=4)


def test_a_checkpoint_whose_block_size_is_not_its_training_data_s_is_refused(tmp_path):
    """model.block_size edited to 32 (its data was laid out in blocks of 64) loaded and answered nonsense."""
    import json
    import shutil

    from landmark.checkpoint import CheckpointError

    copy = tmp_path / "pk"
    shutil.copytree(SMALL, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["block_size"] = 32
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.block_size 32 is not the block size the model was "
                                              r"trained with \(data\.block_size 64\)"):  # fmt: skip
        load_model(copy)
