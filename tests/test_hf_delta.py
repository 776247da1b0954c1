"""Tests of `landmark hf export-delta` and of loading a delta folder (landmark.hf.delta).

A tiny random Llama is fine-tuned for a few LoRA steps (attention targets with untied embeddings, all
linear layers with tied embeddings as in SmolLM2) through `landmark.cli.main`; the delta is exported and
rebuilt over the base, and compared with the merged model the fine-tune saved. Nothing is downloaded:
the "base missing -> prepared" path runs with the preparation replaced by a copy of the tiny base.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from argv_helpers import last_wins

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_helpers import make_model, write_tiny

import landmark.hf as lhf
from landmark.cli import main
from landmark.hf import delta, smollm2
from landmark.inference.cache import StateFiles
from landmark.inference.options import Reading

FINETUNE = ["--block-size", "8", "--max-length", "64", "--steps", "3", "--batch-size", "2", "--lr", "1e-2"]
FINETUNE += ["--warmup-steps", "1", "--logging-steps", "3"]
LORA = ["--lora-alpha", "8"]  # with every --lora-r R (a full fine-tune refuses it)
R = 4  # LoRA rank of the tiny runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny bases (untied, tied) and their fine-tunes: LoRA on attention (untied), LoRA on all linear
    layers (tied), full (untied)."""
    root = tmp_path_factory.mktemp("delta")
    folders: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LANDMARK_CACHE", str(root / "cache"))
        for tie in (False, True):
            model, corpus = write_tiny(root / ("tied" if tie else "untied"), tie=tie)
            folders["base-tied" if tie else "base"] = model
        for name, base, extra in (
            ("attention", "base", ["--lora-r", str(R), *LORA, "--lora-targets", "attention"]),
            ("all", "base-tied", ["--lora-r", str(R), *LORA, "--lora-targets", "all"]),
            ("full", "base", []),
        ):
            out = root / name
            argv = ["hf", "finetune", "--model", str(folders[base]), "--corpus", str(corpus)]
            assert main([*argv, "--out", str(out), *FINETUNE, *extra]) == 0
            folders[name] = out
    return folders


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def export(run: Path, out: Path, *extra: str) -> int:
    return main(["hf", "export-delta", "--run", str(run), "--out", str(out), *extra])


def error_line(capsys) -> str:
    """The one ``error:`` line a refused command printed (progress bars aside), with no traceback."""
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out + err, out + err
    return lines[0]


def assert_same_model(a, b) -> None:
    """Same weights (bitwise) and the same logits over a few blocks."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sb:
        assert torch.equal(sa[name], sb[name]), name
    ids = torch.arange(3, 3 + 40)[None] % 300  # (1, 40): five blocks of 8 with landmarks added by the model
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("name", ["attention", "all"])
def test_delta_rebuilds_the_merged_model(runs, tmp_path, capsys, name):
    base = runs["base-tied" if name == "all" else "base"]
    out = tmp_path / "delta"
    assert export(runs[name], out) == 0  # --base: the run's --model
    assert "load with landmark.hf.load_pretrained" in capsys.readouterr().out
    assert files_under(out) == {delta.META_FILE, delta.TENSOR_FILE}
    meta = json.loads((out / delta.META_FILE).read_text())
    targets = 7 if name == "all" else 4
    assert meta["modules"] == 2 * targets and meta["lora"]["r"] == R and meta["lora"]["scaling"] == 8 / R
    assert meta["rebuild_max_abs_diff"] == 0.0 and meta["base"]["name"] == "model"

    model, tokenizer = lhf.load_pretrained(out, base=base)
    merged, merged_tokenizer = lhf.load_pretrained(runs[name])
    assert_same_model(model, merged)
    assert tokenizer.get_vocab() == merged_tokenizer.get_vocab()
    assert model.config._attn_implementation == "landmark" and not model.training
    from landmark.inference.options import Reading

    retrieval = Reading(k=2)
    prompt = "Call me Ishmael. Some years ago, never mind how long precisely"
    text, ids = lhf.generate(model, tokenizer, prompt, 6, reading=retrieval)
    merged_text, merged_ids = lhf.generate(merged.eval(), merged_tokenizer, prompt, 6, reading=retrieval)
    assert text == merged_text and torch.equal(torch.as_tensor(ids), torch.as_tensor(merged_ids))


def test_delta_holds_only_lora_and_the_landmark_rows(runs, tmp_path):
    """The tensors are r * (in + out) per module in float32 plus one row per row matrix (tied: one)."""
    from safetensors.torch import load_file

    sizes = {}
    for name in ("attention", "all"):
        out = tmp_path / name
        assert export(runs[name], out) == 0
        tensors = load_file(out / delta.TENSOR_FILE)
        rows = sorted(k for k in tensors if k.endswith(delta.ROW_SUFFIX))
        untied = [] if name == "all" else ["lm_head.weight" + delta.ROW_SUFFIX]  # "all" runs on the tied base
        assert rows == [*untied, "model.embed_tokens.weight" + delta.ROW_SUFFIX]
        assert all(t.dtype == torch.float32 for t in tensors.values())
        # per layer: q, o 64->64; k, v 64->32; gate, up 64->128; down 128->64
        dims = [(64, 64), (64, 32), (64, 32), (64, 64)] + ([(64, 128)] * 2 + [(128, 64)]) * (name == "all")
        lora = 2 * sum(R * (i + o) for i, o in dims)
        assert sum(t.numel() for t in tensors.values()) == lora + 64 * len(rows)
        sizes[name] = (out / delta.TENSOR_FILE).stat().st_size
        model_size = (runs[name] / "model.safetensors").stat().st_size
        assert sizes[name] < model_size / 10
    assert sizes["attention"] < sizes["all"]


def test_export_refuses_a_full_finetune_and_writes_nothing(runs, tmp_path, capsys):
    out = tmp_path / "delta"
    assert export(runs["full"], out) == 2
    err = error_line(capsys)
    assert err.startswith("error: --run") and "LoRA" in err
    assert files_under(tmp_path) == set()


def test_export_refuses_peft_options_it_does_not_carry(runs, tmp_path, capsys):
    run = tmp_path / "dora"
    shutil.copytree(runs["attention"], run)
    config_file = run / "lora-adapter" / delta.ADAPTER_CONFIG
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dora": True}))
    assert export(run, tmp_path / "delta") == 2
    err = error_line(capsys)
    assert err.startswith("error: --run") and "use_dora" in err and "only plain LoRA" in err
    assert not (tmp_path / "delta").exists() and not (tmp_path / ".delta.partial").exists()


def test_a_base_with_other_weights_is_refused(runs, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other"
    tokenizer = AutoTokenizer.from_pretrained(runs["base"])
    make_model(vocab=len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    before = files_under(tmp_path)
    assert export(runs["attention"], tmp_path / "delta", "--base", str(other)) == 2
    err = error_line(capsys)
    assert err.startswith("error: --base") and "not the model this run was fine-tuned from" in err
    assert files_under(tmp_path) == before

    out = tmp_path / "delta"
    assert export(runs["attention"], out) == 0
    fingerprint = json.loads((out / delta.META_FILE).read_text())["base"]["fingerprint"]
    with pytest.raises(ValueError, match=f"expected model with weights fingerprint {fingerprint}"):
        lhf.load_pretrained(out, base=other)


def test_api_states_never_replace_a_delta_or_its_base(runs, tmp_path, capsys):
    """``landmark.hf.generate(..., state=StateFiles(save=<the delta's file>, overwrite=True))`` with the
    model loaded from that delta: refused (the delta was destroyed); so are the base's files. Wrong types
    of reading, state and on_token name the argument."""
    out = tmp_path / "delta"
    assert export(runs["attention"], out) == 0
    model, tok = lhf.load_pretrained(out, base=runs["base"])
    before = files_under(tmp_path)
    for target in (out / delta.META_FILE, runs["base"] / "config.json"):
        state = StateFiles(save=target, overwrite=True)
        with pytest.raises(ValueError, match=r"is a file of .*, the model's"):
            lhf.generate(model, tok, "hello", 1, reading=Reading(k=2), state=state)
    assert files_under(tmp_path) == before
    for kwargs, name in (
        ({"reading": "x"}, "reading"),
        ({"state": "x"}, "state"),
        ({"on_token": "x"}, "on_token"),
    ):
        with pytest.raises(TypeError, match=rf"^{name} must be"):
            lhf.generate(model, tok, "hello", 1, **kwargs)
    with pytest.raises(TypeError, match=r"^path must be a folder path"):
        lhf.load_pretrained(None)
    assert main(["hf", "convert", "--model", str(out), "--out", str(tmp_path / "c")]) == 2
    assert "is a delta (a landmark model stored as changes to its base)" in error_line(capsys)
    with pytest.raises(TypeError, match=r"^dtype must be a torch\.dtype"):
        lhf.load_pretrained(out, base=runs["base"], dtype="bfloat16")


def test_export_refuses_bad_folders_and_writes_nothing(runs, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    converted = tmp_path / "converted"
    assert (
        main(["hf", "convert", "--model", str(runs["base"]), "--out", str(converted), "--block-size", "8"])
        == 0
    )
    capsys.readouterr()
    before = files_under(tmp_path)
    cases = [
        ([str(runs["attention"]), str(existing)], "--out"),  # not empty, no --overwrite
        ([str(tmp_path / "missing"), str(tmp_path / "d")], "--run"),
        ([str(runs["attention"]), str(tmp_path / "d"), "--base", str(tmp_path / "missing")], "--base"),
        ([str(runs["attention"]), str(tmp_path / "d"), "--base", str(converted)], "--base"),
    ]
    for (run, out, *extra), option in cases:
        assert export(Path(run), Path(out), *extra) == 2
        assert error_line(capsys).startswith(f"error: {option}")
    assert files_under(tmp_path) == before
    # --overwrite replaces a delta or a model, never a folder of something else
    assert export(runs["attention"], existing, "--overwrite") == 2
    assert "not a Hugging Face model or a delta" in error_line(capsys)
    assert files_under(tmp_path) == before
    assert export(runs["attention"], tmp_path / "d") == 0
    (tmp_path / "d" / "stale.txt").write_text("old")
    assert export(runs["attention"], tmp_path / "d", "--overwrite") == 0
    assert files_under(tmp_path / "d") == {delta.META_FILE, delta.TENSOR_FILE}


def test_a_missing_smollm2_base_is_prepared(runs, tmp_path, monkeypatch):
    """A delta made over the packaged SmolLM2 (a prepared folder: landmark-source.json) finds its base in
    the default folder and prepares it there when missing (here a copy of the tiny base stands in)."""
    packaged = tmp_path / "packaged"
    shutil.copytree(runs["base"], packaged)
    source = {"package": smollm2.PACKAGE, "file": smollm2.GGUF_FILE}
    (packaged / smollm2.SOURCE_FILE).write_text(json.dumps(source))
    out = tmp_path / "delta"
    assert export(runs["attention"], out, "--base", str(packaged)) == 0

    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake_prepare(dest, install=True, log=print):
        calls.append(Path(dest))
        shutil.copytree(packaged, dest)
        return Path(dest)

    monkeypatch.setattr(smollm2, "prepare_smollm2", fake_prepare)
    model, _ = lhf.load_pretrained(out)
    assert calls == [tmp_path / "cache" / "models" / smollm2.MODEL_NAME]
    assert_same_model(model, lhf.load_pretrained(runs["attention"])[0])
    lhf.load_pretrained(out)  # prepared now: not again
    assert len(calls) == 1


def test_hf_generate_reads_a_delta_over_another_base_with_base(runs, tmp_path, capsys):
    """A delta made over a model that is not the packaged SmolLM2: the error told to "pass base=", which
    the command line had no option for; ``--base`` gives it (and goes with a delta only)."""
    out = tmp_path / "delta"
    assert export(runs["attention"], out) == 0
    capsys.readouterr()
    ask = ["hf", "generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(ask) == 2
    assert "(hf generate --base)" in error_line(capsys)
    assert main([*ask, "--base", str(runs["base"])]) == 0
    capsys.readouterr()
    assert main([*ask, "--base", str(runs["base-tied"])]) == 2  # another model: --base is the mistake
    err = capsys.readouterr().err.strip().splitlines()  # one line (transformers' loading bar stood above)
    assert len(err) == 1 and err[0].startswith("error: --base: base "), err
    assert main(["hf", "generate", "--model", str(runs["attention"]), "--base", str(runs["base"]),
                 "--prompt", "hi"]) == 2  # fmt: skip
    assert "--base is the base of a delta" in error_line(capsys)


def test_load_refusals(runs, tmp_path):
    out = tmp_path / "delta"
    assert export(runs["attention"], out) == 0
    with pytest.raises(ValueError, match="not over the packaged SmolLM2-135M-Instruct: pass base="):
        lhf.load_pretrained(out)  # made over the tiny base, which is no packaged model
    with pytest.raises(ValueError, match="base= is for delta folders only"):
        lhf.load_pretrained(runs["attention"], base=runs["base"])
    good = json.loads((out / delta.META_FILE).read_text())
    edits = [
        ("lora", "r", "thirty-two"), ("lora", "r", 0), ("lora", "scaling", True), ("lora", "alpha", "64"),
        ("landmark", "block_size", 1.5), ("landmark", "token_id", -1), ("base", "fingerprint", 7),
        # numbers that load but change the model: a scaling not finite or not alpha / r
        ("lora", "scaling", float("nan")), ("lora", "scaling", 1e30), ("lora", "alpha", float("inf")),
        ("lora", "scaling", good["lora"]["scaling"] / 2),
    ]  # fmt: skip
    for section, key, value in edits:  # a hand-edited delta.json is refused before anything is loaded
        meta = json.loads(json.dumps(good))
        meta[section][key] = value
        (out / delta.META_FILE).write_text(json.dumps(meta))
        with pytest.raises(ValueError, match=r"cannot read delta\.json"):
            lhf.load_pretrained(out, base=runs["base"])
    meta = json.loads(json.dumps(good))  # another rank than the tensors', scaling kept alpha / r
    meta["lora"]["r"] = 2 * good["lora"]["r"]
    meta["lora"]["alpha"] = meta["lora"]["scaling"] * meta["lora"]["r"]
    (out / delta.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"records lora.r = {2 * R}, its LoRA tensors have rank {R}"):
        lhf.load_pretrained(out, base=runs["base"])
    (out / delta.META_FILE).write_text(json.dumps(good))
    (out / delta.TENSOR_FILE).unlink()
    with pytest.raises(ValueError, match=r"delta\.safetensors is missing"):
        lhf.load_pretrained(out, base=runs["base"])
    (out / delta.META_FILE).write_text("{")
    with pytest.raises(ValueError, match=r"cannot read delta\.json"):
        lhf.load_pretrained(out, base=runs["base"])


def test_quickstart_with_a_delta_and_its_base_beside(runs, tmp_path, monkeypatch, capsys):
    """The main job's SmolLM2 part at toy sizes: a delta model's passkey cells with retrieval, the base
    model's from the second process, one report with both, and the small model's perplexity."""
    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "delta"
    assert export(runs["all"], dest) == 0
    out = tmp_path / "qs"
    argv = ["quickstart", "--out", str(out), "--hf-model", str(dest), "--base", str(runs["base-tied"])]
    argv += ["--ppl-lengths", "64", "128", "--ppl-tokens", "256", "--passkey-lengths", "300", "400"]
    argv += ["--base-lengths", "300", "--trials", "1"]
    assert main(argv) == 0
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| smollm2-landmark", "| base"))]
    assert len(rows) == 6, report  # the delta model at 300 and 400, the base at 300; in both wordings
    assert "(hf-landmark) | 400 |" in report and "base (hf) | 300 |" in report
    assert "| smollm2-landmark, held-out wording (hf-landmark) | 400 |" in report
    assert "| base, held-out wording (hf) | 300 |" in report
    assert (out / "passkey.png").is_file() and (out / "perplexity.png").is_file()
    assert "- smollm2-landmark at 400 tokens, depth 0.50: " in report  # its key and answer listed
    assert "- smollm2-landmark, held-out wording at 400 tokens, depth 0.50: " in report
    for wording in ("paper", "held-out"):
        (cell,) = json.loads((out / "base" / wording / "passkey.json").read_text())["results"]
        assert cell["kind"] == "hf" and cell["length"] == 300
    assert "report written to" in capsys.readouterr().out
    # refused before any work: a missing model folder, a length too short for the prompt
    for bad, name in (
        (["--hf-model", str(tmp_path / "none")], "--hf-model"),
        (["--base-lengths", "100"], "--base-lengths"),
    ):
        assert main(last_wins([*argv, "--out", str(tmp_path / "qs2"), *bad])) == 2
        assert name in error_line(capsys)
        assert not (tmp_path / "qs2").exists()


def test_init_delta_starts_where_the_delta_left_off(runs, tmp_path, monkeypatch):
    """start_from_delta + peft + set_lora is the delta's model before any step (merged: bitwise the
    loaded delta), and a continued fine-tune (`--init-delta`) exports a delta over the same base."""
    from landmark.hf.finetune import FinetuneConfig, _with_lora

    out = tmp_path / "delta"
    assert export(runs["all"], out) == 0
    model, _, tensors = delta.start_from_delta(runs["base-tied"], out)
    cfg = FinetuneConfig(model=str(runs["base-tied"]), out=str(tmp_path / "x"), lora_r=R, lora_alpha=8)
    cfg.lora_targets = "all"
    peft_model = _with_lora(model, cfg)
    delta.set_lora(peft_model, tensors)
    loaded, _ = lhf.load_pretrained(out, base=runs["base-tied"])
    merged = peft_model.merge_and_unload().eval()
    ids = torch.arange(3, 3 + 40)[None] % 300
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, loaded(ids).logits, rtol=0, atol=1e-5)

    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    corpus = runs["base-tied"].parent / "corpus"
    cont = tmp_path / "continued"
    argv = ["hf", "finetune", "--model", str(runs["base-tied"]), "--corpus", str(corpus), "--out", str(cont)]
    extra = ["--lora-r", str(R), *LORA, "--lora-targets", "all", "--init-delta", str(out)]
    assert main([*argv, *FINETUNE, *extra]) == 0
    summary = json.loads((cont / "landmark-finetune.json").read_text())
    assert summary["config"]["init_delta"] == str(out)
    assert export(cont, tmp_path / "delta2") == 0
    meta2 = json.loads((tmp_path / "delta2" / delta.META_FILE).read_text())
    first = json.loads((out / delta.META_FILE).read_text())["finetune"]
    assert meta2["earlier_finetunes"] == [first] and meta2["finetune"]["init_delta"] == str(out)
    again, _ = lhf.load_pretrained(tmp_path / "delta2", base=runs["base-tied"])
    with torch.no_grad():  # trained further: no longer the first delta
        assert not torch.allclose(again(ids).logits, loaded(ids).logits, atol=1e-4)


def test_full_finetune_from_a_delta(runs, tmp_path, monkeypatch):
    """`--init-delta` with `--lora-r 0`: all weights train, starting from the delta's merged model
    (bitwise what `load_pretrained(delta)` builds); the LoRA options need not match the delta's."""
    out = tmp_path / "delta"
    assert export(runs["all"], out) == 0
    start, _, tensors = delta.start_from_delta(runs["base-tied"], out, merge=True)
    loaded, _ = lhf.load_pretrained(out, base=runs["base-tied"])
    assert tensors is None
    assert_same_model(start.eval(), loaded)

    monkeypatch.setenv("LANDMARK_CACHE", str(tmp_path / "cache"))
    corpus = runs["base-tied"].parent / "corpus"
    full = tmp_path / "full"
    argv = ["hf", "finetune", "--model", str(runs["base-tied"]), "--corpus", str(corpus), "--out", str(full)]
    assert main([*argv, *FINETUNE, "--lora-r", "0", "--init-delta", str(out)]) == 0
    summary = json.loads((full / "landmark-finetune.json").read_text())
    assert summary["config"]["init_delta"] == str(out) and summary["config"]["lora_r"] == 0
    assert not (full / "lora-adapter").exists()
    trained, _ = lhf.load_pretrained(full)
    changed = {n for n, p in trained.state_dict().items() if not torch.equal(p, loaded.state_dict()[n])}
    assert "model.layers.0.mlp.down_proj.weight" in changed  # a weight LoRA trained, now trained fully
    assert "model.norm.weight" in changed  # a weight no LoRA touches: all parameters train


def test_init_delta_refusals(runs, tmp_path, capsys):
    """A delta of another rank or targets, a landmark model as --model, another base: one error line,
    nothing written."""
    out = tmp_path / "delta"
    assert export(runs["all"], out) == 0
    capsys.readouterr()
    corpus = runs["base-tied"].parent / "corpus"
    dest = tmp_path / "continued"
    base = [
        "hf",
        "finetune",
        "--corpus",
        str(corpus),
        "--out",
        str(dest),
        *FINETUNE,
        "--init-delta",
        str(out),
    ]
    good = ["--lora-r", str(R), *LORA, "--lora-targets", "all"]
    cases = [
        (
            ["--model", str(runs["base-tied"]), "--lora-r", "8", *LORA, "--lora-targets", "all"],
            "--lora-r must match",
        ),
        (["--model", str(runs["base-tied"]), "--lora-r", str(R), *LORA], "--lora-targets must match"),
        (["--model", str(runs["all"]), *good], "already a landmark model"),
        (["--model", str(runs["base"]), *good], "is not the base of delta"),
        (
            ["--model", str(runs["base-tied"]), *good, "--block-size", "16"],
            "--block-size must be the delta's 8",
        ),
    ]
    before = files_under(tmp_path)
    for extra, message in cases:
        assert main(last_wins([*base, *extra])) == 2, extra  # (a later --block-size replaces FINETUNE's)
        assert message in error_line(capsys)
    assert files_under(tmp_path) == before
    (out / delta.META_FILE).write_text("{")
    assert main([*base, "--model", str(runs["base-tied"]), *good]) == 2
    assert error_line(capsys).startswith("error: --init-delta")
